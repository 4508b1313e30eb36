/*
 * bench.h - what differs between the two builds of a benchmark program.
 *
 * Every program in this folder is one C source built two ways:
 *
 *   clang -O2 -target bpf -c prog.c      eBPF: the .text section is the program,
 *                                        `entry` at offset 0, r1 = ctx
 *   gcc -O2 -shared -fPIC prog.c         native: exports
 *                                        uint64_t entry(void *ctx, uint64_t len)
 *
 * The logic is shared; only the entry signature and the helper calls differ.
 * In the eBPF build helpers are called the libbpf way (a function pointer
 * whose value is the helper id, compiled to `call N`); in the native build
 * they are the very C functions the JIT and AOT engines call
 * (hybrid_helper_<name> of hybrid._native), resolved at dlopen time.
 *
 * Rules for eBPF: no globals, no constant tables (they would go to .rodata
 * and need relocations), no signed division, bounded loops, at most 512
 * bytes of stack per function, and no SEC(): everything stays in .text.
 */
#ifndef HYBRID_BENCH_H
#define HYBRID_BENCH_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

/* The context every program reads its parameters from. */
struct bench_ctx {
    u64 n;      /* iteration count (the unit the benchmark normalizes to) */
    u64 seed;   /* a non-zero start value, so nothing folds to a constant */
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

#endif

#endif /* HYBRID_BENCH_H */
