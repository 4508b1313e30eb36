/*
 * loop - a million-iteration integer mixing loop.
 *
 * One unit: one iteration of a xorshift64 step plus a multiply-rotate mix
 * into an accumulator.  The recurrence has no closed form, so neither
 * compiler can fold the loop away.
 */
#include "bench.h"

/* The kernel's verifier walks every iteration (~47 instructions of its
 * 1M each): 4096 iterations take it ~190k, a few tenths of a second. */
#define MAX_N 4096ull

ENTRY
{
    u64 n = ctx->n;
    u64 x = ctx->seed | 1;
    u64 acc = 0x243f6a8885a308d3ull;

    if (n > MAX_N)
        n = MAX_N;
    for (u64 i = 0; i < n; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        acc += x * 0x9e3779b97f4a7c15ull;
        acc = (acc << 23) | (acc >> 41);
        acc ^= i + (acc >> 31);
    }
    return acc ^ x;
}
