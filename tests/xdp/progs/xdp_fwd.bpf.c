// A router in the manner of the kernel's samples/bpf/xdp_fwd: IPv4 packets are looked up in the
// kernel's FIB with bpf_fib_lookup; when the next hop is resolved the Ethernet addresses are
// rewritten, the TTL decremented and the packet redirected to the egress interface (bpf_redirect);
// otherwise (no neighbour yet, local, not forwarded) it is passed to the kernel's stack.
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define AF_INET 2

struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 16);   /* by bpf_fib_lookup's result code; 15: redirected */
    __type(key, __u32);
    __type(value, __u64);
} results SEC(".maps");

static __always_inline void count(__u32 k)
{
    __u64 *v = bpf_map_lookup_elem(&results, &k);

    if (v)
        __sync_fetch_and_add(v, 1);
}

SEC("xdp")
int fwd(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    struct iphdr *ip = (void *)(eth + 1);
    struct bpf_fib_lookup fib = {};

    if ((void *)(ip + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP) || ip->ttl <= 1)
        return XDP_PASS;
    fib.family = AF_INET;
    fib.tos = ip->tos;
    fib.l4_protocol = ip->protocol;
    fib.tot_len = bpf_ntohs(ip->tot_len);
    fib.ipv4_src = ip->saddr;
    fib.ipv4_dst = ip->daddr;
    fib.ifindex = ctx->ingress_ifindex;

    long rc = bpf_fib_lookup(ctx, &fib, sizeof(fib), 0);
    if (rc < 0 || rc > 14) {
        count(14);
        return XDP_PASS;
    }
    count((__u32)rc);
    if (rc != BPF_FIB_LKUP_RET_SUCCESS)
        return XDP_PASS;
    /* ip_decrease_ttl */
    __u32 check = ip->check;
    check += bpf_htons(0x0100);
    ip->check = (__u16)(check + (check >= 0xFFFF));
    ip->ttl--;
    __builtin_memcpy(eth->h_dest, fib.dmac, ETH_ALEN);
    __builtin_memcpy(eth->h_source, fib.smac, ETH_ALEN);
    count(15);
    return bpf_redirect(fib.ifindex, 0);
}

char LICENSE[] SEC("license") = "GPL";
