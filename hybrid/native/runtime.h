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
/* cdef-end */

/* Thread-locals of the hit path.  initial-exec: one %fs-relative load, no
 * __tls_get_addr call.  The whole runtime has a few dozen bytes of them,
 * which glibc's static TLS surplus takes even when the library is
 * dlopen()ed into a running process (the agent, hybrid._native). */
#define HYBRID_TLS __thread __attribute__((tls_model("initial-exec")))

#endif /* HYBRID_RUNTIME_H */
