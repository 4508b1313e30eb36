// BTF-defined maps of many types; the values here are checked by tests/user/test_elf.py.
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

struct value { u64 packets; u64 bytes; };

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, u32);
	__type(value, struct value);
} hash_map SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 16);
	__type(key, u32);
	__type(value, u64);
} array_map SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 4);
	__uint(key_size, sizeof(u32));
	__uint(value_size, 24);
} percpu_array SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 64);
	__type(key, u64);
	__type(value, u32);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} percpu_hash SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 100);
	__type(key, char[16]);
	__type(value, u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lru SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
} events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_QUEUE);
	__uint(max_entries, 32);
	__type(value, u32);
} queue SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_STACK);
	__uint(max_entries, 8);
	__uint(value_size, 8);
} stack SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_BLOOM_FILTER);
	__uint(max_entries, 1000);
	__uint(value_size, 4);
	__uint(map_extra, 3);
} bloom SEC(".maps");

struct inner_map {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 8);
	__type(key, u32);
	__type(value, u32);
} inner_a SEC(".maps"), inner_b SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
	__uint(max_entries, 4);
	__type(key, u32);
	__array(values, struct inner_map);
} outer SEC(".maps") = {
	.values = { [0] = &inner_a, [3] = &inner_b },
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH_OF_MAPS);
	__uint(max_entries, 10);
	__type(key, u32);
	__array(values, struct {
		__uint(type, BPF_MAP_TYPE_HASH);
		__uint(max_entries, 2);
		__type(key, u64);
		__type(value, u64);
	});
} outer_hash SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERF_EVENT_ARRAY);
	__uint(key_size, sizeof(u32));
	__uint(value_size, sizeof(u32));
} perf SEC(".maps");

int tail(void *ctx);

struct {
	__uint(type, BPF_MAP_TYPE_PROG_ARRAY);
	__uint(max_entries, 2);
	__type(key, u32);
	__array(values, int (void *));
} jmp_table SEC(".maps") = {
	.values = { [1] = (void *)&tail },
};

SEC("uprobe")
int tail(void *ctx)
{
	return 7;
}

SEC("uprobe")
int use_maps(void *ctx)
{
	u32 k = 0, v32 = 5;
	u64 v64 = 1;
	struct value *v = bpf_map_lookup_elem(&hash_map, &k);
	if (v)
		v->packets++;
	u64 *a = bpf_map_lookup_elem(&array_map, &k);
	if (a)
		*a += 1;
	bpf_map_lookup_elem(&percpu_array, &k);
	bpf_map_update_elem(&percpu_hash, &v64, &k, BPF_ANY);
	bpf_map_push_elem(&queue, &v32, 0);
	bpf_map_push_elem(&stack, &v64, 0);
	bpf_map_push_elem(&bloom, &v32, 0);
	void *inner = bpf_map_lookup_elem(&outer, &k);
	if (inner)
		bpf_map_lookup_elem(inner, &k);
	bpf_map_lookup_elem(&outer_hash, &k);
	u64 *e = bpf_ringbuf_reserve(&events, sizeof(u64), 0);
	if (e) {
		*e = 42;
		bpf_ringbuf_submit(e, 0);
	}
	bpf_perf_event_output(ctx, &perf, BPF_F_CURRENT_CPU, &v64, sizeof(v64));
	bpf_tail_call(ctx, &jmp_table, 1);
	return 0;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
