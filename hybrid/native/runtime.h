/*
 * runtime.h - native eBPF helper functions of hybrid's userspace runtime.
 *
 * Every helper has the eBPF calling convention: five 64-bit arguments
 * (r1..r5) and a 64-bit result (r0).  Unused arguments are ignored.
 *
 * The block between the cdef markers is read verbatim by _build.py as the
 * cffi cdef, so it must stay plain C declarations (no macros, no includes).
 */
#ifndef HYBRID_RUNTIME_H
#define HYBRID_RUNTIME_H

#include <stdint.h>

/* cdef-begin */
uint64_t hybrid_helper_ktime_get_ns(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5);
uint64_t hybrid_helper_get_prandom_u32(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5);
uint64_t hybrid_helper_get_smp_processor_id(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5);
uint64_t hybrid_helper_get_current_pid_tgid(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5);
uint64_t hybrid_helper_get_current_uid_gid(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5);
uint64_t hybrid_helper_get_current_comm(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5);
uint64_t hybrid_helper_ktime_get_boot_ns(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5);
uint64_t hybrid_helper_ktime_get_coarse_ns(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5);
int hybrid_clock_source(void);    /* how ktime_get_ns reads the clock: 1 the kernel's vvar data + rdtsc, 2 clock_gettime() */
/* cdef-end */

/* Thread-locals of the hit path.  initial-exec: one %fs-relative load, no
 * __tls_get_addr call.  The whole runtime has a few dozen bytes of them,
 * which glibc's static TLS surplus takes even when the library is
 * dlopen()ed into a running process (the agent, hybrid._native). */
#define HYBRID_TLS __thread __attribute__((tls_model("initial-exec")))

/* System calls on a program's or a probe's path go straight to the kernel,
 * never through libc: in a traced process libc's wrappers may be patched
 * syscall sites, whose dispatcher would come back into the agent (a probe
 * inside a probe, or endless recursion before the thread has its state).
 * Returns the result or -errno. */
#if defined(__x86_64__)
static inline long hybrid_raw_syscall(long nr, long a1, long a2, long a3, long a4, long a5, long a6)
{
    long ret;
    register long r10 __asm__("r10") = a4;
    register long r8 __asm__("r8") = a5;
    register long r9 __asm__("r9") = a6;

    __asm__ volatile("syscall"
                     : "=a"(ret)
                     : "a"(nr), "D"(a1), "S"(a2), "d"(a3), "r"(r10), "r"(r8), "r"(r9)
                     : "rcx", "r11", "memory");
    return ret;
}
#else
#include <errno.h>
#include <unistd.h>

static inline long hybrid_raw_syscall(long nr, long a1, long a2, long a3, long a4, long a5, long a6)
{
    long ret = syscall(nr, a1, a2, a3, a4, a5, a6);

    return ret < 0 ? -errno : ret;
}
#endif

#endif /* HYBRID_RUNTIME_H */
