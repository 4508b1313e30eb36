/*
 * runtime.c - native eBPF helpers for hybrid's userspace runtime.
 *
 * Each function implements one Linux eBPF helper with the kernel's semantics,
 * seen from the calling process instead of a kernel task:
 *
 *     id  helper                  result
 *      5  ktime_get_ns            CLOCK_MONOTONIC in ns (see clock_init)
 *      7  get_prandom_u32         32-bit pseudo-random number
 *      8  get_smp_processor_id    CPU the calling thread runs on
 *     14  get_current_pid_tgid    tgid << 32 | tid
 *     15  get_current_uid_gid     gid << 32 | uid  (real ids)
 *     16  get_current_comm        r1 = buf, r2 = size: thread name, NUL-padded
 *    125  ktime_get_boot_ns       CLOCK_BOOTTIME in ns
 *    160  ktime_get_coarse_ns     CLOCK_MONOTONIC_COARSE in ns
 *
 * Errors are returned as negative errno values in the 64-bit result, as the
 * kernel does.  Built by _build.py into the cffi module hybrid._native.
 */
#define _GNU_SOURCE
#include "runtime.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/random.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define UNUSED5 (void)r1; (void)r2; (void)r3; (void)r4; (void)r5
#define NEG_ERRNO(e) ((uint64_t)(int64_t)-(e))

static uint64_t clock_ns(clockid_t clock)
{
    struct timespec ts;

    if (clock_gettime(clock, &ts) != 0)
        return 0;
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static int64_t timens_offset(clockid_t clock);

/* The clock as the kernel's helpers see it: without the time namespace's offset. */
static uint64_t host_clock_ns(clockid_t clock)
{
    uint64_t v = clock_ns(clock);

    return v ? v - (uint64_t)timens_offset(clock) : 0;
}

/*
 * CLOCK_MONOTONIC and CLOCK_BOOTTIME without the vDSO call.
 *
 * clock_gettime() reads the kernel's timekeeping data from the [vvar] page
 * and the TSC with a fenced `rdtsc` (lfence/rdtscp: ~25 ns of its ~31 here).
 * bpf_ktime_get_ns is on every latency tool's hit path, twice per call, so
 * when the TSC is the clocksource the helpers do the vDSO's own computation
 * (lib/vdso/gettimeofday.c, arch/x86/include/asm/vdso/gettimeofday.h:
 * seqcount, delta = tsc - cycle_last, negative motion and overflow handled
 * as there, (delta * mult + base) >> shift) with a plain `rdtsc`.  The value
 * is the kernel's CLOCK_MONOTONIC; only the instant it is taken may move by
 * the few cycles an unfenced rdtsc can run ahead of the instructions before
 * it.
 *
 * The layout read is the one of Linux 6.15 and later (struct vdso_clock with
 * max_cycles, at the start of [vvar]).  clock_init() checks it once per
 * process: the page must be readable (copied through a pipe first), its clock
 * mode TSC, its mask all ones, and the computed times must fall between two
 * clock_gettime() calls, again and again.  Anything else (another layout,
 * kvm-clock or HPET, a kernel changing clocksource later: clock_mode is
 * checked on every read) uses clock_gettime(), as does HYBRID_CLOCK=vdso in
 * the environment.
 *
 * Time namespaces: the kernel's helpers ignore them (bpf_ktime_get_ns is the
 * host's CLOCK_MONOTONIC in every task), and so do these, so that times taken
 * by kernel and userspace programs compare.  In a namespace [vvar] starts with
 * the namespace's page (clock mode TIMENS) and the kernel's data is the page
 * after it; the namespace's offsets (/proc/self/timens_offsets) are taken off
 * clock_gettime()'s values when checking it, and in the fallback.
 */
#define VDSO_CLOCKMODE_TSC 1
#define VDSO_CLOCKMODE_TIMENS INT32_MAX
#define VDSO_BASES 12

struct vdso_clock_data {
    uint32_t seq;
    int32_t clock_mode;
    uint64_t cycle_last;
    uint64_t max_cycles;
    uint64_t mask;
    uint32_t mult;
    uint32_t shift;
    struct { uint64_t sec, nsec; } basetime[VDSO_BASES];
};

static const struct vdso_clock_data *vvar_clock;    /* NULL: clock_gettime() */
static int64_t timens_off[2];                       /* the time namespace's CLOCK_MONOTONIC, CLOCK_BOOTTIME offsets */
static int clock_state;                             /* hybrid_clock_source(): 0 unchecked, 1 vvar, 2 vDSO */

#if defined(__x86_64__)
static inline uint64_t tsc_read(int fenced)
{
    uint32_t lo, hi;

    if (fenced)
        __asm__ volatile("lfence; rdtsc" : "=a"(lo), "=d"(hi) : : "memory");
    else
        __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return (uint64_t)hi << 32 | lo;
}

/* 0 when the clock is not the TSC right now (the caller falls back). */
static inline uint64_t vvar_ns(const struct vdso_clock_data *vc, int clk, int fenced)
{
    uint32_t seq, mult, shift;
    uint64_t sec, base, last, maxc, delta, cycles, ns;

    for (;;) {
        seq = __atomic_load_n(&vc->seq, __ATOMIC_ACQUIRE);
        /* a time namespace's page has an odd seq forever: the mode says so */
        if (__builtin_expect(__atomic_load_n(&vc->clock_mode, __ATOMIC_RELAXED) != VDSO_CLOCKMODE_TSC, 0))
            return 0;
        if (__builtin_expect(seq & 1, 0)) {
            __asm__ volatile("pause");
            continue;
        }
        sec = __atomic_load_n(&vc->basetime[clk].sec, __ATOMIC_RELAXED);
        base = __atomic_load_n(&vc->basetime[clk].nsec, __ATOMIC_RELAXED);
        last = __atomic_load_n(&vc->cycle_last, __ATOMIC_RELAXED);
        maxc = __atomic_load_n(&vc->max_cycles, __ATOMIC_RELAXED);
        mult = __atomic_load_n(&vc->mult, __ATOMIC_RELAXED);
        shift = __atomic_load_n(&vc->shift, __ATOMIC_RELAXED);
        cycles = tsc_read(fenced);
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        if (__builtin_expect(__atomic_load_n(&vc->seq, __ATOMIC_RELAXED) == seq, 1))
            break;
    }
    delta = cycles - last;
    if (__builtin_expect(delta > maxc, 0)) {
        if (delta & (1ull << 62))
            ns = base >> shift;    /* the TSC read before cycle_last: the kernel's clamp */
        else
            ns = (uint64_t)(((unsigned __int128)(delta & INT64_MAX) * mult + base) >> shift);
    } else {
        ns = (delta * mult + base) >> shift;
    }
    return sec * 1000000000ull + ns;
}

/* The [vvar] mapping's start, from /proc/self/maps read with raw system calls
 * (this runs in constructors of libraries injected into traced processes). */
static uintptr_t find_vvar(void)
{
    char buf[4096], line[512];
    size_t ln = 0;
    long fd = hybrid_raw_syscall(SYS_openat, AT_FDCWD, (long)"/proc/self/maps", O_RDONLY | O_CLOEXEC, 0, 0, 0);
    uintptr_t found = 0;

    if (fd < 0)
        return 0;
    for (;;) {
        long n = hybrid_raw_syscall(SYS_read, fd, (long)buf, sizeof(buf), 0, 0, 0);

        if (n <= 0)
            break;
        for (long i = 0; i < n && !found; i++) {
            if (buf[i] != '\n') {
                if (ln < sizeof(line) - 1)
                    line[ln++] = buf[i];
                continue;
            }
            line[ln] = 0;
            if (ln > 7 && memcmp(line + ln - 7, " [vvar]", 7) == 0) {
                uintptr_t a = 0;

                for (char *p = line; *p && *p != '-'; p++)
                    a = a * 16 + (uintptr_t)(*p <= '9' ? *p - '0' : (*p | 0x20) - 'a' + 10);
                found = a;
            }
            ln = 0;
        }
        if (found)
            break;
    }
    hybrid_raw_syscall(SYS_close, fd, 0, 0, 0, 0, 0);
    return found;
}

/* The clock data at `at`, copied: 0 when the page cannot be read. */
static int vvar_copy(uintptr_t at, struct vdso_clock_data *out)
{
    struct vdso_clock_data copy;
    int pfd[2];
    long n = -1;

    /* Copied through a pipe: a page that cannot be read is an EFAULT here, not a
     * SIGBUS in the traced process (process_vm_readv cannot pin [vvar] pages). */
    if (hybrid_raw_syscall(SYS_pipe2, (long)pfd, O_CLOEXEC, 0, 0, 0, 0) != 0)
        return 0;
    if (hybrid_raw_syscall(SYS_write, pfd[1], (long)at, sizeof(copy), 0, 0, 0) == (long)sizeof(copy))
        n = hybrid_raw_syscall(SYS_read, pfd[0], (long)&copy, sizeof(copy), 0, 0, 0);
    hybrid_raw_syscall(SYS_close, pfd[0], 0, 0, 0, 0, 0);
    hybrid_raw_syscall(SYS_close, pfd[1], 0, 0, 0, 0, 0);
    if (n != (long)sizeof(copy))
        return 0;
    *out = copy;
    return 1;
}

static int vvar_plausible(uintptr_t at)
{
    struct vdso_clock_data copy;

    return vvar_copy(at, &copy) && copy.clock_mode == VDSO_CLOCKMODE_TSC && copy.mask == ~0ull &&
           copy.mult != 0 && copy.shift < 64 && copy.max_cycles != 0;
}

/* The kernel's clock data: the first page of [vvar], or in a time namespace the next one. */
static uintptr_t vvar_data(uintptr_t at)
{
    struct vdso_clock_data first;

    if (vvar_plausible(at))
        return at;
    if (vvar_copy(at, &first) && first.clock_mode == VDSO_CLOCKMODE_TIMENS && vvar_plausible(at + 4096))
        return at + 4096;
    return 0;
}

static int vvar_agrees(const struct vdso_clock_data *vc)
{
    static const struct { clockid_t id; int clk; } clocks[] = {{CLOCK_MONOTONIC, CLOCK_MONOTONIC},
                                                               {CLOCK_BOOTTIME, CLOCK_BOOTTIME}};

    for (unsigned c = 0; c < sizeof(clocks) / sizeof(clocks[0]); c++)
        for (int i = 0; i < 64; i++) {
            uint64_t a = host_clock_ns(clocks[c].id), x = vvar_ns(vc, clocks[c].clk, 1);
            uint64_t b = host_clock_ns(clocks[c].id);

            if (a == 0 || x < a || x > b)
                return 0;
        }
    return 1;
}
#endif

/* "monotonic SECS NSECS" and "boottime SECS NSECS" lines (Linux >= 5.6; none: offsets 0). */
static void read_timens_offsets(void)
{
    char buf[256];
    long fd = hybrid_raw_syscall(SYS_openat, AT_FDCWD, (long)"/proc/self/timens_offsets", O_RDONLY | O_CLOEXEC,
                                 0, 0, 0);
    long n;

    if (fd < 0)
        return;
    n = hybrid_raw_syscall(SYS_read, fd, (long)buf, sizeof(buf) - 1, 0, 0, 0);
    hybrid_raw_syscall(SYS_close, fd, 0, 0, 0, 0, 0);
    if (n <= 0)
        return;
    buf[n] = 0;
    for (char *line = buf; line && *line;) {
        char *next = strchr(line, '\n');
        long long sec = 0, nsec = 0;
        char name[16];

        if (next)
            *next++ = 0;
        if (sscanf(line, "%15s %lld %lld", name, &sec, &nsec) == 3) {
            if (strcmp(name, "monotonic") == 0)
                timens_off[0] = (int64_t)(sec * 1000000000ll + nsec);
            else if (strcmp(name, "boottime") == 0)
                timens_off[1] = (int64_t)(sec * 1000000000ll + nsec);
        }
        line = next;
    }
}

static int64_t timens_offset(clockid_t clock)
{
    return clock == CLOCK_BOOTTIME ? timens_off[1] : timens_off[0];
}

static void clock_init(void)
{
    int state = 2;

    read_timens_offsets();
#if defined(__x86_64__)
    {
        const char *want = getenv("HYBRID_CLOCK");    /* "vdso": always clock_gettime() */
        uintptr_t at = want && strcmp(want, "vdso") == 0 ? 0 : find_vvar();

        if (at)
            at = vvar_data(at);
        if (at && vvar_agrees((const struct vdso_clock_data *)at)) {
            vvar_clock = (const struct vdso_clock_data *)at;
            state = 1;
        }
    }
#endif
    __atomic_store_n(&clock_state, state, __ATOMIC_RELEASE);
}

int hybrid_clock_source(void)
{
    if (__atomic_load_n(&clock_state, __ATOMIC_ACQUIRE) == 0)
        clock_init();
    return clock_state;
}

static inline uint64_t fast_clock_ns(clockid_t id)
{
#if defined(__x86_64__)
    const struct vdso_clock_data *vc = vvar_clock;

    if (__builtin_expect(vc != NULL, 1)) {
        uint64_t ns = vvar_ns(vc, (int)id, 0);

        if (__builtin_expect(ns != 0, 1))
            return ns;
    }
#endif
    return host_clock_ns(id);
}

uint64_t hybrid_helper_ktime_get_ns(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5)
{
    UNUSED5;
    return fast_clock_ns(CLOCK_MONOTONIC);
}

uint64_t hybrid_helper_ktime_get_boot_ns(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5)
{
    UNUSED5;
    return fast_clock_ns(CLOCK_BOOTTIME);
}

uint64_t hybrid_helper_ktime_get_coarse_ns(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5)
{
    UNUSED5;
    return host_clock_ns(CLOCK_MONOTONIC_COARSE);
}

/* xorshift64* per thread, seeded once from getrandom(); no syscall per call. */
static HYBRID_TLS uint64_t prng_state;

static uint64_t prng_seed(void)
{
    uint64_t seed = 0;

    if (getrandom(&seed, sizeof(seed), GRND_NONBLOCK) != (ssize_t)sizeof(seed))
        seed = clock_ns(CLOCK_MONOTONIC) ^ ((uint64_t)(uintptr_t)&prng_state << 16);
    return seed ? seed : 0x9e3779b97f4a7c15ull;    /* state must never be 0 */
}

uint64_t hybrid_helper_get_prandom_u32(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5)
{
    uint64_t x = prng_state;

    UNUSED5;
    if (x == 0)
        x = prng_seed();
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    prng_state = x;
    return (uint32_t)((x * 0x2545f4914f6cdd1dull) >> 32);
}

uint64_t hybrid_helper_get_smp_processor_id(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5)
{
    int cpu = sched_getcpu();    /* rseq / vDSO in glibc, no real syscall */

    UNUSED5;
    return cpu < 0 ? 0 : (uint32_t)cpu;
}

/* pid and tid are cached; the fork handler resets them in the child. */
static uint32_t cached_pid;
static HYBRID_TLS uint32_t cached_tid;

static void reset_ids_in_child(void)
{
    cached_pid = 0;
    cached_tid = 0;
}

__attribute__((constructor)) static void runtime_init(void)
{
    pthread_atfork(NULL, NULL, reset_ids_in_child);
    clock_init();
}

uint64_t hybrid_helper_get_current_pid_tgid(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5)
{
    uint32_t pid = __atomic_load_n(&cached_pid, __ATOMIC_RELAXED);

    UNUSED5;
    if (pid == 0) {
        pid = (uint32_t)getpid();
        __atomic_store_n(&cached_pid, pid, __ATOMIC_RELAXED);
    }
    if (cached_tid == 0)
        cached_tid = (uint32_t)syscall(SYS_gettid);
    return (uint64_t)pid << 32 | cached_tid;
}

uint64_t hybrid_helper_get_current_uid_gid(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5)
{
    UNUSED5;
    return (uint64_t)(uint32_t)getgid() << 32 | (uint32_t)getuid();
}

/* Like the kernel's strscpy_pad(buf, current->comm, size): at most size - 1
 * name bytes, always NUL-terminated, the rest of buf zeroed. */
uint64_t hybrid_helper_get_current_comm(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5)
{
    char *buf = (char *)(uintptr_t)r1;
    uint32_t size = (uint32_t)r2;
    char name[17] = {0};    /* PR_GET_NAME writes at most 16 bytes */
    size_t len;

    (void)r3; (void)r4; (void)r5;
    if (size == 0)
        return NEG_ERRNO(EINVAL);
    if (buf == NULL)
        return NEG_ERRNO(EFAULT);
    if (prctl(PR_GET_NAME, name, 0, 0, 0) != 0) {
        int err = errno;

        memset(buf, 0, size);
        return NEG_ERRNO(err ? err : EINVAL);
    }
    len = strnlen(name, 16);
    if (len > size - 1)
        len = size - 1;
    memcpy(buf, name, len);
    memset(buf + len, 0, size - len);
    return 0;
}
