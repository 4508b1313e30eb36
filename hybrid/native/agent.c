/*
 * agent.c - the in-process probe agent of hybrid: uprobes, uretprobes, USDT
 * probes and syscall probes made by patching the running process's code.
 *
 * A spec (text, written by hybrid.user.attach.agent; format in the attach
 * contract) names patch windows ("sites": whole instructions, >= 5 bytes,
 * at a module's load bias + a file address, with their expected bytes and a
 * description of every instruction), programs (AOT .so symbols or addresses
 * of JIT code) and attachments of programs to sites or to syscalls.
 *
 * Sites.  For each site a trampoline is generated at run time into
 * executable memory within +-2 GB of the site (64 KB chunks mapped with
 * MAP_FIXED_NOREPLACE at hints near the site, shared by many trampolines):
 *     lea rsp,[rsp-128]               skip the red zone (the site may be mid-function)
 *     push ss, sp, flags, cs, ip, orig_ax, di .. r15     -> struct hybrid_pt_regs
 *     save xmm0-7, align the stack, call the dispatcher (absolute address)
 *     restore everything; then the displaced instructions, relocated:
 *       copy as is; rip-relative disp32 rewritten for the new place;
 *       jmp -> jmp [rip+0] + target; jcc -> inverted jcc over such a jmp;
 *       call -> push the return address + jmp absolute
 *     jmp back to site+LEN.
 *   With an override (bpf_override_return at a function entry) the
 *   trampoline restores the registers with rax = the value and returns to
 *   the caller instead.  Only xmm0-7 are saved: the upper halves of ymm/zmm
 *   and x87/MMX state are not (programs and helpers do not use them; a
 *   helper that called a libc function using AVX would clobber them).
 * The site is patched with a 5-byte `jmp rel32` to the trampoline (or just
 * an int3 for `mode int3` sites: the SIGTRAP handler sends the thread to
 * the trampoline).
 *
 * Safe patching.  Code bytes are written through /proc/self/mem (works on
 * r-x pages; mprotect fallback) and every step is followed by a core sync
 * (membarrier SYNC_CORE, or an mprotect round trip of a scratch page):
 *   a. 0xCC at byte 0.  The SIGTRAP handler maps a trap at a known site to
 *      its trampoline (forever: a stale trap may still arrive later).
 *   b. If the window holds more than one instruction, no thread may be
 *      stopped inside it: every other thread that is not blocked in a
 *      syscall outside the windows (read from /proc/self/task/TID/syscall)
 *      gets the quiesce signal (SIGRTMAX-1, or $HYBRID_QUIESCE_SIGNAL); its
 *      handler moves an interrupted rip that lies inside a window to the
 *      displaced copy of that instruction in the trampoline and
 *      acknowledges.  A thread that does not acknowledge within 200 ms is
 *      accepted only if it is blocked in a syscall outside the windows;
 *      otherwise the patch is undone and the error names the thread.
 *   c. bytes 1..4 (the rel32); d. 0xE9 at byte 0.
 * Unpatching is the reverse (0xCC, original bytes 1.., original byte 0).
 *
 * Run counts: a `stats PROGID ADDR INDEX` line makes program PROGID count
 * its runs, and its run time while that is enabled, in slot INDEX of the
 * stats area at ADDR in the object's region (stats.h), where any process
 * can read them; the per-thread hit counters below stay per attachment.
 *
 * Hits take no lock, no syscall (but the first hit of a thread, which
 * mmaps its page), no malloc: trampoline -> dispatcher -> the site's
 * immutable array of attachments (acquire load; replaced copy-on-write
 * under the global control mutex).  Each thread has a page (struct thr):
 * a sequence number that is odd while the thread runs probe programs (the
 * recursion guard: a site hit in a probe runs nothing and counts as missed),
 * and the uretprobe shadow stack (128 entries).  The pages are never freed,
 * only recycled when threads exit, so the grace period after a detach reads
 * them without signals: it waits until every thread seen inside a probe has
 * left it (RCU by observation); then arrays, and JIT code, may be freed.
 *
 * uretprobes: the entry dispatcher pushes {return address, rsp, site} on the
 * thread's shadow stack; the site's trampoline then drops the return address
 * and calls the function in its place (the call pushes the trampoline's
 * landing where the return address was: the function sees the same stack),
 * so its `ret` comes back to the landing, which jumps to the global return
 * trampoline.  That saves the registers (rax/rdx = return values), calls the
 * return dispatcher (pops the entry whose rsp matches, discarding deeper
 * stale ones left by longjmp), runs the return programs and returns to the
 * real address.  Calling rather than overwriting the return address keeps
 * the CPU's return-address predictor right for both returns.  (With an
 * override the return address is overwritten with the return trampoline.)
 *
 * Syscall sites: the trampoline of a `syssite` saves pt_regs (orig_ax = NR,
 * ax = -ENOSYS), calls the enter dispatcher, restores, runs the `syscall`
 * itself, saves again (ax = result), calls the exit dispatcher, restores,
 * and continues with the displaced following instructions.  Programs
 * attached to a syscall number get a tracepoint record or raw {regs, nr/ret}.
 *
 * Limits: stack switching (swapcontext, coroutines) confuses the shadow
 * stack of uretprobes; a thread that blocks SIGTRAP dies on a transient or
 * int3-mode trap; the quiesce signal interrupts running threads (syscalls
 * that ignore SA_RESTART, like poll or epoll_wait, may return EINTR);
 * after fork only the calling thread's state is meaningful in the child.
 */
#define _GNU_SOURCE
#include "agent.h"
#include "helpers.h"
#include "maps.h"
#include "runtime.h"
#include "stats.h"

#include <dirent.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <link.h>
#include <linux/futex.h>
#include <linux/membarrier.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <time.h>
#include <ucontext.h>
#include <unistd.h>

#if defined(__x86_64__)

#define LOAD_ACQ(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define STORE_REL(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)
#define UNLIKELY(x) __builtin_expect(!!(x), 0)
#define LIKELY(x) __builtin_expect(!!(x), 1)

#define MAX_INSN 16
#define SHADOW_DEPTH 128
#define SITE_HASH 16384
#define NR_SYSCALLS 512
#define SYS_ALL NR_SYSCALLS    /* index of the "every syscall" (raw, NR -1) list */
#define CHUNK_SIZE (64 * 1024)
#define TRAMP_MAX 1536
#define EVENT_ENOSYS 38

enum { K_COPY, K_RIP, K_JMP, K_JCC, K_CALL };
enum { F_RETURN = 1, F_FUNC_ENTRY = 2 };
enum { A_UPROBE, A_SYSCALL };

struct insn {
    uint8_t off, len, kind, field;
    uint64_t target;        /* absolute (load bias applied) */
    uint8_t bytes[16];
    uint64_t moved;         /* address of the displaced copy in the trampoline */
};

struct att;

struct att_array {
    uint32_t n;
    struct att *a[];
};

struct site {
    uint64_t addr;
    uint32_t len;
    int ninsn;
    int int3;               /* mode int3: only byte 0 is patched */
    int sys;                /* a syscall site */
    int sysk;               /* index of its syscall instruction in insn[] */
    int patched;
    uint8_t orig[16];
    struct insn insn[MAX_INSN];
    uint64_t entry;         /* trampoline entry */
    uint64_t landing;       /* where the function returns to when called from the trampoline (uretprobes) */
    struct att_array *pub;  /* published attachments (hit path) */
    char *where;            /* "MODULE+0xVADDR" */
    /* during an apply, under the control mutex */
    int touched;
    struct att **pend;
    uint32_t npend, cappend;
    struct att_array *old;
    int patched_now;
    int txline;             /* the spec line that attached to it first, for errors */
    const char *txcmd;
    struct site *next;      /* every site */
};

struct att {
    uint32_t id, prog, flags, kind;
    uint64_t cookie;
    void *entry;
    struct site *site;      /* A_UPROBE */
    int enter;              /* A_SYSCALL: 1 enter, 0 exit */
    int nr;                 /* A_SYSCALL: 0..511 or -1 */
    uint32_t event;
    int raw;
    uint16_t *sema;
    char *where;
    uint64_t hits, missed;  /* hits: folded from the threads' counters once the slot is released */
    int slot;               /* index into every thread's hits[], -1: counted in `hits` atomically */
    int live;
    struct hybrid_stats *stats;    /* the program's run counts in the shared region (stats.h), or NULL */
    uint32_t stats_index;
};

struct shadow {
    uint64_t ret, sp;
    struct site *site;
};

/* Two pages per thread, never freed (recycled after the thread exits).
 * hits[]: the thread's own, exact, count of each attachment slot: a hit
 * increments thread-private memory, no locked instruction. */
#define HIT_SLOTS 256
#define THR_SIZE 8192
struct thr {
    uint64_t seq;           /* odd while running probe programs */
    uint32_t owner;         /* tid, 0 = free */
    uint32_t tid;
    uint32_t depth;
    uint32_t pad;
    struct thr *next;
    struct shadow stack[SHADOW_DEPTH];
    uint64_t hits[HIT_SLOTS];
};
_Static_assert(sizeof(struct thr) <= THR_SIZE, "two pages per thread");

/* ------------------------------------------------------------------------- */
/* Global state                                                              */
/* ------------------------------------------------------------------------- */

static pthread_mutex_t ctl_lock = PTHREAD_MUTEX_INITIALIZER;
static int agent_ready;
static int mem_fd = -1;
static int membarrier_ok;
static int membarrier_fence;    /* MEMBARRIER_CMD_PRIVATE_EXPEDITED registered: hits need no locked instruction */
static struct att *slot_owner[HIT_SLOTS];
static void *scratch_page;
static int quiesce_sig;
static uint64_t ret_tramp;
static pthread_key_t thr_key;
static int thr_key_ok;

static struct site *site_hash[SITE_HASH];
static struct site *all_sites;

static struct att_array *sys_pub[2][NR_SYSCALLS + 1];   /* [enter][nr] */

static struct att **atts;    /* every attachment ever, by index */
static uint32_t natts, capatts;

struct prog_ent {
    uint32_t id;
    void *entry;
    struct hybrid_stats *stats;
    uint32_t stats_index;
};
static struct prog_ent *progs;
static uint32_t nprogs, capprogs;

static struct thr *all_thr;
static __thread struct thr *self __attribute__((tls_model("initial-exec")));

static int last_quiescent = 1;
static int pending_grace;    /* a detach happened: programs may still run until a grace period ends */

/* Retired attachment arrays, freed after a grace period. */
static void **retired;
static uint32_t nretired, capretired;

static int grow(void **arr, uint32_t *cap, uint32_t need, size_t elem)
{
    void *p;
    uint32_t n;

    if (need <= *cap)
        return 0;
    n = *cap ? *cap * 2 : 16;
    while (n < need)
        n *= 2;
    p = realloc(*arr, (size_t)n * elem);
    if (!p)
        return -ENOMEM;
    *arr = p;
    *cap = n;
    return 0;
}

/* ------------------------------------------------------------------------- */
/* Per-thread state                                                          */
/* ------------------------------------------------------------------------- */

static void thr_release(void *p)
{
    struct thr *t = p;

    if (self == t)
        self = NULL;
    t->depth = 0;
    STORE_REL(&t->owner, 0);
}

static struct thr *thr_get(void)
{
    struct thr *t = self, *head;
    uint32_t tid, zero;

    if (t)
        return t;
    tid = (uint32_t)hybrid_raw_syscall(SYS_gettid, 0, 0, 0, 0, 0, 0);
    for (t = LOAD_ACQ(&all_thr); t; t = t->next) {
        zero = 0;
        if (LOAD_ACQ(&t->owner) == 0 &&
            __atomic_compare_exchange_n(&t->owner, &zero, tid, 0, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED))
            goto got;
    }
    {
        long p = hybrid_raw_syscall(SYS_mmap, 0, THR_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

        if (p < 0 && p > -4096)
            return NULL;
        t = (struct thr *)(uintptr_t)p;
    }
    t->owner = tid;
    head = LOAD_ACQ(&all_thr);
    do {
        t->next = head;
    } while (!__atomic_compare_exchange_n(&all_thr, &head, t, 1, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE));
got:
    t->tid = tid;
    t->depth = 0;
    self = t;
    if (thr_key_ok)
        pthread_setspecific(thr_key, t);
    return t;
}

/* The seq store must be ordered before the loads of the attachment arrays
 * that follow (a Dekker pair with grace()).  With membarrier, grace() runs a
 * full barrier on every running thread instead, so the hit path needs only a
 * compiler barrier; without it, a locked add. */
static inline int probe_begin(struct thr *t)
{
    if (t->seq & 1)
        return 0;
    if (LIKELY(membarrier_fence)) {
        __atomic_store_n(&t->seq, t->seq + 1, __ATOMIC_RELAXED);
        __atomic_signal_fence(__ATOMIC_SEQ_CST);
    } else {
        __atomic_fetch_add(&t->seq, 1, __ATOMIC_SEQ_CST);
    }
    return 1;
}

static inline void probe_end(struct thr *t)
{
    __atomic_store_n(&t->seq, t->seq + 1, __ATOMIC_RELEASE);
}

/* ------------------------------------------------------------------------- */
/* Dispatchers (hit path)                                                    */
/* ------------------------------------------------------------------------- */

static void miss_all(struct att_array *a, uint32_t mask, uint32_t want)
{
    uint32_t i;

    if (!a)
        return;
    for (i = 0; i < a->n; i++)
        if ((a->a[i]->flags & mask) == want)
            __atomic_fetch_add(&a->a[i]->missed, 1, __ATOMIC_RELAXED);
}

static inline uint64_t run_prog(struct thr *t, struct att *at, void *ctx, uint64_t func_ip, uint32_t flags,
                                struct hybrid_probe_ctx *pc)
{
    struct hybrid_probe_ctx *prev;
    uint64_t r, t0;

    pc->func_ip = func_ip;
    pc->cookie = at->cookie;
    pc->flags = flags;
    pc->nargs = 0;
    pc->override = 0;
    pc->pad = 0;
    pc->override_rc = 0;
    prev = hybrid_current_probe;    /* hybrid_probe_enter(), inline: a TLS store, no call */
    hybrid_current_probe = pc;
    t0 = hybrid_stats_begin(at->stats);    /* a branch, unless run time is measured */
    r = ((uint64_t(*)(void *))at->entry)(ctx);
    hybrid_bridge_flush_fast();    /* writes through lookups of kernel-backed maps (maps.c); a branch if none */
    hybrid_stats_end(at->stats, at->stats_index, t0);
    hybrid_current_probe = prev;
    if (LIKELY(at->slot >= 0))
        t->hits[at->slot]++;    /* exact, thread-private */
    else
        __atomic_fetch_add(&at->hits, 1, __ATOMIC_RELAXED);
    return r;
}

/* A return address that leads to the return trampoline: the site's landing
 * (the function was called from its trampoline) or the return trampoline. */
static inline int returns_to_agent(const struct site *s, uint64_t ret)
{
    return ret == ret_tramp || (s && s->landing && ret == s->landing);
}

/* Entry of a site: 1 = return now with regs->ax (override), 0 = go on,
 * 2 = go on, calling the function (a return probe wants its return). */
__attribute__((used)) static int agent_hit(struct hybrid_pt_regs *regs, struct site *s)
{
    struct thr *t = self;
    struct att_array *a;
    struct hybrid_probe_ctx pc;
    int override = 0, want_ret = 0, call = 0;
    uint32_t i;

    if (UNLIKELY(!t)) {
        t = thr_get();
        if (!t) {
            miss_all(LOAD_ACQ(&s->pub), 0, 0);
            return 0;
        }
    }
    if (!probe_begin(t)) {
        miss_all(LOAD_ACQ(&s->pub), 0, 0);
        return 0;
    }
    a = LOAD_ACQ(&s->pub);
    if (a) {
        for (i = 0; i < a->n; i++) {
            struct att *at = a->a[i];

            if (at->flags & F_RETURN) {
                want_ret = 1;
                continue;
            }
            run_prog(t, at, regs, s->addr, 0, &pc);
            if (__atomic_load_n(&pc.override, __ATOMIC_ACQUIRE) && (at->flags & F_FUNC_ENTRY)) {
                override = 1;
                regs->ax = pc.override_rc;
            }
        }
        if (want_ret) {
            /* frames at or below this sp are gone (longjmp): drop their entries.  Not a tail call
             * from another return-probed function: same sp, and its return address is already
             * the return trampoline; both entries stay and both run at the return, as in the kernel. */
            while (t->depth > 0 && (t->stack[t->depth - 1].sp < regs->sp ||
                                    (t->stack[t->depth - 1].sp == regs->sp &&
                                     !returns_to_agent(t->stack[t->depth - 1].site,
                                                       *(uint64_t *)(uintptr_t)regs->sp))))
                t->depth--;
            if (t->depth < SHADOW_DEPTH) {
                uint64_t *slot = (uint64_t *)(uintptr_t)regs->sp;
                struct shadow *e = &t->stack[t->depth];

                e->ret = *slot;
                e->sp = regs->sp;
                e->site = s;
                __atomic_signal_fence(__ATOMIC_SEQ_CST);
                t->depth++;
                __atomic_signal_fence(__ATOMIC_SEQ_CST);
                if (override || !s->landing)
                    *slot = ret_tramp;
                else
                    call = 1;    /* the trampoline calls the function: its return lands on s->landing */
            } else {
                miss_all(a, F_RETURN, F_RETURN);
            }
        }
    }
    probe_end(t);
    return override ? 1 : call ? 2 : 0;
}

static void agent_fatal(const char *msg)
{
    ssize_t r = write(2, msg, strlen(msg));

    (void)r;
    abort();
}

/* The return trampoline: slot = where the real return address goes. */
__attribute__((used)) static int agent_ret(struct hybrid_pt_regs *regs, void *unused)
{
    uint64_t *slot = (uint64_t *)(regs + 1);
    struct thr *t = self;
    struct shadow e;
    struct att_array *a;
    struct hybrid_probe_ctx pc;
    uint64_t sp = regs->sp;    /* rsp after the ret: the entry's sp + 8 */
    uint32_t i;

    (void)unused;
    if (!t)
        agent_fatal("hybrid agent: return trampoline reached without a shadow stack\n");
    for (;;) {
        if (t->depth == 0)
            agent_fatal("hybrid agent: return trampoline: no matching shadow stack entry\n");
        e = t->stack[t->depth - 1];
        if (e.sp + 8 == sp)
            break;
        if (e.sp + 8 > sp)
            agent_fatal("hybrid agent: return trampoline: shadow stack does not match the stack\n");
        t->depth--;    /* stale: a frame left by longjmp */
    }
    *slot = e.ret;
    regs->ip = e.ret;
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
    t->depth--;
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
    if (!probe_begin(t)) {
        miss_all(LOAD_ACQ(&e.site->pub), F_RETURN, F_RETURN);
        return 0;
    }
    a = LOAD_ACQ(&e.site->pub);
    if (a)
        for (i = 0; i < a->n; i++)
            if (a->a[i]->flags & F_RETURN)
                run_prog(t, a->a[i], regs, e.site->addr, HYBRID_PROBE_RETURN, &pc);
    probe_end(t);
    return 0;
}

/* Tracepoint records of raw_syscalls-like sys_enter_* / sys_exit_* events. */
struct tp_enter {
    uint16_t common_type;
    uint8_t common_flags, common_preempt_count;
    int32_t common_pid;
    int32_t nr;
    uint32_t pad;
    uint64_t args[6];
};

struct tp_exit {
    uint16_t common_type;
    uint8_t common_flags, common_preempt_count;
    int32_t common_pid;
    int32_t nr;
    uint32_t pad;
    int64_t ret;
};

static void sys_run(struct att_array *a, struct hybrid_pt_regs *regs, int enter, uint64_t nr, struct thr *t,
                    uint64_t site)
{
    struct hybrid_probe_ctx pc;
    uint32_t i;

    if (!a)
        return;
    for (i = 0; i < a->n; i++) {
        struct att *at = a->a[i];

        if (at->raw) {
            uint64_t raw[2] = {(uint64_t)(uintptr_t)regs, enter ? nr : regs->ax};

            run_prog(t, at, raw, site, enter ? 0 : HYBRID_PROBE_RETURN, &pc);
        } else if (enter) {
            struct tp_enter rec = {(uint16_t)at->event, 0, 0, (int32_t)t->tid, (int32_t)nr, 0,
                                   {regs->di, regs->si, regs->dx, regs->r10, regs->r8, regs->r9}};

            run_prog(t, at, &rec, site, 0, &pc);
        } else {
            struct tp_exit rec = {(uint16_t)at->event, 0, 0, (int32_t)t->tid, (int32_t)nr, 0,
                                  (int64_t)regs->ax};

            run_prog(t, at, &rec, site, HYBRID_PROBE_RETURN, &pc);
        }
    }
}

static void sys_dispatch(struct hybrid_pt_regs *regs, struct site *s, int enter)
{
    struct thr *t = self;
    uint64_t nr = regs->orig_ax;
    struct att_array *a = NULL, *all;

    all = LOAD_ACQ(&sys_pub[enter][SYS_ALL]);
    if (nr < NR_SYSCALLS)
        a = LOAD_ACQ(&sys_pub[enter][nr]);
    if (!a && !all)
        return;
    if (UNLIKELY(!t)) {
        t = thr_get();
        if (!t) {
            miss_all(a, 0, 0);
            miss_all(all, 0, 0);
            return;
        }
    }
    if (!probe_begin(t)) {
        miss_all(a, 0, 0);
        miss_all(all, 0, 0);
        return;
    }
    all = LOAD_ACQ(&sys_pub[enter][SYS_ALL]);
    if (nr < NR_SYSCALLS)
        a = LOAD_ACQ(&sys_pub[enter][nr]);
    sys_run(a, regs, enter, nr, t, s->addr);
    sys_run(all, regs, enter, nr, t, s->addr);
    probe_end(t);
}

__attribute__((used)) static int agent_sys_enter(struct hybrid_pt_regs *regs, struct site *s)
{
    sys_dispatch(regs, s, 1);
    return 0;
}

__attribute__((used)) static int agent_sys_exit(struct hybrid_pt_regs *regs, struct site *s)
{
    sys_dispatch(regs, s, 0);
    return 0;
}

/* ------------------------------------------------------------------------- */
/* Site table (read by signal handlers: lock-free, insert-only)              */
/* ------------------------------------------------------------------------- */

static inline uint32_t site_slot(uint64_t addr)
{
    return (uint32_t)((addr * 0x9e3779b97f4a7c15ull) >> 50) & (SITE_HASH - 1);
}

static struct site *site_lookup(uint64_t addr)
{
    uint32_t i = site_slot(addr), n;
    struct site *s;

    for (n = 0; n < SITE_HASH; n++, i = (i + 1) & (SITE_HASH - 1)) {
        s = LOAD_ACQ(&site_hash[i]);
        if (!s)
            return NULL;
        if (s->addr == addr)
            return s;
    }
    return NULL;
}

static int site_insert(struct site *s)
{
    uint32_t i = site_slot(s->addr), n;

    for (n = 0; n < SITE_HASH; n++, i = (i + 1) & (SITE_HASH - 1))
        if (!site_hash[i]) {
            STORE_REL(&site_hash[i], s);
            s->next = all_sites;
            all_sites = s;
            return 0;
        }
    return -ENOSPC;
}

/* ------------------------------------------------------------------------- */
/* Signal handlers                                                           */
/* ------------------------------------------------------------------------- */

static struct sigaction prev_trap, prev_quiesce;

static void chain(struct sigaction *prev, int sig, siginfo_t *si, void *uc)
{
    struct sigaction dfl;

    if (prev->sa_flags & SA_SIGINFO) {
        if (prev->sa_sigaction) {
            prev->sa_sigaction(sig, si, uc);
            return;
        }
    } else if (prev->sa_handler != SIG_DFL && prev->sa_handler != SIG_IGN) {
        prev->sa_handler(sig);
        return;
    }
    if (!(prev->sa_flags & SA_SIGINFO) && prev->sa_handler == SIG_IGN)
        return;
    memset(&dfl, 0, sizeof(dfl));
    dfl.sa_handler = SIG_DFL;
    sigemptyset(&dfl.sa_mask);
    sigaction(sig, &dfl, NULL);
    raise(sig);
}

static void trap_handler(int sig, siginfo_t *si, void *uctx)
{
    ucontext_t *uc = uctx;

    if (si && si->si_code > 0 && uc) {
        struct site *s = site_lookup((uint64_t)uc->uc_mcontext.gregs[REG_RIP] - 1);

        if (s && s->entry) {
            uc->uc_mcontext.gregs[REG_RIP] = (greg_t)s->entry;
            return;
        }
    }
    chain(&prev_trap, sig, si, uctx);
}

/* A quiesce request: the windows being patched and the threads asked. */
struct qreq {
    uint64_t gen;
    pid_t pid;
    int nsites;
    struct site **sites;
    int nthreads;
    int *tids;
    uint64_t *acks;
    int bad_tid;
    uint32_t remaining;    /* signalled threads yet to answer (futex word) */
};

#define QMAGIC 0x48594251u    /* "HYBQ" */

static struct qreq *volatile qcur;

/* Where a thread stopped at `ip` must go: the displaced copy of the
 * instruction of a window it is inside of, or ip itself. */
static uint64_t move_out(struct site *const *sites, int n, uint64_t ip, int *bad)
{
    int i, k;

    for (i = 0; i < n; i++) {
        struct site *s = sites[i];

        if (ip > s->addr && ip < s->addr + s->len) {
            for (k = 1; k < s->ninsn; k++)
                if (s->addr + s->insn[k].off == ip)
                    return s->insn[k].moved;
            *bad = 1;
            return ip;
        }
    }
    return ip;
}

static void quiesce_handler(int sig, siginfo_t *si, void *uctx)
{
    ucontext_t *uc = uctx;
    struct qreq *q = qcur;
    int saved = errno, bad = 0, i, tid;
    uint64_t v;

    if (!si || si->si_code != SI_QUEUE || (uint32_t)((uint64_t)(uintptr_t)si->si_value.sival_ptr >> 32) != QMAGIC) {
        chain(&prev_quiesce, sig, si, uctx);
        return;
    }
    v = (uint32_t)(uintptr_t)si->si_value.sival_ptr;
    if (!q || (uint32_t)q->gen != v || si->si_pid != q->pid)
        goto out;    /* a late answer to an earlier request */
    if (uc)
        uc->uc_mcontext.gregs[REG_RIP] =
            (greg_t)move_out(q->sites, q->nsites, (uint64_t)uc->uc_mcontext.gregs[REG_RIP], &bad);
    tid = (int)syscall(SYS_gettid);
    if (bad)
        q->bad_tid = tid;
    /* The acknowledgement is the last access to q: the controller may free it right after. */
    for (i = 0; i < q->nthreads; i++)
        if (q->tids[i] == tid) {
            uint32_t *word = &q->remaining;

            if (__atomic_exchange_n(&q->acks[i], q->gen, __ATOMIC_ACQ_REL) != q->gen &&
                __atomic_sub_fetch(word, 1, __ATOMIC_ACQ_REL) == 0)
                syscall(SYS_futex, word, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);    /* no read of *word */
            break;
        }
out:
    errno = saved;
}

/* SIGTRAP: SA_NODEFER (a trap in code a handler runs must not find SIGTRAP blocked: the kernel would
 * kill).  The quiesce signal: not SA_NODEFER, so a request never nests in the handler of the previous
 * one (a nested handler would see the handler's context instead of the interrupted code's). */
static int install_handler(int sig, void (*fn)(int, siginfo_t *, void *), struct sigaction *prev)
{
    struct sigaction cur, act;

    if (sigaction(sig, NULL, &cur) != 0)
        return -errno;
    if ((cur.sa_flags & SA_SIGINFO) && cur.sa_sigaction == fn)
        return 0;
    memset(&act, 0, sizeof(act));
    act.sa_sigaction = fn;
    act.sa_flags = SA_SIGINFO | SA_RESTART | SA_ONSTACK | (sig == SIGTRAP ? SA_NODEFER : 0);
    sigemptyset(&act.sa_mask);
    *prev = cur;
    if (sigaction(sig, &act, NULL) != 0)
        return -errno;
    return 0;
}

/* ------------------------------------------------------------------------- */
/* Code memory                                                               */
/* ------------------------------------------------------------------------- */

static void sync_cores(void)
{
    if (membarrier_ok && syscall(SYS_membarrier, MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE, 0, 0) == 0)
        return;
    /* An mprotect round trip sends TLB-shootdown IPIs to every CPU running
     * this mm: an interrupt + iret serializes the core. */
    *(volatile char *)scratch_page = 1;
    mprotect(scratch_page, 4096, PROT_READ);
    mprotect(scratch_page, 4096, PROT_READ | PROT_WRITE);
    *(volatile char *)scratch_page = 2;
}

static int code_write(uint64_t addr, const void *buf, size_t n)
{
    uint64_t page, end;

    if (mem_fd >= 0 && pwrite(mem_fd, buf, n, (off_t)addr) == (ssize_t)n)
        return 0;
    page = addr & ~4095ull;
    end = (addr + n + 4095) & ~4095ull;
    if (mprotect((void *)(uintptr_t)page, end - page, PROT_READ | PROT_WRITE | PROT_EXEC) != 0)
        return -errno;
    memcpy((void *)(uintptr_t)addr, buf, n);
    mprotect((void *)(uintptr_t)page, end - page, PROT_READ | PROT_EXEC);
    return 0;
}

struct chunk {
    uint64_t base, used;
    struct chunk *next;
};
static struct chunk *chunks, *last_chunk;
static uint64_t last_at;

static int near(uint64_t a, uint64_t b, uint64_t size)
{
    /* every byte of [a, a+size) within rel32 reach of b (with margin) */
    const uint64_t lim = 0x7fff0000ull;

    if (a + size > b)
        return a + size - b < lim;
    return b - a < lim;
}

static uint64_t chunk_new(uint64_t site)
{
    static const uint64_t steps[] = {1ull << 20, 16ull << 20, 128ull << 20, 512ull << 20, 1024ull << 20,
                                     1536ull << 20};
    uint64_t hint, base = site & ~(uint64_t)(CHUNK_SIZE - 1);
    unsigned i, j;
    void *p;

    for (i = 0; i < sizeof(steps) / sizeof(steps[0]); i++) {
        for (j = 0; j < 64; j++) {
            uint64_t d = steps[i] + (uint64_t)j * CHUNK_SIZE * 17;
            int dir;

            for (dir = 0; dir < 2; dir++) {
                if (dir == 0 && base < d + (1ull << 16))
                    continue;
                hint = dir == 0 ? base - d : base + d;
                if (hint >= 0x7ffffffff000ull)
                    continue;
                p = mmap((void *)(uintptr_t)hint, CHUNK_SIZE, PROT_READ | PROT_EXEC,
                         MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
                if (p == MAP_FAILED)
                    continue;
                if ((uint64_t)(uintptr_t)p != hint || !near(hint, site, CHUNK_SIZE)) {
                    munmap(p, CHUNK_SIZE);
                    continue;
                }
                return hint;
            }
        }
    }
    return 0;
}

/* Room for `size` bytes of code within rel32 reach of `site` (0: none). */
static uint64_t code_alloc(uint64_t site, uint64_t size)
{
    struct chunk *c;
    uint64_t base, at;

    size = (size + 15) & ~15ull;
    for (c = chunks; c; c = c->next)
        if (c->used + size <= CHUNK_SIZE && (site == 0 || near(c->base, site, CHUNK_SIZE)))
            goto found;
    base = chunk_new(site ? site : (uint64_t)(uintptr_t)&chunk_new);
    if (!base)
        return 0;
    c = calloc(1, sizeof(*c));
    if (!c) {
        munmap((void *)(uintptr_t)base, CHUNK_SIZE);
        return 0;
    }
    c->base = base;
    c->next = chunks;
    chunks = c;
found:
    at = c->base + c->used;
    c->used += size;
    last_chunk = c;
    last_at = at;
    return at;
}

/* Give back the unused end of the last allocation. */
static void code_trim(uint64_t at, uint64_t size)
{
    if (last_chunk && last_at == at)
        last_chunk->used = at - last_chunk->base + ((size + 15) & ~15ull);
}

/* ------------------------------------------------------------------------- */
/* Code generation                                                           */
/* ------------------------------------------------------------------------- */

struct cbuf {
    uint8_t b[TRAMP_MAX];
    int n;
    int overflow;
    uint64_t at;    /* address of b[0] once written */
};

static void e8(struct cbuf *c, uint8_t v)
{
    if (c->n < TRAMP_MAX)
        c->b[c->n++] = v;
    else
        c->overflow = 1;
}

static void eb(struct cbuf *c, const char *s, int n)
{
    while (n--)
        e8(c, (uint8_t)*s++);
}

static void e32(struct cbuf *c, uint32_t v)
{
    int i;

    for (i = 0; i < 4; i++)
        e8(c, (uint8_t)(v >> (8 * i)));
}

static void e64(struct cbuf *c, uint64_t v)
{
    int i;

    for (i = 0; i < 8; i++)
        e8(c, (uint8_t)(v >> (8 * i)));
}

/* GPR numbers */
enum { RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI, R8, R9, R10, R11, R12, R13, R14, R15 };

/* pt_regs slots (index * 8) */
enum { P_R15, P_R14, P_R13, P_R12, P_BP, P_BX, P_R11, P_R10, P_R9, P_R8, P_AX, P_CX, P_DX, P_SI, P_DI,
       P_ORIG_AX, P_IP, P_CS, P_FLAGS, P_SP, P_SS, P_NSLOTS };
#define FRAME ((int)(P_NSLOTS * 8))

static const int slot_reg[15] = {R15, R14, R13, R12, RBP, RBX, R11, R10, R9, R8, RAX, RCX, RDX, RSI, RDI};

static void push_reg(struct cbuf *c, int r)
{
    if (r >= 8)
        e8(c, 0x41);
    e8(c, (uint8_t)(0x50 + (r & 7)));
}

static void lea_rsp(struct cbuf *c, int32_t d)    /* lea rsp,[rsp+d] (flags untouched) */
{
    eb(c, "\x48\x8d\xa4\x24", 4);
    e32(c, (uint32_t)d);
}

static void mov_to_rsp(struct cbuf *c, int r, int32_t d)    /* mov [rsp+d], r */
{
    e8(c, (uint8_t)(0x48 | (r >= 8 ? 4 : 0)));
    e8(c, 0x89);
    e8(c, (uint8_t)(0x84 | ((r & 7) << 3)));
    e8(c, 0x24);
    e32(c, (uint32_t)d);
}

static void mov_from_rsp(struct cbuf *c, int r, int32_t d)    /* mov r, [rsp+d] */
{
    e8(c, (uint8_t)(0x48 | (r >= 8 ? 4 : 0)));
    e8(c, 0x8b);
    e8(c, (uint8_t)(0x84 | ((r & 7) << 3)));
    e8(c, 0x24);
    e32(c, (uint32_t)d);
}

static void movabs(struct cbuf *c, int r, uint64_t v)
{
    e8(c, (uint8_t)(0x48 | (r >= 8 ? 1 : 0)));
    e8(c, (uint8_t)(0xb8 + (r & 7)));
    e64(c, v);
}

static void jmp_abs(struct cbuf *c, uint64_t target)    /* jmp [rip+0]; .quad target */
{
    eb(c, "\xff\x25\x00\x00\x00\x00", 6);
    e64(c, target);
}

/* Build the pt_regs frame.  `above`: bytes between the frame and the
 * original rsp (128 red zone, 8 for the return slot); orig: -1 or rax. */
static void emit_save(struct cbuf *c, int above, int orig_is_rax, uint64_t ip)
{
    int i;

    if (above == 128)
        eb(c, "\x48\x8d\x64\x24\x80", 5);    /* lea rsp,[rsp-128] */
    eb(c, "\x6a\x2b", 2);                    /* ss */
    push_reg(c, RAX);                        /* sp, filled below */
    e8(c, 0x9c);                             /* pushfq */
    eb(c, "\x6a\x33", 2);                    /* cs */
    push_reg(c, RAX);                        /* ip, filled below */
    if (orig_is_rax)
        push_reg(c, RAX);
    else
        eb(c, "\x6a\xff", 2);                /* orig_ax = -1 */
    for (i = 14; i >= 0; i--)
        push_reg(c, slot_reg[i]);
    eb(c, "\x48\x8d\x84\x24", 4);            /* lea rax,[rsp+FRAME+above] */
    e32(c, (uint32_t)(FRAME + above));
    mov_to_rsp(c, RAX, P_SP * 8);
    movabs(c, RAX, ip);
    mov_to_rsp(c, RAX, P_IP * 8);
}

/* Call fn(&frame, arg) with xmm0-7 preserved (not the upper ymm/zmm halves). */
static void emit_call(struct cbuf *c, void *fn, uint64_t arg)
{
    int i;

    eb(c, "\x48\x8d\x64\x24\x80", 5);        /* lea rsp,[rsp-128] */
    for (i = 0; i < 8; i++) {                /* movdqu [rsp+16i], xmmi */
        eb(c, "\xf3\x0f\x7f", 3);
        e8(c, (uint8_t)(0x84 | (i << 3)));
        e8(c, 0x24);
        e32(c, (uint32_t)(16 * i));
    }
    eb(c, "\x48\x89\xe3", 3);                /* mov rbx,rsp */
    eb(c, "\x48\x83\xe4\xf0", 4);            /* and rsp,-16 */
    eb(c, "\x48\x8d\xbb", 3);                /* lea rdi,[rbx+128] */
    e32(c, 128);
    movabs(c, RSI, arg);
    movabs(c, RAX, (uint64_t)(uintptr_t)fn);
    e8(c, 0xfc);                             /* cld */
    eb(c, "\xff\xd0", 2);                    /* call rax */
    eb(c, "\x48\x89\xdc", 3);                /* mov rsp,rbx */
    for (i = 0; i < 8; i++) {                /* movdqu xmmi, [rsp+16i] */
        eb(c, "\xf3\x0f\x6f", 3);
        e8(c, (uint8_t)(0x84 | (i << 3)));
        e8(c, 0x24);
        e32(c, (uint32_t)(16 * i));
    }
    lea_rsp(c, 128);
}

/* Registers and flags back from the frame at rsp (rsp stays at the frame). */
static void emit_restore(struct cbuf *c)
{
    int i;

    /* The flags without popfq (microcoded, about 20 cycles): DF, then OF
     * through an add that overflows exactly when it was set, then SF ZF AF
     * PF CF with sahf; rax is scratch (restored below).  TF and AC are not
     * restored: nothing on the hit path changes them. */
    eb(c, "\xf6\x84\x24", 3);                /* test byte [rsp+flags+1], 4 (DF) */
    e32(c, P_FLAGS * 8 + 1);
    e8(c, 0x04);
    eb(c, "\x74\x01\xfd", 3);                /* jz +1; std */
    eb(c, "\x0f\xb6\x84\x24", 4);            /* movzx eax, byte [rsp+flags+1] */
    e32(c, P_FLAGS * 8 + 1);
    eb(c, "\x24\x08\xc0\xe0\x04\x04\x80", 7);  /* and al,8 (OF); shl al,4; add al,0x80 */
    eb(c, "\x8a\xa4\x24", 3);                /* mov ah, byte [rsp+flags] */
    e32(c, P_FLAGS * 8);
    e8(c, 0x9e);                             /* sahf */
    for (i = 0; i < 15; i++)
        mov_from_rsp(c, slot_reg[i], i * 8);
}

/* The displaced instructions first..ninsn-1 of s, as if at their place. */
static int emit_displaced(struct cbuf *c, struct site *s, int first, int end, char *err, size_t errlen)
{
    int k;

    for (k = first; k < end; k++) {
        struct insn *in = &s->insn[k];
        uint64_t here = c->at + (uint64_t)c->n;
        uint64_t target = in->target;

        in->moved = here;
        /* a branch to an instruction of the window goes to its copy (fixed up below) */
        switch (in->kind) {
        case K_COPY:
            eb(c, (const char *)in->bytes, in->len);
            break;
        case K_RIP: {
            int64_t d = (int64_t)(target - (here + in->len));
            uint8_t b[16];

            if (d != (int32_t)d) {
                snprintf(err, errlen, "the rip-relative instruction at +%u cannot reach 0x%llx from the trampoline",
                         in->off, (unsigned long long)target);
                return -ERANGE;
            }
            memcpy(b, in->bytes, in->len);
            b[in->field] = (uint8_t)d;
            b[in->field + 1] = (uint8_t)(d >> 8);
            b[in->field + 2] = (uint8_t)(d >> 16);
            b[in->field + 3] = (uint8_t)(d >> 24);
            eb(c, (const char *)b, in->len);
            break;
        }
        case K_JMP:
            jmp_abs(c, target);
            break;
        case K_JCC:
            e8(c, (uint8_t)(0x70 + (in->field ^ 1)));
            e8(c, 14);
            jmp_abs(c, target);
            break;
        case K_CALL: {
            uint64_t ret = k + 1 == s->ninsn ? s->addr + s->len : 0;
            int fix = 0;

            lea_rsp(c, -8);
            push_reg(c, RAX);
            movabs(c, RAX, ret);
            if (!ret)
                fix = c->n - 8;    /* the next displaced instruction: known after it */
            eb(c, "\x48\x89\x44\x24\x08", 5);    /* mov [rsp+8],rax */
            e8(c, 0x58);                           /* pop rax */
            jmp_abs(c, target);
            if (fix) {
                uint64_t nxt = c->at + (uint64_t)c->n;
                memcpy(&c->b[fix], &nxt, 8);
            }
            break;
        }
        }
    }
    return 0;
}

/* Jumps to the window's own instructions go to their displaced copies. */
static void fix_inner_branches(struct cbuf *c, struct site *s)
{
    int k, j;

    for (k = 0; k < s->ninsn; k++) {
        struct insn *in = &s->insn[k];
        uint64_t off;
        int tpos;

        if (in->kind != K_JMP && in->kind != K_JCC)
            continue;
        if (in->target <= s->addr || in->target >= s->addr + s->len)
            continue;
        for (j = 1; j < s->ninsn; j++)
            if (s->addr + s->insn[j].off == in->target)
                break;
        if (j == s->ninsn || !s->insn[j].moved)
            continue;
        off = in->moved - c->at;
        tpos = (int)off + (in->kind == K_JCC ? 2 : 0) + 6;
        memcpy(&c->b[tpos], &s->insn[j].moved, 8);
    }
}

static void emit_jmp_back(struct cbuf *c, uint64_t target)
{
    uint64_t here = c->at + (uint64_t)c->n;
    int64_t d = (int64_t)(target - (here + 5));

    if (d == (int32_t)d) {
        e8(c, 0xe9);
        e32(c, (uint32_t)d);
    } else {
        jmp_abs(c, target);
    }
}

static int build_trampoline(struct site *s, char *err, size_t errlen)
{
    struct cbuf *c = calloc(1, sizeof(*c));
    int rc, jnz = 0, body = 0, landing = -1;
    uint64_t at;

    if (!c)
        return -ENOMEM;
    at = code_alloc(s->addr, TRAMP_MAX);
    if (!at) {
        snprintf(err, errlen, "no room for a trampoline within 2 GB of 0x%llx", (unsigned long long)s->addr);
        free(c);
        return -ENOMEM;
    }
    c->at = at;
    if (s->sys) {
        /* [displaced instructions before the syscall] enter hook, syscall, exit hook [the rest] */
        int k = s->sysk;
        uint64_t after = s->addr + s->insn[k].off + 2;

        rc = emit_displaced(c, s, 0, k, err, errlen);
        s->insn[k].moved = c->at + (uint64_t)c->n;    /* a thread stopped at the syscall re-enters here */
        emit_save(c, 128, 1, after);
        e8(c, 0x48), eb(c, "\xc7\x84\x24", 3), e32(c, P_AX * 8), e32(c, (uint32_t)-EVENT_ENOSYS);
        emit_call(c, (void *)agent_sys_enter, (uint64_t)(uintptr_t)s);
        emit_restore(c);
        mov_from_rsp(c, RAX, P_ORIG_AX * 8);
        eb(c, "\x0f\x05", 2);                 /* syscall */
        mov_to_rsp(c, RAX, P_AX * 8);
        mov_to_rsp(c, RCX, P_CX * 8);
        mov_to_rsp(c, R11, P_R11 * 8);
        e8(c, 0x9c);                          /* pushfq; pop qword [rsp+flags] */
        eb(c, "\x8f\x84\x24", 3);
        e32(c, P_FLAGS * 8);
        emit_call(c, (void *)agent_sys_exit, (uint64_t)(uintptr_t)s);
        emit_restore(c);
        lea_rsp(c, FRAME + 128);
        if (rc == 0)
            rc = emit_displaced(c, s, k + 1, s->ninsn, err, errlen);
    } else {
        emit_save(c, 128, 0, s->addr);
        emit_call(c, (void *)agent_hit, (uint64_t)(uintptr_t)s);
        eb(c, "\x85\xc0\x0f\x85", 4);         /* test eax,eax; jnz special */
        jnz = c->n;
        e32(c, 0);
        emit_restore(c);
        lea_rsp(c, FRAME + 128);
        body = c->n;
        rc = emit_displaced(c, s, 0, s->ninsn, err, errlen);
    }
    if (rc == 0) {
        fix_inner_branches(c, s);
        emit_jmp_back(c, s->addr + s->len);
        if (jnz) {
            uint32_t d = (uint32_t)(c->n - (jnz + 4));
            int jne;

            memcpy(&c->b[jnz], &d, 4);
            /* 2: a return probe wants the return.  The return address leaves the stack
             * (it is in the shadow stack) and the trampoline calls the function in its
             * place, so the function's `ret` and the return trampoline's final `ret`
             * both match the CPU's return stack: no mispredicted return, where
             * overwriting the return address costs two. */
            eb(c, "\x83\xf8\x02\x0f\x85", 5); /* cmp eax,2; jne override */
            jne = c->n;
            e32(c, 0);
            emit_restore(c);
            lea_rsp(c, FRAME + 128 + 8);
            e8(c, 0xe8);                      /* call body */
            e32(c, (uint32_t)(body - (c->n + 4)));
            landing = c->n;
            jmp_abs(c, ret_tramp);            /* the landing: on to the return trampoline */
            d = (uint32_t)(c->n - (jne + 4));
            memcpy(&c->b[jne], &d, 4);
            emit_restore(c);
            lea_rsp(c, FRAME + 128);
            e8(c, 0xc3);                      /* ret: the override */
        }
        if (c->overflow) {
            snprintf(err, errlen, "trampoline too large");
            rc = -E2BIG;
        }
    }
    if (rc == 0) {
        rc = code_write(at, c->b, (size_t)c->n);
        if (rc)
            snprintf(err, errlen, "cannot write the trampoline at 0x%llx: %s", (unsigned long long)at,
                     strerror(-rc));
    }
    if (rc == 0) {
        sync_cores();
        s->entry = at;
        s->landing = landing >= 0 && ret_tramp ? at + (uint64_t)landing : 0;
    }
    code_trim(at, rc == 0 ? (uint64_t)c->n : 0);
    free(c);
    return rc;
}

static int build_ret_trampoline(void)
{
    struct cbuf *c = calloc(1, sizeof(*c));
    uint64_t at;
    int rc;

    if (!c)
        return -ENOMEM;
    at = code_alloc(0, 512);
    if (!at) {
        free(c);
        return -ENOMEM;
    }
    c->at = at;
    push_reg(c, RAX);                         /* the slot for the real return address */
    emit_save(c, 8, 0, 0);
    emit_call(c, (void *)agent_ret, 0);       /* the slot is just above the frame */
    emit_restore(c);
    lea_rsp(c, FRAME);
    e8(c, 0xc3);
    rc = c->overflow ? -E2BIG : code_write(at, c->b, (size_t)c->n);
    if (rc == 0) {
        sync_cores();
        ret_tramp = at;
    }
    free(c);
    return rc;
}

/* ------------------------------------------------------------------------- */
/* Initialisation                                                            */
/* ------------------------------------------------------------------------- */

static int agent_init(char *err, size_t errlen)
{
    int rc, q;
    const char *env;

    if (agent_ready)
        return 0;
    mem_fd = open("/proc/self/mem", O_RDWR | O_CLOEXEC);
    q = (int)syscall(SYS_membarrier, MEMBARRIER_CMD_QUERY, 0, 0);
    if (q > 0 && (q & MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE) &&
        syscall(SYS_membarrier, MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_SYNC_CORE, 0, 0) == 0)
        membarrier_ok = 1;
    if (q > 0 && (q & MEMBARRIER_CMD_PRIVATE_EXPEDITED) &&
        syscall(SYS_membarrier, MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED, 0, 0) == 0)
        membarrier_fence = 1;
    scratch_page = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (scratch_page == MAP_FAILED) {
        snprintf(err, errlen, "mmap: %s", strerror(errno));
        return -errno;
    }
    quiesce_sig = SIGRTMAX - 1;
    env = getenv("HYBRID_QUIESCE_SIGNAL");
    if (env && *env) {
        char *end;
        long v = strtol(env, &end, 0);

        if (*end || v < 1 || v > SIGRTMAX || v == SIGKILL || v == SIGSTOP || v == SIGTRAP) {
            snprintf(err, errlen, "HYBRID_QUIESCE_SIGNAL=%s is not a usable signal number", env);
            return -EINVAL;
        }
        quiesce_sig = (int)v;
    }
    rc = hybrid_safe_install();
    if (rc == 0)
        rc = install_handler(SIGTRAP, trap_handler, &prev_trap);
    if (rc == 0)
        rc = install_handler(quiesce_sig, quiesce_handler, &prev_quiesce);
    if (rc) {
        snprintf(err, errlen, "cannot install signal handlers: %s", strerror(-rc));
        return rc;
    }
    if (!thr_key_ok && pthread_key_create(&thr_key, thr_release) == 0)
        thr_key_ok = 1;
    rc = build_ret_trampoline();
    if (rc) {
        snprintf(err, errlen, "cannot build the return trampoline: %s", strerror(-rc));
        return rc;
    }
    agent_ready = 1;
    return 0;
}

/* ------------------------------------------------------------------------- */
/* Quiescing threads and grace periods                                      */
/* ------------------------------------------------------------------------- */

static double now_s(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void nap_us(long us)
{
    struct timespec ts = {0, us * 1000};

    nanosleep(&ts, NULL);
}

/* /proc/self/task/TID/syscall: 1 = blocked in a syscall (pc set), 0 = running,
 * -1 = gone. */
static int thread_pc(int tid, uint64_t *pc)
{
    char path[64], buf[256];
    int fd;
    ssize_t n;
    char *last;

    snprintf(path, sizeof(path), "/proc/self/task/%d/syscall", tid);
    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    n = read(fd, buf, sizeof(buf) - 1);
    close(fd);
    if (n <= 0)
        return -1;
    buf[n] = 0;
    if (strncmp(buf, "running", 7) == 0)
        return 0;
    while (n > 0 && (buf[n - 1] == '\n' || buf[n - 1] == ' '))
        buf[--n] = 0;
    last = strrchr(buf, ' ');
    if (!last)
        return 0;
    *pc = strtoull(last + 1, NULL, 0);
    return 1;
}

static int list_threads(int **out)
{
    DIR *d = opendir("/proc/self/task");
    struct dirent *de;
    int *tids = NULL, n = 0, me = (int)syscall(SYS_gettid);
    uint32_t cap = 0;

    if (!d)
        return -errno;
    while ((de = readdir(d))) {
        int tid = atoi(de->d_name);

        if (tid <= 0 || tid == me)
            continue;
        if (grow((void **)&tids, &cap, (uint32_t)n + 1, sizeof(int))) {
            closedir(d);
            free(tids);
            return -ENOMEM;
        }
        tids[n++] = tid;
    }
    closedir(d);
    *out = tids;
    return n;
}

/* Make sure no other thread is stopped inside the windows of `sites`. */
static int quiesce(struct site **sites, int nsites, char *err, size_t errlen)
{
    static uint64_t gen;
    struct qreq *q;
    int *tids = NULL, n, i, rc = 0, pending;
    double deadline;
    uint64_t pc;

    n = list_threads(&tids);
    if (n < 0) {
        snprintf(err, errlen, "cannot list the threads: %s", strerror(-n));
        return n;
    }
    if (n == 0) {
        free(tids);
        return 0;
    }
    q = calloc(1, sizeof(*q));
    if (!q || !(q->acks = calloc((size_t)n, sizeof(uint64_t)))) {
        free(q);
        free(tids);
        return -ENOMEM;
    }
    q->gen = ++gen;
    q->pid = getpid();
    q->sites = malloc((size_t)nsites * sizeof(*sites));
    if (!q->sites) {
        free(q->acks);
        free(q);
        free(tids);
        return -ENOMEM;
    }
    memcpy(q->sites, sites, (size_t)nsites * sizeof(*sites));
    q->nsites = nsites;
    q->tids = tids;
    q->nthreads = n;
    __atomic_store_n(&q->remaining, (uint32_t)n, __ATOMIC_SEQ_CST);
    __atomic_store_n(&qcur, q, __ATOMIC_SEQ_CST);
    for (i = 0; i < n; i++) {
        int st = thread_pc(tids[i], &pc);
        int bad = 0;

        if (st < 0 || (st == 1 && move_out(sites, nsites, pc, &bad) == pc && !bad)) {
            /* gone, or blocked in a syscall outside the windows */
            if (__atomic_exchange_n(&q->acks[i], q->gen, __ATOMIC_ACQ_REL) != q->gen)
                __atomic_sub_fetch(&q->remaining, 1, __ATOMIC_ACQ_REL);
            continue;
        }
        {
            siginfo_t si;

            memset(&si, 0, sizeof(si));
            si.si_signo = quiesce_sig;
            si.si_code = SI_QUEUE;
            si.si_pid = q->pid;
            si.si_uid = getuid();
            si.si_value.sival_ptr = (void *)(uintptr_t)((uint64_t)QMAGIC << 32 | (uint32_t)q->gen);
            if (syscall(SYS_rt_tgsigqueueinfo, q->pid, tids[i], quiesce_sig, &si) != 0 &&
                __atomic_exchange_n(&q->acks[i], q->gen, __ATOMIC_ACQ_REL) != q->gen)
                __atomic_sub_fetch(&q->remaining, 1, __ATOMIC_ACQ_REL);    /* ESRCH: exited */
        }
    }
    deadline = now_s() + 0.2;
    for (;;) {
        uint32_t r = __atomic_load_n(&q->remaining, __ATOMIC_ACQUIRE);
        struct timespec ts = {0, 2000000};

        if (r == 0 || now_s() > deadline)
            break;
        syscall(SYS_futex, &q->remaining, FUTEX_WAIT_PRIVATE, r, &ts, NULL, 0);
    }
    pending = 0;
    for (i = 0; i < n; i++)
        if (__atomic_load_n(&q->acks[i], __ATOMIC_ACQUIRE) != q->gen)
            pending++;
    for (i = 0; pending && i < n; i++) {
        int st, bad = 0;

        if (__atomic_load_n(&q->acks[i], __ATOMIC_ACQUIRE) == q->gen)
            continue;
        st = thread_pc(tids[i], &pc);
        if (st < 0)
            continue;
        if (st == 1 && move_out(sites, nsites, pc, &bad) == pc && !bad)
            continue;
        snprintf(err, errlen, "thread %d does not answer the quiesce signal %d (blocked?) and may be inside the "
                 "patch window", tids[i], quiesce_sig);
        rc = -EBUSY;
        break;
    }
    if (rc == 0 && q->bad_tid) {
        snprintf(err, errlen, "thread %d is stopped inside the patch window, not at an instruction boundary",
                 q->bad_tid);
        rc = -EBUSY;
    }
    if (rc == 0 && !pending) {
        __atomic_store_n(&qcur, NULL, __ATOMIC_SEQ_CST);
        free(q->sites);
        free(q->acks);
        free(q);
        free(tids);
    }
    /* else: a late handler may still read q (and sites: never freed); leak it */
    return rc;
}

/* Wait until every thread seen inside a probe has left it. */
static int grace(double timeout)
{
    struct thr *t;
    struct thr **who = NULL;
    uint64_t *seqs = NULL;
    uint32_t n = 0, cap = 0, capw = 0, i, left;
    double deadline = now_s() + timeout;
    int ok = 1, spins = 0;

    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (membarrier_fence)    /* the other half of probe_begin's barrier, on every running thread */
        syscall(SYS_membarrier, MEMBARRIER_CMD_PRIVATE_EXPEDITED, 0, 0);
    for (t = LOAD_ACQ(&all_thr); t; t = t->next) {
        uint64_t s = __atomic_load_n(&t->seq, __ATOMIC_SEQ_CST);

        if (t == self || !(s & 1) || !LOAD_ACQ(&t->owner))
            continue;
        if (grow((void **)&who, &capw, n + 1, sizeof(*who)) || grow((void **)&seqs, &cap, n + 1, sizeof(*seqs))) {
            ok = 0;
            break;
        }
        who[n] = t;
        seqs[n++] = s;
    }
    for (;;) {
        left = 0;
        for (i = 0; i < n; i++)
            if (who[i] && __atomic_load_n(&who[i]->seq, __ATOMIC_ACQUIRE) == seqs[i] && LOAD_ACQ(&who[i]->owner))
                left++;
            else
                who[i] = NULL;
        if (!left || now_s() > deadline)
            break;
        if (++spins < 100)
            sched_yield();
        else
            nap_us(100);
    }
    if (left)
        ok = 0;
    free(who);
    free(seqs);
    return ok;
}

static void retire(void *p)
{
    if (!p)
        return;
    if (grow((void **)&retired, &capretired, nretired + 1, sizeof(void *)) == 0)
        retired[nretired++] = p;
}

static uint64_t slot_sum(int slot, int zero)
{
    uint64_t v = 0;
    struct thr *t;

    for (t = LOAD_ACQ(&all_thr); t; t = t->next) {
        v += __atomic_load_n(&t->hits[slot], __ATOMIC_RELAXED);
        if (zero)
            __atomic_store_n(&t->hits[slot], 0, __ATOMIC_RELAXED);
    }
    return v;
}

/* After a grace period no thread runs a dead attachment: fold its threads'
 * counts into it and free its slot. */
static void release_slots(void)
{
    int i;

    for (i = 0; i < HIT_SLOTS; i++) {
        struct att *at = slot_owner[i];

        if (at && !at->live) {
            at->hits += slot_sum(i, 1);
            at->slot = -1;
            slot_owner[i] = NULL;
        }
    }
}

static int grace_and_free(double timeout)
{
    uint32_t i;
    int ok;

    if (nretired == 0 && !pending_grace)
        return last_quiescent = 1;
    ok = grace(timeout);
    pending_grace = !ok;

    if (ok) {
        release_slots();    /* before the retired attachments are freed */
        for (i = 0; i < nretired; i++)
            free(retired[i]);
        nretired = 0;
    }
    last_quiescent = ok;
    return ok;
}

/* ------------------------------------------------------------------------- */
/* Patching                                                                  */
/* ------------------------------------------------------------------------- */

static int patch(struct site *s, char *err, size_t errlen)
{
    uint8_t cc = 0xcc, jmp[5];
    int64_t rel = (int64_t)(s->entry - (s->addr + 5));
    int rc;

    rc = code_write(s->addr, &cc, 1);
    if (rc) {
        snprintf(err, errlen, "cannot write at 0x%llx: %s", (unsigned long long)s->addr, strerror(-rc));
        return rc;
    }
    sync_cores();
    if (s->int3) {
        s->patched = 1;
        return 0;
    }
    if (s->insn[0].len < 5) {
        rc = quiesce(&s, 1, err, errlen);
        if (rc) {
            code_write(s->addr, s->orig, 1);
            sync_cores();
            return rc;
        }
    }
    jmp[0] = 0xe9;
    memcpy(&jmp[1], &rel, 4);
    rc = code_write(s->addr + 1, &jmp[1], 4);
    sync_cores();
    if (rc == 0)
        rc = code_write(s->addr, jmp, 1);
    sync_cores();
    if (rc) {
        code_write(s->addr, &cc, 1);
        sync_cores();
        code_write(s->addr + 1, s->orig + 1, 4);
        sync_cores();
        code_write(s->addr, s->orig, 1);
        sync_cores();
        snprintf(err, errlen, "cannot write at 0x%llx: %s", (unsigned long long)s->addr, strerror(-rc));
        return rc;
    }
    s->patched = 1;
    return 0;
}

static void unpatch(struct site *s)
{
    uint8_t cc = 0xcc;

    if (!s->patched)
        return;
    if (!s->int3) {
        code_write(s->addr, &cc, 1);
        sync_cores();
        code_write(s->addr + 1, s->orig + 1, 4);
        sync_cores();
    }
    code_write(s->addr, s->orig, 1);
    sync_cores();
    s->patched = 0;
}

/* ------------------------------------------------------------------------- */
/* Spec parsing                                                              */
/* ------------------------------------------------------------------------- */

struct module_q {
    dev_t dev;
    ino_t ino;
    int found;
    uint64_t bias;
};

static int phdr_cb(struct dl_phdr_info *info, size_t size, void *data)
{
    struct module_q *m = data;
    const char *name = info->dlpi_name && info->dlpi_name[0] ? info->dlpi_name : "/proc/self/exe";
    struct stat st;

    (void)size;
    if (stat(name, &st) == 0 && st.st_dev == m->dev && st.st_ino == m->ino) {
        m->found = 1;
        m->bias = info->dlpi_addr;
        return 1;
    }
    return 0;
}

static int module_bias(const char *path, uint64_t *bias, char *err, size_t errlen)
{
    struct module_q m = {0};
    struct stat st;

    if (stat(path, &st) != 0) {
        snprintf(err, errlen, "module %s: %s", path, strerror(errno));
        return -ENOENT;
    }
    m.dev = st.st_dev;
    m.ino = st.st_ino;
    dl_iterate_phdr(phdr_cb, &m);
    if (!m.found) {
        snprintf(err, errlen, "module %s is not loaded in this process", path);
        return -ENOENT;
    }
    *bias = m.bias;
    return 0;
}

#define MAXTOK 16

struct line {
    int no;
    char *tok[MAXTOK];
    int ntok;
};

static int parse_u64(const char *s, uint64_t *v)
{
    char *end;

    if (!s || !*s)
        return -1;
    errno = 0;
    if (*s == '-')
        *v = (uint64_t)strtoll(s, &end, 0);
    else
        *v = strtoull(s, &end, 0);
    return (*end || errno) ? -1 : 0;
}

static int parse_hex(const char *s, uint8_t *out, size_t max, size_t *n)
{
    size_t len = strlen(s), i;

    if (len % 2 || len / 2 > max)
        return -1;
    for (i = 0; i < len / 2; i++) {
        unsigned v;

        if (sscanf(s + 2 * i, "%2x", &v) != 1 || !strchr("0123456789abcdefABCDEF", s[2 * i]) ||
            !strchr("0123456789abcdefABCDEF", s[2 * i + 1]))
            return -1;
        out[i] = (uint8_t)v;
    }
    *n = len / 2;
    return 0;
}

static void hexstr(char *out, const uint8_t *b, size_t n)
{
    size_t i;

    for (i = 0; i < n; i++)
        sprintf(out + 2 * i, "%02x", b[i]);
    out[2 * n] = 0;
}

/* What one apply call changed, to undo on error. */
struct txn {
    struct { uint64_t addr, size; } regions[64];
    int nregions;
    struct { uint32_t id; void *entry, *old; int had; struct hybrid_stats *stats; uint32_t stats_index; } *progs;
    uint32_t nprogs, capprogs;
    struct site **sites;              /* touched sites */
    uint32_t nsites, capsites;
    struct att **added;               /* new attachments */
    uint32_t nadded, capadded;
    struct att **removed;             /* detached */
    uint32_t nremoved, capremoved;
    struct att **semas;               /* attachments whose semaphore is set here */
    uint32_t nsemas, capsemas;
    /* syscall lists, copy on write: [enter][nr] */
    struct att **sys_pend[2][NR_SYSCALLS + 1];
    uint32_t sys_npend[2][NR_SYSCALLS + 1], sys_cap[2][NR_SYSCALLS + 1];
    uint8_t sys_touched[2][NR_SYSCALLS + 1];
};

static void *lookup_prog(struct txn *tx, uint32_t id)
{
    uint32_t i;

    for (i = tx->nprogs; i-- > 0;)
        if (tx->progs[i].id == id)
            return tx->progs[i].entry;
    for (i = 0; i < nprogs; i++)
        if (progs[i].id == id)
            return progs[i].entry;
    return NULL;
}

/* The run-count slot of program `id` (a `stats` line), or NULL. */
static struct hybrid_stats *lookup_stats(struct txn *tx, uint32_t id, uint32_t *index)
{
    uint32_t i;

    for (i = tx->nprogs; i-- > 0;)
        if (tx->progs[i].id == id) {
            *index = tx->progs[i].stats_index;
            return tx->progs[i].stats;
        }
    for (i = 0; i < nprogs; i++)
        if (progs[i].id == id) {
            *index = progs[i].stats_index;
            return progs[i].stats;
        }
    return NULL;
}

static struct att *find_att(struct txn *tx, uint32_t id)
{
    uint32_t i;

    for (i = 0; i < tx->nadded; i++)
        if (tx->added[i]->id == id && tx->added[i]->live)
            return tx->added[i];
    for (i = 0; i < natts; i++)
        if (atts[i]->id == id && atts[i]->live)
            return atts[i];
    return NULL;
}

static int touch_site(struct txn *tx, struct site *s)
{
    uint32_t i;

    if (s->touched)
        return 0;
    if (grow((void **)&tx->sites, &tx->capsites, tx->nsites + 1, sizeof(*tx->sites)))
        return -ENOMEM;
    s->npend = 0;
    if (s->pub) {
        if (grow((void **)&s->pend, &s->cappend, s->pub->n, sizeof(*s->pend)))
            return -ENOMEM;
        for (i = 0; i < s->pub->n; i++)
            s->pend[s->npend++] = s->pub->a[i];
    }
    s->touched = 1;
    s->txline = 0;
    s->txcmd = "detach";
    s->old = NULL;
    s->patched_now = 0;
    tx->sites[tx->nsites++] = s;
    return 0;
}

static int touch_sys(struct txn *tx, int enter, int idx)
{
    struct att_array *a = sys_pub[enter][idx];
    uint32_t i;

    if (tx->sys_touched[enter][idx])
        return 0;
    tx->sys_npend[enter][idx] = 0;
    if (a) {
        if (grow((void **)&tx->sys_pend[enter][idx], &tx->sys_cap[enter][idx], a->n, sizeof(struct att *)))
            return -ENOMEM;
        for (i = 0; i < a->n; i++)
            tx->sys_pend[enter][idx][tx->sys_npend[enter][idx]++] = a->a[i];
    }
    tx->sys_touched[enter][idx] = 1;
    return 0;
}

static void remove_ptr(struct att **v, uint32_t *n, struct att *at)
{
    uint32_t i;

    for (i = 0; i < *n; i++)
        if (v[i] == at) {
            memmove(&v[i], &v[i + 1], (*n - i - 1) * sizeof(*v));
            (*n)--;
            return;
        }
}

static struct att_array *make_array(struct att **v, uint32_t n)
{
    struct att_array *a;

    if (n == 0)
        return NULL;
    a = malloc(sizeof(*a) + n * sizeof(struct att *));
    if (!a)
        return NULL;
    a->n = n;
    memcpy(a->a, v, n * sizeof(struct att *));
    return a;
}

static char *xstrdup_printf(const char *fmt, ...)
{
    va_list ap;
    char buf[512];

    va_start(ap, fmt);
    vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    return strdup(buf);
}

/* Is [addr, addr+size) already PATH (dev/ino) mapped at addr? 1 yes, 0 free, -1 something else.
 * "Mapped" is a contiguous cover of the range by segments of PATH at their own offset
 * (addr + off) and by mmap()ed kernel maps (anon_inode:bpf-map): the overlays of the region's
 * mmap-mode bridged maps (maps.c) split its mapping into several segments. */
static int region_state(uint64_t addr, uint64_t size, const struct stat *st)
{
    FILE *f = fopen("/proc/self/maps", "re");
    char line[1024];
    uint64_t next = addr;
    int seen = 0, ours = 1, file = 0;

    if (!f)
        return -1;
    while (fgets(line, sizeof(line), f)) {
        unsigned long long lo, hi, off, ino;
        unsigned maj, mnr;
        int pos = 0;
        char *path;

        if (sscanf(line, "%llx-%llx %*s %llx %x:%x %llu%n", &lo, &hi, &off, &maj, &mnr, &ino, &pos) != 6)
            continue;
        if (hi <= addr || lo >= addr + size)
            continue;
        seen = 1;
        path = line + pos;
        path += strspn(path, " \t");
        path[strcspn(path, "\n")] = 0;
        if (lo != next) {
            ours = 0;    /* starts before addr, or a hole */
            break;
        }
        if (lo >= addr && off == lo - addr && ino == (unsigned long long)st->st_ino &&
            makedev(maj, mnr) == st->st_dev)
            file = 1;
        else if (lo == addr || strcmp(path, "anon_inode:bpf-map") != 0) {
            ours = 0;    /* the header page is always the file's */
            break;
        }
        next = hi;
    }
    fclose(f);
    if (!seen)
        return 0;
    return ours && file && next >= addr + size ? 1 : -1;
}

#define ERR(...) do { snprintf(err, errlen, __VA_ARGS__); } while (0)

static int cmd_region(struct txn *tx, struct line *l, char *err, size_t errlen)
{
    uint64_t addr, size;
    struct stat st;
    int fd, state;
    void *p;

    if (l->ntok != 4 || parse_u64(l->tok[1], &addr) || parse_u64(l->tok[2], &size) || size == 0) {
        ERR("expected: region ADDR SIZE PATH");
        return -EINVAL;
    }
    fd = open(l->tok[3], O_RDWR | O_CLOEXEC);
    if (fd < 0 || fstat(fd, &st) != 0) {
        ERR("%s: %s", l->tok[3], strerror(errno));
        if (fd >= 0)
            close(fd);
        return -ENOENT;
    }
    state = region_state(addr, size, &st);
    if (state == 1) {
        close(fd);
        return 0;
    }
    if (state < 0) {
        close(fd);
        ERR("0x%llx+0x%llx is already mapped", (unsigned long long)addr, (unsigned long long)size);
        return -EEXIST;
    }
    if (tx->nregions >= 64) {
        close(fd);
        ERR("too many regions in one spec");
        return -E2BIG;
    }
    p = mmap((void *)(uintptr_t)addr, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED_NOREPLACE, fd, 0);
    close(fd);
    if (p == MAP_FAILED || (uint64_t)(uintptr_t)p != addr) {
        int e = p == MAP_FAILED ? errno : EEXIST;

        if (p != MAP_FAILED)
            munmap(p, size);
        if (e == EEXIST)
            ERR("0x%llx+0x%llx is already mapped", (unsigned long long)addr, (unsigned long long)size);
        else
            ERR("cannot map %s at 0x%llx: %s", l->tok[3], (unsigned long long)addr, strerror(e));
        return -e;
    }
    {
        /* maps backed by kernel maps: mmap overlays, fds (maps.c); the munmap drops the overlays */
        char msg[384];
        int rc = hybrid_region_attach_bridges(p, size, msg, sizeof(msg));

        if (rc < 0) {
            munmap(p, size);
            ERR("%s: %s", l->tok[3], msg);
            return rc;
        }
    }
    tx->regions[tx->nregions].addr = addr;
    tx->regions[tx->nregions++].size = size;
    return 0;
}

static int cmd_prog(struct txn *tx, struct line *l, char *err, size_t errlen)
{
    uint64_t id, addr;
    void *entry, *h;

    if (l->ntok < 3 || parse_u64(l->tok[1], &id) || id > 0xffffffffu) {
        ERR("expected: prog PROGID SO SYMBOL | prog PROGID @ADDR");
        return -EINVAL;
    }
    if (l->tok[2][0] == '@') {
        if (l->ntok != 3 || parse_u64(l->tok[2] + 1, &addr) || addr == 0) {
            ERR("expected: prog PROGID @ADDR");
            return -EINVAL;
        }
        entry = (void *)(uintptr_t)addr;
    } else {
        if (l->ntok != 4) {
            ERR("expected: prog PROGID SO SYMBOL");
            return -EINVAL;
        }
        h = dlopen(l->tok[2], RTLD_NOW | RTLD_LOCAL);
        if (!h) {
            const char *e = dlerror();

            ERR("%s", e ? e : l->tok[2]);
            return -ENOENT;
        }
        dlerror();
        entry = dlsym(h, l->tok[3]);
        if (!entry) {
            const char *e = dlerror();

            ERR("%s: %s", l->tok[2], e ? e : "symbol not found");
            return -ENOENT;
        }
    }
    if (grow((void **)&tx->progs, &tx->capprogs, tx->nprogs + 1, sizeof(*tx->progs)))
        return -ENOMEM;
    tx->progs[tx->nprogs].id = (uint32_t)id;
    tx->progs[tx->nprogs].entry = entry;
    tx->progs[tx->nprogs].had = 0;
    tx->progs[tx->nprogs].stats = NULL;
    tx->progs[tx->nprogs].stats_index = 0;
    tx->progs[tx->nprogs++].old = NULL;
    return 0;
}

/* stats PROGID ADDR INDEX: program PROGID (a prog line of this spec) counts its runs in slot INDEX of the
 * stats area at ADDR (in a region: mapped at the same address in every process). */
static int cmd_stats(struct txn *tx, struct line *l, char *err, size_t errlen)
{
    uint64_t id, addr, index;
    struct hybrid_stats h;
    uint32_t i;

    if (l->ntok != 4 || parse_u64(l->tok[1], &id) || parse_u64(l->tok[2], &addr) || parse_u64(l->tok[3], &index) ||
        id > 0xffffffffu || addr % 64) {
        ERR("expected: stats PROGID ADDR INDEX");
        return -EINVAL;
    }
    if (hybrid_safe_copy(&h, (void *)(uintptr_t)addr, sizeof(h)) != 0 ||
        memcmp(h.magic, HYBRID_STATS_MAGIC, 8) != 0 || h.nr_cpus == 0 || index >= h.nr_progs ||
        h.plane < (uint64_t)h.nr_progs * sizeof(struct hybrid_stats_slot) || h.plane % 64) {
        ERR("no stats area with slot %llu at 0x%llx", (unsigned long long)index, (unsigned long long)addr);
        return -EINVAL;
    }
    for (i = tx->nprogs; i-- > 0;)
        if (tx->progs[i].id == (uint32_t)id) {
            tx->progs[i].stats = (struct hybrid_stats *)(uintptr_t)addr;
            tx->progs[i].stats_index = (uint32_t)index;
            return 0;
        }
    ERR("no prog line for program %llu before it", (unsigned long long)id);
    return -ENOENT;
}

/* site / syssite + insn lines (+ mode int3).  Returns lines consumed or -errno. */
static int cmd_site(struct txn *tx, struct line *lines, int nlines, int at, int *errline, const char **errcmd,
                    char *err, size_t errlen)
{
    struct line *l = &lines[at];
    int sys = strcmp(l->tok[0], "syssite") == 0;
    uint64_t vaddr, len, ninsn, bias, addr;
    uint8_t orig[16], cur[16];
    size_t n;
    struct site tmp, *s;
    int k, used = 1, int3 = 0, rc;
    char h1[40], h2[40];
    char *where;

    if (l->ntok != 6 || parse_u64(l->tok[2], &vaddr) || parse_u64(l->tok[3], &len) ||
        parse_u64(l->tok[5], &ninsn)) {
        ERR("expected: %s MODULE VADDR LEN ORIGHEX NINSN", l->tok[0]);
        return -EINVAL;
    }
    if (len < 1 || len > 16 || parse_hex(l->tok[4], orig, 16, &n) || n != len) {
        ERR("ORIGHEX must be LEN (%llu, at most 16) bytes in hex", (unsigned long long)len);
        return -EINVAL;
    }
    if (ninsn < 1 || ninsn > MAX_INSN) {
        ERR("NINSN must be 1..%d", MAX_INSN);
        return -EINVAL;
    }
    if (at + (int)ninsn >= nlines) {
        ERR("%llu insn lines must follow", (unsigned long long)ninsn);
        return -EINVAL;
    }
    memset(&tmp, 0, sizeof(tmp));
    rc = module_bias(l->tok[1], &bias, err, errlen);
    if (rc)
        return rc;
    addr = bias + vaddr;
    tmp.addr = addr;
    tmp.len = (uint32_t)len;
    tmp.ninsn = (int)ninsn;
    tmp.sys = sys;
    memcpy(tmp.orig, orig, len);
    for (k = 0; k < (int)ninsn; k++) {
        struct line *il = &lines[at + 1 + k];
        struct insn *in = &tmp.insn[k];
        uint64_t off, ilen, field, target;
        const char *kind;

        if (il->ntok != 7 || strcmp(il->tok[0], "insn") != 0 || parse_u64(il->tok[1], &off) ||
            parse_u64(il->tok[2], &ilen) || parse_u64(il->tok[4], &field) || parse_u64(il->tok[5], &target)) {
            *errline = il->no, *errcmd = "insn";
            snprintf(err, errlen, "expected: insn OFF LEN KIND FIELD TARGET BYTESHEX");
            return -EINVAL;
        }
        kind = il->tok[3];
        in->off = (uint8_t)off;
        in->len = (uint8_t)ilen;
        in->field = (uint8_t)field;
        in->target = target ? bias + target : 0;
        if (strcmp(kind, "copy") == 0)
            in->kind = K_COPY;
        else if (strcmp(kind, "rip") == 0)
            in->kind = K_RIP;
        else if (strcmp(kind, "jmp") == 0)
            in->kind = K_JMP;
        else if (strcmp(kind, "jcc") == 0)
            in->kind = K_JCC;
        else if (strcmp(kind, "call") == 0)
            in->kind = K_CALL;
        else {
            *errline = il->no, *errcmd = "insn";
            snprintf(err, errlen, "unknown KIND %s", kind);
            return -EINVAL;
        }
        if (parse_hex(il->tok[6], in->bytes, 16, &n) || n != ilen || ilen == 0 || ilen > 15) {
            *errline = il->no, *errcmd = "insn";
            snprintf(err, errlen, "BYTESHEX must be LEN bytes in hex");
            return -EINVAL;
        }
        if ((k == 0 ? 0 : tmp.insn[k - 1].off + tmp.insn[k - 1].len) != off || off + ilen > len ||
            memcmp(in->bytes, orig + off, ilen) != 0) {
            *errline = il->no, *errcmd = "insn";
            snprintf(err, errlen, "instruction at +%llu does not fit the window's bytes",
                     (unsigned long long)off);
            return -EINVAL;
        }
        if ((in->kind == K_RIP && (field < 1 || field + 4 > ilen)) || (in->kind == K_JCC && field > 15) ||
            (in->kind != K_COPY && in->kind != K_RIP && target == 0 && in->kind != K_JCC) ||
            (in->kind == K_RIP && target == 0)) {
            *errline = il->no, *errcmd = "insn";
            snprintf(err, errlen, "bad FIELD or TARGET for %s", kind);
            return -EINVAL;
        }
    }
    used += (int)ninsn;
    if (tmp.insn[ninsn - 1].off + tmp.insn[ninsn - 1].len != len) {
        ERR("the insn lines cover %u of the %llu bytes of the window",
            (unsigned)(tmp.insn[ninsn - 1].off + tmp.insn[ninsn - 1].len), (unsigned long long)len);
        return -EINVAL;
    }
    if (at + used < nlines && lines[at + used].ntok >= 1 && strcmp(lines[at + used].tok[0], "mode") == 0) {
        struct line *ml = &lines[at + used];

        if (ml->ntok != 2 || strcmp(ml->tok[1], "int3") != 0 || sys) {
            *errline = ml->no, *errcmd = "mode";
            snprintf(err, errlen, "expected: mode int3 (after a site)");
            return -EINVAL;
        }
        int3 = 1;
        used++;
    }
    tmp.int3 = int3;
    if (!int3 && len < 5) {
        ERR("a window of %llu bytes is too short for a jmp (use mode int3)", (unsigned long long)len);
        return -EINVAL;
    }
    if (sys) {
        int k, nsys = 0;

        for (k = 0; k < ninsn; k++)
            if (tmp.insn[k].len == 2 && tmp.insn[k].bytes[0] == 0x0f && tmp.insn[k].bytes[1] == 0x05) {
                nsys++;
                tmp.sysk = k;
            }
        if (nsys != 1 || tmp.insn[tmp.sysk].kind != K_COPY) {
            ERR("a syscall site's window must hold exactly one syscall (0f05), not %d", nsys);
            return -EINVAL;
        }
        if (ninsn < 2) {
            ERR("a syscall site needs other instructions in its window than the syscall");
            return -EINVAL;
        }
    }
    hexstr(h2, orig, len);
    s = site_lookup(addr);
    if (!s || !s->patched) {
        if (hybrid_safe_copy(cur, (void *)(uintptr_t)addr, len) != 0) {
            ERR("cannot read %s+0x%llx (0x%llx)", l->tok[1], (unsigned long long)vaddr, (unsigned long long)addr);
            return -EFAULT;
        }
        if (memcmp(cur, orig, len) != 0) {
            hexstr(h1, cur, len);
            ERR("bytes at %s+0x%llx are %s not %s as planned", l->tok[1], (unsigned long long)vaddr, h1, h2);
            return -EINVAL;
        }
    }
    if (s) {
        if (s->len != len || memcmp(s->orig, orig, len) != 0 || s->int3 != int3 || s->sys != sys) {
            hexstr(h1, s->orig, s->len);
            ERR("a different site is installed at %s+0x%llx (%s%s, not %s%s)", l->tok[1],
                (unsigned long long)vaddr, h1, s->int3 ? " int3" : "", h2, int3 ? " int3" : "");
            return -EEXIST;
        }
        goto touch;
    }
    where = xstrdup_printf("%s+0x%llx", l->tok[1], (unsigned long long)vaddr);
    s = calloc(1, sizeof(*s));
    if (!s || !where) {
        free(s);
        free(where);
        return -ENOMEM;
    }
    *s = tmp;
    s->where = where;
    rc = build_trampoline(s, err, errlen);
    if (rc == 0) {
        rc = site_insert(s);
        if (rc)
            ERR("too many sites");
    }
    if (rc) {
        free(s->where);
        free(s);    /* the trampoline memory (if any) stays unused */
        return rc;
    }
touch:
    if (sys) {
        /* syscall sites are patched by their line, and restored when the last syscall attachment goes */
        if (touch_site(tx, s))
            return -ENOMEM;
        if (!s->txline)
            s->txline = l->no, s->txcmd = "syssite";
    }
    return used;
}

static int new_att(struct txn *tx, struct att **out)
{
    struct att *at = calloc(1, sizeof(*at));

    if (!at || grow((void **)&tx->added, &tx->capadded, tx->nadded + 1, sizeof(*tx->added))) {
        free(at);
        return -ENOMEM;
    }
    at->live = 1;
    at->slot = -1;
    for (int i = 0; i < HIT_SLOTS; i++)
        if (!slot_owner[i]) {
            slot_owner[i] = at;
            at->slot = i;
            break;
        }
    tx->added[tx->nadded++] = at;
    *out = at;
    return 0;
}

static int cmd_uprobe(struct txn *tx, struct line *l, char *err, size_t errlen)
{
    uint64_t id, prog, vaddr, cookie, flags, bias;
    struct site *s;
    struct att *at;
    void *entry;
    int rc;

    if (l->ntok != 7 || parse_u64(l->tok[1], &id) || parse_u64(l->tok[2], &prog) || parse_u64(l->tok[4], &vaddr) ||
        parse_u64(l->tok[5], &cookie) || parse_u64(l->tok[6], &flags) || id > 0xffffffffu ||
        prog > 0xffffffffu || flags > 3) {
        ERR("expected: uprobe ATTACHID PROGID MODULE VADDR COOKIE FLAGS");
        return -EINVAL;
    }
    if (find_att(tx, (uint32_t)id)) {
        ERR("attachment %llu exists", (unsigned long long)id);
        return -EEXIST;
    }
    entry = lookup_prog(tx, (uint32_t)prog);
    if (!entry) {
        ERR("no program %llu", (unsigned long long)prog);
        return -ENOENT;
    }
    rc = module_bias(l->tok[3], &bias, err, errlen);
    if (rc)
        return rc;
    s = site_lookup(bias + vaddr);
    if (!s || s->sys) {
        ERR("no site at %s+0x%llx", l->tok[3], (unsigned long long)vaddr);
        return -ENOENT;
    }
    if ((flags & F_RETURN) && !(flags & F_FUNC_ENTRY)) {
        ERR("a return probe needs a function entry site (FLAGS 3)");
        return -EINVAL;
    }
    if (touch_site(tx, s) || grow((void **)&s->pend, &s->cappend, s->npend + 1, sizeof(*s->pend)))
        return -ENOMEM;
    rc = new_att(tx, &at);
    if (rc)
        return rc;
    at->id = (uint32_t)id;
    at->prog = (uint32_t)prog;
    at->flags = (uint32_t)flags;
    at->kind = A_UPROBE;
    at->cookie = cookie;
    at->entry = entry;
    at->stats = lookup_stats(tx, (uint32_t)prog, &at->stats_index);
    at->site = s;
    at->where = strdup(s->where);
    s->pend[s->npend++] = at;
    if (!s->txline)
        s->txline = l->no, s->txcmd = "uprobe";
    return 0;
}

static int cmd_syscall(struct txn *tx, struct line *l, char *err, size_t errlen)
{
    uint64_t id, prog, nr, event;
    int enter, raw, idx, rc;
    struct att *at;
    void *entry;

    if (l->ntok != 7 || parse_u64(l->tok[1], &id) || parse_u64(l->tok[2], &prog) || parse_u64(l->tok[4], &nr) ||
        parse_u64(l->tok[5], &event) || id > 0xffffffffu || prog > 0xffffffffu ||
        (strcmp(l->tok[3], "enter") && strcmp(l->tok[3], "exit")) || (strcmp(l->tok[6], "tp") && strcmp(l->tok[6], "raw"))) {
        ERR("expected: syscall ATTACHID PROGID enter|exit NR EVENTID tp|raw");
        return -EINVAL;
    }
    enter = strcmp(l->tok[3], "enter") == 0;
    raw = strcmp(l->tok[6], "raw") == 0;
    if ((int64_t)nr == -1 && raw)
        idx = SYS_ALL;
    else if (nr < NR_SYSCALLS)
        idx = (int)nr;
    else {
        ERR("NR %lld out of range (0..%d, or -1 with raw)", (long long)nr, NR_SYSCALLS - 1);
        return -EINVAL;
    }
    if (find_att(tx, (uint32_t)id)) {
        ERR("attachment %llu exists", (unsigned long long)id);
        return -EEXIST;
    }
    entry = lookup_prog(tx, (uint32_t)prog);
    if (!entry) {
        ERR("no program %llu", (unsigned long long)prog);
        return -ENOENT;
    }
    if (touch_sys(tx, enter, idx) ||
        grow((void **)&tx->sys_pend[enter][idx], &tx->sys_cap[enter][idx], tx->sys_npend[enter][idx] + 1,
             sizeof(struct att *)))
        return -ENOMEM;
    rc = new_att(tx, &at);
    if (rc)
        return rc;
    at->id = (uint32_t)id;
    at->prog = (uint32_t)prog;
    at->kind = A_SYSCALL;
    at->enter = enter;
    at->nr = idx == SYS_ALL ? -1 : idx;
    at->event = (uint32_t)event;
    at->raw = raw;
    at->entry = entry;
    at->stats = lookup_stats(tx, (uint32_t)prog, &at->stats_index);
    at->where = xstrdup_printf("nr=%d", at->nr);
    tx->sys_pend[enter][idx][tx->sys_npend[enter][idx]++] = at;
    return 0;
}

static int cmd_sema(struct txn *tx, struct line *l, char *err, size_t errlen)
{
    uint64_t id, vaddr, bias;
    struct att *at;
    uint16_t v;
    int rc;

    if (l->ntok != 4 || parse_u64(l->tok[1], &id) || parse_u64(l->tok[3], &vaddr)) {
        ERR("expected: sema ATTACHID MODULE VADDR");
        return -EINVAL;
    }
    at = find_att(tx, (uint32_t)id);
    if (!at) {
        ERR("no attachment %llu", (unsigned long long)id);
        return -ENOENT;
    }
    if (at->sema) {
        ERR("attachment %llu already has a semaphore", (unsigned long long)id);
        return -EEXIST;
    }
    rc = module_bias(l->tok[2], &bias, err, errlen);
    if (rc)
        return rc;
    if (hybrid_safe_copy(&v, (void *)(uintptr_t)(bias + vaddr), 2) != 0 ||
        hybrid_safe_write((void *)(uintptr_t)(bias + vaddr), &v, 2) != 0) {
        ERR("semaphore %s+0x%llx is not writable memory", l->tok[2], (unsigned long long)vaddr);
        return -EFAULT;
    }
    if (grow((void **)&tx->semas, &tx->capsemas, tx->nsemas + 1, sizeof(*tx->semas)))
        return -ENOMEM;
    at->sema = (uint16_t *)(uintptr_t)(bias + vaddr);
    tx->semas[tx->nsemas++] = at;
    return 0;
}

static int do_detach(struct txn *tx, struct att *at)
{
    if (grow((void **)&tx->removed, &tx->capremoved, tx->nremoved + 1, sizeof(*tx->removed)))
        return -ENOMEM;
    if (at->kind == A_UPROBE) {
        if (touch_site(tx, at->site))
            return -ENOMEM;
        remove_ptr(at->site->pend, &at->site->npend, at);
    } else {
        int idx = at->nr < 0 ? SYS_ALL : at->nr;

        if (touch_sys(tx, at->enter, idx))
            return -ENOMEM;
        remove_ptr(tx->sys_pend[at->enter][idx], &tx->sys_npend[at->enter][idx], at);
    }
    at->live = 0;
    tx->removed[tx->nremoved++] = at;
    return 0;
}

static int cmd_detach(struct txn *tx, struct line *l, char *err, size_t errlen)
{
    uint64_t id;
    struct att *at;

    if (l->ntok != 2 || parse_u64(l->tok[1], &id)) {
        ERR("expected: detach ATTACHID");
        return -EINVAL;
    }
    at = find_att(tx, (uint32_t)id);
    if (!at) {
        ERR("no attachment %llu", (unsigned long long)id);
        return -ENOENT;
    }
    return do_detach(tx, at);
}

/* Drop everything a failed apply did (before or during commit). */
static void txn_abort(struct txn *tx, int committed_arrays)
{
    uint32_t i;
    int e, k;

    for (i = 0; i < tx->nsites; i++) {
        struct site *s = tx->sites[i];

        if (committed_arrays) {
            if (s->patched_now)
                unpatch(s);
            retire(s->pub);
            STORE_REL(&s->pub, s->old);
        }
        s->touched = 0;
        s->npend = 0;
    }
    for (i = 0; i < tx->nremoved; i++)
        tx->removed[i]->live = 1;
    for (i = 0; i < tx->nsemas; i++)
        tx->semas[i]->sema = NULL;
    for (i = 0; i < tx->nadded; i++) {
        free(tx->added[i]->where);
        tx->added[i]->live = 0;  /* its hit slot is released by the next grace period */
        retire(tx->added[i]);    /* a hit may have seen it (committed arrays) */
    }
    for (e = 0; e < 2; e++)
        for (k = 0; k <= NR_SYSCALLS; k++)
            free(tx->sys_pend[e][k]);
    for (k = tx->nregions; k-- > 0;)
        munmap((void *)(uintptr_t)tx->regions[k].addr, tx->regions[k].size);
    if (committed_arrays)
        grace_and_free(1.0);
}

/* Whether this transaction removes the last syscall attachment (of every number, both directions):
 * then the syscall sites are restored.  Their trampolines stay (a thread blocked in a syscall
 * there returns through it, back after the window), and a later syssite line patches them again. */
static int sys_last_removed(const struct txn *tx)
{
    int e, k, touched = 0;

    for (e = 0; e < 2; e++)
        for (k = 0; k <= NR_SYSCALLS; k++) {
            const struct att_array *a = sys_pub[e][k];

            touched |= tx->sys_touched[e][k];
            if (tx->sys_touched[e][k] ? tx->sys_npend[e][k] : (a ? a->n : 0))
                return 0;
        }
    return touched;
}

static int commit(struct txn *tx, char *err, size_t errlen)
{
    uint32_t i;
    int e, k, rc;
    struct att_array *arr;

    /* new arrays first (allocation may fail: nothing published yet) */
    for (i = 0; i < tx->nsites; i++) {
        struct site *s = tx->sites[i];

        s->old = s->pub;
    }
    /* publish site arrays, then patch what became attached */
    for (i = 0; i < tx->nsites; i++) {
        struct site *s = tx->sites[i];

        arr = make_array(s->pend, s->npend);
        if (s->npend && !arr) {
            txn_abort(tx, 1);
            ERR("out of memory");
            return -ENOMEM;
        }
        STORE_REL(&s->pub, arr);
    }
    for (i = 0; i < tx->nsites; i++) {
        struct site *s = tx->sites[i];

        if ((s->npend || s->sys) && !s->patched) {
            rc = patch(s, err, errlen);
            if (rc) {
                char msg[512];

                snprintf(msg, sizeof(msg), "line %d (%s): %s: %s", s->txline, s->txcmd, s->where, err);
                txn_abort(tx, 1);
                snprintf(err, errlen, "%s", msg);
                return rc;
            }
            s->patched_now = 1;
        }
    }
    for (i = 0; i < tx->nsites; i++) {
        struct site *s = tx->sites[i];

        if (!s->npend && !s->sys && s->patched)
            unpatch(s);
        retire(s->old);
        s->touched = 0;
    }
    if (sys_last_removed(tx)) {
        struct site *s;

        for (s = all_sites; s; s = s->next)
            if (s->sys && s->patched)
                unpatch(s);
    }
    /* programs (tail call table) */
    for (i = 0; i < tx->nprogs; i++) {
        uint32_t j;
        int found = 0;

        for (j = 0; j < nprogs; j++)
            if (progs[j].id == tx->progs[i].id) {
                progs[j].entry = tx->progs[i].entry;
                progs[j].stats = tx->progs[i].stats;
                progs[j].stats_index = tx->progs[i].stats_index;
                found = 1;
            }
        if (!found) {
            if (grow((void **)&progs, &capprogs, nprogs + 1, sizeof(*progs)))
                continue;
            progs[nprogs].id = tx->progs[i].id;
            progs[nprogs].stats = tx->progs[i].stats;
            progs[nprogs].stats_index = tx->progs[i].stats_index;
            progs[nprogs++].entry = tx->progs[i].entry;
        }
        hybrid_prog_register(tx->progs[i].id, tx->progs[i].entry);
    }
    for (e = 0; e < 2; e++)
        for (k = 0; k <= NR_SYSCALLS; k++) {
            if (!tx->sys_touched[e][k])
                continue;
            arr = make_array(tx->sys_pend[e][k], tx->sys_npend[e][k]);
            retire(sys_pub[e][k]);
            STORE_REL(&sys_pub[e][k], arr);
            free(tx->sys_pend[e][k]);
            tx->sys_pend[e][k] = NULL;
        }
    for (i = 0; i < tx->nsemas; i++)
        if (tx->semas[i]->live)
            __atomic_fetch_add(tx->semas[i]->sema, 1, __ATOMIC_SEQ_CST);
    for (i = 0; i < tx->nremoved; i++)
        if (tx->removed[i]->sema) {
            __atomic_fetch_sub(tx->removed[i]->sema, 1, __ATOMIC_SEQ_CST);
            tx->removed[i]->sema = NULL;
        }
    if (tx->nremoved)
        pending_grace = 1;
    for (i = 0; i < tx->nadded; i++) {
        if (grow((void **)&atts, &capatts, natts + 1, sizeof(*atts)) == 0)
            atts[natts++] = tx->added[i];
    }
    grace_and_free(1.0);
    return 0;
}

static void txn_free(struct txn *tx)
{
    free(tx->progs);
    free(tx->sites);
    free(tx->added);
    free(tx->removed);
    free(tx->semas);
    free(tx);
}

static int split_lines(char *text, struct line **out)
{
    struct line *v = NULL;
    uint32_t n = 0, cap = 0;
    int no = 0;
    char *p = text, *nl;

    while (p && *p) {
        struct line l = {0};
        char *q;

        no++;
        nl = strchr(p, '\n');
        if (nl)
            *nl = 0;
        q = p;
        while (*q == ' ' || *q == '\t' || *q == '\r')
            q++;
        if (*q && *q != '#') {
            char *save = NULL, *tok;

            l.no = no;
            for (tok = strtok_r(q, " \t\r", &save); tok; tok = strtok_r(NULL, " \t\r", &save)) {
                if (l.ntok == MAXTOK) {
                    free(v);
                    return -no;
                }
                l.tok[l.ntok++] = tok;
            }
            if (grow((void **)&v, &cap, n + 1, sizeof(*v))) {
                free(v);
                return -100000000;
            }
            v[n++] = l;
        }
        p = nl ? nl + 1 : NULL;
    }
    *out = v;
    return (int)n;
}

static int apply_locked(const char *spec, char *err, size_t errlen)
{
    char *text = strdup(spec ? spec : "");
    struct line *lines = NULL;
    struct txn *tx = calloc(1, sizeof(*tx));
    char msg[1024];
    int n, i, rc = 0;

    if (!text || !tx) {
        free(text);
        free(tx);
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    rc = agent_init(msg, sizeof(msg));
    if (rc) {
        snprintf(err, errlen, "agent: %s", msg);
        goto out;
    }
    n = split_lines(text, &lines);
    if (n < 0) {
        snprintf(err, errlen, "line %d: too many tokens", -n);
        rc = -EINVAL;
        goto out;
    }
    for (i = 0; i < n; i++) {
        struct line *l = &lines[i];
        const char *cmd = l->tok[0];

        msg[0] = 0;
        if (strcmp(cmd, "region") == 0)
            rc = cmd_region(tx, l, msg, sizeof(msg));
        else if (strcmp(cmd, "prog") == 0)
            rc = cmd_prog(tx, l, msg, sizeof(msg));
        else if (strcmp(cmd, "stats") == 0)
            rc = cmd_stats(tx, l, msg, sizeof(msg));
        else if (strcmp(cmd, "site") == 0 || strcmp(cmd, "syssite") == 0) {
            int eline = l->no;
            const char *ecmd = cmd;

            rc = cmd_site(tx, lines, n, i, &eline, &ecmd, msg, sizeof(msg));
            if (rc > 0) {
                i += rc - 1;
                rc = 0;
            } else if (rc < 0) {
                snprintf(err, errlen, "line %d (%s): %s", eline, ecmd, msg);
                txn_abort(tx, 0);
                goto out;
            }
        } else if (strcmp(cmd, "uprobe") == 0)
            rc = cmd_uprobe(tx, l, msg, sizeof(msg));
        else if (strcmp(cmd, "sema") == 0)
            rc = cmd_sema(tx, l, msg, sizeof(msg));
        else if (strcmp(cmd, "syscall") == 0)
            rc = cmd_syscall(tx, l, msg, sizeof(msg));
        else if (strcmp(cmd, "detach") == 0)
            rc = cmd_detach(tx, l, msg, sizeof(msg));
        else if (strcmp(cmd, "insn") == 0 || strcmp(cmd, "mode") == 0) {
            snprintf(msg, sizeof(msg), "%s without a site line before it", cmd);
            rc = -EINVAL;
        } else {
            snprintf(msg, sizeof(msg), "unknown command");
            rc = -EINVAL;
        }
        if (rc) {
            if (rc == -ENOMEM && !msg[0])
                snprintf(msg, sizeof(msg), "out of memory");
            snprintf(err, errlen, "line %d (%s): %s", l->no, cmd, msg);
            txn_abort(tx, 0);
            goto out;
        }
    }
    rc = commit(tx, msg, sizeof(msg));
    if (rc) {
        snprintf(err, errlen, "%s", msg);
    } else if (errlen) {
        err[0] = 0;
    }
out:
    free(lines);
    txn_free(tx);
    free(text);
    return rc;
}

/* ------------------------------------------------------------------------- */
/* Public API                                                                */
/* ------------------------------------------------------------------------- */

/* While the agent works in a thread of the traced process (applying a spec), the probes it placed do not
 * see its own libc calls (malloc, strtoull...): the thread counts as inside a probe (a hit runs nothing and
 * is counted as missed), as if the agent were not there.  grace() skips this thread.  Returns whether it
 * marked the thread (not when it already is inside a probe). */
static int agent_busy_begin(void)
{
    struct thr *t = thr_get();

    if (!t || (t->seq & 1))
        return 0;
    __atomic_store_n(&t->seq, t->seq + 1, __ATOMIC_SEQ_CST);
    return 1;
}

static void agent_busy_end(int marked)
{
    if (marked)
        probe_end(self);
}

int hybrid_agent_apply(const char *spec, char *err, uint64_t errlen)
{
    char dummy[8];
    int rc, busy;

    if (!err || !errlen) {
        err = dummy;
        errlen = sizeof(dummy);
    }
    err[0] = 0;
    busy = agent_busy_begin();
    pthread_mutex_lock(&ctl_lock);
    rc = apply_locked(spec, err, (size_t)errlen);
    pthread_mutex_unlock(&ctl_lock);
    agent_busy_end(busy);
    return rc;
}

int hybrid_agent_apply_file(const char *path)
{
    char errpath[4096], err[2048] = "";
    FILE *f;
    char *text = NULL;
    long size;
    int rc, fd, busy = agent_busy_begin();

    snprintf(errpath, sizeof(errpath), "%s.err", path);
    f = fopen(path, "re");
    if (!f) {
        rc = -errno;
        snprintf(err, sizeof(err), "%s: %s", path, strerror(errno));
    } else {
        fseek(f, 0, SEEK_END);
        size = ftell(f);
        fseek(f, 0, SEEK_SET);
        text = calloc(1, (size_t)(size > 0 ? size : 0) + 1);
        if (!text || (size > 0 && fread(text, 1, (size_t)size, f) != (size_t)size)) {
            rc = -EIO;
            snprintf(err, sizeof(err), "%s: cannot read", path);
        } else {
            rc = hybrid_agent_apply(text, err, sizeof(err));
        }
        fclose(f);
        free(text);
    }
    fd = open(errpath, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd >= 0) {
        ssize_t w = write(fd, err, strlen(err));

        (void)w;
        close(fd);
    }
    agent_busy_end(busy);
    return rc;
}

int hybrid_agent_detach_all(void)
{
    struct txn *tx;
    char msg[256];
    uint32_t i;
    int rc = 0;

    pthread_mutex_lock(&ctl_lock);
    if (!agent_ready) {
        pthread_mutex_unlock(&ctl_lock);
        return 0;
    }
    tx = calloc(1, sizeof(*tx));
    if (!tx) {
        pthread_mutex_unlock(&ctl_lock);
        return -ENOMEM;
    }
    for (i = 0; i < natts && rc == 0; i++)
        if (atts[i]->live)
            rc = do_detach(tx, atts[i]);
    if (rc)
        txn_abort(tx, 0);
    else
        rc = commit(tx, msg, sizeof(msg));
    txn_free(tx);
    pthread_mutex_unlock(&ctl_lock);
    return rc;
}

static struct att *att_by_id(uint32_t id)
{
    uint32_t i;
    struct att *last = NULL;

    for (i = 0; i < natts; i++)
        if (atts[i]->id == id) {
            if (atts[i]->live)
                return atts[i];
            last = atts[i];
        }
    return last;
}

uint64_t hybrid_agent_hits(uint32_t attach_id)
{
    struct att *at;
    uint64_t v = 0;

    pthread_mutex_lock(&ctl_lock);
    at = att_by_id(attach_id);
    if (at)
        v = __atomic_load_n(&at->hits, __ATOMIC_RELAXED) + (at->slot >= 0 ? slot_sum(at->slot, 0) : 0);
    pthread_mutex_unlock(&ctl_lock);
    return v;
}

uint64_t hybrid_agent_missed(uint32_t attach_id)
{
    struct att *at;
    uint64_t v = 0;

    pthread_mutex_lock(&ctl_lock);
    at = att_by_id(attach_id);
    if (at)
        v = __atomic_load_n(&at->missed, __ATOMIC_RELAXED);
    pthread_mutex_unlock(&ctl_lock);
    return v;
}

int hybrid_agent_status(char *buf, uint64_t len)
{
    uint64_t used = 0;
    uint32_t i;
    int n;

    if (!buf || !len)
        return -EINVAL;
    buf[0] = 0;
    pthread_mutex_lock(&ctl_lock);
    for (i = 0; i < natts; i++) {
        struct att *at = atts[i];
        const char *kind;

        if (!at->live)
            continue;
        if (at->kind == A_UPROBE)
            kind = at->flags & F_RETURN ? "uretprobe" : "uprobe";
        else
            kind = at->enter ? "syscall-enter" : "syscall-exit";
        n = snprintf(buf + used, len - used, "%u %s %u %s %llu %llu\n", at->id, kind, at->prog,
                     at->where ? at->where : "?", (unsigned long long)(at->hits + (at->slot >= 0 ? slot_sum(at->slot, 0) : 0)),
                     (unsigned long long)at->missed);
        if (n < 0 || (uint64_t)n >= len - used) {
            buf[used] = 0;
            pthread_mutex_unlock(&ctl_lock);
            return -ENOSPC;
        }
        used += (uint64_t)n;
    }
    pthread_mutex_unlock(&ctl_lock);
    return (int)used;
}

/* Where a thread stopped at `pc` by a ptrace injection (the thread that ran the apply) goes on now:
 * the agent quiesces every other thread, but this one's place was saved by the injector.  `pc`
 * itself when it is outside every patched window or at a window's first byte (now the jump); the
 * moved copy of that instruction in the trampoline when it is at a later instruction of one;
 * UINT64_MAX when it is inside a window between instruction boundaries (cannot be resumed). */
/* For stack walks (helpers.c's get_stack and get_stackid): the return address `value` read
 * from stack slot `slot`, as it would be without uretprobes.  A function called from its
 * trampoline has the landing there (the return trampoline after an override); the real
 * address is in this thread's shadow stack, in the entry for that slot.  The kernel does
 * the same for its uretprobe trampoline since Linux 6.11. */
uint64_t hybrid_agent_unwind_ret(uint64_t slot, uint64_t value)
{
    struct thr *t = self;
    uint32_t i;

    if (!t || t->depth == 0)
        return value;
    for (i = t->depth; i-- > 0;)
        if (t->stack[i].sp == slot && returns_to_agent(t->stack[i].site, value))
            return t->stack[i].ret;
    return value;
}

uint64_t hybrid_agent_relocate_pc(uint64_t pc)
{
    struct site *s;
    uint64_t out = pc;

    pthread_mutex_lock(&ctl_lock);
    for (s = all_sites; s; s = s->next) {
        int bad = 0;

        if (!s->patched || s->int3 || pc <= s->addr || pc >= s->addr + s->len)
            continue;
        out = move_out(&s, 1, pc, &bad);
        if (bad)
            out = UINT64_MAX;
        break;
    }
    pthread_mutex_unlock(&ctl_lock);
    return out;
}

int hybrid_agent_quiescent(void)
{
    int v;

    pthread_mutex_lock(&ctl_lock);
    v = last_quiescent;
    pthread_mutex_unlock(&ctl_lock);
    return v;
}

int hybrid_agent_sync(int timeout_ms)
{
    int v;

    pthread_mutex_lock(&ctl_lock);
    v = grace_and_free(timeout_ms / 1000.0);
    pthread_mutex_unlock(&ctl_lock);
    return v;
}

#ifdef HYBRID_AGENT_MAIN
__attribute__((constructor)) static void agent_main(void)
{
    const char *spec = getenv("HYBRID_AGENT_SPEC");
    const char *hold = getenv("HYBRID_AGENT_HOLD");
    char path[4096];
    int rc;

    if (hold && *hold) {
        /* `hybrid run -- CMD`: wait before main until the controllers of running `hybrid load`
         * sessions have attached their probes here (they write a byte to this fifo). */
        char c;
        int fd;

        snprintf(path, sizeof(path), "%s", hold);
        unsetenv("HYBRID_AGENT_HOLD");
        do
            fd = open(path, O_RDONLY | O_CLOEXEC);
        while (fd < 0 && errno == EINTR);
        if (fd >= 0) {
            while (read(fd, &c, 1) < 0 && errno == EINTR)
                ;
            close(fd);
        }
    }
    if (!spec || !*spec)
        return;
    snprintf(path, sizeof(path), "%s", spec);
    unsetenv("HYBRID_AGENT_SPEC");
    rc = hybrid_agent_apply_file(path);
    if (rc) {
        char errpath[4200], err[2048] = "";
        int fd;
        ssize_t n = 0;

        snprintf(errpath, sizeof(errpath), "%s.err", path);
        fd = open(errpath, O_RDONLY | O_CLOEXEC);
        if (fd >= 0) {
            n = read(fd, err, sizeof(err) - 1);
            close(fd);
        }
        err[n > 0 ? n : 0] = 0;
        fprintf(stderr, "hybrid agent: %s\n", err[0] ? err : strerror(-rc));
        {
            const char *strict = getenv("HYBRID_AGENT_STRICT");

            if (strict && strcmp(strict, "1") == 0)
                _exit(126);
        }
    }
}
#endif

#else /* !__x86_64__ */

static int unsupported(char *err, uint64_t errlen)
{
    if (err && errlen)
        snprintf(err, errlen, "the probe agent supports x86-64 only");
    return -ENOSYS;
}

int hybrid_agent_apply(const char *spec, char *err, uint64_t errlen)
{
    (void)spec;
    return unsupported(err, errlen);
}

int hybrid_agent_apply_file(const char *path)
{
    (void)path;
    return -ENOSYS;
}

int hybrid_agent_detach_all(void) { return 0; }
uint64_t hybrid_agent_unwind_ret(uint64_t slot, uint64_t value) { (void)slot; return value; }
uint64_t hybrid_agent_hits(uint32_t attach_id) { (void)attach_id; return 0; }
uint64_t hybrid_agent_missed(uint32_t attach_id) { (void)attach_id; return 0; }
int hybrid_agent_status(char *buf, uint64_t len) { if (buf && len) buf[0] = 0; return 0; }
int hybrid_agent_quiescent(void) { return 1; }
int hybrid_agent_sync(int timeout_ms) { (void)timeout_ms; return 1; }
uint64_t hybrid_agent_relocate_pc(uint64_t pc) { return pc; }

#endif
