// SPDX-License-Identifier: GPL-2.0
/* The workload traced by hload: `hload_workload GO_FILE N M K`.
 *
 * Prints "waiting PID", waits until GO_FILE exists (polled every 10 ms, so a
 * test can start the tracer first), then:
 *   - calls hload_work(i) for i = 1..N (returns 2*i + 1);
 *   - fires the USDT probe hload:tick(i, -1000000007 * i) for i = 1..M, each
 *     time its semaphore is set (HLOAD_TICK_ENABLED()); counts the firings;
 *   - calls getppid() K times;
 * prints "did work=N usdt=FIRED getppid=K semaphore=S" (S: the semaphore's
 * value at the end), sleeps 50 ms and exits 0.
 *
 * Build: cc -O1 -g -o hload_workload hload_workload.c   (needs <sys/sdt.h>)
 */
#define _GNU_SOURCE
#define _SDT_HAS_SEMAPHORES 1
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
#include <sys/sdt.h>

/* The USDT semaphore, as `dtrace -G` would define it: in .probes, named
 * PROVIDER_NAME_semaphore; the kernel increments it while a uprobe with its
 * ref_ctr_offset is attached. */
__extension__ unsigned short hload_tick_semaphore __attribute__((unused)) __attribute__((section(".probes")));
#define HLOAD_TICK_ENABLED() __builtin_expect(hload_tick_semaphore, 0)

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

static long arg(const char *s, const char *what)
{
	char *end;
	long v = strtol(s, &end, 10);

	if (*s == '\0' || *end != '\0' || v < 0) {
		fprintf(stderr, "hload_workload: bad %s: %s\n", what, s);
		exit(2);
	}
	return v;
}

int main(int argc, char **argv)
{
	long n, m, k, i, fired = 0;
	volatile long acc = 0;

	if (argc != 5) {
		fprintf(stderr, "usage: %s GO_FILE N M K\n", argv[0]);
		return 2;
	}
	n = arg(argv[2], "N");
	m = arg(argv[3], "M");
	k = arg(argv[4], "K");

	printf("waiting %d\n", (int)getpid());
	fflush(stdout);
	while (access(argv[1], F_OK) != 0)
		sleep_ms(10);

	for (i = 1; i <= n; i++)
		acc += hload_work((int)i);
	for (i = 1; i <= m; i++) {
		if (HLOAD_TICK_ENABLED()) {
			int a = (int)i;
			long b = -1000000007L * i;

			DTRACE_PROBE2(hload, tick, a, b);
			fired++;
		}
	}
	for (i = 0; i < k; i++)
		acc += getppid();

	printf("did work=%ld usdt=%ld getppid=%ld semaphore=%u\n", n, fired, k,
	       (unsigned)hload_tick_semaphore);
	fflush(stdout);
	sleep_ms(50);
	return 0;
}
