// SPDX-License-Identifier: GPL-2.0
/*
 * The map benchmark (bench/bench_maps.py): one tc (sched_cls) program per (map type,
 * operation), each doing NR_OPS operations on varying keys of a map that the
 * benchmark fills with keys 0..NR_KEYS-1 before timing.  The same object is
 * loaded into the kernel (libbpf, run with BPF_PROG_TEST_RUN) and into hybrid
 * (hybrid.load, JIT/AOT entry called directly).
 *
 * Every program returns how many of its operations succeeded (lookups that
 * found their key, updates and deletes that returned 0), so both sides can be
 * checked to do the same work: NR_OPS, or 2 * NR_OPS for delete (a delete and
 * a re-insert per key, which leaves the map as it was).
 *
 * The loops are plain bounded loops (no bpf_loop, whose callback hybrid would
 * reach through an indirect call); the kernel verifier walks them.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#ifndef NR_OPS
#define NR_OPS 1000
#endif
#define NR_KEYS 1024 /* keys 0..NR_KEYS-1 are present; a power of two */

/* The i-th key: a permutation of 0..NR_KEYS-1 (odd multiplier), so
 * consecutive operations touch unrelated buckets / slots. */
#define KEY(i) (((__u32)(i) * 7919u + 17u) & (NR_KEYS - 1))

#define MAP(name_, type_, max_)                         \
	struct {                                        \
		__uint(type, type_);                    \
		__uint(max_entries, max_);              \
		__type(key, __u32);                     \
		__type(value, __u64);                   \
	} name_ SEC(".maps")

MAP(hash, BPF_MAP_TYPE_HASH, NR_KEYS);
MAP(array, BPF_MAP_TYPE_ARRAY, NR_KEYS);
MAP(percpu_hash, BPF_MAP_TYPE_PERCPU_HASH, NR_KEYS);
MAP(percpu_array, BPF_MAP_TYPE_PERCPU_ARRAY, NR_KEYS);
/* room for twice the keys: an LRU update takes a free node before releasing
 * the old one, and a full LRU would evict other keys instead */
MAP(lru_hash, BPF_MAP_TYPE_LRU_HASH, 2 * NR_KEYS);

/* the same loop without a map operation: what is subtracted for "net" */
SEC("tc")
int empty_loop(struct __sk_buff *ctx)
{
	__u32 acc = 0;

	for (__u32 i = 0; i < NR_OPS; i++)
		acc += KEY(i);
	return acc == 0xffffffff; /* 0: every key is used, nothing else */
}

#define LOOKUP(map_)                                                    \
	SEC("tc")                                                      \
	int map_##_lookup(struct __sk_buff *ctx)                            \
	{                                                               \
		__u32 hits = 0;                                         \
		for (__u32 i = 0; i < NR_OPS; i++) {                    \
			__u32 key = KEY(i);                             \
			__u64 *v = bpf_map_lookup_elem(&map_, &key);    \
			if (v && *v == key)                             \
				hits++;                                 \
		}                                                       \
		return hits;                                            \
	}

#define UPDATE(map_)                                                    \
	SEC("tc")                                                      \
	int map_##_update(struct __sk_buff *ctx)                            \
	{                                                               \
		__u32 ok = 0;                                           \
		for (__u32 i = 0; i < NR_OPS; i++) {                    \
			__u32 key = KEY(i);                             \
			__u64 value = key; /* what the fill put there */\
			ok += bpf_map_update_elem(&map_, &key, &value,  \
						  BPF_ANY) == 0;        \
		}                                                       \
		return ok;                                              \
	}

/* delete a present key, then insert it again (BPF_NOEXIST): the map is the
 * same after every iteration; one "op" is the pair */
#define DELETE(map_)                                                    \
	SEC("tc")                                                      \
	int map_##_delete(struct __sk_buff *ctx)                            \
	{                                                               \
		__u32 ok = 0;                                           \
		for (__u32 i = 0; i < NR_OPS; i++) {                    \
			__u32 key = KEY(i);                             \
			__u64 value = key;                              \
			ok += bpf_map_delete_elem(&map_, &key) == 0;    \
			ok += bpf_map_update_elem(&map_, &key, &value,  \
						  BPF_NOEXIST) == 0;    \
		}                                                       \
		return ok;                                              \
	}

LOOKUP(hash)
UPDATE(hash)
DELETE(hash)

LOOKUP(array)
UPDATE(array)
/* arrays have no delete: the kernel's array_map_delete_elem is -EINVAL */

LOOKUP(percpu_hash)
UPDATE(percpu_hash)
DELETE(percpu_hash)

LOOKUP(percpu_array)
UPDATE(percpu_array)

LOOKUP(lru_hash)
UPDATE(lru_hash)
DELETE(lru_hash)

char LICENSE[] SEC("license") = "GPL";
