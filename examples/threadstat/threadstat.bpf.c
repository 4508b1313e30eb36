// SPDX-License-Identifier: GPL-2.0
/*
 * threadstat: per thread of one process, the system calls it makes (counted
 * in the KERNEL by a raw tracepoint, which sees every syscall) and the calls
 * of one of its functions (counted in USERSPACE by a uprobe that runs inside
 * the process, a few ns per call instead of microseconds).  Both sides count
 * into the one map `counts`, keyed by thread and by what is counted.
 *
 * Built like any libbpf program: clang -O2 -g -target bpf -I<dir of vmlinux.h>.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

#define CALLS 0xffffffffu /* key.what of the function-call counter; otherwise a syscall number */

struct count_key {
	__u32 tid;
	__u32 what;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, struct count_key);
	__type(value, __u64);
} counts SEC(".maps");

/* The process to watch, set by the agent once it has started the workload
 * (a global in .bss: an mmap-able array shared by both sides). */
__u32 target_tgid;

static __always_inline void bump(struct count_key *k)
{
	__u64 one = 1, *v = bpf_map_lookup_elem(&counts, k);

	if (v)
		__sync_fetch_and_add(v, 1);
	else if (bpf_map_update_elem(&counts, k, &one, BPF_NOEXIST))
		/* another CPU created it first (the kernel side can race with itself) */
		if ((v = bpf_map_lookup_elem(&counts, k)))
			__sync_fetch_and_add(v, 1);
}

/* Kernel side: every system call of every process passes here. */
SEC("raw_tp/sys_enter")
int count_syscalls(struct bpf_raw_tracepoint_args *ctx)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct count_key k = { .tid = (__u32)id, .what = (__u32)ctx->args[1] };

	if (id >> 32 != target_tgid)
		return 0;
	bump(&k);
	return 0;
}

/* Userspace side: runs inside the workload process, at each call of work(). */
SEC("uprobe/threadstat-workload:work")
int count_calls(struct pt_regs *ctx)
{
	struct count_key k = { .tid = (__u32)bpf_get_current_pid_tgid(), .what = CALLS };

	bump(&k);
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
