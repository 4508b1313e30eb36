"""End to end on a C++ program (workload_cpp.cpp, g++ -O2 -pthread): uprobes and uretprobes
attached by mangled name to a namespaced free function, a member function and a lambda
called through std::function, with exact counts; and C++ exceptions thrown through
probed frames.

Exceptions, as observed (hybrid and the kernel's uprobes behave the same):

- a uprobe (entry only) on a function an exception passes through changes nothing:
  the entry trampoline returns into the original code, the frame is the original one;
- a uretprobe on a function whose frame an exception unwinds (thrown in the function
  or in a callee, caught in a caller) ends the process: the return address on the
  stack is the return trampoline, which has no unwind info (no FDE), so the unwinder's
  search phase reaches "end of stack", ``__cxa_throw`` calls ``std::terminate``:
  "terminate called after throwing an instance of 'app::Oops'" and SIGABRT.  The
  kernel's uretprobe trampoline ([uprobes] page) does the same;
- an exception caught inside the uretprobed function (its callee throws) never
  unwinds past its return address: works, counts exact.

Not an exception matter: uretprobes on two functions where one tail-calls (``jmp``)
the other are chained, as the kernel does (test_uretprobes_on_a_tail_call_chain).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import subprocess
from pathlib import Path

import pytest

import hybrid

HERE = Path(__file__).parent
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="attaching to other processes needs root (ptrace)")

STEP = "_ZN3app4stepEll"                  # long app::step(long, long)
BUMP = "_ZN3app7Counter4bumpEl"           # long app::Counter::bump(long)
LAMBDA = "_ZZL6workerP3JobENKUllE_clEl"   # worker(Job*)::{lambda(long)#1}::operator()(long) const
TWICE = "_ZN3app5twiceEl"                 # long app::twice(long), tail-called by the lambda
MIDDLE = "_ZN3app6middleEl"               # long app::middle(long): calls thrower, does not catch
THROWER = "_ZN3app7throwerEl"             # long app::thrower(long): throws Oops{n} when n % 3 == 2
GUARD = "_ZN3app5guardEl"                 # long app::guard(long): catches what middle throws

TERMINATE = "terminate called after throwing an instance of 'app::Oops'"


def terminated(err: str) -> bool:
    """libstdc++'s message; two threads terminating at once print 'terminate called recursively'."""
    return TERMINATE in err or "terminate called recursively" in err

PROGRAMS = r"""
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

char LICENSE[] SEC("license") = "GPL";

struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 32);
    __type(key, u32);
    __type(value, u64);
} counts SEC(".maps");

static __always_inline void add_to(u32 k, u64 v)
{
    u64 *p = bpf_map_lookup_elem(&counts, &k);
    if (p)
        __sync_fetch_and_add(p, v);
}
"""


def entry(sym: str, slot: int, arg: int = 1, this: bool = False) -> str:
    """A uprobe on ``sym``: slot += 1, slot + 1 += argument ``arg`` (1-based; 2 skips ``this``).
    With ``this``, slot 31 counts hits whose first argument (the object pointer) is 0."""
    params = ", ".join("long a%d" % i for i in range(1, arg + 1))
    null = "a1 == 0" if this else "0"
    return """
SEC("uprobe/{exe}:%s")
int BPF_KPROBE(on_%d, %s)
{{
    add_to(%d, 1);
    add_to(%d, a%d);
    if (%s)
        add_to(31, 1);
    return 0;
}}
""" % (sym, slot, params, slot, slot + 1, arg, null)


def ret(sym: str, slot: int) -> str:
    """A uretprobe on ``sym``: slot += 1, slot + 1 += the return value."""
    return """
SEC("uretprobe/{exe}:%s")
int BPF_KRETPROBE(on_ret_%d, long r)
{{
    add_to(%d, 1);
    add_to(%d, r);
    return 0;
}}
""" % (sym, slot, slot, slot + 1)


@pytest.fixture(scope="module")
def workload(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("workload_cpp") / "workload_cpp"
    subprocess.run(["g++", "-O2", "-g", "-pthread", "-o", str(out), str(HERE / "workload_cpp.cpp")], check=True)
    return str(out)


def build(bpf_build, name: str, body: str, exe: str) -> Path:
    return bpf_build.source("cpp_" + name, PROGRAMS + body.format(exe=exe))


def counts(obj) -> list[int]:
    m = obj.maps["counts"]
    return [int.from_bytes(m.lookup(i.to_bytes(4, "little")), "little") for i in range(32)]


def launch(obj, argv: list[str]) -> tuple[int, str, str]:
    with obj.launch(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as p:
        out, err = p.popen.communicate(timeout=60)
        return p.popen.returncode, out, err


def run_line(out: str) -> dict[str, int]:
    assert out.startswith("ok "), out
    return {k: int(v) for k, v in (f.split("=") for f in out.split()[1:])}


def tri(n: int) -> int:
    return n * (n - 1) // 2


def throw_results(threads: int, calls: int) -> dict[str, int]:
    """What ``workload_cpp throw`` prints, computed."""
    ok = [i for i in range(calls) if i % 3 != 2]
    bad = [i for i in range(calls) if i % 3 == 2]
    return {"sum": threads * sum(2 * i + 1 for i in ok), "caught": threads * len(bad), "thrown": threads * sum(bad)}


# --- mangled names: free function, member function, lambda ----------------------------------


def test_mangled_free_member_and_lambda_exact(bpf_build, workload):
    threads, calls = 4, 20_000
    body = (entry(STEP, 0) + entry(STEP, 2, arg=2) + ret(STEP, 4)
            + entry(BUMP, 6, arg=2, this=True) + ret(BUMP, 8)
            + entry(LAMBDA, 10, arg=2, this=True) + ret(LAMBDA, 12)
            + entry(TWICE, 14))
    with hybrid.load(build(bpf_build, "calls", body, workload)) as obj:
        rc, out, err = launch(obj, [workload, "calls", str(threads), str(calls)])
        assert rc == 0, err
        res = run_line(out)
        c = counts(obj)
    n = threads * calls
    # app::step(long a, long b): the window planner took it, every call counted once
    assert c[0] == c[2] == c[4] == n
    assert c[1] == threads * tri(calls)                 # sum of a
    assert c[3] == calls * tri(threads)                 # sum of b
    assert c[5] == res["step"] == c[1] + c[3]           # sum of a + b
    # app::Counter::bump(long x): rdi is this (never 0), rsi is x; returns the running total
    assert c[6] == c[8] == n
    assert c[7] == res["bump"] == threads * tri(calls)
    assert c[9] == threads * sum(tri(i + 1) for i in range(calls))
    # the lambda's operator() through std::function (a local symbol), and app::twice it tail-calls
    assert c[10] == c[12] == c[14] == n
    assert c[11] == c[15] == threads * tri(calls)
    assert c[13] == res["lambda"] == 2 * threads * tri(calls)
    assert c[31] == 0  # bump's this and the lambda's closure pointer were never 0


# --- exceptions -----------------------------------------------------------------------


def test_entry_probes_on_frames_an_exception_unwinds(bpf_build, workload):
    """uprobes on middle (the exception passes through its frame) and on thrower (throws):
    the program runs as without probes, every call counted."""
    threads, calls = 3, 3000
    body = entry(MIDDLE, 0) + entry(THROWER, 2)
    with hybrid.load(build(bpf_build, "throw_entry", body, workload)) as obj:
        rc, out, err = launch(obj, [workload, "throw", str(threads), str(calls)])
        assert rc == 0, err
        res = run_line(out)
        c = counts(obj)
    assert res == throw_results(threads, calls)
    assert res["caught"] == threads * (calls // 3)
    assert c[0] == c[2] == threads * calls
    assert c[1] == c[3] == threads * tri(calls)


def test_uretprobe_with_exception_caught_inside_the_probed_function(bpf_build, workload):
    """guard() catches what its callee middle() throws: the unwinder stops in guard's frame,
    before its (replaced) return address; guard's returns, -1 for a caught one, are exact."""
    threads, calls = 3, 3000
    body = ret(GUARD, 0) + entry(MIDDLE, 2) + entry(THROWER, 4)
    with hybrid.load(build(bpf_build, "catchin", body, workload)) as obj:
        rc, out, err = launch(obj, [workload, "catchin", str(threads), str(calls)])
        assert rc == 0, err
        res = run_line(out)
        c = counts(obj)
    expect = throw_results(threads, calls)
    assert res == {"sum": expect["sum"], "caught": expect["caught"]}
    assert c[0] == c[2] == c[4] == threads * calls
    assert c[1] == res["sum"] - res["caught"]


@pytest.mark.parametrize("where", [MIDDLE, THROWER], ids=["callee_throws", "function_throws"])
def test_uretprobe_on_a_frame_an_exception_unwinds_terminates(bpf_build, workload, where):
    """Documented behaviour (README): an exception that would unwind a frame with a hybrid
    uretprobe cannot: the frame's return address is the return trampoline, which has no
    unwind info, so the search phase ends, and std::terminate aborts the process (as with
    the kernel's uretprobes: see test_kernel_uretprobe_reference).  Returns before the
    first throw were counted; the agent itself reports nothing."""
    body = ret(where, 0)
    with hybrid.load(build(bpf_build, "throw_ret_" + where, body, workload)) as obj:
        rc, out, err = launch(obj, [workload, "throw", "1", "30"])
        c = counts(obj)
    assert rc == -signal.SIGABRT
    assert out == ""
    assert terminated(err), err
    # i = 0, 1 return (middle: 1, 3; thrower: 0, 2); i = 2 throws
    assert c[0] == 2
    assert c[1] == (4 if where == MIDDLE else 2)


def test_uretprobe_on_a_frame_an_exception_unwinds_terminates_in_catchin(bpf_build, workload):
    """middle() with a uretprobe, its exception caught one frame up in guard(): same end."""
    with hybrid.load(build(bpf_build, "catchin_ret_middle", ret(MIDDLE, 0), workload)) as obj:
        rc, out, err = launch(obj, [workload, "catchin", "2", "30"])
    assert rc == -signal.SIGABRT
    assert out == ""
    assert terminated(err), err


def test_uretprobes_on_a_tail_call_chain(bpf_build, workload):
    """The lambda's operator() ends in `jmp app::twice`: both uretprobed, the return address twice
    finds on the stack is already the return trampoline."""
    body = ret(LAMBDA, 0) + ret(TWICE, 2)
    with hybrid.load(build(bpf_build, "tailcall", body, workload)) as obj:
        rc, out, err = launch(obj, [workload, "calls", "1", "5"])
        c = counts(obj)
    assert rc == 0, err
    assert run_line(out)["lambda"] == 20
    assert c[0] == c[2] == 5 and c[1] == c[3] == 20


# --- the kernel's uprobes on the same program, for reference ----------------------------------


class KernelSide:
    """The same object loaded into the kernel by libbpf (ctypes); each program auto-attached
    by its section name (``bpf_program__attach``: pid -1, the symbol's file offset)."""

    def __init__(self, path: Path):
        name = ctypes.util.find_library("bpf") or "libbpf.so.1"
        try:
            lib = ctypes.CDLL(name, use_errno=True)
        except OSError:
            pytest.skip("libbpf not found")
        P, I = ctypes.c_void_p, ctypes.c_int
        for fn, res, args in (("bpf_object__open_file", P, [ctypes.c_char_p, P]), ("bpf_object__load", I, [P]),
                              ("bpf_object__close", None, [P]), ("bpf_object__next_program", P, [P, P]),
                              ("bpf_program__attach", P, [P]), ("bpf_link__destroy", I, [P]),
                              ("bpf_object__find_map_by_name", P, [P, ctypes.c_char_p]), ("bpf_map__fd", I, [P]),
                              ("bpf_map_lookup_elem", I, [I, P, P])):
            f = getattr(lib, fn)
            f.restype, f.argtypes = res, args
        self.lib, self.links = lib, []
        self.obj = lib.bpf_object__open_file(os.fsencode(path), None)
        if not self.obj:
            pytest.skip("libbpf cannot open %s" % path)
        if lib.bpf_object__load(self.obj):
            self.close()
            pytest.skip("libbpf cannot load %s into the kernel" % path.name)
        p = lib.bpf_object__next_program(self.obj, None)
        while p:
            link = lib.bpf_program__attach(p)
            if not link:
                self.close()
                pytest.skip("libbpf cannot attach: %s" % os.strerror(ctypes.get_errno()))
            self.links.append(link)
            p = lib.bpf_object__next_program(self.obj, p)

    def counts(self) -> list[int]:
        fd = self.lib.bpf_map__fd(self.lib.bpf_object__find_map_by_name(self.obj, b"counts"))
        out = []
        for i in range(32):
            v = ctypes.c_uint64()
            assert self.lib.bpf_map_lookup_elem(fd, ctypes.byref(ctypes.c_uint32(i)), ctypes.byref(v)) == 0
            out.append(v.value)
        return out

    def close(self) -> None:
        for link in self.links:
            self.lib.bpf_link__destroy(link)
        self.links = []
        if self.obj:
            self.lib.bpf_object__close(self.obj)
            self.obj = None


def test_kernel_uretprobe_reference(bpf_build, workload):
    """The kernel's uprobes on the same functions: entry probes work, a uretprobe on a frame
    an exception unwinds ends the process in std::terminate too, a tail-call chain works."""
    k = KernelSide(build(bpf_build, "k_entry", entry(MIDDLE, 0) + entry(THROWER, 2) + ret(GUARD, 4), workload))
    try:
        r = subprocess.run([workload, "throw", "2", "300"], capture_output=True, text=True, timeout=60)
        r2 = subprocess.run([workload, "catchin", "2", "300"], capture_output=True, text=True, timeout=60)
        c = k.counts()
    finally:
        k.close()
    assert r.returncode == 0 and run_line(r.stdout) == throw_results(2, 300)
    assert r2.returncode == 0
    assert c[0] == c[2] == 2 * 2 * 300 and c[4] == 2 * 300

    k = KernelSide(build(bpf_build, "k_ret", ret(MIDDLE, 0), workload))
    try:
        r = subprocess.run([workload, "throw", "1", "30"], capture_output=True, text=True, timeout=60)
        c = k.counts()
    finally:
        k.close()
    assert r.returncode == -signal.SIGABRT
    assert r.stdout == "" and terminated(r.stderr), r.stderr
    assert c[0] == 2 and c[1] == 4

    k = KernelSide(build(bpf_build, "k_tail", ret(LAMBDA, 0) + ret(TWICE, 2), workload))
    try:
        r = subprocess.run([workload, "calls", "1", "5"], capture_output=True, text=True, timeout=60)
        c = k.counts()
    finally:
        k.close()
    assert r.returncode == 0 and run_line(r.stdout)["lambda"] == 20
    assert c[0] == c[2] == 5 and c[1] == c[3] == 20
