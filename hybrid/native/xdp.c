/*
 * xdp.c - userspace XDP: AF_XDP sockets and the receive / run / transmit loop
 * for XDP programs run in the VM, and the XDP helpers they call.
 *
 * The packets of an interface reach an AF_XDP socket through a tiny kernel
 * XDP program (bpf_redirect_map on an XSKMAP by rx_queue_index, XDP_PASS
 * for queues without a socket), attached with a BPF link so that it goes
 * away with the process.  hybrid_xdp_loop_run then, for every port (one
 * socket per interface and queue), in batches of up to 64 packets:
 *
 *   - takes the RX descriptors, runs the program on each (a struct
 *     hybrid_xdp_md as its context; rdtsc around the batch's runs);
 *   - carries out each verdict: XDP_DROP / XDP_ABORTED / unknown: the frame
 *     goes back to the fill ring; XDP_TX: the frame (data moved by
 *     bpf_xdp_adjust_head/tail) goes on the same socket's TX ring;
 *     XDP_REDIRECT (bpf_redirect, or bpf_redirect_map on a devmap): onto the
 *     TX ring of the port of that ifindex (copied into its UMEM, or the same
 *     frame when it is this port), a cpumap redirect is an XDP_PASS;
 *     XDP_PASS: the packet is handed to the kernel's stack as if received
 *     on the interface: BPF_PROG_TEST_RUN of a program returning XDP_PASS
 *     with BPF_F_TEST_XDP_LIVE_FRAMES and the interface's ifindex and queue
 *     in its xdp_md (the kernel builds an skb on that device and calls
 *     netif_receive_skb; one bpf() call per passed packet);
 *   - kicks the TX rings it filled (sendto; copy mode sends in that call)
 *     and reclaims completed frames.
 *
 * Frames: each socket has its own UMEM (nframes * frame_size, below 4 GiB
 * when mmap(MAP_32BIT) allows, so the 32-bit fields of xdp_md hold whole
 * pointers too); a free stack per port; half the frames start in the fill
 * ring, the rest are for redirected packets' copies.
 */
#define _GNU_SOURCE
#include "xdp.h"
#include "maps.h"

#include <arpa/inet.h>
#include <errno.h>
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/if_link.h>
#include <linux/if_packet.h>
#include <linux/if_xdp.h>
#include <net/if.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#ifndef AF_XDP
#define AF_XDP 44
#endif
#ifndef SOL_XDP
#define SOL_XDP 283
#endif

#define XDP_ABORTED_ 0
#define XDP_DROP_ 1
#define XDP_PASS_ 2
#define XDP_TX_ 3
#define XDP_REDIRECT_ 4

#define BATCH 64
#define MAX_PORTS 16
#define ETH_HLEN_ 14
#define METALEN_MAX 32
#define XDP_FRAME_SIZE 40   /* the kernel keeps a struct xdp_frame at the start of the headroom: not the program's */
#define SPIN_NS 200000   /* idle time before the loop sleeps in poll() */

static inline uint64_t rdtsc_(void)
{
#if defined(__x86_64__)
    uint32_t lo, hi;

    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((uint64_t)hi << 32) | lo;
#else
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
#endif
}

static inline int64_t now_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000ll + ts.tv_nsec;
}

/* --- bpf() --------------------------------------------------------------------- */

static long sys_bpf(int cmd, union bpf_attr *attr, unsigned int size)
{
    long r = syscall(__NR_bpf, cmd, attr, size);

    return r < 0 ? -errno : r;
}

int hybrid_xdp_prog_load(const void *insns, uint32_t ninsns, char *log, uint32_t loglen)
{
    union bpf_attr attr;
    long fd;

    memset(&attr, 0, sizeof(attr));
    attr.prog_type = BPF_PROG_TYPE_XDP;
    attr.insns = (uint64_t)(uintptr_t)insns;
    attr.insn_cnt = ninsns;
    attr.license = (uint64_t)(uintptr_t)"GPL";
    memcpy(attr.prog_name, "hybrid_xdp", 11);
    if (log && loglen) {
        log[0] = 0;
        attr.log_buf = (uint64_t)(uintptr_t)log;
        attr.log_size = loglen;
        attr.log_level = 1;
    }
    fd = sys_bpf(BPF_PROG_LOAD, &attr, sizeof(attr));
    if (fd == -ENOSPC && log) {   /* the log did not fit: load again without it */
        attr.log_buf = 0;
        attr.log_size = 0;
        attr.log_level = 0;
        fd = sys_bpf(BPF_PROG_LOAD, &attr, sizeof(attr));
    }
    return (int)fd;
}

#define INSN(c, d, s, o, i) ((struct bpf_insn){ .code = (c), .dst_reg = (d), .src_reg = (s), .off = (o), .imm = (i) })

int hybrid_xdp_kernel_prog(int kind, int map_fd, char *log, uint32_t loglen)
{
    struct bpf_insn p[64];
    uint32_t n = 0;

    switch (kind) {
    case 0:   /* return bpf_redirect_map(&xsks, ctx->rx_queue_index, XDP_PASS) */
        p[n++] = INSN(BPF_LDX | BPF_MEM | BPF_W, BPF_REG_2, BPF_REG_1, 16, 0);
        p[n++] = INSN(BPF_LD | BPF_DW | BPF_IMM, BPF_REG_1, BPF_PSEUDO_MAP_FD, 0, map_fd);
        p[n++] = INSN(0, 0, 0, 0, 0);
        p[n++] = INSN(BPF_ALU64 | BPF_MOV | BPF_K, BPF_REG_3, 0, 0, XDP_PASS_);
        p[n++] = INSN(BPF_JMP | BPF_CALL, 0, 0, 0, BPF_FUNC_redirect_map);
        p[n++] = INSN(BPF_JMP | BPF_EXIT, 0, 0, 0, 0);
        break;
    case 1:
    case 2:
    case 3:   /* return XDP_PASS / XDP_DROP / XDP_TX */
        p[n++] = INSN(BPF_ALU64 | BPF_MOV | BPF_K, BPF_REG_0, 0, 0, kind == 1 ? XDP_PASS_ : kind == 2 ? XDP_DROP_ : XDP_TX_);
        p[n++] = INSN(BPF_JMP | BPF_EXIT, 0, 0, 0, 0);
        break;
    case 4: {  /* bpf_fib_lookup on the packet's first 64 bytes (copied to the stack), flags at 64 */
        uint32_t jfail, i;

        p[n++] = INSN(BPF_ALU64 | BPF_MOV | BPF_X, BPF_REG_6, BPF_REG_1, 0, 0);
        p[n++] = INSN(BPF_LDX | BPF_MEM | BPF_W, BPF_REG_7, BPF_REG_6, 0, 0);
        p[n++] = INSN(BPF_LDX | BPF_MEM | BPF_W, BPF_REG_3, BPF_REG_6, 4, 0);
        p[n++] = INSN(BPF_ALU64 | BPF_MOV | BPF_X, BPF_REG_4, BPF_REG_7, 0, 0);
        p[n++] = INSN(BPF_ALU64 | BPF_ADD | BPF_K, BPF_REG_4, 0, 0, 68);
        jfail = n;
        p[n++] = INSN(BPF_JMP | BPF_JGT | BPF_X, BPF_REG_4, BPF_REG_3, 0, 0);   /* -> fail, patched below */
        for (i = 0; i < 8; i++) {
            p[n++] = INSN(BPF_LDX | BPF_MEM | BPF_DW, BPF_REG_0, BPF_REG_7, (int16_t)(8 * i), 0);
            p[n++] = INSN(BPF_STX | BPF_MEM | BPF_DW, BPF_REG_10, BPF_REG_0, (int16_t)(-64 + 8 * (int)i), 0);
        }
        p[n++] = INSN(BPF_LDX | BPF_MEM | BPF_W, BPF_REG_4, BPF_REG_7, 64, 0);
        p[n++] = INSN(BPF_ALU64 | BPF_MOV | BPF_X, BPF_REG_1, BPF_REG_6, 0, 0);
        p[n++] = INSN(BPF_ALU64 | BPF_MOV | BPF_X, BPF_REG_2, BPF_REG_10, 0, 0);
        p[n++] = INSN(BPF_ALU64 | BPF_ADD | BPF_K, BPF_REG_2, 0, 0, -64);
        p[n++] = INSN(BPF_ALU64 | BPF_MOV | BPF_K, BPF_REG_3, 0, 0, 64);
        p[n++] = INSN(BPF_JMP | BPF_CALL, 0, 0, 0, BPF_FUNC_fib_lookup);
        p[n++] = INSN(BPF_ALU64 | BPF_MOV | BPF_X, BPF_REG_8, BPF_REG_0, 0, 0);
        for (i = 0; i < 8; i++) {
            p[n++] = INSN(BPF_LDX | BPF_MEM | BPF_DW, BPF_REG_0, BPF_REG_10, (int16_t)(-64 + 8 * (int)i), 0);
            p[n++] = INSN(BPF_STX | BPF_MEM | BPF_DW, BPF_REG_7, BPF_REG_0, (int16_t)(8 * i), 0);
        }
        p[n++] = INSN(BPF_ALU64 | BPF_MOV | BPF_X, BPF_REG_0, BPF_REG_8, 0, 0);
        p[n++] = INSN(BPF_ALU64 | BPF_ADD | BPF_K, BPF_REG_0, 0, 0, 0x1000);   /* keep rc apart from fail */
        p[n++] = INSN(BPF_JMP | BPF_EXIT, 0, 0, 0, 0);
        p[jfail].off = (int16_t)(n - jfail - 1);
        p[n++] = INSN(BPF_ALU64 | BPF_MOV | BPF_K, BPF_REG_0, 0, 0, 0);        /* fail: 0 */
        p[n++] = INSN(BPF_JMP | BPF_EXIT, 0, 0, 0, 0);
        break;
    }
    default:
        return -EINVAL;
    }
    return hybrid_xdp_prog_load(p, n, log, loglen);
}

int hybrid_xdp_map_create(uint32_t type, uint32_t key_size, uint32_t value_size, uint32_t max_entries)
{
    union bpf_attr attr;

    memset(&attr, 0, sizeof(attr));
    attr.map_type = type;
    attr.key_size = key_size;
    attr.value_size = value_size;
    attr.max_entries = max_entries;
    memcpy(attr.map_name, "hybrid_xsks", 12);
    return (int)sys_bpf(BPF_MAP_CREATE, &attr, sizeof(attr));
}

int hybrid_xdp_map_set(int map_fd, uint32_t key, uint32_t value)
{
    union bpf_attr attr;

    memset(&attr, 0, sizeof(attr));
    attr.map_fd = map_fd;
    attr.key = (uint64_t)(uintptr_t)&key;
    attr.value = (uint64_t)(uintptr_t)&value;
    attr.flags = BPF_ANY;
    return (int)sys_bpf(BPF_MAP_UPDATE_ELEM, &attr, sizeof(attr));
}

int hybrid_xdp_link(int prog_fd, int ifindex, uint32_t xdp_flags)
{
    union bpf_attr attr;

    memset(&attr, 0, sizeof(attr));
    attr.link_create.prog_fd = prog_fd;
    attr.link_create.target_ifindex = ifindex;
    attr.link_create.attach_type = BPF_XDP;
    attr.link_create.flags = xdp_flags;
    return (int)sys_bpf(BPF_LINK_CREATE, &attr, sizeof(attr));
}

int hybrid_xdp_test_run(int prog_fd, const void *data, uint32_t size, uint32_t repeat, uint32_t flags,
                        uint32_t ifindex, uint32_t queue, void *data_out, uint32_t *retval, uint32_t *duration_ns)
{
    union bpf_attr attr;
    struct xdp_md md;
    long r;

    memset(&attr, 0, sizeof(attr));
    memset(&md, 0, sizeof(md));
    md.data_end = size;
    md.ingress_ifindex = ifindex;
    md.rx_queue_index = queue;
    attr.test.prog_fd = prog_fd;
    attr.test.data_in = (uint64_t)(uintptr_t)data;
    attr.test.data_size_in = size;
    if (data_out) {
        attr.test.data_out = (uint64_t)(uintptr_t)data_out;
        attr.test.data_size_out = size + 256;   /* the packet may have grown (adjust_head, metadata) */
    }
    attr.test.repeat = repeat;
    attr.test.flags = flags;
    if (ifindex) {
        attr.test.ctx_in = (uint64_t)(uintptr_t)&md;
        attr.test.ctx_size_in = sizeof(md);
    }
    r = sys_bpf(BPF_PROG_TEST_RUN, &attr, sizeof(attr));
    if (retval)
        *retval = attr.test.retval;
    if (duration_ns)
        *duration_ns = attr.test.duration;
    return r < 0 ? (int)r : 0;
}

/* --- AF_XDP sockets -------------------------------------------------------------- */

struct ring {
    uint32_t *producer, *consumer, *flags;
    void *descs;
    uint32_t size, mask;
    void *map;
    size_t map_len;
};

struct hybrid_xsk {
    int fd, ifindex, zerocopy;
    uint32_t queue, frame_size, nframes;
    uint8_t *umem;
    uint64_t umem_len;
    struct ring fill, comp, rx, tx;
    uint64_t *free;
    uint32_t nfree;
    uint32_t tx_pending;
};

static int map_ring(int fd, struct ring *r, const struct xdp_ring_offset *off, uint64_t pgoff, uint32_t n,
                    size_t desc_size)
{
    r->map_len = off->desc + (size_t)n * desc_size;
    r->map = mmap(NULL, r->map_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, (off_t)pgoff);
    if (r->map == MAP_FAILED) {
        r->map = NULL;
        return -errno;
    }
    r->producer = (uint32_t *)((char *)r->map + off->producer);
    r->consumer = (uint32_t *)((char *)r->map + off->consumer);
    r->flags = (uint32_t *)((char *)r->map + off->flags);
    r->descs = (char *)r->map + off->desc;
    r->size = n;
    r->mask = n - 1;
    return 0;
}

static void fail_at(char *err_at, uint32_t errlen, const char *what)
{
    if (err_at && errlen) {
        strncpy(err_at, what, errlen - 1);
        err_at[errlen - 1] = 0;
    }
}

struct hybrid_xsk *hybrid_xsk_open(int ifindex, uint32_t queue, uint32_t nframes, uint32_t frame_size,
                                   uint32_t ring_size, uint32_t bind_flags, int *err, char *err_at, uint32_t errlen)
{
    struct hybrid_xsk *x = calloc(1, sizeof(*x));
    struct xdp_umem_reg mr;
    struct xdp_mmap_offsets off;
    struct sockaddr_xdp sxdp;
    struct xdp_options opts;
    socklen_t optlen;
    uint32_t i;
    int e = 0;

    if (!x) {
        *err = -ENOMEM;
        return NULL;
    }
    x->fd = -1;
    if (!nframes || (nframes & (nframes - 1)) || !ring_size || (ring_size & (ring_size - 1)) ||
        frame_size < 2048 || (frame_size & (frame_size - 1))) {
        e = -EINVAL;
        fail_at(err_at, errlen, "sizes (powers of 2, frames >= 2048 bytes)");
        goto fail;
    }
    x->ifindex = ifindex;
    x->queue = queue;
    x->frame_size = frame_size;
    x->nframes = nframes;
    x->fd = socket(AF_XDP, SOCK_RAW | SOCK_CLOEXEC, 0);
    if (x->fd < 0) {
        e = -errno;
        fail_at(err_at, errlen, "socket(AF_XDP)");
        goto fail;
    }
    x->umem_len = (uint64_t)nframes * frame_size;
    x->umem = mmap(NULL, x->umem_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_32BIT, -1, 0);
    if (x->umem == MAP_FAILED)
        x->umem = mmap(NULL, x->umem_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (x->umem == MAP_FAILED) {
        x->umem = NULL;
        e = -errno;
        fail_at(err_at, errlen, "mmap of the UMEM");
        goto fail;
    }
    memset(&mr, 0, sizeof(mr));
    mr.addr = (uint64_t)(uintptr_t)x->umem;
    mr.len = x->umem_len;
    mr.chunk_size = frame_size;
    mr.headroom = 0;
    if (setsockopt(x->fd, SOL_XDP, XDP_UMEM_REG, &mr, sizeof(mr)) < 0) {
        e = -errno;
        fail_at(err_at, errlen, "XDP_UMEM_REG");
        goto fail;
    }
    if (setsockopt(x->fd, SOL_XDP, XDP_UMEM_FILL_RING, &ring_size, sizeof(ring_size)) < 0 ||
        setsockopt(x->fd, SOL_XDP, XDP_UMEM_COMPLETION_RING, &ring_size, sizeof(ring_size)) < 0 ||
        setsockopt(x->fd, SOL_XDP, XDP_RX_RING, &ring_size, sizeof(ring_size)) < 0 ||
        setsockopt(x->fd, SOL_XDP, XDP_TX_RING, &ring_size, sizeof(ring_size)) < 0) {
        e = -errno;
        fail_at(err_at, errlen, "ring sizes");
        goto fail;
    }
    optlen = sizeof(off);
    if (getsockopt(x->fd, SOL_XDP, XDP_MMAP_OFFSETS, &off, &optlen) < 0) {
        e = -errno;
        fail_at(err_at, errlen, "XDP_MMAP_OFFSETS");
        goto fail;
    }
    if ((e = map_ring(x->fd, &x->fill, &off.fr, XDP_UMEM_PGOFF_FILL_RING, ring_size, sizeof(uint64_t))) ||
        (e = map_ring(x->fd, &x->comp, &off.cr, XDP_UMEM_PGOFF_COMPLETION_RING, ring_size, sizeof(uint64_t))) ||
        (e = map_ring(x->fd, &x->rx, &off.rx, XDP_PGOFF_RX_RING, ring_size, sizeof(struct xdp_desc))) ||
        (e = map_ring(x->fd, &x->tx, &off.tx, XDP_PGOFF_TX_RING, ring_size, sizeof(struct xdp_desc)))) {
        fail_at(err_at, errlen, "mmap of the rings");
        goto fail;
    }
    x->free = malloc(sizeof(uint64_t) * nframes);
    if (!x->free) {
        e = -ENOMEM;
        goto fail;
    }
    for (i = 0; i < nframes; i++)
        x->free[x->nfree++] = (uint64_t)(nframes - 1 - i) * frame_size;
    /* half the frames (at most the ring) into the fill ring before bind */
    {
        uint32_t n = nframes / 2 < ring_size ? nframes / 2 : ring_size, prod = *x->fill.producer;

        for (i = 0; i < n; i++)
            ((uint64_t *)x->fill.descs)[(prod + i) & x->fill.mask] = x->free[--x->nfree];
        __atomic_store_n(x->fill.producer, prod + n, __ATOMIC_RELEASE);
    }
    memset(&sxdp, 0, sizeof(sxdp));
    sxdp.sxdp_family = AF_XDP;
    sxdp.sxdp_ifindex = (uint32_t)ifindex;
    sxdp.sxdp_queue_id = queue;
    sxdp.sxdp_flags = (uint16_t)bind_flags;
    if (bind(x->fd, (struct sockaddr *)&sxdp, sizeof(sxdp)) < 0) {
        e = -errno;
        fail_at(err_at, errlen, "bind");
        goto fail;
    }
    optlen = sizeof(opts);
    if (getsockopt(x->fd, SOL_XDP, XDP_OPTIONS, &opts, &optlen) == 0)
        x->zerocopy = (opts.flags & XDP_OPTIONS_ZEROCOPY) != 0;
    return x;
fail:
    *err = e ? e : -EINVAL;
    hybrid_xsk_close(x);
    return NULL;
}

int hybrid_xsk_fd(struct hybrid_xsk *x) { return x->fd; }
int hybrid_xsk_zerocopy(struct hybrid_xsk *x) { return x->zerocopy; }
uint64_t hybrid_xsk_umem(struct hybrid_xsk *x) { return (uint64_t)(uintptr_t)x->umem; }

void hybrid_xsk_close(struct hybrid_xsk *x)
{
    struct ring *rings[4];
    int i;

    if (!x)
        return;
    rings[0] = &x->fill;
    rings[1] = &x->comp;
    rings[2] = &x->rx;
    rings[3] = &x->tx;
    for (i = 0; i < 4; i++)
        if (rings[i]->map)
            munmap(rings[i]->map, rings[i]->map_len);
    if (x->fd >= 0)
        close(x->fd);
    if (x->umem)
        munmap(x->umem, x->umem_len);
    free(x->free);
    free(x);
}

/* --- ring operations ------------------------------------------------------------- */

static inline uint32_t ring_avail(const struct ring *r)   /* consumer side: entries ready */
{
    return __atomic_load_n(r->producer, __ATOMIC_ACQUIRE) - *r->consumer;
}

static inline uint32_t ring_room(const struct ring *r)    /* producer side: free slots */
{
    return r->size - (*r->producer - __atomic_load_n(r->consumer, __ATOMIC_ACQUIRE));
}

static void refill(struct hybrid_xsk *x, uint32_t keep)
{
    uint32_t room = ring_room(&x->fill), n, i, prod = *x->fill.producer;

    n = x->nfree > keep ? x->nfree - keep : 0;
    if (n > room)
        n = room;
    for (i = 0; i < n; i++)
        ((uint64_t *)x->fill.descs)[(prod + i) & x->fill.mask] = x->free[--x->nfree];
    if (n)
        __atomic_store_n(x->fill.producer, prod + n, __ATOMIC_RELEASE);
}

static void reclaim(struct hybrid_xsk *x)
{
    uint32_t n = ring_avail(&x->comp), i, cons = *x->comp.consumer;

    for (i = 0; i < n; i++)
        x->free[x->nfree++] = ((uint64_t *)x->comp.descs)[(cons + i) & x->comp.mask] & ~(uint64_t)(x->frame_size - 1);
    if (n)
        __atomic_store_n(x->comp.consumer, cons + n, __ATOMIC_RELEASE);
}

static inline void free_frame(struct hybrid_xsk *x, uint64_t addr)
{
    x->free[x->nfree++] = addr & ~(uint64_t)(x->frame_size - 1);
}

/* Put (addr, len) on x's TX ring; 0, or -1 when the ring is full (the caller frees the frame). */
static int tx_put(struct hybrid_xsk *x, uint64_t addr, uint32_t len)
{
    struct xdp_desc *d;
    uint32_t prod = *x->tx.producer;

    if (ring_room(&x->tx) == 0) {
        reclaim(x);
        if (ring_room(&x->tx) == 0)
            return -1;
    }
    d = &((struct xdp_desc *)x->tx.descs)[prod & x->tx.mask];
    d->addr = addr;
    d->len = len;
    d->options = 0;
    __atomic_store_n(x->tx.producer, prod + 1, __ATOMIC_RELEASE);
    x->tx_pending++;
    return 0;
}

static void tx_kick(struct hybrid_xsk *x)
{
    if (!x->tx_pending)
        return;
    x->tx_pending = 0;
    /* copy mode transmits inside this call; EAGAIN/EBUSY: the kernel is busy, the next kick sends */
    (void)sendto(x->fd, NULL, 0, MSG_DONTWAIT, NULL, 0);
}

/* --- maps standing for devmaps, cpumaps, xskmaps ---------------------------------- */

#define MAX_XDP_MAPS 64
static struct { uint64_t map; uint32_t type; } xdp_maps[MAX_XDP_MAPS];

int hybrid_xdp_register_map(uint64_t map, uint32_t type)
{
    int i, slot = -1;

    for (i = 0; i < MAX_XDP_MAPS; i++) {
        if (__atomic_load_n(&xdp_maps[i].map, __ATOMIC_ACQUIRE) == map) {
            xdp_maps[i].type = type;
            return 0;
        }
        if (slot < 0 && xdp_maps[i].map == 0)
            slot = i;
    }
    if (slot < 0)
        return -ENOSPC;
    xdp_maps[slot].type = type;
    __atomic_store_n(&xdp_maps[slot].map, map, __ATOMIC_RELEASE);
    return 0;
}

void hybrid_xdp_unregister_map(uint64_t map)
{
    int i;

    for (i = 0; i < MAX_XDP_MAPS; i++)
        if (xdp_maps[i].map == map)
            __atomic_store_n(&xdp_maps[i].map, 0, __ATOMIC_RELEASE);
}

static uint32_t xdp_map_type(uint64_t map)
{
    int i;

    for (i = 0; i < MAX_XDP_MAPS; i++)
        if (__atomic_load_n(&xdp_maps[i].map, __ATOMIC_ACQUIRE) == map)
            return xdp_maps[i].type;
    return 0;
}

/* --- helpers --------------------------------------------------------------------- */

/* What a redirect helper decided for the packet being run (the kernel's bpf_redirect_info). */
struct redirect_info {
    uint32_t kind;      /* 0 none, 1 to an ifindex, 2 to the stack (cpumap), 3 to an xskmap slot */
    uint32_t target;
};
static __thread struct redirect_info ri;

#define BPF_F_ACTION_MASK_ 3

uint64_t hybrid_helper_xdp_redirect(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5)
{
    (void)r3; (void)r4; (void)r5;
    if (r2)   /* the kernel: any flag is XDP_ABORTED */
        return XDP_ABORTED_;
    ri.kind = 1;
    ri.target = (uint32_t)r1;
    return XDP_REDIRECT_;
}

uint64_t hybrid_helper_xdp_redirect_map(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5)
{
    uint32_t type = xdp_map_type(r1), key = (uint32_t)r2;
    uint64_t key64 = r2;
    const uint32_t *v;

    (void)r4; (void)r5;
    if (!type || (r3 & ~(uint64_t)BPF_F_ACTION_MASK_))   /* not a redirect map, or broadcast flags */
        return r3 & BPF_F_ACTION_MASK_;
    v = hybrid_map_lookup((struct hybrid_map *)(uintptr_t)r1, type == BPF_MAP_TYPE_DEVMAP_HASH ? (void *)&key64 : (void *)&key);
    if (type == BPF_MAP_TYPE_DEVMAP_HASH && !v)
        v = hybrid_map_lookup((struct hybrid_map *)(uintptr_t)r1, &key);
    if (!v || *v == 0)   /* an empty slot (no device, no socket): the fallback action in the flags */
        return r3 & BPF_F_ACTION_MASK_;
    if (type == BPF_MAP_TYPE_CPUMAP) {
        ri.kind = 2;
        ri.target = key;
    } else if (type == BPF_MAP_TYPE_XSKMAP) {
        ri.kind = 3;
        ri.target = key;
    } else {
        ri.kind = 1;
        ri.target = *v;   /* devmap values: ifindex first (u32, or struct bpf_devmap_val) */
    }
    return XDP_REDIRECT_;
}

uint64_t hybrid_helper_xdp_adjust_head(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5)
{
    struct hybrid_xdp_md *md = (struct hybrid_xdp_md *)(uintptr_t)r1;
    int64_t off = (int32_t)r2;
    uint64_t metalen = md->data_p - md->data_meta_p, data = md->data_p + (uint64_t)off;

    (void)r3; (void)r4; (void)r5;
    if (data < md->hard_start + XDP_FRAME_SIZE + metalen || data > md->data_end_p - ETH_HLEN_)
        return (uint64_t)-EINVAL;
    if (metalen)
        memmove((void *)(uintptr_t)(md->data_meta_p + (uint64_t)off), (void *)(uintptr_t)md->data_meta_p, metalen);
    md->data_meta_p += (uint64_t)off;
    md->data_p = data;
    md->data = (uint32_t)md->data_p;
    md->data_meta = (uint32_t)md->data_meta_p;
    return 0;
}

uint64_t hybrid_helper_xdp_adjust_tail(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5)
{
    struct hybrid_xdp_md *md = (struct hybrid_xdp_md *)(uintptr_t)r1;
    int64_t off = (int32_t)r2;
    uint64_t end = md->data_end_p + (uint64_t)off;

    (void)r3; (void)r4; (void)r5;
    if (end > md->hard_end || end < md->data_p + ETH_HLEN_)
        return (uint64_t)-EINVAL;
    if (off > 0)
        memset((void *)(uintptr_t)md->data_end_p, 0, (size_t)off);
    md->data_end_p = end;
    md->data_end = (uint32_t)end;
    return 0;
}

uint64_t hybrid_helper_xdp_adjust_meta(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5)
{
    struct hybrid_xdp_md *md = (struct hybrid_xdp_md *)(uintptr_t)r1;
    int64_t off = (int32_t)r2;
    uint64_t meta = md->data_meta_p + (uint64_t)off, metalen;

    (void)r3; (void)r4; (void)r5;
    if (meta < md->hard_start + XDP_FRAME_SIZE || meta > md->data_p)
        return (uint64_t)-EINVAL;
    metalen = md->data_p - meta;
    if (metalen > METALEN_MAX || (metalen & 3))
        return (uint64_t)-EACCES;
    md->data_meta_p = meta;
    md->data_meta = (uint32_t)meta;
    return 0;
}

uint64_t hybrid_helper_xdp_get_buff_len(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5)
{
    struct hybrid_xdp_md *md = (struct hybrid_xdp_md *)(uintptr_t)r1;

    (void)r2; (void)r3; (void)r4; (void)r5;
    return md->data_end_p - md->data_p;
}

/* bpf_csum_diff(from, from_size, to, to_size, seed): the kernel's csum_partial of ~from words then
 * to words, seeded; a 32-bit one's-complement sum (any representation programs fold alike). */
uint64_t hybrid_helper_xdp_csum_diff(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5)
{
    const uint8_t *from = (const uint8_t *)(uintptr_t)r1, *to = (const uint8_t *)(uintptr_t)r3;
    uint32_t from_size = (uint32_t)r2, to_size = (uint32_t)r4, i, w;
    uint64_t sum = (uint32_t)r5;

    if (((from_size | to_size) & 3) || (uint64_t)from_size + to_size > 512 ||
        (from_size && !from) || (to_size && !to))
        return (uint64_t)-EINVAL;
    for (i = 0; i < from_size; i += 4) {
        memcpy(&w, from + i, 4);
        sum += (uint32_t)~w;
    }
    for (i = 0; i < to_size; i += 4) {
        memcpy(&w, to + i, 4);
        sum += w;
    }
    while (sum >> 32)
        sum = (sum & 0xffffffffu) + (sum >> 32);
    return sum;
}

static int fib_prog_fd = -1;

void hybrid_xdp_set_fib_prog(int prog_fd) { fib_prog_fd = prog_fd; }

/* bpf_fib_lookup(ctx, params, plen, flags): asked of the kernel's FIB through a kernel program
 * (test run in this thread's network namespace).  -EOPNOTSUPP when there is none. */
uint64_t hybrid_helper_xdp_fib_lookup(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5)
{
    uint8_t buf[68], out[68 + 256];
    uint32_t flags = (uint32_t)r4, ret = 0;
    int e;

    (void)r1; (void)r5;
    if (fib_prog_fd < 0)
        return (uint64_t)-EOPNOTSUPP;
    if ((uint32_t)r3 < 64 || !r2)
        return (uint64_t)-EINVAL;
    memcpy(buf, (void *)(uintptr_t)r2, 64);
    memcpy(buf + 64, &flags, 4);
    e = hybrid_xdp_test_run(fib_prog_fd, buf, sizeof(buf), 1, 0, 0, 0, out, &ret, NULL);
    if (e < 0)
        return (uint64_t)(int64_t)e;
    if (ret < 0x1000)   /* the program's bounds check failed (cannot happen) */
        return (uint64_t)-EINVAL;
    memcpy((void *)(uintptr_t)r2, out, 64);
    return (uint64_t)(int64_t)(int32_t)(ret - 0x1000);
}

/* --- the loop -------------------------------------------------------------------- */

typedef uint64_t (*xdp_fn)(void *ctx, uint64_t len);

struct hybrid_xdp_loop {
    xdp_fn prog;
    int pass_fd;
    volatile int stop;
    uint32_t nports;
    struct hybrid_xsk *ports[MAX_PORTS];
    struct hybrid_xdp_stats st;
};

struct hybrid_xdp_loop *hybrid_xdp_loop_new(uint64_t prog, int pass_fd)
{
    struct hybrid_xdp_loop *l = calloc(1, sizeof(*l));

    if (!l)
        return NULL;
    l->prog = (xdp_fn)(uintptr_t)prog;
    l->pass_fd = pass_fd;
    return l;
}

int hybrid_xdp_loop_add(struct hybrid_xdp_loop *l, struct hybrid_xsk *x)
{
    if (l->nports >= MAX_PORTS)
        return -ENOSPC;
    l->ports[l->nports++] = x;
    return 0;
}

void hybrid_xdp_loop_stop(struct hybrid_xdp_loop *l) { l->stop = 1; }

void hybrid_xdp_loop_stats(struct hybrid_xdp_loop *l, struct hybrid_xdp_stats *out) { *out = l->st; }

void hybrid_xdp_loop_free(struct hybrid_xdp_loop *l) { free(l); }

static struct hybrid_xsk *port_of(struct hybrid_xdp_loop *l, uint32_t ifindex)
{
    uint32_t i;

    for (i = 0; i < l->nports; i++)
        if ((uint32_t)l->ports[i]->ifindex == ifindex)
            return l->ports[i];
    return NULL;
}

static inline void md_init(struct hybrid_xdp_md *md, uint8_t *hard_start, uint32_t frame_size, uint8_t *data,
                           uint32_t len, uint32_t ifindex, uint32_t queue)
{
    md->data_p = md->data_meta_p = (uint64_t)(uintptr_t)data;
    md->data_end_p = md->data_p + len;
    md->hard_start = (uint64_t)(uintptr_t)hard_start;
    md->hard_end = md->hard_start + frame_size;
    md->data = md->data_meta = (uint32_t)md->data_p;
    md->data_end = (uint32_t)md->data_end_p;
    md->ingress_ifindex = ifindex;
    md->rx_queue_index = queue;
    md->egress_ifindex = 0;
}

/* XDP_PASS: the kernel copies the packet into a page of the test run's page pool and builds the skb
 * around that page, so a socket that queues it is charged a whole page (truesize about 4.2 KB, against
 * about 0.8 KB for a small datagram received without XDP, or with kernel XDP on veth): a UDP socket with
 * the default 208 KiB buffer holds about 50 passed datagrams, and a burst passed while its reader is
 * not running is dropped beyond that (UdpRcvbufErrors).  Nothing here can make the skb smaller. */
static void pass_up(struct hybrid_xdp_loop *l, struct hybrid_xsk *x, const struct hybrid_xdp_md *md)
{
    uint32_t len = (uint32_t)(md->data_end_p - md->data_p), ret = 0;

    if (l->pass_fd < 0 ||
        hybrid_xdp_test_run(l->pass_fd, (void *)(uintptr_t)md->data_p, len, 1, BPF_F_TEST_XDP_LIVE_FRAMES,
                            (uint32_t)x->ifindex, x->queue, NULL, &ret, NULL) < 0)
        l->st.pass_failed++;
    else
        l->st.pass++;
}

static void process_port(struct hybrid_xdp_loop *l, struct hybrid_xsk *x, uint32_t n)
{
    struct hybrid_xdp_md md[BATCH];
    struct redirect_info rinfo[BATCH];
    uint32_t act[BATCH], i, cons = *x->rx.consumer;
    uint64_t t0, addr;

    for (i = 0; i < n; i++) {
        const struct xdp_desc *d = &((const struct xdp_desc *)x->rx.descs)[(cons + i) & x->rx.mask];
        uint64_t base = d->addr & ~(uint64_t)(x->frame_size - 1);

        md_init(&md[i], x->umem + base, x->frame_size, x->umem + d->addr, d->len, (uint32_t)x->ifindex, x->queue);
        /* the headers were just written by the CPU that received the packet: start their misses together */
        __builtin_prefetch(x->umem + d->addr, 1);
        __builtin_prefetch(x->umem + d->addr + 64, 1);
    }
    __atomic_store_n(x->rx.consumer, cons + n, __ATOMIC_RELEASE);
    t0 = rdtsc_();
    for (i = 0; i < n; i++) {
        ri.kind = 0;
        act[i] = (uint32_t)l->prog(&md[i], sizeof(struct xdp_md));
        rinfo[i] = ri;
    }
    l->st.prog_ticks += rdtsc_() - t0;
    l->st.rx += n;
    for (i = 0; i < n; i++) {
        uint32_t len = (uint32_t)(md[i].data_end_p - md[i].data_p);

        addr = md[i].data_p - (uint64_t)(uintptr_t)x->umem;
        switch (act[i]) {
        case XDP_PASS_:
            pass_up(l, x, &md[i]);
            free_frame(x, addr);
            break;
        case XDP_TX_:
            if (tx_put(x, addr, len) == 0) {
                l->st.tx++;
            } else {
                l->st.tx_failed++;
                free_frame(x, addr);
            }
            break;
        case XDP_REDIRECT_:
            if (rinfo[i].kind == 2) {   /* cpumap: to the stack */
                pass_up(l, x, &md[i]);
                free_frame(x, addr);
                l->st.redirect++;
                break;
            }
            if (rinfo[i].kind == 1) {
                struct hybrid_xsk *y = port_of(l, rinfo[i].target);

                if (y == x) {
                    if (tx_put(x, addr, len) == 0) {
                        l->st.redirect++;
                        break;
                    }
                } else if (y) {
                    if (!y->nfree)
                        reclaim(y);
                    if (y->nfree && len <= y->frame_size - 256) {
                        uint64_t to = y->free[--y->nfree] + 256;

                        memcpy(y->umem + to, (void *)(uintptr_t)md[i].data_p, len);
                        if (tx_put(y, to, len) == 0) {
                            l->st.redirect++;
                            free_frame(x, addr);
                            break;
                        }
                        free_frame(y, to);
                    }
                }
            }
            l->st.redirect_failed++;
            free_frame(x, addr);
            break;
        case XDP_DROP_:
            l->st.drop++;
            free_frame(x, addr);
            break;
        default:   /* XDP_ABORTED and unknown actions */
            l->st.aborted++;
            free_frame(x, addr);
            break;
        }
    }
}

int hybrid_xdp_loop_run(struct hybrid_xdp_loop *l, int64_t duration_ns, uint64_t max_rx, int busy)
{
    struct pollfd pfd[MAX_PORTS];
    int64_t end = duration_ns > 0 ? now_ns() + duration_ns : 0, last = now_ns(), t;
    uint32_t i;

    if (!l->nports || !l->prog)
        return -EINVAL;
    for (i = 0; i < l->nports; i++) {
        pfd[i].fd = l->ports[i]->fd;
        pfd[i].events = POLLIN;
    }
    l->stop = 0;
    while (!l->stop) {
        uint32_t got = 0;

        for (i = 0; i < l->nports; i++) {
            struct hybrid_xsk *x = l->ports[i];
            uint32_t n;

            reclaim(x);
            refill(x, x->nframes / 4);
            n = ring_avail(&x->rx);
            if (n > BATCH)
                n = BATCH;
            if (n) {
                process_port(l, x, n);
                got += n;
            }
        }
        for (i = 0; i < l->nports; i++)
            tx_kick(l->ports[i]);
        if (got) {
            l->st.batches++;
            last = 0;   /* read the clock again once idle */
            if (max_rx && l->st.rx >= max_rx)
                break;
            continue;
        }
        t = now_ns();
        if (end && t >= end)
            break;
        if (!last)
            last = t;
        /* Spin a while after the last packet before sleeping: every sleep costs the sending CPU a
         * wake-up (an IPI) when the next packets arrive, which at high rates costs more than the spin. */
        if (busy || t - last < SPIN_NS)
            continue;
        l->st.polls++;
        if (poll(pfd, l->nports, 10) < 0 && errno != EINTR)
            return -errno;
    }
    for (i = 0; i < l->nports; i++) {
        tx_kick(l->ports[i]);
        reclaim(l->ports[i]);
    }
    return 0;
}

double hybrid_xdp_bench_prog(uint64_t prog, const void *data, uint32_t size, uint32_t repeat, uint32_t *retval)
{
    static uint8_t frame[4096] __attribute__((aligned(64)));
    struct hybrid_xdp_md md;
    xdp_fn fn = (xdp_fn)(uintptr_t)prog;
    uint32_t i, r = 0;
    int64_t t0;

    if (size > sizeof(frame) - 256 || !repeat)
        return -1.0;
    t0 = now_ns();
    for (i = 0; i < repeat; i++) {
        memcpy(frame + 256, data, size);
        md_init(&md, frame, sizeof(frame), frame + 256, size, 1, 0);
        r = (uint32_t)fn(&md, sizeof(struct xdp_md));
    }
    if (retval)
        *retval = r;
    return (double)(now_ns() - t0) / repeat;
}

/* --- a traffic generator -------------------------------------------------------- */

int64_t hybrid_xdp_gen_send(int ifindex, const void *frame, uint32_t size, uint64_t count, uint32_t vary_off)
{
    struct sockaddr_ll sll;
    struct mmsghdr msgs[BATCH];
    struct iovec iov[BATCH];
    uint8_t (*bufs)[2048];
    uint64_t sent = 0;
    uint16_t seq = 0;
    int fd, i, one = 1;

    if (size > 2048 || size < ETH_HLEN_)
        return -EINVAL;
    fd = socket(AF_PACKET, SOCK_RAW | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -errno;
    bufs = malloc(sizeof(*bufs) * BATCH);
    if (!bufs) {
        close(fd);
        return -ENOMEM;
    }
#ifdef PACKET_QDISC_BYPASS
    (void)setsockopt(fd, SOL_PACKET, PACKET_QDISC_BYPASS, &one, sizeof(one));
#endif
    memset(&sll, 0, sizeof(sll));
    sll.sll_family = AF_PACKET;
    sll.sll_ifindex = ifindex;
    sll.sll_halen = 6;
    memcpy(sll.sll_addr, frame, 6);
    memset(msgs, 0, sizeof(msgs));
    for (i = 0; i < BATCH; i++) {
        memcpy(bufs[i], frame, size);
        iov[i].iov_base = bufs[i];
        iov[i].iov_len = size;
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
        msgs[i].msg_hdr.msg_name = &sll;
        msgs[i].msg_hdr.msg_namelen = sizeof(sll);
    }
    while (sent < count) {
        int n = count - sent < BATCH ? (int)(count - sent) : BATCH, r;

        if (vary_off && vary_off + 2 <= size)
            for (i = 0; i < n; i++) {
                bufs[i][vary_off] = (uint8_t)(seq >> 8);
                bufs[i][vary_off + 1] = (uint8_t)seq;
                seq++;
            }
        r = sendmmsg(fd, msgs, (unsigned int)n, 0);
        if (r < 0) {
            if (errno == ENOBUFS || errno == EAGAIN || errno == EINTR)
                continue;
            r = -errno;
            close(fd);
            free(bufs);
            return sent ? (int64_t)sent : r;
        }
        sent += (uint64_t)r;
    }
    close(fd);
    free(bufs);
    return (int64_t)sent;
}

/* Ping-pong through a reflector: sends frame out of ifindex, waits (at most timeout_ms) for it to come
 * back with its Ethernet addresses swapped, `count` times; rtt_ns[i] gets each round trip (0: lost).
 * Returns the number of replies or -errno. */
int64_t hybrid_xdp_gen_pingpong(int ifindex, const void *frame, uint32_t size, uint32_t count, uint32_t timeout_ms,
                                uint64_t *rtt_ns)
{
    struct sockaddr_ll sll;
    struct timeval tv;
    uint8_t buf[2048];
    const uint8_t *f = frame;
    int64_t got = 0;
    uint32_t i;
    int fd;

    if (size > sizeof(buf) || size < ETH_HLEN_)
        return -EINVAL;
    fd = socket(AF_PACKET, SOCK_RAW | SOCK_CLOEXEC, htons(ETH_P_ALL));
    if (fd < 0)
        return -errno;
    memset(&sll, 0, sizeof(sll));
    sll.sll_family = AF_PACKET;
    sll.sll_protocol = htons(ETH_P_ALL);
    sll.sll_ifindex = ifindex;
    if (bind(fd, (struct sockaddr *)&sll, sizeof(sll)) < 0) {
        int e = -errno;

        close(fd);
        return e;
    }
    tv.tv_sec = timeout_ms / 1000;
    tv.tv_usec = (timeout_ms % 1000) * 1000;
    (void)setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    for (i = 0; i < count; i++) {
        int64_t t0 = now_ns(), deadline = t0 + (int64_t)timeout_ms * 1000000;

        rtt_ns[i] = 0;
        if (send(fd, frame, size, 0) < 0)
            continue;
        while (now_ns() < deadline) {
            struct sockaddr_ll from;
            socklen_t flen = sizeof(from);
            ssize_t n = recvfrom(fd, buf, sizeof(buf), 0, (struct sockaddr *)&from, &flen);

            if (n < 0) {
                if (errno == EINTR)
                    continue;
                break;
            }
            if (from.sll_pkttype == PACKET_OUTGOING || (size_t)n != size)
                continue;
            if (memcmp(buf, f + 6, 6) == 0 && memcmp(buf + 6, f, 6) == 0 && memcmp(buf + 12, f + 12, size - 12) == 0) {
                rtt_ns[i] = (uint64_t)(now_ns() - t0);
                got++;
                break;
            }
        }
    }
    close(fd);
    return got;
}

