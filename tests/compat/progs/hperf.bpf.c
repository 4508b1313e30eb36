// SPDX-License-Identifier: GPL-2.0
/* hperf: a uprobe on hload_work(int x) of the hload workload that sends one perf buffer
 * record per call ({pid, x}) through a BPF_MAP_TYPE_PERF_EVENT_ARRAY, for `hybrid load`'s
 * perf buffer tests (the loader is hperf.c: libbpf's perf_buffer API). */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

char LICENSE[] SEC("license") = "GPL";

struct hperf_event {
	__u32 pid;
	__s32 x;
	__u64 seq;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERF_EVENT_ARRAY);
	__uint(key_size, sizeof(__u32));
	__uint(value_size, sizeof(__u32));
} events SEC(".maps");

__u64 calls = 0;
__u64 failed = 0;

SEC("uprobe")
int BPF_KPROBE(hperf_enter, int x)
{
	struct hperf_event e = {};

	e.pid = bpf_get_current_pid_tgid() >> 32;
	e.x = x;
	e.seq = __sync_fetch_and_add(&calls, 1);
	if (bpf_perf_event_output(ctx, &events, BPF_F_CURRENT_CPU, &e, sizeof(e)))
		__sync_fetch_and_add(&failed, 1);
	return 0;
}
