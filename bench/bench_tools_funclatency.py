#!/usr/bin/env python3
"""What the bcc tool ports cost the traced process, against Debian's bcc tools, in one run.

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
probes inside the process).  Loop times are medians of ``--repeat`` runs (1 by default:
bcc takes ~17 us a call on ``work``, nearly 3 minutes for 10M calls) and of
``--syscall-repeat`` runs for getppid (5).  The tools are attached before the loop starts (the
workload waits until the tool prints its "Tracing" line) and stopped with Ctrl-C
after it; their counts are checked to be exactly the calls made.  "added" is
(traced loop time - untraced loop time) / calls; the ratio is bcc's added time over
the port's.

    .venv/bin/python bench/bench_tools_funclatency.py [--calls N] [--syscalls N] [--quick] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "build" / "bench" / "tools"
PYTHON = sys.executable
FUNCLATENCY_BCC = "/usr/sbin/funclatency-bpfcc"
SYSCOUNT_BCC = "/usr/sbin/syscount-bpfcc"
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


def run_once(exe: str, what: str, n: int, tool: list[str] | None) -> tuple[float, str]:
    """Loop seconds of one workload run, traced by ``tool`` (argv; "PID" is replaced) or not; the tool's output."""
    w = subprocess.Popen([exe, what, str(n)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    t = None
    try:
        assert w.stdout.readline().startswith("ready")
        if tool is not None:
            argv = [str(w.pid) if a == "PID" else a for a in tool]
            t = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
                                 cwd=str(ROOT))
            first = t.stdout.readline()
            if not first.startswith("Tracing"):
                out, err = t.communicate()
                raise RuntimeError("%s: %s%s%s" % (" ".join(argv), first, out, err))
        w.stdin.write("go\n")
        w.stdin.flush()
        m = re.match(r"ns (\d+)", w.stdout.readline())
        seconds = int(m.group(1)) / 1e9
        out = ""
        if t is not None:
            t.send_signal(signal.SIGINT)
            out, err = t.communicate(timeout=120)
            if t.returncode:
                raise RuntimeError("%s exited with %d: %s" % (tool[0], t.returncode, err))
        w.stdin.write("q\n")
        w.stdin.close()
        w.wait(10)
        return seconds, out
    finally:
        for p in (t, w):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()


def funclatency_count(out: str) -> int:
    m = re.search(r"count: (\d+)", out)
    return int(m.group(1)) if m else 0


def syscount_count(out: str) -> int:
    m = re.search(r"^getppid +(\d+)$", out, re.M)
    return int(m.group(1)) if m else 0


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2


def measure(exe: str, what: str, n: int, tool: list[str] | None, repeat: int) -> tuple[float, str]:
    """Median loop seconds of ``repeat`` runs; the output of the last."""
    times, out = [], ""
    for _ in range(repeat):
        seconds, out = run_once(exe, what, n, tool)
        times.append(seconds)
    return _median(times), out


def rows(calls: int = 10_000_000, syscalls: int = 1_000_000, only: list[str] | None = None,
         repeat: int = 1, syscall_repeat: int = 5) -> list[dict]:
    """One row per workload: loop seconds untraced / under bcc / under the port (medians of ``repeat``
    runs, ``syscall_repeat`` for getppid: a system call's time varies by tens of ns here), added ns
    per call, and the counts each tool printed."""
    exe = build()
    port = [PYTHON, str(ROOT / "tools" / "bcc_ports" / "funclatency.py")]
    sport = [PYTHON, str(ROOT / "tools" / "bcc_ports" / "syscount.py")]
    cases = [
        ("work", calls, "funclatency", [FUNCLATENCY_BCC, "-p", "PID", exe + ":work"],
         port + ["-p", "PID", exe + ":work"], funclatency_count),
        ("work_push", calls, "funclatency", [FUNCLATENCY_BCC, "-p", "PID", exe + ":work_push"],
         port + ["-p", "PID", exe + ":work_push"], funclatency_count),
        ("getppid", syscalls, "syscount", [SYSCOUNT_BCC, "-p", "PID"], sport + ["-p", "PID"], syscount_count),
    ]
    out = []
    for what, n, tool, bcc_argv, port_argv, count in cases:
        if only and what not in only:
            continue
        r = syscall_repeat if what == "getppid" else repeat
        base, _ = measure(exe, what, n, None, r)
        bcc_s, bcc_out = measure(exe, what, n, bcc_argv, r)
        port_s, port_out = measure(exe, what, n, port_argv, r)
        row = {"tool": tool, "workload": what, "calls": n, "runs": r,
               "first_insn": first_instruction(exe, what) if what != "getppid" else "syscall",
               "untraced_s": base, "bcc_s": bcc_s, "port_s": port_s,
               "bcc_added_ns": (bcc_s - base) / n * 1e9, "port_added_ns": (port_s - base) / n * 1e9,
               "bcc_count": count(bcc_out), "port_count": count(port_out)}
        row["ratio"] = row["bcc_added_ns"] / row["port_added_ns"] if row["port_added_ns"] > 0 else float("inf")
        out.append(row)
        print("  %s: untraced %.3f s, bcc %.3f s, port %.3f s" % (what, base, bcc_s, port_s), file=sys.stderr)
    return out


def table(rs: list[dict]) -> str:
    lines = ["| tool | workload (first insn) | calls | untraced s | bcc s | port s | bcc added ns/call | "
             "port added ns/call | bcc/port | counts bcc / port |",
             "|---|---|--:|--:|--:|--:|--:|--:|--:|---|"]
    for r in rs:
        ok = "exact" if r["bcc_count"] == r["port_count"] == r["calls"] else "%d / %d" % (r["bcc_count"],
                                                                                         r["port_count"])
        lines.append("| %s | %s (`%s`) | %s | %.3f | %.3f | %.3f | %s | %.1f | %.0f× | %s |" % (
            r["tool"], r["workload"], r["first_insn"], format(r["calls"], ","), r["untraced_s"], r["bcc_s"],
            r["port_s"], format(round(r["bcc_added_ns"]), ","), r["port_added_ns"], r["ratio"], ok))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=10_000_000, help="function calls (default 10,000,000)")
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
    rs = rows(calls, syscalls, args.only, args.repeat, args.syscall_repeat)
    print(table(rs))
    fl = [r for r in rs if r["tool"] == "funclatency"]
    if fl:
        print("\nfunclatency goal, the port adds >= %.0f× less time per call than bcc: %s" % (GOAL, "; ".join(
            "%s on %s (%.0f×)" % ("met" if r["ratio"] >= GOAL else "MISSED", r["workload"], r["ratio"]) for r in fl)))
    bad = [r for r in rs if not r["bcc_count"] == r["port_count"] == r["calls"]]
    print("(%.0f s)" % (time.monotonic() - t0), file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    sys.exit(main())
