// Subprograms: static noinline functions in .text called from two programs, a chain of
// calls, a global function, and a bpf_loop callback (an lddw of a function address).
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

u64 total;

static __noinline int leaf(int x)
{
	return x * 7 + 1;
}

static __noinline int middle(int x)
{
	return leaf(x) + leaf(x + 1);
}

static __noinline int other(int x)
{
	return x ^ 0x55;
}

__noinline int global_fn(int x)
{
	return middle(x) - 3;
}

static long loop_cb(u32 index, void *ctx)
{
	total += index;
	return 0;
}

SEC("uprobe")
int prog_a(void *ctx)
{
	int r = middle(3) + other(4);
	bpf_loop(10, loop_cb, NULL, 0);
	return r;
}

SEC("uprobe")
int prog_b(void *ctx)
{
	return other(1) + global_fn(2);
}

SEC("uprobe")
int prog_c(void *ctx)
{
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
