// SPDX-License-Identifier: GPL-2.0
/*
 * The memory benchmark's programs (bench/bench_memory.py): uprobes on
 * victim_buf(long *buf, long i) (programs/memvictim.c) that read or write the
 * caller's buffer through PT_REGS_PARM1.
 *
 *   read1      bpf_probe_read_user of buf[0] (8 bytes), once per hit
 *   read1000   bpf_probe_read_user of buf[0], buf[1], ... buf[999]: 1000
 *              reads of 8 bytes at 1000 distinct offsets of an 8000-byte
 *              buffer, per hit (a bounded loop)
 *   write1     bpf_probe_write_user of the value i to buf[0], once per hit
 *   write1000  bpf_probe_write_user of i + k to buf[k] for k < 1000, per hit
 *
 * Each counts its hits (slot HITS of the ARRAY map `stats`) and the helper
 * calls that returned 0 (slot OK); the read programs add what they read to
 * slot SUM.  The benchmark checks HITS = calls, OK = calls x words, SUM =
 * calls x the sum of the words read, and, for the writes, the buffer and what
 * the victim returned (it returns buf[0], which write1/write1000 set to i
 * just before it loads it).
 *
 * Built twice from this one source (bench/bench_memory.py):
 *
 *  - as is: bare SEC("uprobe") sections, attached by libbpf to the victim's
 *    file offset (the kernel side);
 *  - with -DVICTIM_LIB='"/path/to/memvictim.so"': the same bodies in
 *    SEC("uprobe/<lib>:victim_buf") sections, which hybrid's
 *    BpfObject.attach(programs=[...]) attaches by section name.
 *
 * The write programs are separate programs so that a kernel refusing
 * bpf_probe_write_user (lockdown) still loads the read ones.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

char LICENSE[] SEC("license") = "GPL";

#define NR_WORDS 1000

#define HITS 0
#define OK 1
#define SUM 2

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 3);
	__type(key, u32);
	__type(value, u64);
} stats SEC(".maps");

static __always_inline void add(u32 slot, u64 v)
{
	u64 *p = bpf_map_lookup_elem(&stats, &slot);

	if (p)
		__sync_fetch_and_add(p, v);
}

static __always_inline int read_words(struct pt_regs *ctx, u32 words)
{
	const u64 *buf = (const u64 *)PT_REGS_PARM1(ctx);
	u64 sum = 0, ok = 0, v;

	for (u32 k = 0; k < words; k++) {
		if (bpf_probe_read_user(&v, sizeof(v), buf + k) == 0) {
			sum += v;
			ok++;
		}
	}
	add(HITS, 1);
	add(OK, ok);
	add(SUM, sum);
	return 0;
}

static __always_inline int write_words(struct pt_regs *ctx, u32 words)
{
	u64 *buf = (u64 *)PT_REGS_PARM1(ctx);
	u64 i = PT_REGS_PARM2(ctx), ok = 0, v;

	for (u32 k = 0; k < words; k++) {
		v = i + k;
		if (bpf_probe_write_user(buf + k, &v, sizeof(v)) == 0)
			ok++;
	}
	add(HITS, 1);
	add(OK, ok);
	return 0;
}

#ifndef VICTIM_LIB
#define PROGRAM(name, body)                                             \
	SEC("uprobe")                                                   \
	int name(struct pt_regs *ctx) { return body; }
#else
#define PROGRAM(name, body)                                             \
	SEC("uprobe/" VICTIM_LIB ":victim_buf")                         \
	int name(struct pt_regs *ctx) { return body; }
#endif

PROGRAM(read1, read_words(ctx, 1))
PROGRAM(read1000, read_words(ctx, NR_WORDS))
PROGRAM(write1, write_words(ctx, 1))
PROGRAM(write1000, write_words(ctx, NR_WORDS))
