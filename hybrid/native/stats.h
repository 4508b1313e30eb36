/*
 * stats.h - run counts and run time of an object's programs, kept in the
 * object's shared region so that any process mapping the region (the
 * controller, `hybrid prog list`, the traced processes) reads them.
 *
 * Layout (page-aligned, at the end of the region; its offset is in the
 * registry record, see hybrid/registry.py):
 *     struct hybrid_stats                        64 bytes
 *     plane[nr_cpus]: struct hybrid_stats_slot[nr_progs], each plane
 *                     rounded up to a cache line
 * A probe dispatcher (agent.c) adds to the slot of its program in the plane
 * of the CPU it runs on (read from glibc's rseq area): `runs` always, and
 * `ticks` (rdtsc cycles around the program call) only while `enabled` is
 * set, like the kernel's kernel.bpf_stats_enabled.  The adds are single
 * unlocked `add` instructions: a thread preempted on one CPU cannot lose
 * another thread's add there.  A count can only be lost when a thread
 * migrates between reading its CPU number and its add while another thread
 * adds to the same slot on the old CPU in the same few nanoseconds.
 * Readers sum the planes; tsc_hz (set by whoever enables the stats)
 * converts ticks to nanoseconds.
 */
#ifndef HYBRID_STATS_H
#define HYBRID_STATS_H

#include <stdint.h>

#define HYBRID_STATS_MAGIC "HYSTATS1"
#define HYBRID_STATS_HDR 64

struct hybrid_stats {
    char magic[8];
    uint32_t nr_progs;
    uint32_t nr_cpus;
    uint32_t enabled;        /* nonzero: measure run time */
    uint32_t pad;
    uint64_t plane;          /* bytes per CPU plane (a multiple of 64) */
    uint64_t tsc_hz;         /* ticks per second of `ticks` */
    uint64_t reserved[3];
};

struct hybrid_stats_slot {
    uint64_t runs;
    uint64_t ticks;
};

/* cdef-begin */
uint64_t hybrid_tsc_hz(void);          /* TSC ticks per second, measured once per process (~10 ms) */
uint64_t hybrid_rdtsc(void);
/* cdef-end */

#if defined(__x86_64__)
#if defined(__GLIBC__) && defined(__has_include)
#if __has_include(<sys/rseq.h>)
#include <sys/rseq.h>
#pragma weak __rseq_offset
#pragma weak __rseq_size
#define HYBRID_STATS_RSEQ 1
#endif
#endif

static inline uint64_t hybrid_stats_tsc(void)
{
    uint32_t lo, hi;

    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((uint64_t)hi << 32) | lo;
}

static inline uint32_t hybrid_stats_cpu(uint32_t nr_cpus)
{
    int cpu = 0;

#ifdef HYBRID_STATS_RSEQ
    if (__builtin_expect(&__rseq_size != 0 && __rseq_size >= 8, 1)) {
        const struct rseq *rs = (const struct rseq *)((char *)__builtin_thread_pointer() + __rseq_offset);

        cpu = (int)__atomic_load_n(&rs->cpu_id, __ATOMIC_RELAXED);
    }
#endif
    if (__builtin_expect((uint32_t)cpu >= nr_cpus, 0))
        cpu = cpu < 0 ? 0 : (int)((uint32_t)cpu % nr_cpus);
    return (uint32_t)cpu;
}

/* Before the program runs: the start time if run time is measured, else 0. */
static inline uint64_t hybrid_stats_begin(const struct hybrid_stats *st)
{
    if (st && __builtin_expect(__atomic_load_n(&st->enabled, __ATOMIC_RELAXED) != 0, 0))
        return hybrid_stats_tsc();
    return 0;
}

/* After it ran: one more run of program `index`, and its time if measured. */
static inline void hybrid_stats_end(struct hybrid_stats *st, uint32_t index, uint64_t t0)
{
    struct hybrid_stats_slot *s;

    if (!st)
        return;
    s = (struct hybrid_stats_slot *)((char *)st + HYBRID_STATS_HDR +
                                     (uint64_t)hybrid_stats_cpu(st->nr_cpus) * st->plane) + index;
    __asm__ volatile("addq $1, %0" : "+m"(s->runs));
    if (t0) {
        uint64_t d = hybrid_stats_tsc() - t0;

        __asm__ volatile("addq %1, %0" : "+m"(s->ticks) : "r"(d));
    }
}
#endif

#endif /* HYBRID_STATS_H */
