/*
 * maps.c - eBPF maps in shared memory: regions, every map type except the
 * rings (ring.c), the map helpers, and test/benchmark drivers.
 *
 * Layout of each type after its header (offsets relative to the header):
 *
 *   ARRAY                off_a: max_entries values, `stride` bytes each
 *   PERCPU_ARRAY         off_a: nr_cpus planes of `plane` bytes, value i of
 *                        CPU c at off_a + c * plane + i * stride (no false
 *                        sharing between CPUs)
 *   PROG_ARRAY,          off_a: max_entries u64 slots, 0 = empty, else
 *   ARRAY_OF_MAPS          prog id + 1 / the inner map's region offset
 *   HASH family          off_a: n_buckets struct hbucket (power of two >=
 *   (HASH, PERCPU_HASH,    max_entries); off_b: nelems struct helem; off_c:
 *   LRU_*, LPM_TRIE,       per-CPU planes (per-CPU types) or the LPM
 *   HASH_OF_MAPS)          per-prefix-length counters
 *   STACK_TRACE          off_a: n_buckets struct stackslot of elem_size
 *   QUEUE, STACK         off_a: max_entries + 1 slots (kernel's circular buffer)
 *   BLOOM_FILTER         off_a: the bit array (mask + 1 bits)
 *   RINGBUF, PERF_...    ring.c
 *
 * Hash maps.  Every element is preallocated (BPF_F_NO_PREALLOC is accepted
 * and ignored).  The pool holds max_entries + nr_cpus + 8 elements; the
 * extra ones let an update of an existing key build the new element and
 * swap it in (the kernel's semantics: a concurrent lookup copy sees the old
 * or the new value, never a mix).  Free elements are on two lock-free
 * Treiber stacks (tagged heads: no ABA), max_entries for inserts and the
 * extra ones for replacements, so -E2BIG is exact with no counter to
 * update (see "element pools").  Each bucket has a sequence lock: writers
 * take it, lookups do not write shared memory at all (read, then retry if
 * the sequence changed), so
 * concurrent lookups scale.  A chain is walked through indices that are
 * bounds-checked, so a torn read during a concurrent update is harmless.
 *
 * LRU hashes never fail with E2BIG: when full, an update evicts with the
 * CLOCK algorithm (an accessed bit per element, set by program lookups and
 * updates like the kernel's ref bit, cleared as the shared clock hand
 * passes; the first element found with the bit clear is evicted).  Like the
 * kernel, elements are reused: a program that keeps a value pointer from
 * lookup across a delete may see the element's next life.
 *
 * Differences from the kernel (besides being userspace):
 *   - map-in-map values are region offsets of inner maps in the same region
 *     (the kernel takes a map fd); the C update takes a u64 offset.
 *   - PROG_ARRAY values are program ids registered with hybrid_prog_register.
 *   - LPM_TRIE is a hash table per prefix length probed from the longest
 *     (same answers as the kernel's trie); keys are stored with the bits
 *     after the prefix cleared, and iteration order is unspecified.
 *     BPF_F_NO_PREALLOC is required, as by the kernel.
 *   - STACK_TRACE stores instruction pointers only (no BPF_F_STACK_BUILD_ID);
 *     hybrid_stackmap_store gets the already skipped trace.
 *   - PERF_EVENT_ARRAY's map_extra is the per-entry ring size (see ring.c).
 *   - LRU with BPF_F_NO_PREALLOC is -EINVAL (the kernel says -ENOTSUPP).
 *
 * Bridges: maps backed by a kernel map (created elsewhere with
 * bpf(BPF_MAP_CREATE); the header names it by `kernel_id`).  Every process
 * that maps a region calls hybrid_region_attach_bridges (Python's Region,
 * the agent's `region` command), which checks each kernel map's attributes
 * (BPF_OBJ_GET_INFO_BY_FD) against the header.
 *
 *   mmap mode (`bridge` 1): an ARRAY whose kernel map is BPF_F_MMAPABLE.
 *     The header is a normal ARRAY header at a page boundary; its storage
 *     (off_a = one page further: max_entries values of `stride` bytes, the
 *     kernel's mmap layout) is replaced in every process by an
 *     mmap(MAP_SHARED | MAP_FIXED) of the kernel map.  Nothing else changes:
 *     C, Python, the JIT's inlined lookups and direct value access
 *     (global data) read and write kernel memory at memory speed, and
 *     atomic operations on it are atomic against the kernel's programs too.
 *
 *   syscall mode (`bridge` 2): HASH, ARRAY, PERCPU_HASH, PERCPU_ARRAY,
 *     LRU_HASH, LRU_PERCPU_HASH, LPM_TRIE, QUEUE, STACK, BLOOM_FILTER.  The
 *     region holds the header only; every operation is a bpf() map command
 *     (raw system call, no libbpf) on this process's fd of the kernel map,
 *     opened with BPF_MAP_GET_FD_BY_ID and cached for the life of the
 *     process (a lock-free id -> fd table; hybrid_bridge_release drops it).
 *     The test is one predictable branch on `bridge`, in line 0 of the
 *     header next to `type`: maps of our own pay nothing else.
 *     From a program:
 *       - bpf_map_lookup_elem returns a pointer to a per-thread copy of the
 *         value (per-CPU maps: the current CPU's slot of the all-CPU value),
 *         with a snapshot taken at the lookup.  The same element looked up
 *         again in the same run gives the same pointer.
 *       - Writes through that pointer reach the kernel at the end of the
 *         run: hybrid_bridge_flush(), called after every program run by the
 *         engines and the agent, compares each copy with its snapshot and
 *         writes the changed ones back with BPF_MAP_UPDATE_ELEM(BPF_EXIST)
 *         (per-CPU maps: read all CPUs, replace this CPU's slot, write all).
 *         An element deleted meanwhile stays deleted: the write is dropped,
 *         as a program's write to a freed element is in the kernel.  So a
 *         write is *not* atomic against concurrent writers of the same key:
 *         `__sync_fetch_and_add` through such a pointer adds to the copy and
 *         the write-back overwrites what the other side wrote meanwhile.
 *         Give each side its own keys, or use bpf_map_update_elem, or an mmap
 *         array for counters both sides add to.
 *       - LPM_TRIE: the write-back uses the lookup key, so it only reaches
 *         an entry whose prefix is exactly that key (otherwise dropped).
 *       - bpf_map_update_elem on a per-CPU map sets the current CPU's value
 *         only (read all, set one, write all: not atomic either); deletes and
 *         updates by the same thread in the same run are seen by its earlier
 *         copies as in the kernel (arrays and per-CPU values: updated in
 *         place; hash elements: replaced, the old copy's writes dropped).
 *       - Copies live in a per-thread arena (256 KiB, mmap()ed on first use,
 *         recycled when the thread exits: no malloc, one initial-exec TLS
 *         pointer) with at most 16 lookups per run; past either limit a
 *         lookup returns NULL and counts in the map's `lost` counter, rather
 *         than reuse memory an earlier pointer still refers to.  A caller
 *         that runs programs without calling hybrid_bridge_flush() leaves
 *         its lookups pending and soon gets only NULLs.
 *     From C and Python (syscall semantics): lookup_copy, update, delete,
 *     next_key, push/pop/peek are the bpf() commands themselves; per-CPU
 *     values are one per possible CPU, so the region's nr_cpus must be the
 *     kernel's.  hybrid_map_count: arrays max_entries, hash maps count their
 *     keys by iterating them (a system call per key), queues, stacks and
 *     bloom filters 0.  Opening a kernel map by id needs CAP_SYS_ADMIN in
 *     every process that maps the region.
 */
#include "maps_impl.h"

#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

_Static_assert(offsetof(struct hybrid_map, mask) == 64, "line 0 of the map header is the hot config");
_Static_assert(offsetof(struct hybrid_map, bridge) < 64, "the bridge test reads line 0, as the hot paths do");
_Static_assert(sizeof(struct hybrid_region) == 64, "region header");
_Static_assert(sizeof(struct hybrid_ring) == HYBRID_RING_DATA_OFF, "ring header");

#define HDR_SIZE ((uint64_t)sizeof(struct hybrid_map))
#define NEG(e) ((uint64_t)(int64_t)(e))

/* ------------------------------------------------------------------------ */
/* type families                                                             */

static inline int is_hash(uint32_t t)
{
    return t == BPF_MAP_TYPE_HASH || t == BPF_MAP_TYPE_PERCPU_HASH || t == BPF_MAP_TYPE_LRU_HASH ||
           t == BPF_MAP_TYPE_LRU_PERCPU_HASH || t == BPF_MAP_TYPE_LPM_TRIE || t == BPF_MAP_TYPE_HASH_OF_MAPS;
}

static inline int is_lru(uint32_t t)
{
    return t == BPF_MAP_TYPE_LRU_HASH || t == BPF_MAP_TYPE_LRU_PERCPU_HASH;
}

static inline int is_percpu(uint32_t t)
{
    return t == BPF_MAP_TYPE_PERCPU_HASH || t == BPF_MAP_TYPE_LRU_PERCPU_HASH || t == BPF_MAP_TYPE_PERCPU_ARRAY;
}

static inline int is_fd_array(uint32_t t)
{
    return t == BPF_MAP_TYPE_PROG_ARRAY || t == BPF_MAP_TYPE_ARRAY_OF_MAPS || t == BPF_MAP_TYPE_PERF_EVENT_ARRAY;
}

static inline int is_array(uint32_t t)
{
    return t == BPF_MAP_TYPE_ARRAY || t == BPF_MAP_TYPE_PERCPU_ARRAY || is_fd_array(t);
}

/* ------------------------------------------------------------------------ */
/* layout                                                                    */

struct layout {
    uint64_t size, off_a, off_b, off_c, plane;
    uint32_t stride, mask, elem_size, nelems, aux;
};

static int check_flags(uint32_t flags, uint32_t allowed)
{
    return (flags & ~allowed) ? -EINVAL : 0;
}

static int layout_hash(uint32_t type, uint32_t ks, uint32_t vs, uint32_t max, uint32_t flags,
                       uint32_t ncpu, struct layout *L)
{
    uint32_t allowed = BPF_F_NO_PREALLOC | BPF_F_NUMA_NODE | BPF_F_ZERO_SEED | BPF_F_ACCESS_MASK;
    int pcpu = is_percpu(type);
    uint64_t nb, rk;

    if (is_lru(type)) {
        allowed = (allowed & ~BPF_F_NO_PREALLOC) | BPF_F_NO_COMMON_LRU;
    } else if (type == BPF_MAP_TYPE_LPM_TRIE) {
        allowed = BPF_F_NO_PREALLOC | BPF_F_NUMA_NODE | BPF_F_ACCESS_MASK;
        if (!(flags & BPF_F_NO_PREALLOC))
            return -EINVAL;
        if (ks < 4 + 1 || ks > 4 + HYBRID_LPM_DATA_MAX)
            return -EINVAL;
        L->aux = (ks - 4) * 8;
    } else if (type == BPF_MAP_TYPE_HASH_OF_MAPS) {
        if (vs != 4)
            return -EINVAL;
    }
    if (check_flags(flags, allowed))
        return -EINVAL;
    if (ks == 0 || vs == 0 || max == 0)
        return -EINVAL;
    if (ks > HYBRID_MAX_KEY_SIZE || vs > HYBRID_MAX_VALUE_SIZE || max > HYBRID_MAX_ENTRIES)
        return -E2BIG;
    if (pcpu && vs > HYBRID_MAX_PERCPU_VALUE_SIZE)
        return -E2BIG;
    nb = roundup_pow2(max);
    rk = round_up(ks, 8);
    L->stride = type == BPF_MAP_TYPE_HASH_OF_MAPS ? 8 : (uint32_t)round_up(vs, 8);
    L->mask = (uint32_t)(nb - 1);
    L->nelems = max + ncpu + 8;
    L->elem_size = (uint32_t)(sizeof(struct helem) + rk + (pcpu ? 0 : L->stride));
    L->off_a = HDR_SIZE;
    L->off_b = round_up(L->off_a + nb * sizeof(struct hbucket), CACHELINE);
    L->off_c = round_up(L->off_b + (uint64_t)L->nelems * L->elem_size, CACHELINE);
    L->size = L->off_c;
    if (pcpu) {
        L->plane = round_up((uint64_t)L->nelems * L->stride, CACHELINE);
        L->size += L->plane * ncpu;
    } else if (type == BPF_MAP_TYPE_LPM_TRIE) {
        L->size += round_up((L->aux + 1) * 4ull, 8);
    }
    return 0;
}

static int layout_own(uint32_t type, uint32_t ks, uint32_t vs, uint32_t max, uint32_t flags, uint64_t extra,
                      uint32_t ncpu, struct layout *L)
{
    memset(L, 0, sizeof(*L));
    if (ncpu == 0 || ncpu > 65536)
        return -EINVAL;
    if (extra && type != BPF_MAP_TYPE_BLOOM_FILTER && type != BPF_MAP_TYPE_PERF_EVENT_ARRAY)
        return -EINVAL;
    switch (type) {
    case BPF_MAP_TYPE_ARRAY:
    case BPF_MAP_TYPE_PERCPU_ARRAY:
        if (check_flags(flags, BPF_F_NUMA_NODE | BPF_F_ACCESS_MASK | BPF_F_PRESERVE_ELEMS | BPF_F_INNER_MAP |
                                   (type == BPF_MAP_TYPE_ARRAY ? BPF_F_MMAPABLE : 0)))
            return -EINVAL;
        if (ks != 4 || vs == 0 || max == 0)
            return -EINVAL;
        if (vs > HYBRID_MAX_VALUE_SIZE || max > HYBRID_MAX_ENTRIES ||
            (type == BPF_MAP_TYPE_PERCPU_ARRAY && vs > HYBRID_MAX_PERCPU_VALUE_SIZE))
            return -E2BIG;
        L->stride = (uint32_t)round_up(vs, 8);
        L->off_a = HDR_SIZE;
        if (type == BPF_MAP_TYPE_ARRAY) {
            L->size = L->off_a + (uint64_t)max * L->stride;
        } else {
            L->plane = round_up((uint64_t)max * L->stride, CACHELINE);
            L->size = L->off_a + L->plane * ncpu;
        }
        return 0;
    case BPF_MAP_TYPE_PROG_ARRAY:
    case BPF_MAP_TYPE_ARRAY_OF_MAPS:
        if (check_flags(flags, BPF_F_NUMA_NODE | BPF_F_ACCESS_MASK | BPF_F_INNER_MAP))
            return -EINVAL;
        if (ks != 4 || vs != 4 || max == 0)
            return -EINVAL;
        if (max > HYBRID_MAX_ENTRIES)
            return -E2BIG;
        L->stride = 8;
        L->off_a = HDR_SIZE;
        L->size = L->off_a + (uint64_t)max * 8;
        return 0;
    case BPF_MAP_TYPE_PERF_EVENT_ARRAY:
    case BPF_MAP_TYPE_RINGBUF:
        if (type == BPF_MAP_TYPE_PERF_EVENT_ARRAY &&
            check_flags(flags, BPF_F_NUMA_NODE | BPF_F_ACCESS_MASK | BPF_F_PRESERVE_ELEMS))
            return -EINVAL;
        if (type == BPF_MAP_TYPE_RINGBUF && check_flags(flags, BPF_F_NUMA_NODE))
            return -EINVAL;
        {
            struct hybrid_map tmp;
            int64_t size;

            memset(&tmp, 0, sizeof(tmp));
            if (type == BPF_MAP_TYPE_PERF_EVENT_ARRAY && (ks != 4 || vs != 4))
                return -EINVAL;
            if (type == BPF_MAP_TYPE_RINGBUF && (ks != 0 || vs != 0))
                return -EINVAL;
            size = hybrid_ring_layout(type, max, extra, &tmp);
            if (size < 0)
                return (int)size;
            L->size = (uint64_t)size;
            L->off_a = tmp.off_a;
            L->elem_size = tmp.elem_size;
            L->aux = tmp.aux;
            L->mask = tmp.mask;
            return 0;
        }
    case BPF_MAP_TYPE_STACK_TRACE:
        if (check_flags(flags, BPF_F_NUMA_NODE | BPF_F_ACCESS_MASK))
            return -EINVAL;
        if (ks != 4 || vs < 8 || vs % 8 || max == 0)
            return -EINVAL;
        if (vs / 8 > 1024 || max > HYBRID_MAX_ENTRIES)
            return -E2BIG;
        {
            uint64_t nb = roundup_pow2(max);

            L->mask = (uint32_t)(nb - 1);
            L->elem_size = (uint32_t)(sizeof(struct stackslot) + vs);
            L->off_a = HDR_SIZE;
            L->size = L->off_a + nb * L->elem_size;
        }
        return 0;
    case BPF_MAP_TYPE_QUEUE:
    case BPF_MAP_TYPE_STACK:
        if (check_flags(flags, BPF_F_NUMA_NODE | BPF_F_ACCESS_MASK))
            return -EINVAL;
        if (ks != 0 || vs == 0 || max == 0)
            return -EINVAL;
        if (vs > HYBRID_MAX_VALUE_SIZE || max > HYBRID_MAX_ENTRIES)
            return -E2BIG;
        L->stride = (uint32_t)round_up(vs, 8);
        L->off_a = HDR_SIZE;
        L->size = L->off_a + ((uint64_t)max + 1) * L->stride;
        return 0;
    case BPF_MAP_TYPE_BLOOM_FILTER: {
        uint64_t nr_hashes, nbits;

        if (check_flags(flags, BPF_F_NUMA_NODE | BPF_F_ZERO_SEED | BPF_F_ACCESS_MASK))
            return -EINVAL;
        if (ks != 0 || vs == 0 || max == 0 || (extra & ~0xfull))
            return -EINVAL;
        if (vs > HYBRID_MAX_VALUE_SIZE)
            return -E2BIG;
        nr_hashes = (extra & 0xf) ? (extra & 0xf) : 5;
        /* the kernel's sizing: n * k / ln 2, with 7/5 for 1/ln 2, at least 64 bits */
        nbits = (uint64_t)max * nr_hashes;
        nbits = nbits / 5 * 7;
        if (nbits > (1ull << 31))
            nbits = 1ull << 32;
        else if (nbits <= 64)
            nbits = 64;
        else
            nbits = roundup_pow2(nbits);
        L->aux = (uint32_t)nr_hashes;
        L->mask = (uint32_t)(nbits - 1);
        L->off_a = HDR_SIZE;
        L->size = L->off_a + nbits / 8;
        return 0;
    }
    default:
        if (is_hash(type))
            return layout_hash(type, ks, vs, max, flags, ncpu, L);
        return -EINVAL;
    }
}

static int bridge_syscall_type(uint32_t t)
{
    switch (t) {
    case BPF_MAP_TYPE_HASH:
    case BPF_MAP_TYPE_ARRAY:
    case BPF_MAP_TYPE_PERCPU_HASH:
    case BPF_MAP_TYPE_PERCPU_ARRAY:
    case BPF_MAP_TYPE_LRU_HASH:
    case BPF_MAP_TYPE_LRU_PERCPU_HASH:
    case BPF_MAP_TYPE_LPM_TRIE:
    case BPF_MAP_TYPE_QUEUE:
    case BPF_MAP_TYPE_STACK:
    case BPF_MAP_TYPE_BLOOM_FILTER:
        return 1;
    default:
        return 0;
    }
}

/* The layout of a map, bridged or not.  The attributes are checked as for a
 * map of our own (the kernel map must have been valid for the type too).
 *   mmap:    an ARRAY whose header starts a page; off_a is the next page and
 *            the storage is the kernel's mmap layout, whole pages, so that
 *            the overlay of the kernel map shares no page with anything.
 *   syscall: the header only; `stride` stays (per-CPU slot of a value copy). */
static int layout(uint32_t type, uint32_t ks, uint32_t vs, uint32_t max, uint32_t flags, uint64_t extra,
                  uint32_t ncpu, uint32_t bridge, struct layout *L)
{
    int err;

    if (bridge > HYBRID_BRIDGE_SYSCALL)
        return -EINVAL;
    if (bridge == HYBRID_BRIDGE_MMAP && type != BPF_MAP_TYPE_ARRAY)
        return -EOPNOTSUPP;
    if (bridge == HYBRID_BRIDGE_SYSCALL && !bridge_syscall_type(type))
        return -EOPNOTSUPP;
    err = layout_own(type, ks, vs, max, flags, extra, ncpu, L);
    if (err || bridge == HYBRID_BRIDGE_NONE)
        return err;
    if (bridge == HYBRID_BRIDGE_MMAP) {
        L->off_a = HYBRID_PAGE;
        L->size = HYBRID_PAGE + round_up((uint64_t)max * L->stride, HYBRID_PAGE);
    } else {
        uint32_t stride = (uint32_t)round_up(vs, 8);

        memset(L, 0, sizeof(*L));
        L->stride = stride;
        L->size = HDR_SIZE;
    }
    return 0;
}

int64_t hybrid_map_size(uint32_t type, uint32_t key_size, uint32_t value_size, uint32_t max_entries,
                        uint32_t map_flags, uint64_t map_extra, uint32_t nr_cpus, uint32_t bridge)
{
    struct layout L;
    int err = layout(type, key_size, value_size, max_entries, map_flags, map_extra, nr_cpus, bridge, &L);

    if (err)
        return err;
    return (int64_t)round_up(L.size, CACHELINE);
}

/* ------------------------------------------------------------------------ */
/* hash element access                                                       */

static inline struct hbucket *hbucket(const struct hybrid_map *m, uint32_t h)
{
    return (struct hbucket *)((char *)m + m->off_a) + (h & m->mask);
}

static inline struct helem *helem(const struct hybrid_map *m, uint32_t idx)
{
    return (struct helem *)((char *)m + m->off_b + (uint64_t)idx * m->elem_size);
}

static inline void *helem_value(const struct hybrid_map *m, struct helem *e)
{
    return e->key + (size_t)m->key_words * 8;
}

static inline void *pcpu_value(const struct hybrid_map *m, uint32_t idx, uint32_t cpu)
{
    return (char *)m + m->off_c + (uint64_t)cpu * m->plane + (uint64_t)idx * m->stride;
}

/*
 * The hash operations are written once with the key size as a parameter
 * (`ks`) and inlined (FORCE_INLINE) into one copy per common key size,
 * 4 and 8 bytes, where hashing, comparing and copying keys are a few
 * instructions, and one generic copy (ks = m->key_size); see HTAB_BY_KS.
 */
#define FORCE_INLINE inline __attribute__((always_inline))

static FORCE_INLINE uint32_t hash_key_ks(const struct hybrid_map *m, const void *key, uint32_t ks)
{
    if (ks == 4) {
        uint32_t k;

        memcpy(&k, key, 4);
        return hash_word(k, m->seed);
    }
    if (ks == 8) {
        uint64_t k;

        memcpy(&k, key, 8);
        return hash_word(k, m->seed);
    }
    return (uint32_t)hash_bytes(key, ks, m->seed);
}

static inline uint32_t hash_key(const struct hybrid_map *m, const void *key)
{
    return hash_key_ks(m, key, m->key_size);
}

/* Calls fn(args..., ks) with ks a constant for the common key sizes. */
#define HTAB_BY_KS(m, fn, ...)                                      \
    (likely((m)->key_size == 4) ? fn(__VA_ARGS__, 4)                \
     : (m)->key_size == 8 ? fn(__VA_ARGS__, 8) : fn(__VA_ARGS__, (m)->key_size))

/* memcpy for keys and values: the usual sizes without a libc call */
static FORCE_INLINE void copy_small(void *dst, const void *src, uint32_t n)
{
    if (n == 8) {
        uint64_t x;

        memcpy(&x, src, 8);
        memcpy(dst, &x, 8);
    } else if (n == 4) {
        uint32_t x;

        memcpy(&x, src, 4);
        memcpy(dst, &x, 4);
    } else {
        memcpy(dst, src, n);
    }
}

static FORCE_INLINE int key_eq(const void *a, const void *b, uint32_t ks)
{
    if (ks == 4) {
        uint32_t x, y;

        memcpy(&x, a, 4);
        memcpy(&y, b, 4);
        return x == y;
    }
    if (ks == 8) {
        uint64_t x, y;

        memcpy(&x, a, 8);
        memcpy(&y, b, 8);
        return x == y;
    }
    return memcmp(a, b, ks) == 0;
}

/* Bytes a hash element's value holds (map-in-map: the inner map's offset). */
static inline uint32_t stored_size(const struct hybrid_map *m)
{
    return m->type == BPF_MAP_TYPE_HASH_OF_MAPS ? 8 : m->value_size;
}

/* --- element pools: lock-free Treiber stacks with a 32-bit ABA tag ---------
 *
 * Free elements are in one of two pools.  `a.head` holds those an insert
 * takes: max_entries of them at first, so it holds max_entries minus the
 * number of live keys, and an insert that finds it empty is -E2BIG, exactly
 * (no separate counter to keep in step: one atomic less per insert and per
 * delete).  `a.spare` holds the nelems - max_entries others, in which an
 * update of an existing key builds the new value; the element it replaces
 * goes back to the pool the new one came from, so the live count and the
 * pools stay in step.  (The kernel's preallocated hash does the same with
 * its freelist and per-CPU extra elements.)
 *
 * A free element's `hash` is its depth in its stack (1 at the bottom):
 * hybrid_map_count reads the depth of the insert pool's top element. */

static FORCE_INLINE int64_t pool_pop(struct hybrid_map *m, uint64_t *top)
{
    uint64_t old = LOAD_ACQ(top), neu;
    uint32_t i, nxt;

    for (;;) {
        i = (uint32_t)old;
        if (i == 0 || i > m->nelems)
            return -1;
        nxt = LOAD(&helem(m, i - 1)->next);
        neu = (((old >> 32) + 1) << 32) | nxt;
        if (__atomic_compare_exchange_n(top, &old, neu, 1, __ATOMIC_ACQUIRE, __ATOMIC_ACQUIRE))
            break;
    }
    STORE(&helem(m, i - 1)->state, ELEM_ALLOC);
    return i - 1;
}

static FORCE_INLINE void pool_push(struct hybrid_map *m, uint64_t *top, uint32_t idx)
{
    struct helem *e = helem(m, idx);
    uint64_t old = LOAD_ACQ(top), neu;

    STORE(&e->state, ELEM_FREE);
    do {
        uint32_t t = (uint32_t)old;

        /* the depth read is stale only if `old` is, and then the exchange fails */
        STORE(&e->hash, (t && t <= m->nelems ? LOAD(&helem(m, t - 1)->hash) : 0) + 1);
        STORE(&e->next, t);
        neu = (((old >> 32) + 1) << 32) | (idx + 1);
    } while (!__atomic_compare_exchange_n(top, &old, neu, 1, __ATOMIC_RELEASE, __ATOMIC_ACQUIRE));
}

/* Live elements of a hash map: max_entries minus the insert pool's depth. */
static uint32_t htab_count(const struct hybrid_map *m)
{
    unsigned n = 0;

    for (;;) {
        uint64_t top = LOAD_ACQ(&m->a.head);
        uint32_t t = (uint32_t)top, depth = 0;

        if (t && t <= m->nelems)
            depth = LOAD(&helem(m, t - 1)->hash);
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        if (LOAD(&m->a.head) == top)
            return depth < m->max_entries ? m->max_entries - depth : 0;
        backoff(&n);
    }
}

/* --- chains ------------------------------------------------------------------ */

/* Walks a chain without the lock; the caller validates with the sequence. */
static FORCE_INLINE int64_t chain_find_ks(const struct hybrid_map *m, const struct hbucket *b, const void *key,
                                          uint32_t h, uint32_t ks)
{
    uint32_t i = LOAD(&b->head), steps = 0;

    while (i) {
        struct helem *e;

        if (unlikely(i > m->nelems || ++steps > m->nelems))
            return -1;
        e = helem(m, i - 1);
        if (LOAD(&e->hash) == h && key_eq(e->key, key, ks))
            return i - 1;
        i = LOAD(&e->next);
    }
    return -1;
}

static inline int64_t chain_find(const struct hybrid_map *m, const struct hbucket *b, const void *key, uint32_t h)
{
    return chain_find_ks(m, b, key, h, m->key_size);
}

/* Same, with the bucket locked; *link is the word that points at the match. */
static FORCE_INLINE int64_t chain_find_locked(const struct hybrid_map *m, struct hbucket *b, const void *key,
                                              uint32_t h, uint32_t **link, uint32_t ks)
{
    uint32_t *l = &b->head, i, steps = 0;

    while ((i = LOAD(l)) != 0) {
        struct helem *e;

        if (unlikely(i > m->nelems || ++steps > m->nelems))
            break;
        e = helem(m, i - 1);
        if (e->hash == h && key_eq(e->key, key, ks)) {
            *link = l;
            return i - 1;
        }
        l = &e->next;
    }
    *link = NULL;
    return -1;
}

enum { COPY_NONE, COPY_VALUE, COPY_PERCPU };

/* Finds key; with `out`, copies the value(s) inside the read section, so the
 * copy is a consistent snapshot.  Returns the element index or -1. */
static FORCE_INLINE int64_t htab_read_ks(const struct hybrid_map *m, const void *key, uint32_t h, void *out,
                                         int copy, uint32_t ks)
{
    const struct hbucket *b = hbucket(m, h);
    int64_t idx;
    uint32_t s;

    do {
        s = seq_read_begin(&b->seq);
        idx = chain_find_ks(m, b, key, h, ks);
        if (idx >= 0 && copy == COPY_VALUE) {
            memcpy(out, helem_value(m, helem(m, (uint32_t)idx)), stored_size(m));
        } else if (idx >= 0 && copy == COPY_PERCPU) {
            for (uint32_t c = 0; c < m->nr_cpus; c++)
                memcpy((char *)out + (size_t)c * m->stride, pcpu_value(m, (uint32_t)idx, c), m->stride);
        }
    } while (seq_read_retry(&b->seq, s));
    return idx;
}

static int64_t htab_read(const struct hybrid_map *m, const void *key, uint32_t h, void *out, int copy)
{
    return htab_read_ks(m, key, h, out, copy, m->key_size);
}

static FORCE_INLINE int64_t htab_find_ks(const struct hybrid_map *m, const void *key, uint32_t ks)
{
    return htab_read_ks(m, key, hash_key_ks(m, key, ks), NULL, COPY_NONE, ks);
}

/* The index of key's element, or -1. */
static int64_t htab_find(const struct hybrid_map *m, const void *key)
{
    return HTAB_BY_KS(m, htab_find_ks, m, key);
}

static void pcpu_store(struct hybrid_map *m, uint32_t idx, const void *value, int all_cpus, int fresh)
{
    if (all_cpus) {
        for (uint32_t c = 0; c < m->nr_cpus; c++)
            memcpy(pcpu_value(m, idx, c), (const char *)value + (size_t)c * m->stride, m->value_size);
        return;
    }
    uint32_t cur = cpu_slot(m->nr_cpus);

    if (fresh) {  /* a new element from a program: this CPU's value, zero elsewhere */
        for (uint32_t c = 0; c < m->nr_cpus; c++) {
            if (c == cur)
                continue;
            if (m->stride == 8)
                STORE((uint64_t *)pcpu_value(m, idx, c), 0);
            else
                memset(pcpu_value(m, idx, c), 0, m->stride);
        }
    }
    copy_small(pcpu_value(m, idx, cur), value, m->value_size);
}

/* --- LRU: CLOCK eviction ------------------------------------------------------ */

static int64_t lru_evict(struct hybrid_map *m)
{
    uint64_t limit = 2ull * m->nelems + 64;

    for (uint64_t tries = 0; tries < limit; tries++) {
        uint32_t idx = (uint32_t)(__atomic_fetch_add(&m->s.hand, 1, __ATOMIC_RELAXED) % m->nelems);
        struct helem *e = helem(m, idx);
        struct hbucket *b;
        uint32_t *l, i, held, steps = 0;

        if (LOAD(&e->state) != ELEM_LIVE)
            continue;
        if (LOAD(&e->ref) && tries < m->nelems) {
            STORE(&e->ref, 0);
            continue;
        }
        b = hbucket(m, LOAD(&e->hash));
        held = seq_write_lock(&b->seq);
        for (l = &b->head; (i = LOAD(l)) != 0 && i <= m->nelems && ++steps <= m->nelems; l = &helem(m, i - 1)->next) {
            if (i == idx + 1) {
                STORE(l, LOAD(&e->next));
                STORE(&e->state, ELEM_ALLOC);
                seq_write_unlock(&b->seq, held);
                return idx;
            }
        }
        seq_write_unlock(&b->seq, held);
    }
    return -1;
}

/* An element for an LRU insert (of the insert pool's share); evicts when the map is full. */
static int64_t lru_alloc(struct hybrid_map *m)
{
    for (int attempt = 0; attempt < 8; attempt++) {
        int64_t idx = pool_pop(m, &m->a.head);

        if (idx >= 0)
            return idx;
        idx = lru_evict(m);
        if (idx >= 0)
            return idx;
        sched_yield();
    }
    return -1;
}

/* --- hash operations ---------------------------------------------------------- */

/* Returns 1 when a new element was inserted, 0 when an existing one was
 * updated, or -errno.
 *
 * An insert takes its element from the insert pool, a replacement from the
 * spare pool; the element replaced goes back to the pool the new one came
 * from.  LRU maps get their element before taking the bucket lock, because
 * eviction locks another bucket.  When the key already exists (checked
 * first, without the lock) a spare element is used, so that replacing a
 * value in a full LRU map never evicts another key. */
static FORCE_INLINE long htab_update_ks(struct hybrid_map *m, const void *key, const void *value, uint64_t flags,
                                        int all_cpus, uint32_t ks)
{
    const int lru = is_lru(m->type), pcpu = is_percpu(m->type);
    uint32_t h, held, *link;
    struct hbucket *b;
    struct helem *e;
    int64_t nw = -1, old;
    uint64_t *pool = NULL;  /* the pool nw came from */
    long err = 0;

    if (flags > BPF_EXIST)
        return -EINVAL;
    h = hash_key_ks(m, key, ks);
    b = hbucket(m, h);
    if (lru) {
        int64_t found = htab_read_ks(m, key, h, NULL, COPY_NONE, ks);

        /* fail early rather than evict for nothing */
        if (found >= 0 && flags == BPF_NOEXIST)
            return -EEXIST;
        if (found < 0 && flags == BPF_EXIST)
            return -ENOENT;
        pool = &m->a.spare;
        if (found < 0 || (nw = pool_pop(m, pool)) < 0) {
            pool = &m->a.head;
            nw = lru_alloc(m);
            if (nw < 0)
                return -ENOMEM;
        }
    }
relock:
    held = seq_write_lock(&b->seq);
    old = chain_find_locked(m, b, key, h, &link, ks);
    if (old >= 0 && flags == BPF_NOEXIST)
        err = -EEXIST;
    else if (old < 0 && flags == BPF_EXIST)
        err = -ENOENT;
    if (err)
        goto out_unlock;
    if (old >= 0 && pcpu) {  /* per-CPU values are updated in place, as by the kernel */
        pcpu_store(m, (uint32_t)old, value, all_cpus, 0);
        if (lru)
            STORE(&helem(m, (uint32_t)old)->ref, 1);
        goto out_unlock;
    }
    if (lru && old < 0 && pool == &m->a.spare) {  /* the key went away meanwhile: now it is an insert */
        int64_t ins = pool_pop(m, &m->a.head);

        pool_push(m, pool, (uint32_t)nw);
        pool = &m->a.head;
        nw = ins;
        if (ins < 0) {  /* full: evict, which locks another bucket */
            seq_write_unlock(&b->seq, held);
            nw = lru_alloc(m);
            if (nw < 0)
                return -ENOMEM;
            goto relock;
        }
    }
    if (nw < 0) {
        if (old < 0) {
            pool = &m->a.head;
            nw = pool_pop(m, pool);
            if (nw < 0) {
                err = m->type == BPF_MAP_TYPE_LPM_TRIE ? -ENOSPC : -E2BIG;
                goto out_unlock;
            }
        } else {
            pool = &m->a.spare;
            nw = pool_pop(m, pool);
            if (nw < 0) {  /* all spare elements in use by concurrent updates: copy in place */
                memcpy(helem_value(m, helem(m, (uint32_t)old)), value, stored_size(m));
                goto out_unlock;
            }
        }
    }
    e = helem(m, (uint32_t)nw);
    copy_small(e->key, key, ks);
    STORE(&e->hash, h);
    STORE(&e->ref, old >= 0 ? 1u : 0u);
    if (pcpu)
        pcpu_store(m, (uint32_t)nw, value, all_cpus, 1);
    else
        copy_small(helem_value(m, e), value, stored_size(m));
    if (old >= 0) {
        STORE(&e->next, LOAD(&helem(m, (uint32_t)old)->next));
        STORE(link, (uint32_t)nw + 1);
        STORE(&helem(m, (uint32_t)old)->state, ELEM_ALLOC);
    } else {
        STORE(&e->next, LOAD(&b->head));
        STORE(&b->head, (uint32_t)nw + 1);
    }
    STORE(&e->state, ELEM_LIVE);
    seq_write_unlock(&b->seq, held);
    if (old >= 0) {
        pool_push(m, pool, (uint32_t)old);
        return 0;
    }
    return 1;

out_unlock:
    seq_write_unlock(&b->seq, held);
    if (nw >= 0)
        pool_push(m, pool, (uint32_t)nw);
    return err;
}

static long htab_update(struct hybrid_map *m, const void *key, const void *value, uint64_t flags, int all_cpus)
{
    return HTAB_BY_KS(m, htab_update_ks, m, key, value, flags, all_cpus);
}

static FORCE_INLINE long htab_delete_ks(struct hybrid_map *m, const void *key, uint32_t ks)
{
    uint32_t h = hash_key_ks(m, key, ks), held, *link;
    struct hbucket *b = hbucket(m, h);
    int64_t old;

    held = seq_write_lock(&b->seq);
    old = chain_find_locked(m, b, key, h, &link, ks);
    if (old < 0) {
        seq_write_unlock(&b->seq, held);
        return -ENOENT;
    }
    STORE(link, LOAD(&helem(m, (uint32_t)old)->next));
    STORE(&helem(m, (uint32_t)old)->state, ELEM_ALLOC);
    seq_write_unlock(&b->seq, held);
    pool_push(m, &m->a.head, (uint32_t)old);
    return 0;
}

static long htab_delete(struct hybrid_map *m, const void *key)
{
    return HTAB_BY_KS(m, htab_delete_ks, m, key);
}

/* Kernel iteration: the key after `key`, or the first key when `key` is NULL
 * or absent; -ENOENT after the last. */
static int htab_next_key(struct hybrid_map *m, const void *key, void *next_key)
{
    unsigned char tmp[HYBRID_MAX_KEY_SIZE];
    uint32_t nb = m->mask + 1, start = 0, s, i;

    if (key) {
        uint32_t h = hash_key(m, key);
        const struct hbucket *b = hbucket(m, h);
        int64_t idx;
        uint32_t nx = 0;

        do {
            s = seq_read_begin(&b->seq);
            nx = 0;
            idx = chain_find(m, b, key, h);
            if (idx >= 0) {
                nx = LOAD(&helem(m, (uint32_t)idx)->next);
                if (nx > m->nelems)
                    nx = 0;
                if (nx)
                    memcpy(tmp, helem(m, nx - 1)->key, m->key_size);
            }
        } while (seq_read_retry(&b->seq, s));
        if (idx >= 0 && nx) {
            memcpy(next_key, tmp, m->key_size);
            return 0;
        }
        if (idx >= 0)
            start = (h & m->mask) + 1;
    }
    for (uint32_t bi = start; bi < nb; bi++) {
        const struct hbucket *b = (const struct hbucket *)((char *)m + m->off_a) + bi;

        if (LOAD(&b->head) == 0)
            continue;
        do {
            s = seq_read_begin(&b->seq);
            i = LOAD(&b->head);
            if (i > m->nelems)
                i = 0;
            if (i)
                memcpy(tmp, helem(m, i - 1)->key, m->key_size);
        } while (seq_read_retry(&b->seq, s));
        if (i) {
            memcpy(next_key, tmp, m->key_size);
            return 0;
        }
    }
    return -ENOENT;
}

/* ------------------------------------------------------------------------ */
/* LPM trie: one hash table keyed by (prefixlen, masked data), probed from  */
/* the longest prefix length present                                         */

static inline uint32_t *lpm_counts(const struct hybrid_map *m)
{
    return (uint32_t *)((char *)m + m->off_c);
}

/* Writes the canonical key of `key` cut to `plen` bits into out. */
static void lpm_canon(const struct hybrid_map *m, const void *key, uint32_t plen, unsigned char *out)
{
    uint32_t n = m->key_size - 4, full = plen / 8, rem = plen % 8;

    memcpy(out, &plen, 4);
    memcpy(out + 4, (const unsigned char *)key + 4, n);
    if (full < n) {
        out[4 + full] &= rem ? (unsigned char)(0xff << (8 - rem)) : 0;
        memset(out + 4 + full + 1, 0, n - full - 1);
    }
}

static int64_t lpm_find(const struct hybrid_map *m, const void *key, void *out)
{
    unsigned char buf[4 + HYBRID_LPM_DATA_MAX];
    const uint32_t *counts = lpm_counts(m);
    uint32_t plen;

    memcpy(&plen, key, 4);
    if (plen > m->aux)
        plen = m->aux;
    lpm_canon(m, key, plen, buf);
    for (uint32_t l = plen;; l--) {
        if (LOAD(&counts[l])) {
            int64_t idx;

            memcpy(buf, &l, 4);
            idx = htab_read(m, buf, hash_key(m, buf), out, out ? COPY_VALUE : COPY_NONE);
            if (idx >= 0)
                return idx;
        }
        if (l == 0)
            return -1;
        buf[4 + (l - 1) / 8] &= (unsigned char)~(0x80u >> ((l - 1) % 8));
    }
}

static long lpm_update(struct hybrid_map *m, const void *key, const void *value, uint64_t flags)
{
    unsigned char buf[4 + HYBRID_LPM_DATA_MAX];
    uint32_t plen;
    long r;

    memcpy(&plen, key, 4);
    if (plen > m->aux)
        return -EINVAL;
    lpm_canon(m, key, plen, buf);
    r = htab_update(m, buf, value, flags, 0);
    if (r == 1)
        __atomic_fetch_add(&lpm_counts(m)[plen], 1, __ATOMIC_RELEASE);
    return r < 0 ? r : 0;
}

static long lpm_delete(struct hybrid_map *m, const void *key)
{
    unsigned char buf[4 + HYBRID_LPM_DATA_MAX];
    uint32_t plen;
    long r;

    memcpy(&plen, key, 4);
    if (plen > m->aux)
        return -EINVAL;
    lpm_canon(m, key, plen, buf);
    r = htab_delete(m, buf);
    if (r == 0)
        __atomic_fetch_sub(&lpm_counts(m)[plen], 1, __ATOMIC_RELEASE);
    return r;
}

static int lpm_next_key(struct hybrid_map *m, const void *key, void *next_key)
{
    unsigned char buf[4 + HYBRID_LPM_DATA_MAX];
    uint32_t plen;

    if (key) {
        memcpy(&plen, key, 4);
        if (plen <= m->aux) {
            lpm_canon(m, key, plen, buf);
            return htab_next_key(m, buf, next_key);
        }
    }
    return htab_next_key(m, NULL, next_key);
}

/* ------------------------------------------------------------------------ */
/* arrays                                                                    */

static inline void *array_slot(const struct hybrid_map *m, uint32_t idx)
{
    return (char *)m + m->off_a + (uint64_t)idx * m->stride;
}

static inline uint32_t key_u32(const void *key)
{
    uint32_t i;

    memcpy(&i, key, 4);
    return i;
}

static int array_next_key(const struct hybrid_map *m, const void *key, void *next_key)
{
    uint32_t i = key ? key_u32(key) : UINT32_MAX, next;

    if (!key || i >= m->max_entries)
        next = 0;
    else if (i == m->max_entries - 1)
        return -ENOENT;
    else
        next = i + 1;
    memcpy(next_key, &next, 4);
    return 0;
}

/* ------------------------------------------------------------------------ */
/* map in map                                                                */

/* The map at region offset `off` in m's region, or NULL when there is none. */
static struct hybrid_map *map_at_offset(const struct hybrid_map *m, uint64_t off)
{
    char *base = region_base(m);
    const struct hybrid_region *r = (const struct hybrid_region *)base;
    struct hybrid_map *in;

    if (off < sizeof(struct hybrid_region) || off % CACHELINE || off > r->size || r->size - off < HDR_SIZE)
        return NULL;
    in = (struct hybrid_map *)(base + off);
    if (memcmp(in->magic, HYBRID_MAP_MAGIC, 8) != 0 || in->self_off != off)
        return NULL;
    return in;
}

static long inner_check(const struct hybrid_map *m, uint64_t off)
{
    const struct hybrid_map *in = map_at_offset(m, off);

    if (!in)
        return -EBADF;
    if (in->type == BPF_MAP_TYPE_PROG_ARRAY || in->type == BPF_MAP_TYPE_ARRAY_OF_MAPS ||
        in->type == BPF_MAP_TYPE_HASH_OF_MAPS)
        return -EINVAL;
    if (m->inner_type == 0)
        return 0;
    if (in->type != m->inner_type || in->key_size != m->inner_key_size ||
        in->value_size != m->inner_value_size || in->map_flags != m->inner_flags)
        return -EINVAL;
    if (is_array(in->type) && !(m->inner_flags & BPF_F_INNER_MAP) && in->max_entries != m->inner_max_entries)
        return -EINVAL;
    return 0;
}

static inline void *inner_ptr(const struct hybrid_map *m, uint64_t off)
{
    return off ? region_base(m) + off : NULL;
}

/* ------------------------------------------------------------------------ */
/* program registry for tail calls (process-local: entry points are        */
/* addresses in this process)                                                */

#define PROG_CHUNK 1024u
#define PROG_CHUNKS 1024u

static void **prog_chunks[PROG_CHUNKS];

int hybrid_prog_register(uint32_t id, void *entry)
{
    void **chunk, **fresh;

    if (id >= PROG_CHUNK * PROG_CHUNKS)
        return -E2BIG;
    chunk = LOAD_ACQ(&prog_chunks[id / PROG_CHUNK]);
    if (!chunk) {
        fresh = calloc(PROG_CHUNK, sizeof(void *));
        if (!fresh)
            return -ENOMEM;
        if (__atomic_compare_exchange_n(&prog_chunks[id / PROG_CHUNK], &chunk, fresh, 0, __ATOMIC_ACQ_REL,
                                        __ATOMIC_ACQUIRE))
            chunk = fresh;
        else
            free(fresh);
    }
    STORE_REL(&chunk[id % PROG_CHUNK], entry);
    return 0;
}

/* Tail calls.  A tail call runs the target on the native stack and the
 * caller returns its result at once, so a chain of tail calls is a chain of
 * nested calls: the depth per thread is bounded like the kernel's
 * MAX_TAIL_CALL_CNT, and a program that tail-calls itself ends instead of
 * overflowing the stack. */
#define MAX_TAIL_CALL_CNT 33
static HYBRID_TLS uint32_t tail_call_depth;

void *hybrid_tail_call_target(struct hybrid_map *m, uint32_t index)
{
    if (tail_call_depth >= MAX_TAIL_CALL_CNT)
        return NULL;
    return hybrid_prog_array_get(m, index);
}

uint64_t hybrid_tail_call_run(void *entry, void *ctx)
{
    uint64_t r;

    tail_call_depth++;
    r = ((uint64_t(*)(void *, uint64_t))entry)(ctx, 0);
    tail_call_depth--;
    return r;
}

void *hybrid_prog_array_get(struct hybrid_map *m, uint32_t index)
{
    uint64_t slot;
    void **chunk;
    uint32_t id;

    if (unlikely(m->type != BPF_MAP_TYPE_PROG_ARRAY) || index >= m->max_entries)
        return NULL;
    slot = LOAD_ACQ((uint64_t *)array_slot(m, index));
    if (!slot || slot - 1 >= PROG_CHUNK * PROG_CHUNKS)
        return NULL;
    id = (uint32_t)(slot - 1);
    chunk = LOAD_ACQ(&prog_chunks[id / PROG_CHUNK]);
    return chunk ? LOAD_ACQ(&chunk[id % PROG_CHUNK]) : NULL;
}

/* ------------------------------------------------------------------------ */
/* stack traces                                                              */

static inline struct stackslot *stack_slot(const struct hybrid_map *m, uint32_t id)
{
    return (struct stackslot *)((char *)m + m->off_a + (uint64_t)id * m->elem_size);
}

long hybrid_stackmap_store(struct hybrid_map *m, const uint64_t *ips, uint32_t nr, uint64_t flags)
{
    uint32_t max_depth, h, id, held;
    struct stackslot *s;
    long ret;

    if (m->type != BPF_MAP_TYPE_STACK_TRACE)
        return -EINVAL;
    if (flags & ~(BPF_F_SKIP_FIELD_MASK | BPF_F_USER_STACK | BPF_F_FAST_STACK_CMP | BPF_F_REUSE_STACKID))
        return -EINVAL;
    if (nr == 0 || !ips)
        return -EFAULT;
    max_depth = m->value_size / 8;
    if (nr > max_depth)
        nr = max_depth;
    h = (uint32_t)hash_bytes(ips, nr * 8, m->seed);
    id = h & m->mask;
    s = stack_slot(m, id);
    held = seq_write_lock(&s->seq);
    if (s->nr) {
        int same_hash = s->hash == h;

        if (same_hash && (flags & BPF_F_FAST_STACK_CMP)) {
            ret = id;
            goto out;
        }
        if (same_hash && s->nr == nr && memcmp(s->ips, ips, (size_t)nr * 8) == 0) {
            ret = id;
            goto out;
        }
        if (!(flags & BPF_F_REUSE_STACKID)) {
            ret = -EEXIST;
            goto out;
        }
    }
    memcpy(s->ips, ips, (size_t)nr * 8);
    s->hash = h;
    STORE(&s->nr, nr);
    ret = id;
out:
    seq_write_unlock(&s->seq, held);
    return ret;
}

static long stack_lookup_copy(struct hybrid_map *m, uint32_t id, void *value)
{
    struct stackslot *s;
    uint32_t seq, nr;

    if (id > m->mask)
        return -ENOENT;
    s = stack_slot(m, id);
    do {
        seq = seq_read_begin(&s->seq);
        nr = LOAD(&s->nr);
        if (nr > m->value_size / 8)
            nr = 0;
        if (nr) {
            memcpy(value, s->ips, (size_t)nr * 8);
            memset((char *)value + (size_t)nr * 8, 0, m->value_size - (size_t)nr * 8);
        }
    } while (seq_read_retry(&s->seq, seq));
    return nr ? 0 : -ENOENT;
}

static long stack_delete(struct hybrid_map *m, uint32_t id)
{
    struct stackslot *s;
    uint32_t held;
    long ret = 0;

    if (id > m->mask)
        return -ENOENT;
    s = stack_slot(m, id);
    held = seq_write_lock(&s->seq);
    if (s->nr == 0)
        ret = -ENOENT;
    STORE(&s->nr, 0);
    seq_write_unlock(&s->seq, held);
    return ret;
}

static int stack_next_key(struct hybrid_map *m, const void *key, void *next_key)
{
    uint32_t id = 0;

    if (key) {
        id = key_u32(key);
        if (id > m->mask || LOAD(&stack_slot(m, id)->nr) == 0)
            id = 0;
        else
            id++;
    }
    for (; id <= m->mask; id++) {
        if (LOAD(&stack_slot(m, id)->nr)) {
            memcpy(next_key, &id, 4);
            return 0;
        }
    }
    return -ENOENT;
}

/* ------------------------------------------------------------------------ */
/* queue and stack (the kernel's circular buffer of max_entries + 1 slots)   */

static inline void *qs_slot(const struct hybrid_map *m, uint32_t i)
{
    return (char *)m + m->off_a + (uint64_t)i * m->stride;
}

static long qs_push(struct hybrid_map *m, const void *value, uint64_t flags)
{
    uint32_t size = m->max_entries + 1, head, tail;

    if ((flags & BPF_NOEXIST) || flags > BPF_EXIST)
        return -EINVAL;
    spin_lock(&m->a.lock);
    head = m->a.qhead;
    tail = m->a.qtail;
    if (unlikely(head >= size || tail >= size))  /* corrupted: reset */
        head = tail = 0;
    if ((head + 1) % size == tail) {
        if (!(flags & BPF_EXIST)) {
            spin_unlock(&m->a.lock);
            return -E2BIG;
        }
        tail = (tail + 1) % size;  /* overwrite the oldest */
    }
    memcpy(qs_slot(m, head), value, m->value_size);
    m->a.qhead = (head + 1) % size;
    m->a.qtail = tail;
    spin_unlock(&m->a.lock);
    return 0;
}

static long qs_pop(struct hybrid_map *m, void *value, int remove)
{
    uint32_t size = m->max_entries + 1, head, tail, i;

    spin_lock(&m->a.lock);
    head = m->a.qhead;
    tail = m->a.qtail;
    if (head == tail || head >= size || tail >= size) {
        spin_unlock(&m->a.lock);
        return -ENOENT;
    }
    if (m->type == BPF_MAP_TYPE_QUEUE) {
        i = tail;
        if (remove)
            m->a.qtail = (tail + 1) % size;
    } else {
        i = head ? head - 1 : size - 1;
        if (remove)
            m->a.qhead = i;
    }
    memcpy(value, qs_slot(m, i), m->value_size);
    spin_unlock(&m->a.lock);
    return 0;
}

/* ------------------------------------------------------------------------ */
/* bloom filter                                                              */

static long bloom_op(struct hybrid_map *m, const void *value, int add)
{
    uint64_t h = hash_bytes(value, m->value_size, m->seed);
    uint32_t h1 = (uint32_t)h, h2 = (uint32_t)(h >> 32) | 1;
    uint64_t *bits = (uint64_t *)((char *)m + m->off_a);

    for (uint32_t i = 0; i < m->aux; i++) {
        uint32_t bit = (h1 + i * h2) & m->mask;
        uint64_t word = 1ull << (bit % 64), *w = &bits[bit / 64];

        if (LOAD(w) & word)
            continue;
        if (!add)
            return -ENOENT;
        __atomic_fetch_or(w, word, __ATOMIC_RELAXED);
    }
    return 0;
}

/* ------------------------------------------------------------------------ */
/* regions                                                                   */

void *hybrid_shm_map(int fd, uint64_t size, int populate, uint64_t hint)
{
    /* `hint` is only a hint: the kernel takes it when the range is free. */
    void *p = mmap((void *)(uintptr_t)hint, size, PROT_READ | PROT_WRITE,
                   MAP_SHARED | (populate ? MAP_POPULATE : 0), fd, 0);

    return p == MAP_FAILED ? NULL : p;
}

int hybrid_shm_unmap(void *addr, uint64_t size)
{
    return munmap(addr, size) == 0 ? 0 : -errno;
}

uint64_t hybrid_region_header_size(uint32_t nr_maps)
{
    return round_up(sizeof(struct hybrid_region) + (uint64_t)nr_maps * 8, CACHELINE);
}

int hybrid_region_init(void *base, uint64_t size, uint32_t nr_maps, uint32_t nr_cpus)
{
    struct hybrid_region *r = base;
    uint64_t hs = hybrid_region_header_size(nr_maps);

    if (size < hs || nr_cpus == 0)
        return -EINVAL;
    memset(r, 0, hs);
    r->version = HYBRID_LAYOUT_VERSION;
    r->nr_maps = nr_maps;
    r->size = size;
    r->nr_cpus = nr_cpus;
    r->hdr_size = (uint32_t)hs;
    return 0;
}

int hybrid_region_set_map(void *base, uint32_t index, uint64_t off)
{
    struct hybrid_region *r = base;

    if (index >= r->nr_maps || off < r->hdr_size || off % CACHELINE || off >= r->size)
        return -EINVAL;
    r->map_off[index] = off;
    return 0;
}

void hybrid_region_publish(void *base)
{
    struct hybrid_region *r = base;
    uint64_t magic;

    memcpy(&magic, HYBRID_REGION_MAGIC, 8);
    __atomic_store_n((uint64_t *)r->magic, magic, __ATOMIC_RELEASE);
}

/* The header's layout is the one its attributes give: nothing in a region
 * opened from a file can point C code outside the map. */
static int layout_matches(const struct hybrid_map *m)
{
    struct layout L;

    if (layout(m->type, m->key_size, m->value_size, m->max_entries, m->map_flags, m->map_extra, m->nr_cpus,
               m->bridge, &L))
        return 0;
    if ((m->bridge != HYBRID_BRIDGE_NONE) != (m->kernel_id != 0))
        return 0;
    if (m->bridge == HYBRID_BRIDGE_MMAP && m->self_off % HYBRID_PAGE)
        return 0;
    return L.off_a == m->off_a && L.off_b == m->off_b && L.off_c == m->off_c && L.plane == m->plane &&
           L.stride == m->stride && L.mask == m->mask && L.elem_size == m->elem_size && L.nelems == m->nelems &&
           L.aux == m->aux && round_up(L.size, CACHELINE) == m->size &&
           m->key_words == round_up(m->key_size, 8) / 8;
}

int64_t hybrid_region_check(const void *base, uint64_t size)
{
    const struct hybrid_region *r = base;
    uint64_t magic, want;

    if (size < sizeof(*r))
        return -EINVAL;
    memcpy(&want, HYBRID_REGION_MAGIC, 8);
    magic = __atomic_load_n((const uint64_t *)r->magic, __ATOMIC_ACQUIRE);
    if (magic != want)
        return magic == 0 ? -EAGAIN : -EINVAL;  /* 0: still being initialised */
    if (r->version != HYBRID_LAYOUT_VERSION)
        return -EPROTO;
    if (r->size > size || r->hdr_size < hybrid_region_header_size(r->nr_maps) || r->hdr_size > r->size)
        return -EINVAL;
    for (uint32_t i = 0; i < r->nr_maps; i++) {
        uint64_t off = r->map_off[i];
        const struct hybrid_map *m;

        if (off < r->hdr_size || off % CACHELINE || off > r->size || r->size - off < HDR_SIZE)
            return -EINVAL;
        m = (const struct hybrid_map *)((const char *)base + off);
        if (memcmp(m->magic, HYBRID_MAP_MAGIC, 8) != 0 || m->self_off != off || m->size > r->size - off ||
            m->version != HYBRID_LAYOUT_VERSION || !layout_matches(m))
            return -EINVAL;
    }
    return r->nr_maps;
}

struct hybrid_map *hybrid_region_map(void *base, uint32_t index)
{
    struct hybrid_region *r = base;

    return index < r->nr_maps ? (struct hybrid_map *)((char *)base + r->map_off[index]) : NULL;
}

uint32_t hybrid_region_nr_cpus(const void *base)
{
    return ((const struct hybrid_region *)base)->nr_cpus;
}

/* ------------------------------------------------------------------------ */
/* creation                                                                  */

int hybrid_map_init(void *at, uint64_t self_off, uint32_t type, uint32_t key_size, uint32_t value_size,
                    uint32_t max_entries, uint32_t map_flags, uint64_t map_extra, uint32_t nr_cpus,
                    uint32_t id, const char *name, uint32_t bridge, uint32_t kernel_id)
{
    struct hybrid_map *m = at;
    struct layout L;
    int err;

    if (((uintptr_t)at % CACHELINE) || (self_off % CACHELINE))
        return -EINVAL;
    if ((bridge != HYBRID_BRIDGE_NONE) != (kernel_id != 0))
        return -EINVAL;
    if (bridge == HYBRID_BRIDGE_MMAP && (((uintptr_t)at % HYBRID_PAGE) || (self_off % HYBRID_PAGE)))
        return -EINVAL;
    err = layout(type, key_size, value_size, max_entries, map_flags, map_extra, nr_cpus, bridge, &L);
    if (err)
        return err;
    /* a bridged map's storage (mmap) is the kernel's: its pages here are never touched */
    memset(m, 0, bridge ? HDR_SIZE : round_up(L.size, CACHELINE));
    m->off_a = (uint32_t)L.off_a;
    m->bridge = bridge;
    m->kernel_id = kernel_id;
    m->off_b = L.off_b;
    m->off_c = L.off_c;
    m->plane = L.plane;
    m->type = type;
    m->key_size = key_size;
    m->value_size = value_size;
    m->max_entries = max_entries;
    m->stride = L.stride;
    m->nr_cpus = nr_cpus;
    m->mask = L.mask;
    m->elem_size = L.elem_size;
    m->nelems = L.nelems;
    m->aux = L.aux;
    m->self_off = self_off;
    m->size = round_up(L.size, CACHELINE);
    m->map_extra = map_extra;
    m->version = HYBRID_LAYOUT_VERSION;
    m->id = id;
    m->map_flags = map_flags;
    m->key_words = (uint32_t)(round_up(key_size, 8) / 8);
    if (name)
        strncpy(m->name, name, sizeof(m->name) - 1);
    /* stack ids hash with a fixed seed, as the kernel's stackmap (jhash2(ips, n, 0)) does:
     * the same stacks get the same ids in every run */
    if (type != BPF_MAP_TYPE_STACK_TRACE && !(map_flags & BPF_F_ZERO_SEED) && getrandom(&m->seed, sizeof(m->seed), GRND_NONBLOCK) != sizeof(m->seed))
        m->seed = (uint64_t)time(NULL) * 0x9e3779b97f4a7c15ull ^ (uintptr_t)at;
    if (is_hash(type) && bridge == HYBRID_BRIDGE_NONE) {
        /* the pools: elements 0..max_entries-1 for inserts, the rest spare, each
         * popped in index order; a free element's hash is its depth */
        for (uint32_t i = 0; i < m->nelems; i++) {
            uint32_t end = i < max_entries ? max_entries : m->nelems;

            helem(m, i)->next = i + 1 < end ? i + 2 : 0;
            helem(m, i)->hash = end - i;
        }
        m->a.head = 1;
        m->a.spare = (uint64_t)max_entries + 1;
    }
    if (type == BPF_MAP_TYPE_RINGBUF || type == BPF_MAP_TYPE_PERF_EVENT_ARRAY) {
        m->off_a = L.off_a;
        hybrid_ring_init(m);
    }
    __atomic_thread_fence(__ATOMIC_RELEASE);
    memcpy(m->magic, HYBRID_MAP_MAGIC, 8);
    return 0;
}

int hybrid_map_set_inner(struct hybrid_map *m, uint32_t type, uint32_t key_size, uint32_t value_size,
                         uint32_t max_entries, uint32_t map_flags)
{
    if (m->type != BPF_MAP_TYPE_ARRAY_OF_MAPS && m->type != BPF_MAP_TYPE_HASH_OF_MAPS)
        return -EINVAL;
    if (type == BPF_MAP_TYPE_PROG_ARRAY || type == BPF_MAP_TYPE_ARRAY_OF_MAPS || type == BPF_MAP_TYPE_HASH_OF_MAPS)
        return -EINVAL;
    m->inner_type = type;
    m->inner_key_size = key_size;
    m->inner_value_size = value_size;
    m->inner_max_entries = max_entries;
    m->inner_flags = map_flags;
    return 0;
}

int hybrid_map_describe(const struct hybrid_map *m, struct hybrid_map_desc *out)
{
    if (memcmp(m->magic, HYBRID_MAP_MAGIC, 8) != 0)
        return -EINVAL;
    memset(out, 0, sizeof(*out));
    out->type = m->type;
    out->key_size = m->key_size;
    out->value_size = m->value_size;
    out->max_entries = m->max_entries;
    out->map_flags = m->map_flags;
    out->nr_cpus = m->nr_cpus;
    out->id = m->id;
    out->inner_type = m->inner_type;
    out->inner_key_size = m->inner_key_size;
    out->inner_value_size = m->inner_value_size;
    out->inner_max_entries = m->inner_max_entries;
    out->inner_flags = m->inner_flags;
    out->kernel_id = m->kernel_id;
    out->bridge = m->bridge;
    out->map_extra = m->map_extra;
    out->size = m->size;
    out->self_off = m->self_off;
    memcpy(out->name, m->name, sizeof(out->name));
    out->name[sizeof(out->name) - 1] = 0;
    return 0;
}

/* ------------------------------------------------------------------------ */
/* bridges: maps backed by a kernel map (semantics in the file comment)      */

/* bpf(2) commands and attributes (include/uapi/linux/bpf.h).  A stable ABI,
 * spelled out here so that the build does not depend on the host's headers. */
enum {
    CMD_MAP_LOOKUP_ELEM = 1,
    CMD_MAP_UPDATE_ELEM = 2,
    CMD_MAP_DELETE_ELEM = 3,
    CMD_MAP_GET_NEXT_KEY = 4,
    CMD_MAP_GET_FD_BY_ID = 14,
    CMD_OBJ_GET_INFO_BY_FD = 15,
    CMD_MAP_LOOKUP_AND_DELETE_ELEM = 21,
};

struct bpf_elem_attr {          /* BPF_MAP_*_ELEM, BPF_MAP_GET_NEXT_KEY */
    uint32_t map_fd, _pad;
    uint64_t key, value;        /* value: next_key for GET_NEXT_KEY */
    uint64_t flags;
};

struct bpf_id_attr {            /* BPF_MAP_GET_FD_BY_ID */
    uint32_t id, next_id, open_flags;
};

struct bpf_info_attr {          /* BPF_OBJ_GET_INFO_BY_FD */
    uint32_t bpf_fd, info_len;
    uint64_t info;
};

struct bpf_map_info_v {         /* struct bpf_map_info up to map_extra */
    uint32_t type, id, key_size, value_size, max_entries, map_flags;
    char name[16];
    uint32_t ifindex, btf_vmlinux_value_type_id;
    uint64_t netns_dev, netns_ino;
    uint32_t btf_id, btf_key_type_id, btf_value_type_id, _pad;
    uint64_t map_extra;
};

#ifndef __NR_bpf
#if defined(__x86_64__)
#define __NR_bpf 321
#elif defined(__aarch64__)
#define __NR_bpf 280
#endif
#endif

static inline long sys_bpf(int cmd, void *attr, uint32_t size)
{
    return hybrid_raw_syscall(__NR_bpf, cmd, (long)(uintptr_t)attr, size, 0, 0, 0);
}

static inline void sys_close(int fd)
{
    hybrid_raw_syscall(SYS_close, fd, 0, 0, 0, 0, 0);
}

/* The test on the hot paths: `bridge` is in line 0 of the header, read anyway; the work of a
 * bridged map is out of line, so maps of our own keep their code as it was. */
#define BRIDGE_SLOW __attribute__((noinline, cold))

static inline int is_syscall_bridge(const struct hybrid_map *m)
{
    return m->bridge == HYBRID_BRIDGE_SYSCALL;
}

static const char *bridge_type_name(uint32_t t)
{
    static const char *const names[] = {
        [BPF_MAP_TYPE_HASH] = "hash", [BPF_MAP_TYPE_ARRAY] = "array", [BPF_MAP_TYPE_PROG_ARRAY] = "prog_array",
        [BPF_MAP_TYPE_PERF_EVENT_ARRAY] = "perf_event_array", [BPF_MAP_TYPE_PERCPU_HASH] = "percpu_hash",
        [BPF_MAP_TYPE_PERCPU_ARRAY] = "percpu_array", [BPF_MAP_TYPE_STACK_TRACE] = "stack_trace",
        [BPF_MAP_TYPE_LRU_HASH] = "lru_hash", [BPF_MAP_TYPE_LRU_PERCPU_HASH] = "lru_percpu_hash",
        [BPF_MAP_TYPE_LPM_TRIE] = "lpm_trie", [BPF_MAP_TYPE_ARRAY_OF_MAPS] = "array_of_maps",
        [BPF_MAP_TYPE_HASH_OF_MAPS] = "hash_of_maps", [BPF_MAP_TYPE_QUEUE] = "queue",
        [BPF_MAP_TYPE_STACK] = "stack", [BPF_MAP_TYPE_RINGBUF] = "ringbuf",
        [BPF_MAP_TYPE_BLOOM_FILTER] = "bloom_filter",
    };

    return t < sizeof(names) / sizeof(names[0]) && names[t] ? names[t] : "map of another type";
}

/* --- the process's fds of kernel maps ----------------------------------------
 *
 * id -> fd, opened once per process with BPF_MAP_GET_FD_BY_ID.  An entry is
 * one 64-bit word (id << 32 | fd) installed with a compare-and-swap, so
 * readers take no lock; open addressing from a hash of the id, probing
 * until an empty word.  Released entries become tombstones (reused by
 * later inserts).  When the table is full an operation opens and closes a
 * fd of its own (slow, still correct).  A cached fd holds a reference: the
 * kernel map lives at least as long as this process keeps it cached
 * (hybrid_bridge_release drops it). */
#define BRIDGE_FDS 256u
#define FD_TOMB UINT64_MAX

static uint64_t bridge_fds[BRIDGE_FDS];

static int bridge_open(uint32_t id)
{
    struct bpf_id_attr attr;

    memset(&attr, 0, sizeof(attr));
    attr.id = id;
    return (int)sys_bpf(CMD_MAP_GET_FD_BY_ID, &attr, sizeof(attr));
}

static inline uint32_t fd_slot(uint32_t id, uint32_t n)
{
    return ((id * 0x9e3779b1u) >> 24) + n;  /* % BRIDGE_FDS by the caller */
}

/* The fd of kernel map `id`, or -errno; *tmp: close it after use (table full). */
static int bridge_fd(uint32_t id, int *tmp)
{
    uint64_t e, mine;
    int fd;

    *tmp = 0;
    for (uint32_t n = 0; n < BRIDGE_FDS; n++) {
        e = LOAD_ACQ(&bridge_fds[fd_slot(id, n) % BRIDGE_FDS]);
        if (e == 0)
            break;
        if (e != FD_TOMB && (uint32_t)(e >> 32) == id)
            return (int)(uint32_t)e;
    }
    fd = bridge_open(id);
    if (fd < 0)
        return fd;
    mine = (uint64_t)id << 32 | (uint32_t)fd;
    for (uint32_t n = 0; n < BRIDGE_FDS; n++) {
        uint64_t *slot = &bridge_fds[fd_slot(id, n) % BRIDGE_FDS];

        e = LOAD_ACQ(slot);
        while (e == 0 || e == FD_TOMB) {
            if (__atomic_compare_exchange_n(slot, &e, mine, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
                return fd;
        }
        if ((uint32_t)(e >> 32) == id) {  /* another thread was first */
            sys_close(fd);
            return (int)(uint32_t)e;
        }
    }
    *tmp = 1;
    return fd;
}

int hybrid_bridge_release(uint32_t kernel_id)
{
    int n = 0;

    if (kernel_id == 0)
        return -EINVAL;
    for (uint32_t i = 0; i < BRIDGE_FDS; i++) {
        uint64_t e = LOAD_ACQ(&bridge_fds[i]);

        if (e != 0 && e != FD_TOMB && (uint32_t)(e >> 32) == kernel_id &&
            __atomic_compare_exchange_n(&bridge_fds[i], &e, FD_TOMB, 0, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED)) {
            sys_close((int)(uint32_t)e);
            n++;
        }
    }
    return n;
}

/* One map command on kernel map m->kernel_id.  `value` is the value, or
 * the next key for GET_NEXT_KEY.  Returns 0 or -errno. */
static BRIDGE_SLOW long bridge_cmd(const struct hybrid_map *m, int cmd, const void *key, void *value, uint64_t flags)
{
    struct bpf_elem_attr attr;
    int tmp, fd = bridge_fd(m->kernel_id, &tmp);
    long r;

    if (fd < 0)
        return fd;
    memset(&attr, 0, sizeof(attr));
    attr.map_fd = (uint32_t)fd;
    attr.key = (uintptr_t)key;
    attr.value = (uintptr_t)value;
    attr.flags = flags;
    r = sys_bpf(cmd, &attr, sizeof(attr));
    if (tmp)
        sys_close(fd);
    return r < 0 ? r : 0;
}

/* The kernel's number of possible CPUs (the number of values of a per-CPU
 * map in bpf()), read once when the library is loaded. */
static uint32_t bridge_ncpus;

static uint32_t read_possible_cpus(void)
{
    char buf[256];
    long fd = hybrid_raw_syscall(SYS_openat, AT_FDCWD, (long)(uintptr_t)"/sys/devices/system/cpu/possible",
                          O_RDONLY | O_CLOEXEC, 0, 0, 0);
    long n;
    uint32_t top = 0, cur = 0;
    int digits = 0;

    if (fd < 0)
        return 0;
    n = hybrid_raw_syscall(SYS_read, fd, (long)(uintptr_t)buf, sizeof(buf) - 1, 0, 0, 0);
    sys_close((int)fd);
    if (n <= 0)
        return 0;
    /* "0-3,8-11": the highest number + 1 */
    for (long i = 0; i <= n; i++) {
        char c = i < n ? buf[i] : ',';

        if (c >= '0' && c <= '9') {
            cur = cur * 10 + (uint32_t)(c - '0');
            digits = 1;
        } else {
            if (digits && cur + 1 > top)
                top = cur + 1;
            cur = 0;
            digits = 0;
        }
    }
    return top;
}

/* --- per-thread lookup copies --------------------------------------------------
 *
 * Each thread gets an arena, mmap()ed on its first lookup of a bridged map
 * (no malloc: the agent runs programs inside arbitrary code) and recycled
 * when the thread exits.  It holds the pending list of the current run and
 * the bytes handed out, bump-allocated and only reset by the flush at the
 * end of the run: a pointer given out stays valid for the whole run.  The
 * only thread-local is one pointer, with bit 0 set while lookups are
 * pending, so that the flush after a run that did none is a load and a
 * branch. */
#define BRIDGE_ARENA_SIZE (256u * 1024)
#define BRIDGE_PENDING 16u
#define BRIDGE_NO_CPU UINT32_MAX
#define BRIDGE_CUR_CPU (UINT32_MAX - 1)   /* bridge_lookup: the current CPU's slot */

struct bridge_pending {
    struct hybrid_map *m;
    uint32_t key, value, snap;  /* offsets in the arena's data */
    uint32_t cpu;               /* per-CPU maps: the slot of the copy; else BRIDGE_NO_CPU */
    uint32_t dead;              /* deleted or replaced by this thread meanwhile: no write-back */
    uint32_t _pad;
};

struct bridge_arena {
    struct bridge_arena *next;  /* every arena of the process (recycling) */
    uint32_t busy;              /* owned by a live thread */
    uint32_t npending;
    uint64_t used;              /* bytes of data handed out in this run */
    struct bridge_pending pending[BRIDGE_PENDING];
};

#define ARENA_DATA_OFF round_up(sizeof(struct bridge_arena), CACHELINE)
#define ARENA_CAP (BRIDGE_ARENA_SIZE - ARENA_DATA_OFF)

HYBRID_TLS uintptr_t hybrid_bridge_tls;   /* this thread's arena | 1 while lookups are pending (maps.h) */
static struct bridge_arena *all_arenas;
static pthread_key_t arena_key;
static int arena_key_ok;

static inline unsigned char *arena_data(struct bridge_arena *a)
{
    return (unsigned char *)a + ARENA_DATA_OFF;
}

static void arena_release(void *p)
{
    struct bridge_arena *a = p;

    if ((struct bridge_arena *)(hybrid_bridge_tls & ~(uintptr_t)1) == a)
        hybrid_bridge_tls = 0;
    a->npending = 0;  /* a thread that exits in the middle of a run: its writes are dropped */
    a->used = 0;
    STORE_REL(&a->busy, 0);
}

__attribute__((constructor)) static void bridge_init(void)
{
    bridge_ncpus = read_possible_cpus();
    arena_key_ok = pthread_key_create(&arena_key, arena_release) == 0;
}

static struct bridge_arena *arena_get(void)
{
    uintptr_t v = hybrid_bridge_tls;
    struct bridge_arena *a, *head;
    long p;

    if (likely(v))
        return (struct bridge_arena *)(v & ~(uintptr_t)1);
    for (a = LOAD_ACQ(&all_arenas); a; a = a->next) {
        uint32_t zero = 0;

        if (LOAD(&a->busy) == 0 &&
            __atomic_compare_exchange_n(&a->busy, &zero, 1, 0, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED))
            goto got;
    }
    p = hybrid_raw_syscall(SYS_mmap, 0, BRIDGE_ARENA_SIZE, PROT_READ | PROT_WRITE,
                    MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p < 0 && p > -4096)
        return NULL;
    a = (struct bridge_arena *)(uintptr_t)p;
    a->busy = 1;
    head = LOAD_ACQ(&all_arenas);
    do {
        a->next = head;
    } while (!__atomic_compare_exchange_n(&all_arenas, &head, a, 1, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE));
got:
    a->npending = 0;
    a->used = 0;
    hybrid_bridge_tls = (uintptr_t)a;
    if (arena_key_ok)
        pthread_setspecific(arena_key, a);
    return a;
}

void *hybrid_bridge_arena(uint64_t *size)
{
    struct bridge_arena *a = (struct bridge_arena *)(hybrid_bridge_tls & ~(uintptr_t)1);

    if (size)
        *size = a ? ARENA_CAP : 0;
    return a ? arena_data(a) : NULL;
}

static inline void bridge_lost(struct hybrid_map *m)
{
    __atomic_fetch_add(&m->s.lost, 1, __ATOMIC_RELAXED);
}

/* Per-CPU maps: the region's CPU count must be the kernel's (bpf() moves one
 * value per possible CPU); checked when the map is attached, and again here
 * since the header is shared memory. */
static inline int pcpu_ok(const struct hybrid_map *m)
{
    return likely(m->nr_cpus == bridge_ncpus && m->stride >= m->value_size && m->stride % 8 == 0);
}

/* bpf_map_lookup_elem / bpf_map_lookup_percpu_elem on a bridged map: a
 * pointer to this thread's copy of the value (of CPU slot `cpu` for per-CPU
 * maps, BRIDGE_CUR_CPU: the current one), written back at the end of the run
 * if the program changed it. */
static BRIDGE_SLOW void *bridge_lookup(struct hybrid_map *m, const void *key, uint32_t cpu)
{
    const int pcpu = is_percpu(m->type);
    uint32_t ks = m->key_size, vs = m->value_size, stride = m->stride, rk;
    uint64_t buf, need;
    struct bridge_arena *a;
    struct bridge_pending *p;
    unsigned char *d, *kp, *vp;
    long r;

    switch (m->type) {
    case BPF_MAP_TYPE_HASH:
    case BPF_MAP_TYPE_ARRAY:
    case BPF_MAP_TYPE_LRU_HASH:
    case BPF_MAP_TYPE_LPM_TRIE:
    case BPF_MAP_TYPE_PERCPU_HASH:
    case BPF_MAP_TYPE_PERCPU_ARRAY:
    case BPF_MAP_TYPE_LRU_PERCPU_HASH:
        break;
    default:
        return NULL;  /* no lookup for queues, stacks, bloom filters */
    }
    if (unlikely(ks == 0 || ks > HYBRID_MAX_KEY_SIZE || vs == 0 || stride < vs || stride > ARENA_CAP))
        return NULL;
    if (pcpu) {
        if (unlikely(!pcpu_ok(m)))
            return NULL;
        if (cpu == BRIDGE_CUR_CPU)
            cpu = cpu_slot(m->nr_cpus);
        if (unlikely(cpu >= m->nr_cpus))
            return NULL;
    } else {
        cpu = BRIDGE_NO_CPU;
    }
    a = arena_get();
    if (unlikely(!a))
        goto lost;
    d = arena_data(a);
    /* the same element looked up again in this run: the same pointer, as in the kernel */
    if (hybrid_bridge_tls & 1) {
        for (uint32_t i = 0; i < a->npending && i < BRIDGE_PENDING; i++) {
            p = &a->pending[i];
            if (p->m == m && p->cpu == cpu && !p->dead && p->key + (uint64_t)ks <= ARENA_CAP &&
                p->value + (uint64_t)stride <= ARENA_CAP && key_eq(d + p->key, key, ks))
                return d + p->value;
        }
    }
    if (a->npending >= BRIDGE_PENDING)
        goto lost;
    rk = (uint32_t)round_up(ks, 8);
    buf = pcpu ? (uint64_t)m->nr_cpus * stride : stride;  /* what bpf() writes */
    need = rk + (buf > 2ull * stride ? buf : 2ull * stride);
    if (a->used > ARENA_CAP || need > ARENA_CAP - a->used)
        goto lost;
    kp = d + a->used;
    vp = kp + rk;
    memcpy(kp, key, ks);
    r = bridge_cmd(m, CMD_MAP_LOOKUP_ELEM, kp, vp, 0);
    if (r == -ENOENT)
        return NULL;
    if (r < 0)
        goto lost;
    if (pcpu && cpu)
        memmove(vp, vp + (size_t)cpu * stride, stride);
    memcpy(vp + stride, vp, vs);  /* the snapshot the flush compares with */
    p = &a->pending[a->npending];
    p->m = m;
    p->key = (uint32_t)(kp - d);
    p->value = (uint32_t)(vp - d);
    p->snap = p->value + stride;
    p->cpu = cpu;
    p->dead = 0;
    a->used += rk + 2ull * stride;
    a->npending++;
    hybrid_bridge_tls = (uintptr_t)a | 1;
    return vp;
lost:
    bridge_lost(m);
    return NULL;
}

/* Writes `value` as CPU slot `cpu` of key's per-CPU value: reads every
 * CPU's value, replaces one, writes them all (not atomic against other
 * writers of the key).  A missing key gets zeros on the other CPUs. */
static long bridge_pcpu_set(struct hybrid_map *m, const void *key, uint32_t cpu, const void *value, uint64_t flags)
{
    uint64_t buf = (uint64_t)m->nr_cpus * m->stride;
    struct bridge_arena *a;
    unsigned char *s;
    long r;

    if (!pcpu_ok(m) || cpu >= m->nr_cpus)
        return -EINVAL;
    a = arena_get();
    if (!a)
        return -ENOMEM;
    if (a->used > ARENA_CAP || buf > ARENA_CAP - a->used)
        return -E2BIG;
    s = arena_data(a) + a->used;  /* scratch after the copies handed out */
    r = bridge_cmd(m, CMD_MAP_LOOKUP_ELEM, key, s, 0);
    if (r == -ENOENT) {
        if (flags == BPF_EXIST)
            return -ENOENT;
        memset(s, 0, buf);
    } else if (r < 0) {
        return r;
    }
    memcpy(s + (size_t)cpu * m->stride, value, m->value_size);
    return bridge_cmd(m, CMD_MAP_UPDATE_ELEM, key, s, flags);
}

static inline int updates_in_place(uint32_t t)
{
    return t == BPF_MAP_TYPE_ARRAY || t == BPF_MAP_TYPE_PERCPU_ARRAY || t == BPF_MAP_TYPE_PERCPU_HASH ||
           t == BPF_MAP_TYPE_LRU_PERCPU_HASH;
}

/* This thread updated (values != NULL) or deleted `key`: its pending copies
 * follow the kernel.  Arrays and per-CPU values are updated in place there
 * (a pointer from an earlier lookup sees the new value); hash elements are
 * replaced or freed (writes through an earlier pointer go nowhere).
 * `all`: values holds every CPU's value; else it is CPU slot `cpu`'s. */
static void bridge_note(struct hybrid_map *m, const void *key, const void *values, int all, uint32_t cpu)
{
    struct bridge_arena *a;
    unsigned char *d;

    if (likely(!(hybrid_bridge_tls & 1)))
        return;
    a = (struct bridge_arena *)(hybrid_bridge_tls & ~(uintptr_t)1);
    d = arena_data(a);
    for (uint32_t i = 0; i < a->npending && i < BRIDGE_PENDING; i++) {
        struct bridge_pending *p = &a->pending[i];
        const unsigned char *v;

        if (p->m != m || p->dead || p->key + (uint64_t)m->key_size > ARENA_CAP ||
            !key_eq(d + p->key, key, m->key_size))
            continue;
        if (!values || !updates_in_place(m->type)) {
            p->dead = 1;
            continue;
        }
        if (p->cpu == BRIDGE_NO_CPU)
            v = values;
        else if (all)
            v = (const unsigned char *)values + (size_t)p->cpu * m->stride;
        else if (p->cpu == cpu)
            v = values;
        else
            continue;
        if (p->value + (uint64_t)m->stride > ARENA_CAP || p->snap + (uint64_t)m->value_size > ARENA_CAP)
            continue;
        memcpy(d + p->value, v, m->value_size);
        memcpy(d + p->snap, v, m->value_size);
    }
}

static void bridge_flush_slow(struct bridge_arena *a)
{
    unsigned char *d = arena_data(a);
    uint32_t n = a->npending < BRIDGE_PENDING ? a->npending : BRIDGE_PENDING;

    for (uint32_t i = 0; i < n; i++) {
        struct bridge_pending *p = &a->pending[i];
        struct hybrid_map *m = p->m;
        uint32_t vs;
        long r;

        if (p->dead || !m)
            continue;
        vs = m->value_size;
        if (p->key + (uint64_t)m->key_size > ARENA_CAP || p->value + (uint64_t)vs > ARENA_CAP ||
            p->snap + (uint64_t)vs > ARENA_CAP)
            continue;
        if (memcmp(d + p->value, d + p->snap, vs) == 0)
            continue;
        /* BPF_EXIST: an element deleted meanwhile stays deleted (the write is dropped, as
         * a program's write to a freed element is in the kernel) */
        if (p->cpu == BRIDGE_NO_CPU)
            r = bridge_cmd(m, CMD_MAP_UPDATE_ELEM, d + p->key, d + p->value, BPF_EXIST);
        else
            r = bridge_pcpu_set(m, d + p->key, p->cpu, d + p->value, BPF_EXIST);
        if (r < 0 && r != -ENOENT)
            bridge_lost(m);
    }
    a->npending = 0;
    a->used = 0;
    hybrid_bridge_tls = (uintptr_t)a;
}

void hybrid_bridge_flush(void)
{
    uintptr_t v = hybrid_bridge_tls;

    if (likely(!(v & 1)))
        return;
    bridge_flush_slow((struct bridge_arena *)(v & ~(uintptr_t)1));
}

/* --- operations on syscall-mode maps ---------------------------------------- */

static inline const void *bridge_key(const struct hybrid_map *m, const void *key)
{
    return m->key_size ? key : NULL;  /* queue, stack, bloom filter: no key */
}

static BRIDGE_SLOW long bridge_lookup_copy(struct hybrid_map *m, const void *key, void *value)
{
    if (m->type == BPF_MAP_TYPE_BLOOM_FILTER)
        return -EINVAL;  /* as for our own bloom filters: peek tests a value */
    if (is_percpu(m->type) && !pcpu_ok(m))
        return -EINVAL;
    return bridge_cmd(m, CMD_MAP_LOOKUP_ELEM, bridge_key(m, key), value, 0);  /* queue, stack: peek */
}

static BRIDGE_SLOW long bridge_update(struct hybrid_map *m, const void *key, const void *value, uint64_t flags,
                                      int all_cpus)
{
    long r;

    if (m->type == BPF_MAP_TYPE_QUEUE || m->type == BPF_MAP_TYPE_STACK || m->type == BPF_MAP_TYPE_BLOOM_FILTER)
        return hybrid_map_push(m, value, flags);
    if (is_percpu(m->type) && !all_cpus) {  /* a program's update: the current CPU's value only */
        uint32_t cpu = pcpu_ok(m) ? cpu_slot(m->nr_cpus) : 0;

        r = bridge_pcpu_set(m, key, cpu, value, flags);
        if (r == 0)
            bridge_note(m, key, value, 0, cpu);
        return r;
    }
    if (is_percpu(m->type) && !pcpu_ok(m))
        return -EINVAL;
    r = bridge_cmd(m, CMD_MAP_UPDATE_ELEM, key, (void *)value, flags);
    if (r == 0)
        bridge_note(m, key, value, all_cpus, BRIDGE_NO_CPU);
    return r;
}

static BRIDGE_SLOW long bridge_delete(struct hybrid_map *m, const void *key)
{
    long r = bridge_cmd(m, CMD_MAP_DELETE_ELEM, bridge_key(m, key), NULL, 0);

    if (r == 0)
        bridge_note(m, key, NULL, 0, BRIDGE_NO_CPU);
    return r;
}

/* Counted by iterating the keys (a system call per key; a snapshot only
 * when nothing changes meanwhile).  Queues, stacks and bloom filters: 0 (the
 * kernel does not say how many values they hold). */
static BRIDGE_SLOW uint64_t bridge_count(const struct hybrid_map *m)
{
    unsigned char k[2][HYBRID_MAX_KEY_SIZE];
    uint64_t n = 0, limit;
    int cur = 0;

    if (m->type == BPF_MAP_TYPE_ARRAY || m->type == BPF_MAP_TYPE_PERCPU_ARRAY)
        return m->max_entries;
    if (!is_hash(m->type) || m->key_size == 0 || m->key_size > HYBRID_MAX_KEY_SIZE)
        return 0;
    limit = 2ull * m->max_entries + 16;  /* a key deleted under the walk restarts it */
    if (bridge_cmd(m, CMD_MAP_GET_NEXT_KEY, NULL, k[cur], 0) != 0)
        return 0;
    for (n = 1; n < limit; n++) {
        if (bridge_cmd(m, CMD_MAP_GET_NEXT_KEY, k[cur], k[cur ^ 1], 0) != 0)
            break;
        cur ^= 1;
    }
    return n < m->max_entries ? n : m->max_entries;
}

/* --- attaching: every process that maps a region ------------------------------- */

#define BERR(...) do { if (err && errlen) snprintf(err, errlen, __VA_ARGS__); } while (0)

int hybrid_map_attach_bridge(struct hybrid_map *m, char *err, size_t errlen)
{
    struct bpf_map_info_v info;
    struct bpf_info_attr attr;
    uint32_t id = m->kernel_id;
    int fd, tmp;
    long r;

    if (err && errlen)
        err[0] = 0;
    if (m->bridge == HYBRID_BRIDGE_NONE)
        return 0;
    if (m->bridge > HYBRID_BRIDGE_SYSCALL || id == 0) {
        BERR("corrupt bridge (mode %u, kernel map id %u)", m->bridge, id);
        return -EINVAL;
    }
    fd = bridge_open(id);
    if (fd < 0) {
        if (fd == -ENOENT)
            BERR("kernel map id %u does not exist", id);
        else if (fd == -EPERM || fd == -EACCES)
            BERR("no permission to open kernel map id %u (BPF_MAP_GET_FD_BY_ID needs CAP_SYS_ADMIN)", id);
        else
            BERR("cannot open kernel map id %u: %s", id, strerror(-fd));
        return fd;
    }
    memset(&info, 0, sizeof(info));
    memset(&attr, 0, sizeof(attr));
    attr.bpf_fd = (uint32_t)fd;
    attr.info_len = sizeof(info);
    attr.info = (uintptr_t)&info;
    r = sys_bpf(CMD_OBJ_GET_INFO_BY_FD, &attr, sizeof(attr));
    if (r < 0) {
        BERR("cannot read the attributes of kernel map id %u: %s", id, strerror((int)-r));
        goto fail;
    }
    r = -EINVAL;
    if (info.type != m->type) {
        BERR("kernel map id %u is of type %s, this map is of type %s", id, bridge_type_name(info.type),
             bridge_type_name(m->type));
        goto fail;
    }
    if (info.key_size != m->key_size || info.value_size != m->value_size || info.max_entries != m->max_entries) {
        BERR("kernel map id %u has key_size %u, value_size %u, max_entries %u; this map has %u, %u, %u", id,
             info.key_size, info.value_size, info.max_entries, m->key_size, m->value_size, m->max_entries);
        goto fail;
    }
    if (m->bridge == HYBRID_BRIDGE_MMAP) {
        uint64_t len = round_up((uint64_t)m->max_entries * m->stride, HYBRID_PAGE);
        char *at = (char *)m + m->off_a;
        void *p;

        if (!(info.map_flags & BPF_F_MMAPABLE)) {
            BERR("kernel map id %u is not BPF_F_MMAPABLE (mmap mode needs it; use the syscall mode)", id);
            goto fail;
        }
        if (m->off_a != HYBRID_PAGE || (uintptr_t)at % HYBRID_PAGE || m->size < m->off_a + len) {
            BERR("corrupt layout for an mmap bridge");
            goto fail;
        }
        p = mmap(at, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fd, 0);
        if (p == MAP_FAILED && (errno == EPERM || errno == EACCES)) {
            /* A frozen map (libbpf freezes .rodata after load) or one programs may only read can only
             * be mapped read-only.  Map it so, and make writes from this side fail with EPERM (the
             * kernel's answer to an update of a frozen map) instead of faulting: the flag is the
             * same in every process, since freezing is a property of the kernel map. */
            p = mmap(at, len, PROT_READ, MAP_SHARED | MAP_FIXED, fd, 0);
            if (p != MAP_FAILED)
                __atomic_or_fetch(&m->map_flags, BPF_F_RDONLY, __ATOMIC_RELAXED);
            else
                errno = EPERM;
        }
        if (p == MAP_FAILED) {
            r = -errno;
            BERR("cannot mmap kernel map id %u: %s%s", id, strerror((int)-r),
                 r == -EPERM || r == -EACCES ? " (frozen or read-only maps cannot be mapped writable)" : "");
            goto fail;
        }
        sys_close(fd);
        return 0;
    }
    if (is_percpu(m->type) && m->nr_cpus != bridge_ncpus) {
        BERR("the region has %u CPU slots, the kernel %u possible CPUs", m->nr_cpus, bridge_ncpus);
        goto fail;
    }
    sys_close(fd);
    fd = bridge_fd(id, &tmp);  /* cache this process's fd now: no open on a program's path */
    if (fd >= 0 && tmp)
        sys_close(fd);
    return 0;
fail:
    sys_close(fd);
    return (int)r;
}

int hybrid_region_attach_bridges(void *base, uint64_t size, char *err, size_t errlen)
{
    const struct hybrid_region *r = base;
    uint64_t magic, want;
    int64_t n;
    int attached = 0;

    if (err && errlen)
        err[0] = 0;
    if (size < sizeof(*r))
        return 0;
    memcpy(&want, HYBRID_REGION_MAGIC, 8);
    magic = __atomic_load_n((const uint64_t *)r->magic, __ATOMIC_ACQUIRE);
    if (magic != want)
        return 0;  /* not (yet) a region: it has no bridges */
    n = hybrid_region_check(base, size);
    if (n < 0) {
        BERR(n == -EPROTO ? "region layout version %u, this library has %u" : "corrupt region (%u/%u)",
             r->version, (unsigned)HYBRID_LAYOUT_VERSION);
        return (int)n;
    }
    for (uint32_t i = 0; i < (uint32_t)n; i++) {
        struct hybrid_map *m = hybrid_region_map(base, i);
        char msg[256];
        int rc;

        if (m->bridge == HYBRID_BRIDGE_NONE)
            continue;
        rc = hybrid_map_attach_bridge(m, msg, sizeof(msg));
        if (rc < 0) {
            BERR("map '%.63s': %s", m->name, msg);
            return rc;
        }
        attached++;
    }
    return attached;
}

uint64_t hybrid_map_count(const struct hybrid_map *m)
{
    if (unlikely(is_syscall_bridge(m)))
        return bridge_count(m);
    if (is_hash(m->type))
        return htab_count(m);
    if (m->type == BPF_MAP_TYPE_QUEUE || m->type == BPF_MAP_TYPE_STACK) {
        uint32_t size = m->max_entries + 1, head = LOAD(&m->a.qhead), tail = LOAD(&m->a.qtail);

        return (head + size - tail) % size;
    }
    return m->max_entries;
}

uint32_t hybrid_current_cpu(void)
{
    int cpu = current_cpu();

    return cpu < 0 ? 0 : (uint32_t)cpu;
}

/* ------------------------------------------------------------------------ */
/* generic operations                                                        */

void *hybrid_map_lookup(struct hybrid_map *m, const void *key)
{
    if (unlikely(is_syscall_bridge(m)))
        return bridge_lookup(m, key, BRIDGE_CUR_CPU);
    switch (m->type) {
    case BPF_MAP_TYPE_ARRAY: {
        uint32_t i = key_u32(key);

        return likely(i < m->max_entries) ? array_slot(m, i) : NULL;
    }
    case BPF_MAP_TYPE_PERCPU_ARRAY: {
        uint32_t i = key_u32(key);

        if (unlikely(i >= m->max_entries))
            return NULL;
        return (char *)m + m->off_a + (uint64_t)cpu_slot(m->nr_cpus) * m->plane + (uint64_t)i * m->stride;
    }
    case BPF_MAP_TYPE_HASH:
    case BPF_MAP_TYPE_LRU_HASH: {
        int64_t idx = htab_find(m, key);
        struct helem *e;

        if (idx < 0)
            return NULL;
        e = helem(m, (uint32_t)idx);
        if (m->type == BPF_MAP_TYPE_LRU_HASH && !LOAD(&e->ref))
            STORE(&e->ref, 1);
        return helem_value(m, e);
    }
    case BPF_MAP_TYPE_PERCPU_HASH:
    case BPF_MAP_TYPE_LRU_PERCPU_HASH: {
        int64_t idx = htab_find(m, key);

        if (idx < 0)
            return NULL;
        if (m->type == BPF_MAP_TYPE_LRU_PERCPU_HASH && !LOAD(&helem(m, (uint32_t)idx)->ref))
            STORE(&helem(m, (uint32_t)idx)->ref, 1);
        return pcpu_value(m, (uint32_t)idx, cpu_slot(m->nr_cpus));
    }
    case BPF_MAP_TYPE_LPM_TRIE: {
        int64_t idx = lpm_find(m, key, NULL);

        return idx < 0 ? NULL : helem_value(m, helem(m, (uint32_t)idx));
    }
    case BPF_MAP_TYPE_ARRAY_OF_MAPS: {
        uint32_t i = key_u32(key);

        return i < m->max_entries ? inner_ptr(m, LOAD_ACQ((uint64_t *)array_slot(m, i))) : NULL;
    }
    case BPF_MAP_TYPE_HASH_OF_MAPS: {
        int64_t idx = htab_find(m, key);

        return idx < 0 ? NULL : inner_ptr(m, LOAD_ACQ((uint64_t *)helem_value(m, helem(m, (uint32_t)idx))));
    }
    default:
        return NULL;
    }
}

void *hybrid_map_lookup_cpu(struct hybrid_map *m, const void *key, uint32_t cpu)
{
    int64_t idx;

    if (cpu >= m->nr_cpus)
        return NULL;
    if (unlikely(is_syscall_bridge(m)))
        return is_percpu(m->type) ? bridge_lookup(m, key, cpu) : NULL;
    switch (m->type) {
    case BPF_MAP_TYPE_PERCPU_ARRAY: {
        uint32_t i = key_u32(key);

        return i < m->max_entries ? (char *)m + m->off_a + (uint64_t)cpu * m->plane + (uint64_t)i * m->stride : NULL;
    }
    case BPF_MAP_TYPE_PERCPU_HASH:
    case BPF_MAP_TYPE_LRU_PERCPU_HASH:
        idx = htab_find(m, key);
        if (idx < 0)
            return NULL;
        if (m->type == BPF_MAP_TYPE_LRU_PERCPU_HASH && !LOAD(&helem(m, (uint32_t)idx)->ref))
            STORE(&helem(m, (uint32_t)idx)->ref, 1);
        return pcpu_value(m, (uint32_t)idx, cpu);
    default:
        return NULL;
    }
}

long hybrid_map_lookup_copy(struct hybrid_map *m, const void *key, void *value)
{
    if (unlikely(is_syscall_bridge(m)))
        return bridge_lookup_copy(m, key, value);
    switch (m->type) {
    case BPF_MAP_TYPE_ARRAY: {
        uint32_t i = key_u32(key);

        if (i >= m->max_entries)
            return -ENOENT;
        memcpy(value, array_slot(m, i), m->value_size);
        return 0;
    }
    case BPF_MAP_TYPE_PERCPU_ARRAY: {
        uint32_t i = key_u32(key);

        if (i >= m->max_entries)
            return -ENOENT;
        for (uint32_t c = 0; c < m->nr_cpus; c++)
            memcpy((char *)value + (size_t)c * m->stride,
                   (char *)m + m->off_a + (uint64_t)c * m->plane + (uint64_t)i * m->stride, m->stride);
        return 0;
    }
    case BPF_MAP_TYPE_PROG_ARRAY:
    case BPF_MAP_TYPE_ARRAY_OF_MAPS: {
        uint32_t i = key_u32(key);
        uint64_t slot;

        if (i >= m->max_entries)
            return -ENOENT;
        slot = LOAD_ACQ((uint64_t *)array_slot(m, i));
        if (!slot)
            return -ENOENT;
        if (m->type == BPF_MAP_TYPE_PROG_ARRAY) {
            uint32_t id = (uint32_t)(slot - 1);

            memcpy(value, &id, 4);
        } else {
            memcpy(value, &slot, 8);
        }
        return 0;
    }
    case BPF_MAP_TYPE_HASH:
    case BPF_MAP_TYPE_LRU_HASH:
    case BPF_MAP_TYPE_HASH_OF_MAPS:
        return htab_read(m, key, hash_key(m, key), value, COPY_VALUE) < 0 ? -ENOENT : 0;
    case BPF_MAP_TYPE_PERCPU_HASH:
    case BPF_MAP_TYPE_LRU_PERCPU_HASH:
        return htab_read(m, key, hash_key(m, key), value, COPY_PERCPU) < 0 ? -ENOENT : 0;
    case BPF_MAP_TYPE_LPM_TRIE:
        return lpm_find(m, key, value) < 0 ? -ENOENT : 0;
    case BPF_MAP_TYPE_STACK_TRACE:
        return stack_lookup_copy(m, key_u32(key), value);
    case BPF_MAP_TYPE_QUEUE:
    case BPF_MAP_TYPE_STACK:
        return qs_pop(m, value, 0);
    case BPF_MAP_TYPE_BLOOM_FILTER:
        return -EINVAL;
    default:
        return -EOPNOTSUPP;
    }
}

static long fd_array_update(struct hybrid_map *m, const void *key, const void *value, uint64_t flags)
{
    uint32_t i = key_u32(key);
    uint64_t slot;

    if (flags != BPF_ANY)
        return -EINVAL;
    if (i >= m->max_entries)
        return -E2BIG;
    if (m->type == BPF_MAP_TYPE_PROG_ARRAY) {
        uint32_t id;

        memcpy(&id, value, 4);
        slot = (uint64_t)id + 1;
    } else {
        long err;

        memcpy(&slot, value, 8);
        err = inner_check(m, slot);
        if (err)
            return err;
    }
    STORE_REL((uint64_t *)array_slot(m, i), slot);
    return 0;
}

static long map_update(struct hybrid_map *m, const void *key, const void *value, uint64_t flags, int all_cpus)
{
    if (unlikely(is_syscall_bridge(m)))
        return bridge_update(m, key, value, flags, all_cpus);
    switch (m->type) {
    case BPF_MAP_TYPE_ARRAY:
    case BPF_MAP_TYPE_PERCPU_ARRAY: {
        uint32_t i = key_u32(key);

        if (unlikely(flags > BPF_EXIST))
            return -EINVAL;
        if (unlikely(i >= m->max_entries))
            return -E2BIG;
        if (unlikely(flags == BPF_NOEXIST))
            return -EEXIST;
        if (unlikely(m->map_flags & BPF_F_RDONLY))  /* an mmap bridge mapped read-only: a frozen kernel map */
            return -EPERM;
        if (m->type == BPF_MAP_TYPE_ARRAY) {
            memcpy(array_slot(m, i), value, m->value_size);
        } else if (all_cpus) {
            for (uint32_t c = 0; c < m->nr_cpus; c++)
                memcpy((char *)m + m->off_a + (uint64_t)c * m->plane + (uint64_t)i * m->stride,
                       (const char *)value + (size_t)c * m->stride, m->value_size);
        } else {
            memcpy((char *)m + m->off_a + (uint64_t)cpu_slot(m->nr_cpus) * m->plane + (uint64_t)i * m->stride,
                   value, m->value_size);
        }
        return 0;
    }
    case BPF_MAP_TYPE_PROG_ARRAY:
    case BPF_MAP_TYPE_ARRAY_OF_MAPS:
        return fd_array_update(m, key, value, flags);
    case BPF_MAP_TYPE_PERF_EVENT_ARRAY: {
        uint32_t v;

        if (flags != BPF_ANY)
            return -EINVAL;
        memcpy(&v, value, 4);
        return hybrid_perf_update(m, key_u32(key), v);
    }
    case BPF_MAP_TYPE_HASH_OF_MAPS: {
        uint64_t off;
        long err;

        memcpy(&off, value, 8);
        err = inner_check(m, off);
        if (err)
            return err;
        err = htab_update(m, key, value, flags, 0);
        return err < 0 ? err : 0;
    }
    case BPF_MAP_TYPE_HASH:
    case BPF_MAP_TYPE_LRU_HASH:
    case BPF_MAP_TYPE_PERCPU_HASH:
    case BPF_MAP_TYPE_LRU_PERCPU_HASH: {
        long err = htab_update(m, key, value, flags, all_cpus);

        return err < 0 ? err : 0;
    }
    case BPF_MAP_TYPE_LPM_TRIE:
        return lpm_update(m, key, value, flags);
    case BPF_MAP_TYPE_QUEUE:
    case BPF_MAP_TYPE_STACK:
    case BPF_MAP_TYPE_BLOOM_FILTER:
        return hybrid_map_push(m, value, flags);
    case BPF_MAP_TYPE_STACK_TRACE:
        return -EINVAL;
    default:
        return -EOPNOTSUPP;
    }
}

long hybrid_map_update(struct hybrid_map *m, const void *key, const void *value, uint64_t flags)
{
    return map_update(m, key, value, flags, 0);
}

long hybrid_map_update_all_cpus(struct hybrid_map *m, const void *key, const void *values, uint64_t flags)
{
    if (!is_percpu(m->type))
        return -EINVAL;
    return map_update(m, key, values, flags, 1);
}

long hybrid_map_delete(struct hybrid_map *m, const void *key)
{
    if (unlikely(is_syscall_bridge(m)))
        return bridge_delete(m, key);
    switch (m->type) {
    case BPF_MAP_TYPE_ARRAY:
    case BPF_MAP_TYPE_PERCPU_ARRAY:
    case BPF_MAP_TYPE_QUEUE:
    case BPF_MAP_TYPE_STACK:
        return -EINVAL;
    case BPF_MAP_TYPE_PROG_ARRAY:
    case BPF_MAP_TYPE_ARRAY_OF_MAPS: {
        uint32_t i = key_u32(key);

        if (i >= m->max_entries)
            return -E2BIG;
        return __atomic_exchange_n((uint64_t *)array_slot(m, i), 0, __ATOMIC_ACQ_REL) ? 0 : -ENOENT;
    }
    case BPF_MAP_TYPE_PERF_EVENT_ARRAY:
        return hybrid_perf_delete(m, key_u32(key));
    case BPF_MAP_TYPE_HASH:
    case BPF_MAP_TYPE_LRU_HASH:
    case BPF_MAP_TYPE_PERCPU_HASH:
    case BPF_MAP_TYPE_LRU_PERCPU_HASH:
    case BPF_MAP_TYPE_HASH_OF_MAPS:
        return htab_delete(m, key);
    case BPF_MAP_TYPE_LPM_TRIE:
        return lpm_delete(m, key);
    case BPF_MAP_TYPE_STACK_TRACE:
        return stack_delete(m, key_u32(key));
    default:
        return -EOPNOTSUPP;
    }
}

int hybrid_map_next_key(struct hybrid_map *m, const void *key, void *next_key)
{
    if (unlikely(is_syscall_bridge(m)))
        return (int)bridge_cmd(m, CMD_MAP_GET_NEXT_KEY, m->key_size ? key : NULL, next_key, 0);
    if (is_array(m->type))
        return array_next_key(m, key, next_key);
    switch (m->type) {
    case BPF_MAP_TYPE_LPM_TRIE:
        return lpm_next_key(m, key, next_key);
    case BPF_MAP_TYPE_STACK_TRACE:
        return stack_next_key(m, key, next_key);
    case BPF_MAP_TYPE_QUEUE:
    case BPF_MAP_TYPE_STACK:
        return -EINVAL;
    default:
        if (is_hash(m->type))
            return htab_next_key(m, key, next_key);
        return -EOPNOTSUPP;
    }
}

long hybrid_map_push(struct hybrid_map *m, const void *value, uint64_t flags)
{
    switch (m->type) {
    case BPF_MAP_TYPE_QUEUE:
    case BPF_MAP_TYPE_STACK:
        if (unlikely(is_syscall_bridge(m)))
            return bridge_cmd(m, CMD_MAP_UPDATE_ELEM, NULL, (void *)value, flags);
        return qs_push(m, value, flags);
    case BPF_MAP_TYPE_BLOOM_FILTER:
        if (flags != BPF_ANY)
            return -EINVAL;
        if (unlikely(is_syscall_bridge(m)))
            return bridge_cmd(m, CMD_MAP_UPDATE_ELEM, NULL, (void *)value, flags);
        return bloom_op(m, value, 1);
    default:
        return -EINVAL;
    }
}

long hybrid_map_pop(struct hybrid_map *m, void *value)
{
    switch (m->type) {
    case BPF_MAP_TYPE_QUEUE:
    case BPF_MAP_TYPE_STACK:
        if (unlikely(is_syscall_bridge(m)))
            return bridge_cmd(m, CMD_MAP_LOOKUP_AND_DELETE_ELEM, NULL, value, 0);
        return qs_pop(m, value, 1);
    case BPF_MAP_TYPE_BLOOM_FILTER:
        return -EOPNOTSUPP;
    default:
        return -EINVAL;
    }
}

long hybrid_map_peek(struct hybrid_map *m, void *value)
{
    switch (m->type) {
    case BPF_MAP_TYPE_QUEUE:
    case BPF_MAP_TYPE_STACK:
    case BPF_MAP_TYPE_BLOOM_FILTER:
        if (unlikely(is_syscall_bridge(m)))
            return bridge_cmd(m, CMD_MAP_LOOKUP_ELEM, NULL, value, 0);
        return m->type == BPF_MAP_TYPE_BLOOM_FILTER ? bloom_op(m, value, 0) : qs_pop(m, value, 0);
    default:
        return -EINVAL;
    }
}

/* ------------------------------------------------------------------------ */
/* helpers, with the kernel's ids                                            */

/*   1 */
/* The helpers go straight to the hash operations for the hash maps of
 * this region (not bridged), the common case on a program's hot path;
 * every other map takes the generic path. */
static inline int is_own_htab(const struct hybrid_map *m)
{
    uint32_t t = m->type;

    return (t == BPF_MAP_TYPE_HASH || t == BPF_MAP_TYPE_LRU_HASH || t == BPF_MAP_TYPE_PERCPU_HASH ||
            t == BPF_MAP_TYPE_LRU_PERCPU_HASH) && m->bridge == HYBRID_BRIDGE_NONE;
}

uint64_t hybrid_helper_map_lookup_elem(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5)
{
    struct hybrid_map *m = (struct hybrid_map *)(uintptr_t)r1;

    (void)r3; (void)r4; (void)r5;
    if (unlikely(!r1 || !r2))
        return 0;
    if (likely(m->type == BPF_MAP_TYPE_HASH && m->bridge == HYBRID_BRIDGE_NONE)) {
        int64_t idx = htab_find(m, (const void *)(uintptr_t)r2);

        return idx < 0 ? 0 : (uintptr_t)helem_value(m, helem(m, (uint32_t)idx));
    }
    return (uintptr_t)hybrid_map_lookup(m, (const void *)(uintptr_t)r2);
}

/*   2 */
/* Maps whose entries name programs, maps or stacks: programs may not write
 * them (the kernel's verifier refuses these calls; here the helper does), or
 * a program could redirect another's tail calls. */
static int program_may_write(const struct hybrid_map *m)
{
    switch (m->type) {
    case BPF_MAP_TYPE_PROG_ARRAY:
    case BPF_MAP_TYPE_ARRAY_OF_MAPS:
    case BPF_MAP_TYPE_HASH_OF_MAPS:
    case BPF_MAP_TYPE_PERF_EVENT_ARRAY:
    case BPF_MAP_TYPE_STACK_TRACE:
        return 0;
    default:
        return 1;
    }
}

uint64_t hybrid_helper_map_update_elem(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5)
{
    (void)r5;
    if (unlikely(!r1 || !r3))
        return NEG(-EINVAL);
    if (likely(is_own_htab((struct hybrid_map *)(uintptr_t)r1))) {
        long err = htab_update((struct hybrid_map *)(uintptr_t)r1, (const void *)(uintptr_t)r2,
                               (const void *)(uintptr_t)r3, r4, 0);

        return NEG(err < 0 ? err : 0);
    }
    if (unlikely(!program_may_write((struct hybrid_map *)(uintptr_t)r1)))
        return NEG(-EPERM);
    return NEG(hybrid_map_update((struct hybrid_map *)(uintptr_t)r1, (const void *)(uintptr_t)r2,
                                 (const void *)(uintptr_t)r3, r4));
}

/*   3 */
uint64_t hybrid_helper_map_delete_elem(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5)
{
    (void)r3; (void)r4; (void)r5;
    if (unlikely(!r1))
        return NEG(-EINVAL);
    if (likely(is_own_htab((struct hybrid_map *)(uintptr_t)r1)))
        return NEG(htab_delete((struct hybrid_map *)(uintptr_t)r1, (const void *)(uintptr_t)r2));
    if (unlikely(!program_may_write((struct hybrid_map *)(uintptr_t)r1)))
        return NEG(-EPERM);
    return NEG(hybrid_map_delete((struct hybrid_map *)(uintptr_t)r1, (const void *)(uintptr_t)r2));
}

/*  87 */
uint64_t hybrid_helper_map_push_elem(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5)
{
    (void)r4; (void)r5;
    if (unlikely(!r1 || !r2))
        return NEG(-EINVAL);
    return NEG(hybrid_map_push((struct hybrid_map *)(uintptr_t)r1, (const void *)(uintptr_t)r2, r3));
}

/*  88 */
uint64_t hybrid_helper_map_pop_elem(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5)
{
    (void)r3; (void)r4; (void)r5;
    if (unlikely(!r1 || !r2))
        return NEG(-EINVAL);
    return NEG(hybrid_map_pop((struct hybrid_map *)(uintptr_t)r1, (void *)(uintptr_t)r2));
}

/*  89 */
uint64_t hybrid_helper_map_peek_elem(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5)
{
    (void)r3; (void)r4; (void)r5;
    if (unlikely(!r1 || !r2))
        return NEG(-EINVAL);
    return NEG(hybrid_map_peek((struct hybrid_map *)(uintptr_t)r1, (void *)(uintptr_t)r2));
}

/* 195 */
uint64_t hybrid_helper_map_lookup_percpu_elem(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5)
{
    (void)r4; (void)r5;
    if (unlikely(!r1 || !r2))
        return 0;
    return (uintptr_t)hybrid_map_lookup_cpu((struct hybrid_map *)(uintptr_t)r1, (const void *)(uintptr_t)r2,
                                            (uint32_t)r3);
}

/* ------------------------------------------------------------------------ */
/* drivers for tests and micro-benchmarks                                    */

static inline uint64_t xorshift(uint64_t *s)
{
    uint64_t x = *s;

    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *s = x;
    return x * 0x2545f4914f6cdd1dull;
}

/* The helpers a program calls (their fast paths for hash maps), as results
 * of the C API: the drivers below use them on every other operation. */
static void *helper_lookup(struct hybrid_map *m, const void *key)
{
    return (void *)(uintptr_t)hybrid_helper_map_lookup_elem((uintptr_t)m, (uintptr_t)key, 0, 0, 0);
}

static long helper_update(struct hybrid_map *m, const void *key, const void *value, uint64_t flags)
{
    return (long)hybrid_helper_map_update_elem((uintptr_t)m, (uintptr_t)key, (uintptr_t)value, flags, 0);
}

static long helper_delete(struct hybrid_map *m, const void *key)
{
    return (long)hybrid_helper_map_delete_elem((uintptr_t)m, (uintptr_t)key, 0, 0, 0);
}

/* Counting, the way a probe counts: lookup; insert zero if absent; atomic add.
 * Keys are u32 in [0, nkeys).  Returns the number of failed operations
 * (updates that fail, lookups that miss a key just inserted).  Odd
 * iterations go through the program helpers, even ones through the C API. */
int64_t hybrid_test_count(struct hybrid_map *m, uint32_t nkeys, uint64_t iters, uint64_t seed)
{
    uint64_t zero[64] = {0};
    uint64_t s = seed | 1;
    int64_t errors = 0;

    if (m->key_size != 4 || m->value_size < 8 || m->value_size > sizeof(zero) || nkeys == 0)
        return -EINVAL;
    for (uint64_t n = 0; n < iters; n++) {
        uint32_t k = (uint32_t)(xorshift(&s) % nkeys);
        const int h = (int)(n & 1);
        uint64_t *v = h ? helper_lookup(m, &k) : hybrid_map_lookup(m, &k);

        if (!v) {
            long r = h ? helper_update(m, &k, zero, BPF_NOEXIST) : hybrid_map_update(m, &k, zero, BPF_NOEXIST);

            if (r && r != -EEXIST)
                errors++;
            v = h ? helper_lookup(m, &k) : hybrid_map_lookup(m, &k);
            if (!v) {
                errors += !is_lru(m->type);  /* LRU: another thread's insert may have evicted it */
                continue;
            }
        }
        __atomic_fetch_add(v, 1, __ATOMIC_RELAXED);
        if (unlikely(is_syscall_bridge(m)))
            hybrid_bridge_flush();  /* each iteration is a run: the copy's write goes back */
    }
    return errors;
}

#define CHURN_MAGIC 0x5a17c0ffee15600dull

/* Random inserts, updates, deletes and lookups on the caller's own keys
 * [key_base, key_base + nkeys) while others work on theirs; `present` is the
 * caller's view of which keys exist.  Returns the number of results that
 * differ from what a correct map must answer.  Keys are u32 or u64 (the
 * same numbers); about half the operations go through the program helpers. */
int64_t hybrid_test_churn(struct hybrid_map *m, uint32_t key_base, uint32_t nkeys, uint64_t iters, uint64_t seed,
                          uint8_t *present)
{
    uint64_t s = seed | 1, val[8] = {0}, out[8];
    int64_t bad = 0;

    if ((m->key_size != 4 && m->key_size != 8) || m->value_size < 24 || m->value_size > sizeof(val) ||
        is_percpu(m->type) || nkeys == 0)
        return -EINVAL;
    for (uint64_t n = 0; n < iters; n++) {
        uint64_t r = xorshift(&s);
        uint32_t i = (uint32_t)(r % nkeys), k = key_base + i;
        uint64_t k64 = k;
        const void *key = m->key_size == 8 ? (const void *)&k64 : (const void *)&k;
        int op = (int)((r >> 32) % 5), h = (int)((r >> 40) & 1);
        long ret;

        val[0] = k;
        val[1] = n;
        val[2] = k ^ n ^ CHURN_MAGIC;
        switch (op) {
        case 0:
            ret = h ? helper_update(m, key, val, BPF_NOEXIST) : hybrid_map_update(m, key, val, BPF_NOEXIST);
            bad += present[i] ? ret != -EEXIST : ret != 0;
            present[i] = 1;
            break;
        case 1:
            ret = h ? helper_update(m, key, val, BPF_EXIST) : hybrid_map_update(m, key, val, BPF_EXIST);
            bad += present[i] ? ret != 0 : ret != -ENOENT;
            break;
        case 2:
            ret = h ? helper_delete(m, key) : hybrid_map_delete(m, key);
            bad += present[i] ? ret != 0 : ret != -ENOENT;
            present[i] = 0;
            break;
        case 3:
            ret = hybrid_map_lookup_copy(m, key, out);
            if (present[i])
                bad += ret != 0 || out[0] != k || out[2] != (out[0] ^ out[1] ^ CHURN_MAGIC);
            else
                bad += ret != -ENOENT;
            break;
        default: {
            uint64_t *v = h ? helper_lookup(m, key) : hybrid_map_lookup(m, key);

            bad += present[i] ? (v == NULL || v[0] != k) : v != NULL;
            if (unlikely(is_syscall_bridge(m)))
                hybrid_bridge_flush();
        }
        }
    }
    return bad;
}

/* Overwrites (BPF_ANY) and snapshot lookups on shared keys; a lookup copy
 * must never see a value of another key or a torn value. */
int64_t hybrid_test_replace(struct hybrid_map *m, uint32_t nkeys, uint64_t iters, uint64_t seed)
{
    uint64_t s = seed | 1, val[8] = {0}, out[8];
    int64_t bad = 0;

    if (m->key_size != 4 || m->value_size < 24 || m->value_size > sizeof(val) || is_percpu(m->type) || nkeys == 0)
        return -EINVAL;
    for (uint64_t n = 0; n < iters; n++) {
        uint64_t r = xorshift(&s);
        uint32_t k = (uint32_t)(r % nkeys);

        if ((r >> 40) & 1) {
            val[0] = k;
            val[1] = r;
            val[2] = k ^ r ^ CHURN_MAGIC;
            if (hybrid_map_update(m, &k, val, BPF_ANY) != 0)
                bad++;
        } else if (hybrid_map_lookup_copy(m, &k, out) == 0) {
            bad += out[0] != k || out[2] != (out[0] ^ out[1] ^ CHURN_MAGIC);
        }
    }
    return bad;
}

static double now_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

/* Average ns of one operation over `iters` calls:
 *   0 hybrid_map_lookup            1 the lookup helper through a pointer (as JIT code calls it)
 *   2 update BPF_ANY               3 lookup_copy
 *   4 ringbuf_output (value = u64 size)   5 ringbuf reserve + submit   6 perf_output (current CPU)
 *   7 delete + insert              8 current CPU slot                  9 lookup + atomic add */
double hybrid_bench_ns(struct hybrid_map *m, int op, const void *key, const void *value, uint64_t iters)
{
    uint64_t (*volatile helper)(uint64_t, uint64_t, uint64_t, uint64_t, uint64_t) = hybrid_helper_map_lookup_elem;
    unsigned char buf[4096];
    uint64_t sink = 0, size = 0;
    const int bridged = is_syscall_bridge(m);
    double t0;

    if (op == 4 || op == 5 || op == 6) {
        memcpy(&size, value, 8);
        if (size > sizeof(buf))
            return -1;
        memset(buf, 0x5a, size);
    }
    t0 = now_ns();
    for (uint64_t n = 0; n < iters; n++) {
        switch (op) {
        case 0:
            sink += (uintptr_t)hybrid_map_lookup(m, key);
            break;
        case 1:
            sink += helper((uintptr_t)m, (uintptr_t)key, 0, 0, 0);
            break;
        case 2:
            sink += (uint64_t)hybrid_map_update(m, key, value, BPF_ANY);
            break;
        case 3:
            sink += (uint64_t)hybrid_map_lookup_copy(m, key, buf);
            break;
        case 4:
            sink += (uint64_t)hybrid_ringbuf_output(m, buf, size, BPF_RB_NO_WAKEUP);
            break;
        case 5: {
            void *p = hybrid_ringbuf_reserve(m, size, 0);

            if (p) {
                memset(p, 0, size);
                hybrid_ringbuf_submit(p, BPF_RB_NO_WAKEUP);
            }
            sink += (uintptr_t)p;
            break;
        }
        case 6:
            sink += (uint64_t)hybrid_perf_output(m, BPF_F_CURRENT_CPU, buf, size);
            break;
        case 7:
            sink += (uint64_t)hybrid_map_delete(m, key);
            sink += (uint64_t)hybrid_map_update(m, key, value, BPF_ANY);
            break;
        case 8:
            sink += cpu_slot(m->nr_cpus);
            break;
        case 9: {
            uint64_t *v = hybrid_map_lookup(m, key);

            if (v)
                __atomic_fetch_add(v, 1, __ATOMIC_RELAXED);
            break;
        }
        default:
            return -1;
        }
        if (unlikely(bridged))
            hybrid_bridge_flush();  /* bridged maps: each iteration is a run */
    }
    __asm__ __volatile__("" ::"r"(sink));
    return (now_ns() - t0) / (double)(iters ? iters : 1);
}
