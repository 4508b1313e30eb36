"""The native probe agent (hybrid/native/agent.c): sites patched in a running process, programs run on
hits, uretprobes, syscall sites, the safe patching protocol, errors.

Test programs are C compiled here with gcc: functions whose first instructions are written in assembly
(so the patch windows are known), and tiny "eBPF programs" (plain C, uint64_t prog(void *ctx)) that
count into a shared-memory region.  Plans (site + insn lines) are made with capstone by `site_lines`,
a minimal stand-in for the real planner.  Launch mode runs the target with LD_PRELOAD of the standalone
agent and $HYBRID_AGENT_SPEC; library mode applies specs in this process through hybrid._native.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import re
import shutil
import struct
import subprocess
import threading

import pytest

capstone = pytest.importorskip("capstone")
from capstone import x86_const as X  # noqa: E402
from elftools.elf.elffile import ELFFile  # noqa: E402

_native = pytest.importorskip("hybrid._native")
lib, ffi = _native.lib, _native.ffi

from hybrid.native import agent_path  # noqa: E402

pytestmark = pytest.mark.skipif(
    os.uname().machine != "x86_64" or shutil.which("gcc") is None, reason="x86-64 with gcc only"
)

TARGET_C = r"""
#define _GNU_SOURCE
#include <pthread.h>
#include <setjmp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/syscall.h>

__attribute__((visibility("hidden"))) uint64_t gval = 1000;
volatile uint16_t sema_x;    /* a USDT-like semaphore */

/* Functions whose first bytes are known (Intel syntax). */
__asm__(
    ".intel_syntax noprefix\n"
    ".text\n"
    /* push rbp; mov rbp,rsp; mov rax,rdi -> 1+3+3: a 3-instruction window */
    ".globl f_push\n.type f_push,@function\nf_push:\n"
    "  push rbp\n  mov rbp, rsp\n  mov rax, rdi\n  add rax, 1\n  pop rbp\n  ret\n"
    ".size f_push, .-f_push\n"
    /* a 5-byte nop first */
    ".globl f_nop5\n.type f_nop5,@function\nf_nop5:\n"
    "  .byte 0x0f,0x1f,0x44,0x00,0x00\n  lea rax, [rdi+2]\n  ret\n"
    ".size f_nop5, .-f_nop5\n"
    /* rip-relative first */
    ".globl f_rip\n.type f_rip,@function\nf_rip:\n"
    "  lea rax, [rip+gval]\n  mov rax, [rax]\n  add rax, rdi\n  ret\n"
    ".size f_rip, .-f_rip\n"
    /* test; je (short jcc) in the window */
    ".globl f_jcc\n.type f_jcc,@function\nf_jcc:\n"
    "  test rdi, rdi\n  je 1f\n  lea rax, [rdi+5]\n  ret\n1:\n  mov eax, 100\n  ret\n"
    ".size f_jcc, .-f_jcc\n"
    /* xor; jmp (short) in the window */
    ".globl f_jmp\n.type f_jmp,@function\nf_jmp:\n"
    "  xor eax, eax\n  jmp 1f\n  ud2\n  ud2\n1:\n  lea rax, [rdi+7]\n  ret\n"
    ".size f_jmp, .-f_jmp\n"
    /* call first, then more in the window */
    ".globl f_helper\n.hidden f_helper\n.type f_helper,@function\nf_helper:\n"
    "  lea rax, [rdi+10]\n  ret\n.size f_helper, .-f_helper\n"
    ".globl f_call\n.type f_call,@function\nf_call:\n"
    "  call f_helper\n  add rax, 1\n  ret\n"
    ".size f_call, .-f_call\n"
    /* a 1-byte nop (USDT-like) */
    ".globl f_nop1\n.type f_nop1,@function\nf_nop1:\n"
    "  nop\n  lea rax, [rdi+3]\n  ret\n"
    ".size f_nop1, .-f_nop1\n"
    /* getpid through a syscall whose window is syscall + 2 movs (8 bytes) */
    ".globl f_sys\n.type f_sys,@function\nf_sys:\n"
    "  mov eax, 39\n"
    ".globl f_sys_insn\nf_sys_insn:\n"
    "  syscall\n  mov rdx, rax\n  mov r8, rdx\n  mov rax, r8\n  ret\n"
    ".size f_sys, .-f_sys\n"
    ".att_syntax prefix\n");

uint64_t f_push(uint64_t), f_nop5(uint64_t), f_rip(uint64_t), f_jcc(uint64_t), f_jmp(uint64_t),
    f_call(uint64_t), f_nop1(uint64_t), f_sys(void);

__attribute__((noinline)) uint64_t f_rec(uint64_t n)
{
    __asm__ volatile("" ::: "memory");
    return n == 0 ? 0 : f_rec(n - 1) + 2;
}

/* f_deep(n) = n + 1, through n + 1 frames and f_push */
__attribute__((noinline)) uint64_t f_deep(uint64_t n)
{
    __asm__ volatile("" ::: "memory");
    return n == 0 ? f_push(0) : f_deep(n - 1) + 1;
}

static jmp_buf jb;
__attribute__((noinline)) uint64_t f_lj(uint64_t n)
{
    __asm__ volatile("" ::: "memory");
    if (n == 0)
        longjmp(jb, 1);
    return f_lj(n - 1) + 1;
}

uint64_t expect(const char *name, uint64_t x)
{
    if (!strcmp(name, "f_push")) return x + 1;
    if (!strcmp(name, "f_nop5")) return x + 2;
    if (!strcmp(name, "f_rip")) return gval + x;
    if (!strcmp(name, "f_jcc")) return x ? x + 5 : 100;
    if (!strcmp(name, "f_jmp")) return x + 7;
    if (!strcmp(name, "f_call")) return x + 11;
    if (!strcmp(name, "f_nop1")) return x + 3;
    if (!strcmp(name, "f_rec")) return 2 * x;
    return 0;
}

typedef uint64_t (*fn_t)(uint64_t);
fn_t lookup(const char *name)
{
    static const struct { const char *n; fn_t f; } t[] = {
        {"f_push", f_push}, {"f_nop5", f_nop5}, {"f_rip", f_rip}, {"f_jcc", f_jcc}, {"f_jmp", f_jmp},
        {"f_call", f_call}, {"f_nop1", f_nop1}, {"f_rec", f_rec}};
    for (unsigned i = 0; i < sizeof(t) / sizeof(t[0]); i++)
        if (!strcmp(t[i].n, name)) return t[i].f;
    return NULL;
}

struct job { const char *name; fn_t f; long iters; volatile int *stop; long bad; long calls; };

static void *worker(void *p)
{
    struct job *j = p;
    for (long i = 0; j->stop ? !*j->stop : i < j->iters; i++) {
        uint64_t x = (uint64_t)(i % 7);
        if (j->f(x) != expect(j->name, x)) j->bad++;
        j->calls++;
    }
    return NULL;
}

/* Call NAME from T threads ITERS times each (or until *stop); returns the number of wrong results. */
long hammer(const char *name, int threads, long iters, volatile int *stop, long *calls)
{
    pthread_t th[16];
    struct job jobs[16];
    long bad = 0;
    *calls = 0;
    for (int i = 0; i < threads; i++) {
        jobs[i] = (struct job){name, lookup(name), iters, stop, 0, 0};
        pthread_create(&th[i], NULL, worker, &jobs[i]);
    }
    for (int i = 0; i < threads; i++) {
        pthread_join(th[i], NULL);
        bad += jobs[i].bad;
        *calls += jobs[i].calls;
    }
    return bad;
}

long do_longjmp(int rounds)
{
    long bad = 0;
    for (int r = 0; r < rounds; r++) {
        if (setjmp(jb) == 0)
            f_lj(10);
        if (f_rec(5) != 10) bad++;
    }
    return bad;
}

long do_sys(long n)
{
    long bad = 0;
    for (long i = 0; i < n; i++)
        if ((pid_t)f_sys() != getpid()) bad++;
    return bad;
}

#ifdef MAIN
int main(int argc, char **argv)
{
    long calls = 0, bad = 0;
    if (argc >= 4 && !strcmp(argv[1], "hammer")) {
        bad = hammer(argv[2], atoi(argv[3]), atol(argv[4]), NULL, &calls);
    } else if (!strcmp(argv[1], "deep")) {
        uint64_t r = f_deep(atol(argv[2]));
        bad = r != (uint64_t)atol(argv[2]) + 1;
        calls = 1;
        printf("deep %p main %p\n", (void *)f_deep, (void *)main);
    } else if (!strcmp(argv[1], "rec")) {
        uint64_t r = f_rec(atol(argv[2]));
        bad = r != 2 * (uint64_t)atol(argv[2]);
        calls = 1;
    } else if (!strcmp(argv[1], "longjmp")) {
        bad = do_longjmp(atoi(argv[2]));
    } else if (!strcmp(argv[1], "sys")) {
        bad = do_sys(atol(argv[2]));
    } else if (!strcmp(argv[1], "sema")) {
        printf("sema %u\n", (unsigned)sema_x);
    } else if (!strcmp(argv[1], "call")) {
        uint64_t r = lookup(argv[2])(atol(argv[3]));
        printf("result %lu\n", (unsigned long)r);
    }
    printf("calls %ld bad %ld\n", calls, bad);
    return bad != 0;
}
#endif

"""

PROG_C = r"""
#include <stdint.h>
#ifndef REGION
#define REGION 0x510000000000ull
#endif
#define R ((volatile uint64_t *)(uintptr_t)REGION)
struct regs { uint64_t r15, r14, r13, r12, bp, bx, r11, r10, r9, r8, ax, cx, dx, si, di, orig_ax, ip, cs, flags, sp, ss; };
typedef uint64_t (*helper_t)(uint64_t, uint64_t, uint64_t, uint64_t, uint64_t);
extern uint64_t hybrid_helper_override_return(uint64_t, uint64_t, uint64_t, uint64_t, uint64_t) __attribute__((weak));
extern uint64_t hybrid_helper_get_attach_cookie(uint64_t, uint64_t, uint64_t, uint64_t, uint64_t) __attribute__((weak));
extern uint64_t hybrid_helper_get_func_ip(uint64_t, uint64_t, uint64_t, uint64_t, uint64_t) __attribute__((weak));
/* protected: several of these .so are loaded RTLD_GLOBAL in one process; each must use its own */
__attribute__((visibility("protected"))) helper_t override_ptr, cookie_ptr, func_ip_ptr;
#define ADD(i, v) __atomic_fetch_add(&R[i], (v), __ATOMIC_RELAXED)

uint64_t p_count(void *ctx) { ADD(0, 1); return 0; }
uint64_t p_count1(void *ctx) { ADD(1, 1); return 0; }
uint64_t p_di(void *ctx) { ADD(2, ((struct regs *)ctx)->di); return 0; }
uint64_t p_ax(void *ctx) { ADD(3, ((struct regs *)ctx)->ax); ADD(13, 1); return 0; }
uint64_t p_override(void *ctx)
{
    helper_t f = override_ptr ? override_ptr : hybrid_helper_override_return;
    ADD(4, 1);
    return f((uint64_t)(uintptr_t)ctx, 42, 0, 0, 0);
}
uint64_t p_sys_enter(void *ctx)
{
    ADD(5, 1);
    R[6] = (uint64_t)*(int32_t *)((char *)ctx + 8);
    R[7] = (uint64_t)*(int32_t *)((char *)ctx + 4);
    R[14] = *(uint16_t *)ctx;
    return 0;
}
uint64_t p_sys_exit(void *ctx)
{
    ADD(8, 1);
    R[9] = (uint64_t)*(int64_t *)((char *)ctx + 16);
    return 0;
}
uint64_t p_raw(void *ctx)
{
    uint64_t *a = ctx;
    struct regs *r = (struct regs *)(uintptr_t)a[0];
    ADD(10, 1);
    R[15] = r->orig_ax;
    R[16] = a[1];
    return 0;
}
extern uint64_t hybrid_helper_get_stack(uint64_t, uint64_t, uint64_t, uint64_t, uint64_t) __attribute__((weak));
uint64_t p_stack(void *ctx)    /* bpf_get_stack(ctx, buf, 128, BPF_F_USER_STACK) into R[20] (bytes), R[21..36] */
{
    uint64_t buf[16] = {0};
    R[20] = hybrid_helper_get_stack((uint64_t)(uintptr_t)ctx, (uint64_t)(uintptr_t)buf, sizeof(buf), 1 << 8, 0);
    for (int i = 0; i < 16; i++)
        R[21 + i] = buf[i];
    return 0;
}
uint64_t p_cookie(void *ctx)
{
    helper_t c = cookie_ptr ? cookie_ptr : hybrid_helper_get_attach_cookie;
    helper_t f = func_ip_ptr ? func_ip_ptr : hybrid_helper_get_func_ip;
    R[11] = c(0, 0, 0, 0, 0);
    R[12] = f(0, 0, 0, 0, 0);
    return 0;
}

"""

# Each library-mode test maps its region at its own address (regions stay mapped in this process).
_next_region = [0x530000000000]


def _region_addr() -> int:
    _next_region[0] += 0x1000000
    return _next_region[0]


# --- a minimal planner: capstone over the ELF file ------------------------------------------------


def symbol(path, name):
    with open(path, "rb") as f:
        elf = ELFFile(f)
        for secname in (".symtab", ".dynsym"):
            sec = elf.get_section_by_name(secname)
            if sec is None:
                continue
            for s in sec.get_symbol_by_name(name) or []:
                return s["st_value"]
    raise KeyError(name)


def read_vaddr(path, vaddr, n):
    with open(path, "rb") as f:
        elf = ELFFile(f)
        for seg in elf.iter_segments():
            if seg["p_type"] == "PT_LOAD" and seg["p_vaddr"] <= vaddr < seg["p_vaddr"] + seg["p_filesz"]:
                f.seek(seg["p_offset"] + vaddr - seg["p_vaddr"])
                return f.read(n)
    raise KeyError(hex(vaddr))


def site_lines(path, vaddr, minlen=5, int3=False, sys=False):
    code = read_vaddr(path, vaddr, 64)
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    md.detail = True
    insns, total = [], 0
    for ins in md.disasm(code, vaddr):
        insns.append(ins)
        total += ins.size
        if total >= (1 if int3 else minlen):
            break
    lines = []
    for ins in insns:
        kind, field, target = "copy", 0, 0
        b = bytes(ins.bytes)
        if (ins.group(X.X86_GRP_JUMP) or ins.group(X.X86_GRP_CALL)) and ins.operands[0].type == X.X86_OP_IMM:
            target = ins.operands[0].imm
            if ins.mnemonic == "jmp":
                kind = "jmp"
            elif ins.mnemonic == "call":
                kind = "call"
            else:
                kind, field = "jcc", (b[0] & 15) if 0x70 <= b[0] <= 0x7F else (b[1] & 15)
        if kind == "copy":
            for op in ins.operands:
                if op.type == X.X86_OP_MEM and op.mem.base == X.X86_REG_RIP:
                    kind, field = "rip", ins.disp_offset
                    target = ins.address + ins.size + op.mem.disp
        lines.append(f"insn {ins.address - vaddr} {ins.size} {kind} {field} {target:#x} {b.hex()}")
    head = f"{'syssite' if sys else 'site'} {path} {vaddr:#x} {total} {code[:total].hex()} {len(insns)}"
    return "\n".join([head] + lines + (["mode int3"] if int3 else [])) + "\n"


# --- builds ---------------------------------------------------------------------------------------


def _gcc(args, cwd):
    subprocess.run(["gcc", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    d = tmp_path_factory.mktemp("agent")
    (d / "target.c").write_text(TARGET_C)
    (d / "prog.c").write_text(PROG_C)
    _gcc(["-O1", "-fno-omit-frame-pointer", "-DMAIN", "-pie", "-fPIE", "-o", "target", "target.c", "-lpthread"], d)
    _gcc(["-O1", "-fno-omit-frame-pointer", "-shared", "-fPIC", "-o", "libtarget.so", "target.c", "-lpthread"], d)
    return d


def prog_so(build, region):
    out = build / f"prog_{region:x}.so"
    if not out.exists():
        _gcc(["-O2", "-shared", "-fPIC", f"-DREGION={region:#x}ull", "-o", out.name, "prog.c"], build)
    return str(out)


class Region:
    """A shared-memory file mapped here for reading the programs' counters."""

    def __init__(self, path, addr, size=65536):
        self.path, self.addr, self.size = path, addr, size
        with open(path, "wb") as f:
            f.truncate(size)

    def line(self):
        return f"region {self.addr:#x} {self.size} {self.path}\n"

    def counters(self, n=20):
        with open(self.path, "rb") as f:
            return struct.unpack(f"{n}Q", f.read(8 * n))


@pytest.fixture
def region(tmp_path):
    r = Region(f"/dev/shm/hybrid-agent-test-{os.getpid()}-{_region_addr():x}", _next_region[0])
    yield r
    os.unlink(r.path)


def launch(build, spec_text, *args, strict=True, check=True, tmp=None):
    spec = (tmp or build) / "spec.txt"
    spec.write_text(spec_text)
    env = dict(os.environ, LD_PRELOAD=agent_path(), HYBRID_AGENT_SPEC=str(spec))
    if strict:
        env["HYBRID_AGENT_STRICT"] = "1"
    p = subprocess.run([str(build / "target"), *map(str, args)], env=env, capture_output=True, text=True,
                       timeout=60)
    if check:
        assert p.returncode == 0, (p.returncode, p.stdout, p.stderr)
    return p


def entry_spec(build, region, fn, progs=(("1", "p_count", 2),), minlen=5, int3=False):
    exe = str(build / "target")
    so = prog_so(build, region.addr)
    v = symbol(exe, fn)
    text = region.line()
    for pid, sym, _ in progs:
        text += f"prog {pid} {so} {sym}\n"
    text += site_lines(exe, v, minlen=minlen, int3=int3)
    for i, (pid, _, flags) in enumerate(progs):
        text += f"uprobe {10 + i} {pid} {exe} {v:#x} {100 + i} {flags}\n"
    return text


# --- launch mode ----------------------------------------------------------------------------------

FUNCS = ["f_push", "f_nop5", "f_rip", "f_jcc", "f_jmp", "f_call", "f_rec"]


@pytest.mark.parametrize("fn", FUNCS)
def test_entry_and_return_counts_from_threads(build, region, fn):
    """4 threads x 100k calls: every entry and every return probe runs exactly once per call."""
    spec = entry_spec(build, region, fn, progs=(("1", "p_count", 2), ("2", "p_ax", 3), ("3", "p_di", 2)))
    p = launch(build, spec, "hammer", fn, 4, 100000)
    assert "calls 400000 bad 0" in p.stdout
    c = region.counters()
    xs = [i % 7 for i in range(100000)]
    if fn == "f_rec":
        calls = 4 * sum(x + 1 for x in xs)        # f_rec(x) recurses x times
        rets = 4 * sum(sum(2 * k for k in range(x + 1)) for x in xs)
        dis = 4 * sum(sum(range(x + 1)) for x in xs)
    else:
        expect = {"f_push": 1, "f_nop5": 2, "f_rip": 1000, "f_jcc": None, "f_jmp": 7, "f_call": 11}[fn]
        calls = 400000
        rets = 4 * sum((x + 5 if x else 100) if expect is None else x + expect for x in xs)
        dis = 4 * sum(xs)
    assert c[0] == calls          # entries
    assert c[13] == calls         # returns
    assert c[3] == rets           # sum of the return values seen in regs->ax
    assert c[2] == dis            # sum of the first arguments seen in regs->di


def test_call_in_the_middle_of_the_window(build, region):
    """A call that is not the last instruction of the window returns into the trampoline."""
    spec = entry_spec(build, region, "f_call", minlen=8)
    assert "call" in spec and "insn 5 4 copy" in spec
    p = launch(build, spec, "hammer", "f_call", 2, 50000)
    assert "calls 100000 bad 0" in p.stdout
    assert region.counters()[0] == 100000


def test_override_return_skips_the_function(build, region):
    spec = entry_spec(build, region, "f_push", progs=(("1", "p_override", 2), ("2", "p_ax", 3)))
    p = launch(build, spec, "call", "f_push", 5)
    assert "result 42" in p.stdout           # not 6: the function did not run
    c = region.counters()
    assert c[4] == 1 and c[13] == 1 and c[3] == 42   # the return probe sees the override


def test_recursion_with_uretprobe(build, region):
    spec = entry_spec(build, region, "f_rec", progs=(("1", "p_count", 2), ("2", "p_ax", 3)))
    p = launch(build, spec, "rec", 50)
    assert "bad 0" in p.stdout
    c = region.counters()
    assert c[0] == 51 and c[13] == 51 and c[3] == sum(2 * k for k in range(51))


def symbol_size(path, name):
    with open(path, "rb") as f:
        for s in ELFFile(f).get_section_by_name(".symtab").get_symbol_by_name(name) or []:
            return s["st_size"]
    raise KeyError(name)


def test_user_stacks_show_the_callers_of_return_probed_frames(build, region):
    """A stack walked from inside return-probed calls has the real return addresses, not the
    trampoline's landing that stands in for them on the stack (the kernel fixed the same for its
    uretprobes in 6.11): f_push's entry probe sees five f_deep frames, then main."""
    exe = str(build / "target")
    so = prog_so(build, region.addr)
    vd, vp = symbol(exe, "f_deep"), symbol(exe, "f_push")
    text = region.line() + f"prog 1 {so} p_count\nprog 2 {so} p_stack\n"
    text += site_lines(exe, vd) + f"uprobe 30 1 {exe} {vd:#x} 0 3\n"
    text += site_lines(exe, vp) + f"uprobe 31 2 {exe} {vp:#x} 0 2\n"
    p = launch(build, text, "deep", 5)
    assert "bad 0" in p.stdout
    deep, main = (int(x, 16) for x in re.search(r"deep (0x[0-9a-f]+) main (0x[0-9a-f]+)", p.stdout).groups())
    c = region.counters(40)
    assert c[0] == 6  # the six returns of f_deep(5..0)
    ips = c[21:21 + c[20] // 8]
    assert ips[0] == deep - vd + vp  # regs->ip: f_push's entry
    in_deep = [ip for ip in ips[1:6] if deep < ip < deep + symbol_size(exe, "f_deep")]
    assert len(in_deep) == 5, [hex(ip) for ip in ips]
    assert main < ips[6] < main + symbol_size(exe, "main"), [hex(ip) for ip in ips]


def test_longjmp_out_of_probed_frames(build, region):
    exe = str(build / "target")
    so = prog_so(build, region.addr)
    text = region.line() + f"prog 1 {so} p_count\nprog 2 {so} p_ax\n"
    for fn, base in (("f_lj", 10), ("f_rec", 20)):
        v = symbol(exe, fn)
        text += site_lines(exe, v)
        text += f"uprobe {base} 1 {exe} {v:#x} 0 2\nuprobe {base + 1} 2 {exe} {v:#x} 0 3\n"
    p = launch(build, text, "longjmp", 1000)
    assert "bad 0" in p.stdout
    c = region.counters()
    # f_lj(10): 11 entries per round, never returns; f_rec(5): 6 entries and 6 returns per round
    assert c[0] == 1000 * (11 + 6)
    assert c[13] == 1000 * 6        # no return probe lost to a shadow stack full of stale entries
    assert c[3] == 1000 * sum(2 * k for k in range(6))


def test_int3_mode(build, region):
    spec = entry_spec(build, region, "f_nop1", progs=(("1", "p_count", 2), ("2", "p_ax", 3)), int3=True)
    assert "site" in spec and " 1 90 1\n" in spec
    p = launch(build, spec, "hammer", "f_nop1", 2, 20000)
    assert "calls 40000 bad 0" in p.stdout
    c = region.counters()
    assert c[0] == 40000 and c[13] == 40000


def test_cookie_and_func_ip(build, region):
    spec = entry_spec(build, region, "f_nop5", progs=(("1", "p_cookie", 2),))
    launch(build, spec, "call", "f_nop5", 1)
    c = region.counters()
    assert c[11] == 100        # the cookie of the uprobe line
    assert c[12] != 0 and (c[12] & 0xFFF) == (symbol(str(build / "target"), "f_nop5") & 0xFFF)


def test_syscall_site(build, region):
    exe = str(build / "target")
    so = prog_so(build, region.addr)
    v = symbol(exe, "f_sys_insn")
    text = region.line() + f"prog 1 {so} p_sys_enter\nprog 2 {so} p_sys_exit\nprog 3 {so} p_raw\n"
    text += site_lines(exe, v, minlen=7, sys=True)
    text += "syscall 1 1 enter 39 777 tp\nsyscall 2 2 exit 39 778 tp\nsyscall 3 3 enter -1 0 raw\n"
    assert "syssite" in text and " 8 0f05" in text
    p = launch(build, text, "sys", 1000)
    assert "bad 0" in p.stdout
    c = region.counters()
    assert c[5] == 1000 and c[8] == 1000 and c[10] == 1000
    assert c[6] == 39 and c[14] == 777                  # __syscall_nr, common_type
    assert c[7] == c[9] != 0                            # single-threaded: tid == pid == getpid()
    assert c[15] == 39 and c[16] == 39                  # raw: regs->orig_ax and the NR


def test_semaphore(build, region):
    exe = str(build / "target")
    spec = entry_spec(build, region, "f_nop1", int3=True) + f"sema 10 {exe} {symbol(exe, 'sema_x'):#x}\n"
    assert "sema 1\n" in launch(build, spec, "sema").stdout
    assert "sema 0\n" in launch(build, entry_spec(build, region, "f_nop1", int3=True), "sema").stdout


def test_spec_error_strict_and_err_file(build, tmp_path):
    spec = tmp_path / "spec.txt"
    spec.write_text("prog 1 /nonexistent/prog.so p\n")
    env = dict(os.environ, LD_PRELOAD=agent_path(), HYBRID_AGENT_SPEC=str(spec), HYBRID_AGENT_STRICT="1")
    p = subprocess.run([str(build / "target"), "call", "f_push", "1"], env=env, capture_output=True, text=True)
    assert p.returncode == 126
    assert "hybrid agent: line 1 (prog): /nonexistent/prog.so" in p.stderr
    assert "/nonexistent/prog.so" in (tmp_path / "spec.txt.err").read_text()
    del env["HYBRID_AGENT_STRICT"]
    p = subprocess.run([str(build / "target"), "call", "f_push", "1"], env=env, capture_output=True, text=True)
    assert p.returncode == 0 and "result 2" in p.stdout and "hybrid agent:" in p.stderr


def test_spec_env_is_removed_and_children_are_clean(build, region):
    spec = entry_spec(build, region, "f_push")
    p = launch(build, spec, "call", "f_push", 1)
    assert p.stderr == "" and "result 2" in p.stdout
    assert (build / "spec.txt.err").read_text() == ""


def test_standalone_agent_does_not_need_python():
    path = agent_path()
    out = subprocess.run(["nm", "-D", "--undefined-only", path], capture_output=True, text=True, check=True).stdout
    assert "Py" not in out.replace("memcpy", "")
    ldd = subprocess.run(["ldd", path], capture_output=True, text=True).stdout
    assert "python" not in ldd.lower()


# --- library mode (this process) ------------------------------------------------------------------


def apply(spec):
    err = ffi.new("char[2048]")
    rc = lib.hybrid_agent_apply(spec.encode(), err, 2048)
    return rc, ffi.string(err).decode()


def code_bytes(addr, n):
    return ctypes.string_at(addr, n)


@pytest.fixture(scope="module")
def libtarget(build):
    so = ctypes.CDLL(str(build / "libtarget.so"))
    base = ctypes.cast(so.f_push, ctypes.c_void_p).value - symbol(str(build / "libtarget.so"), "f_push")
    yield so, base
    lib.hybrid_agent_detach_all()


def lib_spec(build, region, fn, pid=1, sym="p_count", aid=10, flags=2, int3=False):
    path = str(build / "libtarget.so")
    v = symbol(path, fn)
    so = prog_so(build, region.addr)
    return (region.line() + f"prog {pid} {so} {sym}\n" + site_lines(path, v, int3=int3)
            + f"uprobe {aid} {pid} {path} {v:#x} 0 {flags}\n")


def test_library_mode_attach_detach(build, region, libtarget):
    so, base = libtarget
    addr = base + symbol(str(build / "libtarget.so"), "f_jcc")
    before = code_bytes(addr, 8)
    rc, err = apply(lib_spec(build, region, "f_jcc", aid=500))
    assert rc == 0, err
    assert code_bytes(addr, 1) == b"\xe9"
    so.f_jcc.restype = ctypes.c_uint64
    assert [so.f_jcc(x) for x in range(5)] == [100, 6, 7, 8, 9]
    assert lib.hybrid_agent_hits(500) == 5 and region.counters()[0] == 5
    buf = ffi.new("char[4096]")
    assert lib.hybrid_agent_status(buf, 4096) > 0
    line = [ln for ln in ffi.string(buf).decode().splitlines() if ln.startswith("500 ")][0]
    assert line.split()[1:3] == ["uprobe", "1"] and line.endswith(" 5 0")
    rc, err = apply("detach 500\n")
    assert rc == 0, err
    assert code_bytes(addr, 8) == before
    assert lib.hybrid_agent_quiescent() == 1
    assert so.f_jcc(0) == 100 and lib.hybrid_agent_hits(500) == 5
    rc, err = apply("detach 500\n")
    assert rc == -2 and err == "line 1 (detach): no attachment 500"


def test_detach_all_and_sync(build, region, libtarget):
    so, base = libtarget
    path = str(build / "libtarget.so")
    v = symbol(path, "f_rip")
    before = code_bytes(base + v, 7)
    rc, err = apply(lib_spec(build, region, "f_rip", aid=700) + f"uprobe 701 1 {path} {v:#x} 5 3\n")
    assert rc == 0, err
    so.f_rip.restype = ctypes.c_uint64
    assert so.f_rip(1) == 1001
    assert lib.hybrid_agent_hits(700) == 1 and lib.hybrid_agent_hits(701) == 1
    assert code_bytes(base + v, 1) == b"\xe9"
    assert lib.hybrid_agent_detach_all() == 0
    assert code_bytes(base + v, 7) == before
    assert lib.hybrid_agent_sync(100) == 1 and lib.hybrid_agent_quiescent() == 1
    buf = ffi.new("char[4096]")
    assert lib.hybrid_agent_status(buf, 4096) == 0


def test_recursion_guard_counts_missed(build, region, libtarget):
    """A program that calls a probed function: the nested hit runs nothing and counts as missed."""
    so, base = libtarget
    prog = ctypes.CDLL(prog_so(build, region.addr))
    # p_cookie calls the helpers through these pointers; reuse them to call f_nop5 from the program
    helper = ctypes.CFUNCTYPE(ctypes.c_uint64, *[ctypes.c_uint64] * 5)
    f_nop5 = ctypes.cast(so.f_nop5, ctypes.c_void_p).value
    ctypes.c_void_p.in_dll(prog, "cookie_ptr").value = f_nop5
    ctypes.c_void_p.in_dll(prog, "func_ip_ptr").value = int(ffi.cast("uintptr_t", lib.hybrid_helper_get_func_ip))
    rc, err = apply(lib_spec(build, region, "f_nop5", sym="p_cookie", aid=501))
    assert rc == 0, err
    so.f_nop5.restype = ctypes.c_uint64
    for _ in range(10):
        assert so.f_nop5(1) == 3
    assert lib.hybrid_agent_hits(501) == 10 and lib.hybrid_agent_missed(501) == 10
    assert region.counters()[11] == 2    # the program's call of f_nop5(0) returned 0 + 2
    assert apply("detach 501\n")[0] == 0
    ctypes.c_void_p.in_dll(prog, "cookie_ptr").value = None
    del helper


@pytest.mark.parametrize("flags", [2, 3], ids=["entry", "return"])
def test_attach_detach_while_threads_hammer(build, region, libtarget, flags):
    """2000 attach/detach cycles of a 3-instruction window while 2 threads call the function: an
    entry probe, or a return probe (calls entered while attached return through the trampoline's
    landing, also after the detach)."""
    so, base = libtarget
    path = str(build / "libtarget.so")
    v = symbol(path, "f_push")
    rc, err = apply(region.line() + f"prog 1 {prog_so(build, region.addr)} p_count\n" + site_lines(path, v))
    assert rc == 0, err
    stop = ctypes.c_int(0)
    calls = ctypes.c_long(0)
    so.hammer.restype = ctypes.c_long
    so.hammer.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_long, ctypes.POINTER(ctypes.c_int),
                          ctypes.POINTER(ctypes.c_long)]
    result = {}
    t = threading.Thread(target=lambda: result.setdefault(
        "bad", so.hammer(b"f_push", 2, 0, ctypes.byref(stop), ctypes.byref(calls))))
    t.start()
    try:
        for i in range(2000):
            rc, err = apply(f"uprobe {1000 + i} 1 {path} {v:#x} 0 {flags}\n")
            assert rc == 0, err
            rc, err = apply(f"detach {1000 + i}\n")
            assert rc == 0, err
    finally:
        stop.value = 1
        t.join()
    assert result["bad"] == 0
    assert calls.value > 0
    runs = region.counters()[0]             # counted atomically by the program
    hits = sum(lib.hybrid_agent_hits(1000 + i) for i in range(2000))   # plain increments: approximate
    assert runs > 0 and 0.9 * runs <= hits <= runs
    assert code_bytes(base + v, 7) == read_vaddr(path, v, 7)
    assert lib.hybrid_agent_quiescent() == 1


# --- errors: nothing changes ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda s, p: s.replace("4889e5", "4889e6"), "bytes at {p}+0x{v:x} are 554889e54889f8 not 554889e64889f8"),
        (lambda s, p: s.replace(f"site {p}", "site /nonexistent.so"), "line 3 (site): module /nonexistent.so: No such file"),
        (lambda s, p: s.replace(f"site {p}", "site /bin/true"), "line 3 (site): module /bin/true is not loaded"),
        (lambda s, p: s.replace("insn 1 3 copy", "insn 1 3 cpy"), "line 5 (insn): unknown KIND cpy"),
        (lambda s, p: s.replace("insn 1 3 copy", "insn 2 3 copy"), "line 5 (insn): instruction at +2 does not fit"),
        (lambda s, p: s + "bogus 1 2\n", "line 8 (bogus): unknown command"),
        (lambda s, p: s.replace("uprobe 600 1 ", "uprobe 600 9 "), "line 7 (uprobe): no program 9"),
        (lambda s, p: s.replace("0 2\n", "0 1\n"), "line 7 (uprobe): a return probe needs a function entry"),
        (lambda s, p: s + f"uprobe 601 1 {p} 0x10 0 2\n", "line 8 (uprobe): no site at {p}+0x10"),
        (lambda s, p: s.replace("region 0x", "region 0xzz"), "line 1 (region): expected: region ADDR SIZE PATH"),
    ],
)
def test_bad_specs_change_nothing(build, region, libtarget, mutate, message):
    so, base = libtarget
    path = str(build / "libtarget.so")
    v = symbol(path, "f_push")
    good = lib_spec(build, region, "f_push", aid=600)
    before = code_bytes(base + v, 7)
    rc, err = apply(mutate(good, path))
    assert rc < 0
    assert message.format(p=path, v=v) in err
    assert code_bytes(base + v, 7) == before
    assert lib.hybrid_agent_hits(600) == 0
    rc, err = apply(good)              # the same id is free: nothing was kept
    assert rc == 0, err
    assert apply("detach 600\n")[0] == 0


def test_region_taken_by_something_else(tmp_path):
    m = mmap.mmap(-1, 65536)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
    f = tmp_path / "r"
    f.write_bytes(b"\0" * 65536)
    rc, err = apply(f"region {addr:#x} 65536 {f}\n")
    assert rc == -17 and err == f"line 1 (region): {addr:#x}+0x10000 is already mapped"
