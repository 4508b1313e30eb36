/*
 * maps_impl.h - private layout of maps in shared memory and the primitives
 * (spinlock, sequence lock, hashing, current CPU) shared by maps.c and ring.c.
 *
 * Everything in shared memory is reached through offsets, never pointers,
 * and every index read from shared memory is bounds-checked before use:
 * another process (or a buggy program writing through a map value pointer)
 * can corrupt the region, and that must not turn into a wild access here.
 *
 * Locks are words in shared memory, taken with __atomic builtins, so they
 * work across threads and processes.  Waiting is test-and-test-and-set
 * with `pause`, then sched_yield(): in userspace the lock holder can be
 * preempted (no preemption control as in the kernel), and spinning against
 * a descheduled holder would waste its time slice.  No lock is ever held
 * across a callback, and critical sections are a few dozen instructions.
 * A process killed while holding one leaves it taken (no robust recovery).
 */
#ifndef HYBRID_MAPS_IMPL_H
#define HYBRID_MAPS_IMPL_H

#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "runtime.h"
#include "maps.h"

#if defined(__GLIBC__) && defined(__has_include)
#if __has_include(<sys/rseq.h>)
#include <sys/rseq.h>
#pragma weak __rseq_offset
#pragma weak __rseq_size
#define HYBRID_HAVE_RSEQ 1
#endif
#endif

/* kernel map types (enum bpf_map_type) */
enum {
    BPF_MAP_TYPE_HASH = 1,
    BPF_MAP_TYPE_ARRAY = 2,
    BPF_MAP_TYPE_PROG_ARRAY = 3,
    BPF_MAP_TYPE_PERF_EVENT_ARRAY = 4,
    BPF_MAP_TYPE_PERCPU_HASH = 5,
    BPF_MAP_TYPE_PERCPU_ARRAY = 6,
    BPF_MAP_TYPE_STACK_TRACE = 7,
    BPF_MAP_TYPE_LRU_HASH = 9,
    BPF_MAP_TYPE_LRU_PERCPU_HASH = 10,
    BPF_MAP_TYPE_LPM_TRIE = 11,
    BPF_MAP_TYPE_ARRAY_OF_MAPS = 12,
    BPF_MAP_TYPE_HASH_OF_MAPS = 13,
    BPF_MAP_TYPE_QUEUE = 22,
    BPF_MAP_TYPE_STACK = 23,
    BPF_MAP_TYPE_RINGBUF = 27,
    BPF_MAP_TYPE_BLOOM_FILTER = 30,
    HYBRID_MAX_TYPE = 32,
};

/* update flags */
#define BPF_ANY 0
#define BPF_NOEXIST 1
#define BPF_EXIST 2
#define BPF_F_LOCK 4

/* map_flags */
#define BPF_F_NO_PREALLOC (1u << 0)
#define BPF_F_NO_COMMON_LRU (1u << 1)
#define BPF_F_NUMA_NODE (1u << 2)
#define BPF_F_RDONLY (1u << 3)
#define BPF_F_WRONLY (1u << 4)
#define BPF_F_STACK_BUILD_ID (1u << 5)
#define BPF_F_ZERO_SEED (1u << 6)
#define BPF_F_RDONLY_PROG (1u << 7)
#define BPF_F_WRONLY_PROG (1u << 8)
#define BPF_F_CLONE (1u << 9)
#define BPF_F_MMAPABLE (1u << 10)
#define BPF_F_PRESERVE_ELEMS (1u << 11)
#define BPF_F_INNER_MAP (1u << 12)
#define BPF_F_ACCESS_MASK (BPF_F_RDONLY | BPF_F_WRONLY | BPF_F_RDONLY_PROG | BPF_F_WRONLY_PROG)

/* get_stackid flags */
#define BPF_F_SKIP_FIELD_MASK 0xffull
#define BPF_F_USER_STACK (1ull << 8)
#define BPF_F_FAST_STACK_CMP (1ull << 9)
#define BPF_F_REUSE_STACKID (1ull << 10)

/* perf_event_output flags */
#define BPF_F_INDEX_MASK 0xffffffffull
#define BPF_F_CURRENT_CPU BPF_F_INDEX_MASK

/* ring buffer */
#define BPF_RB_NO_WAKEUP (1ull << 0)
#define BPF_RB_FORCE_WAKEUP (1ull << 1)
#define BPF_RB_AVAIL_DATA 0
#define BPF_RB_RING_SIZE 1
#define BPF_RB_CONS_POS 2
#define BPF_RB_PROD_POS 3
#define BPF_RINGBUF_BUSY_BIT (1u << 31)
#define BPF_RINGBUF_DISCARD_BIT (1u << 30)
#define BPF_RINGBUF_HDR_SZ 8

#define HYBRID_MAP_MAGIC "HYBRIDMP"
#define HYBRID_REGION_MAGIC "HYBRIDRG"
#define HYBRID_LAYOUT_VERSION 3         /* 2: bridge, kernel_id (maps backed by kernel maps);
                                         * 3: hash maps' two element pools, hash_word for 4/8-byte keys */
#define HYBRID_RING_MAGIC 0x52494e47u /* "RING" */

#define HYBRID_MAX_KEY_SIZE 512          /* MAX_BPF_STACK: keys live on the program stack */
#define HYBRID_MAX_VALUE_SIZE (1u << 26)
#define HYBRID_MAX_PERCPU_VALUE_SIZE 32768 /* PCPU_MIN_UNIT_SIZE */
#define HYBRID_MAX_ENTRIES (1u << 30)
#define HYBRID_LPM_DATA_MAX 256
#define HYBRID_PERF_DEFAULT_RING (64u * 1024)
#define HYBRID_RING_MAX (1ull << 30)
#define HYBRID_PAGE 4096ull

#define CACHELINE 64

/* Maps backed by a kernel map (maps.c, "bridges"): header field `bridge`. */
enum {
    HYBRID_BRIDGE_NONE = 0,
    HYBRID_BRIDGE_MMAP = 1,      /* ARRAY whose storage is the kernel map's mmap()ed values */
    HYBRID_BRIDGE_SYSCALL = 2,   /* no storage: every operation is a bpf() map command */
};

/*
 * The map header.  The first two cache lines are written once by
 * hybrid_map_init and only read afterwards; the mutable counters each
 * have their own cache line so that a writer of one does not slow down
 * the readers of the configuration.
 */
struct hybrid_map {
    /* line 0: everything the hot paths read */
    char magic[8];
    uint32_t off_a;          /* offsets relative to this header; meaning per type (maps.c); off_a < 2 pages */
    uint32_t bridge;         /* HYBRID_BRIDGE_*: 0 for a map in this region's memory (maps.c, bridges) */
    uint64_t off_b;
    uint64_t off_c;
    uint64_t plane;          /* per-CPU value plane size in bytes */
    uint32_t type, key_size, value_size, max_entries;
    uint32_t stride;         /* bytes per stored value (value_size rounded up to 8) */
    uint32_t nr_cpus;
    /* line 1: identity and the rest of the configuration */
    uint32_t mask;           /* n_buckets - 1, bloom bit mask */
    uint32_t elem_size;      /* hash element / stack slot / perf ring stride */
    uint32_t nelems;         /* hash: elements in the pool */
    uint32_t aux;            /* bloom: nr hashes; lpm: data bits; perf: ring data size */
    uint64_t seed;
    uint64_t self_off, size, map_extra;
    uint32_t version, id, map_flags, key_words;
    uint32_t inner_type, inner_key_size, inner_value_size, inner_max_entries, inner_flags;
    uint32_t kernel_id;      /* bridged maps: the kernel map's id (BPF_MAP_GET_FD_BY_ID) */
    char name[64];           /* NUL-terminated */
    /* mutable: allocation state (hash element pools, queue) */
    struct {
        uint64_t head;       /* hash: free elements for inserts, a Treiber stack: tag << 32 | (index + 1) */
        uint64_t spare;      /* hash: spare elements for replacements, the same */
        uint32_t lock;
        uint32_t qhead, qtail;
    } __attribute__((aligned(CACHELINE))) a;
    /* mutable: LRU clock hand */
    struct {
        uint64_t hand;
        uint64_t lost;
    } __attribute__((aligned(CACHELINE))) s;
    /* mutable: consumer wake-up state (ring buffer, perf event array) */
    struct {
        uint32_t futex;      /* futex word, bumped by every wake-up */
        uint32_t waiting;    /* 0: consumer not waiting, 1: batching, 2: eager */
        uint32_t wakeup_bytes;
        uint32_t max_latency_us;
    } __attribute__((aligned(CACHELINE))) w;
} __attribute__((aligned(CACHELINE)));

/* The region header; map_off[] follows at offset 64. */
struct hybrid_region {
    char magic[8];
    uint32_t version;
    uint32_t nr_maps;
    uint64_t size;
    uint32_t nr_cpus;
    uint32_t hdr_size;
    uint64_t reserved[4];
    uint64_t map_off[];
};

/* hash bucket: a sequence lock (odd while a writer holds it) and a chain head */
struct hbucket {
    uint32_t seq;
    uint32_t head;           /* element index + 1, 0 = empty */
};

enum { ELEM_FREE = 0, ELEM_ALLOC = 1, ELEM_LIVE = 2 };

/* hash element: header, key (rounded up to 8), then the value (not for per-CPU maps) */
struct helem {
    uint32_t next;           /* chain or freelist link: index + 1, 0 = end */
    uint32_t hash;           /* live: the key's hash; free: its depth in the pool's stack (maps.c) */
    uint32_t state;
    uint32_t ref;            /* LRU: accessed since the clock hand last passed */
    unsigned char key[];
};

/* stack trace slot */
struct stackslot {
    uint32_t seq;
    uint32_t nr;
    uint32_t hash;
    uint32_t _pad;
    uint64_t ips[];
};

/*
 * A ring of variable-size records with the kernel BPF ring buffer's
 * protocol: 64-bit consumer and producer positions, 8-byte record headers
 * (u32 len with BUSY and DISCARD bits, u32 offset of the header from the
 * ring), records 8-byte aligned.  The positions are on separate cache
 * lines (the kernel puts them on separate pages).
 */
struct hybrid_ring {
    uint64_t cons_pos;
    char _pad0[CACHELINE - 8];
    uint64_t prod_pos;
    uint64_t mask;           /* data size - 1 */
    uint64_t lost;
    uint64_t map_back;       /* offset from the map header to this ring */
    uint32_t lock;
    uint32_t enabled;        /* perf: a consumer is attached (kernel: a perf event fd) */
    uint32_t magic;
    uint32_t index;
    char _pad1[CACHELINE - 48];
    /* data follows at HYBRID_RING_DATA_OFF */
};
#define HYBRID_RING_DATA_OFF 128u

static inline unsigned char *ring_data(struct hybrid_ring *r)
{
    return (unsigned char *)r + HYBRID_RING_DATA_OFF;
}

/* --- primitives ----------------------------------------------------------- */

#define LOAD(p) __atomic_load_n((p), __ATOMIC_RELAXED)
#define LOAD_ACQ(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define STORE(p, v) __atomic_store_n((p), (v), __ATOMIC_RELAXED)
#define STORE_REL(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)
#define likely(x) __builtin_expect(!!(x), 1)
#define unlikely(x) __builtin_expect(!!(x), 0)

static inline void cpu_pause(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield" ::: "memory");
#else
    __asm__ __volatile__("" ::: "memory");
#endif
}

/* One step of waiting for another thread: spin a little, then yield the CPU. */
static inline void backoff(unsigned *n)
{
    if (++*n < 64)
        cpu_pause();
    else
        sched_yield();
}

static inline void spin_lock(uint32_t *l)
{
    unsigned n = 0;

    for (;;) {
        if (LOAD(l) == 0 && __atomic_exchange_n(l, 1, __ATOMIC_ACQUIRE) == 0)
            return;
        backoff(&n);
    }
}

static inline void spin_unlock(uint32_t *l)
{
    STORE_REL(l, 0);
}

/* Sequence lock: writers serialize on it (odd while held); readers run
 * without writing shared memory and retry when it changed under them. */
static inline uint32_t seq_read_begin(const uint32_t *seq)
{
    unsigned n = 0;
    uint32_t s;

    while ((s = LOAD_ACQ(seq)) & 1)
        backoff(&n);
    return s;
}

static inline int seq_read_retry(const uint32_t *seq, uint32_t s)
{
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    return LOAD(seq) != s;
}

static inline uint32_t seq_write_lock(uint32_t *seq)
{
    unsigned n = 0;
    uint32_t s;

    for (;;) {
        s = LOAD(seq);
        if (!(s & 1) && __atomic_compare_exchange_n(seq, &s, s + 1, 1, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED))
            break;
        backoff(&n);
    }
    __atomic_thread_fence(__ATOMIC_RELEASE);
    return s + 1;
}

static inline void seq_write_unlock(uint32_t *seq, uint32_t held)
{
    STORE_REL(seq, held + 1);
}

/*
 * The CPU the calling thread runs on, as a per-CPU slot index.
 *
 * Read from the thread's rseq area that glibc >= 2.35 registers (one load,
 * no system call, not even a libc call); the symbols are weak, so the
 * module still loads on an older libc and falls back to sched_getcpu().  Userspace cannot disable preemption: the thread may
 * migrate between reading the CPU number and using the slot, so two
 * threads can use the same per-CPU slot at once.  Per-CPU values are
 * therefore *mostly* private to a CPU, not exclusively: use atomic
 * operations on them when exact results matter.
 */
static inline int current_cpu(void)
{
#ifdef HYBRID_HAVE_RSEQ
    /* the kernel keeps cpu_id of the thread's registered rseq area current: one load */
    if (likely(&__rseq_size != NULL && __rseq_size >= 8)) {
        const struct rseq *rs = (const struct rseq *)((char *)__builtin_thread_pointer() + __rseq_offset);
        int cpu = (int)__atomic_load_n(&rs->cpu_id, __ATOMIC_RELAXED);

        if (likely(cpu >= 0))
            return cpu;
    }
#endif
    return sched_getcpu();
}

static inline uint32_t cpu_slot(uint32_t nr_cpus)
{
    int cpu = current_cpu();
    uint32_t c = cpu < 0 ? 0 : (uint32_t)cpu;

    return likely(c < nr_cpus) ? c : c % nr_cpus;
}

static inline uint64_t rotl64(uint64_t x, int r)
{
    return (x << r) | (x >> (64 - r));
}

static inline uint64_t fmix64(uint64_t h)
{
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdull;
    h ^= h >> 33;
    h *= 0xc4ceb9fe1a85ec53ull;
    h ^= h >> 33;
    return h;
}

/* 64-bit hash of a byte string (MurmurHash3-style 8-byte rounds, fmix64 finalizer). */
static inline uint64_t hash_bytes(const void *data, uint32_t len, uint64_t seed)
{
    const unsigned char *p = data;
    uint64_t h = seed ^ ((uint64_t)len * 0x9e3779b97f4a7c15ull);
    uint64_t k;

    while (len >= 8) {
        memcpy(&k, p, 8);
        k *= 0x87c37b91114253d5ull;
        k = rotl64(k, 31);
        k *= 0x4cf5ad432745937full;
        h ^= k;
        h = rotl64(h, 27) * 5 + 0x52dce729;
        p += 8;
        len -= 8;
    }
    if (len) {  /* 1..7 bytes, without a variable-length memcpy (a libc call) */
        if (len >= 4) {
            uint32_t lo, hi;

            memcpy(&lo, p, 4);
            memcpy(&hi, p + len - 4, 4);  /* overlaps lo for len < 8: every byte is read */
            k = (uint64_t)hi << 32 | lo;
        } else {
            k = (uint64_t)p[0] << 16 | (uint64_t)p[len >> 1] << 8 | p[len - 1];
        }
        k *= 0x87c37b91114253d5ull;
        k = rotl64(k, 31);
        k *= 0x4cf5ad432745937full;
        h ^= k;
    }
    return fmix64(h);
}

/* 32-bit hash of a 4- or 8-byte key: two multiply-xorshift rounds, every
 * key bit reaches every result bit (cheaper than hash_bytes, for the
 * common u32/u64 hash map keys). */
static inline uint32_t hash_word(uint64_t k, uint64_t seed)
{
    uint64_t h = (k ^ seed) * 0x9e3779b97f4a7c15ull;

    h ^= h >> 32;
    h *= 0xd6e8feb86659fd93ull;
    h ^= h >> 32;
    return (uint32_t)h;
}

static inline uint64_t round_up(uint64_t x, uint64_t a)
{
    return (x + a - 1) / a * a;
}

static inline uint64_t roundup_pow2(uint64_t x)
{
    uint64_t p = 1;

    while (p < x)
        p <<= 1;
    return p;
}

static inline char *region_base(const struct hybrid_map *m)
{
    return (char *)m - m->self_off;
}

/* ring.c: map-type hooks called from maps.c */
int64_t hybrid_ring_layout(uint32_t type, uint32_t max_entries, uint64_t map_extra, struct hybrid_map *m);
void hybrid_ring_init(struct hybrid_map *m);
long hybrid_perf_update(struct hybrid_map *m, uint32_t index, uint32_t value);
long hybrid_perf_delete(struct hybrid_map *m, uint32_t index);

#endif /* HYBRID_MAPS_IMPL_H */
