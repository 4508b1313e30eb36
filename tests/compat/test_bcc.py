"""``hybrid bcc -- TOOL ARGS``: Debian's funclatency-bpfcc, unmodified, with its uprobes inside the traced
process: funclatency's own output with exact counts, the probes in the process (a jmp at the function, the
agent mapped, no kernel uprobe), the target restored afterwards; ``-i`` intervals (the tool's clear() reaches
the process's maps); a wildcard pattern; the kernel fallback with its one-line reason.  And bcc's table API
on mirrored maps, in this process."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.tools import (FUNCLATENCY_BCC, ROOT, Workload, build_workload, check_hist_layout, have, hist_lines,
                         tool_env)

root = pytest.mark.skipif(os.geteuid() != 0, reason="bcc, kernel uprobes and probes in another process need root")
bcc_tools = pytest.mark.skipif(not have(FUNCLATENCY_BCC), reason="Debian's bcc tools are not installed")

HYBRID_BCC = [sys.executable, "-m", "hybrid.cli", "bcc", "--"]
AVG = re.compile(r"^avg = \d+ (nsecs|usecs|msecs), total: \d+ \1, count: (\d+)$", re.M)
N = 20000


@pytest.fixture(scope="module")
def exe(tmp_path_factory):
    return build_workload(tmp_path_factory.mktemp("compat_bcc"))


@pytest.fixture
def workload(exe):
    w = Workload(exe)
    yield w
    w.close()


def start(argv: list[str]) -> tuple[subprocess.Popen, str]:
    """The tool under ``hybrid bcc``, once it printed its "Tracing" line (returned)."""
    tool = subprocess.Popen(HYBRID_BCC + argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=tool_env(), cwd=str(ROOT))
    first = tool.stdout.readline()
    if not first.startswith("Tracing"):
        out, err = tool.communicate(timeout=60)
        pytest.fail("the tool did not start: %s%s\n%s" % (first, out, err))
    return tool, first


def finish(tool: subprocess.Popen, settle: float = 0.2) -> tuple[int, str, str]:
    time.sleep(settle)  # bcc is in its sleep() (where it takes Ctrl-C) a moment after its "Tracing" line
    tool.send_signal(signal.SIGINT)
    out, err = tool.communicate(timeout=60)
    return tool.returncode, out, err


def function_address(pid: int, exe: str, name: str) -> tuple[int, bytes]:
    """Where function ``name`` of ``exe`` is in process ``pid``, and its first 5 bytes in the file."""
    from hybrid.user.attach import symbols

    sym = symbols.resolve_symbol(exe, name)
    return symbols.module_load_bias(pid, exe) + sym.vaddr, symbols.read_code(exe, sym.vaddr, 5)


def code_at(pid: int, addr: int, n: int = 5) -> bytes:
    with open("/proc/%d/mem" % pid, "rb") as f:
        f.seek(addr)
        return f.read(n)


def kernel_uprobes_on(path: str) -> list[str]:
    """Kernel uprobes on ``path``: perf events with a BPF program (bpftool perf), uprobe_events lines.
    (bcc names a traced process's file /proc/PID/root/PATH.)"""
    found = []
    bpftool = shutil.which("bpftool") or "/usr/sbin/bpftool"
    if os.access(bpftool, os.X_OK):
        r = subprocess.run([bpftool, "-j", "perf", "list"], capture_output=True, text=True, timeout=30)
        if r.returncode == 0 and r.stdout.strip():
            found += ["%s %s" % (e.get("fd_type"), e.get("filename")) for e in json.loads(r.stdout)
                      if str(e.get("filename", "")).endswith(path)]
    for events in ("/sys/kernel/tracing/uprobe_events", "/sys/kernel/debug/tracing/uprobe_events"):
        try:
            with open(events) as f:
                found += [line.strip() for line in f if path in line]
            break
        except OSError:
            continue
    return found


def check_output(out: str, pattern: str, functions: int, expected: int) -> None:
    lines = out.splitlines()
    assert lines[0] == 'Tracing %d functions for "%s"... Hit Ctrl-C to end.' % (functions, pattern), out
    assert "     nsecs               : count     distribution" in lines, out
    assert lines[-1] == "Detaching...", out
    rows = check_hist_layout(hist_lines(out))
    assert rows[0][:2] == (0, 1)
    assert sum(r[2] for r in rows) == expected, out
    m = AVG.search(out)
    assert m and int(m.group(2)) == expected, out


@root
@bcc_tools
def test_funclatency_probes_run_in_the_process(exe, workload):
    pattern = "%s:work" % exe
    addr, original = function_address(workload.pid, exe, "work")
    tool, first = start([FUNCLATENCY_BCC, "-p", str(workload.pid), pattern])
    try:
        # attached: a jmp at work(), hybrid's agent in the process, no kernel uprobe on the executable
        assert code_at(workload.pid, addr)[:1] == b"\xe9"
        with open("/proc/%d/maps" % workload.pid) as f:
            assert "libhybrid_agent" in f.read()
        assert kernel_uprobes_on(os.path.realpath(exe)) == []
        workload.round(work=N)
        rc, out, err = finish(tool)
    finally:
        if tool.poll() is None:
            tool.kill()
            tool.wait()
    assert rc == 0, (out, err)
    check_output(first + out, pattern, 1, N)
    assert "a kernel uprobe" not in err and "a kernel uretprobe" not in err, err
    # the tool is gone: work() is as it was, and the workload runs on
    assert code_at(workload.pid, addr) == original
    workload.round(work=10)


@root
@bcc_tools
def test_interval_clears_reach_the_process(exe, workload):
    """-i 1: funclatency prints and clear()s its tables every second; each interval has exactly its calls."""
    pattern = "%s:work" % exe
    tool, first = start([FUNCLATENCY_BCC, "-i", "1", "-p", str(workload.pid), pattern])
    try:
        counts = []
        for n in (3000, 5000):
            # an interval ends with a blank line, then the histogram, avg and clear(): run the calls just
            # after an empty interval, far from the next one
            while tool.stdout.readline() != "\n":
                pass
            time.sleep(0.1)
            workload.round(work=n)
            text = ""
            while True:
                line = tool.stdout.readline()
                assert line, text
                text += line
                m = AVG.search(line)
                if m:
                    counts.append((int(m.group(2)), sum(r[2] for r in check_hist_layout(hist_lines(text)))))
                    break
        rc, out, err = finish(tool)  # (once it is back in its sleep after the clear())
    finally:
        if tool.poll() is None:
            tool.kill()
            tool.wait()
    assert rc == 0, err
    assert counts == [(3000, 3000), (5000, 5000)], counts


@root
@bcc_tools
def test_wildcard_pattern(exe, workload):
    """'work*': bcc's attach_uprobe(sym_re=...) attaches each match (work, work2): both in the process."""
    pattern = "%s:work*" % exe
    tool, first = start([FUNCLATENCY_BCC, "-p", str(workload.pid), pattern])
    try:
        assert kernel_uprobes_on(os.path.realpath(exe)) == []
        workload.round(work=3000, work2=2000)
        rc, out, err = finish(tool)
    finally:
        if tool.poll() is None:
            tool.kill()
            tool.wait()
    assert rc == 0, err
    check_output(first + out, pattern, 2, 5000)
    assert "a kernel u" not in err, err


@root
@bcc_tools
@pytest.mark.parametrize("how", ["system-wide", "mode-kernel"])
def test_kernel_fallback_says_why(exe, workload, how):
    """No -p (every process) or --mode kernel: kernel uprobes, one stderr line per probe saying why, and
    funclatency's own output."""
    pattern = "%s:work2" % exe
    argv = [FUNCLATENCY_BCC, pattern] if how == "system-wide" else \
        [FUNCLATENCY_BCC, "-p", str(workload.pid), pattern]
    if how == "mode-kernel":
        HYBRID = HYBRID_BCC[:-1] + ["--mode", "kernel", "--"]
        tool = subprocess.Popen(HYBRID + argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=tool_env(), cwd=str(ROOT))
        first = tool.stdout.readline()
    else:
        tool, first = start(argv)
    try:
        assert first.startswith("Tracing 1 functions"), first
        assert kernel_uprobes_on(os.path.realpath(exe)), "no kernel uprobe on the executable"
        workload.round(work2=1000)
        rc, out, err = finish(tool)
    finally:
        if tool.poll() is None:
            tool.kill()
            tool.wait()
    assert rc == 0, err
    why = "no process given" if how == "system-wide" else "--mode kernel"
    notes = [line for line in err.splitlines() if line.startswith("hybrid bcc: ")]
    assert len(notes) == 2, err
    assert notes[0].startswith("hybrid bcc: uprobe trace_func_entry at "), notes
    assert ":work2: a kernel uprobe: %s" % why in notes[0], notes
    assert notes[1].startswith("hybrid bcc: uretprobe trace_func_return at "), notes
    hist = hist_lines(out)
    assert sum(r[2] for r in check_hist_layout(hist)) == 1000, out
    assert int(AVG.search(out).group(2)) == 1000


TABLES = r"""
#include <uapi/linux/ptrace.h>
BPF_HASH(calls, u32, u64);
BPF_ARRAY(total, u64, 4);
BPF_PERCPU_ARRAY(pc, u64, 2);
BPF_PERF_OUTPUT(events);

int on_work(struct pt_regs *ctx)
{
    if ((bpf_get_current_pid_tgid() >> 32) != TGID)
        return 0;
    u32 k = 1;
    calls.increment(k);
    total.atomic_increment(0);
    total.atomic_increment(1, PT_REGS_PARM1(ctx));
    pc.increment(0);
    return 0;
}

int on_work2(struct pt_regs *ctx)
{
    u64 x = PT_REGS_PARM1(ctx);
    events.perf_submit(ctx, &x, sizeof(x));
    return 0;
}
"""


@root
@bcc_tools
def test_bcc_tables_on_mirrored_maps(exe, workload, capfd):
    """In this process: bcc's table API (reads, writes, clear, delete, batch delete) on maps the process's
    programs write; a perf buffer program stays in the kernel and says why; detach keeps the counts."""
    bcc = pytest.importorskip("bcc")
    from hybrid.compat import bcc as hb

    hb.install()
    b = None
    try:
        b = bcc.BPF(text=TABLES.replace("TGID", str(workload.pid)).encode())
        b.attach_uprobe(name=exe.encode(), sym=b"work", fn_name=b"on_work", pid=workload.pid)
        b.attach_uprobe(name=exe.encode(), sym=b"work2", fn_name=b"on_work2", pid=workload.pid)
        err = capfd.readouterr().err
        assert "uprobe on_work2 at %s:work2: a kernel uprobe: it writes perf buffer 'events'" % exe in err, err
        assert "cannot write into a kernel perf buffer" in err and "on_work " not in err, err
        assert sorted(v == hb.USER_FD for v in b.uprobe_fds.values()) == [False, True]
        assert b.num_open_uprobes() == 2
        calls, total, pc = b[b"calls"], b[b"total"], b[b"pc"]
        one = calls.Key(1)

        workload.round(work=1000, work2=3)
        assert calls[one].value == 1000
        assert (total[0].value, total[1].value) == (1000, sum(range(1000)))
        assert pc.sum(0).value == 1000 and len(list(pc.getvalue(0))) == pc.total_cpu
        # the tool's writes reach the process's maps
        calls[one] = calls.Leaf(5)
        total[0] = total.Leaf(100)
        workload.round(work=10)
        assert (calls[one].value, total[0].value) == (15, 110)
        calls.clear()
        total.clear()
        pc.clear()
        workload.round(work=7)
        assert [(k.value, v.value) for k, v in calls.items()] == [(1, 7)]
        assert (total[0].value, pc.sum(0).value) == (7, 7)
        del calls[one]
        assert len(calls) == 0
        with pytest.raises(KeyError):
            del calls[one]
        workload.round(work=3)
        assert [(k.value, v.value) for k, v in calls.items_lookup_batch()] == [(1, 3)]
        assert [(k.value, v.value) for k, v in calls.items_lookup_and_delete_batch()] == [(1, 3)]
        assert len(calls) == 0
        workload.round(work=2)
        # the kernel map has it too after a push (a tool reading it some other way)
        b._hybrid.sync()
        from hybrid.kernel.maps import KernelMap

        with KernelMap.from_fd(calls.map_fd) as km:
            assert int.from_bytes(km.lookup(bytes(one)), "little") == 2
        # detach: no more counts, the code is restored; the counts stay readable
        addr, original = function_address(workload.pid, exe, "work")
        assert code_at(workload.pid, addr)[:1] == b"\xe9"
        b.detach_uprobe(name=exe.encode(), sym=b"work", pid=workload.pid)
        assert code_at(workload.pid, addr) == original
        workload.round(work=5)
        assert calls[one].value == 2 and b.num_open_uprobes() == 1
    finally:
        if b is not None:
            b.cleanup()
        hb.uninstall()


def test_not_a_bcc_tool(tmp_path):
    """One line, exit status 2, before anything runs: a tool that is not found, or not a Python script."""
    r = subprocess.run(HYBRID_BCC + ["no-such-bcc-tool"], capture_output=True, text=True, cwd=str(ROOT))
    assert (r.returncode, r.stdout) == (2, "")
    assert r.stderr.strip() == "hybrid: HybridError: bcc tool no-such-bcc-tool: not found in PATH"
    script = tmp_path / "tool.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    r = subprocess.run(HYBRID_BCC + [str(script)], capture_output=True, text=True, cwd=str(ROOT))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "is not a Python script: hybrid bcc runs bcc's Python tools" in r.stderr
    r = subprocess.run(HYBRID_BCC[:-1], capture_output=True, text=True, cwd=str(ROOT))
    assert r.returncode == 2 and "no tool given" in r.stderr


@root
@bcc_tools
def test_map_shared_with_a_kernel_program(exe, workload, capfd):
    """A program in the process, then the same program as a kernel uprobe (every process): its maps are
    then shared through bpf() (the object rebuilt, stderr says so), and both sides' counts add up exactly."""
    bcc = pytest.importorskip("bcc")
    from hybrid.compat import bcc as hb

    hb.install()
    b = None
    try:
        b = bcc.BPF(text=TABLES.replace("TGID", str(workload.pid)).encode())
        b.attach_uprobe(name=exe.encode(), sym=b"work", fn_name=b"on_work", pid=workload.pid)
        inst = b._hybrid
        assert set(inst.roles.values()) == {"mirror"}
        calls, total, pc = b[b"calls"], b[b"total"], b[b"pc"]
        one = calls.Key(1)
        workload.round(work=100)
        assert calls[one].value == 100
        b.attach_uprobe(name=exe.encode(), sym=b"work2", fn_name=b"on_work", pid=-1)
        err = capfd.readouterr().err
        assert "uprobe on_work at %s:work2: a kernel uprobe: no process given" % exe in err, err
        assert re.search(r"on_work now runs in the kernel too, and maps ('\w+', ){2}'\w+' are used on both sides: "
                         r"placing the userspace probes again with those maps shared through bpf\(\)", err), err
        assert set(inst.roles.values()) == {"bridge"} and inst.mirrors == {}
        assert b.num_open_uprobes() == 2
        workload.round(work=10, work2=5)
        assert (calls[one].value, total[0].value, pc.sum(0).value) == (115, 115, 115)
        assert total[1].value == sum(range(100)) + sum(range(10)) + sum(range(5))
    finally:
        if b is not None:
            b.cleanup()
        hb.uninstall()
