// SPDX-License-Identifier: GPL-2.0
/*
 * funclatency: time user functions and count the latencies in a log2
 * histogram, like bcc's funclatency (tools/funclatency.py), written for
 * libbpf.  A uprobe at a function's entry stores a timestamp per thread,
 * the uretprobe at its return takes the difference.
 *
 * One entry/return pair of programs per probed function: the section names
 * the binary and the function, so the list of probes is generated for each
 * set of functions (tools/bcc_ports/funclatency.py writes it and passes it
 * as FUNCLATENCY_PROBES, a header of FUNC_PROBE(index, "binary:function")
 * lines).  The same object runs inside the traced process (hybrid's
 * userspace probes) or in the kernel (kernel uprobes).
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

#define MAX_LEVEL 32 /* deepest -l LEVEL */
#ifndef TID_SLOTS
#define TID_SLOTS 32768 /* entry timestamps of threads 0..TID_SLOTS-1 in an array (the others in a hash) */
#endif
#define SLOTS 65     /* bpf_log2l() of a u64 is 1..64 */

/* Set before load (const volatile: .rodata) */
const volatile __u64 factor = 1; /* -u: 1000, -m: 1000000 (nsecs otherwise) */
const volatile __u32 level = 0;  /* -l LEVEL: time the outermost LEVEL nested calls (<= 1: the innermost, bcc's default) */
const volatile __u32 keyed = 0;  /* a histogram per (function, process): -F, or no -p */

/* The traced process (0: every process), set once it is known: .bss, writable. */
__u32 target_tgid;

struct hist_key {
	__u64 func; /* index of the function in the generated probe list */
	__u64 pid;  /* process (tgid) */
	__u64 slot;
};

struct nest {
	__u32 depth; /* calls in progress, also beyond MAX_LEVEL / level */
	__u32 pad;
	__u64 ts[MAX_LEVEL];
};

/* [0]: total latency in ns, [1]: count (bcc's "avg" table) */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, __u64);
} avg SEC(".maps");

/* the histogram, log2 slots (not keyed) */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, SLOTS);
	__type(key, __u32);
	__type(value, __u64);
} dist SEC(".maps");

/* the histograms per function and process (keyed) */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 10240);
	__type(key, struct hist_key);
	__type(value, __u64);
} fdist SEC(".maps");

/* entry timestamp per thread (innermost calls), 0 when none: indexed by thread id, which is the
 * same as bcc's hash keyed by thread id without the hash (threads with higher ids use `start`) */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, TID_SLOTS);
	__type(key, __u32);
	__type(value, __u64);
} start_tid SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 10240);
	__type(key, __u32);
	__type(value, __u64);
} start SEC(".maps");

/* entry timestamps per thread, one per nesting level (-l) */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 10240);
	__type(key, __u32);
	__type(value, struct nest);
} nested SEC(".maps");

/* bcc's bpf_log2l(): 1 for 0 and 1, 2 for 2..3, 3 for 4..7, ... */
static __always_inline __u32 log2_32(__u32 v)
{
	__u32 r, shift;

	r = (v > 0xFFFF) << 4; v >>= r;
	shift = (v > 0xFF) << 3; v >>= shift; r |= shift;
	shift = (v > 0xF) << 2; v >>= shift; r |= shift;
	shift = (v > 0x3) << 1; v >>= shift; r |= shift;
	r |= (v >> 1);
	return r;
}

static __always_inline __u32 log2l(__u64 v)
{
	__u32 hi = v >> 32;

	if (hi)
		return log2_32(hi) + 32 + 1;
	return log2_32(v) + 1;
}

static __always_inline void add(void *map, __u32 key, __u64 n)
{
	__u64 *v = bpf_map_lookup_elem(map, &key);

	if (v)
		__sync_fetch_and_add(v, n);
}

static __always_inline int on_entry(__u64 func)
{
	__u64 id = bpf_get_current_pid_tgid();
	__u32 tid = (__u32)id;
	__u64 ts;

	if (target_tgid && (id >> 32) != target_tgid)
		return 0;
	ts = bpf_ktime_get_ns();
	if (level > 1) {
		struct nest *n = bpf_map_lookup_elem(&nested, &tid);
		__u32 d;

		if (!n) {
			struct nest init = {};

			bpf_map_update_elem(&nested, &tid, &init, BPF_NOEXIST);
			n = bpf_map_lookup_elem(&nested, &tid);
			if (!n)
				return 0;
		}
		d = n->depth;
		if (d < level && d < MAX_LEVEL)
			n->ts[d] = ts;
		n->depth = d + 1;
		return 0;
	}
	if (tid < TID_SLOTS) {
		__u64 *slot = bpf_map_lookup_elem(&start_tid, &tid);

		if (slot)
			*slot = ts;
		return 0;
	}
	bpf_map_update_elem(&start, &tid, &ts, BPF_ANY);
	return 0;
}

static __always_inline int on_return(__u64 func)
{
	__u64 id = bpf_get_current_pid_tgid();
	__u32 tid = (__u32)id;
	__u64 now, delta;
	__u32 slot;

	if (target_tgid && (id >> 32) != target_tgid)
		return 0;
	now = bpf_ktime_get_ns();
	if (level > 1) {
		struct nest *n = bpf_map_lookup_elem(&nested, &tid);
		__u32 d;

		if (!n || n->depth == 0)
			return 0; /* missed the entry */
		d = n->depth - 1;
		n->depth = d;
		if (d >= level || d >= MAX_LEVEL)
			return 0; /* deeper than -l LEVEL */
		delta = now - n->ts[d];
	} else if (tid < TID_SLOTS) {
		__u64 *tsp = bpf_map_lookup_elem(&start_tid, &tid);

		if (!tsp || !*tsp)
			return 0; /* missed the entry (or an inner call took it) */
		delta = now - *tsp;
		*tsp = 0;
	} else {
		__u64 *tsp = bpf_map_lookup_elem(&start, &tid);

		if (!tsp)
			return 0; /* missed the entry (or an inner call took it) */
		delta = now - *tsp;
		bpf_map_delete_elem(&start, &tid);
	}

	add(&avg, 0, delta);
	add(&avg, 1, 1);
	delta /= factor;
	slot = log2l(delta);
	if (keyed) {
		struct hist_key key = { .func = func, .pid = id >> 32, .slot = slot };
		__u64 one = 1, *v = bpf_map_lookup_elem(&fdist, &key);

		if (v)
			__sync_fetch_and_add(v, 1);
		else if (bpf_map_update_elem(&fdist, &key, &one, BPF_NOEXIST))
			if ((v = bpf_map_lookup_elem(&fdist, &key)))
				__sync_fetch_and_add(v, 1);
	} else if (slot < SLOTS) {
		add(&dist, slot, 1);
	}
	return 0;
}

/* FUNC_PROBE(i, "binary:function"): the entry and return programs of function i */
#define FUNC_PROBE(i, target)                                                  \
	SEC("uprobe/" target) int entry_##i(struct pt_regs *ctx)                   \
	{                                                                          \
		return on_entry(i);                                                    \
	}                                                                          \
	SEC("uretprobe/" target) int return_##i(struct pt_regs *ctx)               \
	{                                                                          \
		return on_return(i);                                                   \
	}

#ifdef FUNCLATENCY_PROBES
#include FUNCLATENCY_PROBES
#endif

char LICENSE[] SEC("license") = "GPL";
