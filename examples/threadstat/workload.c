/*
 * The workload threadstat watches: THREADS threads; thread i (from 0) calls
 * work() CALLS * (i + 1) times and getppid() (a real system call) 10 * (i + 1)
 * times.  It waits for a line on stdin before starting the threads, so the
 * agent can set itself up first, and prints what each thread did:
 *
 *     thread TID work=N getppid=M
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <unistd.h>

struct job {
	long index, calls;
	pid_t tid;
	long work, getppid;
	volatile long sink;
};

/* Kept out of line and non-trivial: the function the uprobe counts. */
__attribute__((noinline, used)) long work(long x)
{
	__asm__ volatile("" ::: "memory");
	return x * 2654435761u % 1000003;
}

static void *worker(void *arg)
{
	struct job *j = arg;

	j->tid = (pid_t)syscall(SYS_gettid);
	for (long i = 0; i < j->calls * (j->index + 1); i++) {
		j->sink += work(i);
		j->work++;
	}
	for (long i = 0; i < 10 * (j->index + 1); i++) {
		syscall(SYS_getppid);
		j->getppid++;
	}
	return NULL;
}

int main(int argc, char **argv)
{
	long threads = argc > 1 ? atol(argv[1]) : 4, calls = argc > 2 ? atol(argv[2]) : 100000;
	char line[16];
	pthread_t *t;
	struct job *jobs;

	if (threads < 1 || threads > 256 || calls < 0) {
		fprintf(stderr, "usage: %s [THREADS 1-256] [CALLS]\n", argv[0]);
		return 2;
	}
	t = calloc(threads, sizeof(*t));
	jobs = calloc(threads, sizeof(*jobs));
	if (!t || !jobs)
		return 1;
	if (!fgets(line, sizeof(line), stdin))
		return 1;
	for (long i = 0; i < threads; i++) {
		jobs[i].index = i;
		jobs[i].calls = calls;
		if (pthread_create(&t[i], NULL, worker, &jobs[i]))
			return 1;
	}
	for (long i = 0; i < threads; i++)
		pthread_join(t[i], NULL);
	for (long i = 0; i < threads; i++)
		printf("thread %d work=%ld getppid=%ld\n", jobs[i].tid, jobs[i].work, jobs[i].getppid);
	return 0;
}
