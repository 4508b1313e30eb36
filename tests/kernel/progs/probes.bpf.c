/* Uprobes, a USDT probe and a perf event program on tests/kernel's workload.
 * Compiled with -DWORKLOAD="<path of the workload>" for the named uprobe section. */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/usdt.bpf.h>

#ifndef WORKLOAD
#define WORKLOAD "/nonexistent"
#endif

/* 0: uprobe hits, 1: uretprobe hits, 2: sum of work_add's results, 3: USDT hits, 4: sum of the USDT
 * argument, 5: perf event samples, 6: hits of the uprobe named by its section */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 8);
	__type(key, __u32);
	__type(value, __u64);
} hits SEC(".maps");

static __always_inline void add(__u32 slot, __u64 n)
{
	__u64 *v = bpf_map_lookup_elem(&hits, &slot);
	if (v)
		__sync_fetch_and_add(v, n);
}

SEC("uprobe")
int up_entry(struct pt_regs *ctx)
{
	add(0, 1);
	return 0;
}

SEC("uretprobe")
int up_return(struct pt_regs *ctx)
{
	add(1, 1);
	add(2, PT_REGS_RC(ctx));
	return 0;
}

SEC("uprobe/" WORKLOAD ":work_add")
int up_named(struct pt_regs *ctx)
{
	add(6, 1);
	return 0;
}

SEC("usdt")
int usdt_tick(struct pt_regs *ctx)
{
	long arg = 0;

	add(3, 1);
	if (bpf_usdt_arg(ctx, 0, &arg) == 0)
		add(4, arg);
	return 0;
}

SEC("perf_event")
int on_sample(struct bpf_perf_event_data *ctx)
{
	add(5, 1);
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
