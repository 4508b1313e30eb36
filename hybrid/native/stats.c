/*
 * stats.c - the clock of program run-time statistics (see stats.h).
 */
#define _GNU_SOURCE
#include "stats.h"

#include <time.h>

#if defined(__x86_64__)

uint64_t hybrid_rdtsc(void)
{
    return hybrid_stats_tsc();
}

static uint64_t mono_raw_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC_RAW, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* The TSC against CLOCK_MONOTONIC_RAW over ~10 ms (the TSC is invariant on the CPUs we run on:
 * constant_tsc, nonstop_tsc).  Each end is the tightest of a few clock/TSC pairs. */
uint64_t hybrid_tsc_hz(void)
{
    static uint64_t hz;
    uint64_t c[2] = {0, 0}, t[2] = {0, 0};

    if (__atomic_load_n(&hz, __ATOMIC_RELAXED))
        return hz;
    for (int end = 0; end < 2; end++) {
        uint64_t best = ~0ull;

        if (end) {
            struct timespec d = {0, 10 * 1000 * 1000};

            nanosleep(&d, NULL);
        }
        for (int i = 0; i < 5; i++) {
            uint64_t a = hybrid_stats_tsc(), n = mono_raw_ns(), b = hybrid_stats_tsc();

            if (b - a < best) {
                best = b - a;
                c[end] = a + (b - a) / 2;
                t[end] = n;
            }
        }
    }
    if (t[1] <= t[0] || c[1] <= c[0])
        return 0;
    __atomic_store_n(&hz, (uint64_t)((double)(c[1] - c[0]) * 1e9 / (double)(t[1] - t[0])), __ATOMIC_RELAXED);
    return hz;
}

#else

uint64_t hybrid_rdtsc(void)
{
    return 0;
}

uint64_t hybrid_tsc_hz(void)
{
    return 0;
}

#endif
