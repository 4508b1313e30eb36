/*
 * helpers - many helper calls: each unit calls get_prandom_u32 twice,
 * get_smp_processor_id and ktime_get_ns once, and mixes the results.
 *
 * The results are not deterministic (random numbers, time, CPU): compare
 * runs by time only.  The native build calls the same helper functions.
 */
#include "bench.h"

/* The kernel's verifier walks every iteration (~47 instructions of its 1M each). */
#define MAX_N 1024ull

ENTRY
{
    u64 n = ctx->n;
    u64 acc = ctx->seed;

    if (n > MAX_N)
        n = MAX_N;
    for (u64 i = 0; i < n; i++) {
        u64 r = bpf_get_prandom_u32();
        u64 cpu = bpf_get_smp_processor_id();
        u64 t = bpf_ktime_get_ns();
        u64 r2 = bpf_get_prandom_u32();

        acc ^= (r << 32) | r2;
        acc += t ^ (cpu << 7);
        acc = (acc << 13) | (acc >> 51);
    }
    return acc;
}
