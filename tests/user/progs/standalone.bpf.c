// Programs built into standalone binaries by tests/standalone/test_standalone.py (hybrid aot build),
// whose results and maps are compared with the JIT's.  Context: struct pt_regs (uprobe), or any bytes
// (checksum).  Global data of every kind, hash/array/per-CPU/LPM maps, a prog array with initial
// values, bpf_loop, snprintf, strncmp; `peek` calls helpers a standalone binary refuses.
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

char LICENSE[] SEC("license") = "GPL";

const volatile u64 scale = 3;          /* .rodata */
const volatile char greeting[8] = "hello";
u64 bias = 1000;                       /* .data */
u64 runs;                              /* .bss */
char line[32];                         /* .bss: snprintf's output */

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 64);
    __type(key, u32);
    __type(value, u64);
} counts SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 8);
    __type(key, u32);
    __type(value, u64);
} hist SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __uint(max_entries, 1);
    __type(key, u32);
    __type(value, u64);
} percpu_runs SEC(".maps");

struct lpm_key {
    u32 prefixlen;
    u32 addr;
};

struct {
    __uint(type, BPF_MAP_TYPE_LPM_TRIE);
    __uint(max_entries, 16);
    __type(key, struct lpm_key);
    __type(value, u64);
    __uint(map_flags, BPF_F_NO_PREALLOC);
} routes SEC(".maps");

/* count(key, add): counts[key] += add (created at add); hist[key % 8]++; runs++;
 * returns counts[key] * scale + bias + greeting[0] */
SEC("uprobe")
long count(struct pt_regs *ctx)
{
    u32 key = PT_REGS_PARM1(ctx), zero = 0, slot = key % 8;
    u64 add = PT_REGS_PARM2(ctx), *v, *h, *pc;

    v = bpf_map_lookup_elem(&counts, &key);
    if (v)
        __sync_fetch_and_add(v, add);
    else
        bpf_map_update_elem(&counts, &key, &add, BPF_NOEXIST);
    h = bpf_map_lookup_elem(&hist, &slot);
    if (h)
        __sync_fetch_and_add(h, 1);
    pc = bpf_map_lookup_elem(&percpu_runs, &zero);
    if (pc)
        *pc += 1;
    runs++;
    v = bpf_map_lookup_elem(&counts, &key);
    return (v ? *v : 0) * scale + bias + greeting[0];
}

/* checksum: FNV-1a over the first 64 bytes of any context, kept in counts[len]; bias += 1 */
SEC("uprobe")
long checksum(void *ctx)
{
    u64 h = 0xcbf29ce484222325ULL;
    u8 *p = ctx;

    for (int i = 0; i < 64; i++) {
        h ^= p[i];
        h *= 0x100000001b3ULL;
    }
    u32 key = h & 63;
    bpf_map_update_elem(&counts, &key, &h, BPF_ANY);
    bias += 1;
    return h;
}

static long add_square(u64 i, u64 *sum)
{
    *sum += i * i;
    return 0;
}

/* helpers(n): bpf_loop sum of squares below n, snprintf into `line`, strncmp with greeting */
SEC("uprobe")
long helpers(struct pt_regs *ctx)
{
    u64 n = PT_REGS_PARM1(ctx), sum = 0;
    u64 args[2];
    long len, cmp;

    bpf_loop(n, add_square, &sum, 0);
    args[0] = n;
    args[1] = sum;
    len = bpf_snprintf(line, sizeof(line), "n=%llu sum=%llu", args, sizeof(args));
    cmp = bpf_strncmp(line, 2, "n=");
    return sum * 1000 + len * 10 + (cmp == 0);
}

/* routes(op, addr, prefixlen, value): op 0 inserts, 1 looks up (0xdead when missing) */
SEC("uprobe")
long route(struct pt_regs *ctx)
{
    struct lpm_key key = {.prefixlen = PT_REGS_PARM3(ctx), .addr = PT_REGS_PARM2(ctx)};
    u64 value = PT_REGS_PARM4(ctx), *v;

    if (PT_REGS_PARM1(ctx) == 0)
        return bpf_map_update_elem(&routes, &key, &value, BPF_ANY);
    key.prefixlen = 32;
    v = bpf_map_lookup_elem(&routes, &key);
    return v ? *v : 0xdead;
}

/* tick: no context needed; runs++, prints and returns it */
SEC("uprobe")
long tick(void *ctx)
{
    runs++;
    bpf_printk("tick %llu", runs);
    return runs;
}

/* --- tail calls through a prog array with initial values -------------------------------------- */

long jump_a(struct pt_regs *ctx);
long jump_b(struct pt_regs *ctx);

struct {
    __uint(type, BPF_MAP_TYPE_PROG_ARRAY);
    __uint(max_entries, 4);
    __type(key, u32);
    __array(values, long (struct pt_regs *));
} jumps SEC(".maps") = {
    .values = { [0] = (void *)&jump_a, [2] = (void *)&jump_b },
};

/* dispatch(index, x): tail call jumps[index]; 0xfa11 + index when the slot is empty */
SEC("uprobe")
long dispatch(struct pt_regs *ctx)
{
    runs++;
    bpf_tail_call(ctx, &jumps, PT_REGS_PARM1(ctx));
    return 0xfa11 + PT_REGS_PARM1(ctx);
}

SEC("uprobe")
long jump_a(struct pt_regs *ctx)
{
    runs += 10;
    return 1000 + PT_REGS_PARM2(ctx);
}

SEC("uprobe")
long jump_b(struct pt_regs *ctx)
{
    runs += 100;
    return 2000 + PT_REGS_PARM2(ctx) * scale;
}

/* --- refused: needs a traced process ------------------------------------------------------------ */

SEC("uprobe")
long peek(struct pt_regs *ctx)
{
    u64 value = 0;

    bpf_probe_read_user(&value, sizeof(value), (void *)PT_REGS_PARM1(ctx));
    return value + (bpf_get_current_pid_tgid() >> 32);
}
