// SPDX-License-Identifier: GPL-2.0
/*
 * The probe benchmark's programs (bench/bench_probes.py): count the hits of a
 * uprobe (slot ENTRY of `counts`) and of a uretprobe (slot RETURN).
 *
 * Built twice from this one source (bench/probe_programs.py):
 *
 *  - as is: `count` and `count_ret` in bare SEC("uprobe") / SEC("uretprobe")
 *    sections, attached by hand to any victim (the kernel side: libbpf's
 *    bpf_program__attach_uprobe with the victim's file offset);
 *  - with -DVICTIM_LIB='"/path/to/victims.so"': the same two bodies once per
 *    victim, `count_<victim>` / `count_ret_<victim>` in
 *    SEC("uprobe/<lib>:victim_<victim>") sections (hybrid's side:
 *    BpfObject.attach(programs=[...]) attaches by section name).
 *
 * The bodies are identical (one inline function), so both sides run the same
 * eBPF code per hit: one array lookup and one atomic add.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "GPL";

#define ENTRY 0
#define RETURN 1

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2);
	__type(key, u32);
	__type(value, u64);
} counts SEC(".maps");

static __always_inline int bump(u32 slot)
{
	u64 *p = bpf_map_lookup_elem(&counts, &slot);

	if (p)
		__sync_fetch_and_add(p, 1);
	return 0;
}

#ifndef VICTIM_LIB

SEC("uprobe")
int count(struct pt_regs *ctx)
{
	return bump(ENTRY);
}

SEC("uretprobe")
int count_ret(struct pt_regs *ctx)
{
	return bump(RETURN);
}

#else

#define PROBES(victim)                                                  \
	SEC("uprobe/" VICTIM_LIB ":victim_" #victim)                    \
	int count_##victim(struct pt_regs *ctx)                         \
	{                                                               \
		return bump(ENTRY);                                     \
	}                                                               \
	SEC("uretprobe/" VICTIM_LIB ":victim_" #victim)                 \
	int count_ret_##victim(struct pt_regs *ctx)                     \
	{                                                               \
		return bump(RETURN);                                    \
	}

PROBES(lea)
PROBES(push)
PROBES(nop5)

#endif
