// Programs of the xdp suite (bench/bench_xdp.py), run as kernel XDP and as userspace XDP.
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/in.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 1);
    __type(key, __u32);
    __type(value, __u64);
} seen SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 64);
    __type(key, __u16);
    __type(value, __u64);
} blocked SEC(".maps");

static __always_inline void count(void)
{
    __u32 k = 0;
    __u64 *v = bpf_map_lookup_elem(&seen, &k);

    if (v)
        __sync_fetch_and_add(v, 1);
}

/* The simplest useful program: count the packet, drop it. */
SEC("xdp")
int drop(struct xdp_md *ctx)
{
    count();
    return XDP_DROP;
}

/* A port filter: parse Ethernet, IPv4, UDP; drop the ports in `blocked` (counted there), pass the rest. */
SEC("xdp")
int filter(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    struct iphdr *ip = (void *)(eth + 1);

    count();
    if ((void *)(ip + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP) || ip->protocol != IPPROTO_UDP)
        return XDP_PASS;
    struct udphdr *udp = (void *)ip + ip->ihl * 4;
    if ((void *)(udp + 1) > data_end)
        return XDP_PASS;
    __u16 port = bpf_ntohs(udp->dest);
    __u64 *hits = bpf_map_lookup_elem(&blocked, &port);
    if (!hits)
        return XDP_PASS;
    __sync_fetch_and_add(hits, 1);
    return XDP_DROP;
}

/* A reflector: swap the Ethernet addresses, send the frame back out (XDP_TX). */
SEC("xdp")
int reflect(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    unsigned char tmp[ETH_ALEN];

    count();
    if ((void *)(eth + 1) > data_end)
        return XDP_PASS;
    __builtin_memcpy(tmp, eth->h_dest, ETH_ALEN);
    __builtin_memcpy(eth->h_dest, eth->h_source, ETH_ALEN);
    __builtin_memcpy(eth->h_source, tmp, ETH_ALEN);
    return XDP_TX;
}
char LICENSE[] SEC("license") = "GPL";
