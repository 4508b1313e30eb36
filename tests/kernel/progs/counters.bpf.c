/* Syscall counters for tests/kernel: a tracepoint and a raw tracepoint, filtered to one process. */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

/* set by the test through KernelObject(initial={".rodata": ...}) */
const volatile struct {
	__u32 tgid;
	__u32 nr; /* the syscall number raw_enter counts */
} cfg = {};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 4);
	__type(key, __u32);
	__type(value, __u64);
} counts SEC(".maps");

static __always_inline int mine(void)
{
	return (bpf_get_current_pid_tgid() >> 32) == cfg.tgid;
}

static __always_inline void bump(__u32 slot)
{
	__u64 *v = bpf_map_lookup_elem(&counts, &slot);
	if (v)
		__sync_fetch_and_add(v, 1);
}

SEC("tracepoint/syscalls/sys_enter_getppid")
int tp_getppid(struct trace_event_raw_sys_enter *ctx)
{
	if (mine())
		bump(0);
	return 0;
}

SEC("raw_tp/sys_enter")
int raw_enter(struct bpf_raw_tracepoint_args *ctx)
{
	if (mine() && ctx->args[1] == cfg.nr)
		bump(1);
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
