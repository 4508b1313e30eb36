#!/usr/bin/env python3
"""pyperf benchmark of syscall probes: kernel tracepoints against hybrid, on the traced process and an untraced one.

What one value is: the time per call of libc's ``getppid()`` made in a C
loop (``getppid_loop(n)`` in ``programs/sysloop.c``, one ctypes call of n
calls; pyperf ``inner_loops`` = n, so values are seconds per syscall),
timed with the measuring thread's CPU time (:data:`CLOCK`: user + system
time of the thread, which for a loop that never blocks is its wall time
minus the time other processes held the CPU).
``getppid`` is cheap and has no side effects; the loop calls glibc's
wrapper (``mov $110, %eax; syscall; ret``), whose ``syscall`` instruction is
one of the libc sites hybrid hooks (``syscall(SYS_getppid)`` would be seen
too, through libc's ``syscall()``; a ``syscall`` instruction outside libc and
the main executable would not).  The programs (``programs/syscalls.bpf.c``)
count getppid entries / exits in an ARRAY map only when the current tgid is
the ``const volatile target_tgid`` set before load, the filter bcc and
libbpf tools use.

``getppid/none``
    no probe anywhere: the baseline every row subtracts (measured in the same run);
``getppid/traced/<probe>/<side>``
    the probe targets this (measuring) process;
``getppid/untraced/<probe>/<side>``
    the probe targets another process: a sleeping child (sysloop's
    executable) started for the purpose, whose tgid is ``target_tgid``;

with ``<probe>`` ``sys_enter`` (``count_enter`` on
``tracepoint/syscalls/sys_enter_getppid``) or ``sys_enter+sys_exit`` (and
``count_exit`` on ``sys_exit_getppid``; traced rows only) and ``<side>``:

``kernel``
    the object loaded by libbpf (``hybrid.kernel.KernelObject``) and its
    programs attached to the kernel's tracepoints: they run for every
    process's getppid and filter on the tgid, so the untraced row measures
    what a tool watching another process costs this one;
``user``
    ``hybrid.load(path, values={"target_tgid": tgid}, kernel=False)`` and
    ``obj.attach(programs=[...])`` in this process (traced rows: hooks on
    this process's libc syscall sites calling the JIT's code) or
    ``obj.attach(child_pid, ...)`` (untraced row: the hooks and AOT code are
    in the child only, nothing is placed in the measuring process; its cost
    is measured all the same).

Checks: traced rows fire exactly once per call (enter, and exit when
attached) before timing and after every timed value; untraced rows count
none of the measuring process's calls, and after every timed value the child
makes :data:`CHILD_CALLS` getppid calls that must all be counted (the probe
is really attached there).  hybrid's in-process hook is checked to patch
this process's getppid (traced rows) and to leave it alone (every other
benchmark).

hybrid's ``detach`` restores libc's syscall sites once the last syscall
probe is gone (before that, an empty dispatch costs ~80 ns per syscall), and
each benchmark checks that libc is untouched where it should be.  As a
precaution the hybrid traced rows still run last (:data:`ORDER`, for
``--quick``, where every benchmark runs in one process), and the parent's
preflight runs in a subprocess.

Module functions (importing runs nothing): :func:`rows`, :func:`summarize`,
:func:`missed_goals`.

Usage (normally through ``bench/run.py``)::

    python bench/bench_syscalls.py -o syscalls.json [--quick] [--quiet] [any pyperf option]
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

import harness  # noqa: E402
import report  # noqa: E402
import syscall_programs as sp  # noqa: E402

SUITE = "syscalls"
SIDES = ("kernel", "user")
BASELINE = "getppid/none"
UNIT = "ns/syscall"
GOAL: float | None = None  # no speed goal for this suite (yet): rows report, missed_goals() is empty

# Runner settings: (processes, values per process, min seconds per value) and getppid calls per loop.
FULL = (6, 4, 0.05)
QUICK = (1, 3, 0.02)
CALLS = {False: 100_000, True: 10_000}
CHILD_CALLS = 100  # getppid calls the child makes after each timed value (untraced rows)
PREFLIGHT_CALLS = 1000
# The timer: this thread's CPU time (CLOCK_THREAD_CPUTIME_ID, user + system).  The loop never blocks,
# so on an idle machine it equals the wall-clock time; on a loaded one it leaves out the time other
# processes take this CPU for (with 2 CPUs and a load of 3, wall time doubles, CPU time does not).
CLOCK = time.thread_time


@dataclass(frozen=True)
class Case:
    """One row: a probe on the traced (this) process or on an untraced one (a child)."""

    target: str  # traced, untraced
    probe: str  # sys_enter, sys_enter+sys_exit

    @property
    def label(self) -> str:
        return "%s process: %s" % (self.target, self.probe)

    def bench(self, side: str) -> str:
        return "getppid/%s/%s/%s" % (self.target, self.probe, side)


CASES: tuple[Case, ...] = (
    Case("traced", "sys_enter"),
    Case("traced", "sys_enter+sys_exit"),
    Case("untraced", "sys_enter"),
)


def leaves_hooks(case: Case, side: str) -> bool:
    """Whether a benchmark leaves hooks in its process after its subject is closed: hybrid's detach
    leaves libc's syscall sites patched (an empty dispatch, ~80 ns per syscall here)."""
    return side == "user" and case.target == "traced"


# Benchmarks in run order: hybrid's traced rows last, so that in one process (--quick, the
# preflight) no other benchmark runs on a libc they hooked.
ORDER: tuple[tuple[Case, str], ...] = tuple(sorted(((c, s) for c in CASES for s in SIDES),
                                                   key=lambda cs: leaves_hooks(*cs)))


# --- what one benchmark times (in pyperf's worker processes) ---------------------------


class Subject:
    """getppid_loop with (or without) one case's probe on one side, attached and checked."""

    def __init__(self, case: Case | None, side: str | None, n: int, art: sp.Artifacts):
        self.case, self.side, self.n = case, side, n
        self.what = case.bench(side) if case else BASELINE
        self.loop = sp.Loop(art.loop)
        self.child = self.probes = None
        try:
            if case is not None:
                if case.target == "untraced":
                    self.child = sp.Child(art.child)
                    self.probes = sp.attach(side, art, case.probe, self.child.pid, pid=self.child.pid)
                else:
                    self.probes = sp.attach(side, art, case.probe, os.getpid())
            self.check_hooks()
            if case is not None:
                self.seen = self.probes.counts()
                if self.child is not None:
                    self.check_child()
            self.time(1)  # a checked, untimed first run
        except BaseException:
            self.close()
            raise

    def check_hooks(self) -> None:
        """hybrid's in-process hook patches this process's getppid on its traced rows, and nothing else does
        (the baseline and the other rows run on an untouched libc)."""
        patched = sp.getppid_code() != sp.getppid_file_code()
        want = self.side == "user" and self.case is not None and self.case.target == "traced"
        if patched != want:
            raise RuntimeError("%s: libc's getppid in the measuring process is %s, expected %s"
                               % (self.what, "patched" if patched else "untouched",
                                  "patched (hybrid's hook)" if want else "untouched"))

    def check_child(self) -> None:
        """The child's getppid calls are counted: the probe is attached where it should be."""
        self.child.run(CHILD_CALLS)
        self.seen = sp.check_counts(self.probes, self.seen, sp.expected_counts(self.case.probe, CHILD_CALLS),
                                    "%s: %d getppid calls of the target process" % (self.what, CHILD_CALLS))

    def time(self, loops: int) -> float:
        run, n = self.loop.fn, self.n
        bad = 0
        clock = CLOCK
        t0 = clock()
        for _ in range(loops):
            if run(n) != n:
                bad += 1
        elapsed = clock() - t0
        if bad:
            raise RuntimeError("%s: getppid failed in %d of %d loops" % (self.what, bad, loops))
        if self.probes is not None:
            calls = loops * n
            if self.child is None:
                want = sp.expected_counts(self.case.probe, calls)
                what = "%s: %d getppid calls of the traced process" % (self.what, calls)
            else:
                want = (0, 0)
                what = "%s: %d getppid calls of the measuring (untraced) process" % (self.what, calls)
            self.seen = sp.check_counts(self.probes, self.seen, want, what)
            if self.child is not None:
                self.check_child()
        return elapsed

    def close(self) -> None:
        probes, self.probes = self.probes, None
        child, self.child = self.child, None
        try:
            if probes is not None:
                probes.close()
        finally:
            if child is not None:
                child.close()


_subjects: dict[str, Subject] = {}


def release_subjects() -> None:
    """Detach and close every cached subject (quick mode: between benchmarks of one process)."""
    while _subjects:
        _, s = _subjects.popitem()
        s.close()



def time_subject(loops: int, case: Case | None, side: str | None, n: int, art: sp.Artifacts) -> float:
    """pyperf time function: ``loops`` getppid_loop(n) calls; the first use attaches (untimed)."""
    name = case.bench(side) if case else BASELINE
    subject = _subjects.get(name)
    if subject is None:
        subject = _subjects[name] = Subject(case, side, n, art)
    return subject.time(loops)


# --- parent-only checks --------------------------------------------------------------


def preflight(art: sp.Artifacts) -> dict[str, str]:
    """Set every (case, side) up once and run its checks; {benchmark name: why it cannot run here}."""
    missing = {}
    for case, side in ORDER:
        try:
            Subject(case, side, PREFLIGHT_CALLS, art).close()
        except sp.SideUnavailable as e:
            missing[case.bench(side)] = " ".join(str(e).split())
            print("bench_syscalls: %s not benchmarked: %s" % (case.bench(side), e), file=sys.stderr)
    return missing


def preflight_isolated(art: sp.Artifacts) -> dict[str, str]:
    """:func:`preflight` in a separate process: hybrid's detach leaves libc's syscall sites hooked
    (an empty dispatch, ~80 ns per syscall here), which would slow every later benchmark of this one
    (``--quick`` runs them all in this process)."""
    import subprocess

    code = ("import json, sys; sys.path.insert(0, %r); import bench_syscalls as b, syscall_programs as sp; "
            "print(json.dumps(b.preflight(sp.Artifacts(*sys.argv[1:]))))" % str(BENCH_DIR))
    proc = subprocess.run([sys.executable, "-c", code, str(art.loop), str(art.child), str(art.bpf)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sys.stderr.write(proc.stderr if proc.returncode == 0 else "")
    if proc.returncode != 0:
        raise RuntimeError("bench_syscalls: preflight failed:\n%s" % proc.stderr.strip())
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- the pyperf script --------------------------------------------------------------


def _forward_args(cmd: list[str], args) -> None:
    """Arguments pyperf's workers need to register the same benchmarks in the same order."""
    cmd.extend(("--loop-lib", args.loop_lib, "--child-exe", args.child_exe, "--bpf-object", args.bpf_object,
                "--calls", str(args.calls)))
    if args.missing:
        cmd.extend(("--missing", args.missing))


def main() -> None:
    runner, quick = harness.suite_runner(FULL, QUICK, add_cmdline_args=_forward_args, release=release_subjects)
    atexit.register(release_subjects)
    ap = runner.argparser
    ap.description = "Syscall probes: kernel tracepoints against hybrid's libc hooks, traced and untraced process"
    ap.add_argument("--calls", type=int, default=CALLS[quick],
                    help="getppid calls per getppid_loop (default %d)" % CALLS[quick])
    ap.add_argument("--loop-lib", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-exe", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--bpf-object", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--missing", default="", help=argparse.SUPPRESS)
    args = runner.parse_args()

    if not args.worker:
        art = sp.build()
        args.loop_lib, args.child_exe, args.bpf_object = map(str, (art.loop, art.child, art.bpf))
        missing = preflight_isolated(art)  # fail early and clearly, before spawning workers
        args.missing = json.dumps(missing) if missing else ""
    art = sp.Artifacts(Path(args.loop_lib), Path(args.child_exe), Path(args.bpf_object))
    missing = json.loads(args.missing) if args.missing else {}

    n = args.calls
    meta = {"hybrid_calls": n}
    if missing:
        meta["hybrid_missing"] = args.missing  # every benchmark says what was not measured, and why
    runner.bench_time_func(BASELINE, time_subject, None, None, n, art, inner_loops=n,
                           metadata=dict(meta, hybrid_target="none", hybrid_side="none"))
    for case, side in ORDER:
        if case.bench(side) not in missing:
            runner.bench_time_func(case.bench(side), time_subject, case, side, n, art, inner_loops=n,
                                   metadata=dict(meta, hybrid_target=case.target, hybrid_probe=case.probe,
                                                 hybrid_side=side))


# --- the summary ------------------------------------------------------------------


def _load(json_path: Path | str) -> dict:
    from report import benchmarks

    return benchmarks(json_path)


def _missing(by_name: dict) -> dict[str, str]:
    from report import missing_sides

    return missing_sides(by_name)


def rows(json_path: Path | str) -> list[report.Row]:
    """One row per case: ns per getppid added over the baseline, kernel beside hybrid."""
    by_name = _load(json_path)
    missing = _missing(by_name)
    base = report.Stat.of(by_name.get(BASELINE))
    out = []
    for case in CASES:
        stats, why = {}, []
        for side in SIDES:
            b = by_name.get(case.bench(side))
            stats[side] = report.Stat.of(b, minus=base) if (b is not None and base is not None) else None
            if stats[side] is None:
                name = "hybrid" if side == "user" else side
                if case.bench(side) in missing:
                    why.append("%s: %s" % (name, missing[case.bench(side)]))
                elif base is None:
                    why.append("%s: no baseline (%s) in %s" % (name, BASELINE, Path(json_path).name))
                else:
                    why.append("%s: no result in %s (the run did not finish)" % (name, Path(json_path).name))
        note = "over getppid() alone (%s ns)" % report.fmt(base.median) if base is not None else ""
        if case.target == "untraced":
            note += ("; " if note else "") + ("probe on a sleeping child: the kernel runs the program for this "
                                              "process's getppid and filters, hybrid's hooks are in the child only")
        out.append(report.Row(SUITE, case.label, UNIT, stats["kernel"], stats["user"], reason="; ".join(why),
                              kernel_label="kernel", user_label="hybrid", note=note, goal=GOAL,
                              no_ratio="hybrid runs nothing in this process: its value is noise"
                              if case.target == "untraced" else ""))
    return out


def missed_goals(json_path: Path | str) -> list[str]:
    return ["%s/%s: kernel %.0f ns, hybrid %.0f ns per syscall (%.1fx, goal %gx)"
            % (r.suite, r.name, r.kernel.median, r.user.median, r.ratio, r.goal)
            for r in rows(json_path) if r.goal_met is False]


def summarize(json_path: Path | str) -> str:
    """The markdown section of a syscalls JSON written by this script."""
    import bench_engines  # machine_line

    by_name = _load(json_path)
    rs = rows(json_path)
    base = by_name.get(BASELINE)
    calls = sorted({int(b.get_metadata()["hybrid_calls"]) for b in by_name.values()
                    if b.get_metadata().get("hybrid_calls")})
    lines = [
        "# Syscall probes: kernel tracepoints vs hybrid, on the traced process and on an untraced one",
        "",
        bench_engines.machine_line() + ".",
        "",
        "Values are **ns per getppid()** added by the probe: the time (the thread's CPU time, user + system: "
        "the loop never blocks, and time other processes hold the CPU is left out) of libc's `getppid()` "
        "called in a C loop (`getppid_loop`, %s calls per ctypes call) with a counting program attached, "
        "minus the same loop with "
        "no probe anywhere (baseline: %s ns, same run; its stdev is the noise floor of every row); "
        "median ± stdev of the pyperf values. The programs "
        "(`programs/syscalls.bpf.c`: `tracepoint/syscalls/sys_enter_getppid`, `sys_exit_getppid`) count in an "
        "ARRAY map only when the current tgid is `const volatile target_tgid`. **kernel**: libbpf, attached to "
        "the kernel's tracepoints (they run for every process's getppid; enabling any syscall tracepoint also "
        "puts every task's syscalls on the kernel's slow path). **hybrid**: `hybrid.load(values=...)`, "
        "`obj.attach()` hooking the traced process's libc syscall sites (JIT'd code in this process; AOT code "
        "in the child for the untraced row, placed with ptrace). **traced process**: the target is the "
        "measuring process; **untraced process**: the target is a sleeping child, and the row is what the "
        "probe costs a process it does not watch (hybrid places nothing there: its value is the noise around "
        "the baseline). Traced rows are checked to fire exactly once per call before and after every timed "
        "value; untraced rows to count none of the measuring process's calls and all of %d calls made by the "
        "child after every value."
        % ("/".join("{:,}".format(c) for c in calls) or "n", report.fmt_stat(report.Stat.of(base)) if base else "—",
           CHILD_CALLS),
        "",
        "| what | kernel | hybrid | kernel/hybrid | note |",
        "|---|---:|---:|---:|---|",
    ]
    for r in rs:
        notes = []
        if r.reason:
            notes.append(r.reason)
        if r.goal is not None:
            met = r.goal_met
            notes.append("goal ≥ %g×: %s" % (r.goal, "met" if met else "**MISSED**" if met is False else "not checked"))
        if r.user is not None and r.user.median <= 0:
            notes.append("hybrid ≤ 0: no cost above the noise")
        lines.append("| %s | %s | %s | %s | %s |" % (r.name, report.fmt_stat(r.kernel), report.fmt_stat(r.user),
                                                     report.fmt_ratio(r.ratio), "; ".join(notes).replace("|", "/")))
    benches = [b for b in by_name.values()]
    if benches:
        def span(xs):
            return "%d" % xs[0] if min(xs) == max(xs) else "%d-%d" % (min(xs), max(xs))

        quick = any(b.get_metadata().get("hybrid_quick") for b in benches)
        lines += ["", "pyperf: %s values per benchmark, %s (%s)." % (
            span([b.get_nvalue() for b in benches]),
            "one process (--quick: noisy)" if quick else "from %s worker processes" % span([b.get_nrun()
                                                                                           for b in benches]),
            "kernel/hybrid > 1: hybrid cheaper")]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
