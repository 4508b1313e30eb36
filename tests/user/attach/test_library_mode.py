"""Library mode: ``obj.attach()`` probes native code running in this Python process,
with the JIT's code called from the trampolines; attach/detach under fire."""

from __future__ import annotations

import ctypes
import subprocess
from pathlib import Path

import pytest

import hybrid
from hybrid.errors import AttachError

LIB_C = r"""
#include <pthread.h>
#include <stdatomic.h>

__attribute__((noinline, optimize("O0"))) long lib_add(long a, long b) { return a + b; }

__attribute__((noinline)) long lib_mul(long a, long b)
{
    __asm__ volatile("" ::: "memory");
    return a * b + (a > b ? 1 : 0);
}

struct job { long calls, index, sum; };

static void *worker(void *arg)
{
    struct job *j = arg;
    for (long i = 0; i < j->calls; i++)
        j->sum += lib_add(i, j->index);
    return 0;
}

long lib_run(int threads, long calls)
{
    pthread_t t[16];
    struct job jobs[16];
    long sum = 0;
    for (int i = 0; i < threads; i++) {
        jobs[i] = (struct job){calls, i, 0};
        pthread_create(&t[i], 0, worker, &jobs[i]);
    }
    for (int i = 0; i < threads; i++) {
        pthread_join(t[i], 0);
        sum += jobs[i].sum;
    }
    return sum;
}

/* hammer: threads calling lib_add until stopped, checking every result */
static atomic_int stop;
static atomic_long calls_done, wrong;
static pthread_t hammers[4];
static int nhammers;

static void *hammer(void *arg)
{
    long k = (long)arg;
    while (!atomic_load(&stop)) {
        for (long i = 0; i < 1000; i++)
            if (lib_add(i, k) != i + k)
                atomic_fetch_add(&wrong, 1);
        atomic_fetch_add(&calls_done, 1000);
    }
    return 0;
}

void hammer_start(int n)
{
    atomic_store(&stop, 0);
    atomic_store(&calls_done, 0);
    atomic_store(&wrong, 0);
    nhammers = n;
    for (long i = 0; i < n; i++)
        pthread_create(&hammers[i], 0, hammer, (void *)i);
}

long hammer_stop(long *wrong_out)
{
    atomic_store(&stop, 1);
    for (int i = 0; i < nhammers; i++)
        pthread_join(hammers[i], 0);
    *wrong_out = atomic_load(&wrong);
    return atomic_load(&calls_done);
}
"""

PROG = r"""
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

char LICENSE[] SEC("license") = "GPL";

struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 8);
    __type(key, u32);
    __type(value, u64);
} counts SEC(".maps");

static __always_inline void add_to(u32 k, u64 v)
{
    u64 *p = bpf_map_lookup_elem(&counts, &k);
    if (p)
        __sync_fetch_and_add(p, v);
}

SEC("uprobe/%(lib)s:lib_add")
int BPF_KPROBE(on_add, long a, long b)
{
    add_to(0, 1);
    add_to(1, a + b);
    return 0;
}

SEC("uretprobe/%(lib)s:lib_add")
int BPF_KRETPROBE(on_add_ret, long ret)
{
    add_to(2, 1);
    add_to(3, ret);
    return 0;
}
"""


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    d = tmp_path_factory.mktemp("libmode")
    src, so = d / "libwork.c", d / "libwork.so"
    src.write_text(LIB_C)
    subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-pthread", "-o", str(so), str(src)], check=True)
    handle = ctypes.CDLL(str(so))
    handle.lib_run.restype = ctypes.c_long
    handle.lib_run.argtypes = [ctypes.c_int, ctypes.c_long]
    handle.hammer_stop.restype = ctypes.c_long
    handle.hammer_stop.argtypes = [ctypes.POINTER(ctypes.c_long)]
    handle.lib_add.restype = ctypes.c_long
    handle.lib_add.argtypes = [ctypes.c_long, ctypes.c_long]
    return so, handle


@pytest.fixture(scope="module")
def obj_path(bpf_build, lib):
    return bpf_build.source("libmode", PROG % {"lib": lib[0]})


def counts(obj) -> list[int]:
    m = obj.maps["counts"]
    return [int.from_bytes(m.lookup(i.to_bytes(4, "little")), "little") for i in range(4)]


@pytest.mark.parametrize("engine", ["jit", "aot"])
def test_library_mode_exact(obj_path, lib, engine):
    so, h = lib
    with hybrid.load(obj_path) as obj:
        att = obj.attach(engine=engine)
        total = h.lib_run(4, 25_000)
        c = counts(obj)
        assert c[0] == c[2] == 100_000
        assert c[1] == c[3] == total
        assert att.hits("on_add") == att.hits("on_add_ret") == 100_000
        assert att.missed() == 0
        att.detach()
        h.lib_run(2, 1000)
        assert counts(obj)[0] == 100_000
        assert h.lib_add(2, 3) == 5


def test_attach_detach_under_fire(obj_path, lib):
    """1000 patch/unpatch cycles while 2 threads call the probed function: no crash, every result right."""
    so, h = lib
    with hybrid.load(obj_path) as obj:
        h.hammer_start(2)
        try:
            for _ in range(1000):
                obj.attach(programs=["on_add", "on_add_ret"]).detach()
        finally:
            wrong = ctypes.c_long()
            done = h.hammer_stop(ctypes.byref(wrong))
        c = counts(obj)
    assert wrong.value == 0 and done > 0
    assert c[0] > 0 and c[2] <= c[0]


def test_no_lost_count_while_others_attach_and_detach(obj_path, lib):
    """One program stays attached while another attaches and detaches 500 times at the same
    site: the steady one counts every call the threads made, exactly."""
    so, h = lib
    with hybrid.load(obj_path) as steady, hybrid.load(obj_path) as churn:
        att = steady.attach(programs=["on_add"])
        h.hammer_start(2)
        try:
            for _ in range(500):
                churn.attach(programs=["on_add_ret"]).detach()
        finally:
            wrong = ctypes.c_long()
            done = h.hammer_stop(ctypes.byref(wrong))
        att.detach()
        assert wrong.value == 0
        assert counts(steady)[0] == done
        assert att.missed() == 0


def test_not_a_userspace_program(bpf_build, lib):
    path = bpf_build.source("libmode_kp", r"""
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
char LICENSE[] SEC("license") = "GPL";
SEC("kprobe/do_sys_openat2") int kp(void *ctx) { return 0; }
""")
    with hybrid.load(path) as obj:
        with pytest.raises(AttachError, match="no program that runs in a traced process"):
            obj.attach()


FLAGS_C = r"""
/* long flagsfn(long a, long b): cmp a, b; [probe at +3]; the arithmetic flags read back after
 * the probe (CF PF AF ZF SF OF).  long dfn(void): std; [probe at +1]; DF read back. */
__asm__(".text\n.globl flagsfn\n.type flagsfn,@function\nflagsfn:\n"
        "    cmp %rsi, %rdi\n"                 /* 3 bytes: the probe goes after it */
        "    movl $0, %r8d\n"                  /* 6 bytes, flags untouched: the patch window */
        "    pushfq\n    pop %rax\n    and $0x8d5, %rax\n    ret\n"
        ".size flagsfn, .-flagsfn\n"
        ".globl dfn\n.type dfn,@function\ndfn:\n"
        "    std\n"
        "    movl $0, %eax\n"
        "    pushfq\n    pop %rax\n    cld\n    shr $10, %rax\n    and $1, %rax\n    ret\n"
        ".size dfn, .-dfn\n");
"""

FLAGS_PROG = r"""
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
char LICENSE[] SEC("license") = "GPL";
u64 hits;
SEC("uprobe/%(lib)s:flagsfn+0x3")
int mid(struct pt_regs *ctx)
{
    /* arithmetic that leaves other flags behind */
    hits += ctx->di * 3 + (ctx->si ^ 0x5555) - 1;
    return 0;
}
SEC("uprobe/%(lib)s:dfn+0x1")
int mid_df(void *ctx)
{
    hits++;
    return 0;
}
"""


def test_flags_survive_a_probe_mid_function(bpf_build, tmp_path):
    """A probe at func+offset where the flags are live: every flag (and DF) is as it was."""
    src, so = tmp_path / "flags.c", tmp_path / "libflags.so"
    src.write_text(FLAGS_C)
    subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", str(so), str(src)], check=True)
    h = ctypes.CDLL(str(so))
    h.flagsfn.restype = ctypes.c_long
    h.flagsfn.argtypes = [ctypes.c_long, ctypes.c_long]
    h.dfn.restype = ctypes.c_long
    cases = [(1, 2), (2, 1), (5, 5), (-(1 << 63), 1), ((1 << 63) - 1, -1), (0, 0), (3, 0), (0x10, 0x0F),
             (-1, 1), (7, 4)]
    expected = [h.flagsfn(a, b) for a, b in cases]
    assert len(set(expected)) >= 5  # the cases cover different flag combinations, OF among them
    assert any(e & 0x800 for e in expected)
    assert h.dfn() == 1
    path = bpf_build.source("flags", FLAGS_PROG % {"lib": so})
    with hybrid.load(path) as obj:
        att = obj.attach()
        got = [h.flagsfn(a, b) for a, b in cases]
        df = h.dfn()
        assert att.hits("mid") == len(cases) and att.hits("mid_df") == 1
        att.detach()
    assert got == expected
    assert df == 1
