"""End to end: clang-compiled uprobe, uretprobe, USDT and syscall programs attached to a
real multi-threaded C program, at launch (``obj.launch``), on the running process
(``obj.attach(pid=...)``) and in this process (``obj.attach()``).  Counts are exact.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import hybrid
from hybrid.errors import AttachError

HERE = Path(__file__).parent
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="attaching to other processes needs root (ptrace)")

PROGRAMS = r"""
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/usdt.bpf.h>

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

ADD = r"""
SEC("uprobe/{exe}:add")
int BPF_KPROBE(on_add, long a, long b)
{{
    add_to(0, 1);
    add_to(1, a);
    add_to(2, b);
    if (bpf_get_func_ip(ctx) == 0)
        add_to(20, 1);
    return 0;
}}

SEC("uretprobe/{exe}:add")
int BPF_KRETPROBE(on_add_ret, long ret)
{{
    add_to(3, 1);
    add_to(4, ret);
    return 0;
}}
"""

FACT = r"""
SEC("uprobe/{exe}:fact")
int BPF_KPROBE(on_fact, long n)
{{
    add_to(5, 1);
    add_to(6, n);
    return 0;
}}

SEC("uretprobe/{exe}:fact")
int BPF_KRETPROBE(on_fact_ret, long ret)
{{
    add_to(7, 1);
    add_to(8, ret);
    return 0;
}}
"""

DIVE = r"""
SEC("uretprobe/{exe}:dive")
int BPF_KRETPROBE(on_dive_ret, long ret)
{{
    add_to(9, 1);
    return 0;
}}
""" + ADD

USDT = r"""
SEC("usdt/{exe}:hybridtest:tick")
int BPF_USDT(on_tick, long i, long j)
{{
    add_to(10, 1);
    add_to(11, i);
    add_to(12, j);
    return 0;
}}
"""

SYSCALLS = r"""
SEC("tracepoint/syscalls/sys_enter_getppid")
int on_getppid(struct trace_event_raw_sys_enter *ctx)
{{
    add_to(13, 1);
    if (ctx->id == 110)
        add_to(14, 1);
    return 0;
}}

SEC("tracepoint/syscalls/sys_exit_getppid")
int on_getppid_exit(struct trace_event_raw_sys_exit *ctx)
{{
    add_to(15, 1);
    if (ctx->ret == {ppid})
        add_to(16, 1);
    return 0;
}}

SEC("raw_tp/sys_enter")
int on_raw_enter(struct bpf_raw_tracepoint_args *ctx)
{{
    if (ctx->args[1] == 110)
        add_to(17, 1);
    return 0;
}}

SEC("raw_tp/sys_exit")
int on_raw_exit(struct bpf_raw_tracepoint_args *ctx)
{{
    struct pt_regs *regs = (struct pt_regs *)ctx->args[0];
    long nr = 0;

    /* as on the kernel side: the number from the saved registers, the result in args[1] */
    bpf_probe_read_kernel(&nr, sizeof(nr), &regs->orig_ax);
    if (nr == 110 && ctx->args[1] == {ppid})
        add_to(18, 1);
    return 0;
}}
"""

OVERRIDE = r"""
SEC("uprobe/{exe}:guarded")
int BPF_KPROBE(on_guarded, int x)
{{
    bpf_override_return(ctx, x + 1000);
    return 0;
}}
"""


@pytest.fixture(scope="module")
def workload(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("workload") / "workload"
    subprocess.run(["gcc", "-O2", "-g", "-pthread", "-o", str(out), str(HERE / "workload.c")], check=True)
    return str(out)


def build(bpf_build, name: str, body: str, **fmt) -> Path:
    return bpf_build.source("attach_" + name, PROGRAMS + body.format(**fmt))


def counts(obj) -> list[int]:
    m = obj.maps["counts"]
    return [int.from_bytes(m.lookup(i.to_bytes(4, "little")), "little") for i in range(32)]


def run_line(out: str) -> dict[str, int]:
    assert out.startswith("ok "), out
    return {k: int(v) for k, v in (f.split("=") for f in out.split()[1:])}


def tri(n: int) -> int:
    return n * (n - 1) // 2


# --- at launch -------------------------------------------------------------------------


def test_launch_uprobe_uretprobe_exact(bpf_build, workload):
    threads, calls = 4, 50_000
    with hybrid.load(build(bpf_build, "add", ADD, exe=workload)) as obj:
        with obj.launch([workload, "add", str(threads), str(calls)], stdout=subprocess.PIPE, text=True) as p:
            out, _ = p.popen.communicate(timeout=60)
            assert p.returncode == 0
        res = run_line(out)
        c = counts(obj)
    n = threads * calls
    assert c[0] == n and c[3] == n
    assert c[1] == threads * tri(calls)
    assert c[2] == calls * tri(threads)
    assert c[4] == res["add"] == c[1] + c[2]
    assert c[20] == 0  # get_func_ip was the function's address


def test_launch_recursion_jcc_window(bpf_build, workload):
    threads, calls = 2, 2000
    with hybrid.load(build(bpf_build, "fact", FACT, exe=workload)) as obj:
        with obj.launch([workload, "fact", str(threads), str(calls)], stdout=subprocess.PIPE, text=True) as p:
            out, _ = p.popen.communicate(timeout=60)
        res = run_line(out)
        c = counts(obj)
    # fact(n) with n = i % 20 runs frames n, n-1, ..., 1 (one frame for 0 and 1)
    frames = [[k for k in range(n, 0, -1)] or [0] for n in (i % 20 for i in range(calls))]
    assert c[5] == c[7] == threads * sum(len(f) for f in frames)
    assert c[6] == threads * sum(sum(f) for f in frames)
    assert c[8] == threads * sum(sum(fact(k) for k in f) for f in frames)
    assert res["fact"] == threads * sum(fact(i % 20) for i in range(calls))


def fact(n: int) -> int:
    return 1 if n <= 1 else n * fact(n - 1) % 1000003


def test_launch_longjmp_out_of_returnprobed_frames(bpf_build, workload):
    threads, calls = 2, 3000
    with hybrid.load(build(bpf_build, "dive", DIVE, exe=workload)) as obj:
        with obj.launch([workload, "jump", str(threads), str(calls)], stdout=subprocess.PIPE, text=True) as p:
            out, _ = p.popen.communicate(timeout=60)
            assert p.returncode == 0
        res = run_line(out)
        c = counts(obj)
    assert res["jump"] == threads * calls
    assert c[9] == 0  # every dive() frame was left by longjmp: no return ran
    assert c[0] == c[3] == threads * calls  # and the add() return probes after it stayed exact
    assert c[4] == res["add"]


def test_launch_usdt_arguments_and_semaphore(bpf_build, workload):
    threads, calls = 3, 20_000
    with hybrid.load(build(bpf_build, "usdt", USDT, exe=workload)) as obj:
        with obj.launch([workload, "usdt", str(threads), str(calls)], stdout=subprocess.PIPE, text=True) as p:
            out, _ = p.popen.communicate(timeout=60)
        res = run_line(out)
        c = counts(obj)
    n = threads * calls
    assert res["usdt"] == n  # the semaphore was set: the program saw the probe enabled
    assert c[10] == n
    assert c[11] == threads * tri(calls)
    assert c[12] == calls * 3 * tri(threads)


def test_launch_syscall_tracepoints(bpf_build, workload):
    threads, calls = 2, 5000
    ppid = os.getpid()
    with hybrid.load(build(bpf_build, "sys", SYSCALLS, exe=workload, ppid=ppid)) as obj:
        with obj.launch([workload, "sys", str(threads), str(calls)], stdout=subprocess.PIPE, text=True) as p:
            out, _ = p.popen.communicate(timeout=60)
        res = run_line(out)
        c = counts(obj)
    n = threads * calls * 2  # getppid() and syscall(SYS_getppid)
    assert res["sys"] == n
    assert c[13] == c[14] == n
    assert c[15] == c[16] == n
    assert c[17] == c[18] == n


def test_launch_override_return(bpf_build, workload):
    with hybrid.load(build(bpf_build, "override", OVERRIDE, exe=workload)) as obj:
        with obj.launch([workload, "add", "1", "1"], stdout=subprocess.PIPE, text=True) as p:
            out, _ = p.popen.communicate(timeout=60)
    assert run_line(out)["guarded"] == 1021


# --- on a running process ----------------------------------------------------------------


class Interactive:
    def __init__(self, workload: str):
        self.p = subprocess.Popen([workload, "-i"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.p.stdout.readline().startswith("ready")

    def run(self, mode: str, threads: int, calls: int) -> dict[str, int]:
        self.p.stdin.write("%s %d %d\n" % (mode, threads, calls))
        self.p.stdin.flush()
        return run_line(self.p.stdout.readline())

    def close(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait()


@pytest.fixture
def interactive(workload):
    w = Interactive(workload)
    yield w
    w.close()


def _code_of(pid: int, exe: str, func: str, n: int = 16) -> bytes:
    from hybrid.user.attach import symbols

    bias = symbols.module_load_bias(pid, exe)
    return symbols.read_process_memory(pid, bias + symbols.resolve_symbol(exe, func).vaddr, n)


def test_attach_running_process_and_detach(bpf_build, workload, interactive):
    with hybrid.load(build(bpf_build, "add_pid", ADD, exe=workload)) as obj:
        before = interactive.run("add", 2, 1000)
        pristine = _code_of(interactive.p.pid, workload, "add")
        att = obj.attach(interactive.p.pid)
        assert _code_of(interactive.p.pid, workload, "add")[0] == 0xE9  # jmp to the trampoline
        during = interactive.run("add", 2, 10_000)
        c = counts(obj)
        assert c[0] == c[3] == 20_000
        assert c[4] == during["add"]
        att.detach()
        assert _code_of(interactive.p.pid, workload, "add") == pristine  # every byte restored
        after = interactive.run("add", 2, 10_000)
        assert counts(obj)[0] == 20_000  # nothing counted after detach
        assert after == during and before["add"] == 2 * tri(1000) + 1000
        # attach again to the same process: the agent is already there
        att = obj.attach(interactive.p.pid)
        interactive.run("add", 1, 500)
        assert counts(obj)[0] == 20_500
        att.detach()
    assert interactive.p.poll() is None  # the target lives on


def _libc_of(pid: int) -> str:
    with open("/proc/%d/maps" % pid) as f:
        return next(line.split()[-1] for line in f if "/libc.so" in line or "/libc-" in line)


def test_attach_running_process_syscalls_and_usdt(bpf_build, workload, interactive):
    pid = interactive.p.pid
    libc = _libc_of(pid)
    pristine = _code_of(pid, libc, "getppid", 32)
    with hybrid.load(build(bpf_build, "mix_pid", USDT + SYSCALLS, exe=workload, ppid=os.getpid())) as obj:
        att = obj.attach(pid)
        assert _code_of(pid, libc, "getppid", 32) != pristine  # libc's syscall site is hooked
        res = interactive.run("all", 2, 3000)
        c = counts(obj)
        att.detach()
        assert res["usdt"] == c[10] == 6000
        assert c[13] == c[15] == c[17] == res["sys"] == 12_000
        # the last syscall probe gone, libc's syscall sites are restored: the process pays nothing more
        assert _code_of(pid, libc, "getppid", 32) == pristine
        interactive.run("all", 1, 100)
        assert counts(obj)[10] == 6000 and counts(obj)[13] == 12_000
        att = obj.attach(pid)  # and hooked again by the next attach
        assert _code_of(pid, libc, "getppid", 32) != pristine
        res = interactive.run("all", 1, 100)
        att.detach()
        assert counts(obj)[13] == 12_000 + res["sys"] and _code_of(pid, libc, "getppid", 32) == pristine


# --- bad input: clear errors, target untouched -------------------------------------------------


def test_attach_missing_pid(bpf_build, workload):
    with hybrid.load(build(bpf_build, "add_nopid", ADD, exe=workload)) as obj:
        with pytest.raises(AttachError, match="no process 99999999"):
            obj.attach(99999999)


def test_attach_without_permission(bpf_build, workload, interactive, tmp_path):
    """Not root: ptrace is refused, the error says so, the target is untouched."""
    import shutil

    d = tmp_path / "nobody"
    d.mkdir()
    obj = d / "add.bpf.o"
    shutil.copy(build(bpf_build, "add_perm", ADD, exe=workload), obj)
    os.chmod(tmp_path, 0o755)
    os.chmod(d, 0o755)
    os.chmod(obj, 0o644)
    code = ("import os, sys, hybrid, hybrid.errors, threading, subprocess, tempfile, shutil\n"
            "import hybrid.user.attach.agent, hybrid.user.attach.inject, hybrid.user.attach.symbols\n"
            "import hybrid.user.attach.x86, hybrid.user.attach.usdt, hybrid.user.aot, hybrid.user.jit\n"
            "obj = hybrid.load(sys.argv[1])\n"
            "os.setgid(65534); os.setuid(65534)\n"
            "try:\n    obj.attach(int(sys.argv[2]))\n"
            "except hybrid.errors.HybridError as e:\n    print(type(e).__name__, e); sys.exit(3)\n")
    env = dict(os.environ, HOME=str(d), XDG_CACHE_HOME=str(d / "cache"))
    r = subprocess.run([sys.executable, "-c", code, str(obj), str(interactive.p.pid)], capture_output=True,
                       text=True, timeout=120, env=env, cwd=str(d))
    assert r.returncode == 3, (r.stdout, r.stderr)
    assert "not permitted" in r.stdout or "Permission denied" in r.stdout, r.stdout
    assert str(interactive.p.pid) in r.stdout
    assert interactive.run("add", 1, 10)["add"] == tri(10)


def test_attach_missing_symbol(bpf_build, workload, interactive):
    body = ADD.replace(":add", ":no_such_function")
    with hybrid.load(build(bpf_build, "nosym", body, exe=workload)) as obj:
        with pytest.raises(AttachError, match="no_such_function"):
            obj.attach(interactive.p.pid)
    assert interactive.run("add", 1, 10)["add"] == tri(10)


def test_attach_missing_library(bpf_build, workload):
    body = ADD.replace("{exe}", "libdoesnotexist.so.3")
    with hybrid.load(build(bpf_build, "nolib", body, exe=workload)) as obj:
        with pytest.raises(AttachError, match="libdoesnotexist"):
            obj.attach()


def test_function_too_short_is_refused(bpf_build, workload, interactive):
    """A function that is a lone `ret`: a 5-byte jump would run past its end into the next one."""
    lib = Path(workload).parent / "libshort.so"
    src = Path(workload).parent / "short.c"
    src.write_text("void tiny(void) {}\nlong other(long a) { return a * 3; }\n")
    subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", str(lib), str(src)], check=True)
    body = ADD.replace("{exe}:add", str(lib) + ":tiny")
    with hybrid.load(build(bpf_build, "tiny", body, exe=workload)) as obj:
        with pytest.raises(AttachError, match="tiny"):
            obj.launch([workload, "add", "1", "1"])


# --- events from the target reach the controller through shared memory ---------------------

EVENTS = r"""
struct {{
    __uint(type, BPF_MAP_TYPE_RINGBUF);
    __uint(max_entries, 4 << 20);
}} events SEC(".maps");

struct {{
    __uint(type, BPF_MAP_TYPE_RINGBUF);
    __uint(max_entries, 4096);
}} small SEC(".maps");

struct {{
    __uint(type, BPF_MAP_TYPE_PERF_EVENT_ARRAY);
    __uint(key_size, sizeof(u32));
    __uint(value_size, sizeof(u32));
}} perf SEC(".maps");

struct event {{ long a, b; u32 tid; }};

SEC("uprobe/{exe}:add")
int BPF_KPROBE(on_add_event, long a, long b)
{{
    struct event e = {{ .a = a, .b = b, .tid = (u32)bpf_get_current_pid_tgid() }};
    bpf_ringbuf_output(&events, &e, sizeof(e), 0);
    bpf_ringbuf_output(&small, &e, sizeof(e), 0);   /* fills up: counted as lost */
    if ((u64)a % 100 == 0)
        bpf_perf_event_output(ctx, &perf, BPF_F_CURRENT_CPU, &e, sizeof(e));
    if (a == 7 && b == 0)
        bpf_printk("hybrid add %ld %ld", a, b);
    return 0;
}}
"""


def test_events_from_the_target(bpf_build, workload, tmp_path):
    import struct

    from hybrid.user.maps import PerfBufferConsumer, RingBufferConsumer

    threads, calls = 2, 20_000
    trace = tmp_path / "trace"
    seen: list[tuple[int, int]] = []

    def on_event(data: bytes) -> int:
        a, b, _tid = struct.unpack_from("<qqI", data)
        seen.append((a, b))
        return 0

    env = dict(os.environ, HYBRID_TRACE_PIPE=str(trace))
    with hybrid.load(build(bpf_build, "events", EVENTS, exe=workload)) as obj:
        rb = RingBufferConsumer(obj.maps["events"], on_event)
        perf_seen: list[tuple[int, int]] = []
        pb = PerfBufferConsumer(obj.maps["perf"], lambda cpu, d: perf_seen.append(struct.unpack_from("<qq", d)))
        with obj.launch([workload, "add", str(threads), str(calls)], stdout=subprocess.PIPE, text=True,
                        env=env) as p:
            while p.popen.poll() is None:
                rb.poll(50)
                pb.consume()
            out, _ = p.popen.communicate(timeout=60)
        rb.consume()
        pb.consume()
        perf_lost = pb.lost
        pb.close()
        lost = obj.maps["events"].lost
        small_lost = obj.maps["small"].lost
        small_kept = RingBufferConsumer(obj.maps["small"], lambda d: None).consume()
    assert run_line(out)["add"] == threads * tri(calls) + calls * tri(threads)
    assert sorted(seen) == sorted((i, t) for t in range(threads) for i in range(calls))
    assert lost == 0
    assert perf_lost == 0
    assert sorted(perf_seen) == sorted((i, t) for t in range(threads) for i in range(0, calls, 100))
    # a full buffer counts what it could not take: nothing vanishes silently
    assert small_lost > 0 and small_kept + small_lost == threads * calls
    lines = trace.read_text().splitlines()
    assert len(lines) == 1 and "hybrid add 7 0" in lines[0], lines


# --- a Python process ------------------------------------------------------------------------

PY_GETPPID = r"""
SEC("uprobe/libc.so.6:getppid")
int on_getppid(struct pt_regs *ctx)
{{
    add_to(0, 1);
    return 0;
}}
"""


def test_python_process(bpf_build, tmp_path):
    code = "import os\nfor _ in range(12345):\n    os.getppid()\nprint('done')\n"
    with hybrid.load(build(bpf_build, "py", PY_GETPPID)) as obj:
        with obj.launch([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) as p:
            out, _ = p.popen.communicate(timeout=60)
        assert out.strip() == "done"
        assert counts(obj)[0] == 12345


# --- the command line -------------------------------------------------------------------------


def test_cli_run_prints_maps(bpf_build, workload):
    obj = build(bpf_build, "add_cli", ADD, exe=workload)
    r = subprocess.run([sys.executable, "-m", "hybrid.cli", "run", str(obj), "--", workload, "add", "2", "100"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert run_line(r.stdout.splitlines()[0])["add"] == 2 * tri(100) + 100
    assert "@counts[0]: 200" in r.stdout and "@counts[3]: 200" in r.stdout


def test_cli_attach_and_detach(bpf_build, workload, interactive):
    obj = build(bpf_build, "add_cli2", ADD, exe=workload)
    pid = interactive.p.pid
    cli = subprocess.Popen([sys.executable, "-m", "hybrid.cli", "attach", str(obj), "-p", str(pid)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        while "attached; Ctrl-C" not in line:  # not "not attached: ..." lines: Ctrl-C then hits the attach
            line = cli.stderr.readline()
            assert line, cli.communicate(timeout=10)
        interactive.run("add", 2, 50)
        cli.send_signal(2)  # Ctrl-C: detach and print
        out, err = cli.communicate(timeout=60)
    finally:
        if cli.poll() is None:
            cli.kill()
    assert cli.returncode == 0, err
    assert "detached" in err and "@counts[0]: 100" in out
    assert interactive.run("add", 1, 10)["add"] == tri(10)  # still runs, no probe left
    r = subprocess.run([sys.executable, "-m", "hybrid.cli", "detach", "-p", str(pid)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
