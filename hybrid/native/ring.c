/*
 * ring.c - BPF_MAP_TYPE_RINGBUF and BPF_MAP_TYPE_PERF_EVENT_ARRAY in shared
 * memory: multi-producer, single-consumer rings of variable-size records.
 *
 * Both use the kernel BPF ring buffer's record protocol (struct
 * hybrid_ring in maps_impl.h): producers reserve under a short spinlock
 * (write the header with the BUSY bit, publish producer_pos), fill the
 * record without the lock, and commit by clearing BUSY (DISCARD set for a
 * discarded record); the consumer reads records at consumer_pos until it
 * reaches producer_pos or a BUSY record, skipping DISCARD ones, and
 * publishes consumer_pos after each.  A libbpf-style consumer given the two
 * positions and the data area can read these rings.
 *
 * The kernel maps the data area twice in a row so a record can wrap around
 * the end.  A file region mapped once cannot do that, so a record that
 * would wrap is preceded by a DISCARD padding record filling the end of the
 * area, and no record ever wraps (consumers need no special case).  The
 * cost: a record larger than half the ring may not fit even in an empty
 * ring, depending on where the positions are.
 *
 * A RINGBUF map has one ring of max_entries bytes (a power-of-2 multiple of
 * the page size).  A PERF_EVENT_ARRAY map has one ring per entry (entry =
 * CPU for BPF_F_CURRENT_CPU), each map_extra bytes (a power of two >= one
 * page; 0 = 64 KiB); an entry receives records only while enabled (update
 * with a non-zero value, as the kernel needs a perf event fd installed:
 * otherwise -ENOENT).  Each ring's data area starts on a page boundary of
 * the map (the ring header sits in the last 128 bytes of the page before).
 *
 * Records that do not fit are never dropped silently: reserve/output fail
 * (NULL, -EAGAIN for ringbuf_output, -ENOSPC for perf_output) and the
 * ring's lost counter is incremented.
 *
 * Wake-ups are batched.  A consumer that finds nothing to read declares it
 * is waiting (m->w.waiting) and sleeps on a futex word in the map (shared
 * futex: works across processes).  The wait has two phases: for the first
 * max_latency_us (10 ms by default) it is "batching" and a producer wakes
 * it only when the unconsumed data reaches wakeup_bytes (a quarter of the
 * ring by default) or the record is submitted with BPF_RB_FORCE_WAKEUP; it
 * then wakes by itself and, finding nothing, becomes "eager": the next
 * committed record wakes it.  So an idle consumer reacts to the first
 * record at once, a busy one is woken at most every max_latency_us or every
 * wakeup_bytes, and a producer that finds no waiting consumer (the common
 * case under load) pays one relaxed load.  BPF_RB_NO_WAKEUP never wakes.
 * The consumer re-checks the positions after declaring itself waiting and
 * never sleeps more than a second at a time, so no record is left pending
 * behind a missed wake-up.  One consumer per map.
 */
#include "maps_impl.h"

#include <limits.h>
#include <linux/futex.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define HDR_SIZE ((uint64_t)sizeof(struct hybrid_map))
#define NEG(e) ((uint64_t)(int64_t)(e))
#define MAX_SLEEP_NS 1000000000ll
#define DEFAULT_LATENCY_US 10000u

static inline struct hybrid_ring *ring_at(const struct hybrid_map *m, uint32_t i)
{
    return (struct hybrid_ring *)((char *)m + m->off_a + (uint64_t)i * m->elem_size);
}

static inline int is_ring_map(const struct hybrid_map *m)
{
    return m->type == BPF_MAP_TYPE_RINGBUF || m->type == BPF_MAP_TYPE_PERF_EVENT_ARRAY;
}

static inline uint32_t nr_rings(const struct hybrid_map *m)
{
    return m->type == BPF_MAP_TYPE_RINGBUF ? 1 : m->max_entries;
}

int64_t hybrid_ring_layout(uint32_t type, uint32_t max_entries, uint64_t map_extra, struct hybrid_map *m)
{
    uint64_t data, n;

    if (type == BPF_MAP_TYPE_RINGBUF) {
        data = max_entries;
        n = 1;
    } else {
        if (max_entries == 0)
            return -EINVAL;
        if (max_entries > 65536)
            return -E2BIG;
        data = map_extra ? map_extra : HYBRID_PERF_DEFAULT_RING;
        n = max_entries;
    }
    if (data < HYBRID_PAGE || (data & (data - 1)) || data % HYBRID_PAGE)
        return -EINVAL;
    if (data > HYBRID_RING_MAX)
        return -E2BIG;
    m->off_a = HYBRID_PAGE - HYBRID_RING_DATA_OFF;
    m->elem_size = (uint32_t)(HYBRID_PAGE + data);
    m->aux = (uint32_t)data;
    m->mask = (uint32_t)(data - 1);
    return (int64_t)(m->off_a + n * m->elem_size);
}

void hybrid_ring_init(struct hybrid_map *m)
{
    for (uint32_t i = 0; i < nr_rings(m); i++) {
        struct hybrid_ring *r = ring_at(m, i);

        r->mask = m->mask;
        r->map_back = (uint64_t)((char *)r - (char *)m);
        r->magic = HYBRID_RING_MAGIC;
        r->index = i;
        r->enabled = m->type == BPF_MAP_TYPE_RINGBUF;
    }
    m->w.wakeup_bytes = m->aux / 4 ? m->aux / 4 : 1;
    m->w.max_latency_us = DEFAULT_LATENCY_US;
}

/* --- producer side ------------------------------------------------------------ */

static void *ring_reserve(struct hybrid_map *m, struct hybrid_ring *r, uint64_t size)
{
    uint64_t rsize = (uint64_t)m->mask + 1, len, cons, prod, off, pad, new_prod;
    unsigned char *data = ring_data(r);
    uint32_t *hdr;

    if (unlikely(size > rsize - BPF_RINGBUF_HDR_SZ)) {
        __atomic_fetch_add(&r->lost, 1, __ATOMIC_RELAXED);
        return NULL;
    }
    len = round_up(size + BPF_RINGBUF_HDR_SZ, 8);
    spin_lock(&r->lock);
    cons = LOAD_ACQ(&r->cons_pos);
    prod = LOAD(&r->prod_pos);
    off = prod & m->mask;
    pad = off + len > rsize ? rsize - off : 0;
    new_prod = prod + pad + len;
    if (unlikely(new_prod - cons > rsize)) {
        spin_unlock(&r->lock);
        __atomic_fetch_add(&r->lost, 1, __ATOMIC_RELAXED);
        return NULL;
    }
    if (pad) {  /* fill the end of the area: the record starts again at offset 0 */
        hdr = (uint32_t *)(data + off);
        hdr[1] = (uint32_t)((unsigned char *)hdr - (unsigned char *)r);
        STORE(&hdr[0], (uint32_t)(pad - BPF_RINGBUF_HDR_SZ) | BPF_RINGBUF_DISCARD_BIT);
    }
    hdr = (uint32_t *)(data + ((prod + pad) & m->mask));
    hdr[1] = (uint32_t)((unsigned char *)hdr - (unsigned char *)r);
    STORE(&hdr[0], (uint32_t)size | BPF_RINGBUF_BUSY_BIT);
    STORE_REL(&r->prod_pos, new_prod);
    spin_unlock(&r->lock);
    return hdr + 2;
}

static void ring_wake(struct hybrid_map *m)
{
    uint32_t w = LOAD(&m->w.waiting);

    while (w) {
        if (__atomic_compare_exchange_n(&m->w.waiting, &w, 0, 0, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED)) {
            __atomic_fetch_add(&m->w.futex, 1, __ATOMIC_SEQ_CST);
            syscall(SYS_futex, &m->w.futex, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
            return;
        }
    }
}

static inline void ring_notify(struct hybrid_map *m, struct hybrid_ring *r, uint64_t flags)
{
    uint32_t w;

    if (flags & BPF_RB_NO_WAKEUP)
        return;
    w = __atomic_load_n(&m->w.waiting, __ATOMIC_SEQ_CST);
    if (likely(w == 0))
        return;
    if (w == 1 && !(flags & BPF_RB_FORCE_WAKEUP) &&
        LOAD(&r->prod_pos) - LOAD(&r->cons_pos) < LOAD(&m->w.wakeup_bytes))
        return;
    ring_wake(m);
}

static void ring_commit(void *sample, uint64_t flags, int discard)
{
    uint32_t *hdr, len;
    struct hybrid_ring *r;

    if (unlikely(!sample))
        return;
    hdr = (uint32_t *)((char *)sample - BPF_RINGBUF_HDR_SZ);
    len = LOAD(&hdr[0]);
    if (unlikely(!(len & BPF_RINGBUF_BUSY_BIT)))
        return;  /* not a reserved record, or committed twice */
    r = (struct hybrid_ring *)((char *)hdr - hdr[1]);
    if (unlikely(r->magic != HYBRID_RING_MAGIC))
        return;
    len &= ~BPF_RINGBUF_BUSY_BIT;
    if (discard)
        len |= BPF_RINGBUF_DISCARD_BIT;
    /* a full barrier (xchg), ordered before reading `waiting` in ring_notify */
    __atomic_exchange_n(&hdr[0], len, __ATOMIC_SEQ_CST);
    ring_notify((struct hybrid_map *)((char *)r - r->map_back), r, flags);
}

void *hybrid_ringbuf_reserve(struct hybrid_map *m, uint64_t size, uint64_t flags)
{
    if (unlikely(m->type != BPF_MAP_TYPE_RINGBUF || flags != 0))
        return NULL;
    return ring_reserve(m, ring_at(m, 0), size);
}

void hybrid_ringbuf_submit(void *sample, uint64_t flags)
{
    ring_commit(sample, flags, 0);
}

void hybrid_ringbuf_discard(void *sample, uint64_t flags)
{
    ring_commit(sample, flags, 1);
}

long hybrid_ringbuf_output(struct hybrid_map *m, const void *data, uint64_t size, uint64_t flags)
{
    void *p;

    if (m->type != BPF_MAP_TYPE_RINGBUF || (flags & ~(BPF_RB_NO_WAKEUP | BPF_RB_FORCE_WAKEUP)))
        return -EINVAL;
    p = ring_reserve(m, ring_at(m, 0), size);
    if (!p)
        return -EAGAIN;
    memcpy(p, data, size);
    ring_commit(p, flags, 0);
    return 0;
}

uint64_t hybrid_ringbuf_query(struct hybrid_map *m, uint64_t flags)
{
    struct hybrid_ring *r;

    if (m->type != BPF_MAP_TYPE_RINGBUF)
        return 0;
    r = ring_at(m, 0);
    switch (flags) {
    case BPF_RB_AVAIL_DATA:
        return LOAD_ACQ(&r->prod_pos) - LOAD_ACQ(&r->cons_pos);
    case BPF_RB_RING_SIZE:
        return (uint64_t)m->mask + 1;
    case BPF_RB_CONS_POS:
        return LOAD_ACQ(&r->cons_pos);
    case BPF_RB_PROD_POS:
        return LOAD_ACQ(&r->prod_pos);
    default:
        return 0;
    }
}

long hybrid_perf_output(struct hybrid_map *m, uint64_t flags, const void *data, uint64_t size)
{
    uint64_t index = flags & BPF_F_INDEX_MASK;
    struct hybrid_ring *r;
    void *p;

    if (unlikely(m->type != BPF_MAP_TYPE_PERF_EVENT_ARRAY || (flags & ~BPF_F_INDEX_MASK)))
        return -EINVAL;
    if (index == BPF_F_CURRENT_CPU)
        index = hybrid_current_cpu();
    if (unlikely(index >= m->max_entries))
        return -E2BIG;
    r = ring_at(m, (uint32_t)index);
    if (unlikely(!LOAD(&r->enabled)))
        return -ENOENT;
    if (unlikely(size > (uint64_t)m->mask + 1 - BPF_RINGBUF_HDR_SZ))
        return -E2BIG;
    p = ring_reserve(m, r, size);
    if (!p)
        return -ENOSPC;
    memcpy(p, data, size);
    ring_commit(p, 0, 0);
    return 0;
}

long hybrid_perf_update(struct hybrid_map *m, uint32_t index, uint32_t value)
{
    if (index >= m->max_entries)
        return -E2BIG;
    STORE_REL(&ring_at(m, index)->enabled, value ? 1u : 0u);
    return 0;
}

long hybrid_perf_delete(struct hybrid_map *m, uint32_t index)
{
    if (index >= m->max_entries)
        return -E2BIG;
    return __atomic_exchange_n(&ring_at(m, index)->enabled, 0, __ATOMIC_ACQ_REL) ? 0 : -ENOENT;
}

/* --- consumer side ------------------------------------------------------------ */

typedef int (*sample_cb)(void *ctx, void *data, uint32_t size);

static int ring_consume(struct hybrid_map *m, struct hybrid_ring *r, sample_cb cb, void *ctx)
{
    uint64_t rsize = (uint64_t)m->mask + 1, cons = LOAD_ACQ(&r->cons_pos), prod;
    unsigned char *data = ring_data(r);
    int n = 0;

    for (;;) {
        prod = LOAD_ACQ(&r->prod_pos);
        if (cons == prod)
            return n;
        while (cons != prod) {
            uint64_t off = cons & m->mask, total;
            uint32_t *hdr = (uint32_t *)(data + off), len, size;

            len = LOAD_ACQ(&hdr[0]);
            if (len & BPF_RINGBUF_BUSY_BIT)
                return n;
            size = len & ~(BPF_RINGBUF_BUSY_BIT | BPF_RINGBUF_DISCARD_BIT);
            total = round_up((uint64_t)size + BPF_RINGBUF_HDR_SZ, 8);
            if (unlikely(total > rsize - off || total > prod - cons)) {
                STORE_REL(&r->cons_pos, prod);  /* corrupted ring: drop what is in it */
                return -EBADMSG;
            }
            cons += total;
            if (!(len & BPF_RINGBUF_DISCARD_BIT)) {
                int rc = cb ? cb(ctx, hdr + 2, size) : 0;

                STORE_REL(&r->cons_pos, cons);
                if (rc < 0)
                    return rc;
                if (n < INT_MAX)
                    n++;
            } else {
                STORE_REL(&r->cons_pos, cons);
            }
        }
    }
}

/* A committed record is waiting at the consumer position of ring r. */
static int ring_ready(const struct hybrid_map *m, struct hybrid_ring *r)
{
    uint64_t cons = __atomic_load_n(&r->cons_pos, __ATOMIC_SEQ_CST);
    uint64_t prod = __atomic_load_n(&r->prod_pos, __ATOMIC_SEQ_CST);

    if (cons == prod)
        return 0;
    return !(__atomic_load_n((uint32_t *)(ring_data(r) + (cons & m->mask)), __ATOMIC_SEQ_CST) &
             BPF_RINGBUF_BUSY_BIT);
}

/* Any ring with a record to read (perf: among the enabled entries, the ones a consumer reads). */
static int map_ready(const struct hybrid_map *m)
{
    for (uint32_t i = 0; i < nr_rings(m); i++) {
        struct hybrid_ring *r = ring_at(m, i);

        if (LOAD(&r->enabled) && ring_ready(m, r))
            return 1;
    }
    return 0;
}

static int64_t mono_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000ll + ts.tv_nsec;
}

/* Returns 1 when records are ready, 0 on timeout, -EINTR on a signal. */
static int ring_wait(struct hybrid_map *m, int timeout_ms)
{
    int64_t now, deadline, phase_end, slice;
    uint32_t phase, seq;

    if (map_ready(m))
        return 1;
    if (timeout_ms == 0)
        return 0;
    now = mono_ns();
    deadline = timeout_ms < 0 ? INT64_MAX : now + (int64_t)timeout_ms * 1000000ll;
    phase_end = now + (int64_t)LOAD(&m->w.max_latency_us) * 1000ll;
    phase = phase_end > now ? 1 : 2;
    for (;;) {
        struct timespec ts;
        long rc;

        seq = LOAD_ACQ(&m->w.futex);
        __atomic_store_n(&m->w.waiting, phase, __ATOMIC_SEQ_CST);
        if (map_ready(m))
            break;
        now = mono_ns();
        if (now >= deadline) {
            STORE(&m->w.waiting, 0);
            return 0;
        }
        slice = deadline - now;
        if (phase == 1 && phase_end - now < slice)
            slice = phase_end - now;
        if (slice > MAX_SLEEP_NS)
            slice = MAX_SLEEP_NS;
        if (slice < 1000)
            slice = 1000;
        ts.tv_sec = slice / 1000000000ll;
        ts.tv_nsec = slice % 1000000000ll;
        rc = syscall(SYS_futex, &m->w.futex, FUTEX_WAIT, seq, &ts, NULL, 0);
        if (rc != 0 && errno == EINTR) {
            STORE(&m->w.waiting, 0);
            return -EINTR;
        }
        if (map_ready(m))
            break;
        if (phase == 1 && mono_ns() >= phase_end)
            phase = 2;
    }
    STORE(&m->w.waiting, 0);
    return 1;
}

int hybrid_ringbuf_consume(struct hybrid_map *m, sample_cb cb, void *ctx)
{
    if (m->type != BPF_MAP_TYPE_RINGBUF)
        return -EINVAL;
    return ring_consume(m, ring_at(m, 0), cb, ctx);
}

int hybrid_ringbuf_wait(struct hybrid_map *m, int timeout_ms)
{
    if (m->type != BPF_MAP_TYPE_RINGBUF)
        return -EINVAL;
    return ring_wait(m, timeout_ms);
}

int hybrid_perf_consume(struct hybrid_map *m, uint32_t cpu, sample_cb cb, void *ctx)
{
    if (m->type != BPF_MAP_TYPE_PERF_EVENT_ARRAY)
        return -EINVAL;
    if (cpu >= m->max_entries)
        return -E2BIG;
    return ring_consume(m, ring_at(m, cpu), cb, ctx);
}

int hybrid_perf_wait(struct hybrid_map *m, int timeout_ms)
{
    if (m->type != BPF_MAP_TYPE_PERF_EVENT_ARRAY)
        return -EINVAL;
    return ring_wait(m, timeout_ms);
}

uint64_t hybrid_perf_lost(struct hybrid_map *m, uint32_t cpu, int reset)
{
    struct hybrid_ring *r;

    if (m->type != BPF_MAP_TYPE_PERF_EVENT_ARRAY || cpu >= m->max_entries)
        return 0;
    r = ring_at(m, cpu);
    return reset ? __atomic_exchange_n(&r->lost, 0, __ATOMIC_RELAXED) : LOAD(&r->lost);
}

uint64_t hybrid_map_lost(struct hybrid_map *m, int reset)
{
    uint64_t sum = 0;

    if (!is_ring_map(m))
        return reset ? __atomic_exchange_n(&m->s.lost, 0, __ATOMIC_RELAXED) : LOAD(&m->s.lost);
    for (uint32_t i = 0; i < nr_rings(m); i++) {
        struct hybrid_ring *r = ring_at(m, i);

        sum += reset ? __atomic_exchange_n(&r->lost, 0, __ATOMIC_RELAXED) : LOAD(&r->lost);
    }
    return sum;
}

int hybrid_ring_set_wakeup(struct hybrid_map *m, uint32_t bytes, uint32_t max_latency_us)
{
    if (!is_ring_map(m))
        return -EINVAL;
    STORE(&m->w.wakeup_bytes, bytes ? bytes : 1);
    STORE(&m->w.max_latency_us, max_latency_us);
    return 0;
}

int hybrid_ring_addresses(struct hybrid_map *m, uint32_t index, uint64_t *out)
{
    struct hybrid_ring *r;

    if (!is_ring_map(m) || index >= nr_rings(m))
        return -EINVAL;
    r = ring_at(m, index);
    out[0] = (uintptr_t)&r->cons_pos;
    out[1] = (uintptr_t)&r->prod_pos;
    out[2] = (uintptr_t)ring_data(r);
    out[3] = (uint64_t)m->mask + 1;
    return 0;
}

/* --- helpers --------------------------------------------------------------------- */

/*  25: r1 ctx, r2 map, r3 flags, r4 data, r5 size */
uint64_t hybrid_helper_perf_event_output(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5)
{
    (void)r1;
    if (unlikely(!r2 || (!r4 && r5)))
        return NEG(-EINVAL);
    return NEG(hybrid_perf_output((struct hybrid_map *)(uintptr_t)r2, r3, (const void *)(uintptr_t)r4, r5));
}

/* 130: r1 ringbuf, r2 data, r3 size, r4 flags */
uint64_t hybrid_helper_ringbuf_output(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5)
{
    (void)r5;
    if (unlikely(!r1 || (!r2 && r3)))
        return NEG(-EINVAL);
    return NEG(hybrid_ringbuf_output((struct hybrid_map *)(uintptr_t)r1, (const void *)(uintptr_t)r2, r3, r4));
}

/* 131: r1 ringbuf, r2 size, r3 flags -> record or NULL */
uint64_t hybrid_helper_ringbuf_reserve(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5)
{
    (void)r4; (void)r5;
    if (unlikely(!r1))
        return 0;
    return (uintptr_t)hybrid_ringbuf_reserve((struct hybrid_map *)(uintptr_t)r1, r2, r3);
}

/* 132 */
uint64_t hybrid_helper_ringbuf_submit(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5)
{
    (void)r3; (void)r4; (void)r5;
    hybrid_ringbuf_submit((void *)(uintptr_t)r1, r2);
    return 0;
}

/* 133 */
uint64_t hybrid_helper_ringbuf_discard(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5)
{
    (void)r3; (void)r4; (void)r5;
    hybrid_ringbuf_discard((void *)(uintptr_t)r1, r2);
    return 0;
}

/* 134 */
uint64_t hybrid_helper_ringbuf_query(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5)
{
    (void)r3; (void)r4; (void)r5;
    if (unlikely(!r1))
        return 0;
    return hybrid_ringbuf_query((struct hybrid_map *)(uintptr_t)r1, r2);
}

/* --- test driver --------------------------------------------------------------- */

/* Produces `count` records of {u32 producer, u32 size, u64 seq, filler} with
 * sizes size + 4 * (seq % 4); ring buffers alternate output and
 * reserve/submit, and every 5th reserved record (seq % 5 == 4) is discarded
 * (its producer field is 0xffffffff: a consumer must never see it).  Perf
 * maps output on the current CPU.  Returns how many records did not fit,
 * or -errno. */
int64_t hybrid_test_ring_produce(struct hybrid_map *m, uint32_t producer, uint64_t count, uint32_t size,
                                 uint64_t flags)
{
    unsigned char buf[4096 + 64];
    int64_t failed = 0;

    if (size < 16 || size > 4096)
        return -EINVAL;
    for (uint64_t seq = 0; seq < count; seq++) {
        uint32_t sz = size + 4 * (uint32_t)(seq % 4), discard = 0;
        long r;

        memcpy(buf, &producer, 4);
        memcpy(buf + 4, &sz, 4);
        memcpy(buf + 8, &seq, 8);
        for (uint32_t j = 16; j < sz; j++)
            buf[j] = (unsigned char)(seq + j);
        if (m->type == BPF_MAP_TYPE_PERF_EVENT_ARRAY) {
            r = hybrid_perf_output(m, BPF_F_CURRENT_CPU, buf, sz);
            if (r == -ENOSPC)
                failed++;
            else if (r)
                return r;
        } else if (seq % 2 == 0) {
            r = hybrid_ringbuf_output(m, buf, sz, flags);
            if (r == -EAGAIN)
                failed++;
            else if (r)
                return r;
        } else {
            unsigned char *p = hybrid_ringbuf_reserve(m, sz, 0);

            discard = seq % 5 == 4;
            if (!p) {
                failed += !discard;
                continue;
            }
            memcpy(p, buf, sz);
            if (discard) {
                memset(p, 0xff, 4);
                hybrid_ringbuf_discard(p, flags);
            } else {
                hybrid_ringbuf_submit(p, flags);
            }
        }
    }
    return failed;
}
