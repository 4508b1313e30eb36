// A reflector: swaps the Ethernet addresses of IPv4 UDP packets and sends them back out (XDP_TX);
// everything else is passed.  Also exercises bpf_xdp_adjust_head/tail and data_meta.
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 1);
    __type(key, __u32);
    __type(value, __u64);
} reflected SEC(".maps");

SEC("xdp")
int reflect(struct xdp_md *ctx)
{
    /* metadata before the packet: grown and read back, as a driver-side program would */
    if (bpf_xdp_adjust_meta(ctx, -4) == 0) {
        __u32 *meta = (void *)(long)ctx->data_meta;
        if ((void *)(meta + 1) <= (void *)(long)ctx->data)
            *meta = 0x12345678;
    }
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    unsigned char tmp[ETH_ALEN];

    if ((void *)(eth + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP))
        return XDP_PASS;
    struct iphdr *ip = (void *)(eth + 1);
    if ((void *)(ip + 1) > data_end || ip->protocol != IPPROTO_UDP)
        return XDP_PASS;
    __builtin_memcpy(tmp, eth->h_dest, ETH_ALEN);
    __builtin_memcpy(eth->h_dest, eth->h_source, ETH_ALEN);
    __builtin_memcpy(eth->h_source, tmp, ETH_ALEN);
    /* 8 bytes more at the front (a tag) and 4 at the end, then back: the packet is unchanged */
    if (bpf_xdp_adjust_head(ctx, -8) || bpf_xdp_adjust_head(ctx, 8))
        return XDP_ABORTED;
    if (bpf_xdp_adjust_tail(ctx, 4) || bpf_xdp_adjust_tail(ctx, -4))
        return XDP_ABORTED;
    __u32 k = 0;
    __u64 *v = bpf_map_lookup_elem(&reflected, &k);
    if (v)
        __sync_fetch_and_add(v, 1);
    return XDP_TX;
}

char LICENSE[] SEC("license") = "GPL";
