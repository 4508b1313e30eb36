/*
 * The traced program of the attach tests: threads calling functions whose
 * calls the tests count exactly, a USDT probe with a semaphore, syscalls.
 *
 *   workload MODE THREADS CALLS        run MODE once, print the result line
 *   workload -i                        interactive: each stdin line "MODE THREADS CALLS"
 *                                      runs once and prints one result line; EOF ends
 * MODE: add | fact | usdt | sys | jump | all
 * Result line: "ok add=<sum of add() results> fact=<sum> usdt=<ticks> sys=<n> jump=<n>"
 *
 * Built with -O2 -pthread.  add() and guarded() are compiled at -O0, so they
 * start with push %rbp; mov %rsp,%rbp; mov %rdi,..: a patch window of
 * several instructions; fact() at -O2 starts with cmp; jg (a relocated jcc).
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#define _SDT_HAS_SEMAPHORES 1
#include <sys/sdt.h>
#include <sys/syscall.h>
#include <unistd.h>

#define NOINLINE __attribute__((noinline, noclone, used))
/* push %rbp; mov %rsp,%rbp; mov %rdi,-0x18(%rbp): a window of three instructions */
#define FRAMED __attribute__((optimize("O0")))

volatile unsigned short hybridtest_tick_semaphore __attribute__((section(".probes"), used));

FRAMED NOINLINE long add(long a, long b)
{
    __asm__ volatile("" ::: "memory");
    return a + b;
}

NOINLINE long fact(long n)
{
    __asm__ volatile("" ::: "memory");
    return n <= 1 ? 1 : n * fact(n - 1) % 1000003;
}

FRAMED NOINLINE int guarded(int x)
{
    __asm__ volatile("" ::: "memory");
    return x * 2;
}

static __thread jmp_buf *jump_target;

NOINLINE long dive(long n)
{
    __asm__ volatile("" ::: "memory");
    if (n == 0)
        longjmp(*jump_target, 1);
    return dive(n - 1) + 1;
}

struct job {
    const char *mode;
    long index, calls;
    long add_sum, fact_sum, ticks, sys, jumps;
};

static void *worker(void *arg)
{
    struct job *j = arg;
    int all = strcmp(j->mode, "all") == 0;
    jmp_buf env;

    for (long i = 0; i < j->calls; i++) {
        if (all || !strcmp(j->mode, "add"))
            j->add_sum += add(i, j->index);
        if (all || !strcmp(j->mode, "fact"))
            j->fact_sum += fact(i % 20);
        if (all || !strcmp(j->mode, "usdt")) {
            if (hybridtest_tick_semaphore)
                j->ticks++;
            DTRACE_PROBE2(hybridtest, tick, i, j->index * 3);
        }
        if (all || !strcmp(j->mode, "sys")) {
            j->sys += getppid() > 0;
            j->sys += syscall(SYS_getppid) > 0;
        }
        if (all || !strcmp(j->mode, "jump")) {
            jump_target = &env;
            if (setjmp(env) == 0)
                dive(i % 8);
            else
                j->jumps++;
            j->add_sum += add(i, 1);   /* a probed call after the longjmp */
        }
    }
    return NULL;
}

static int run(const char *mode, int threads, long calls)
{
    pthread_t tid[64];
    struct job jobs[64];
    long add_sum = 0, fact_sum = 0, ticks = 0, sys = 0, jumps = 0;

    if (threads < 1 || threads > 64)
        return 1;
    for (int t = 0; t < threads; t++) {
        jobs[t] = (struct job){.mode = mode, .index = t, .calls = calls};
        if (pthread_create(&tid[t], NULL, worker, &jobs[t]))
            return 1;
    }
    for (int t = 0; t < threads; t++) {
        pthread_join(tid[t], NULL);
        add_sum += jobs[t].add_sum;
        fact_sum += jobs[t].fact_sum;
        ticks += jobs[t].ticks;
        sys += jobs[t].sys;
        jumps += jobs[t].jumps;
    }
    printf("ok add=%ld fact=%ld usdt=%ld sys=%ld jump=%ld guarded=%d\n", add_sum, fact_sum, ticks, sys, jumps,
           guarded(21));
    fflush(stdout);
    return 0;
}

int main(int argc, char **argv)
{
    char mode[32];
    int threads;
    long calls;

    if (argc == 2 && !strcmp(argv[1], "-i")) {
        printf("ready %d\n", getpid());
        fflush(stdout);
        while (scanf("%31s %d %ld", mode, &threads, &calls) == 3)
            if (run(mode, threads, calls))
                return 1;
        return 0;
    }
    if (argc != 4)
        return 2;
    return run(argv[1], atoi(argv[2]), atol(argv[3]));
}
