#!/usr/bin/env python3
"""What the memleak and opensnoop ports cost the traced process (and others), against Debian's bcc, in one run.

A C workload (built here, gcc -O2 with frame pointers) waits on stdin, then times
its own loop with CLOCK_MONOTONIC and prints the time:

``alloc``  N malloc(64..319)/free pairs (default 2,000,000), then 1,000 malloc(100)
           from another call site that it keeps (the leak every tool must report)
``open``   N openat(AT_FDCWD, "/nonexistent/...", O_RDONLY) (default 200,000), each ENOENT

Rows, each tool attached before the loop starts (the workload waits until the tool
has printed its first report / its header):

- alloc: untraced; ``memleak-bpfcc -p PID`` (kernel uprobes); ``tools/bcc_ports/memleak.py -p PID``
  (the probes inside the process); the port with ``--mode kernel`` (the same programs as kernel
  uprobes, through libbpf).  Each tool's reports after the loop are checked: 100,000 bytes in
  1,000 allocations from the leaking site.
- open: untraced; ``opensnoop.py -p PID`` (syscall probes inside the process);
  ``opensnoop.py --mode kernel -p PID`` (the kernel's syscalls tracepoints, filtered by pid);
  ``opensnoop-bpfcc -p PID`` if it runs here (on this kernel it does not: it picks kretfunc probes,
  whose load is refused, and there are no kprobes to fall back to; it is tried, and its error kept).
  Each tool's events are checked: printed + lost = the openat calls of the traced process.
- open, another process: while each tool is attached to the open workload (before that
  workload's loop), a second process runs the same loop untraced -- with the port in user mode
  nothing is added to it, with the kernel's tracepoints every openat passes the program's pid check.

"added" is (loop time - untraced loop time) / events, an event being one malloc+free pair
or one openat; "slowdown" is loop time / untraced loop time; the ratio is bcc's (or the
kernel's) added time over the port's.  Times are medians of ``--repeat`` runs (default 1;
bcc's memleak takes ~20 us a pair here, 40 s for 2,000,000) and ``--open-repeat`` runs of
the open cases, interleaved (default 5).

The measurement functions (:func:`memleak_measure`, :func:`opensnoop_measure`,
:func:`tool_problem`) are also used by ``bench_tools.py``, the pyperf suite; this script
prints a table.

    .venv/bin/python bench/bench_tools_snoop.py [--pairs N] [--opens N] [--repeat R] [--quick]
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
from typing import NamedTuple

if __package__ in (None, ""):  # bench/ on the path (run as a script or from bench_tools.py)
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_tools_funclatency import BUILD, PYTHON, ROOT, TOOL_ERRORS, _env, _median  # noqa: E402

MEMLEAK_BCC = "/usr/sbin/memleak-bpfcc"
OPENSNOOP_BCC = "/usr/sbin/opensnoop-bpfcc"
MEMLEAK_PORT = [PYTHON, str(ROOT / "tools" / "bcc_ports" / "memleak.py")]
OPENSNOOP_PORT = [PYTHON, str(ROOT / "tools" / "bcc_ports" / "opensnoop.py")]
GOAL_MEMLEAK = 20.0  # the port's added time per pair at least 20x below bcc's
LEAKS, LEAK_SIZE = 1000, 100
MISSING = "/nonexistent/hybrid-bench-open"

WORKLOAD_C = r"""
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

void *volatile sink;
void *keep[%(leaks)d];

__attribute__((noinline)) void churn(long n)
{
    for (long i = 0; i < n; i++) {
        void *p = malloc(64 + (i & 255));
        sink = p;
        free(p);
    }
}

__attribute__((noinline)) void *leak(void) { void *p = malloc(%(leak_size)d); sink = p; return p; }

__attribute__((noinline)) void opens(long n)
{
    for (long i = 0; i < n; i++) {
        int fd = openat(AT_FDCWD, "%(missing)s", O_RDONLY);
        if (fd >= 0)
            close(fd);
    }
}

int main(int argc, char **argv)
{
    long n = atol(argv[2]);
    char line[64];
    struct timespec a, b;

    printf("ready %%d\n", getpid());
    fflush(stdout);
    if (!fgets(line, sizeof line, stdin))
        return 1;
    clock_gettime(CLOCK_MONOTONIC, &a);
    if (argv[1][0] == 'a')
        churn(n);
    else
        opens(n);
    clock_gettime(CLOCK_MONOTONIC, &b);
    if (argv[1][0] == 'a')
        for (int i = 0; i < %(leaks)d; i++)
            keep[i] = leak();
    printf("ns %%lld\n", (long long)(b.tv_sec - a.tv_sec) * 1000000000LL + (b.tv_nsec - a.tv_nsec));
    fflush(stdout);
    while (fgets(line, sizeof line, stdin))
        ;
    return 0;
}
""" % {"leaks": LEAKS, "leak_size": LEAK_SIZE, "missing": MISSING}

REPORT_HEAD = re.compile(r"^\[\d\d:\d\d:\d\d\] Top \d+ stacks with outstanding allocations:$")


def build() -> str:
    BUILD.mkdir(parents=True, exist_ok=True)
    src = BUILD / "snoop_workload.c"
    exe = BUILD / "snoop-workload"
    if not src.exists() or src.read_text() != WORKLOAD_C:
        src.write_text(WORKLOAD_C)
    if not exe.exists() or exe.stat().st_mtime < src.stat().st_mtime:
        subprocess.run(["gcc", "-O2", "-g", "-fno-omit-frame-pointer", str(src), "-o", str(exe)], check=True)
    return str(exe)


class Workload:
    def __init__(self, exe: str, what: str, n: int):
        self.p = subprocess.Popen([exe, what, str(n)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.p.stdout.readline()
        assert line.startswith("ready "), line
        self.pid = self.p.pid

    def run(self) -> float:
        """Let the loop go; its seconds."""
        self.p.stdin.write("go\n")
        self.p.stdin.flush()
        m = re.match(r"ns (\d+)", self.p.stdout.readline())
        assert m, "the workload did not report its time"
        return int(m.group(1)) / 1e9

    def end(self) -> None:
        if self.p.poll() is None:
            try:
                self.p.stdin.close()
            except BrokenPipeError:
                pass
            try:
                self.p.wait(30)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()


class Tool:
    """A tool process writing to files (no reader competing with the workload for the 2 CPUs)."""

    def __init__(self, argv: list[str]):
        import tempfile

        self.dir = tempfile.mkdtemp(prefix="bench-snoop-")
        self.out_path = os.path.join(self.dir, "out")
        self.err_path = os.path.join(self.dir, "err")
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.p = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=_env(),
                                      cwd=str(ROOT))

    @property
    def lines(self) -> list[str]:
        with open(self.out_path) as f:
            return f.read().splitlines()

    @property
    def err(self) -> str:
        with open(self.err_path) as f:
            return f.read()

    def wait_for(self, pred, start: int = 0, timeout: float = 120) -> int | None:
        """Index of the first line from ``start`` matching ``pred``; None if the tool ended or time ran out."""
        deadline = time.monotonic() + timeout
        while True:
            done = self.p.poll() is not None
            lines = self.lines
            for i in range(start, len(lines)):
                if pred(lines[i]):
                    return i
            if done or time.monotonic() > deadline:
                return None
            time.sleep(0.01)

    def stop(self, sig=signal.SIGINT, timeout: float = 120) -> int:
        if self.p.poll() is None:
            self.p.send_signal(sig)
        try:
            return self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.p.kill()
            return self.p.wait()

    def failure(self) -> str:
        return failure_cause(self.err) or "exited with status %s" % self.p.returncode

    def cleanup(self) -> None:
        import shutil

        shutil.rmtree(self.dir, ignore_errors=True)


def failure_cause(err: str) -> str:
    """The real cause in a tool's stderr, on one line: the bcc call that failed (``attach_kretfunc``),
    the kernel's refusal (``bpf: Failed to load program: ...``) and the exception it became."""
    lines = [x.strip() for x in err.splitlines() if x.strip()]
    if not lines:
        return ""
    parts = []
    calls = re.findall(r"\b(attach_\w+|load_func)\(", err)
    attach = [c for c in calls if c.startswith("attach_")]
    if attach:
        parts.append(attach[-1])
    refusal = next((x for x in lines if re.search(r"Failed to (load|attach)|cannot attach|Operation not permitted|"
                                                  r"Invalid argument|Permission denied|not supported", x)), None)
    if refusal is not None:
        parts.append(refusal)
    if lines[-1] != refusal:
        parts.append(lines[-1])
    return ": ".join(parts[:1] + ["; ".join(parts[1:])]) if attach else "; ".join(parts)


def refused_what(cause: str) -> str:
    """``kretfunc refused`` from a :func:`failure_cause` naming ``attach_kretfunc``; else the cause's gist."""
    m = re.match(r"attach_(\w+): .*(Failed to load|Failed to attach|not permitted|Invalid argument|not supported)",
                 cause)
    return "%s refused" % m.group(1) if m else cause.split(";")[0][:80]


def tool_problem(argv: list[str], ready, timeout: float = 60) -> str | None:
    """Start ``argv`` on an idle process (``-p PID`` appended) until it is ready (``ready(line)`` on
    one of its output lines) or ends: None if it runs, else why not (:func:`failure_cause`)."""
    exe = build()
    idle = Workload(exe, "open", 0)
    t = Tool(argv + ["-p", str(idle.pid)])
    try:
        if t.wait_for(ready, timeout=timeout) is not None:
            return None
        t.stop()
        return failure_cause(t.err) or "exited with status %s" % t.p.returncode
    finally:
        if t.p.poll() is None:
            t.stop(signal.SIGKILL)
        t.cleanup()
        idle.end()


def leak_found(lines: list[str]) -> bool:
    """A report in ``lines`` lists the leaking site with exactly LEAKS allocations of LEAK_SIZE."""
    text = "\n".join(lines)
    want = "\t%d bytes in %d allocations from stack\n\t\t0x[0-9a-f]{16}\tleak\\+0x" % (LEAKS * LEAK_SIZE, LEAKS)
    return re.search(want, text) is not None


class Measured(NamedTuple):
    times: list[float]         # loop seconds, one per run
    check: str                 # what the check of the last run says
    ok: bool                   # every run's check passed
    other: list[float] = []    # loop seconds of an untraced process, one per run (opensnoop)


# --- memleak ---------------------------------------------------------------------------


# Tools told to stop after their check, still exiting (memleak-bpfcc takes ~2.5 s to detach its
# uprobes), with the workload they traced (kept until they have detached): :func:`settle` waits
# for them before the next timed loop, so their exit overlaps the next tool's start, never a loop.
_exiting: list[tuple[Tool, Workload]] = []


def settle(timeout: float = 120) -> None:
    """Wait for the tools still exiting to end (killed after ``timeout``), and end their workloads."""
    while _exiting:
        t, w = _exiting.pop(0)
        try:
            t.p.wait(timeout)
        except subprocess.TimeoutExpired:
            t.p.kill()
            t.p.wait()
        t.cleanup()
        w.end()


def memleak_once(exe: str, n: int, tool: list[str] | None) -> tuple[float, str, bool]:
    """Loop seconds under ``tool`` (None: untraced), what the check says, and whether it passed.
    The tool is left exiting (Ctrl-C) when it returns: :func:`settle` before timing anything else."""
    w = Workload(exe, "alloc", n)
    t = None
    try:
        if tool is None:
            settle()
            return w.run(), "untraced", True
        t = Tool(tool + ["-p", str(w.pid), "-o", "0", "1"])
        if t.wait_for(REPORT_HEAD.match) is None:  # a first report: attached
            t.stop()
            raise RuntimeError("%s: %s" % (" ".join(tool[:2]), t.failure()))
        settle()
        seconds = w.run()
        after = len(t.lines)
        # a report after the loop (and the leak) that lists the leak: reports come every second,
        # and one may still be printing
        deadline = time.monotonic() + 60
        ok = False
        while not ok and time.monotonic() < deadline and t.p.poll() is None:
            time.sleep(0.05)
            ok = leak_found(t.lines[after:])
        t.p.send_signal(signal.SIGINT)
        _exiting.append((t, w))
        t = w = None
        return seconds, "leak reported" if ok else "LEAK NOT REPORTED", ok
    finally:
        if t is not None:
            if t.p.poll() is None:
                t.stop(signal.SIGKILL)
            t.cleanup()
        if w is not None:
            w.end()


def memleak_measure(exe: str, n: int, tool: list[str] | None, repeat: int) -> Measured:
    times, check, ok = [], "", True
    for _ in range(repeat):
        s, check, good = memleak_once(exe, n, tool)
        times.append(s)
        ok = ok and good
    return Measured(times, check, ok)


# --- opensnoop -------------------------------------------------------------------------


def opensnoop_once(exe: str, n: int, tool: list[str] | None) -> tuple[float, float | None, str, bool]:
    """Loop seconds of an open-heavy workload, untraced or traced by ``tool`` (-p its pid); with a
    tool, also the loop seconds of a second process, untraced, run while the tool is attached (before
    the traced loop); what the check says and whether it passed."""
    w = Workload(exe, "open", n)
    o = Workload(exe, "open", n) if tool is not None else None
    t = None
    try:
        if tool is None:
            settle()
            return w.run(), None, "untraced", True
        t = Tool(tool + ["-p", str(w.pid)])
        if t.wait_for(lambda line: line.startswith("PID ")) is None:
            t.stop()
            raise RuntimeError("%s: %s" % (" ".join(tool[:2]), t.failure()))
        settle()
        other = o.run()
        seconds = w.run()
        w.end()  # the port ends when its process does, after draining the ring; others: no news for 3 s
        last, quiet = len(t.lines), time.monotonic()
        while t.p.poll() is None and time.monotonic() - quiet < 3:
            time.sleep(0.1)
            if len(t.lines) != last:
                last, quiet = len(t.lines), time.monotonic()
        t.stop()
        got = sum(MISSING in line for line in t.lines)
        lost = sum(int(x) for x in re.findall(r"Possibly lost (\d+) samples", t.err or ""))
        return seconds, other, "%d printed + %d lost = %d of %d" % (got, lost, got + lost, n), got + lost == n
    finally:
        if t is not None:
            if t.p.poll() is None:
                t.stop(signal.SIGKILL)
            t.cleanup()
        w.end()
        if o is not None:
            o.end()


def opensnoop_measure(exe: str, n: int, tools: dict[str, list[str] | None], repeat: int) -> dict:
    """:func:`opensnoop_once` for each of ``tools`` (name -> argv, None: untraced), interleaved run after
    run (openat's own time drifts by ~10% here), ``repeat`` times: name -> :class:`Measured`, or the
    exception of a tool that failed (it is not run again)."""
    times: dict[str, list[float]] = {k: [] for k in tools}
    others: dict[str, list[float]] = {k: [] for k in tools}
    checks: dict[str, str] = {}
    oks = {k: True for k in tools}
    failed: dict[str, Exception] = {}
    for _ in range(repeat):
        for name, tool in tools.items():
            if name in failed:
                continue
            try:
                s, other, checks[name], good = opensnoop_once(exe, n, tool)
            except TOOL_ERRORS as e:
                failed[name] = e
                continue
            times[name].append(s)
            if other is not None:
                others[name].append(other)
            oks[name] = oks[name] and good
    return {k: failed[k] if k in failed else Measured(times[k], checks[k], oks[k], others[k]) for k in tools}


# --- the plain script: a table ---------------------------------------------------------


def measure_all(pairs: int = 2_000_000, opens: int = 200_000, repeat: int = 1, open_repeat: int = 5) -> list[dict]:
    """One dict per (workload, tracer): loop seconds, ns per event, added ns per event, slowdown, and the check."""
    exe = build()
    out: list[dict] = []

    def row(workload: str, tracer: str, events: int, seconds: float, base: float, note: str, ok: bool = True) -> dict:
        r = {"workload": workload, "tracer": tracer, "events": events, "seconds": seconds, "ok": ok,
             "ns_per_event": seconds / events * 1e9 if events else float("nan"),
             "added_ns": (seconds - base) / events * 1e9 if events else float("nan"),
             "slowdown": seconds / base if base else float("nan"), "note": note}
        out.append(r)
        print("  %s / %s: %.3f s %s" % (workload, tracer, seconds, note), file=sys.stderr)
        return r

    base = _median(memleak_measure(exe, pairs, None, max(repeat, 3)).times)
    row("alloc", "untraced", pairs, base, base, "")
    mrows = []
    for tracer, tool in (("memleak-bpfcc (kernel uprobes)", [MEMLEAK_BCC]),
                         ("memleak.py (in the process)", MEMLEAK_PORT),
                         ("memleak.py --mode kernel (kernel uprobes)", MEMLEAK_PORT + ["--mode", "kernel"])):
        m = memleak_measure(exe, pairs, tool, repeat)
        mrows.append(row("alloc", tracer, pairs, _median(m.times), base, m.check, m.ok))
    settle()
    bcc, port, kern = mrows
    for r in (bcc, kern):
        r["ratio"] = r["added_ns"] / port["added_ns"] if port["added_ns"] > 0 else float("inf")

    bcc_problem = tool_problem([OPENSNOOP_BCC], lambda line: line.startswith("PID "))
    tools = {"untraced": None, "opensnoop.py (in the process)": OPENSNOOP_PORT,
             "opensnoop.py --mode kernel (syscalls tracepoints)": OPENSNOOP_PORT + ["--mode", "kernel"]}
    if bcc_problem is None:
        tools["opensnoop-bpfcc"] = [OPENSNOOP_BCC]
    ms = opensnoop_measure(exe, opens, tools, open_repeat)
    for m in ms.values():
        if isinstance(m, Exception):
            raise m
    obase = _median(ms["untraced"].times)
    row("open", "untraced", opens, obase, obase, "median of %d runs" % open_repeat)
    traced = {k: row("open", k, opens, _median(m.times), obase, m.check, m.ok) for k, m in ms.items()
              if k != "untraced"}
    ouser = traced["opensnoop.py (in the process)"]
    for k, r in traced.items():
        if r is not ouser:
            r["ratio"] = r["added_ns"] / ouser["added_ns"] if ouser["added_ns"] > 0 else float("inf")
    if bcc_problem is not None:
        row("open", "opensnoop-bpfcc", opens, float("nan"), obase, "does not run here: %s" % bcc_problem)
    for k, m in ms.items():
        if k != "untraced":
            row("open, another process", k, opens, _median(m.other), obase,
                "while the tool traced the other process")
    return out


def _f(x: float, fmt: str) -> str:
    return "—" if x != x else fmt % x


def table(rs: list[dict]) -> str:
    lines = ["| workload | tracer | events | loop s | ns/event | added ns/event | slowdown | ratio | check |",
             "|---|---|--:|--:|--:|--:|--:|--:|---|"]
    for r in rs:
        ratio = r.get("ratio")
        lines.append("| %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
            r["workload"], r["tracer"], format(r["events"], ","), _f(r["seconds"], "%.3f"),
            _f(r["ns_per_event"], "%.1f"), _f(r["added_ns"], "%.1f"), _f(r["slowdown"], "%.2f×"),
            "" if ratio is None else _f(ratio, "%.1f×"), r["note"]))
    return "\n".join(lines)


def goals(rs: list[dict]) -> list[str]:
    by = {(r["workload"], r["tracer"].split(" ")[0] + (" kernel" if "--mode kernel" in r["tracer"] else "")): r
          for r in rs}
    out = []
    bcc = by.get(("alloc", "memleak-bpfcc"))
    port = by.get(("alloc", "memleak.py"))
    if bcc and port:
        ratio = bcc["ratio"]
        out.append("memleak: the port adds %.0f ns per malloc+free pair, bcc %.0f ns: %.1f× less (goal >= %.0f×: %s)"
                   % (port["added_ns"], bcc["added_ns"], ratio, GOAL_MEMLEAK, "met" if ratio >= GOAL_MEMLEAK
                      else "MISSED"))
    ou, ok = by.get(("open", "opensnoop.py")), by.get(("open", "opensnoop.py kernel"))
    if ou and ok:
        out.append("opensnoop on the traced process: the port adds %.0f ns per openat in the process, %.0f ns on "
                   "the kernel's tracepoints (%s)" % (ou["added_ns"], ok["added_ns"],
                                                      "less in the process" if ou["added_ns"] < ok["added_ns"]
                                                      else "NOT less in the process"))
    eu = by.get(("open, another process", "opensnoop.py"))
    ek = by.get(("open, another process", "opensnoop.py kernel"))
    if eu and ek:
        out.append("opensnoop on another process: %+.0f ns per openat with the port in a process (noise: nothing "
                   "runs there), %+.0f ns with the kernel's tracepoints" % (eu["added_ns"], ek["added_ns"]))
    ob = by.get(("open", "opensnoop-bpfcc"))
    if ob and ob["seconds"] != ob["seconds"]:
        out.append("opensnoop-bpfcc: %s" % ob["note"])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=2_000_000, help="malloc/free pairs (default 2,000,000)")
    ap.add_argument("--opens", type=int, default=200_000, help="openat calls (default 200,000)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per traced row, median (default 1)")
    ap.add_argument("--open-repeat", type=int, default=5, help="runs per open row, median (default 5)")
    ap.add_argument("--quick", action="store_true", help="200,000 pairs, 50,000 opens, 3 runs per open row")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_tools_snoop: needs root (bcc and probes in another process)", file=sys.stderr)
        return 2
    if not os.access(MEMLEAK_BCC, os.X_OK):
        print("bench_tools_snoop: %s is missing (apt-get install bpfcc-tools)" % MEMLEAK_BCC, file=sys.stderr)
        return 2
    pairs, opens, orep = (200_000, 50_000, 3) if args.quick else (args.pairs, args.opens, args.open_repeat)
    t0 = time.monotonic()
    rs = measure_all(pairs, opens, args.repeat, orep)
    print(table(rs))
    print()
    for g in goals(rs):
        print("- " + g)
    print("(%.0f s)" % (time.monotonic() - t0), file=sys.stderr)
    return 0 if all(r["ok"] for r in rs) else 1


if __name__ == "__main__":
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    sys.exit(main())
