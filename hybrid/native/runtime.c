/*
 * runtime.c - native eBPF helpers for hybrid's userspace runtime.
 *
 * Each function implements one Linux eBPF helper with the kernel's semantics,
 * seen from the calling process instead of a kernel task:
 *
 *     id  helper                  result
 *      5  ktime_get_ns            CLOCK_MONOTONIC in ns
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
#include <pthread.h>
#include <sched.h>
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

uint64_t hybrid_helper_ktime_get_ns(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5)
{
    UNUSED5;
    return clock_ns(CLOCK_MONOTONIC);
}

uint64_t hybrid_helper_ktime_get_boot_ns(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5)
{
    UNUSED5;
    return clock_ns(CLOCK_BOOTTIME);
}

uint64_t hybrid_helper_ktime_get_coarse_ns(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5)
{
    UNUSED5;
    return clock_ns(CLOCK_MONOTONIC_COARSE);
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
