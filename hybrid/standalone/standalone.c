/*
 * standalone.c - the C side of a standalone binary built by `hybrid aot build`.
 *
 * Linked with: the program(s) compiled by LLVM (prog.o: `hybrid_sa_prog_<n>`,
 * calling `hybrid_helper_*` directly), the runtime of hybrid/native (maps.c,
 * helpers.c, runtime.c, ring.c, stats.c, without agent.c) and the generated
 * image.c, which holds everything specific to one build:
 *
 *   hybrid_sa_region[]   the object's maps (one hybrid region, see maps.h),
 *                        page aligned, zero-initialised (.bss); the compiled
 *                        code refers to the maps as addresses inside it
 *   hybrid_sa_image[]    the region's non-zero pages as the loader left them
 *                        (global data, map `values`, hash free lists, ...)
 *   hybrid_sa_pages[]    the page number of each of those pages
 *   hybrid_sa_progs[]    the object's programs: name, id (what a PROG_ARRAY
 *                        holds), entry point (NULL: not compiled in, only
 *                        named in map dumps); [0] is the program run() runs
 *
 * A constructor copies the image into the region and registers the programs
 * for tail calls, so the maps start exactly as `hybrid.load` creates them.
 *
 * Built with -DHYBRID_SA_PREFIX=name: the library interface is name_run,
 * name_map_lookup, ... (documented in standalone.h, installed next to the
 * library).  With -DHYBRID_SA_MAIN it also has main(): the executable
 *
 *     OUT [--dump-maps] [--repeat N] [FILE|-]
 *
 * reads the context bytes from FILE (or standard input), runs the program
 * (N times, each on a fresh copy of the context), prints
 * "r0 = <decimal> (0x<hex>)" and with --dump-maps the maps as JSON.
 */
#define _GNU_SOURCE
#include "maps.h"
#include "helpers.h"

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifndef HYBRID_SA_PREFIX
#define HYBRID_SA_PREFIX hybrid_sa
#endif
#define SA_CAT2(a, b) a##_##b
#define SA_CAT(a, b) SA_CAT2(a, b)
#define SA_API(n) SA_CAT(HYBRID_SA_PREFIX, n)

#define SA_PAGE 4096u

struct hybrid_sa_prog {
    const char *name;
    uint32_t id;
    uint64_t (*entry)(void *ctx, uint64_t len);
};

/* image.c */
extern unsigned char hybrid_sa_region[];
extern const uint64_t hybrid_sa_region_size;
extern const unsigned char hybrid_sa_image[];
extern const uint32_t hybrid_sa_pages[];
extern const uint32_t hybrid_sa_npages;
extern const struct hybrid_sa_prog hybrid_sa_progs[];
extern const uint32_t hybrid_sa_nprogs;
extern const char hybrid_sa_object[];

/* map types (the kernel's numbers), as maps.py names them */
enum {
    T_HASH = 1, T_ARRAY = 2, T_PROG_ARRAY = 3, T_PERF_EVENT_ARRAY = 4, T_PERCPU_HASH = 5, T_PERCPU_ARRAY = 6,
    T_STACK_TRACE = 7, T_LRU_HASH = 9, T_LRU_PERCPU_HASH = 10, T_LPM_TRIE = 11, T_ARRAY_OF_MAPS = 12,
    T_HASH_OF_MAPS = 13, T_QUEUE = 22, T_STACK = 23, T_RINGBUF = 27, T_BLOOM_FILTER = 30,
};

static const char *const type_names[] = {
    [T_HASH] = "hash", [T_ARRAY] = "array", [T_PROG_ARRAY] = "prog_array",
    [T_PERF_EVENT_ARRAY] = "perf_event_array", [T_PERCPU_HASH] = "percpu_hash",
    [T_PERCPU_ARRAY] = "percpu_array", [T_STACK_TRACE] = "stack_trace", [T_LRU_HASH] = "lru_hash",
    [T_LRU_PERCPU_HASH] = "lru_percpu_hash", [T_LPM_TRIE] = "lpm_trie", [T_ARRAY_OF_MAPS] = "array_of_maps",
    [T_HASH_OF_MAPS] = "hash_of_maps", [T_QUEUE] = "queue", [T_STACK] = "stack", [T_RINGBUF] = "ringbuf",
    [T_BLOOM_FILTER] = "bloom_filter",
};

static int is_percpu(uint32_t type)
{
    return type == T_PERCPU_HASH || type == T_PERCPU_ARRAY || type == T_LRU_PERCPU_HASH;
}

static int is_map_of_maps(uint32_t type)
{
    return type == T_ARRAY_OF_MAPS || type == T_HASH_OF_MAPS;
}

/* The maps' names, by index (filled once by the constructor; never change). */
static uint32_t nr_maps;
static char (*map_names)[sizeof(((struct hybrid_map_desc *)0)->name)];

__attribute__((constructor)) static void hybrid_sa_init(void)
{
    struct hybrid_map_desc d;
    int64_t n;

    for (uint32_t i = 0; i < hybrid_sa_npages; i++)
        memcpy(hybrid_sa_region + (uint64_t)hybrid_sa_pages[i] * SA_PAGE, hybrid_sa_image + (uint64_t)i * SA_PAGE,
               SA_PAGE);
    n = hybrid_region_check(hybrid_sa_region, hybrid_sa_region_size);
    if (n < 0) {
        fprintf(stderr, "%s: the embedded maps of %s are corrupt (%s)\n", hybrid_sa_progs[0].name,
                hybrid_sa_object, strerror((int)-n));
        abort();
    }
    map_names = calloc((size_t)n + 1, sizeof(*map_names));
    if (map_names == NULL) {
        fprintf(stderr, "%s: out of memory\n", hybrid_sa_progs[0].name);
        abort();
    }
    for (uint32_t i = 0; i < (uint32_t)n; i++)
        if (hybrid_map_describe(hybrid_region_map(hybrid_sa_region, i), &d) == 0)
            memcpy(map_names[i], d.name, sizeof(d.name));
    nr_maps = (uint32_t)n;
    for (uint32_t i = 0; i < hybrid_sa_nprogs; i++)
        if (hybrid_sa_progs[i].entry != NULL)
            hybrid_prog_register(hybrid_sa_progs[i].id, (void *)hybrid_sa_progs[i].entry);
}

static struct hybrid_map *find_map(const char *name, struct hybrid_map_desc *desc)
{
    struct hybrid_map *m;

    if (name == NULL)
        return NULL;
    for (uint32_t i = 0; i < nr_maps; i++)
        if (strcmp(map_names[i], name) == 0) {
            m = hybrid_region_map(hybrid_sa_region, i);
            return hybrid_map_describe(m, desc) == 0 ? m : NULL;
        }
    return NULL;
}

/* Bytes a lookup writes and an update reads: per-CPU maps hold one value per CPU (each rounded up to 8
 * bytes), maps of maps a u64 (the inner map's offset in the region). */
static uint64_t value_bytes(const struct hybrid_map_desc *d)
{
    if (is_percpu(d->type))
        return (uint64_t)(d->value_size + 7) / 8 * 8 * d->nr_cpus;
    if (is_map_of_maps(d->type))
        return 8;
    return d->value_size;
}

/* --- the library interface (standalone.h) ----------------------------------------- */

#define SA_EXPORT __attribute__((visibility("default")))

SA_EXPORT uint64_t SA_API(run)(void *ctx, size_t len)
{
    return hybrid_sa_progs[0].entry(ctx, len);
}

SA_EXPORT const char *SA_API(map_name)(uint32_t index)
{
    return index < nr_maps ? map_names[index] : NULL;
}

SA_EXPORT int64_t SA_API(map_value_size)(const char *map)
{
    struct hybrid_map_desc d;

    return find_map(map, &d) ? (int64_t)value_bytes(&d) : -EBADF;
}

SA_EXPORT int SA_API(map_lookup)(const char *map, const void *key, void *value)
{
    struct hybrid_map_desc d;
    struct hybrid_map *m = find_map(map, &d);

    if (m == NULL)
        return -EBADF;
    if (d.type == T_QUEUE || d.type == T_STACK)
        return (int)hybrid_map_peek(m, value);
    return (int)hybrid_map_lookup_copy(m, key, value);
}

SA_EXPORT int SA_API(map_update)(const char *map, const void *key, const void *value, uint64_t flags)
{
    struct hybrid_map_desc d;
    struct hybrid_map *m = find_map(map, &d);

    if (m == NULL)
        return -EBADF;
    if (d.type == T_QUEUE || d.type == T_STACK || d.type == T_BLOOM_FILTER)
        return (int)hybrid_map_push(m, value, flags);
    if (is_percpu(d.type))
        return (int)hybrid_map_update_all_cpus(m, key, value, flags);
    return (int)hybrid_map_update(m, key, value, flags);
}

SA_EXPORT int SA_API(map_delete)(const char *map, const void *key)
{
    struct hybrid_map_desc d;
    struct hybrid_map *m = find_map(map, &d);

    return m ? (int)hybrid_map_delete(m, key) : -EBADF;
}

SA_EXPORT int SA_API(map_next_key)(const char *map, const void *key, void *next_key)
{
    struct hybrid_map_desc d;
    struct hybrid_map *m = find_map(map, &d);

    return m ? hybrid_map_next_key(m, key, next_key) : -EBADF;
}

#ifdef HYBRID_SA_MAIN
/* --- the executable ------------------------------------------------------------------ */

#include <time.h>

static void put_hex(FILE *f, const unsigned char *p, uint64_t n)
{
    fputc('"', f);
    for (uint64_t i = 0; i < n; i++)
        fprintf(f, "%02x", p[i]);
    fputc('"', f);
}

static void put_str(FILE *f, const char *s)
{
    fputc('"', f);
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;

        if (c == '"' || c == '\\')
            fprintf(f, "\\%c", c);
        else if (c < 0x20 || c >= 0x7f)
            fprintf(f, "\\u%04x", c);
        else
            fputc(c, f);
    }
    fputc('"', f);
}

/* The name of the map at region offset `off` (a map of maps' value), or NULL. */
static const char *map_at(uint64_t off)
{
    static struct hybrid_map_desc d;
    struct hybrid_map *m;

    for (uint32_t i = 0; (m = hybrid_region_map(hybrid_sa_region, i)) != NULL; i++)
        if (hybrid_map_describe(m, &d) == 0 && d.self_off == off)
            return d.name;
    return NULL;
}

static void dump_entry(FILE *f, const struct hybrid_map_desc *d, const unsigned char *key, const unsigned char *value)
{
    fputs("{\"key\": ", f);
    put_hex(f, key, d->key_size);
    if (is_percpu(d->type)) {
        uint64_t stride = (uint64_t)(d->value_size + 7) / 8 * 8;

        fputs(", \"values\": [", f);
        for (uint32_t c = 0; c < d->nr_cpus; c++) {
            fputs(c ? ", " : "", f);
            put_hex(f, value + c * stride, d->value_size);
        }
        fputc(']', f);
    } else if (is_map_of_maps(d->type)) {
        uint64_t off;
        const char *inner;

        memcpy(&off, value, 8);
        inner = map_at(off);
        fputs(", \"value\": ", f);
        if (inner)
            put_str(f, inner);
        else
            put_hex(f, value, 8);
    } else {
        fputs(", \"value\": ", f);
        put_hex(f, value, d->value_size);
        if (d->type == T_PROG_ARRAY) {  /* a program id: its name */
            uint32_t id;

            memcpy(&id, value, 4);
            for (uint32_t i = 0; i < hybrid_sa_nprogs; i++)
                if (hybrid_sa_progs[i].id == id) {
                    fputs(", \"program\": ", f);
                    put_str(f, hybrid_sa_progs[i].name);
                }
        }
    }
    fputc('}', f);
}

/* {"r0": N, "maps": {"name": {"type": ..., "key_size": ..., "value_size": ..., "max_entries": ...,
 * "entries": [{"key": HEX, "value": HEX}, ...]}, ...}}: bytes as hex strings; per-CPU maps "values" (one
 * per CPU) instead of "value"; maps of maps the inner map's name; prog arrays also "program" (the
 * program's name; only programs a tail call of the program can reach are compiled in).  Maps without keys (ring buffers, perf event arrays, queues, stacks, bloom
 * filters) have no "entries". */
static int dump_maps(FILE *f, uint64_t r0)
{
    struct hybrid_map *m;
    struct hybrid_map_desc d;

    fprintf(f, "{\"r0\": %llu, \"maps\": {", (unsigned long long)r0);
    for (uint32_t i = 0; (m = hybrid_region_map(hybrid_sa_region, i)) != NULL; i++) {
        unsigned char *key, *next, *value;
        int first = 1, rc;

        if (hybrid_map_describe(m, &d) != 0)
            continue;
        fputs(i ? ",\n  " : "\n  ", f);
        put_str(f, d.name);
        fprintf(f, ": {\"type\": \"%s\", \"key_size\": %u, \"value_size\": %u, \"max_entries\": %u",
                d.type < sizeof(type_names) / sizeof(type_names[0]) && type_names[d.type] ? type_names[d.type]
                                                                                         : "unknown",
                d.key_size, d.value_size, d.max_entries);
        if (d.type == T_RINGBUF || d.type == T_PERF_EVENT_ARRAY || d.type == T_QUEUE || d.type == T_STACK ||
            d.type == T_BLOOM_FILTER) {
            fputc('}', f);
            continue;
        }
        key = calloc(1, d.key_size + 1);
        next = calloc(1, d.key_size + 1);
        value = calloc(1, value_bytes(&d) + 8);
        if (!key || !next || !value) {
            fprintf(stderr, "out of memory\n");
            return -1;
        }
        fputs(", \"entries\": [", f);
        for (rc = hybrid_map_next_key(m, NULL, next); rc == 0; rc = hybrid_map_next_key(m, key, next)) {
            memcpy(key, next, d.key_size);
            if (hybrid_map_lookup_copy(m, key, value) != 0)
                continue;  /* an empty slot of a prog array or array of maps */
            fputs(first ? "" : ", ", f);
            first = 0;
            dump_entry(f, &d, key, value);
        }
        fputs("]}", f);
        free(key);
        free(next);
        free(value);
    }
    fputs("\n}}\n", f);
    return 0;
}

static int read_all(FILE *in, unsigned char **data, size_t *len)
{
    size_t cap = 4096, n = 0, got;
    unsigned char *buf = malloc(cap), *p;

    if (!buf)
        return -1;
    while ((got = fread(buf + n, 1, cap - n, in)) > 0) {
        n += got;
        if (n == cap) {
            if (!(p = realloc(buf, cap *= 2))) {
                free(buf);
                return -1;
            }
            buf = p;
        }
    }
    if (ferror(in)) {
        free(buf);
        return -1;
    }
    *data = buf;
    *len = n;
    return 0;
}

static int usage(const char *argv0, FILE *f)
{
    fprintf(f,
            "usage: %s [--dump-maps] [--repeat N] [FILE|-]\n"
            "Runs eBPF program '%s' of %s (compiled by hybrid aot build) once on the bytes of FILE\n"
            "(standard input without FILE, or with -) as its context, and prints r0:\n"
            "    r0 = <decimal> (0x<hex>)\n"
            "  --dump-maps  then print r0 and every map as JSON\n"
            "  --repeat N   run N times, each on a fresh copy of the context (maps keep their state);\n"
            "               prints the time per run on standard error\n"
            "trace_printk lines go to standard error ($HYBRID_TRACE_PIPE to choose a file)\n",
            argv0, hybrid_sa_progs[0].name, hybrid_sa_object);
    return f == stderr ? 2 : 0;
}

int main(int argc, char **argv)
{
    const char *path = NULL;
    unsigned long long repeat = 1;
    int dump = 0;
    unsigned char *input = NULL, *ctx;
    size_t len = 0;
    uint64_t r0 = 0;
    struct timespec t0, t1;
    FILE *in;

    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--dump-maps") == 0) {
            dump = 1;
        } else if (strcmp(argv[i], "--repeat") == 0 && i + 1 < argc) {
            char *end;

            errno = 0;
            repeat = strtoull(argv[++i], &end, 10);
            if (errno || *end || repeat == 0 || argv[i][0] == '-') {
                fprintf(stderr, "%s: --repeat wants a positive number, not '%s'\n", argv[0], argv[i]);
                return 2;
            }
        } else if (strcmp(argv[i], "-h") == 0 || strcmp(argv[i], "--help") == 0) {
            return usage(argv[0], stdout);
        } else if (path == NULL && (argv[i][0] != '-' || strcmp(argv[i], "-") == 0)) {
            path = argv[i];
        } else {
            return usage(argv[0], stderr);
        }
    }
    if (getenv("HYBRID_TRACE_PIPE") == NULL)
        hybrid_trace_set_fd(2);
    in = path == NULL || strcmp(path, "-") == 0 ? stdin : fopen(path, "rb");
    if (in == NULL || read_all(in, &input, &len) != 0) {
        fprintf(stderr, "%s: cannot read %s: %s\n", argv[0], path ? path : "standard input", strerror(errno));
        return 2;
    }
    if (in != stdin)
        fclose(in);
    /* the program's copy of the context: zero-padded, so that a read a little past its end reads 0 */
    ctx = calloc(1, len + SA_PAGE);
    if (ctx == NULL) {
        fprintf(stderr, "%s: out of memory\n", argv[0]);
        return 2;
    }
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (unsigned long long i = 0; i < repeat; i++) {
        memcpy(ctx, input, len);
        r0 = SA_API(run)(len ? ctx : NULL, len);  /* no context: r1 = NULL, as the engines do */
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    printf("r0 = %llu (0x%llx)\n", (unsigned long long)r0, (unsigned long long)r0);
    if (repeat > 1)
        fprintf(stderr, "%llu runs, %.1f ns per run\n", repeat,
                ((t1.tv_sec - t0.tv_sec) * 1e9 + (t1.tv_nsec - t0.tv_nsec)) / (double)repeat);
    if (dump && dump_maps(stdout, r0) != 0)
        return 2;
    fflush(stdout);
    free(ctx);
    free(input);
    return 0;
}
#endif /* HYBRID_SA_MAIN */
