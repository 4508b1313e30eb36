/*
 * sysloop.c - the syscall benchmark's loop (bench/bench_syscalls.py).
 *
 * long getppid_loop(long n): n calls of libc's getppid() (glibc's wrapper:
 * `mov $110, %eax; syscall; ret`, a syscall site hybrid hooks), returns how
 * many returned a positive pid (n unless something is wrong).
 *
 * Built twice: `gcc -O2 -shared -fPIC` (the measuring process calls the loop
 * through ctypes) and, with -DSYSLOOP_MAIN, an executable that is the
 * untraced rows' target: it prints "ready <pid>", then reads a count per
 * line from stdin, runs getppid_loop(count) and prints the result; it
 * exits at end of input.
 */
#include <unistd.h>

__attribute__((noinline)) long getppid_loop(long n)
{
	long ok = 0;

	for (long i = 0; i < n; i++)
		ok += getppid() > 0;
	return ok;
}

#ifdef SYSLOOP_MAIN
#include <stdio.h>

int main(void)
{
	long n;

	setvbuf(stdout, NULL, _IOLBF, 0);
	printf("ready %d\n", (int)getpid());
	while (scanf("%ld", &n) == 1)
		printf("%ld\n", getppid_loop(n));
	return 0;
}
#endif
