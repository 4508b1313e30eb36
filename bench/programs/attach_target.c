// SPDX-License-Identifier: GPL-2.0
/*
 * The attach benchmark's target and its probes (bench/bench_attach.py), one
 * source built three ways:
 *
 *   gcc -O2 attach_target.c -o attach_target
 *       the target process.  First thing in main it calls each attach_fnN
 *       once (with 0: no effect on the results), so a probe attached before
 *       main has fired once when the target writes "ready <pid>\n" to
 *       stdout; then it reads commands from stdin, one per line: "N"
 *       calls each of attach_fn0 .. attach_fn9 N times (through a function
 *       pointer table, so every call is a real call) and answers
 *       "done <sum>\n".  It exits at end of input.  Only read(2) and
 *       write(2): a thread stopped by ptrace inside them holds no stdio or
 *       malloc lock the injected agent could need.
 *
 *   attach_target --gate FD PROGRAM ARGS...
 *       the launcher the kernel side starts a probed command with (what
 *       bpftrace -c does): it waits for one byte on FD, then execs PROGRAM
 *       with the same pid, so uprobes attached for that pid in between
 *       are in place before PROGRAM's first instruction.
 *
 *   clang -O2 -target bpf -c attach_target.c [-DTARGET_EXE='"/path"']
 *       the probes (__bpf__): `count` in a bare SEC("uprobe") section, which
 *       libbpf attaches by file offset (the kernel side); with TARGET_EXE,
 *       `count_0` .. `count_9` in SEC("uprobe/<exe>:attach_fnN") sections,
 *       which hybrid's BpfObject.attach/launch attach by section name (with
 *       -DONE_PROBE too, only `count_0`: the object the "load + attach" row
 *       loads, one program like the kernel's).
 *       Every body is the same: one ARRAY lookup and one atomic add on
 *       slot 0 of `counts`, so the benchmark can check that a probe fired.
 */
#define NFUNCS 10

#ifdef __bpf__

#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "GPL";

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, u32);
	__type(value, u64);
} counts SEC(".maps");

static __always_inline int bump(void)
{
	u32 slot = 0;
	u64 *p = bpf_map_lookup_elem(&counts, &slot);

	if (p)
		__sync_fetch_and_add(p, 1);
	return 0;
}

#ifndef TARGET_EXE

SEC("uprobe")
int count(struct pt_regs *ctx)
{
	return bump();
}

#else

#define PROBE(n)                                                        \
	SEC("uprobe/" TARGET_EXE ":attach_fn" #n)                       \
	int count_##n(struct pt_regs *ctx)                              \
	{                                                               \
		return bump();                                          \
	}

PROBE(0)
#ifndef ONE_PROBE
PROBE(1)
PROBE(2)
PROBE(3)
PROBE(4)
PROBE(5)
PROBE(6)
PROBE(7)
PROBE(8)
PROBE(9)
#endif

#endif

#else /* the target */

#include <stdlib.h>
#include <string.h>
#include <unistd.h>

volatile long sink;

/* Ten distinct functions, each with a prologue long enough for a 5-byte jump. */
#define FN(n)                                                           \
	__attribute__((noinline)) long attach_fn##n(long x)             \
	{                                                               \
		long v = sink;                                          \
		sink = v + x;                                           \
		return v * (n + 3) + x;                                 \
	}

FN(0)
FN(1)
FN(2)
FN(3)
FN(4)
FN(5)
FN(6)
FN(7)
FN(8)
FN(9)

static long (*const fns[NFUNCS])(long) = {
	attach_fn0, attach_fn1, attach_fn2, attach_fn3, attach_fn4,
	attach_fn5, attach_fn6, attach_fn7, attach_fn8, attach_fn9,
};

static void say(const char *s, long v)
{
	char buf[64];
	int n = 0;
	char digits[24];
	int d = 0;
	unsigned long u = v < 0 ? -(unsigned long)v : (unsigned long)v;

	while (*s && n < 32)
		buf[n++] = *s++;
	buf[n++] = ' ';
	if (v < 0)
		buf[n++] = '-';
	do {
		digits[d++] = '0' + u % 10;
		u /= 10;
	} while (u);
	while (d)
		buf[n++] = digits[--d];
	buf[n++] = '\n';
	if (write(1, buf, n) != n)
		_exit(2);
}

static int gate(int argc, char **argv)
{
	char c;
	int fd;

	if (argc < 4)
		return 64;
	fd = atoi(argv[2]);
	if (read(fd, &c, 1) != 1)
		return 65; /* the controller went away without releasing us */
	close(fd);
	execv(argv[3], argv + 3);
	return 127;
}

int main(int argc, char **argv)
{
	char line[64];
	size_t len = 0;

	if (argc > 1 && strcmp(argv[1], "--gate") == 0)
		return gate(argc, argv);
	for (int f = 0; f < NFUNCS; f++)
		fns[f](0);
	say("ready", getpid());
	for (;;) {
		ssize_t r = read(0, line + len, sizeof(line) - 1 - len);
		char *nl;

		if (r <= 0)
			return 0;
		len += r;
		line[len] = 0;
		while ((nl = strchr(line, '\n')) != NULL) {
			long n = strtol(line, NULL, 10), s = 0;

			for (long i = 0; i < n; i++)
				for (int f = 0; f < NFUNCS; f++)
					s += fns[f](i);
			say("done", s);
			len -= nl + 1 - line;
			memmove(line, nl + 1, len + 1);
		}
		if (len >= sizeof(line) - 1)
			len = 0; /* a line too long: drop it */
	}
}

#endif
