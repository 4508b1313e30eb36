// SPDX-License-Identifier: GPL-2.0
/*
 * Bridge access from a userspace program (bench/bench_bridge.py): the same
 * loop of map operations on a userspace-only map and on maps shared with the
 * kernel side (an mmap-shared array, a hash through bpf(), a mirrored hash).
 * `kernel_side` (loaded into the kernel, never triggered) uses the shared
 * maps, which is what makes hybrid.load share them.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

#define NR_KEYS 8
#define NR_OPS 1000        /* operations per run on in-memory maps */
#define NR_OPS_SYSCALL 8   /* per run through bpf(): one lookup per key (a run keeps at most 16 pending) */

#define MAP(name, type_) \
	struct { __uint(type, type_); __uint(max_entries, 64); __type(key, __u32); __type(value, __u64); } name SEC(".maps")

MAP(user_array, BPF_MAP_TYPE_ARRAY);
MAP(shared_array, BPF_MAP_TYPE_ARRAY);
MAP(user_hash, BPF_MAP_TYPE_HASH);
MAP(shared_hash, BPF_MAP_TYPE_HASH);
MAP(mirror_hash, BPF_MAP_TYPE_HASH);

static __always_inline __u64 lookup_add(void *map, __u32 n)
{
	__u64 found = 0;

	for (__u32 i = 0; i < n; i++) {
		__u32 k = i % NR_KEYS;
		__u64 *v = bpf_map_lookup_elem(map, &k);

		if (v) {
			__sync_fetch_and_add(v, 1);
			found++;
		}
	}
	return found;
}

static __always_inline __u64 update(void *map, __u32 n)
{
	__u64 done = 0;

	for (__u32 i = 0; i < n; i++) {
		__u32 k = i % NR_KEYS;
		__u64 v = i;

		if (!bpf_map_update_elem(map, &k, &v, BPF_ANY))
			done++;
	}
	return done;
}

SEC("uprobe") int user_array_lookup(void *ctx) { return lookup_add(&user_array, NR_OPS); }
SEC("uprobe") int shared_array_lookup(void *ctx) { return lookup_add(&shared_array, NR_OPS); }
SEC("uprobe") int user_hash_lookup(void *ctx) { return lookup_add(&user_hash, NR_OPS); }
SEC("uprobe") int shared_hash_lookup(void *ctx) { return lookup_add(&shared_hash, NR_OPS_SYSCALL); }
SEC("uprobe") int mirror_hash_lookup(void *ctx) { return lookup_add(&mirror_hash, NR_OPS); }
SEC("uprobe") int user_array_update(void *ctx) { return update(&user_array, NR_OPS); }
SEC("uprobe") int shared_array_update(void *ctx) { return update(&shared_array, NR_OPS); }
SEC("uprobe") int user_hash_update(void *ctx) { return update(&user_hash, NR_OPS); }
SEC("uprobe") int shared_hash_update(void *ctx) { return update(&shared_hash, NR_OPS_SYSCALL); }
SEC("uprobe") int mirror_hash_update(void *ctx) { return update(&mirror_hash, NR_OPS); }

SEC("raw_tp/task_rename")
int kernel_side(void *ctx)
{
	__u32 k = 0;
	__u64 *v;

	if ((v = bpf_map_lookup_elem(&shared_array, &k)))
		__sync_fetch_and_add(v, 1);
	if ((v = bpf_map_lookup_elem(&shared_hash, &k)))
		__sync_fetch_and_add(v, 1);
	if ((v = bpf_map_lookup_elem(&mirror_hash, &k)))
		__sync_fetch_and_add(v, 1);
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
