/*
 * bench.h - what differs between the two builds of a benchmark program.
 *
 * Every program in this folder is one C source built two ways:
 *
 *   clang -O2 -target bpf -c prog.c      eBPF: the .text section is the program,
 *                                        `entry` at offset 0, r1 = ctx
 *   gcc -O2 -shared -fPIC prog.c         native: exports
 *                                        uint64_t entry(void *ctx, uint64_t len)
 *                                        and bench_repeat (below)
 *
 * The logic is shared; only the entry signature and the helper calls differ.
 * In the eBPF build helpers are called the libbpf way (a function pointer
 * whose value is the helper id, compiled to `call N`); in the native build
 * they are the very C functions the JIT and AOT engines call
 * (hybrid_helper_<name> of hybrid._native), resolved at dlopen time.
 *
 * The eBPF .text runs in hybrid's engines and, unchanged, in the kernel:
 * loaded with BPF_PROG_LOAD as a tc (BPF_PROG_TYPE_SCHED_CLS) program and
 * run with BPF_PROG_TEST_RUN, the context below passed as its __sk_buff.
 *
 * Rules for eBPF: no globals, no constant tables (they would go to .rodata
 * and need relocations), no signed division, at most 512 bytes of stack
 * per function, no SEC(): everything stays in .text, and loops bounded by
 * constants the kernel's verifier can walk: it simulates every iteration
 * of every loop (up to 1M instructions, 8192 pending branches), so a
 * program's MAX_N (the clamp on n) sets both the most units one call can
 * do and the kernel's verification time.
 */
#ifndef HYBRID_BENCH_H
#define HYBRID_BENCH_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

/*
 * The context every program reads its parameters from.  It is laid out
 * as the start of the kernel's struct __sk_buff, with the parameters in
 * cb[0..3]: the kernel runs the very same instructions as a tc program
 * (BPF_PROG_TEST_RUN with this as ctx_in), where 8-byte loads of cb[] are
 * allowed and every other field read here would be refused.
 */
struct bench_ctx {
    u32 skb_head[12];   /* __sk_buff fields before cb[]: zero, never read */
    u64 n;              /* cb[0..1]: iteration count (the unit the benchmark normalizes to) */
    u64 seed;           /* cb[2..3]: a non-zero start value, so nothing folds to a constant */
};

#define NOINLINE __attribute__((noinline))

#ifdef __bpf__

#define ENTRY u64 entry(struct bench_ctx *ctx)

static u64 (*bpf_ktime_get_ns)(void) = (void *)5;
static u64 (*bpf_get_prandom_u32)(void) = (void *)7;
static u64 (*bpf_get_smp_processor_id)(void) = (void *)8;

#else /* native */

#define ENTRY u64 entry(struct bench_ctx *ctx, u64 len __attribute__((unused)))

typedef unsigned long long hybrid_u64;
extern hybrid_u64 hybrid_helper_ktime_get_ns(hybrid_u64, hybrid_u64, hybrid_u64, hybrid_u64, hybrid_u64);
extern hybrid_u64 hybrid_helper_get_prandom_u32(hybrid_u64, hybrid_u64, hybrid_u64, hybrid_u64, hybrid_u64);
extern hybrid_u64 hybrid_helper_get_smp_processor_id(hybrid_u64, hybrid_u64, hybrid_u64, hybrid_u64, hybrid_u64);

#define bpf_ktime_get_ns() hybrid_helper_ktime_get_ns(0, 0, 0, 0, 0)
#define bpf_get_prandom_u32() hybrid_helper_get_prandom_u32(0, 0, 0, 0, 0)
#define bpf_get_smp_processor_id() hybrid_helper_get_smp_processor_id(0, 0, 0, 0, 0)

/*
 * The native engines' repeat loop, the counterpart of the kernel test
 * run's `repeat`: `count` calls of `fn` (gcc's entry, or the JIT's or the
 * AOT library's) from native code, so that a timed value pays one ctypes
 * call in all, not one per call of the program.  r0 of the last call.
 */
typedef u64 (*bench_entry_fn)(void *ctx, u64 len);

u64 bench_repeat(bench_entry_fn fn, void *ctx, u64 len, u64 count);

u64 bench_repeat(bench_entry_fn fn, void *ctx, u64 len, u64 count)
{
    u64 r0 = 0;

    for (u64 i = 0; i < count; i++)
        r0 = fn(ctx, len);
    return r0;
}

#endif

#endif /* HYBRID_BENCH_H */
