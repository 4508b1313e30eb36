// SPDX-License-Identifier: GPL-2.0
/*
 * syscount: count system calls (and their latency) per syscall or per
 * process, like bcc's syscount (tools/syscount.py), written for libbpf.
 *
 * raw_tp/sys_enter and raw_tp/sys_exit: in the kernel they see every
 * process's system calls; hybrid also runs them inside one process, at
 * each system call it makes through libc (and at the syscall instructions
 * of its executable), with the same {regs, id} / {regs, ret} context, so
 * the one object serves both places.  bcc's option #defines are const
 * volatile knobs here, set before load.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>

const volatile __u32 filter_tid = 0;     /* -t TID */
const volatile __u32 filter_ppid = 0;    /* -c PPID (kernel only: reads the task's parent) */
const volatile __s32 filter_syscall = -1; /* --syscall NAME */
const volatile __u32 filter_failed = 0;  /* -x */
const volatile __u32 filter_errno = 0;   /* -e ERRNO */
const volatile __u32 latency = 0;        /* -L */
const volatile __u32 by_process = 0;     /* -P */

/* -p PID (or the started command), 0 for every process: .bss, set once the pid is known */
__u32 target_tgid;

struct data_t {
	__u64 count;
	__u64 total_ns;
};

/* syscall entry time per thread (-L) */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 10240);
	__type(key, __u64);
	__type(value, __u64);
} start SEC(".maps");

/* per syscall number (or per process, -P) */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 10240);
	__type(key, __u32);
	__type(value, struct data_t);
} data SEC(".maps");

static __always_inline int filtered(__u64 pid_tgid, long id)
{
	if (filter_syscall >= 0 && id != filter_syscall)
		return 1;
	if (target_tgid && (__u32)(pid_tgid >> 32) != target_tgid)
		return 1;
	if (filter_tid && (__u32)pid_tgid != filter_tid)
		return 1;
	if (filter_ppid) {
		struct task_struct *task = (struct task_struct *)bpf_get_current_task();

		if ((__u32)BPF_CORE_READ(task, real_parent, tgid) != filter_ppid)
			return 1;
	}
	return 0;
}

SEC("raw_tp/sys_enter")
int sys_enter(struct bpf_raw_tracepoint_args *ctx)
{
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	__u64 t;

	if (!latency || filtered(pid_tgid, (long)ctx->args[1]))
		return 0;
	t = bpf_ktime_get_ns();
	bpf_map_update_elem(&start, &pid_tgid, &t, BPF_ANY);
	return 0;
}

SEC("raw_tp/sys_exit")
int sys_exit(struct bpf_raw_tracepoint_args *ctx)
{
	struct pt_regs *regs = (struct pt_regs *)ctx->args[0];
	long ret = (long)ctx->args[1];
	long id = BPF_CORE_READ(regs, orig_ax);
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	struct data_t *val, zero = {};
	__u64 *start_ns = 0;
	__u32 key;

	if (filtered(pid_tgid, id))
		return 0;
	if (filter_failed && ret >= 0)
		return 0;
	if (filter_errno && ret != -(long)filter_errno)
		return 0;
	key = by_process ? (__u32)(pid_tgid >> 32) : (__u32)id;
	if (latency) {
		start_ns = bpf_map_lookup_elem(&start, &pid_tgid);
		if (!start_ns)
			return 0;
	}
	val = bpf_map_lookup_elem(&data, &key);
	if (!val) {
		bpf_map_update_elem(&data, &key, &zero, BPF_NOEXIST);
		val = bpf_map_lookup_elem(&data, &key);
		if (!val)
			return 0;
	}
	__sync_fetch_and_add(&val->count, 1);
	if (start_ns)
		__sync_fetch_and_add(&val->total_ns, bpf_ktime_get_ns() - *start_ns);
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
