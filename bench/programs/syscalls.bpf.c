// SPDX-License-Identifier: GPL-2.0
/*
 * The syscall benchmark's programs (bench/bench_syscalls.py): count getppid()
 * entries (slot ENTER of `counts`) and exits (slot EXIT) of one process.
 *
 * The filter is the one bcc and libbpf tools use: the program runs for every
 * process's getppid in the kernel and counts only when the current tgid is
 * `target_tgid` (set before load: libbpf's .rodata initial value on the
 * kernel side, hybrid.load(values=...) on hybrid's).  One object, loaded by
 * both sides: the kernel attaches the sections to its syscall tracepoints,
 * hybrid runs them in the traced process by hooking libc's syscall sites.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "GPL";

#define ENTER 0
#define EXIT 1

const volatile u32 target_tgid = 0;

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2);
	__type(key, u32);
	__type(value, u64);
} counts SEC(".maps");

static __always_inline int bump(u32 slot)
{
	u64 *p;

	if ((u32)(bpf_get_current_pid_tgid() >> 32) != target_tgid)
		return 0;
	p = bpf_map_lookup_elem(&counts, &slot);
	if (p)
		__sync_fetch_and_add(p, 1);
	return 0;
}

SEC("tracepoint/syscalls/sys_enter_getppid")
int count_enter(struct trace_event_raw_sys_enter *ctx)
{
	return bump(ENTER);
}

SEC("tracepoint/syscalls/sys_exit_getppid")
int count_exit(struct trace_event_raw_sys_exit *ctx)
{
	return bump(EXIT);
}
