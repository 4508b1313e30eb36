// Every map type through hybrid.load(), one program per map family; checked by
// tests/user/test_object_maps.py through obj.maps on every engine.
// Context: struct pt_regs (uprobe); the test passes the arguments in di, si, dx, cx, r8.
// Programs return `long` so that r0 carries the whole 64-bit result.
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

char LICENSE[] SEC("license") = "GPL";

#define NONE 0xdead0000beefULL    /* "no such element" in a program's result */

#define A1(ctx) PT_REGS_PARM1(ctx)
#define A2(ctx) PT_REGS_PARM2(ctx)
#define A3(ctx) PT_REGS_PARM3(ctx)
#define A4(ctx) PT_REGS_PARM4(ctx)
#define A5(ctx) PT_REGS_PARM5(ctx)

/* --- hash, lru_hash, array: u32 -> u64 ------------------------------------------------- */

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 8);
    __type(key, u32);
    __type(value, u64);
} hash SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_LRU_HASH);
    __uint(max_entries, 8);
    __type(key, u32);
    __type(value, u64);
} lru_hash SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 8);
    __type(key, u32);
    __type(value, u64);
} array SEC(".maps");

enum { KV_UPDATE, KV_LOOKUP, KV_DELETE, KV_ADD };

/* A subprogram taking the map as an argument. */
static __noinline long kv_op(void *map, u64 op, u32 key, u64 value, u64 flags)
{
    u64 *v;

    switch (op) {
    case KV_UPDATE:
        return bpf_map_update_elem(map, &key, &value, flags);
    case KV_LOOKUP:
        v = bpf_map_lookup_elem(map, &key);
        return v ? *v : NONE;
    case KV_DELETE:
        return bpf_map_delete_elem(map, &key);
    case KV_ADD:
        v = bpf_map_lookup_elem(map, &key);
        if (!v)
            return NONE;
        __sync_fetch_and_add(v, value);
        return *v;
    }
    return -22;
}

/* kv(which, op, key, value, flags): which 0 = hash, 1 = lru_hash, 2 = array */
SEC("uprobe")
long kv(struct pt_regs *ctx)
{
    u64 which = A1(ctx), op = A2(ctx), value = A4(ctx), flags = A5(ctx);
    u32 key = A3(ctx);

    if (which == 0)
        return kv_op(&hash, op, key, value, flags);
    if (which == 1)
        return kv_op(&lru_hash, op, key, value, flags);
    return kv_op(&array, op, key, value, flags);
}

/* --- per-CPU maps: u32 -> u64 ---------------------------------------------------------- */

struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_HASH);
    __uint(max_entries, 8);
    __type(key, u32);
    __type(value, u64);
} pc_hash SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __uint(max_entries, 4);
    __type(key, u32);
    __type(value, u64);
} pc_array SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_LRU_PERCPU_HASH);
    __uint(max_entries, 8);
    __type(key, u32);
    __type(value, u64);
} pc_lru SEC(".maps");

/* The current CPU's value += add (created as `add` when missing), then the
 * value on CPU `cpu` through bpf_map_lookup_percpu_elem (NONE if missing). */
static __noinline long percpu_op(void *map, u32 key, u64 add, u32 cpu)
{
    u64 *v = bpf_map_lookup_elem(map, &key);

    if (v)
        *v += add;
    else if (bpf_map_update_elem(map, &key, &add, BPF_NOEXIST))
        return NONE - 1;
    v = bpf_map_lookup_percpu_elem(map, &key, cpu);
    return v ? *v : NONE;
}

/* percpu(which, key, add, cpu): which 0 = pc_hash, 1 = pc_array, 2 = pc_lru */
SEC("uprobe")
long percpu(struct pt_regs *ctx)
{
    u64 which = A1(ctx), add = A3(ctx);
    u32 key = A2(ctx), cpu = A4(ctx);

    if (which == 0)
        return percpu_op(&pc_hash, key, add, cpu);
    if (which == 1)
        return percpu_op(&pc_array, key, add, cpu);
    return percpu_op(&pc_lru, key, add, cpu);
}

/* --- queue, stack, bloom filter ---------------------------------------------------------- */

struct {
    __uint(type, BPF_MAP_TYPE_QUEUE);
    __uint(max_entries, 4);
    __type(value, u64);
} queue SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_STACK);
    __uint(max_entries, 4);
    __type(value, u64);
} stack SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_BLOOM_FILTER);
    __uint(max_entries, 1024);
    __type(value, u64);
    __uint(map_extra, 5);
} bloom SEC(".maps");

enum { QS_PUSH, QS_POP, QS_PEEK };

static __noinline long qs_op(void *map, u64 op, u64 value, u64 flags)
{
    long rc;

    switch (op) {
    case QS_PUSH:
        return bpf_map_push_elem(map, &value, flags);
    case QS_POP:
        rc = bpf_map_pop_elem(map, &value);
        return rc ? rc : (long)value;
    case QS_PEEK:
        rc = bpf_map_peek_elem(map, &value);
        return rc ? rc : (long)value;
    }
    return -22;
}

/* qs(which, op, value, flags): which 0 = queue, 1 = stack, 2 = bloom (peek = membership test) */
SEC("uprobe")
long qs(struct pt_regs *ctx)
{
    u64 which = A1(ctx), op = A2(ctx), value = A3(ctx), flags = A4(ctx);

    if (which == 0)
        return qs_op(&queue, op, value, flags);
    if (which == 1)
        return qs_op(&stack, op, value, flags);
    return qs_op(&bloom, op, value, flags);
}

/* --- LPM trie: IPv4 prefixes -> u64 ------------------------------------------------------ */

struct ipv4_key {
    u32 prefixlen;
    u8 addr[4];
};

struct {
    __uint(type, BPF_MAP_TYPE_LPM_TRIE);
    __uint(max_entries, 16);
    __type(key, struct ipv4_key);
    __type(value, u64);
    __uint(map_flags, BPF_F_NO_PREALLOC);
} lpm SEC(".maps");

/* lpm(op, addr (network order in the low 4 bytes), prefixlen, value) */
SEC("uprobe")
long lpm_prog(struct pt_regs *ctx)
{
    struct ipv4_key key = {.prefixlen = A3(ctx)};
    u64 op = A1(ctx), value = A4(ctx), *v;
    u32 addr = A2(ctx);

    __builtin_memcpy(key.addr, &addr, 4);
    switch (op) {
    case KV_UPDATE:
        return bpf_map_update_elem(&lpm, &key, &value, BPF_ANY);
    case KV_LOOKUP:
        v = bpf_map_lookup_elem(&lpm, &key);
        return v ? *v : NONE;
    case KV_DELETE:
        return bpf_map_delete_elem(&lpm, &key);
    }
    return -22;
}

/* --- maps of maps ---------------------------------------------------------------------------- */

struct inner_array {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 4);
    __type(key, u32);
    __type(value, u64);
} inner_a SEC(".maps"), inner_b SEC(".maps"), inner_c SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
    __uint(max_entries, 4);
    __type(key, u32);
    __array(values, struct inner_array);
} outer_array SEC(".maps") = {
    .values = { [0] = &inner_a, [2] = &inner_b },
};

struct inner_hash {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 4);
    __type(key, u32);
    __type(value, u64);
} inner_h1 SEC(".maps"), inner_h2 SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_HASH_OF_MAPS);
    __uint(max_entries, 4);
    __type(key, u32);
    __array(values, struct inner_hash);
} outer_hash SEC(".maps");

/* mim(which, outer_key, inner_key, add): inner[inner_key] += add in the inner
 * map outer[outer_key] (array of maps: which 0; hash of maps: which 1, where a
 * missing inner key is created); the new value, NONE without an inner map. */
SEC("uprobe")
long mim(struct pt_regs *ctx)
{
    u32 outer_key = A2(ctx), inner_key = A3(ctx);
    u64 add = A4(ctx), *v;
    void *inner;

    if (A1(ctx) == 0)
        inner = bpf_map_lookup_elem(&outer_array, &outer_key);
    else
        inner = bpf_map_lookup_elem(&outer_hash, &outer_key);
    if (!inner)
        return NONE;
    v = bpf_map_lookup_elem(inner, &inner_key);
    if (v) {
        *v += add;
        return *v;
    }
    if (bpf_map_update_elem(inner, &inner_key, &add, BPF_NOEXIST))
        return NONE - 1;
    return add;
}

/* --- ring buffer ---------------------------------------------------------------------------- */

struct {
    __uint(type, BPF_MAP_TYPE_RINGBUF);
    __uint(max_entries, 4096);
} ring SEC(".maps");

struct record {
    u64 seq;
    u64 value;
};

enum { RB_OUTPUT, RB_SUBMIT, RB_DISCARD, RB_QUERY, RB_RESERVE_SIZE };

/* rb(op, seq, value, arg): output / reserve+submit / reserve+discard a record
 * {seq, value}; query(arg); reserve 2048 bytes starting with seq and submit
 * (1 if reserved, else 0). */
SEC("uprobe")
long rb(struct pt_regs *ctx)
{
    struct record r = {.seq = A2(ctx), .value = A3(ctx)}, *p;
    u64 op = A1(ctx), arg = A4(ctx);
    void *raw;

    switch (op) {
    case RB_OUTPUT:
        return bpf_ringbuf_output(&ring, &r, sizeof(r), 0);
    case RB_SUBMIT:
    case RB_DISCARD:
        p = bpf_ringbuf_reserve(&ring, sizeof(*p), 0);
        if (!p)
            return NONE;
        *p = r;
        if (op == RB_SUBMIT)
            bpf_ringbuf_submit(p, 0);
        else
            bpf_ringbuf_discard(p, 0);
        return 0;
    case RB_QUERY:
        return bpf_ringbuf_query(&ring, arg);
    case RB_RESERVE_SIZE:
        raw = bpf_ringbuf_reserve(&ring, 2048, 0);
        if (!raw)
            return 0;
        *(u64 *)raw = A2(ctx);
        bpf_ringbuf_submit(raw, 0);
        return 1;
    }
    return -22;
}

/* --- perf event array ------------------------------------------------------------------------ */

struct {
    __uint(type, BPF_MAP_TYPE_PERF_EVENT_ARRAY);
    __uint(key_size, sizeof(u32));
    __uint(value_size, sizeof(u32));
} perf SEC(".maps");    /* max_entries: the number of possible CPUs, as libbpf sets it */

/* perf_out(flags, seq, value): perf_event_output of {seq, value} */
SEC("uprobe")
long perf_out(struct pt_regs *ctx)
{
    struct record r = {.seq = A2(ctx), .value = A3(ctx)};

    return bpf_perf_event_output(ctx, &perf, A1(ctx), &r, sizeof(r));
}

/* --- prog array: tail calls ---------------------------------------------------------------- */

long tail_a(struct pt_regs *ctx);

struct {
    __uint(type, BPF_MAP_TYPE_PROG_ARRAY);
    __uint(max_entries, 4);
    __type(key, u32);
    __array(values, long (struct pt_regs *));
} jumps SEC(".maps") = {
    .values = { [0] = (void *)&tail_a },
};

u64 tail_hops;    /* .bss: executions of tail_loop */

/* tail_entry(index, x): tail call jumps[index]; 0xfa11 + index when that fails */
SEC("uprobe")
long tail_entry(struct pt_regs *ctx)
{
    bpf_tail_call(ctx, &jumps, A1(ctx));
    return 0xfa11 + A1(ctx);
}

SEC("uprobe")
long tail_a(struct pt_regs *ctx)
{
    return 1000 + A2(ctx);
}

SEC("uprobe")
long tail_b(struct pt_regs *ctx)
{
    return 2000 + A2(ctx);
}

/* installed by the test in jumps[3]: tail-calls itself until the limit */
SEC("uprobe")
long tail_loop(struct pt_regs *ctx)
{
    __sync_fetch_and_add(&tail_hops, 1);
    bpf_tail_call(ctx, &jumps, 3);
    return 0x1009;
}

/* --- global data, const volatile, a subprogram chain ----------------------------------------- */

const volatile u64 scale = 1;
const volatile char tag[8] = "default";
u64 acc = 5;          /* .data */
u64 runs;             /* .bss */
u32 history[4];       /* .bss */

static __noinline u64 square(u64 x)
{
    return x * x;
}

static __noinline u64 poly(u64 x)
{
    return square(x) * scale + x;    /* a subprogram calling a subprogram */
}

/* globals(x): acc += poly(x); history[runs % 4] = x; runs++; returns acc + tag[0] */
SEC("uprobe")
long globals(struct pt_regs *ctx)
{
    u64 x = A1(ctx);

    acc += poly(x);
    history[runs & 3] = x;
    runs++;
    return acc + tag[0];
}

/* --- stack traces ------------------------------------------------------------------------------ */

struct {
    __uint(type, BPF_MAP_TYPE_STACK_TRACE);
    __uint(max_entries, 64);
    __uint(key_size, sizeof(u32));
    __uint(value_size, 8 * sizeof(u64));
} stacks SEC(".maps");

/* stackid(flags in r8): the id of the user stack of the context (regs ip, bp chain) */
SEC("uprobe")
long stackid(struct pt_regs *ctx)
{
    return bpf_get_stackid(ctx, &stacks, A5(ctx));
}
