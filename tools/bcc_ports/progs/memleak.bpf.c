// SPDX-License-Identifier: GPL-2.0
/*
 * memleak: outstanding allocations and the stacks that made them.
 *
 * A libbpf-style port of bcc's memleak (tools/memleak.py, 0.26) for hybrid.
 * The bodies are bcc's (gen_alloc_enter, gen_alloc_exit2, gen_free_enter,
 * the combined statistics); what bcc substitutes into its text is here a
 * `const volatile` set before load (trace_all, sample_every_n, the size
 * filter, the stack flags) or, for what names sections, a macro given on
 * the compiler's command line:
 *
 *   OBJ            the allocator's object, "/path/to/libc.so.6" (bcc's -O)
 *   HAVE_<fn>      the object defines <fn> (valloc, pvalloc and aligned_alloc
 *                  may be missing: bcc's can_fail)
 *   KERNEL_TRACE   kernel allocators (kmem and page tracepoints) instead of
 *                  uprobes; with PERCPU the percpu tracepoints (--percpu)
 *   STACK_WALK     walk user stacks in the program (user mode; see below)
 *   STOP_AT_EXIT   with LIBC="/path/to/libc.so.6": stop a command the tool
 *                  started when it exits, until its maps are read
 *
 * The uprobes run inside the traced process with hybrid (a few ns per hit
 * instead of microseconds) or as kernel uprobes (--mode kernel).
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

#ifndef OBJ
#define OBJ "libc.so.6"
#endif
#define PERF_MAX_STACK_DEPTH 127

const volatile bool trace_all = false;       /* -t: bpf_trace_printk each call */
const volatile __u64 sample_every_n = 1;     /* -s */
const volatile __u64 min_size = 0;           /* -z: skip size < min_size */
const volatile __u64 max_size = (__u64)-1;   /* -Z: skip size > max_size */
const volatile __u64 stack_flags = 0;        /* BPF_F_USER_STACK for user mode */
const volatile bool wa_missing_free = false; /* --wa-missing-free */
const volatile __u64 page_size = 4096;

struct alloc_info_t {
	__u64 size;
	__u64 timestamp_ns;
	int stack_id;
};

struct combined_alloc_info_t {
	__u64 total_size;
	__u64 number_of_allocs;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 10240);
	__type(key, __u64);
	__type(value, __u64);
} sizes SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1000000);
	__type(key, __u64);
	__type(value, struct alloc_info_t);
} allocs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 10240);
	__type(key, __u64);
	__type(value, __u64);
} memptrs SEC(".maps");

#ifndef STACK_WALK
struct {
	__uint(type, BPF_MAP_TYPE_STACK_TRACE);
	__uint(max_entries, 10240);
	__uint(key_size, sizeof(__u32));
	__uint(value_size, PERF_MAX_STACK_DEPTH * sizeof(__u64));
} stack_traces SEC(".maps");

static __always_inline int get_stackid(void *ctx)
{
	return bpf_get_stackid(ctx, &stack_traces, stack_flags);
}
#else
/*
 * STACK_WALK (user mode, inside the process): the program walks the user
 * stack itself, the way the kernel's perf_callchain_user() does for
 * bpf_get_stackid(BPF_F_USER_STACK) -- regs->ip, then the return address of
 * each {next frame, return address} pair from regs->bp -- and keeps the
 * stacks in a hash of the same layout (id -> PERF_MAX_STACK_DEPTH ips, zero
 * padded), ids being 31 bits of a hash of the frames.
 *
 * Why not bpf_get_stackid: the walk ends by reading the frame that the
 * outermost frame-pointer-less code left in rbp (glibc's
 * __libc_start_call_main leaves 3 there).  The kernel's read fails cheaply;
 * hybrid's helper reads through its fault fixup, a SIGSEGV round trip of
 * about 4 us, on every allocation.  Here a frame address below
 * mmap_min_addr or above the user address space (never readable) ends the
 * walk without a read, which changes no stack.
 */
#define STACK_MIN_ADDR 65536ull             /* mmap_min_addr: nothing is mapped below */
#define STACK_MAX_ADDR 0x00007ffffffff000ull /* x86-64 TASK_SIZE_MAX */

struct stack_ips {
	__u64 ips[PERF_MAX_STACK_DEPTH];
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 10240);
	__type(key, __u32);
	__type(value, struct stack_ips);
} stack_traces SEC(".maps");

struct walk_buf {
	__u64 depth; /* frames of the previous walk: only those need zeroing */
	struct stack_ips s;
};

struct { /* per thread: the walk's buffer (too big for the 512-byte BPF stack) */
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u64);
	__type(value, struct walk_buf);
} stack_scratch SEC(".maps");

static const struct walk_buf zero_walk;

static __always_inline int get_stackid(struct pt_regs *ctx)
{
	__u64 id = bpf_get_current_pid_tgid(), fp, h = 14695981039346656037ull;
	struct walk_buf *w = bpf_map_lookup_elem(&stack_scratch, &id);
	struct stack_ips *s;
	__u32 stack_id;
	int n, i;

	if (!w) {
		bpf_map_update_elem(&stack_scratch, &id, &zero_walk, BPF_NOEXIST);
		w = bpf_map_lookup_elem(&stack_scratch, &id);
		if (!w)
			return -12; /* -ENOMEM */
	}
	s = &w->s;
	s->ips[0] = ctx->ip;
	h = (h ^ ctx->ip) * 1099511628211ull;
	fp = ctx->bp;
	for (n = 1; n < PERF_MAX_STACK_DEPTH; n++) {
		__u64 frame[2];

		if (fp < STACK_MIN_ADDR || fp > STACK_MAX_ADDR)
			break;
		if (bpf_probe_read_user(frame, sizeof(frame), (void *)fp))
			break;
		s->ips[n] = frame[1];
		h = (h ^ frame[1]) * 1099511628211ull;
		fp = frame[0];
	}
	for (i = n; i < w->depth && i < PERF_MAX_STACK_DEPTH; i++) {
		barrier_var(i); /* not a memset() call: BPF has none */
		s->ips[i] = 0;
	}
	w->depth = n;
	stack_id = (__u32)(h ^ (h >> 32)) & 0x7fffffff;
	if (!bpf_map_lookup_elem(&stack_traces, &stack_id)) /* known: the same frames, or (rarely) another stack */
		bpf_map_update_elem(&stack_traces, &stack_id, s, BPF_NOEXIST);
	return stack_id;
}
#endif

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 10240);
	__type(key, __u64);
	__type(value, struct combined_alloc_info_t);
} combined_allocs SEC(".maps");

static __always_inline void update_statistics_add(__u64 stack_id, __u64 sz)
{
	struct combined_alloc_info_t *existing_cinfo;
	struct combined_alloc_info_t cinfo = {0};

	existing_cinfo = bpf_map_lookup_elem(&combined_allocs, &stack_id);
	if (existing_cinfo != 0)
		cinfo = *existing_cinfo;
	cinfo.total_size += sz;
	cinfo.number_of_allocs += 1;
	bpf_map_update_elem(&combined_allocs, &stack_id, &cinfo, BPF_ANY);
}

static __always_inline void update_statistics_del(__u64 stack_id, __u64 sz)
{
	struct combined_alloc_info_t *existing_cinfo;
	struct combined_alloc_info_t cinfo = {0};

	existing_cinfo = bpf_map_lookup_elem(&combined_allocs, &stack_id);
	if (existing_cinfo != 0)
		cinfo = *existing_cinfo;
	if (sz >= cinfo.total_size)
		cinfo.total_size = 0;
	else
		cinfo.total_size -= sz;
	if (cinfo.number_of_allocs > 0)
		cinfo.number_of_allocs -= 1;
	bpf_map_update_elem(&combined_allocs, &stack_id, &cinfo, BPF_ANY);
}

static __always_inline int gen_alloc_enter(void *ctx, size_t size)
{
	__u64 pid, size64;

	if (size < min_size || size > max_size)
		return 0;
	if (sample_every_n > 1) {
		__u64 ts = bpf_ktime_get_ns();

		if (ts % sample_every_n != 0)
			return 0;
	}
	pid = bpf_get_current_pid_tgid();
	size64 = size;
	bpf_map_update_elem(&sizes, &pid, &size64, BPF_ANY);
	if (trace_all)
		bpf_printk("alloc entered, size = %u\n", size);
	return 0;
}

static __always_inline int gen_alloc_exit2(void *ctx, __u64 address)
{
	__u64 pid = bpf_get_current_pid_tgid();
	__u64 *size64 = bpf_map_lookup_elem(&sizes, &pid);
	struct alloc_info_t info = {0};

	if (size64 == 0)
		return 0; /* missed alloc entry */
	info.size = *size64;
	bpf_map_delete_elem(&sizes, &pid);
	if (address != 0) {
		info.timestamp_ns = bpf_ktime_get_ns();
		info.stack_id = get_stackid(ctx);
		bpf_map_update_elem(&allocs, &address, &info, BPF_ANY);
		update_statistics_add(info.stack_id, info.size);
	}
	if (trace_all)
		bpf_printk("alloc exited, size = %lu, result = %lx\n", info.size, address);
	return 0;
}

static __always_inline int gen_free_enter(void *ctx, void *address)
{
	__u64 addr = (__u64)address;
	struct alloc_info_t *info = bpf_map_lookup_elem(&allocs, &addr);
	__u64 size;

	if (info == 0)
		return 0;
	size = info->size;
	update_statistics_del(info->stack_id, size);
	bpf_map_delete_elem(&allocs, &addr);
	if (trace_all)
		bpf_printk("free entered, address = %lx, size = %lu\n", address, size);
	return 0;
}

#ifndef KERNEL_TRACE

#define UPROBE(fn) SEC("uprobe/" OBJ ":" #fn)
#define URETPROBE(fn) SEC("uretprobe/" OBJ ":" #fn)

/* The release functions first: hybrid's agent patches in this order, so an
 * allocation the agent itself makes while the probes go in (it does some)
 * is never recorded without its free being seen. */
UPROBE(free)
int BPF_KPROBE(free_enter, void *address)
{
	return gen_free_enter(ctx, address);
}

UPROBE(munmap)
int BPF_KPROBE(munmap_enter, void *address)
{
	return gen_free_enter(ctx, address);
}

UPROBE(malloc)
int BPF_KPROBE(malloc_enter, size_t size)
{
	return gen_alloc_enter(ctx, size);
}

URETPROBE(malloc)
int BPF_KRETPROBE(malloc_exit)
{
	return gen_alloc_exit2(ctx, PT_REGS_RC(ctx));
}

UPROBE(calloc)
int BPF_KPROBE(calloc_enter, size_t nmemb, size_t size)
{
	return gen_alloc_enter(ctx, nmemb * size);
}

URETPROBE(calloc)
int BPF_KRETPROBE(calloc_exit)
{
	return gen_alloc_exit2(ctx, PT_REGS_RC(ctx));
}

UPROBE(realloc)
int BPF_KPROBE(realloc_enter, void *ptr, size_t size)
{
	gen_free_enter(ctx, ptr);
	return gen_alloc_enter(ctx, size);
}

URETPROBE(realloc)
int BPF_KRETPROBE(realloc_exit)
{
	return gen_alloc_exit2(ctx, PT_REGS_RC(ctx));
}

UPROBE(mmap)
int BPF_KPROBE(mmap_enter, void *addr, size_t size)
{
	return gen_alloc_enter(ctx, size);
}

URETPROBE(mmap)
int BPF_KRETPROBE(mmap_exit)
{
	return gen_alloc_exit2(ctx, PT_REGS_RC(ctx));
}

UPROBE(posix_memalign)
int BPF_KPROBE(posix_memalign_enter, void **memptr, size_t alignment, size_t size)
{
	__u64 memptr64 = (__u64)(size_t)memptr;
	__u64 pid = bpf_get_current_pid_tgid();

	bpf_map_update_elem(&memptrs, &pid, &memptr64, BPF_ANY);
	return gen_alloc_enter(ctx, size);
}

URETPROBE(posix_memalign)
int BPF_KRETPROBE(posix_memalign_exit)
{
	__u64 pid = bpf_get_current_pid_tgid();
	__u64 *memptr64 = bpf_map_lookup_elem(&memptrs, &pid);
	void *addr;

	if (memptr64 == 0)
		return 0;
	bpf_map_delete_elem(&memptrs, &pid);
	if (bpf_probe_read_user(&addr, sizeof(void *), (void *)(size_t)*memptr64))
		return 0;
	return gen_alloc_exit2(ctx, (__u64)(size_t)addr);
}

#ifdef HAVE_aligned_alloc
UPROBE(aligned_alloc)
int BPF_KPROBE(aligned_alloc_enter, size_t alignment, size_t size)
{
	return gen_alloc_enter(ctx, size);
}

URETPROBE(aligned_alloc)
int BPF_KRETPROBE(aligned_alloc_exit)
{
	return gen_alloc_exit2(ctx, PT_REGS_RC(ctx));
}
#endif

#ifdef HAVE_valloc
UPROBE(valloc)
int BPF_KPROBE(valloc_enter, size_t size)
{
	return gen_alloc_enter(ctx, size);
}

URETPROBE(valloc)
int BPF_KRETPROBE(valloc_exit)
{
	return gen_alloc_exit2(ctx, PT_REGS_RC(ctx));
}
#endif

UPROBE(memalign)
int BPF_KPROBE(memalign_enter, size_t alignment, size_t size)
{
	return gen_alloc_enter(ctx, size);
}

URETPROBE(memalign)
int BPF_KRETPROBE(memalign_exit)
{
	return gen_alloc_exit2(ctx, PT_REGS_RC(ctx));
}

#ifdef HAVE_pvalloc
UPROBE(pvalloc)
int BPF_KPROBE(pvalloc_enter, size_t size)
{
	return gen_alloc_enter(ctx, size);
}

URETPROBE(pvalloc)
int BPF_KRETPROBE(pvalloc_exit)
{
	return gen_alloc_exit2(ctx, PT_REGS_RC(ctx));
}
#endif

#ifdef STOP_AT_EXIT
/* A command the tool started: stop it (SIGSTOP) as it calls _exit, so that
 * the controller can read its /proc/PID/maps to name the stacks before the
 * process is gone, then continue it (SIGCONT).  LIBC is the C library. */
SEC("uprobe/" LIBC ":_exit")
int BPF_KPROBE(memleak__exit)
{
	bpf_send_signal(19 /* SIGSTOP */);
	return 0;
}
#endif

#elif !defined(PERCPU) /* kernel allocators */

SEC("tracepoint/kmem/kmalloc")
int memleak__kmalloc(struct trace_event_raw_kmalloc *args)
{
	if (wa_missing_free)
		gen_free_enter(args, (void *)args->ptr);
	gen_alloc_enter(args, args->bytes_alloc);
	return gen_alloc_exit2(args, (size_t)args->ptr);
}

SEC("tracepoint/kmem/kfree")
int memleak__kfree(struct trace_event_raw_kfree *args)
{
	return gen_free_enter(args, (void *)args->ptr);
}

SEC("tracepoint/kmem/kmem_cache_alloc")
int memleak__kmem_cache_alloc(struct trace_event_raw_kmem_cache_alloc *args)
{
	if (wa_missing_free)
		gen_free_enter(args, (void *)args->ptr);
	gen_alloc_enter(args, args->bytes_alloc);
	return gen_alloc_exit2(args, (size_t)args->ptr);
}

SEC("tracepoint/kmem/kmem_cache_free")
int memleak__kmem_cache_free(struct trace_event_raw_kmem_cache_free *args)
{
	return gen_free_enter(args, (void *)args->ptr);
}

SEC("tracepoint/kmem/mm_page_alloc")
int memleak__mm_page_alloc(struct trace_event_raw_mm_page_alloc *args)
{
	gen_alloc_enter(args, page_size << args->order);
	return gen_alloc_exit2(args, args->pfn);
}

SEC("tracepoint/kmem/mm_page_free")
int memleak__mm_page_free(struct trace_event_raw_mm_page_free *args)
{
	return gen_free_enter(args, (void *)args->pfn);
}

#else /* --percpu */

SEC("tracepoint/percpu/percpu_alloc_percpu")
int memleak__percpu_alloc_percpu(struct trace_event_raw_percpu_alloc_percpu *args)
{
	gen_alloc_enter(args, args->size);
	return gen_alloc_exit2(args, (size_t)args->ptr);
}

SEC("tracepoint/percpu/percpu_free_percpu")
int memleak__percpu_free_percpu(struct trace_event_raw_percpu_free_percpu *args)
{
	return gen_free_enter(args, (void *)args->ptr);
}

#endif

char LICENSE[] SEC("license") = "GPL";
