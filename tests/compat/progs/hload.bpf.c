// SPDX-License-Identifier: GPL-2.0
/* hload: a libbpf-tools style program for `hybrid load` tests.
 *
 * - SEC("uprobe") / SEC("uretprobe") on hload_work(int x) of the workload,
 *   attached by the loader with bpf_program__attach_uprobe_opts(func_name);
 * - SEC("usdt") on hload:tick (2 args, with a semaphore), attached with
 *   bpf_program__attach_usdt;
 * - SEC("tracepoint/syscalls/sys_enter_getppid"), auto-attached, counting
 *   the calls of the target process only (target_tgid, set before load).
 *
 * Every hit adds to the `totals` array map (calls, sum of the first value,
 * sum of the second) and sends one event through the `events` ring buffer.
 * Ring buffer reservations that fail are counted in `dropped` (.bss).
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/usdt.bpf.h>

/* The event and totals layout; hload.c has the same definitions. */
enum hload_kind {
	HLOAD_UPROBE = 0,
	HLOAD_URETPROBE = 1,
	HLOAD_USDT = 2,
	HLOAD_GETPPID = 3,
	HLOAD_KINDS = 4,
};

struct hload_event {
	__u32 kind;
	__u32 pid;
	__s64 value;  /* uprobe: x; uretprobe: return value; usdt: arg 1; getppid: syscall nr */
	__s64 value2; /* usdt: arg 2; else 0 */
};

struct hload_total {
	__u64 calls;
	__s64 sum;
	__s64 sum2;
};

char LICENSE[] SEC("license") = "GPL";

const volatile int target_tgid = 0;

__u64 dropped = 0;

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
} events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, HLOAD_KINDS);
	__type(key, __u32);
	__type(value, struct hload_total);
} totals SEC(".maps");

static __always_inline void record(__u32 kind, __s64 value, __s64 value2)
{
	struct hload_total *t;
	struct hload_event *e;
	__u32 key = kind;

	t = bpf_map_lookup_elem(&totals, &key);
	if (t) {
		__sync_fetch_and_add(&t->calls, 1);
		__sync_fetch_and_add(&t->sum, value);
		__sync_fetch_and_add(&t->sum2, value2);
	}

	e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		__sync_fetch_and_add(&dropped, 1);
		return;
	}
	e->kind = kind;
	e->pid = bpf_get_current_pid_tgid() >> 32;
	e->value = value;
	e->value2 = value2;
	bpf_ringbuf_submit(e, 0);
}

SEC("uprobe")
int BPF_KPROBE(hload_enter, int x)
{
	record(HLOAD_UPROBE, x, 0);
	return 0;
}

SEC("uretprobe")
int BPF_KRETPROBE(hload_exit, int ret)
{
	record(HLOAD_URETPROBE, ret, 0);
	return 0;
}

SEC("usdt")
int BPF_USDT(hload_tick, long a, long b)
{
	record(HLOAD_USDT, a, b);
	return 0;
}

/* The record of syscalls/sys_enter_getppid is only the common fields and
 * `int __syscall_nr` (12 bytes): struct syscall_trace_enter, not
 * trace_event_raw_sys_enter, whose `long id` would read past it (the kernel
 * refuses to attach a program reading beyond the record: EACCES). */
SEC("tracepoint/syscalls/sys_enter_getppid")
int hload_getppid(struct syscall_trace_enter *ctx)
{
	if ((int)(bpf_get_current_pid_tgid() >> 32) != target_tgid)
		return 0;
	record(HLOAD_GETPPID, ctx->nr, 0);
	return 0;
}
