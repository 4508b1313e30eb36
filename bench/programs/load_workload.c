// SPDX-License-Identifier: GPL-2.0
/* The workload of the load suite (bench/bench_load.py): `load_workload GO_FILE CASE N`.
 *
 * It has what tests/compat/progs/hload.bpf.c probes, defined as in
 * tests/compat/progs/hload_workload.c, so that the hload loader's
 * `-b load_workload` attaches to it: the noinline function hload_work(int)
 * (uprobe + uretprobe) and the USDT probe hload:tick with its semaphore.
 *
 * Prints "waiting PID", waits until GO_FILE exists (polled every 10 ms: the
 * loader is attached first), then times (CLOCK_MONOTONIC) a loop of N
 * iterations of CASE:
 *
 *   work     acc += hload_work(i)                       (the uprobe and uretprobe)
 *   usdt     if (semaphore) DTRACE_PROBE2(hload, tick, i, -1000000007 * i)
 *            (the semaphore read every iteration; the USDT probe fires when set)
 *   getppid  acc += getppid()                           (libc's wrapper: the syscall tracepoint)
 *
 * for i = 1..N, and prints
 *
 *   ns T
 *   did work=W usdt=U getppid=K semaphore=S
 *
 * (T: the loop's nanoseconds; W, U, K: the calls made, the USDT firings, the
 * getppid() calls; S: the semaphore at the end), then exits 0.
 *
 * Build: gcc -O2 -g -Wall -o load_workload load_workload.c   (needs <sys/sdt.h>)
 */
#define _GNU_SOURCE
#define _SDT_HAS_SEMAPHORES 1
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/sdt.h>

/* The USDT semaphore, as `dtrace -G` would define it (see hload_workload.c). */
__extension__ unsigned short hload_tick_semaphore __attribute__((unused)) __attribute__((section(".probes")));
/* read on every iteration (volatile): the check a USDT site pays whether or not it is traced */
#define HLOAD_TICK_ENABLED() __builtin_expect(*(volatile unsigned short *)&hload_tick_semaphore, 0)

__attribute__((noinline)) int hload_work(int x)
{
	__asm__ volatile("" : "+r"(x));
	return 2 * x + 1;
}

static void sleep_ms(long ms)
{
	struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };

	while (nanosleep(&ts, &ts) == -1)
		;
}

int main(int argc, char **argv)
{
	long n, i, work = 0, fired = 0, calls = 0;
	volatile long acc = 0;
	struct timespec a, b;
	char *end;

	if (argc != 4 || (strcmp(argv[2], "work") && strcmp(argv[2], "usdt") && strcmp(argv[2], "getppid"))) {
		fprintf(stderr, "usage: %s GO_FILE work|usdt|getppid N\n", argv[0]);
		return 2;
	}
	n = strtol(argv[3], &end, 10);
	if (*argv[3] == '\0' || *end != '\0' || n < 0) {
		fprintf(stderr, "load_workload: bad N: %s\n", argv[3]);
		return 2;
	}

	printf("waiting %d\n", (int)getpid());
	fflush(stdout);
	while (access(argv[1], F_OK) != 0)
		sleep_ms(10);

	clock_gettime(CLOCK_MONOTONIC, &a);
	if (!strcmp(argv[2], "work")) {
		long s = 0;

		for (i = 1; i <= n; i++)
			s += hload_work((int)i);
		acc = s;
		work = n;
	} else if (!strcmp(argv[2], "usdt")) {
		for (i = 1; i <= n; i++) {
			if (HLOAD_TICK_ENABLED()) {
				int x = (int)i;
				long y = -1000000007L * i;

				DTRACE_PROBE2(hload, tick, x, y);
				fired++;
			}
		}
	} else {
		long s = 0;

		for (i = 0; i < n; i++)
			s += getppid();
		acc = s;
		calls = n;
	}
	clock_gettime(CLOCK_MONOTONIC, &b);

	printf("ns %lld\n", (long long)(b.tv_sec - a.tv_sec) * 1000000000LL + (b.tv_nsec - a.tv_nsec));
	printf("did work=%ld usdt=%ld getppid=%ld semaphore=%u\n", work, fired, calls,
	       (unsigned)hload_tick_semaphore);
	fflush(stdout);
	(void)acc;
	return 0;
}
