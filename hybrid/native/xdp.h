/*
 * xdp.h - userspace XDP: AF_XDP sockets, the receive / run / transmit loop,
 * and the XDP helpers for programs run in the VM (hybrid/native/xdp.c).
 *
 * Python (hybrid/xdp/) only sets things up: the kernel side (an XSKMAP, a
 * tiny redirect program, its BPF link), the sockets, the loop's ports; the
 * loop itself (hybrid_xdp_loop_run) is C from the ring to the verdict.
 */
#ifndef HYBRID_XDP_H
#define HYBRID_XDP_H

#include <stdint.h>
#include <stddef.h>

/* cdef-begin */
/* The context a program run in the VM gets (r1).  The first 24 bytes are the
 * uapi struct xdp_md; the rest is what the kernel keeps in its xdp_buff.
 * Loads of data/data_end/data_meta (32-bit fields) are rewritten, as the
 * kernel's verifier rewrites them, into 64-bit loads of data_p/data_end_p/
 * data_meta_p (hybrid/xdp/ctx.py).  The 32-bit fields hold the pointers'
 * low halves (the whole pointer when the packet memory is below 4 GiB). */
struct hybrid_xdp_md {
    uint32_t data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex;
    uint64_t data_p, data_end_p, data_meta_p;   /* offsets 24, 32, 40 */
    uint64_t hard_start, hard_end;              /* the frame: headroom and tailroom limits */
};

struct hybrid_xdp_stats {
    uint64_t rx, pass, drop, aborted, tx, redirect;
    uint64_t pass_failed, tx_failed, redirect_failed;
    uint64_t batches, polls, prog_ticks;         /* prog_ticks: rdtsc ticks spent in program runs */
    uint64_t tap_tx;
};

struct hybrid_xsk;
struct hybrid_xdp_loop;

/* --- kernel side (bpf() syscalls) ---------------------------------------- */
/* kind 0: redirect to the XSKMAP map_fd by rx_queue_index (else XDP_PASS); 1: XDP_PASS; 2: XDP_DROP;
 * 3: XDP_TX.  Returns a program fd or -errno; the verifier's log goes to log. */
int hybrid_xdp_kernel_prog(int kind, int map_fd, char *log, uint32_t loglen);
int hybrid_xdp_prog_load(const void *insns, uint32_t ninsns, char *log, uint32_t loglen);
int hybrid_xdp_map_create(uint32_t type, uint32_t key_size, uint32_t value_size, uint32_t max_entries);
int hybrid_xdp_map_set(int map_fd, uint32_t key, uint32_t value);
int hybrid_xdp_link(int prog_fd, int ifindex, uint32_t xdp_flags);   /* BPF link fd or -errno */
/* BPF_PROG_TEST_RUN of an XDP program on one packet (flags: BPF_F_TEST_XDP_LIVE_FRAMES = 2).
 * Returns 0 or -errno; *retval and *duration_ns (average per run) are the kernel's.  data_out (or NULL)
 * must hold size + 256 bytes: the kernel writes the packet after the run, metadata first. */
int hybrid_xdp_test_run(int prog_fd, const void *data, uint32_t size, uint32_t repeat, uint32_t flags,
                        uint32_t ifindex, uint32_t queue, void *data_out, uint32_t *retval, uint32_t *duration_ns);

/* --- AF_XDP sockets ------------------------------------------------------ */
/* bind_flags: 0 (zero-copy if the driver can, else copy), XDP_COPY (2), XDP_ZEROCOPY (4).
 * NULL with *err = -errno on failure (err_at names the step). */
struct hybrid_xsk *hybrid_xsk_open(int ifindex, uint32_t queue, uint32_t nframes, uint32_t frame_size,
                                   uint32_t ring_size, uint32_t bind_flags, int *err, char *err_at, uint32_t errlen);
int hybrid_xsk_fd(struct hybrid_xsk *x);
int hybrid_xsk_zerocopy(struct hybrid_xsk *x);     /* 1 zero-copy, 0 copy mode */
uint64_t hybrid_xsk_umem(struct hybrid_xsk *x);    /* the UMEM's address */
void hybrid_xsk_close(struct hybrid_xsk *x);

/* --- the loop ------------------------------------------------------------ */
/* prog: the native entry u64 fn(void *ctx, u64 len) of the xdp program; pass_fd: a kernel program
 * returning XDP_PASS, run with live frames to hand XDP_PASS packets to the kernel's stack (-1: drop them). */
struct hybrid_xdp_loop *hybrid_xdp_loop_new(uint64_t prog, int pass_fd);
int hybrid_xdp_loop_add(struct hybrid_xdp_loop *l, struct hybrid_xsk *x);
/* Runs until hybrid_xdp_loop_stop, for at most duration_ns (0: no limit), or until max_rx packets (0: no
 * limit) were received.  busy: spin instead of poll() when idle.  Returns 0 or -errno. */
int hybrid_xdp_loop_run(struct hybrid_xdp_loop *l, int64_t duration_ns, uint64_t max_rx, int busy);
void hybrid_xdp_loop_stop(struct hybrid_xdp_loop *l);
void hybrid_xdp_loop_stats(struct hybrid_xdp_loop *l, struct hybrid_xdp_stats *out);
void hybrid_xdp_loop_free(struct hybrid_xdp_loop *l);

/* A map of the object that stands for a devmap (14), cpumap (16), xskmap (17) or devmap_hash (25):
 * bpf_redirect_map on it redirects as that type does.  0 or -ENOSPC. */
int hybrid_xdp_register_map(uint64_t map, uint32_t type);
void hybrid_xdp_unregister_map(uint64_t map);

/* The program alone, `repeat` runs on one packet (reset before each run): average ns per run. */
double hybrid_xdp_bench_prog(uint64_t prog, const void *data, uint32_t size, uint32_t repeat, uint32_t *retval);

/* AF_PACKET traffic generator: sends `count` copies of frame out of ifindex (sendmmsg batches of 64),
 * bumping the 16-bit big-endian field at vary_off (if < size) on each (0 = off).  Sent count or -errno. */
int64_t hybrid_xdp_gen_send(int ifindex, const void *frame, uint32_t size, uint64_t count, uint32_t vary_off);

/* Ping-pong through a reflector (XDP_TX): `count` round trips of frame out of ifindex, each waiting at most
 * timeout_ms for the frame with its Ethernet addresses swapped; rtt_ns[i] = each (0: lost).  Replies or -errno. */
int64_t hybrid_xdp_gen_pingpong(int ifindex, const void *frame, uint32_t size, uint32_t count, uint32_t timeout_ms,
                                uint64_t *rtt_ns);

/* helpers (kernel ids 23, 28, 44, 51, 54, 65, 69, 188) */
uint64_t hybrid_helper_xdp_redirect(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5);
uint64_t hybrid_helper_xdp_csum_diff(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5);
uint64_t hybrid_helper_xdp_adjust_head(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5);
uint64_t hybrid_helper_xdp_redirect_map(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5);
uint64_t hybrid_helper_xdp_adjust_meta(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5);
uint64_t hybrid_helper_xdp_adjust_tail(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5);
uint64_t hybrid_helper_xdp_fib_lookup(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5);
uint64_t hybrid_helper_xdp_get_buff_len(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5);
/* bpf_fib_lookup is answered by the kernel: a small kernel XDP program (fd) that runs the real
 * bpf_fib_lookup on the parameters it is given as packet data (hybrid/xdp/kernel.py); -1: none. */
void hybrid_xdp_set_fib_prog(int prog_fd);
/* cdef-end */

#endif /* HYBRID_XDP_H */
