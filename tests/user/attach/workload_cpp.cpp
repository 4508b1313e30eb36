/*
 * The C++ program of tests/user/attach/test_cpp.py: threads calling a free
 * function in a namespace, a member function and a lambda through
 * std::function (probed by their mangled names), and a path where C++
 * exceptions are thrown through probed frames.
 *
 *   workload_cpp MODE THREADS CALLS
 *
 * MODE calls: per thread t and i < CALLS,
 *        app::step(i, t)                  (_ZN3app4stepEll)
 *        app::Counter::bump(i)            (_ZN3app7Counter4bumpEl)
 *        fn(i), fn a std::function<long(long)> holding a noinline lambda
 *        whose operator() calls app::twice(i)  (_ZN3app5twiceEl)
 *   prints "ok step=<sum> bump=<sum> lambda=<sum>"
 * MODE throw: per thread and i < CALLS, try { sum += app::middle(i) }
 *        catch (app::Oops &e) { caught++; thrown += e.value; }
 *        app::middle(n) returns app::thrower(n) + 1 and does not catch;
 *        app::thrower(n) throws Oops{n} when n % 3 == 2, else returns 2 n
 *        (so i = 0 and 1 return normally, i = 2 is the first throw).
 *   prints "ok sum=<sum> caught=<n> thrown=<sum of e.value>"
 * MODE catchin: as throw, but the try/catch is inside app::guard(n), which
 *        calls app::middle(n) and returns -1 when it throws; the caller
 *        sums guard's results.  prints "ok sum=<sum> caught=<n>"
 *
 * Built with g++ -O2 -pthread.  The probed functions do real work (a loop
 * the compiler must keep), so their first instructions make a patch window
 * of at least 5 bytes that stays inside the function.
 */
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <thread>
#include <vector>

#define NOINLINE __attribute__((noinline, noclone))

namespace app {

struct Oops {
    long value;
};

NOINLINE long step(long a, long b)
{
    long r = 0;
    for (long k = 0; k < 3; k++) {
        __asm__ volatile("" : "+r"(r));
        r += a;
    }
    return r - 2 * a + b;    /* a + b */
}

NOINLINE long twice(long x)
{
    long r = 0;
    for (long k = 0; k < 2; k++) {
        __asm__ volatile("" : "+r"(r));
        r += x;
    }
    return r;
}

class Counter {
public:
    long total = 0;
    NOINLINE long bump(long x);
};

NOINLINE long Counter::bump(long x)
{
    for (long k = 0; k < 2; k++)
        __asm__ volatile("" : "+m"(total));
    total += x;
    return total;
}

NOINLINE long thrower(long n)
{
    __asm__ volatile("" ::: "memory");
    if (n % 3 == 2)
        throw Oops{n};
    return 2 * n;
}

NOINLINE long middle(long n)
{
    long r = thrower(n);    /* not a tail call: middle's frame is live during the throw */
    __asm__ volatile("" : "+r"(r));
    return r + 1;
}

NOINLINE long guard(long n)
{
    try {
        return middle(n);
    } catch (Oops &) {
        return -1;
    }
}

}  // namespace app

struct Job {
    const char *mode;
    long index, calls;
    long s1 = 0, s2 = 0, s3 = 0;
};

static void worker(Job *j)
{
    if (!strcmp(j->mode, "calls")) {
        app::Counter c;
        std::function<long(long)> fn = [](long x) NOINLINE { return app::twice(x); };
        for (long i = 0; i < j->calls; i++) {
            j->s1 += app::step(i, j->index);
            c.bump(i);
            j->s3 += fn(i);
        }
        j->s2 = c.total;
    } else if (!strcmp(j->mode, "throw")) {
        for (long i = 0; i < j->calls; i++) {
            try {
                j->s1 += app::middle(i);
            } catch (app::Oops &e) {
                j->s2++;
                j->s3 += e.value;
            }
        }
    } else if (!strcmp(j->mode, "catchin")) {
        for (long i = 0; i < j->calls; i++) {
            long r = app::guard(i);
            if (r < 0)
                j->s2++;
            else
                j->s1 += r;
        }
    }
}

int main(int argc, char **argv)
{
    if (argc != 4)
        return 2;
    const char *mode = argv[1];
    int threads = atoi(argv[2]);
    long calls = atol(argv[3]);
    std::vector<Job> jobs(threads);
    std::vector<std::thread> ts;
    for (int t = 0; t < threads; t++) {
        jobs[t].mode = mode;
        jobs[t].index = t;
        jobs[t].calls = calls;
        ts.emplace_back(worker, &jobs[t]);
    }
    long s1 = 0, s2 = 0, s3 = 0;
    for (int t = 0; t < threads; t++) {
        ts[t].join();
        s1 += jobs[t].s1;
        s2 += jobs[t].s2;
        s3 += jobs[t].s3;
    }
    if (!strcmp(mode, "calls"))
        printf("ok step=%ld bump=%ld lambda=%ld\n", s1, s2, s3);
    else if (!strcmp(mode, "throw"))
        printf("ok sum=%ld caught=%ld thrown=%ld\n", s1, s2, s3);
    else if (!strcmp(mode, "catchin"))
        printf("ok sum=%ld caught=%ld\n", s1, s2);
    else
        return 2;
    return 0;
}
