/*
 * maps.h - eBPF maps in shared memory: the public C API of hybrid's maps.
 *
 * A *region* is one shared memory file (/dev/shm or memfd) per loaded
 * object: a region header (magic "HYBRIDRG", version, size, number of maps,
 * table of map offsets) followed by the maps, each 64-byte aligned.  Several
 * processes map the same file, each at its own address, so nothing inside
 * shared memory is a pointer: only offsets.  A map is a `struct hybrid_map`
 * header (layout private to maps_impl.h) followed by its storage; its
 * `self_off` is its offset in the region, so C code finds the region base as
 * `(char *)m - m->self_off`.  eBPF code refers to a map by the address of
 * its header in the current process (what `lddw r1, map` yields).
 *
 * Semantics are the kernel's (include/uapi/linux/bpf.h and kernel/bpf/):
 * map types and flags use the kernel's numbers, functions return 0 or a
 * negative errno, and the differences are listed in maps.c's comment.
 *
 * The block between the cdef markers is read verbatim by _build.py as part
 * of the cffi cdef, so it must stay plain C declarations (no macros).
 */
#ifndef HYBRID_MAPS_H
#define HYBRID_MAPS_H

#include <stddef.h>
#include <stdint.h>

/* cdef-begin */
struct hybrid_map;

/* What a map header says about itself (for a process opening a region). */
struct hybrid_map_desc {
    uint32_t type, key_size, value_size, max_entries, map_flags, nr_cpus, id;
    uint32_t inner_type, inner_key_size, inner_value_size, inner_max_entries, inner_flags;
    uint32_t kernel_id, bridge;   /* bridged maps: the kernel map's id; 1 mmap, 2 syscall (0: not bridged) */
    uint64_t map_extra, size, self_off;
    char name[64];
};

/* --- shared memory and regions ------------------------------------------ */
void *hybrid_shm_map(int fd, uint64_t size, int populate, uint64_t hint);   /* NULL + errno on error; hint 0: anywhere */
int hybrid_shm_unmap(void *addr, uint64_t size);
uint64_t hybrid_region_header_size(uint32_t nr_maps);
int hybrid_region_init(void *base, uint64_t size, uint32_t nr_maps, uint32_t nr_cpus);
int hybrid_region_set_map(void *base, uint32_t index, uint64_t off);
void hybrid_region_publish(void *base);
int64_t hybrid_region_check(const void *base, uint64_t size);   /* number of maps or -errno */
struct hybrid_map *hybrid_region_map(void *base, uint32_t index);
uint32_t hybrid_region_nr_cpus(const void *base);

/* --- maps: creation ------------------------------------------------------- */
int64_t hybrid_map_size(uint32_t type, uint32_t key_size, uint32_t value_size, uint32_t max_entries,
                        uint32_t map_flags, uint64_t map_extra, uint32_t nr_cpus, uint32_t bridge);
int hybrid_map_init(void *at, uint64_t self_off, uint32_t type, uint32_t key_size, uint32_t value_size,
                    uint32_t max_entries, uint32_t map_flags, uint64_t map_extra, uint32_t nr_cpus,
                    uint32_t id, const char *name, uint32_t bridge, uint32_t kernel_id);
int hybrid_map_set_inner(struct hybrid_map *m, uint32_t type, uint32_t key_size, uint32_t value_size,
                         uint32_t max_entries, uint32_t map_flags);
int hybrid_map_describe(const struct hybrid_map *m, struct hybrid_map_desc *out);
uint64_t hybrid_map_count(const struct hybrid_map *m);
uint64_t hybrid_map_lost(struct hybrid_map *m, int reset);

/* --- bridges: maps backed by a kernel map (maps.c) ------------------------- */
int hybrid_map_attach_bridge(struct hybrid_map *m, char *err, size_t errlen);
int hybrid_region_attach_bridges(void *base, uint64_t size, char *err, size_t errlen);   /* maps attached or -errno */
void hybrid_bridge_flush(void);                       /* after every program run */
int hybrid_bridge_release(uint32_t kernel_id);        /* closes this process's cached fd of the kernel map */
void *hybrid_bridge_arena(uint64_t *size);            /* the calling thread's lookup copies (NULL: none yet) */

/* --- maps: operations (program semantics unless said otherwise) ----------- */
void *hybrid_map_lookup(struct hybrid_map *m, const void *key);
void *hybrid_map_lookup_cpu(struct hybrid_map *m, const void *key, uint32_t cpu);
long hybrid_map_lookup_copy(struct hybrid_map *m, const void *key, void *value);   /* syscall semantics */
long hybrid_map_update(struct hybrid_map *m, const void *key, const void *value, uint64_t flags);
long hybrid_map_update_all_cpus(struct hybrid_map *m, const void *key, const void *values, uint64_t flags);
long hybrid_map_delete(struct hybrid_map *m, const void *key);
int hybrid_map_next_key(struct hybrid_map *m, const void *key, void *next_key);
long hybrid_map_push(struct hybrid_map *m, const void *value, uint64_t flags);
long hybrid_map_pop(struct hybrid_map *m, void *value);
long hybrid_map_peek(struct hybrid_map *m, void *value);
long hybrid_stackmap_store(struct hybrid_map *m, const uint64_t *ips, uint32_t nr, uint64_t flags);
int hybrid_prog_register(uint32_t id, void *entry);
void *hybrid_prog_array_get(struct hybrid_map *m, uint32_t index);
void *hybrid_tail_call_target(struct hybrid_map *m, uint32_t index);   /* NULL: empty slot, or 33 deep */
uint64_t hybrid_tail_call_run(void *entry, void *ctx);                   /* runs the target, depth counted */
uint32_t hybrid_current_cpu(void);

/* --- ring buffer and perf event array ------------------------------------ */
void *hybrid_ringbuf_reserve(struct hybrid_map *m, uint64_t size, uint64_t flags);
void hybrid_ringbuf_submit(void *sample, uint64_t flags);
void hybrid_ringbuf_discard(void *sample, uint64_t flags);
long hybrid_ringbuf_output(struct hybrid_map *m, const void *data, uint64_t size, uint64_t flags);
uint64_t hybrid_ringbuf_query(struct hybrid_map *m, uint64_t flags);
int hybrid_ringbuf_consume(struct hybrid_map *m, int (*cb)(void *ctx, void *data, uint32_t size), void *ctx);
int hybrid_ringbuf_wait(struct hybrid_map *m, int timeout_ms);
int hybrid_ring_set_wakeup(struct hybrid_map *m, uint32_t bytes, uint32_t max_latency_us);
int hybrid_ring_addresses(struct hybrid_map *m, uint32_t index, uint64_t *out);
long hybrid_perf_output(struct hybrid_map *m, uint64_t flags, const void *data, uint64_t size);
int hybrid_perf_consume(struct hybrid_map *m, uint32_t cpu, int (*cb)(void *ctx, void *data, uint32_t size), void *ctx);
uint64_t hybrid_perf_lost(struct hybrid_map *m, uint32_t cpu, int reset);
int hybrid_perf_wait(struct hybrid_map *m, int timeout_ms);

/* --- helpers (eBPF calling convention; kernel ids in maps.c) -------------- */
uint64_t hybrid_helper_map_lookup_elem(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5);
uint64_t hybrid_helper_map_update_elem(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5);
uint64_t hybrid_helper_map_delete_elem(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5);
uint64_t hybrid_helper_perf_event_output(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5);
uint64_t hybrid_helper_map_push_elem(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5);
uint64_t hybrid_helper_map_pop_elem(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5);
uint64_t hybrid_helper_map_peek_elem(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5);
uint64_t hybrid_helper_ringbuf_output(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5);
uint64_t hybrid_helper_ringbuf_reserve(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5);
uint64_t hybrid_helper_ringbuf_submit(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5);
uint64_t hybrid_helper_ringbuf_discard(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5);
uint64_t hybrid_helper_ringbuf_query(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5);
uint64_t hybrid_helper_map_lookup_percpu_elem(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5);

/* --- drivers for tests and micro-benchmarks (tight C loops) --------------- */
int64_t hybrid_test_count(struct hybrid_map *m, uint32_t nkeys, uint64_t iters, uint64_t seed);
int64_t hybrid_test_churn(struct hybrid_map *m, uint32_t key_base, uint32_t nkeys, uint64_t iters,
                          uint64_t seed, uint8_t *present);
int64_t hybrid_test_replace(struct hybrid_map *m, uint32_t nkeys, uint64_t iters, uint64_t seed);
int64_t hybrid_test_ring_produce(struct hybrid_map *m, uint32_t producer, uint64_t count, uint32_t size,
                                 uint64_t flags);
double hybrid_bench_ns(struct hybrid_map *m, int op, const void *key, const void *value, uint64_t iters);
/* cdef-end */

/* hybrid_bridge_flush's test, inlined where programs run on every probe hit (agent.c): one TLS
 * load and a branch when the run made no lookup of a syscall-mode bridged map.  The thread-local
 * is maps.c's: this thread's copy arena | 1 while lookups are pending. */
extern __thread uintptr_t hybrid_bridge_tls __attribute__((tls_model("initial-exec"), visibility("hidden")));

static inline void hybrid_bridge_flush_fast(void)
{
    if (__builtin_expect(hybrid_bridge_tls & 1, 0))
        hybrid_bridge_flush();
}

#endif /* HYBRID_MAPS_H */
