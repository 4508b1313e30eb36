/*
 * agent.h - the in-process probe agent: userspace uprobes, uretprobes, USDT
 * and syscall probes by live code patching (see agent.c for how it works).
 *
 * The agent reads a text spec (one command per line; the format is in
 * agent.c's comment and in the attach contract) and patches the running
 * process.  Compiled into hybrid._native (library mode: probes in the
 * Python process itself) and into the standalone libhybrid_agent*.so that is
 * LD_PRELOADed or injected into other processes.
 *
 * The block between the cdef markers is read verbatim by _build.py as part
 * of the cffi cdef, so it must stay plain C declarations (no macros).
 */
#ifndef HYBRID_AGENT_H
#define HYBRID_AGENT_H

#include <stdint.h>

/* cdef-begin */
int hybrid_agent_apply(const char *spec, char *err, uint64_t errlen);  /* 0 or -errno, err = message */
int hybrid_agent_apply_file(const char *path);   /* reads PATH, writes PATH.err (empty on success); 0/-errno */
int hybrid_agent_detach_all(void);               /* every attachment of this process */
uint64_t hybrid_agent_hits(uint32_t attach_id);  /* times the program ran (approximate under contention) */
uint64_t hybrid_agent_missed(uint32_t attach_id);/* hits skipped (recursion, shadow stack full) */
int hybrid_agent_status(char *buf, uint64_t len);/* one line per attachment: id kind prog where hits missed */
/* 1 when the grace period after the last apply/detach completed: no thread still runs (or can run again)
 * program code that was detached, so JIT code of detached programs may be freed; 0 otherwise. */
int hybrid_agent_quiescent(void);
/* A return address read from stack slot `slot` with the uretprobe trampolines' addresses replaced by
 * the real ones from the calling thread's shadow stack (for stack walks). */
uint64_t hybrid_agent_unwind_ret(uint64_t slot, uint64_t value);
/* Where a thread stopped at pc by an injection resumes after an apply (UINT64_MAX: cannot). */
uint64_t hybrid_agent_relocate_pc(uint64_t pc);
/* Wait up to timeout_ms for a grace period now; 1 if it completed (see hybrid_agent_quiescent). */
int hybrid_agent_sync(int timeout_ms);
/* cdef-end */

#endif /* HYBRID_AGENT_H */
