// Exercises hybrid.load() end to end: a hash map, an array, global data
// (.data, .rodata with a const volatile, .bss), a subprogram, a tail call,
// a ring buffer and a bpf_loop callback.  Context: struct pt_regs (uprobe).
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

char LICENSE[] SEC("license") = "GPL";

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 64);
    __type(key, u64);
    __type(value, u64);
} counts SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 4);
    __type(key, u32);
    __type(value, u64);
} slots SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_RINGBUF);
    __uint(max_entries, 4096);
} events SEC(".maps");

int tail_target(struct pt_regs *ctx);

struct {
    __uint(type, BPF_MAP_TYPE_PROG_ARRAY);
    __uint(max_entries, 2);
    __type(key, u32);
    __array(values, int (struct pt_regs *));
} jumps SEC(".maps") = {
    .values = { [1] = (void *)&tail_target },
};

const volatile u64 multiplier = 1;
u64 total = 100;      /* .data */
u64 calls;            /* .bss */

struct event { u64 arg; u64 total; };

static __noinline u64 scale(u64 x)
{
    return x * multiplier;
}

static long add_index(u32 i, void *ctx)
{
    *(u64 *)ctx += i;
    return 0;
}

SEC("uprobe")
int count(struct pt_regs *ctx)
{
    u64 arg = PT_REGS_PARM1(ctx), one = 1, *v;
    u32 zero = 0;
    u64 sum = 0;

    v = bpf_map_lookup_elem(&counts, &arg);
    if (v)
        __sync_fetch_and_add(v, 1);
    else
        bpf_map_update_elem(&counts, &arg, &one, BPF_NOEXIST);
    v = bpf_map_lookup_elem(&slots, &zero);
    if (v)
        *v += scale(arg);
    total += arg;
    calls++;
    bpf_loop(5, add_index, &sum, 0);   /* 0+1+2+3+4 = 10 */
    struct event *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
    if (e) {
        e->arg = arg;
        e->total = total;
        bpf_ringbuf_submit(e, 0);
    }
    if (arg == 7)
        bpf_tail_call(ctx, &jumps, 1);
    return sum + arg;
}

SEC("uprobe")
int tail_target(struct pt_regs *ctx)
{
    return 1000 + PT_REGS_PARM1(ctx);
}
