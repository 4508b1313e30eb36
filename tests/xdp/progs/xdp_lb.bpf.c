// A small L4 load balancer in the manner of Katran: UDP packets to the VIP are sent to a backend
// chosen by a consistent-hash (Maglev) table of the flow's 4-tuple: the destination address and the
// Ethernet addresses are rewritten, the IPv4 and UDP checksums updated with bpf_csum_diff, and the
// packet redirected through a devmap to the backend's interface.  Everything else is passed.
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/in.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define RING_SIZE 61
#define MAX_BACKENDS 8

struct backend {
    __u32 ip;                 /* network order */
    __u8 mac[ETH_ALEN];       /* the backend's */
    __u8 src_mac[ETH_ALEN];   /* the load balancer's interface towards it */
    __u32 port;               /* key in tx_ports */
    __u32 pad;
};

const volatile __u32 vip_ip = 0;     /* network order */
const volatile __u16 vip_port = 0;   /* host order */

struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, MAX_BACKENDS);
    __type(key, __u32);
    __type(value, struct backend);
} backends SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, RING_SIZE);
    __type(key, __u32);
    __type(value, __u32);     /* backend index */
} ring SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_DEVMAP);
    __uint(max_entries, 8);
    __type(key, __u32);
    __type(value, __u32);
} tx_ports SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, MAX_BACKENDS + 1);   /* per backend; the last: passed */
    __type(key, __u32);
    __type(value, __u64);
} forwarded SEC(".maps");

static __always_inline __u32 flow_hash(__u32 saddr, __u32 daddr, __u16 sport, __u16 dport)
{
    __u32 h = saddr * 0x9E3779B1u;

    h ^= daddr + 0x7F4A7C15u + (h << 6) + (h >> 2);
    h ^= (((__u32)sport << 16) | dport) + 0x7F4A7C15u + (h << 6) + (h >> 2);
    h ^= h >> 16;
    h *= 0x85EBCA6Bu;
    h ^= h >> 13;
    return h;
}

static __always_inline __u16 csum_fold(__u64 s)
{
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    return (__u16)~s;
}

static __always_inline int passed(void)
{
    __u32 k = MAX_BACKENDS;
    __u64 *v = bpf_map_lookup_elem(&forwarded, &k);

    if (v)
        __sync_fetch_and_add(v, 1);
    return XDP_PASS;
}

SEC("xdp")
int balance(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    struct iphdr *ip = (void *)(eth + 1);
    struct udphdr *udp = (void *)(ip + 1);

    if ((void *)(udp + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP) || ip->ihl != 5 ||
        ip->protocol != IPPROTO_UDP)
        return passed();
    if (ip->daddr != vip_ip || udp->dest != bpf_htons(vip_port))
        return passed();

    __u32 slot = flow_hash(ip->saddr, ip->daddr, udp->source, udp->dest) % RING_SIZE;
    __u32 *idx = bpf_map_lookup_elem(&ring, &slot);
    if (!idx)
        return XDP_ABORTED;
    __u32 bi = *idx;
    struct backend *b = bpf_map_lookup_elem(&backends, &bi);
    if (!b || !b->ip)
        return XDP_DROP;

    __u32 old = ip->daddr, new = b->ip;
    __s64 d = bpf_csum_diff(&old, 4, &new, 4, (__u16)~ip->check);
    if (d < 0)
        return XDP_ABORTED;
    ip->check = csum_fold((__u64)d);
    if (udp->check) {
        d = bpf_csum_diff(&old, 4, &new, 4, (__u16)~udp->check);
        if (d < 0)
            return XDP_ABORTED;
        udp->check = csum_fold((__u64)d) ?: 0xffff;
    }
    ip->daddr = new;
    __builtin_memcpy(eth->h_dest, b->mac, ETH_ALEN);
    __builtin_memcpy(eth->h_source, b->src_mac, ETH_ALEN);

    __u64 *n = bpf_map_lookup_elem(&forwarded, &bi);
    if (n)
        __sync_fetch_and_add(n, 1);
    return bpf_redirect_map(&tx_ports, b->port, 0);
}

char LICENSE[] SEC("license") = "GPL";
