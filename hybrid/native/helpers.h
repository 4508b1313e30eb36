/*
 * helpers.h - the tracing helpers of hybrid's userspace runtime: safe memory
 * access (probe_read & co.), trace_printk/snprintf, stacks, the current
 * probe, signals, bpf_loop.  Implemented in helpers.c, which lists every
 * helper with its kernel id and the differences from the kernel.
 *
 * The block between the cdef markers is read verbatim by _build.py as part
 * of the cffi cdef, so it must stay plain C declarations (no macros).
 */
#ifndef HYBRID_HELPERS_H
#define HYBRID_HELPERS_H

#include <stdint.h>

/* cdef-begin */
/* The probe the current thread is running, set by whoever runs a program
 * for a probe (a trampoline in a traced process, or a test): NULL outside a
 * probe.  get_func_ip, get_attach_cookie, get_func_arg_cnt, get_func_ret
 * and override_return read it; override_return writes it. */
struct hybrid_probe_ctx {
    uint64_t func_ip;       /* address of the probed function (or instruction) */
    uint64_t cookie;        /* the attach cookie (bpf_get_attach_cookie) */
    uint32_t flags;         /* HYBRID_PROBE_RETURN for uretprobes */
    uint32_t nargs;         /* number of arguments of the probed function, 0 if unknown */
    uint32_t override;      /* set to 1 by override_return: return override_rc, skip the function */
    uint32_t pad;
    uint64_t override_rc;
};

enum { HYBRID_PROBE_RETURN = 1 };

/* x86-64 kernel `struct pt_regs` (168 bytes), the context of a uprobe program. */
struct hybrid_pt_regs {
    uint64_t r15, r14, r13, r12, bp, bx, r11, r10, r9, r8;
    uint64_t ax, cx, dx, si, di, orig_ax, ip, cs, flags, sp, ss;
};

/* struct bpf_pidns_info */
struct hybrid_pidns_info {
    uint32_t pid;
    uint32_t tgid;
};

/* --- safe memory access: never crash, no syscall ------------------------- */
long hybrid_safe_copy(void *dst, const void *src, uint64_t n);       /* 0 or -EFAULT (dst partly written) */
long hybrid_safe_copy_str(void *dst, const void *src, uint64_t n);   /* strlen+1, n if cut, -EFAULT */
long hybrid_safe_write(void *dst, const void *src, uint64_t n);      /* 0 or -EFAULT */
long hybrid_safe_memset(void *dst, int c, uint64_t n);               /* 0 or -EFAULT */
int hybrid_safe_install(void);             /* (re)install the fault handler; 0 or -errno */
uint64_t hybrid_safe_fault_count(void);    /* faults turned into -EFAULT so far */

/* --- the current probe ------------------------------------------------------ */
struct hybrid_probe_ctx *hybrid_probe_enter(struct hybrid_probe_ctx *ctx);   /* returns the previous one */
void hybrid_probe_exit(void);                                                /* back to no probe */
void hybrid_probe_restore(struct hybrid_probe_ctx *prev);                    /* back to `prev` (nesting) */
struct hybrid_probe_ctx *hybrid_probe_current(void);

/* --- trace_printk output, stacks, clocks ------------------------------------ */
int hybrid_trace_set_fd(int fd);       /* fd >= 0: write trace lines there; -1: back to the default file */
int hybrid_trace_fd(void);             /* the fd lines go to now (opens the default file), or -1 */
long hybrid_collect_user_stack(const void *pt_regs, uint64_t *ips, uint32_t max, uint32_t skip);
uint32_t hybrid_jiffies_hz(void);
uint32_t hybrid_max_stack_depth(void);

/* --- helpers (eBPF calling convention; kernel ids in helpers.c) ------------- */
uint64_t hybrid_helper_probe_read(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5);
uint64_t hybrid_helper_probe_read_str(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5);
uint64_t hybrid_helper_probe_read_user(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5);
uint64_t hybrid_helper_probe_read_user_str(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5);
uint64_t hybrid_helper_probe_read_kernel(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5);
uint64_t hybrid_helper_probe_read_kernel_str(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5);
uint64_t hybrid_helper_probe_write_user(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5);
uint64_t hybrid_helper_trace_printk(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5);
uint64_t hybrid_helper_trace_vprintk(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5);
uint64_t hybrid_helper_snprintf(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5);
uint64_t hybrid_helper_strncmp(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5);
uint64_t hybrid_helper_jiffies64(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5);
uint64_t hybrid_helper_get_ns_current_pid_tgid(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5);
uint64_t hybrid_helper_send_signal(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5);
uint64_t hybrid_helper_send_signal_thread(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5);
uint64_t hybrid_helper_get_current_task(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5);
uint64_t hybrid_helper_get_func_ip(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5);
uint64_t hybrid_helper_get_attach_cookie(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5);
uint64_t hybrid_helper_get_func_arg(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5);
uint64_t hybrid_helper_get_func_ret(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5);
uint64_t hybrid_helper_get_func_arg_cnt(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5);
uint64_t hybrid_helper_override_return(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5);
uint64_t hybrid_helper_get_stack(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5);
uint64_t hybrid_helper_get_stackid(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5);
uint64_t hybrid_helper_loop(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5);
/* cdef-end */

/* The probe of the current thread (what hybrid_probe_enter sets).  Exported
 * for trampolines that would rather store it directly. */
extern __thread struct hybrid_probe_ctx *hybrid_current_probe __attribute__((tls_model("initial-exec")));

#endif /* HYBRID_HELPERS_H */
