// SPDX-License-Identifier: GPL-2.0
/*
 * opensnoop: trace open(), openat() and openat2().
 *
 * A libbpf-style port of bcc's opensnoop (tools/opensnoop.py, 0.26) for
 * hybrid.  The same programs run in either place:
 *
 *   - inside the traced process (hybrid's syscall probes, userspace): the
 *     agent runs sys_enter_* before and sys_exit_* after each open system
 *     call the process makes through libc, with the tracepoint's record;
 *   - in the kernel, on the syscalls:sys_{enter,exit}_open* tracepoints
 *     (system-wide, or --mode kernel).
 *
 * Entry stores the filename pointer and the flags per thread; exit sends
 * one record (bcc's data_t) through the ring buffer `events`.  With
 * full_path set, the kernel side walks current->fs->pwd as bcc -F does,
 * sending one EVENT_ENTRY record per path component and an EVENT_END
 * record; in a process (no task_struct there: bpf_get_current_task() is 0)
 * only the two records are sent and the controller completes relative
 * paths from the working directory it tracks (TRACK_CWD below) or dfd.
 *
 * Filters are set before load (const volatile, libbpf-tools style).
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>

#ifndef EVENTS_BYTES
#define EVENTS_BYTES (512 * 1024)
#endif
#define TASK_COMM_LEN 16
#define NAME_MAX 255
#define MAX_ENTRIES 32 /* path components walked for -F (bcc's MAX_ENTRIES) */

enum event_type {
	EVENT_ENTRY,
	EVENT_END,
	EVENT_CWD, /* TRACK_CWD: a successful chdir (name) or fchdir (dfd) */
};

const volatile __u32 targ_tgid = 0;    /* 0: every process */
const volatile __u32 targ_tid = 0;     /* 0: every thread (trumps targ_tgid, as bcc's -t) */
const volatile __u32 targ_uid = -1;    /* -1: every user */
const volatile __u32 flag_mask = 0;    /* 0: no flag filter; else only opens with (flags & mask) */
const volatile bool full_path = false; /* -F */
const volatile bool want_uid = true;   /* fill data.uid (-U): in a process it costs two syscalls */
const volatile bool filtered_out = false; /* the target is outside --cgroupmap/--mntnsmap: trace nothing */

#ifdef CGROUP_FILTER /* --cgroupmap in the kernel: bcc's BPF_TABLE_PINNED, shared by the loader */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u64);
	__type(value, __u64);
} cgroupset SEC(".maps");
#endif

#ifdef MNTNS_FILTER /* --mntnsmap in the kernel */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u64);
	__type(value, __u32);
} mount_ns_set SEC(".maps");
#endif

/* bcc's container_should_be_filtered(); in a process the controller decides once (filtered_out). */
static __always_inline int container_should_be_filtered(void)
{
#ifdef CGROUP_FILTER
	{
		__u64 cgroupid = bpf_get_current_cgroup_id();

		if (!bpf_map_lookup_elem(&cgroupset, &cgroupid))
			return 1;
	}
#endif
#ifdef MNTNS_FILTER
	{
		struct task_struct *task = (struct task_struct *)bpf_get_current_task();
		__u64 ns_id = BPF_CORE_READ(task, nsproxy, mnt_ns, ns.inum);

		if (!bpf_map_lookup_elem(&mount_ns_set, &ns_id))
			return 1;
	}
#endif
	return filtered_out;
}

struct val_t {
	__u64 id;
	const char *fname;
	__s64 dfd;
	int flags;
	int pad;
};

struct data_t {
	__u64 id;
	__u64 ts;     /* us */
	__u32 uid;
	int ret;
	char comm[TASK_COMM_LEN];
	__u32 type;   /* enum event_type */
	int flags;
	__s32 dfd;    /* for the controller's -F in a process; AT_FDCWD (-100) for open() */
	__u32 kernel; /* 1: the record comes from the kernel (EVENT_ENTRY records carry -F's components) */
	char name[NAME_MAX];
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 10240);
	__type(key, __u64);
	__type(value, struct val_t);
} infotmp SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, EVENTS_BYTES);
} events SEC(".maps");

static __always_inline int trace_entry(const char *filename, int flags, __s64 dfd)
{
	__u64 id = bpf_get_current_pid_tgid();
	__u32 pid = id >> 32, tid = (__u32)id;
	struct val_t val = {};

	if (targ_tid) {
		if (tid != targ_tid)
			return 0;
	} else if (targ_tgid && pid != targ_tgid) {
		return 0;
	}
	if (targ_uid != (__u32)-1 && (__u32)bpf_get_current_uid_gid() != targ_uid)
		return 0;
	if (flag_mask && !(flags & flag_mask))
		return 0;
	if (container_should_be_filtered())
		return 0;
	val.id = id;
	val.fname = filename;
	val.flags = flags;
	val.dfd = dfd;
	bpf_map_update_elem(&infotmp, &id, &val, BPF_ANY);
	return 0;
}

__u64 lost = 0; /* records the ring had no room for (the controller says "Possibly lost N samples") */

#ifdef COMM_CACHE
/*
 * COMM_CACHE (in a process): bpf_get_current_comm() is a prctl(PR_GET_NAME)
 * system call there, about a third of what an event costs.  Each thread's
 * name is kept for at most COMM_TTL_NS, and dropped at once when the thread
 * renames itself (prctl(PR_SET_NAME), which pthread_setname_np uses for the
 * calling thread); a thread renamed by another one (through
 * /proc/self/task/TID/comm) shows its old name for at most COMM_TTL_NS.
 */
#define COMM_TTL_NS 10000000ull /* 10 ms */
#define PR_SET_NAME 15

struct comm_t {
	__u64 when;
	char comm[TASK_COMM_LEN];
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 10240);
	__type(key, __u32);
	__type(value, struct comm_t);
} comm_cache SEC(".maps");

SEC("tracepoint/syscalls/sys_enter_prctl")
int comm_prctl(struct trace_event_raw_sys_enter *ctx)
{
	__u32 tid = (__u32)bpf_get_current_pid_tgid();

	if (ctx->args[0] == PR_SET_NAME)
		bpf_map_delete_elem(&comm_cache, &tid);
	return 0;
}
#endif

static __always_inline void current_comm(char *comm, __u64 now)
{
#ifdef COMM_CACHE
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	struct comm_t *c = bpf_map_lookup_elem(&comm_cache, &tid);
	struct comm_t fresh = {};

	if (c && now - c->when < COMM_TTL_NS) {
		__builtin_memcpy(comm, c->comm, TASK_COMM_LEN);
		return;
	}
	bpf_get_current_comm(&fresh.comm, sizeof(fresh.comm));
	fresh.when = now;
	bpf_map_update_elem(&comm_cache, &tid, &fresh, BPF_ANY);
	__builtin_memcpy(comm, fresh.comm, TASK_COMM_LEN);
#else
	bpf_get_current_comm(comm, TASK_COMM_LEN);
#endif
}

static __always_inline void submit(struct data_t *data)
{
	if (bpf_ringbuf_output(&events, data, sizeof(*data), 0))
		__sync_fetch_and_add(&lost, 1);
}

static __always_inline int trace_return(long ret)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct val_t *valp;
	struct data_t data = {};
	struct task_struct *task;
	__u64 now;

	valp = bpf_map_lookup_elem(&infotmp, &id);
	if (!valp)
		return 0; /* missed entry */
	now = bpf_ktime_get_ns();
	current_comm(data.comm, now);
	bpf_probe_read_user_str(&data.name, sizeof(data.name), valp->fname);
	data.id = valp->id;
	data.ts = now / 1000;
	if (want_uid)
		data.uid = (__u32)bpf_get_current_uid_gid();
	data.flags = valp->flags;
	data.dfd = (__s32)valp->dfd;
	data.ret = ret;
	bpf_map_delete_elem(&infotmp, &id);

	task = (struct task_struct *)bpf_get_current_task();
	data.kernel = task != 0;
	if (!full_path) {
		data.type = EVENT_END;
		submit(&data);
		return 0;
	}
	data.type = EVENT_ENTRY;
	submit(&data);
	if (task && data.name[0] != '/') { /* relative path: walk the working directory up to its root */
		struct dentry *dentry = BPF_CORE_READ(task, fs, pwd.dentry);
		int i;

		for (i = 1; i < MAX_ENTRIES; i++) {
			struct dentry *parent = BPF_CORE_READ(dentry, d_parent);

			bpf_probe_read_kernel_str(&data.name, sizeof(data.name), BPF_CORE_READ(dentry, d_name.name));
			data.type = EVENT_ENTRY;
			submit(&data);
			if (dentry == parent) /* root directory */
				break;
			dentry = parent;
		}
	}
	data.type = EVENT_END;
	submit(&data);
	return 0;
}

#define AT_FDCWD -100

#ifdef TRACK_CWD
/* -F inside a process: there is no task_struct to walk, so the controller
 * keeps each process's working directory itself, from where it was at
 * attach time and every chdir()/fchdir() since (and the paths of the fds
 * that opens returned, for fchdir and openat's dfd). */
static __always_inline int cwd_entry(const char *filename, __s64 fd)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct val_t val = {};

	if (targ_tgid && (id >> 32) != targ_tgid)
		return 0;
	val.id = id;
	val.fname = filename;
	val.dfd = fd;
	bpf_map_update_elem(&infotmp, &id, &val, BPF_ANY);
	return 0;
}

static __always_inline int cwd_return(long ret)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct val_t *valp = bpf_map_lookup_elem(&infotmp, &id);
	struct data_t data = {};

	if (!valp)
		return 0;
	if (ret == 0) {
		data.id = id;
		data.type = EVENT_CWD;
		data.dfd = (__s32)valp->dfd;
		if (valp->fname)
			bpf_probe_read_user_str(&data.name, sizeof(data.name), valp->fname);
		submit(&data);
	}
	bpf_map_delete_elem(&infotmp, &id);
	return 0;
}

SEC("tracepoint/syscalls/sys_enter_chdir")
int trace_entry_chdir(struct trace_event_raw_sys_enter *ctx)
{
	return cwd_entry((const char *)ctx->args[0], AT_FDCWD);
}

SEC("tracepoint/syscalls/sys_exit_chdir")
int trace_return_chdir(struct trace_event_raw_sys_exit *ctx)
{
	return cwd_return(ctx->ret);
}

SEC("tracepoint/syscalls/sys_enter_fchdir")
int trace_entry_fchdir(struct trace_event_raw_sys_enter *ctx)
{
	return cwd_entry(0, (int)ctx->args[0]);
}

SEC("tracepoint/syscalls/sys_exit_fchdir")
int trace_return_fchdir(struct trace_event_raw_sys_exit *ctx)
{
	return cwd_return(ctx->ret);
}
#endif

SEC("tracepoint/syscalls/sys_enter_open")
int syscall__trace_entry_open(struct trace_event_raw_sys_enter *ctx)
{
	return trace_entry((const char *)ctx->args[0], (int)ctx->args[1], AT_FDCWD);
}

SEC("tracepoint/syscalls/sys_enter_openat")
int syscall__trace_entry_openat(struct trace_event_raw_sys_enter *ctx)
{
	return trace_entry((const char *)ctx->args[1], (int)ctx->args[2], (int)ctx->args[0]);
}

SEC("tracepoint/syscalls/sys_enter_openat2")
int syscall__trace_entry_openat2(struct trace_event_raw_sys_enter *ctx)
{
	struct open_how how = {};

	bpf_probe_read_user(&how, sizeof(how), (void *)ctx->args[2]);
	return trace_entry((const char *)ctx->args[1], (int)how.flags, (int)ctx->args[0]);
}

SEC("tracepoint/syscalls/sys_exit_open")
int trace_return_open(struct trace_event_raw_sys_exit *ctx)
{
	return trace_return(ctx->ret);
}

SEC("tracepoint/syscalls/sys_exit_openat")
int trace_return_openat(struct trace_event_raw_sys_exit *ctx)
{
	return trace_return(ctx->ret);
}

SEC("tracepoint/syscalls/sys_exit_openat2")
int trace_return_openat2(struct trace_event_raw_sys_exit *ctx)
{
	return trace_return(ctx->ret);
}

char LICENSE[] SEC("license") = "GPL";
