/*
 * stack_mix - stack-heavy work: arrays of several widths on the stack,
 * loads and stores of 1, 2, 4 and 8 bytes, data-dependent branches, and a
 * call to a small non-inlined function (a bpf-to-bpf `call` in eBPF) that
 * works on the caller's stack through a pointer.
 *
 * One unit: one round over the 16 slots of the state.
 */
#include "bench.h"

#define SLOTS 16
/* The kernel's verifier walks every round (~6,000 instructions of its 1M
 * each, the data-dependent branches of 16 slots and the call): 16 rounds
 * take it ~100k instructions. */
#define MAX_N 16ull

struct state {
    u64 q[SLOTS];       /* 128 bytes */
    u32 d[SLOTS];       /*  64 bytes */
    u16 w[SLOTS];       /*  32 bytes */
    u8 b[2 * SLOTS];    /*  32 bytes */
};

static NOINLINE u64 fold(struct state *s, u64 salt);

ENTRY
{
    u64 n = ctx->n;
    u64 x = ctx->seed | 1;
    u64 out = 0;
    struct state s;

    for (u32 i = 0; i < SLOTS; i++) {
        x = x * 6364136223846793005ull + 1442695040888963407ull;
        s.q[i] = x;
        s.d[i] = (u32)(x >> 17);
        s.w[i] = (u16)(x >> 40);
        s.b[2 * i] = (u8)(x >> 56);
        s.b[2 * i + 1] = (u8)(x >> 3);
    }
    if (n > MAX_N)
        n = MAX_N;
    for (u64 round = 0; round < n; round++) {
        for (u32 i = 0; i < SLOTS; i++) {
            u32 j = (i + (u32)round) & (SLOTS - 1);
            u64 v = s.q[i] ^ s.d[j];

            if (v & 1)
                s.q[i] = v + s.w[j];
            else
                s.q[i] = (v >> 1) ^ ((u64)s.b[2 * j] << 24);
            s.d[j] += (u32)(v >> 7) | s.b[2 * i + 1];
            s.w[i] ^= (u16)(s.q[i] >> 5);
            if (s.w[i] > 0x8000)
                s.b[2 * i] += 3;
            else
                s.b[2 * i + 1] ^= (u8)v;
        }
        out += fold(&s, round);
    }
    return out ^ fold(&s, n);
}

/* The non-inlined callee: reads all four arrays through the caller's stack. */
static NOINLINE u64 fold(struct state *s, u64 salt)
{
    u64 h = salt ^ 0xcbf29ce484222325ull;

    for (u32 i = 0; i < SLOTS; i++) {
        h ^= s->q[i] + s->d[i];
        h *= 0x100000001b3ull;
        h += ((u64)s->w[i] << 16) | s->b[2 * i] | ((u64)s->b[2 * i + 1] << 8);
    }
    return h;
}
