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
  uprobes, through libbpf).  Each tool's report after the loop is checked: 100,000 bytes in
  1,000 allocations from the leaking site.
- open: untraced; ``opensnoop.py -p PID`` (syscall probes inside the process);
  ``opensnoop.py --mode kernel -p PID`` (the kernel's syscalls tracepoints, filtered by pid);
  ``opensnoop-bpfcc -p PID`` if it runs here (on this kernel it does not: it picks kretfunc probes,
  whose load is refused, and there are no kprobes to fall back to).
- open, another process: the same untraced loop in a second process while the port traces a
  third, idle one -- in user mode (nothing is added outside the traced process) and in kernel mode
  (every process's openat passes the tracepoint and the program's pid check).

"added" is (loop time - untraced loop time) / events, an event being one malloc+free pair
or one openat; "slowdown" is loop time / untraced loop time; the ratio is bcc's (or the
kernel's) added time over the port's.  Times are medians of ``--repeat`` runs (default 1;
bcc's memleak takes ~20 us a pair here, 40 s for 2,000,000).

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

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "build" / "bench" / "tools"
PYTHON = sys.executable
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


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = str(ROOT)
    return env


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
        tail = [x for x in self.err.strip().splitlines() if x.strip()]
        return tail[-1] if tail else "exited with status %s" % self.p.returncode

    def cleanup(self) -> None:
        import shutil

        shutil.rmtree(self.dir, ignore_errors=True)


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2


def leak_found(lines: list[str]) -> bool:
    """The last complete report lists the leaking site with exactly LEAKS allocations of LEAK_SIZE."""
    text = "\n".join(lines)
    want = "\t%d bytes in %d allocations from stack\n\t\t0x[0-9a-f]{16}\tleak\\+0x" % (LEAKS * LEAK_SIZE, LEAKS)
    return re.search(want, text) is not None


# --- memleak ---------------------------------------------------------------------------


def memleak_once(exe: str, n: int, tool: list[str] | None) -> tuple[float, str]:
    """Loop seconds under ``tool`` (None: untraced) and what the check says."""
    w = Workload(exe, "alloc", n)
    t = None
    try:
        if tool is None:
            return w.run(), ""
        t = Tool(tool + ["-p", str(w.pid), "-o", "0", "1"])
        first = t.wait_for(REPORT_HEAD.match)  # a report: attached
        if first is None:
            t.stop()
            raise RuntimeError("%s: %s" % (" ".join(tool[:2]), t.failure()))
        seconds = w.run()
        after = len(t.lines)
        # the next report after the loop (and the leak) ended: wait for one that lists the leak
        deadline = time.monotonic() + 60
        ok = False
        while time.monotonic() < deadline and not ok:
            i = t.wait_for(REPORT_HEAD.match, after, timeout=5)
            if i is None:
                break
            time.sleep(0.3)  # let it print the report (bcc's Ctrl-C is only clean while it sleeps)
            ok = leak_found(t.lines[i:])
            after = i + 1
        t.stop()
        return seconds, "leak reported" if ok else "LEAK NOT REPORTED"
    finally:
        if t is not None:
            if t.p.poll() is None:
                t.stop(signal.SIGKILL)
            t.cleanup()
        w.end()


# --- opensnoop -------------------------------------------------------------------------


def opensnoop_once(exe: str, n: int, tool: list[str] | None, traced_elsewhere: bool = False) -> tuple[float, str]:
    """Loop seconds of an open-heavy workload: untraced, traced by ``tool`` (-p its pid), or -- with
    ``traced_elsewhere`` -- untraced while ``tool`` traces another, idle process."""
    w = Workload(exe, "open", n)
    idle = Workload(exe, "open", 0) if traced_elsewhere else None
    t = None
    try:
        if tool is None:
            return w.run(), ""
        target = idle.pid if idle is not None else w.pid
        t = Tool(tool + ["-p", str(target)])
        if t.wait_for(lambda line: line.startswith("PID ")) is None:
            t.stop()
            return float("nan"), "does not run here: %s" % t.failure()
        seconds = w.run()
        if idle is not None:
            t.stop()
            return seconds, "%d events (expected 0)" % sum(MISSING in line for line in t.lines)
        w.end()  # the port ends when its process does, after draining the ring
        try:
            t.p.wait(120)
        except subprocess.TimeoutExpired:
            pass
        t.stop()
        got = sum(MISSING in line for line in t.lines)
        m = re.findall(r"Possibly lost (\d+) samples", t.err or "")
        lost = sum(int(x) for x in m)
        return seconds, "%d printed + %d lost = %d" % (got, lost, got + lost)
    finally:
        if t is not None:
            if t.p.poll() is None:
                t.stop(signal.SIGKILL)
            t.cleanup()
        w.end()
        if idle is not None:
            idle.end()


# --- rows and table --------------------------------------------------------------------


def measure(fn, repeat: int) -> tuple[float, str]:
    times, note = [], ""
    for _ in range(repeat):
        s, note = fn()
        times.append(s)
        if s != s:  # nan: it does not run
            break
    return _median(times), note


def rows(pairs: int = 2_000_000, opens: int = 200_000, repeat: int = 1, open_repeat: int = 5) -> list[dict]:
    """One dict per (workload, tracer): loop seconds, ns per event, added ns per event, slowdown, and a note."""
    exe = build()
    out: list[dict] = []

    def row(workload: str, tracer: str, events: int, seconds: float, base: float, note: str) -> dict:
        r = {"workload": workload, "tracer": tracer, "events": events, "seconds": seconds,
             "ns_per_event": seconds / events * 1e9 if events else float("nan"),
             "added_ns": (seconds - base) / events * 1e9 if events else float("nan"),
             "slowdown": seconds / base if base else float("nan"), "note": note}
        out.append(r)
        print("  %s / %s: %.3f s %s" % (workload, tracer, seconds, note), file=sys.stderr)
        return r

    base, _ = measure(lambda: memleak_once(exe, pairs, None), max(repeat, 3))
    row("alloc", "untraced", pairs, base, base, "")
    bcc_s, note = measure(lambda: memleak_once(exe, pairs, [MEMLEAK_BCC]), repeat)
    bcc = row("alloc", "memleak-bpfcc (kernel uprobes)", pairs, bcc_s, base, note)
    port_s, note = measure(lambda: memleak_once(exe, pairs, MEMLEAK_PORT), repeat)
    port = row("alloc", "memleak.py (in the process)", pairs, port_s, base, note)
    kern_s, note = measure(lambda: memleak_once(exe, pairs, MEMLEAK_PORT + ["--mode", "kernel"]), repeat)
    kern = row("alloc", "memleak.py --mode kernel (kernel uprobes)", pairs, kern_s, base, note)
    for r in (bcc, kern):
        r["ratio"] = r["added_ns"] / port["added_ns"] if port["added_ns"] > 0 else float("inf")

    # open: the five cases interleaved, run after run (openat's own time drifts by ~10% here)
    cases = [("untraced", None, False),
             ("opensnoop.py (in the process)", OPENSNOOP_PORT, False),
             ("opensnoop.py --mode kernel (syscalls tracepoints)", OPENSNOOP_PORT + ["--mode", "kernel"], False),
             ("opensnoop.py -p (an idle process)", OPENSNOOP_PORT, True),
             ("opensnoop.py --mode kernel -p (an idle process)", OPENSNOOP_PORT + ["--mode", "kernel"], True)]
    times: dict[str, list[float]] = {c[0]: [] for c in cases}
    notes: dict[str, str] = {}
    for _ in range(open_repeat):
        for name, tool, elsewhere in cases:
            sec, notes[name] = opensnoop_once(exe, opens, tool, traced_elsewhere=elsewhere)
            times[name].append(sec)
    obase = _median(times["untraced"])
    row("open", "untraced", opens, obase, obase, "median of %d runs" % open_repeat)
    ouser = row("open", cases[1][0], opens, _median(times[cases[1][0]]), obase, notes[cases[1][0]])
    okern = row("open", cases[2][0], opens, _median(times[cases[2][0]]), obase, notes[cases[2][0]])
    okern["ratio"] = okern["added_ns"] / ouser["added_ns"] if ouser["added_ns"] > 0 else float("inf")
    bs, note = opensnoop_once(exe, opens, [OPENSNOOP_BCC])
    ob = row("open", "opensnoop-bpfcc", opens, bs, obase, note)
    if ob["seconds"] == ob["seconds"]:
        ob["ratio"] = ob["added_ns"] / ouser["added_ns"] if ouser["added_ns"] > 0 else float("inf")
    for name, _, _ in cases[3:]:
        row("open, another process", name, opens, _median(times[name]), obase, notes[name])
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
    rs = rows(pairs, opens, args.repeat, orep)
    print(table(rs))
    print()
    for g in goals(rs):
        print("- " + g)
    print("(%.0f s)" % (time.monotonic() - t0), file=sys.stderr)
    bad = [r for r in rs if r["workload"] == "alloc" and r["tracer"] != "untraced" and r["note"] != "leak reported"]
    return 1 if bad else 0


if __name__ == "__main__":
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    sys.exit(main())
