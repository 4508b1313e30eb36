#!/usr/bin/env python3
"""What the funclatency and syscount ports cost the traced process, against Debian's bcc tools.

A C workload (built here with gcc -O2) waits on stdin, then times its own loop
with CLOCK_MONOTONIC and prints the time:

``work``       10,000,000 calls of a noinline function whose first instruction is a
               ``lea`` (the kernel single-steps it out of line: its slow uprobe path)
``work_push``  10,000,000 calls of one that starts with ``push %rbx`` (the kernel
               emulates it: its fast path for an ordinary function prologue)
``getppid``    1,000,000 ``syscall(SYS_getppid)``

each three ways: untraced; under ``funclatency-bpfcc -p PID exe:FUNC`` /
``syscount-bpfcc -p PID``; under the port in user mode
(``tools/bcc_ports/funclatency.py -p PID exe:FUNC`` / ``syscount.py -p PID``, the
probes inside the process).  For getppid a second process runs the same loop,
untraced, while the tool is attached to the first (before the first's loop): what
each tool adds to a process it does not trace.  Loop times are medians of ``--repeat``
runs (1 by default: bcc takes ~17 us a call on ``work``, nearly 3 minutes for 10M
calls; ``--bcc-calls`` runs bcc on fewer, the times being per call) and of
``--syscall-repeat`` runs for getppid (5), the three ways interleaved run after run.
The tools are attached before the loop starts (the workload waits until the tool
prints its "Tracing" line) and stopped with Ctrl-C after it; their counts are checked
to be exactly the calls made.  "added" is (traced loop time - untraced loop time) /
calls; the ratio is bcc's added time over the port's.

The measurement functions (:func:`cases`, :func:`measure_sides`) are also used by
``bench_tools.py``, the pyperf suite; this script prints a table.

    .venv/bin/python bench/bench_tools_funclatency.py [--calls N] [--bcc-calls N] [--syscalls N] [--quick]
                                                      [--only NAME ...]
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "build" / "bench" / "tools"
PYTHON = sys.executable
FUNCLATENCY_BCC = "/usr/sbin/funclatency-bpfcc"
SYSCOUNT_BCC = "/usr/sbin/syscount-bpfcc"
FUNCLATENCY_PORT = [PYTHON, str(ROOT / "tools" / "bcc_ports" / "funclatency.py")]
SYSCOUNT_PORT = [PYTHON, str(ROOT / "tools" / "bcc_ports" / "syscount.py")]
HYBRID_BCC = [PYTHON, "-m", "hybrid.cli", "bcc", "--"]  # bcc's own tool, its uprobes in the process
GOAL = 100.0  # funclatency: the port should add >= 100x less time per call than bcc

WORKLOAD_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/syscall.h>

/* lea first: a kernel uprobe single-steps it */
__attribute__((noinline)) long work(long x) { __asm__ volatile("" : "+r"(x)); return x * 2 + 1; }
/* push %rbx first (rbx is clobbered): a kernel uprobe emulates it */
__attribute__((noinline)) long work_push(long x) { __asm__ volatile("" : "+r"(x) : : "rbx"); return x * 2 + 1; }

int main(int argc, char **argv)
{
    const char *what = argv[1];
    long n = atol(argv[2]), acc = 0;
    char line[64];
    struct timespec a, b;

    printf("ready %d\n", getpid());
    fflush(stdout);
    if (!fgets(line, sizeof line, stdin))
        return 1;
    clock_gettime(CLOCK_MONOTONIC, &a);
    if (!strcmp(what, "work"))
        for (long i = 0; i < n; i++) acc += work(i);
    else if (!strcmp(what, "work_push"))
        for (long i = 0; i < n; i++) acc += work_push(i);
    else
        for (long i = 0; i < n; i++) acc += syscall(SYS_getppid);
    clock_gettime(CLOCK_MONOTONIC, &b);
    printf("ns %lld %ld\n", (long long)(b.tv_sec - a.tv_sec) * 1000000000LL + (b.tv_nsec - a.tv_nsec), acc);
    fflush(stdout);
    fgets(line, sizeof line, stdin);
    return 0;
}
"""


def build() -> str:
    from hybrid.user.toolchain import compile_c

    BUILD.mkdir(parents=True, exist_ok=True)
    src = BUILD / "tools_workload.c"
    if not src.exists() or src.read_text() != WORKLOAD_C:
        src.write_text(WORKLOAD_C)
    return compile_c(src, BUILD / "tools-workload")


def first_instruction(exe: str, func: str) -> str:
    out = subprocess.run(["objdump", "-d", "--no-show-raw-insn", exe], capture_output=True, text=True).stdout
    m = re.search(r"<%s>:\n\s+[0-9a-f]+:\s+(\S+)" % re.escape(func), out)
    return m.group(1) if m else "?"


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = str(ROOT)
    return env


def funclatency_count(out: str) -> int:
    m = re.search(r"count: (\d+)", out)
    return int(m.group(1)) if m else 0


def syscount_count(out: str) -> int:
    m = re.search(r"^getppid +(\d+)$", out, re.M)
    return int(m.group(1)) if m else 0


@dataclass(frozen=True)
class Case:
    """One workload and the two tools that trace it."""

    workload: str           # "work", "work_push", "getppid"
    tool: str               # "funclatency", "syscount"
    bcc: list[str]          # argv, "PID" replaced by the workload's pid
    port: list[str]
    count: Callable[[str], int]  # the number of events the tool's output reports
    other: bool = False     # also time an untraced process while the tool is attached
    hybrid_bcc: list[str] | None = None  # the bcc tool unmodified under `hybrid bcc` (probes in the process)


def cases(exe: str) -> list[Case]:
    return [
        Case("work", "funclatency", [FUNCLATENCY_BCC, "-p", "PID", exe + ":work"],
             FUNCLATENCY_PORT + ["-p", "PID", exe + ":work"], funclatency_count,
             hybrid_bcc=HYBRID_BCC + [FUNCLATENCY_BCC, "-p", "PID", exe + ":work"]),
        Case("work_push", "funclatency", [FUNCLATENCY_BCC, "-p", "PID", exe + ":work_push"],
             FUNCLATENCY_PORT + ["-p", "PID", exe + ":work_push"], funclatency_count,
             hybrid_bcc=HYBRID_BCC + [FUNCLATENCY_BCC, "-p", "PID", exe + ":work_push"]),
        Case("getppid", "syscount", [SYSCOUNT_BCC, "-p", "PID"], SYSCOUNT_PORT + ["-p", "PID"], syscount_count,
             other=True),
    ]


class Once(NamedTuple):
    seconds: float             # the loop, traced by the tool (or not)
    output: str                # what the tool printed
    other: float | None = None  # the same loop in another process, untraced, while the tool was attached


def _start(exe: str, what: str, n: int) -> subprocess.Popen:
    w = subprocess.Popen([exe, what, str(n)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = w.stdout.readline()
    assert line.startswith("ready"), line
    return w


def _go(w: subprocess.Popen) -> float:
    """Let a ready workload run its loop; the loop's seconds."""
    w.stdin.write("go\n")
    w.stdin.flush()
    m = re.match(r"ns (\d+)", w.stdout.readline())
    assert m, "the workload did not report its time"
    return int(m.group(1)) / 1e9


def run_once(exe: str, what: str, n: int, tool: list[str] | None, other: bool = False) -> Once:
    """One workload run, traced by ``tool`` (argv; "PID" is replaced) or not.  With ``other`` (and a
    tool), a second process runs the same loop untraced first, the tool attached to the first one."""
    w = _start(exe, what, n)
    o = _start(exe, what, n) if other and tool is not None else None
    t = None
    try:
        if tool is not None:
            argv = [str(w.pid) if a == "PID" else a for a in tool]
            t = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
                                 cwd=str(ROOT))
            first = t.stdout.readline()
            if not first.startswith("Tracing"):
                out, err = t.communicate()
                raise RuntimeError("%s: %s%s%s" % (" ".join(argv), first, out, err))
        other_s = _go(o) if o is not None else None
        seconds = _go(w)
        out = ""
        if t is not None:
            t.send_signal(signal.SIGINT)
            out, err = t.communicate(timeout=120)
            if t.returncode:
                raise RuntimeError("%s exited with %d: %s" % (tool[0], t.returncode, err))
        for p in (w, o):
            if p is not None:
                p.stdin.write("q\n")
                p.stdin.close()
                p.wait(10)
        return Once(seconds, out, other_s)
    finally:
        for p in (t, w, o):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()


class Measured(NamedTuple):
    times: list[float]         # loop seconds, one per run
    output: str                # the tool's output of the last run
    other: list[float]         # loop seconds of the untraced other process, one per run (if asked)


TOOL_ERRORS = (RuntimeError, AssertionError, OSError, subprocess.SubprocessError)  # a tool that failed to run


def measure_sides(exe: str, what: str, sides: dict, repeat: int) -> dict:
    """``repeat`` runs of :func:`run_once` for each side (name -> (calls, tool argv or None, other)),
    interleaved run after run (a system call's time drifts by tens of ns here): name -> :class:`Measured`,
    or the exception of a side whose tool failed (it is not run again)."""
    times: dict = {k: [] for k in sides}
    others: dict = {k: [] for k in sides}
    outs: dict = {}
    failed: dict = {}
    for _ in range(repeat):
        for k, (n, tool, other) in sides.items():
            if k in failed:
                continue
            try:
                r = run_once(exe, what, n, tool, other)
            except TOOL_ERRORS as e:
                failed[k] = e
                continue
            times[k].append(r.seconds)
            outs[k] = r.output
            if r.other is not None:
                others[k].append(r.other)
    return {k: failed[k] if k in failed else Measured(times[k], outs[k], others[k]) for k in sides}


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2


# --- the plain script: a table ---------------------------------------------------------


def measure_all(calls: int = 10_000_000, syscalls: int = 1_000_000, only: list[str] | None = None,
                repeat: int = 1, syscall_repeat: int = 5, bcc_calls: int | None = None) -> list[dict]:
    """One row per workload: loop seconds per call untraced / under bcc / under the port (medians of
    ``repeat`` runs, ``syscall_repeat`` for getppid: a system call's time varies by tens of ns here),
    added ns per call, and the counts each tool printed.  ``bcc_calls``: bcc's runs of the function
    workloads make that many calls instead (times are per call)."""
    exe = build()
    out = []
    for c in cases(exe):
        if only and c.workload not in only:
            continue
        sys_ = c.workload == "getppid"
        n = syscalls if sys_ else calls
        nb = n if sys_ or not bcc_calls else bcc_calls
        r = syscall_repeat if sys_ else repeat
        ms = measure_sides(exe, c.workload, {"untraced": (n, None, False), "bcc": (nb, c.bcc, c.other),
                                             "port": (n, c.port, c.other)}, r)
        for k, m in ms.items():
            if isinstance(m, Exception):
                raise m
        base, bcc, port = ms["untraced"], ms["bcc"], ms["port"]
        b, bs, ps = _median(base.times) / n, _median(bcc.times) / nb, _median(port.times) / n
        row = {"tool": c.tool, "workload": c.workload, "calls": n, "bcc_calls": nb, "runs": r,
               "first_insn": first_instruction(exe, c.workload) if not sys_ else "syscall",
               "untraced": b, "bcc": bs, "port": ps,
               "bcc_added_ns": (bs - b) * 1e9, "port_added_ns": (ps - b) * 1e9,
               "bcc_count": c.count(bcc.output), "port_count": c.count(port.output)}
        if c.other:
            row["bcc_other_ns"] = (_median(bcc.other) / nb - b) * 1e9
            row["port_other_ns"] = (_median(port.other) / n - b) * 1e9
        row["ratio"] = row["bcc_added_ns"] / row["port_added_ns"] if row["port_added_ns"] > 0 else float("inf")
        out.append(row)
        print("  %s: untraced %.1f ns/call, bcc %.1f, port %.1f" % (c.workload, b * 1e9, bs * 1e9, ps * 1e9),
              file=sys.stderr)
    return out


def table(rs: list[dict]) -> str:
    lines = ["| tool | workload (first insn) | calls (bcc) | untraced ns/call | bcc ns/call | port ns/call | "
             "bcc added ns/call | port added ns/call | bcc/port | counts bcc / port | added to another process "
             "(bcc / port) |",
             "|---|---|--:|--:|--:|--:|--:|--:|--:|---|---|"]
    for r in rs:
        ok = "exact" if (r["bcc_count"], r["port_count"]) == (r["bcc_calls"], r["calls"]) else "%d / %d" % (
            r["bcc_count"], r["port_count"])
        other = "%+.1f / %+.1f ns" % (r["bcc_other_ns"], r["port_other_ns"]) if "bcc_other_ns" in r else ""
        calls = format(r["calls"], ",") + ("" if r["bcc_calls"] == r["calls"] else " (%s)" % format(r["bcc_calls"],
                                                                                                  ","))
        lines.append("| %s | %s (`%s`) | %s | %.1f | %s | %.1f | %s | %.1f | %.0f× | %s | %s |" % (
            r["tool"], r["workload"], r["first_insn"], calls, r["untraced"] * 1e9,
            format(round(r["bcc"] * 1e9), ","), r["port"] * 1e9, format(round(r["bcc_added_ns"]), ","),
            r["port_added_ns"], r["ratio"], ok, other))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=10_000_000, help="function calls (default 10,000,000)")
    ap.add_argument("--bcc-calls", type=int, default=None, help="function calls under bcc (default: --calls)")
    ap.add_argument("--syscalls", type=int, default=1_000_000, help="getppid calls (default 1,000,000)")
    ap.add_argument("--quick", action="store_true", help="1,000,000 calls and 200,000 syscalls")
    ap.add_argument("--only", nargs="+", choices=["work", "work_push", "getppid"], help="some workloads only")
    ap.add_argument("--repeat", type=int, default=1, help="runs per function row, median (default 1)")
    ap.add_argument("--syscall-repeat", type=int, default=5, help="runs per getppid row, median (default 5)")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_tools_funclatency: needs root (bcc and probes in another process)", file=sys.stderr)
        return 2
    for tool in (FUNCLATENCY_BCC, SYSCOUNT_BCC):
        if not os.access(tool, os.X_OK):
            print("bench_tools_funclatency: %s is missing (apt-get install bpfcc-tools)" % tool, file=sys.stderr)
            return 2
    calls, syscalls = (1_000_000, 200_000) if args.quick else (args.calls, args.syscalls)
    t0 = time.monotonic()
    rs = measure_all(calls, syscalls, args.only, args.repeat, args.syscall_repeat, args.bcc_calls)
    print(table(rs))
    fl = [r for r in rs if r["tool"] == "funclatency"]
    if fl:
        print("\nfunclatency goal, the port adds >= %.0f× less time per call than bcc: %s" % (GOAL, "; ".join(
            "%s on %s (%.0f×)" % ("met" if r["ratio"] >= GOAL else "MISSED", r["workload"], r["ratio"]) for r in fl)))
    bad = [r for r in rs if (r["bcc_count"], r["port_count"]) != (r["bcc_calls"], r["calls"])]
    print("(%.0f s)" % (time.monotonic() - t0), file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    sys.exit(main())
