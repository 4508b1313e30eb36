// Counts every packet and its bytes, passes it on.
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 2);
    __type(key, __u32);
    __type(value, __u64);
} counts SEC(".maps");

SEC("xdp")
int count(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    __u32 k = 0;
    __u64 *v = bpf_map_lookup_elem(&counts, &k);

    if (v)
        __sync_fetch_and_add(v, 1);
    k = 1;
    v = bpf_map_lookup_elem(&counts, &k);
    if (v)
        __sync_fetch_and_add(v, (__u64)(data_end - data));
    return XDP_PASS;
}

char LICENSE[] SEC("license") = "GPL";
