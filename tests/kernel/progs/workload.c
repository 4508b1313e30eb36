/* The traced process of tests/kernel.  Prints "ready", then per stdin line:
 *   add N    calls work_add(i, 1) for i < N, prints the sum of the results
 *   tick N   fires the USDT probe hybridk:tick(i) for i < N, prints N
 * and exits at EOF. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/sdt.h>

__attribute__((noinline, used)) long work_add(long a, long b)
{
	__asm__ volatile("" ::: "memory");
	return a + b;
}

int main(void)
{
	char line[128];

	setvbuf(stdout, NULL, _IOLBF, 0);
	printf("ready\n");
	while (fgets(line, sizeof(line), stdin)) {
		long n = atol(line + 4), sum = 0;

		if (strncmp(line, "add ", 4) == 0) {
			for (long i = 0; i < n; i++)
				sum += work_add(i, 1);
			printf("%ld\n", sum);
		} else if (strncmp(line, "tick", 4) == 0) {
			for (long i = 0; i < n; i++)
				DTRACE_PROBE1(hybridk, tick, i);
			printf("%ld\n", n);
		} else {
			printf("?\n");
		}
	}
	return 0;
}
