/*
 * @HEADER@ - the C interface of @LIBRARY@, eBPF program '@PROGRAM@' of @OBJECT@
 * compiled ahead of time by `hybrid aot build --lib` with its maps and helpers.
 * The library needs nothing but libc: link with -L<dir> -l@LINKNAME@ (or dlopen it).
 *
 * The maps start as the object defines them (global data, map `values`) when
 * the library is loaded and live as long as it is.  Every function may be
 * called from several threads at once.  Errors are negative errno values:
 *   -EBADF   no map of that name
 *   -ENOENT  no such key (lookup, delete); the last key (next_key)
 *   -EINVAL, -E2BIG, -EEXIST, ...  as the kernel's bpf() answers
 *
 * Values: @PREFIX@_map_value_size(map) bytes.  That is the map's value size,
 * except for per-CPU maps (one value per CPU, each rounded up to 8 bytes:
 * lookup gives all, update sets all) and maps of maps (a u64: the inner map's
 * offset in the maps).  A prog array's value is a u32 program id.  Queues and
 * stacks: lookup peeks, update pushes (the key is ignored); bloom filters:
 * update adds.
 */
#ifndef @GUARD@
#define @GUARD@

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Run the program once: r1 = ctx, r2 = len (for a uprobe program ctx is the 168-byte
 * x86-64 struct pt_regs); the program may write into ctx.  Returns r0. */
uint64_t @PREFIX@_run(void *ctx, size_t len);

/* Copy the value of `key` of map `map` (its name in the object: "counts", ".data", ...) into `value`. */
int @PREFIX@_map_lookup(const char *map, const void *key, void *value);

/* Set `key` to `value`; flags BPF_ANY (0), BPF_NOEXIST (1) or BPF_EXIST (2). */
int @PREFIX@_map_update(const char *map, const void *key, const void *value, uint64_t flags);

/* Remove `key` (-EINVAL for arrays). */
int @PREFIX@_map_delete(const char *map, const void *key);

/* The key after `key` into `next_key` (the first with key NULL); -ENOENT after the last. */
int @PREFIX@_map_next_key(const char *map, const void *key, void *next_key);

/* Bytes a lookup writes into `value` and an update reads from it, or -EBADF. */
int64_t @PREFIX@_map_value_size(const char *map);

/* The name of map number `index` (0, 1, ...), NULL past the last: to list the maps. */
const char *@PREFIX@_map_name(uint32_t index);

#ifdef __cplusplus
}
#endif

#endif /* @GUARD@ */
