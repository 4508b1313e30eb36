/* Ring buffer, perf buffer and user ring buffer traffic for tests/kernel, triggered by getppid(). */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

const volatile struct {
	__u32 tgid;
	__u32 nr;
} cfg = {};

struct rec {
	__u32 seq;
	__u32 tgid;
	__u64 magic;
};

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 16 * 4096);
} rb SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERF_EVENT_ARRAY);
	__uint(key_size, sizeof(__u32));
	__uint(value_size, sizeof(__u32));
} pb SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_USER_RINGBUF);
	__uint(max_entries, 16 * 4096);
} urb SEC(".maps");

/* 0: sum of the drained values, 1: records drained, 2: ring buffer seq, 3: perf buffer seq */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 4);
	__type(key, __u32);
	__type(value, __u64);
} sums SEC(".maps");

static __always_inline int triggered(struct bpf_raw_tracepoint_args *ctx)
{
	return (bpf_get_current_pid_tgid() >> 32) == cfg.tgid && ctx->args[1] == cfg.nr;
}

static __always_inline int next_seq(__u32 slot, struct rec *r)
{
	__u64 *v = bpf_map_lookup_elem(&sums, &slot);
	if (!v)
		return -1;
	r->seq = *v;
	*v += 1;
	r->tgid = cfg.tgid;
	r->magic = 0x6879627269640000ULL + r->seq;
	return 0;
}

SEC("raw_tp/sys_enter")
int to_ringbuf(struct bpf_raw_tracepoint_args *ctx)
{
	struct rec r = {};

	if (triggered(ctx) && next_seq(2, &r) == 0)
		bpf_ringbuf_output(&rb, &r, sizeof(r), 0);
	return 0;
}

SEC("raw_tp/sys_enter")
int to_perfbuf(struct bpf_raw_tracepoint_args *ctx)
{
	struct rec r = {};

	if (triggered(ctx) && next_seq(3, &r) == 0)
		bpf_perf_event_output(ctx, &pb, BPF_F_CURRENT_CPU, &r, sizeof(r));
	return 0;
}

static long add_record(struct bpf_dynptr *dynptr, void *ctx)
{
	__u64 value = 0;
	__u32 k0 = 0, k1 = 1;
	__u64 *sum, *n;

	if (bpf_dynptr_read(&value, sizeof(value), dynptr, 0, 0))
		return 1;
	sum = bpf_map_lookup_elem(&sums, &k0);
	n = bpf_map_lookup_elem(&sums, &k1);
	if (sum && n) {
		*sum += value;
		*n += 1;
	}
	return 0;
}

SEC("raw_tp/sys_enter")
int drain(struct bpf_raw_tracepoint_args *ctx)
{
	if (triggered(ctx))
		bpf_user_ringbuf_drain(&urb, add_record, NULL, 0);
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
