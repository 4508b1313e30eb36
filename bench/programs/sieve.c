/*
 * sieve - the sieve of Eratosthenes over a 400-byte array on the stack.
 *
 * One unit: one sieve of the numbers below `limit`, where the limit moves
 * between 337 and 400 from pass to pass (so no pass is loop-invariant and
 * the compiler cannot hoist it out).  Returns the sum of the prime counts.
 *
 * The kernel's verifier refuses it, whatever MAX_N: it walks the sieve
 * once per value the moving limit can take (the limit decides where every
 * inner loop ends), which is more than its limits allow even for a single
 * pass.  The benchmark records the verifier's message instead of a time.
 */
#include "bench.h"

#define SIZE 400
#define MAX_N (1ull << 32)

ENTRY
{
    u64 n = ctx->n;
    u64 seed = ctx->seed;
    u64 total = 0;
    u8 composite[SIZE];

    if (n > MAX_N)
        n = MAX_N;
    for (u64 pass = 0; pass < n; pass++) {
        u32 limit = SIZE - ((seed + pass) & 63);

        for (u32 i = 0; i < SIZE; i++)
            composite[i] = 0;
        for (u32 p = 2; p * p < limit; p++) {
            if (composite[p])
                continue;
            for (u32 k = p * p; k < limit; k += p)
                composite[k] = 1;
        }
        for (u32 i = 2; i < limit; i++)
            total += !composite[i];
    }
    return total;
}
