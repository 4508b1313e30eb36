// Drops UDP packets to the ports in `blocked` (IPv4 and IPv6), passes the rest; counts both.
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/in.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 64);
    __type(key, __u16);      /* port, host order */
    __type(value, __u64);    /* packets dropped */
} blocked SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __uint(max_entries, 2);  /* 0 passed, 1 dropped */
    __type(key, __u32);
    __type(value, __u64);
} verdicts SEC(".maps");

static __always_inline int verdict(__u32 k, int action)
{
    __u64 *v = bpf_map_lookup_elem(&verdicts, &k);

    if (v)
        *v += 1;
    return action;
}

SEC("xdp")
int filter(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    struct udphdr *udp;
    __u8 proto;

    if ((void *)(eth + 1) > data_end)
        return verdict(0, XDP_PASS);
    if (eth->h_proto == bpf_htons(ETH_P_IP)) {
        struct iphdr *ip = (void *)(eth + 1);

        if ((void *)(ip + 1) > data_end || ip->ihl < 5)
            return verdict(0, XDP_PASS);
        proto = ip->protocol;
        udp = (void *)ip + ip->ihl * 4;
    } else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
        struct ipv6hdr *ip6 = (void *)(eth + 1);

        if ((void *)(ip6 + 1) > data_end)
            return verdict(0, XDP_PASS);
        proto = ip6->nexthdr;
        udp = (void *)(ip6 + 1);
    } else {
        return verdict(0, XDP_PASS);
    }
    if (proto != IPPROTO_UDP || (void *)(udp + 1) > data_end)
        return verdict(0, XDP_PASS);
    __u16 port = bpf_ntohs(udp->dest);
    __u64 *hits = bpf_map_lookup_elem(&blocked, &port);
    if (hits) {
        __sync_fetch_and_add(hits, 1);
        return verdict(1, XDP_DROP);
    }
    return verdict(0, XDP_PASS);
}

char LICENSE[] SEC("license") = "GPL";
