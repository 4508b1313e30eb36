// SPDX-License-Identifier: GPL-2.0
/* A uprobe and a sched_switch tracepoint sharing a hash map, for tests/compat/test_load.py: the
 * tracepoint must run in the kernel, so the map is the kernel's; under hybrid load the uprobe then
 * runs in the kernel too (attached second), or the tracepoint's attach is refused (attached second). */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "GPL";

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4);
	__type(key, __u32);
	__type(value, __u64);
} shared SEC(".maps");

static void count(__u32 key)
{
	__u64 one = 1, *v = bpf_map_lookup_elem(&shared, &key);

	if (v)
		__sync_fetch_and_add(v, 1);
	else
		bpf_map_update_elem(&shared, &key, &one, BPF_NOEXIST);
}

SEC("uprobe/libc.so.6:getppid")
int on_getppid(void *ctx)
{
	count(0);
	return 0;
}

SEC("tracepoint/sched/sched_switch")
int on_switch(void *ctx)
{
	count(1);
	return 0;
}
