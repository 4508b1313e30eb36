/*
 * helpers.c - the kernel's tracing helpers, for eBPF programs running in a
 * (traced) userspace process.  Called directly from JIT'd/AOT code, so: no
 * Python, no syscall where avoidable, and never a crash.
 *
 *     id  helper                   userspace semantics
 *      4  probe_read               = probe_read_user (every address is a user address here)
 *      6  trace_printk             fmt, fmt_size, up to 3 args -> a trace line (see "trace lines")
 *     27  get_stackid              user stacks into a STACK_TRACE map (maps.c's hybrid_stackmap_store)
 *     35  get_current_task         0: there is no task_struct in userspace
 *     36  probe_write_user         safe write into this process; -EFAULT on a bad address
 *     45  probe_read_str           = probe_read_user_str
 *     58  override_return          regs->ax = rc, and the current probe is marked to return rc
 *     67  get_stack                user stacks only (frame-pointer walk from the pt_regs context)
 *    109  send_signal              kill(getpid(), sig)
 *    112  probe_read_user          safe copy; on a fault dst is zeroed and -EFAULT returned
 *    113  probe_read_kernel        process memory, like probe_read_user (see below)
 *    114  probe_read_user_str      safe string copy: strlen+1, size if cut, -EFAULT (dst zeroed)
 *    115  probe_read_kernel_str    process memory, like probe_read_user_str
 *    117  send_signal_thread       tgkill(getpid(), gettid(), sig)
 *    118  jiffies64                CLOCK_MONOTONIC_COARSE * HZ + an offset from times() (see jiffies)
 *    120  get_ns_current_pid_tgid  dev/ino of /proc/self/ns/pid (stat once) -> pid/tgid
 *    165  snprintf                 the kernel's format subset; returns the length + 1
 *    173  get_func_ip              func_ip of the current probe, 0 outside a probe
 *    174  get_attach_cookie        cookie of the current probe, 0 outside a probe
 *    177  trace_vprintk            trace_printk with up to 12 args in an array
 *    181  loop                     bpf_loop(nr, callback, ctx, flags)
 *    182  strncmp                  -1/0/1 like the kernel's strncmp
 *    183  get_func_arg             di si dx cx r8 r9 of the pt_regs context
 *    184  get_func_ret             ax of the pt_regs context, in a return probe
 *    185  get_func_arg_cnt         nargs of the current probe (0 if unknown)
 *
 * Errors are negative errno values in the 64-bit result, as in the kernel.
 * Size arguments are u32 like the kernel's.  Every access to memory a
 * helper is given, even the pointers the kernel's verifier would have
 * typed, goes through the safe copy: a wrong pointer is an error code.
 *
 * Safe memory access works like the kernel's exception tables.  The copy
 * routines are small assembly loops; the range of each loop's memory
 * instructions, and the address of its fixup code (return -EFAULT), are
 * recorded.  A SIGSEGV/SIGBUS handler, installed once, lazily, on the first
 * use, checks whether the faulting instruction (REG_RIP) lies in one of the
 * ranges; if so it sets RIP to the fixup and returns, so the routine
 * returns -EFAULT.  Any other fault is passed on to the handler installed
 * before ours (called with its own mask and flags), or, if that was
 * SIG_DFL/SIG_IGN, the default action is restored and the fault re-executes
 * (kill()-sent signals are re-raised), so the traced program's own handlers,
 * Python's faulthandler and core dumps keep working.  The fast path is a
 * few instructions: no syscall, no setjmp.
 * Limits: a process that later installs a SIGSEGV handler that does not
 * chain to ours loses the protection (hybrid_safe_install() re-installs);
 * a fault while SIGSEGV is blocked kills the process (the kernel then forces
 * the default action).  Non-x86-64 builds use process_vm_readv/writev
 * instead (a syscall per access, same results).
 *
 * Trace lines: the kernel appends trace_printk output to the trace ring
 * buffer (tracefs trace_pipe).  Here each line is written, with a single
 * write() (atomic: O_APPEND for files, < PIPE_BUF for pipes), to the file
 * named by $HYBRID_TRACE_PIPE ("-" = stderr), or else /dev/shm/hybrid-trace,
 * opened once on first use (O_APPEND|O_CREAT|O_NONBLOCK, mode 0644), or to
 * the fd given to hybrid_trace_set_fd().  Writing never blocks the program
 * nor kills it: a FIFO without a reader is retried once a second (lines are
 * dropped meanwhile), a full pipe drops the line, a pipe whose reader left
 * drops it without SIGPIPE.  A line has the kernel's layout:
 *     "%16s-%-7d [%03d] ..... %5llu.%06llu: bpf_trace_printk: <msg>\n"
 * comm, thread id, CPU, irq-flags column (always "....."), CLOCK_MONOTONIC
 * seconds.microseconds.  Unlike the kernel, a message that already ends in
 * "\n" gets no second newline.  Messages are cut at 1023 bytes
 * (MAX_BPRINTF_BUF); the result is the untruncated length, as bstr_printf's.
 *
 * Formats (trace_printk, trace_vprintk, snprintf) follow the kernel's
 * bpf_bprintf_prepare: printable ASCII only; %% ; flags "0 +-" and a width;
 * %d %i %u %x %X with l/ll (without: 32-bit int); %c; %s %pks %pus (a string
 * read safely, at most 511 bytes; "" if unreadable); %p %pK %px %ps %pS %pB
 * (the value as 16 hex digits: no hashing, no symbols in userspace); %pI4
 * %pi4 %pI6 %pi6 (4/16 bytes read safely, zeros if unreadable); anything
 * else, more specifiers than arguments, or a format without its NUL in
 * fmt_size, is -EINVAL.  Formats are at most 2047 bytes here.
 *
 * jiffies: the kernel's CONFIG_HZ from /boot/config-$(uname -r); if that
 * file is missing, from the resolution of CLOCK_MONOTONIC_COARSE (the tick,
 * 1/HZ, by definition), which gives the same value without decompressing
 * /proc/config.gz; 250 if both fail.  jiffies_64 advances with
 * CLOCK_MONOTONIC(_COARSE) at HZ; its offset (INITIAL_JIFFIES = 2^32 - 300 HZ
 * at boot, plus whatever boot and suspend added) is calibrated once with
 * times(), whose result is jiffies_64 in USER_HZ units: the result is within
 * ~2 ticks of the kernel's counter, with one syscall in the process's life.
 *
 * The current probe (struct hybrid_probe_ctx, thread-local): see helpers.h.
 * get_func_arg reads argument n (0..5) from di, si, dx, cx, r8, r9 of the
 * pt_regs context; -EINVAL if n > 5 or, when the probe knows its function's
 * argument count, n >= nargs (*value = 0 on errors).  get_func_ret: -EOPNOTSUPP
 * unless the current probe is a return probe (as for non-fexit programs).
 * override_return outside a probe: -EINVAL, nothing written (no one would
 * honour it); inside: regs->ax = rc, probe->override = 1, override_rc = rc.
 *
 * get_stack: BPF_F_USER_STACK walks the frame-pointer chain from the pt_regs
 * context like the kernel's perf_callchain_user (regs->ip, then the return
 * address of each {next fp, return address} frame from regs->bp), reading
 * every frame through the safe copy and stopping at the first unreadable
 * frame; at most perf_event_max_stack (read once, default 127) frames
 * including the skipped ones.  A return address that leads into a uretprobe
 * trampoline is reported as the real one (hybrid_agent_unwind_ret).  Kernel stacks are -EFAULT (there is none);
 * BPF_F_USER_BUILD_ID is -EINVAL (not supported).
 */
#define _GNU_SOURCE
#include "runtime.h"
#include "helpers.h"
#include "maps.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/times.h>
#include <sys/sysmacros.h>
#include <sys/uio.h>
#include <sys/utsname.h>
#include <time.h>
#include <ucontext.h>
#include <unistd.h>

#define NEG(e) ((uint64_t)(int64_t)-(e))
#define UNLIKELY(x) __builtin_expect(!!(x), 0)
#define LIKELY(x) __builtin_expect(!!(x), 1)

/* ========================================================================= */
/* Safe memory access                                                        */
/* ========================================================================= */

#if defined(__x86_64__)

/* Each routine: `begin`..`end` holds the only instructions that touch the
 * caller's memory (no ret, no stack access in between); a fault there
 * continues at `fixup`, which returns -EFAULT (-14). */
long hybrid__raw_copy(void *dst, const void *src, uint64_t n);
long hybrid__raw_copy_str(void *dst, const void *src, uint64_t n);
long hybrid__raw_memset(void *dst, int c, uint64_t n);
extern const char hybrid__copy_begin[], hybrid__copy_end[], hybrid__copy_fixup[];
extern const char hybrid__str_begin[], hybrid__str_end[], hybrid__str_fixup[];
extern const char hybrid__set_begin[], hybrid__set_end[], hybrid__set_fixup[];

__asm__(
    "    .text\n"
    /* long hybrid__raw_copy(dst=rdi, src=rsi, n=rdx) */
    "    .p2align 4\n"
    "    .globl hybrid__raw_copy\n"
    "    .hidden hybrid__raw_copy\n"
    "    .type hybrid__raw_copy, @function\n"
    "hybrid__raw_copy:\n"
    "    .cfi_startproc\n"
    "    movq %rdx, %rcx\n"
    "    .globl hybrid__copy_begin\n"
    "    .hidden hybrid__copy_begin\n"
    "hybrid__copy_begin:\n"
    "    cmpq $8, %rcx\n"
    "    jne 1f\n"
    "    movq (%rsi), %rax\n"                /* the common 8-byte read */
    "    movq %rax, (%rdi)\n"
    "    jmp hybrid__copy_end\n"
    "1:  cmpq $64, %rcx\n"
    "    jae 4f\n"
    "2:  cmpq $8, %rcx\n"
    "    jb 3f\n"
    "    movq (%rsi), %rax\n"
    "    movq %rax, (%rdi)\n"
    "    addq $8, %rsi\n"
    "    addq $8, %rdi\n"
    "    subq $8, %rcx\n"
    "    jmp 2b\n"
    "3:  testq %rcx, %rcx\n"
    "    jz hybrid__copy_end\n"
    "    movb (%rsi), %al\n"
    "    movb %al, (%rdi)\n"
    "    incq %rsi\n"
    "    incq %rdi\n"
    "    decq %rcx\n"
    "    jmp 3b\n"
    "4:  rep movsb\n"
    "    .globl hybrid__copy_end\n"
    "    .hidden hybrid__copy_end\n"
    "hybrid__copy_end:\n"
    "    xorl %eax, %eax\n"
    "    ret\n"
    "    .globl hybrid__copy_fixup\n"
    "    .hidden hybrid__copy_fixup\n"
    "hybrid__copy_fixup:\n"
    "    movq $-14, %rax\n"
    "    ret\n"
    "    .cfi_endproc\n"
    "    .size hybrid__raw_copy, .-hybrid__raw_copy\n"

    /* long hybrid__raw_copy_str(dst=rdi, src=rsi, n=rdx): like the kernel's
     * strncpy_from_user: n == 0 -> 0; copies up to n-1 bytes and a NUL;
     * returns strlen+1, or n when cut.  Words are read only when aligned,
     * so no read crosses into a page past the string's NUL. */
    "    .p2align 4\n"
    "    .globl hybrid__raw_copy_str\n"
    "    .hidden hybrid__raw_copy_str\n"
    "    .type hybrid__raw_copy_str, @function\n"
    "hybrid__raw_copy_str:\n"
    "    .cfi_startproc\n"
    "    xorl %ecx, %ecx\n"                  /* i = 0 */
    "    testq %rdx, %rdx\n"
    "    jz 9f\n"
    "    leaq -1(%rdx), %r8\n"               /* r8 = n - 1: bytes before the forced NUL */
    "    movabsq $0x0101010101010101, %r10\n"
    "    movabsq $0x8080808080808080, %r11\n"
    "    .globl hybrid__str_begin\n"
    "    .hidden hybrid__str_begin\n"
    "hybrid__str_begin:\n"
    "1:  cmpq %r8, %rcx\n"                   /* head: bytes until src+i is aligned */
    "    je 8f\n"
    "    leaq (%rsi,%rcx), %rax\n"
    "    testb $7, %al\n"
    "    jz 2f\n"
    "    movzbl (%rsi,%rcx), %eax\n"
    "    movb %al, (%rdi,%rcx)\n"
    "    incq %rcx\n"
    "    testb %al, %al\n"
    "    jz 9f\n"
    "    jmp 1b\n"
    "2:  movq %r8, %rax\n"                   /* words: while 8 bytes fit before the limit */
    "    subq %rcx, %rax\n"
    "    cmpq $8, %rax\n"
    "    jb 3f\n"
    "    movq (%rsi,%rcx), %rax\n"
    "    movq %rax, %r9\n"
    "    subq %r10, %r9\n"
    "    movq %rax, %rdx\n"
    "    notq %rdx\n"
    "    andq %rdx, %r9\n"
    "    testq %r11, %r9\n"
    "    jnz 3f\n"                           /* a NUL in this word: finish bytewise */
    "    movq %rax, (%rdi,%rcx)\n"
    "    addq $8, %rcx\n"
    "    jmp 2b\n"
    "3:  cmpq %r8, %rcx\n"                   /* tail: bytes */
    "    je 8f\n"
    "    movzbl (%rsi,%rcx), %eax\n"
    "    movb %al, (%rdi,%rcx)\n"
    "    incq %rcx\n"
    "    testb %al, %al\n"
    "    jnz 3b\n"
    "    jmp 9f\n"
    "8:  movb $0, (%rdi,%rcx)\n"             /* cut: NUL at dst[n-1], return n */
    "    incq %rcx\n"
    "    .globl hybrid__str_end\n"
    "    .hidden hybrid__str_end\n"
    "hybrid__str_end:\n"
    "9:  movq %rcx, %rax\n"
    "    ret\n"
    "    .globl hybrid__str_fixup\n"
    "    .hidden hybrid__str_fixup\n"
    "hybrid__str_fixup:\n"
    "    movq $-14, %rax\n"
    "    ret\n"
    "    .cfi_endproc\n"
    "    .size hybrid__raw_copy_str, .-hybrid__raw_copy_str\n"

    /* long hybrid__raw_memset(dst=rdi, c=esi, n=rdx) */
    "    .p2align 4\n"
    "    .globl hybrid__raw_memset\n"
    "    .hidden hybrid__raw_memset\n"
    "    .type hybrid__raw_memset, @function\n"
    "hybrid__raw_memset:\n"
    "    .cfi_startproc\n"
    "    movzbl %sil, %eax\n"
    "    movq %rdx, %rcx\n"
    "    .globl hybrid__set_begin\n"
    "    .hidden hybrid__set_begin\n"
    "hybrid__set_begin:\n"
    "    cmpq $64, %rcx\n"                  /* rep stosb starts slowly: words below 64 bytes */
    "    jae 4f\n"
    "    movabsq $0x0101010101010101, %r8\n"
    "    imulq %r8, %rax\n"
    "2:  cmpq $8, %rcx\n"
    "    jb 3f\n"
    "    movq %rax, (%rdi)\n"
    "    addq $8, %rdi\n"
    "    subq $8, %rcx\n"
    "    jmp 2b\n"
    "3:  testq %rcx, %rcx\n"
    "    jz hybrid__set_end\n"
    "    movb %al, (%rdi)\n"
    "    incq %rdi\n"
    "    decq %rcx\n"
    "    jmp 3b\n"
    "4:  rep stosb\n"
    "    .globl hybrid__set_end\n"
    "    .hidden hybrid__set_end\n"
    "hybrid__set_end:\n"
    "    xorl %eax, %eax\n"
    "    ret\n"
    "    .globl hybrid__set_fixup\n"
    "    .hidden hybrid__set_fixup\n"
    "hybrid__set_fixup:\n"
    "    movq $-14, %rax\n"
    "    ret\n"
    "    .cfi_endproc\n"
    "    .size hybrid__raw_memset, .-hybrid__raw_memset\n");

struct extable_entry {
    uintptr_t begin, end, fixup;
};

static struct extable_entry extable[3];
static struct sigaction prev_segv, prev_bus;
static int safe_installed;    /* 1 once our handler is in place */
static uint64_t safe_faults;
static pthread_mutex_t safe_lock = PTHREAD_MUTEX_INITIALIZER;

static void fault_handler(int sig, siginfo_t *si, void *uctx);

/* Pass a fault that is not ours to the handler installed before ours. */
static void chain_fault(int sig, siginfo_t *si, void *uctx)
{
    struct sigaction *prev = sig == SIGBUS ? &prev_bus : &prev_segv;
    int user_sent = si == NULL || si->si_code <= 0;    /* kill(), tgkill(), sigqueue() */
    struct sigaction dfl;
    sigset_t mask, old;

    if ((prev->sa_flags & SA_SIGINFO) ? prev->sa_sigaction != NULL
                                      : (prev->sa_handler != SIG_DFL && prev->sa_handler != SIG_IGN)) {
        mask = prev->sa_mask;
        if (!(prev->sa_flags & SA_NODEFER))
            sigaddset(&mask, sig);
        pthread_sigmask(SIG_BLOCK, &mask, &old);
        if (prev->sa_flags & SA_SIGINFO)
            prev->sa_sigaction(sig, si, uctx);
        else
            prev->sa_handler(sig);
        pthread_sigmask(SIG_SETMASK, &old, NULL);
        return;
    }
    if (prev->sa_handler == SIG_IGN && user_sent)
        return;
    /* Default action: restore it; a real fault re-executes and now kills
     * (with the right address in the core dump); a sent signal is re-raised
     * (not blocked: our handler has SA_NODEFER). */
    memset(&dfl, 0, sizeof(dfl));
    dfl.sa_handler = SIG_DFL;
    sigemptyset(&dfl.sa_mask);
    sigaction(sig, &dfl, NULL);
    if (user_sent)
        raise(sig);
}

static void fault_handler(int sig, siginfo_t *si, void *uctx)
{
    ucontext_t *uc = uctx;

    if (si != NULL && si->si_code > 0 && uc != NULL) {    /* raised by the CPU, not sent */
        uintptr_t ip = (uintptr_t)uc->uc_mcontext.gregs[REG_RIP];
        unsigned i;

        for (i = 0; i < sizeof(extable) / sizeof(extable[0]); i++) {
            if (ip >= extable[i].begin && ip < extable[i].end) {
                uc->uc_mcontext.gregs[REG_RIP] = (greg_t)extable[i].fixup;
                __atomic_add_fetch(&safe_faults, 1, __ATOMIC_RELAXED);
                return;
            }
        }
    }
    chain_fault(sig, si, uctx);
}

static int install_one(int sig, struct sigaction *prev)
{
    struct sigaction cur, act;

    if (sigaction(sig, NULL, &cur) != 0)
        return -errno;
    if ((cur.sa_flags & SA_SIGINFO) && cur.sa_sigaction == fault_handler)
        return 0;    /* already ours */
    memset(&act, 0, sizeof(act));
    act.sa_sigaction = fault_handler;
    act.sa_flags = SA_SIGINFO | SA_NODEFER | SA_ONSTACK | SA_RESTART;
    sigemptyset(&act.sa_mask);
    *prev = cur;    /* before installing: our handler may run at once */
    if (sigaction(sig, &act, NULL) != 0)
        return -errno;
    return 0;
}

int hybrid_safe_install(void)
{
    int err;

    pthread_mutex_lock(&safe_lock);
    extable[0] = (struct extable_entry){(uintptr_t)hybrid__copy_begin, (uintptr_t)hybrid__copy_end,
                                        (uintptr_t)hybrid__copy_fixup};
    extable[1] = (struct extable_entry){(uintptr_t)hybrid__str_begin, (uintptr_t)hybrid__str_end,
                                        (uintptr_t)hybrid__str_fixup};
    extable[2] = (struct extable_entry){(uintptr_t)hybrid__set_begin, (uintptr_t)hybrid__set_end,
                                        (uintptr_t)hybrid__set_fixup};
    err = install_one(SIGSEGV, &prev_segv);
    if (err == 0)
        err = install_one(SIGBUS, &prev_bus);
    if (err == 0)
        __atomic_store_n(&safe_installed, 1, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&safe_lock);
    return err;
}

static inline int safe_ready(void)
{
    if (LIKELY(__atomic_load_n(&safe_installed, __ATOMIC_ACQUIRE)))
        return 1;
    return hybrid_safe_install() == 0;
}

/* Without a handler (sigaction failed: never seen) nothing is safe: refuse. */
static inline long raw_copy(void *dst, const void *src, uint64_t n)
{
    return safe_ready() ? hybrid__raw_copy(dst, src, n) : -EFAULT;
}

static inline long raw_copy_str(void *dst, const void *src, uint64_t n)
{
    return safe_ready() ? hybrid__raw_copy_str(dst, src, n) : -EFAULT;
}

static inline long raw_memset(void *dst, int c, uint64_t n)
{
    return safe_ready() ? hybrid__raw_memset(dst, c, n) : -EFAULT;
}

#else /* not x86-64: the same results through process_vm_readv/writev */

static uint64_t safe_faults;

int hybrid_safe_install(void)
{
    return 0;
}

static long vm_copy(void *dst, const void *src, uint64_t n, int write)
{
    struct iovec local = {dst, n}, remote = {(void *)src, n};
    ssize_t got;

    if (n == 0)
        return 0;
    if (write) {
        local.iov_base = (void *)src;
        remote.iov_base = dst;
        got = process_vm_writev(getpid(), &local, 1, &remote, 1, 0);
    } else {
        got = process_vm_readv(getpid(), &local, 1, &remote, 1, 0);
    }
    if (got != (ssize_t)n) {
        __atomic_add_fetch(&safe_faults, 1, __ATOMIC_RELAXED);
        return -EFAULT;
    }
    return 0;
}

static long raw_copy(void *dst, const void *src, uint64_t n)
{
    char tmp[256];
    uint64_t done = 0;

    /* both sides may be bad: read into a buffer, then write */
    while (done < n) {
        uint64_t k = n - done < sizeof(tmp) ? n - done : sizeof(tmp);

        if (vm_copy(tmp, (const char *)src + done, k, 0) || vm_copy((char *)dst + done, tmp, k, 1))
            return -EFAULT;
        done += k;
    }
    return 0;
}

static long raw_copy_str(void *dst, const void *src, uint64_t n)
{
    uint64_t i = 0;
    char c;

    if (n == 0)
        return 0;
    for (; i + 1 < n; i++) {
        if (vm_copy(&c, (const char *)src + i, 1, 0) || vm_copy((char *)dst + i, &c, 1, 1))
            return -EFAULT;
        if (c == 0)
            return (long)i + 1;
    }
    c = 0;
    return vm_copy((char *)dst + i, &c, 1, 1) ? -EFAULT : (long)n;
}

static long raw_memset(void *dst, int c, uint64_t n)
{
    char tmp[256];
    uint64_t done = 0;

    memset(tmp, c, sizeof(tmp));
    while (done < n) {
        uint64_t k = n - done < sizeof(tmp) ? n - done : sizeof(tmp);

        if (vm_copy((char *)dst + done, tmp, k, 1))
            return -EFAULT;
        done += k;
    }
    return 0;
}

#endif

long hybrid_safe_copy(void *dst, const void *src, uint64_t n)
{
    return raw_copy(dst, src, n);
}

long hybrid_safe_copy_str(void *dst, const void *src, uint64_t n)
{
    return raw_copy_str(dst, src, n);
}

long hybrid_safe_write(void *dst, const void *src, uint64_t n)
{
    return raw_copy(dst, src, n);
}

long hybrid_safe_memset(void *dst, int c, uint64_t n)
{
    return raw_memset(dst, c, n);
}

uint64_t hybrid_safe_fault_count(void)
{
    return __atomic_load_n(&safe_faults, __ATOMIC_RELAXED);
}

/* Small typed accessors on top of the safe copy. */
static inline int load_u64(uint64_t *out, uint64_t addr)
{
    return raw_copy(out, (const void *)(uintptr_t)addr, 8) == 0;
}

static inline int store_u64(uint64_t addr, uint64_t value)
{
    return raw_copy((void *)(uintptr_t)addr, &value, 8) == 0;
}

#define REG_OFF(field) ((uint64_t)__builtin_offsetof(struct hybrid_pt_regs, field))

/* ========================================================================= */
/* probe_read & co.                                                          */
/* ========================================================================= */

static uint64_t probe_read_user(uint64_t dst, uint32_t size, uint64_t src)
{
    long err = raw_copy((void *)(uintptr_t)dst, (const void *)(uintptr_t)src, size);

    if (UNLIKELY(err < 0))
        raw_memset((void *)(uintptr_t)dst, 0, size);
    return (uint64_t)err;
}

static uint64_t probe_read_user_str(uint64_t dst, uint32_t size, uint64_t src)
{
    long n;

    if (size == 0)
        return 0;
    n = raw_copy_str((void *)(uintptr_t)dst, (const void *)(uintptr_t)src, size);
    if (UNLIKELY(n < 0))
        raw_memset((void *)(uintptr_t)dst, 0, size);
    return (uint64_t)n;
}

uint64_t hybrid_helper_probe_read_user(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5)
{
    (void)r4; (void)r5;
    return probe_read_user(r1, (uint32_t)r2, r3);
}

uint64_t hybrid_helper_probe_read(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5)
{
    (void)r4; (void)r5;
    return probe_read_user(r1, (uint32_t)r2, r3);
}

uint64_t hybrid_helper_probe_read_user_str(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5)
{
    (void)r4; (void)r5;
    return probe_read_user_str(r1, (uint32_t)r2, r3);
}

uint64_t hybrid_helper_probe_read_str(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5)
{
    (void)r4; (void)r5;
    return probe_read_user_str(r1, (uint32_t)r2, r3);
}

/* In a traced process the "kernel" memory a program reads is what hybrid
 * built for it in process memory: the pt_regs of a probe, the record of a
 * syscall tracepoint, the regs pointer of raw_tp/sys_enter.  libbpf's
 * usdt.bpf.h, BPF_CORE_READ and PT_REGS_*_CORE read those with
 * probe_read_kernel, so it reads process memory safely, like
 * probe_read_user; a real kernel address is not mapped: -EFAULT. */
uint64_t hybrid_helper_probe_read_kernel(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5)
{
    (void)r4; (void)r5;
    return probe_read_user(r1, (uint32_t)r2, r3);
}

uint64_t hybrid_helper_probe_read_kernel_str(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5)
{
    (void)r4; (void)r5;
    return probe_read_user_str(r1, (uint32_t)r2, r3);
}

/* bpf_probe_write_user(dst, src, len).  The kernel refuses it (-EPERM)
 * under lockdown and for kernel threads; in a process writing its own
 * memory neither applies. */
uint64_t hybrid_helper_probe_write_user(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5)
{
    uint32_t size = (uint32_t)r3;
    char buf[256];
    uint32_t done = 0;

    (void)r4; (void)r5;
    if (size <= sizeof(buf))    /* src is read safely too: bounce through a buffer */
        return (uint64_t)(raw_copy(buf, (const void *)(uintptr_t)r2, size) ?: raw_copy((void *)(uintptr_t)r1, buf, size));
    while (done < size) {
        uint32_t k = size - done < sizeof(buf) ? size - done : (uint32_t)sizeof(buf);

        if (raw_copy(buf, (const char *)(uintptr_t)r2 + done, k) || raw_copy((char *)(uintptr_t)r1 + done, buf, k))
            return NEG(EFAULT);
        done += k;
    }
    return 0;
}

/* ========================================================================= */
/* Formatting: the kernel's bpf_bprintf_prepare + bstr_printf subset          */
/* ========================================================================= */

#define MAX_BPRINTF_VARARGS 12
#define MAX_TRACE_PRINTK_VARARGS 3
#define MAX_BPRINTF_BUF 1024
#define FMT_MAX 2048
#define STR_MAX 512
#define FIELD_WIDTH_MAX ((1 << 23) - 1)

enum { F_LEFT = 1, F_ZERO = 2, F_PLUS = 4, F_SPACE = 8 };

struct spec {
    char conv;     /* d u x X c s p I(ip) */
    char ptype;    /* %s: 's', 'k', 'u'; ip: 'i' or 'I' */
    char ipver;    /* '4' or '6' */
    int flags;
    int width;     /* -1: none */
    int size;      /* 4 or 8 (integers) */
};

static inline int is_space(int c)
{
    return c == ' ' || (c >= '\t' && c <= '\r');
}

static inline int is_punct(int c)
{
    return (c >= 0x21 && c <= 0x2f) || (c >= 0x3a && c <= 0x40) || (c >= 0x5b && c <= 0x60) ||
           (c >= 0x7b && c <= 0x7e);
}

static inline int is_print(int c)
{
    return c >= 0x20 && c <= 0x7e;
}

/* Parse the specifier after the '%' at fmt[*pi]; *pi ends on its last char.
 * fmt is NUL-terminated, so looking one or two chars ahead is safe. */
static int parse_spec(const char *fmt, size_t *pi, struct spec *sp)
{
    size_t i = *pi + 1;

    sp->flags = 0;
    sp->width = -1;
    sp->size = 4;
    sp->ptype = 0;
    sp->ipver = 0;
    for (;; i++) {
        if (fmt[i] == '0')
            sp->flags |= F_ZERO;
        else if (fmt[i] == '+')
            sp->flags |= F_PLUS;
        else if (fmt[i] == '-')
            sp->flags |= F_LEFT;
        else if (fmt[i] == ' ')
            sp->flags |= F_SPACE;
        else
            break;
    }
    if (fmt[i] >= '1' && fmt[i] <= '9') {
        long w = 0;

        while (fmt[i] >= '0' && fmt[i] <= '9') {
            if (w < FIELD_WIDTH_MAX)
                w = w * 10 + (fmt[i] - '0');
            i++;
        }
        sp->width = w > FIELD_WIDTH_MAX ? FIELD_WIDTH_MAX : (int)w;
    }
    if (fmt[i] == 'p') {
        char n = fmt[i + 1];

        sp->size = 8;
        if (n == 0 || is_space(n) || is_punct(n)) {
            sp->conv = 'p';
        } else if ((n == 'k' || n == 'u') && fmt[i + 2] == 's') {
            sp->ptype = n;
            i += 2;
            goto str;
        } else if (n == 'K' || n == 'x' || n == 's' || n == 'S' || n == 'B') {
            sp->conv = 'p';
            i++;
        } else if ((n == 'i' || n == 'I') && (fmt[i + 2] == '4' || fmt[i + 2] == '6')) {
            sp->conv = 'I';
            sp->ptype = n;
            sp->ipver = fmt[i + 2];
            i += 2;
        } else {
            return -EINVAL;
        }
        *pi = i;
        return 0;
    }
    if (fmt[i] == 's') {
        sp->ptype = 's';
str:
        if (fmt[i + 1] != 0 && !is_space(fmt[i + 1]) && !is_punct(fmt[i + 1]))
            return -EINVAL;
        sp->conv = 's';
        sp->size = 8;
        *pi = i;
        return 0;
    }
    if (fmt[i] == 'c') {
        sp->conv = 'c';
        *pi = i;
        return 0;
    }
    if (fmt[i] == 'l') {
        sp->size = 8;
        i++;
    }
    if (fmt[i] == 'l')
        i++;
    if (fmt[i] == 'i' || fmt[i] == 'd')
        sp->conv = 'd';
    else if (fmt[i] == 'u' || fmt[i] == 'x' || fmt[i] == 'X')
        sp->conv = fmt[i];
    else
        return -EINVAL;
    *pi = i;
    return 0;
}

/* Check a whole format: the number of specifiers, or -EINVAL. */
static int check_format(const char *fmt, size_t len, int nargs)
{
    struct spec sp;
    size_t i;
    int n = 0;

    for (i = 0; i < len; i++) {
        if (!is_print((unsigned char)fmt[i]) && !is_space((unsigned char)fmt[i]))
            return -EINVAL;
        if (fmt[i] != '%')
            continue;
        if (fmt[i + 1] == '%') {
            i++;
            continue;
        }
        if (n >= nargs)
            return -EINVAL;
        if (parse_spec(fmt, &i, &sp) < 0)
            return -EINVAL;
        n++;
    }
    return n;
}

/* An output sink: counts every byte, stores the first `cap` ones at `dst`
 * through the safe copy (in chunks), remembers a fault. */
struct sink {
    char *dst;
    uint64_t cap;        /* bytes that may be stored */
    uint64_t len;        /* bytes produced */
    uint64_t flushed;    /* bytes stored so far: chunk[0] goes to dst[flushed] */
    int fault;
    uint32_t fill;
    char chunk[256];
};

static void sink_init(struct sink *s, char *dst, uint64_t cap)
{
    s->dst = dst;
    s->cap = cap;
    s->len = 0;
    s->flushed = 0;
    s->fault = 0;
    s->fill = 0;
}

static void sink_flush(struct sink *s)
{
    if (s->fill && raw_copy(s->dst + s->flushed, s->chunk, s->fill) < 0)
        s->fault = 1;
    s->flushed += s->fill;
    s->fill = 0;
}

static inline void sink_put(struct sink *s, char c)
{
    if (s->len < s->cap) {
        s->chunk[s->fill++] = c;
        s->len++;
        if (s->fill == sizeof(s->chunk))
            sink_flush(s);
    } else {
        s->len++;    /* past the end: only counted */
    }
}

static void sink_rep(struct sink *s, char c, uint64_t n)
{
    while (n-- > 0)
        sink_put(s, c);
}

static void sink_mem(struct sink *s, const char *p, uint64_t n)
{
    while (n-- > 0)
        sink_put(s, *p++);
}

/* A field: `body` (len bytes) after `prefix`, padded to sp->width. */
static void put_field(struct sink *s, const struct spec *sp, const char *prefix, size_t plen,
                      const char *body, size_t blen, int zero_ok)
{
    uint64_t w = sp->width > 0 ? (uint64_t)sp->width : 0;
    uint64_t used = plen + blen;
    uint64_t pad = w > used ? w - used : 0;

    if (sp->flags & F_LEFT) {
        sink_mem(s, prefix, plen);
        sink_mem(s, body, blen);
        sink_rep(s, ' ', pad);
    } else if ((sp->flags & F_ZERO) && zero_ok) {
        sink_mem(s, prefix, plen);
        sink_rep(s, '0', pad);
        sink_mem(s, body, blen);
    } else {
        sink_rep(s, ' ', pad);
        sink_mem(s, prefix, plen);
        sink_mem(s, body, blen);
    }
}

static void put_number(struct sink *s, const struct spec *sp, uint64_t raw)
{
    static const char lower[] = "0123456789abcdef", upper[] = "0123456789ABCDEF";
    const char *digits = sp->conv == 'X' ? upper : lower;
    unsigned base = (sp->conv == 'x' || sp->conv == 'X') ? 16 : 10;
    char buf[24], sign[1];
    size_t n = 0, plen = 0;
    uint64_t v;

    if (sp->conv == 'd') {
        int64_t x = sp->size == 8 ? (int64_t)raw : (int64_t)(int32_t)(uint32_t)raw;

        if (x < 0) {
            sign[plen++] = '-';
            v = (uint64_t)0 - (uint64_t)x;
        } else {
            if (sp->flags & F_PLUS)
                sign[plen++] = '+';
            else if (sp->flags & F_SPACE)
                sign[plen++] = ' ';
            v = (uint64_t)x;
        }
    } else {
        v = sp->size == 8 ? raw : (uint32_t)raw;
    }
    do {
        buf[sizeof(buf) - 1 - n++] = digits[v % base];
        v /= base;
    } while (v);
    put_field(s, sp, sign, plen, buf + sizeof(buf) - n, n, 1);
}

static void put_hex(char *out, uint64_t v, int ndigits)
{
    static const char lower[] = "0123456789abcdef";
    int i;

    for (i = ndigits - 1; i >= 0; i--, v >>= 4)
        out[i] = lower[v & 15];
}

static void put_pointer(struct sink *s, const struct spec *sp, uint64_t v)
{
    char buf[16];
    struct spec p = *sp;

    put_hex(buf, v, 16);
    if (p.width < 0) {    /* the kernel's default: 2 * sizeof(void *) digits, zero padded */
        p.width = 16;
        p.flags |= F_ZERO;
    }
    put_field(s, &p, "", 0, buf, 16, 1);
}

static void put_ip(struct sink *s, const struct spec *sp, uint64_t addr)
{
    unsigned char ip[16];
    char buf[48];
    size_t n = 0;
    int i, len = sp->ipver == '4' ? 4 : 16;

    if (raw_copy(ip, (const void *)(uintptr_t)addr, len) < 0)
        memset(ip, 0, sizeof(ip));
    if (len == 4) {
        for (i = 0; i < 4; i++)
            n += (size_t)snprintf(buf + n, sizeof(buf) - n, sp->ptype == 'i' ? "%s%03u" : "%s%u",
                                  i ? "." : "", ip[i]);
    } else {
        for (i = 0; i < 16; i += 2) {
            if (i && sp->ptype == 'I')
                buf[n++] = ':';
            put_hex(buf + n, (uint64_t)ip[i] << 8 | ip[i + 1], 4);
            n += 4;
        }
    }
    put_field(s, sp, "", 0, buf, n, 0);
}

/* Format fmt (checked by check_format) with raw 64-bit args into s. */
static void format(struct sink *s, const char *fmt, size_t len, const uint64_t *args)
{
    struct spec sp;
    size_t i;
    int n = 0;

    for (i = 0; i < len; i++) {
        if (fmt[i] != '%') {
            sink_put(s, fmt[i]);
            continue;
        }
        if (fmt[i + 1] == '%') {
            sink_put(s, '%');
            i++;
            continue;
        }
        parse_spec(fmt, &i, &sp);
        switch (sp.conv) {
        case 'c': {
            char c = (char)args[n];

            put_field(s, &sp, "", 0, &c, 1, 0);
            break;
        }
        case 's': {
            char str[STR_MAX];
            long k = raw_copy_str(str, (const void *)(uintptr_t)args[n], sizeof(str));

            put_field(s, &sp, "", 0, str, k > 0 ? (size_t)k - 1 : 0, 0);
            break;
        }
        case 'p':
            put_pointer(s, &sp, args[n]);
            break;
        case 'I':
            put_ip(s, &sp, args[n]);
            break;
        default:
            put_number(s, &sp, args[n]);
        }
        n++;
    }
    sink_flush(s);
}

/* Copy a format from program memory: its length (without the NUL, which must
 * be within `size` bytes), or a negative errno. */
static long load_format(char *buf, uint64_t addr, uint64_t size)
{
    long n;

    if (size == 0)
        return -EINVAL;
    if (size > FMT_MAX)
        size = FMT_MAX;
    n = raw_copy_str(buf, (const void *)(uintptr_t)addr, size);
    if (n < 0)
        return n;
    if ((uint64_t)n == size && buf[n - 1] == 0) {
        /* cut at `size`: the copy's NUL is ours unless the source's was there too */
        char last;

        if (raw_copy(&last, (const char *)(uintptr_t)addr + n - 1, 1) < 0 || last != 0)
            return -EINVAL;
    }
    return n - 1;
}

/* Load args from the program's u64 array (data, data_len) like bpf_snprintf. */
static int load_args(uint64_t *args, uint64_t data, uint32_t data_len)
{
    if (data_len % 8 || data_len > MAX_BPRINTF_VARARGS * 8 || (data_len && !data))
        return -EINVAL;
    if (data_len && raw_copy(args, (const void *)(uintptr_t)data, data_len) < 0)
        return -EFAULT;
    return (int)(data_len / 8);
}

/* ------------------------------------------------------------------------- */
/* Trace lines                                                               */
/* ------------------------------------------------------------------------- */

#define TRACE_DEFAULT_PATH "/dev/shm/hybrid-trace"

static int trace_fd = -1;         /* where lines go; -1: not opened yet */
static int trace_fd_owned;        /* we opened it (and may close it) */
static int trace_fd_pipe;         /* a pipe/FIFO/socket: a write may raise SIGPIPE */
static int64_t trace_retry_at;    /* the default file failed to open: retry from then (s) */
static pthread_mutex_t trace_lock = PTHREAD_MUTEX_INITIALIZER;

static int64_t coarse_seconds(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
    return (int64_t)ts.tv_sec;
}

static int fd_is_pipe(int fd)
{
    struct stat st;

    return fstat(fd, &st) == 0 && (S_ISFIFO(st.st_mode) || S_ISSOCK(st.st_mode));
}

static int trace_open_default(void)
{
    const char *path = getenv("HYBRID_TRACE_PIPE");
    int fd;

    if (path != NULL && strcmp(path, "-") == 0)
        return 2;
    if (path == NULL || *path == 0)
        path = TRACE_DEFAULT_PATH;
    /* O_NONBLOCK: a FIFO without a reader fails (ENXIO) instead of blocking */
    fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_NONBLOCK | O_CLOEXEC, 0644);
    if (fd >= 0)
        trace_fd_owned = 1;
    return fd;
}

int hybrid_trace_fd(void)
{
    int fd = __atomic_load_n(&trace_fd, __ATOMIC_ACQUIRE);

    if (LIKELY(fd >= 0))
        return fd;
    pthread_mutex_lock(&trace_lock);
    fd = trace_fd;
    if (fd < 0 && coarse_seconds() >= trace_retry_at) {
        fd = trace_open_default();
        if (fd < 0) {
            trace_retry_at = coarse_seconds() + 1;    /* e.g. a FIFO nobody reads yet */
        } else {
            trace_fd_pipe = fd_is_pipe(fd);
            __atomic_store_n(&trace_fd, fd, __ATOMIC_RELEASE);
        }
    }
    pthread_mutex_unlock(&trace_lock);
    return fd;
}

int hybrid_trace_set_fd(int fd)
{
    int old;

    if (fd < -1)
        return -EINVAL;
    pthread_mutex_lock(&trace_lock);
    old = trace_fd;
    if (old >= 0 && trace_fd_owned && old != fd)
        close(old);
    trace_fd_owned = 0;
    trace_retry_at = 0;
    trace_fd_pipe = fd >= 0 && fd_is_pipe(fd);
    __atomic_store_n(&trace_fd, fd, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&trace_lock);
    return 0;
}

/* One write() per line.  To a pipe, with SIGPIPE blocked and a SIGPIPE this
 * write raised consumed: a reader that went away must not kill the traced
 * process (the line is dropped, as when the pipe is full: O_NONBLOCK). */
static void trace_write(int fd, const char *line, size_t n)
{
    sigset_t pipe, old, pending;
    int was_pending;
    ssize_t w;

    if (!trace_fd_pipe) {
        do
            w = write(fd, line, n);
        while (w < 0 && errno == EINTR);
        return;
    }
    sigemptyset(&pipe);
    sigaddset(&pipe, SIGPIPE);
    sigpending(&pending);
    was_pending = sigismember(&pending, SIGPIPE);
    pthread_sigmask(SIG_BLOCK, &pipe, &old);
    do
        w = write(fd, line, n);
    while (w < 0 && errno == EINTR);
    if (w < 0 && errno == EPIPE && !was_pending) {
        struct timespec zero = {0, 0};

        while (sigtimedwait(&pipe, NULL, &zero) < 0 && errno == EINTR)
            ;
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
}

static HYBRID_TLS uint32_t trace_tid;

static void trace_reset_in_child(void)
{
    trace_tid = 0;
}

static void trace_emit(const char *msg, size_t len)
{
    char line[MAX_BPRINTF_BUF + 128];
    char comm[17] = {0};
    struct timespec ts;
    int fd = hybrid_trace_fd(), cpu, n;

    if (fd < 0)
        return;
    if (trace_tid == 0)
        trace_tid = (uint32_t)syscall(SYS_gettid);
    if (prctl(PR_GET_NAME, comm, 0, 0, 0) != 0)
        strcpy(comm, "<...>");
    cpu = sched_getcpu();
    clock_gettime(CLOCK_MONOTONIC, &ts);
    n = snprintf(line, sizeof(line), "%16s-%-7u [%03d] ..... %5llu.%06llu: bpf_trace_printk: ", comm,
                 trace_tid, cpu < 0 ? 0 : cpu, (unsigned long long)ts.tv_sec,
                 (unsigned long long)ts.tv_nsec / 1000);
    if (n < 0 || (size_t)n >= sizeof(line))
        return;
    if (len > sizeof(line) - (size_t)n - 1)
        len = sizeof(line) - (size_t)n - 1;
    memcpy(line + n, msg, len);
    n += (int)len;
    if (len == 0 || msg[len - 1] != '\n')
        line[n++] = '\n';
    trace_write(fd, line, (size_t)n);
}

static uint64_t trace_common(uint64_t fmt_addr, uint32_t fmt_size, const uint64_t *args, int nargs)
{
    char fmt[FMT_MAX];
    char msg[MAX_BPRINTF_BUF];
    struct sink s;
    long len;
    int err;

    len = load_format(fmt, fmt_addr, fmt_size);
    if (len < 0)
        return NEG(len == -EFAULT ? EFAULT : EINVAL);
    err = check_format(fmt, (size_t)len, nargs);
    if (err < 0)
        return NEG(-err);
    sink_init(&s, msg, sizeof(msg) - 1);
    format(&s, fmt, (size_t)len, args);
    trace_emit(msg, s.len < s.cap ? s.len : s.cap);
    return s.len;
}

uint64_t hybrid_helper_trace_printk(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5)
{
    uint64_t args[MAX_TRACE_PRINTK_VARARGS] = {r3, r4, r5};

    return trace_common(r1, (uint32_t)r2, args, MAX_TRACE_PRINTK_VARARGS);
}

uint64_t hybrid_helper_trace_vprintk(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5)
{
    uint64_t args[MAX_BPRINTF_VARARGS];
    int nargs = load_args(args, r3, (uint32_t)r4);

    (void)r5;
    if (nargs < 0)
        return NEG(-nargs);
    return trace_common(r1, (uint32_t)r2, args, nargs);
}

/* bpf_snprintf(str, str_size, fmt, data, data_len): the length of the whole
 * output + 1 (str gets at most str_size - 1 bytes and a NUL). */
uint64_t hybrid_helper_snprintf(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5)
{
    uint32_t size = (uint32_t)r2;
    uint64_t args[MAX_BPRINTF_VARARGS];
    char fmt[FMT_MAX];
    struct sink s;
    long len;
    int nargs, err;

    if (size > 0x7fffffff)
        return NEG(EINVAL);
    nargs = load_args(args, r4, (uint32_t)r5);
    if (nargs < 0)
        return NEG(-nargs);
    len = load_format(fmt, r3, FMT_MAX);
    if (len < 0)
        return NEG(len == -EFAULT ? EFAULT : EINVAL);
    err = check_format(fmt, (size_t)len, nargs);
    if (err < 0)
        return NEG(-err);
    sink_init(&s, (char *)(uintptr_t)r1, size ? size - 1 : 0);
    format(&s, fmt, (size_t)len, args);
    if (size) {
        uint64_t end = s.len < s.cap ? s.len : s.cap;
        char nul = 0;

        if (raw_copy(s.dst + end, &nul, 1) < 0)
            s.fault = 1;
    }
    if (s.fault)
        return NEG(EFAULT);
    return s.len + 1;
}

/* ========================================================================= */
/* strncmp, jiffies, namespaces, signals, task                               */
/* ========================================================================= */

/* bpf_strncmp(s1, s1_sz, s2): strncmp(s1, s2, s1_sz) with the kernel's -1/0/1. */
uint64_t hybrid_helper_strncmp(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5)
{
    const char *s1 = (const char *)(uintptr_t)r1, *s2 = (const char *)(uintptr_t)r3;
    uint32_t n = (uint32_t)r2, off = 0;
    unsigned char a[64], b[65];

    (void)r4; (void)r5;
    while (off < n) {
        uint32_t k = n - off < sizeof(a) ? n - off : (uint32_t)sizeof(a), i;

        if (raw_copy(a, s1 + off, k) < 0 || raw_copy_str(b, s2 + off, k + 1) < 0)
            return NEG(EFAULT);
        for (i = 0; i < k; i++) {
            if (a[i] != b[i])
                return a[i] < b[i] ? (uint64_t)-1 : 1;
            if (a[i] == 0)
                return 0;
        }
        off += k;
    }
    return 0;
}

static uint32_t jiffies_hz;

static uint32_t hz_from_config(void)
{
    struct utsname u;
    char path[128 + sizeof(u.release)], line[256];
    uint32_t hz = 0;
    FILE *f;

    if (uname(&u) != 0)
        return 0;
    snprintf(path, sizeof(path), "/boot/config-%s", u.release);
    f = fopen(path, "re");
    if (f == NULL)
        return 0;
    while (fgets(line, sizeof(line), f) != NULL) {
        if (strncmp(line, "CONFIG_HZ=", 10) == 0) {
            hz = (uint32_t)strtoul(line + 10, NULL, 10);
            break;
        }
    }
    fclose(f);
    return hz;
}

uint32_t hybrid_jiffies_hz(void)
{
    uint32_t hz = __atomic_load_n(&jiffies_hz, __ATOMIC_RELAXED);
    struct timespec res;

    if (LIKELY(hz))
        return hz;
    hz = hz_from_config();
    if (hz == 0 && clock_getres(CLOCK_MONOTONIC_COARSE, &res) == 0 && res.tv_sec == 0 && res.tv_nsec > 0) {
        hz = (uint32_t)((1000000000L + res.tv_nsec / 2) / res.tv_nsec);
        if (hz < 24 || hz > 10000)
            hz = 0;
    }
    if (hz == 0)
        hz = 250;
    __atomic_store_n(&jiffies_hz, hz, __ATOMIC_RELAXED);
    return hz;
}

/* jiffies_64 = jiffies_base + CLOCK_MONOTONIC_COARSE * HZ.  The base is
 * calibrated once with times(), which returns jiffies_64 in USER_HZ units
 * (so within HZ / USER_HZ ticks); without it, INITIAL_JIFFIES (jiffies at
 * boot, when CLOCK_MONOTONIC is ~0). */
static int64_t jiffies_base;
static int jiffies_calibrated;

static uint64_t mono_jiffies(uint64_t hz, int *ok)
{
    struct timespec ts;

    *ok = clock_gettime(CLOCK_MONOTONIC_COARSE, &ts) == 0;
    if (!*ok)
        return 0;
    return (uint64_t)ts.tv_sec * hz + (uint64_t)ts.tv_nsec * hz / 1000000000ull;
}

static void jiffies_calibrate(uint64_t hz)
{
    long user_hz = sysconf(_SC_CLK_TCK);
    int64_t base = (int64_t)(uint32_t)(-300 * (int64_t)hz);    /* INITIAL_JIFFIES */
    clock_t t = times(NULL);
    int ok;
    uint64_t mono = mono_jiffies(hz, &ok);

    if (t != (clock_t)-1 && user_hz > 0 && ok) {
        /* the middle of the HZ / USER_HZ ticks the clock_t value stands for */
        uint64_t j = ((uint64_t)t * hz * 2 + hz) / (2 * (uint64_t)user_hz);

        base = (int64_t)(j - mono);
    }
    __atomic_store_n(&jiffies_base, base, __ATOMIC_RELAXED);
    __atomic_store_n(&jiffies_calibrated, 1, __ATOMIC_RELEASE);
}

uint64_t hybrid_helper_jiffies64(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5)
{
    uint64_t hz = hybrid_jiffies_hz();
    int ok;
    uint64_t mono;

    (void)r1; (void)r2; (void)r3; (void)r4; (void)r5;
    if (UNLIKELY(!__atomic_load_n(&jiffies_calibrated, __ATOMIC_ACQUIRE)))
        jiffies_calibrate(hz);
    mono = mono_jiffies(hz, &ok);    /* CLOCK_MONOTONIC_COARSE cannot fail; if it did: the base */
    return (uint64_t)__atomic_load_n(&jiffies_base, __ATOMIC_RELAXED) + mono;
}

/* pid namespace of this process: stat(/proc/self/ns/pid) once. */
static struct {
    int state;    /* 0 unknown, 1 known, -errno failed */
    uint64_t dev, kdev, ino;
} pidns;
static pthread_mutex_t pidns_lock = PTHREAD_MUTEX_INITIALIZER;

static int pidns_load(void)
{
    int state = __atomic_load_n(&pidns.state, __ATOMIC_ACQUIRE);
    struct stat st;

    if (LIKELY(state != 0))
        return state;
    pthread_mutex_lock(&pidns_lock);
    if (pidns.state == 0) {
        if (stat("/proc/self/ns/pid", &st) == 0) {
            pidns.dev = (uint64_t)st.st_dev;
            /* the kernel's dev_t: MKDEV(major, minor) = major << 20 | minor */
            pidns.kdev = (uint64_t)major(st.st_dev) << 20 | minor(st.st_dev);
            pidns.ino = (uint64_t)st.st_ino;
            state = 1;
        } else {
            state = -ENOENT;
        }
        __atomic_store_n(&pidns.state, state, __ATOMIC_RELEASE);
    }
    state = pidns.state;
    pthread_mutex_unlock(&pidns_lock);
    return state;
}

/* bpf_get_ns_current_pid_tgid(dev, ino, nsdata, size).  dev is accepted in
 * the kernel's encoding (major << 20 | minor) and as stat's st_dev (the two
 * agree for the usual nsfs minors < 256). */
uint64_t hybrid_helper_get_ns_current_pid_tgid(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5)
{
    uint32_t size = (uint32_t)r4;
    struct hybrid_pidns_info info;
    int err = -EINVAL, state;

    (void)r5;
    if (size != sizeof(info) || r1 != (uint64_t)(uint32_t)r1)
        goto clear;
    state = pidns_load();
    if (state < 0) {
        err = state;
        goto clear;
    }
    if ((r1 != pidns.kdev && r1 != pidns.dev) || r2 != pidns.ino)
        goto clear;
    info.pid = (uint32_t)syscall(SYS_gettid);
    info.tgid = (uint32_t)getpid();
    return raw_copy((void *)(uintptr_t)r3, &info, sizeof(info)) < 0 ? NEG(EFAULT) : 0;
clear:
    raw_memset((void *)(uintptr_t)r3, 0, size);
    return NEG(-err);
}

/* bpf_send_signal(sig): to this process.  The kernel queues it for the
 * return to userspace; here it is delivered before the helper returns
 * (a handler may run inside the program's helper call).  Not refused for
 * pid 1 (the kernel refuses the global init only). */
uint64_t hybrid_helper_send_signal(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5)
{
    uint32_t sig = (uint32_t)r1;

    (void)r2; (void)r3; (void)r4; (void)r5;
    if (sig > 64)    /* valid_signal(): sig <= _NSIG */
        return NEG(EINVAL);
    return kill(getpid(), (int)sig) == 0 ? 0 : NEG(errno);
}

uint64_t hybrid_helper_send_signal_thread(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5)
{
    uint32_t sig = (uint32_t)r1;

    (void)r2; (void)r3; (void)r4; (void)r5;
    if (sig > 64)
        return NEG(EINVAL);
    return syscall(SYS_tgkill, getpid(), syscall(SYS_gettid), (int)sig) == 0 ? 0 : NEG(errno);
}

/* No task_struct in userspace: NULL, which programs must handle anyway. */
uint64_t hybrid_helper_get_current_task(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5)
{
    (void)r1; (void)r2; (void)r3; (void)r4; (void)r5;
    return 0;
}

/* ========================================================================= */
/* The current probe                                                         */
/* ========================================================================= */

HYBRID_TLS struct hybrid_probe_ctx *hybrid_current_probe;

struct hybrid_probe_ctx *hybrid_probe_enter(struct hybrid_probe_ctx *ctx)
{
    struct hybrid_probe_ctx *prev = hybrid_current_probe;

    hybrid_current_probe = ctx;
    return prev;
}

void hybrid_probe_exit(void)
{
    hybrid_current_probe = NULL;
}

void hybrid_probe_restore(struct hybrid_probe_ctx *prev)
{
    hybrid_current_probe = prev;
}

struct hybrid_probe_ctx *hybrid_probe_current(void)
{
    return hybrid_current_probe;
}

uint64_t hybrid_helper_get_func_ip(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5)
{
    struct hybrid_probe_ctx *p = hybrid_current_probe;

    (void)r1; (void)r2; (void)r3; (void)r4; (void)r5;
    return p ? p->func_ip : 0;
}

uint64_t hybrid_helper_get_attach_cookie(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5)
{
    struct hybrid_probe_ctx *p = hybrid_current_probe;

    (void)r1; (void)r2; (void)r3; (void)r4; (void)r5;
    return p ? p->cookie : 0;
}

uint64_t hybrid_helper_get_func_arg_cnt(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5)
{
    struct hybrid_probe_ctx *p = hybrid_current_probe;

    (void)r1; (void)r2; (void)r3; (void)r4; (void)r5;
    return p ? p->nargs : 0;
}

/* bpf_get_func_arg(ctx, n, *value) */
uint64_t hybrid_helper_get_func_arg(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5)
{
    static const uint64_t arg_regs[6] = {REG_OFF(di), REG_OFF(si), REG_OFF(dx),
                                         REG_OFF(cx), REG_OFF(r8), REG_OFF(r9)};
    struct hybrid_probe_ctx *p = hybrid_current_probe;
    uint32_t n = (uint32_t)r2;
    uint64_t value = 0;
    uint64_t err = 0;

    (void)r4; (void)r5;
    if (n > 5 || (p != NULL && p->nargs != 0 && n >= p->nargs))
        err = NEG(EINVAL);
    else if (!load_u64(&value, r1 + arg_regs[n]))
        err = NEG(EFAULT), value = 0;
    if (!store_u64(r3, value))
        return NEG(EFAULT);
    return err;
}

/* bpf_get_func_ret(ctx, *value) */
uint64_t hybrid_helper_get_func_ret(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5)
{
    struct hybrid_probe_ctx *p = hybrid_current_probe;
    uint64_t value;

    (void)r3; (void)r4; (void)r5;
    if (p == NULL || !(p->flags & HYBRID_PROBE_RETURN))
        return NEG(EOPNOTSUPP);
    if (!load_u64(&value, r1 + REG_OFF(ax)) || !store_u64(r2, value))
        return NEG(EFAULT);
    return 0;
}

/* bpf_override_return(regs, rc) */
uint64_t hybrid_helper_override_return(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5)
{
    struct hybrid_probe_ctx *p = hybrid_current_probe;

    (void)r3; (void)r4; (void)r5;
    if (p == NULL)
        return NEG(EINVAL);
    if (!store_u64(r1 + REG_OFF(ax), r2))
        return NEG(EFAULT);
    p->override_rc = r2;
    __atomic_store_n(&p->override, 1, __ATOMIC_RELEASE);
    return 0;
}

/* ========================================================================= */
/* Stacks                                                                    */
/* ========================================================================= */

#define BPF_F_SKIP_FIELD_MASK 0xffull
#define BPF_F_USER_STACK (1ull << 8)
#define BPF_F_USER_BUILD_ID (1ull << 11)

static uint32_t max_stack;    /* kernel.perf_event_max_stack, read once */

uint32_t hybrid_max_stack_depth(void)
{
    uint32_t v = __atomic_load_n(&max_stack, __ATOMIC_RELAXED);
    FILE *f;

    if (LIKELY(v))
        return v;
    f = fopen("/proc/sys/kernel/perf_event_max_stack", "re");
    if (f != NULL) {
        unsigned long x;

        if (fscanf(f, "%lu", &x) == 1 && x > 0 && x <= 65536)
            v = (uint32_t)x;
        fclose(f);
    }
    if (v == 0)
        v = 127;    /* PERF_MAX_STACK_DEPTH */
    __atomic_store_n(&max_stack, v, __ATOMIC_RELAXED);
    return v;
}

#define USER_LOWEST 0x10000ull            /* below the usual vm.mmap_min_addr: never a mapped frame */
#define USER_HIGHEST 0x7ffffffff000ull   /* top of the x86-64 user address space (4-level paging) */

/* The user stack of the pt_regs at `pt_regs`: regs->ip, then the return
 * address of each frame of the rbp chain (x86-64 frame pointers: [fp] =
 * caller's fp, [fp + 8] = return address), at most max + skip frames, all
 * read through the safe copy; a frame that cannot be read ends the walk.
 * The first `skip` are dropped, the rest stored at ips (safely).  Returns
 * the number stored, or -EFAULT if the regs cannot be read, ips cannot be
 * written, or the stack has fewer than `skip` frames. */
/* agent.c's, when the probe agent is linked in (not in standalone builds) */
extern uint64_t hybrid_agent_unwind_ret(uint64_t slot, uint64_t value) __attribute__((weak));

long hybrid_collect_user_stack(const void *pt_regs, uint64_t *ips, uint32_t max, uint32_t skip)
{
    uint64_t ip, fp, frame[2];
    uint64_t limit = (uint64_t)max + skip, nr = 0;
    uintptr_t regs = (uintptr_t)pt_regs;

    if (!load_u64(&ip, regs + REG_OFF(ip)) || !load_u64(&fp, regs + REG_OFF(bp)))
        return -EFAULT;
    while (nr < limit) {
        if (nr >= skip && !store_u64((uintptr_t)(ips + (nr - skip)), ip))
            return -EFAULT;
        nr++;
        /* The outermost frame's rbp is a small number (glibc's _start leaves 0..3, say): end the
         * walk there rather than pay a fault and its signal round trip (about 5 µs) to find out. */
        if (nr >= limit || fp < USER_LOWEST || fp > USER_HIGHEST || (fp & 7) ||
            raw_copy(frame, (const void *)(uintptr_t)fp, sizeof(frame)) < 0)
            break;
        ip = hybrid_agent_unwind_ret ? hybrid_agent_unwind_ret(fp + 8, frame[1]) : frame[1];
        fp = frame[0];
    }
    if (nr < skip)
        return -EFAULT;
    return (long)(nr - skip);
}

/* bpf_get_stack(ctx, buf, size, flags): bytes written (the rest of buf zeroed). */
uint64_t hybrid_helper_get_stack(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5)
{
    void *buf = (void *)(uintptr_t)r2;
    uint32_t size = (uint32_t)r3, skip = (uint32_t)(r4 & BPF_F_SKIP_FIELD_MASK);
    uint32_t num, depth;
    int err = EINVAL;
    long nr;

    (void)r5;
    if (r4 & ~(BPF_F_SKIP_FIELD_MASK | BPF_F_USER_STACK | BPF_F_USER_BUILD_ID))
        goto clear;
    if (!(r4 & BPF_F_USER_STACK)) {
        err = EFAULT;    /* a kernel stack: there is none */
        goto clear;
    }
    if ((r4 & BPF_F_USER_BUILD_ID) || size % 8)
        goto clear;
    num = size / 8;
    depth = hybrid_max_stack_depth();
    if ((uint64_t)num + skip < depth)
        depth = num + skip;
    if (depth < skip) {    /* the walk stops at `depth` frames: fewer than skipped */
        err = EFAULT;
        goto clear;
    }
    nr = hybrid_collect_user_stack((const void *)(uintptr_t)r1, (uint64_t *)buf, depth - skip, skip);
    if (nr < 0) {
        err = EFAULT;
        goto clear;
    }
    if ((uint64_t)nr * 8 < size && raw_memset((char *)buf + nr * 8, 0, size - nr * 8) < 0)
        return NEG(EFAULT);
    return (uint64_t)nr * 8;
clear:
    raw_memset(buf, 0, size);
    return NEG(err);
}

#define BPF_F_FAST_STACK_CMP (1ull << 9)
#define BPF_F_REUSE_STACKID (1ull << 10)
#define STACKID_MAX_DEPTH 512    /* frames collected on the stack for get_stackid */

/* bpf_get_stackid(ctx, map, flags): the id of the (user) stack in a
 * STACK_TRACE map.  The walk is get_stack's; hashing, comparing and storing
 * (BPF_F_FAST_STACK_CMP, BPF_F_REUSE_STACKID, -EEXIST) are the map's. */
uint64_t hybrid_helper_get_stackid(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5)
{
    struct hybrid_map *m = (struct hybrid_map *)(uintptr_t)r2;
    uint32_t skip = (uint32_t)(r3 & BPF_F_SKIP_FIELD_MASK), depth;
    struct hybrid_map_desc desc;
    uint64_t ips[STACKID_MAX_DEPTH], probe;
    long nr;

    (void)r4; (void)r5;
    if (r3 & ~(BPF_F_SKIP_FIELD_MASK | BPF_F_USER_STACK | BPF_F_FAST_STACK_CMP | BPF_F_REUSE_STACKID))
        return NEG(EINVAL);
    if (raw_copy(&probe, m, sizeof(probe)) < 0 || hybrid_map_describe(m, &desc) < 0)
        return NEG(EINVAL);    /* not a map (the guard reads its first bytes safely) */
    if (!(r3 & BPF_F_USER_STACK))
        return NEG(EFAULT);    /* a kernel stack: there is none */
    depth = desc.value_size / 8 + skip;
    if (depth > hybrid_max_stack_depth())
        depth = hybrid_max_stack_depth();
    if (depth > STACKID_MAX_DEPTH)
        depth = STACKID_MAX_DEPTH;
    if (depth <= skip)
        return NEG(EFAULT);    /* trace->nr <= skip */
    nr = hybrid_collect_user_stack((const void *)(uintptr_t)r1, ips, depth - skip, skip);
    if (nr <= 0)
        return NEG(EFAULT);    /* trace->nr <= skip */
    return (uint64_t)hybrid_stackmap_store(m, ips, (uint32_t)nr, r3);
}

/* ========================================================================= */
/* bpf_loop                                                                  */
/* ========================================================================= */

#define BPF_MAX_LOOPS (8u * 1024 * 1024)

typedef uint64_t (*bpf_callback_t)(uint64_t, uint64_t, uint64_t, uint64_t, uint64_t);

/* bpf_loop(nr_loops, callback_fn, callback_ctx, flags): calls
 * callback(i, ctx, 0, 0, 0) for i = 0.. until it returns non-zero; the
 * number of calls made. */
uint64_t hybrid_helper_loop(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5)
{
    bpf_callback_t callback = (bpf_callback_t)(uintptr_t)r2;
    uint32_t nr = (uint32_t)r1, i;

    (void)r5;
    if (r4)
        return NEG(EINVAL);
    if (nr > BPF_MAX_LOOPS)
        return NEG(E2BIG);
    if (nr && callback == NULL)
        return NEG(EINVAL);
    for (i = 0; i < nr; i++) {
        if (callback(i, r3, 0, 0, 0))
            return (uint64_t)i + 1;
    }
    return i;
}

/* ========================================================================= */

static void helpers_reset_in_child(void)
{
    trace_reset_in_child();
    pidns.state = 0;    /* a child of unshare(CLONE_NEWPID) lives in another namespace */
}

__attribute__((constructor)) static void helpers_init(void)
{
    pthread_atfork(NULL, NULL, helpers_reset_in_child);
}
