"""tools/bcc_ports/syscount.py against Debian's syscount-bpfcc on one workload process: getppid counted
exactly as often as the workload called it, on both, with bcc's header and columns; -L, -P, -x, -e,
--syscall, kernel mode, a started command, errors."""

from __future__ import annotations

import os
import re

import pytest

from tests.tools import SYSCOUNT_BCC, Workload, build_workload, have, port, run_tool, trace_round

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="probes in other processes and kernel tracepoints need "
                                                         "root")

S = 3000  # getppid calls
TIME = re.compile(r"^\[\d\d:\d\d:\d\d\]$")


@pytest.fixture(scope="module")
def exe(tmp_path_factory):
    return build_workload(tmp_path_factory.mktemp("syscount"))


@pytest.fixture
def workload(exe):
    w = Workload(exe)
    yield w
    w.close()


def table(out: str, latency: bool = False, ms: bool = False) -> tuple[str, dict[str, tuple]]:
    """(header, {name: (count[, time])}) of the one report in ``out``, each row checked against bcc's format."""
    lines = out.splitlines()
    i = next(n for n, line in enumerate(lines) if TIME.match(line))
    header = lines[i + 1]
    rows = {}
    for line in lines[i + 2:]:
        if not line:
            break
        if latency:
            m = re.match(r"^(.{22}) +(\d+) +(\d+\.\d+)$", line)
            assert m, line
            name, count, t = m.group(1).rstrip(), int(m.group(2)), float(m.group(3))
            assert line == ("%-22s %8d " + ("%16.6f" if ms else "%16.3f")) % (m.group(1).rstrip(), count, t)
            rows[name] = (count, t)
        else:
            m = re.match(r"^(.{22}) +(\d+)$", line)
            assert m, line
            assert line == "%-22s %8d" % (m.group(1).rstrip(), int(m.group(2))), line
            rows[m.group(1).rstrip()] = (int(m.group(2)),)
    assert lines[-1] == "Detaching...", out
    return header, rows


def test_same_getppid_count_and_layout_as_bcc(workload):
    if not have(SYSCOUNT_BCC):
        pytest.skip("Debian's bcc tools are not installed")
    results = {}
    for name, argv in (("bcc", [SYSCOUNT_BCC, "-p", str(workload.pid)]),
                       ("port", port("syscount") + ["-p", str(workload.pid)])):
        rc, out, err = trace_round(argv, workload, getppid=S, fail=7)
        assert rc == 0, (name, out, err)
        assert out.splitlines()[0] == "Tracing syscalls, printing top 10... Ctrl+C to quit.", out
        header, rows = table(out)
        assert header == "SYSCALL                   COUNT"
        assert rows["getppid"] == (S,), (name, out)
        assert rows["close"][0] >= 7, (name, out)
        results[name] = rows
    # bcc sees exactly the workload's 7 failed close(-1); the port also the agent's own close() calls made
    # in the process while it attaches and detaches (the kernel would see them too)
    assert results["bcc"]["close"] == (7,)


def test_latency_like_bcc(workload):
    if not have(SYSCOUNT_BCC):
        pytest.skip("Debian's bcc tools are not installed")
    for name, argv in (("bcc", [SYSCOUNT_BCC, "-L", "-m", "--syscall", "getppid", "-p", str(workload.pid)]),
                       ("port", port("syscount") + ["-L", "-m", "--syscall", "getppid", "-p", str(workload.pid)])):
        rc, out, err = trace_round(argv, workload, getppid=S)
        assert rc == 0, (name, out, err)
        assert out.splitlines()[0] == "Tracing syscall 'getppid'... Ctrl+C to quit."
        header, rows = table(out, latency=True, ms=True)
        assert header == "SYSCALL                   COUNT        TIME (ms)"
        assert list(rows) == ["getppid"] and rows["getppid"][0] == S, (name, out)
        assert 0 < rows["getppid"][1] < 1000


def test_failures_errno_process(workload):
    rc, out, err = trace_round(port("syscount") + ["-x", "-p", str(workload.pid)], workload, settle=0,
                               getppid=50, fail=40)
    assert rc == 0, err
    assert out.splitlines()[0] == "Tracing failed syscalls, printing top 10... Ctrl+C to quit."
    _, rows = table(out)
    assert rows["close"] == (40,) and "getppid" not in rows
    rc, out, err = trace_round(port("syscount") + ["-e", "EBADF", "-L", "-p", str(workload.pid)], workload,
                               getppid=50, fail=30)
    assert rc == 0, err
    header, rows = table(out, latency=True)
    assert header == "SYSCALL                   COUNT        TIME (us)"
    assert rows["close"][0] == 30 and "getppid" not in rows
    rc, out, err = trace_round(port("syscount") + ["-P", "-p", str(workload.pid)], workload, getppid=S)
    assert rc == 0, err
    header, rows = table(out)
    assert header == "%-22s %8s" % ("PID    COMM", "COUNT")
    ((key, (count,)),) = rows.items()
    assert key == ("%-6d %-15s" % (workload.pid, "hybrid-tools-wo")).rstrip() and count >= S


@pytest.mark.parametrize("mode", ["user", "kernel"])
def test_command_counts(exe, mode):
    """A started command: in the process (user) or on the kernel's raw tracepoints, the same getppid count."""
    rc, out, err = run_tool(port("syscount") + ["--mode", mode, "--", exe], stdin="0 0 0 0 %d 0\nq\n" % S)
    assert rc == 0, (out, err)
    _, rows = table(out)
    assert rows["getppid"] == (S,), out


def test_kernel_mode_pid(workload):
    rc, out, err = trace_round(port("syscount") + ["--mode", "kernel", "-L", "-p", str(workload.pid)], workload,
                               getppid=S)
    assert rc == 0, err
    _, rows = table(out, latency=True)
    assert rows["getppid"][0] == S


def test_list_ebpf_and_errors():
    rc, out, err = run_tool(port("syscount") + ["-l"])
    assert rc == 0 and "getppid" in out.split(), out
    names = []
    for line in out.splitlines():  # bcc's layout: four columns of %-22s joined by three spaces
        row = line.split()
        assert 1 <= len(row) <= 4 and line == "   ".join("%-22s" % n for n in row), line
        names += row
    assert names == sorted(names)
    if have(SYSCOUNT_BCC):  # bcc's table is older: ours has every name it has
        rc, bcc_out, _ = run_tool([SYSCOUNT_BCC, "-l"])
        assert rc == 0 and set(bcc_out.split()) <= set(names)
    rc, out, err = run_tool(port("syscount") + ["--ebpf"])
    assert rc == 0 and 'SEC("raw_tp/sys_exit")' in out and '#include "vmlinux.h"' in out
    rc, out, err = run_tool(port("syscount") + ["-p", "999999"])
    assert (rc, out, err.strip()) == (1, "", "Error: no process with PID 999999")
    rc, out, err = run_tool(port("syscount") + ["--syscall", "nosuch"])
    assert (rc, err.strip()) == (1, "Error: syscall 'nosuch' not found. Exiting.")
