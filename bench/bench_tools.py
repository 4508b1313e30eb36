#!/usr/bin/env python3
"""The ported bcc tools against Debian's bcc tools: what each adds to the traced workload, in one run.

Every measurement of ``bench_tools_funclatency.py`` and ``bench_tools_snoop.py``
(their functions, see their docstrings for the workloads), written as pyperf JSON.
A C workload times its own loop; each tool is attached (``-p PID``) before the
loop starts and its output is checked afterwards (exact counts, the leak
reported, every openat printed or counted lost).  Benchmarks are named
``tools/<tool>/<case>/<side>``, their values the workload's **loop time per
call** (seconds; one value per run, ``loops`` 1, ``inner_loops`` the calls):

==============  ===============  ============================================================
tool            case             workload
==============  ===============  ============================================================
funclatency     lea, push        calls of a noinline function starting with ``lea`` (the kernel
                                 single-steps it) / ``push %rbx`` (the kernel emulates it)
syscount        getppid          ``syscall(SYS_getppid)`` calls
syscount        getppid-other    the same loop in another process, untraced, while the tool
                                 traces the first one
memleak         alloc            malloc(64..319)/free pairs, then 1,000 kept malloc(100)
opensnoop       openat           ENOENT openat calls
opensnoop       openat-other     the same loop in another process, untraced, while the tool
                                 traces the first one
==============  ===============  ============================================================

sides: ``untraced``; ``bcc`` (Debian's ``*-bpfcc``); ``port`` (``tools/bcc_ports/*.py``, in
user mode: the probes inside the traced process); ``hybrid-bcc`` (funclatency: Debian's
``funclatency-bpfcc`` itself, unmodified, under ``hybrid bcc``: its uprobes inside the
traced process, see ``hybrid/compat/bcc.py``); ``port-kernel`` (the port's ``--mode
kernel``: memleak's kernel uprobes in full runs, opensnoop's syscalls tracepoints, which
stand for bcc's opensnoop when it does not run: it is tried, and its error kept as the
benchmarks' ``hybrid_bcc_problem``).  A side that could not run has no benchmark; the
case's ``untraced`` benchmark says why (``hybrid_missing_<side>``).

Full runs: 10M function calls x 3 runs (bcc's ``lea`` case 1M: ~17 µs a call, 3 minutes
for 10M), 1M getppid x 5 runs, 2M malloc/free pairs, 200k openat x 5 runs (runs
interleaved, medians reported); about 6 minutes.  ``--quick``: 1M calls (bcc's 100k), 200k getppid, 500k pairs (bcc's 50k),
20k openat, one run each, no memleak kernel mode; about half a minute.

:func:`rows`, :func:`summarize` and :func:`missed_goals` read the JSON; importing this module
runs nothing.

    python bench/bench_tools.py -o OUT.json [--quick] [--quiet] [--only TOOL ...]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
for _p in (str(BENCH_DIR), str(ROOT)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import bench_tools_funclatency as fl  # noqa: E402
import bench_tools_snoop as sn  # noqa: E402

SUITE = "tools"
TOOLS = ("funclatency", "syscount", "memleak", "opensnoop")
GOALS = {"funclatency": fl.GOAL, "memleak": sn.GOAL_MEMLEAK, "syscount": 1.0, "opensnoop": 1.0}
CASE_OF = {"work": "lea", "work_push": "push", "getppid": "getppid"}
USER_LABEL = "port (probes in the process)"
HYBRID_BCC_LABEL = "bcc's tool under hybrid bcc (probes in the process)"


@dataclass(frozen=True)
class Sizes:
    calls: int                # function calls per loop: untraced and the port
    bcc_calls: dict           # workload -> calls under bcc
    syscalls: int
    syscall_repeat: int
    fn_repeat: int            # runs of the function cases (interleaved, medians reported)
    repeat: int               # runs of the memleak cases
    pairs: int                # malloc/free pairs: untraced and the port
    bcc_pairs: int            # under memleak-bpfcc and the port's kernel mode
    opens: int
    open_repeat: int
    memleak_kernel: bool      # also the memleak port's --mode kernel


FULL = Sizes(10_000_000, {"work": 1_000_000, "work_push": 10_000_000}, 1_000_000, 5, 3, 1,
             2_000_000, 2_000_000, 200_000, 5, True)
QUICK = Sizes(1_000_000, {"work": 100_000, "work_push": 100_000}, 200_000, 1, 1, 1,
              500_000, 50_000, 20_000, 1, False)


def bench_name(tool: str, case: str, side: str) -> str:
    return "%s/%s/%s/%s" % (SUITE, tool, case, side)


def _command(argv: list[str] | None) -> str:
    if argv is None:
        return "untraced"
    short = ["python" if a == fl.PYTHON else os.path.relpath(a, ROOT) if a.startswith(str(ROOT) + "/") else a
             for a in argv]
    return " ".join(short)


def bcc_version() -> str:
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "python3-bpfcc"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        out = ""
    return out.split("+")[0] or "?"


def _one_line(text: str) -> str:
    return " ".join(str(text).split())[:400] or "failed"


@dataclass
class Case:
    """The benchmarks of one (tool, case), written together (the untraced one says which side is missing)."""

    tool: str
    case: str
    metadata: dict                       # common to every side
    benches: list = field(default_factory=list)
    missing: dict = field(default_factory=dict)

    def add(self, side: str, times: list[float], n: int, argv: list[str] | None, check: str, ok: bool) -> None:
        import pyperf

        md = {"name": bench_name(self.tool, self.case, side), "unit": "second", "loops": 1, "inner_loops": n,
              "hybrid_tool": self.tool, "hybrid_case": self.case, "hybrid_side": side, "hybrid_calls": n,
              "hybrid_runs": len(times), "hybrid_command": _command(argv), "hybrid_check": check,
              "hybrid_check_ok": int(bool(ok))}
        md.update(self.metadata)
        self.benches.append(pyperf.Benchmark([pyperf.Run([t / n for t in times], metadata=md,
                                                         collect_metadata=False)]))

    def fail(self, side: str, why: str) -> None:
        self.missing[side] = _one_line(why)
        print("%s: not measured: %s" % (bench_name(self.tool, self.case, side), self.missing[side]),
              file=sys.stderr, flush=True)

    def write(self, output: str | None, quiet: bool) -> None:
        import pyperf

        for b in self.benches:
            if b.get_metadata()["hybrid_side"] == "untraced" and self.missing:
                # the reason a side is absent travels with the case's baseline
                run = b.get_runs()[0]
                md = dict(run.get_metadata())
                md.update({"hybrid_missing_" + k: v for k, v in self.missing.items()})
                b = pyperf.Benchmark([pyperf.Run(run.values, metadata=md, collect_metadata=False)])
            if not quiet:
                print("%s: %s" % (b.get_name(), b.format_value(b.median())), flush=True)
            if output:
                pyperf.add_runs(output, b)


def _bcc_missing(path: str) -> str | None:
    return None if os.access(path, os.X_OK) else "%s is not installed (apt-get install bpfcc-tools)" % path


def _try(case: Case, side: str, fn):
    """``fn()``, or None with the side recorded as missing (the tool failed to start or to run)."""
    try:
        return fn()
    except fl.TOOL_ERRORS as e:
        case.fail(side, "%s: %s" % (type(e).__name__, e))
        return None


# --- funclatency and syscount ----------------------------------------------------------


def measure_functions(sizes: Sizes, only: tuple[str, ...], output: str | None, quiet: bool, common: dict) -> None:
    exe = fl.build()
    for c in fl.cases(exe):
        if c.tool not in only:
            continue
        sys_ = c.workload == "getppid"
        n = sizes.syscalls if sys_ else sizes.calls
        nb = n if sys_ else sizes.bcc_calls[c.workload]
        repeat = sizes.syscall_repeat if sys_ else sizes.fn_repeat
        insn = "syscall" if sys_ else fl.first_instruction(exe, c.workload)
        case = Case(c.tool, CASE_OF[c.workload], dict(common, hybrid_first_insn=insn, hybrid_workload=c.workload))
        other = Case(c.tool, CASE_OF[c.workload] + "-other", dict(common, hybrid_first_insn=insn,
                                                                   hybrid_workload=c.workload)) if c.other else None
        sides = {"untraced": (n, None, False)}
        tools = [("bcc", c.bcc, nb), ("port", c.port, n)]
        if c.hybrid_bcc:
            tools.append(("hybrid-bcc", c.hybrid_bcc, n))
        for side, argv, calls in tools:
            why = _bcc_missing(c.bcc[0]) if side in ("bcc", "hybrid-bcc") else None
            if why:
                case.fail(side, why)
            else:
                sides[side] = (calls, argv, c.other)
        for side, m in fl.measure_sides(exe, c.workload, sides, repeat).items():
            calls, argv, _ = sides[side]
            if isinstance(m, Exception):
                case.fail(side, "%s: %s" % (type(m).__name__, m))
                continue
            if argv is None:
                case.add(side, m.times, calls, None, "untraced", True)
                continue
            got = c.count(m.output)
            case.add(side, m.times, calls, argv, "count %d of %d" % (got, calls), got == calls)
            if other is not None:
                other.add(side, m.other, calls, argv, "untraced while the tool traced another process; the "
                          "tool counted %d of the traced process's %d" % (got, calls), got == calls)
        case.write(output, quiet)
        if other is not None:
            other.write(output, quiet)


# --- memleak -------------------------------------------------------------------------


def measure_memleak(sizes: Sizes, output: str | None, quiet: bool, common: dict) -> None:
    exe = sn.build()
    case = Case("memleak", "alloc", dict(common, hybrid_workload="alloc"))
    base = sn.memleak_measure(exe, sizes.pairs, None, max(sizes.repeat, 3))
    case.add("untraced", base.times, sizes.pairs, None, "untraced", True)
    sides = [("bcc", [sn.MEMLEAK_BCC], sizes.bcc_pairs), ("port", sn.MEMLEAK_PORT, sizes.pairs)]
    if sizes.memleak_kernel:
        sides.append(("port-kernel", sn.MEMLEAK_PORT + ["--mode", "kernel"], sizes.bcc_pairs))
    for side, argv, n in sides:
        why = _bcc_missing(argv[0]) if side == "bcc" else None
        if why:
            case.fail(side, why)
            continue
        m = _try(case, side, lambda: sn.memleak_measure(exe, n, argv, sizes.repeat))
        if m is not None:
            case.add(side, m.times, n, argv, m.check, m.ok)
    # the last tool may still be exiting: opensnoop's first timed loop waits for it (sn.settle)
    if not sizes.memleak_kernel:
        case.missing["port-kernel"] = "not run in quick mode"
    case.write(output, quiet)


# --- opensnoop -----------------------------------------------------------------------


def measure_opensnoop(sizes: Sizes, output: str | None, quiet: bool, common: dict) -> None:
    exe = sn.build()
    # bcc's opensnoop, tried briefly on an idle process: does it run here?
    problem = _bcc_missing(sn.OPENSNOOP_BCC) or sn.tool_problem([sn.OPENSNOOP_BCC],
                                                                 lambda line: line.startswith("PID "))
    md = dict(common, hybrid_workload="open")
    if problem:
        md["hybrid_bcc_problem"] = _one_line(problem)
    case, other = Case("opensnoop", "openat", dict(md)), Case("opensnoop", "openat-other", dict(md))
    tools = {"untraced": None, "port": sn.OPENSNOOP_PORT, "port-kernel": sn.OPENSNOOP_PORT + ["--mode", "kernel"]}
    if not problem:
        tools["bcc"] = [sn.OPENSNOOP_BCC]
    else:
        case.missing["bcc"] = _one_line(problem)
    ms = sn.opensnoop_measure(exe, sizes.opens, tools, sizes.open_repeat)
    for side, m in list(ms.items()):
        if isinstance(m, Exception):
            case.fail(side, "%s: %s" % (type(m).__name__, m))
            del ms[side]
    for side, m in ms.items():
        case.add(side, m.times, sizes.opens, tools[side], m.check, m.ok)
        if side != "untraced":
            other.add(side, m.other, sizes.opens, tools[side], "untraced while the tool traced another process; "
                      "the tool's check there: " + m.check, m.ok)
    case.write(output, quiet)
    other.write(output, quiet)


def main(argv: list[str] | None = None) -> int:
    from harness import take_quick

    argv = list(sys.argv[1:] if argv is None else argv)
    quick = take_quick(argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-o", "--output", help="pyperf JSON file to write (must not exist)")
    ap.add_argument("-q", "--quiet", action="store_true", help="no line per benchmark")
    ap.add_argument("--only", nargs="+", choices=TOOLS, default=list(TOOLS), help="some tools only")
    args, unknown = ap.parse_known_args(argv)
    if unknown:
        print("bench_tools: ignoring %s (not a pyperf Runner: no pyperf options)" % " ".join(unknown),
              file=sys.stderr)
    if args.output and os.path.exists(args.output):
        ap.error("%s exists (pyperf would add to it): remove it first" % args.output)
    if os.geteuid() != 0:
        print("bench_tools: needs root (bcc, and the ports' probes in another process)", file=sys.stderr)
        return 2
    sizes = QUICK if quick else FULL
    common = {"hybrid_bcc_version": bcc_version(), "hybrid_mode": "quick" if quick else "full"}
    t0 = time.monotonic()
    only = tuple(args.only)
    try:
        if "funclatency" in only or "syscount" in only:
            measure_functions(sizes, only, args.output, args.quiet, common)
        if "memleak" in only:
            measure_memleak(sizes, args.output, args.quiet, common)
        if "opensnoop" in only:
            measure_opensnoop(sizes, args.output, args.quiet, common)
    finally:
        sn.settle()
    if not args.quiet:
        print("bench_tools: done in %.0f s" % (time.monotonic() - t0), file=sys.stderr)
    return 0


# --- the report ------------------------------------------------------------------------


def _load(json_path) -> dict:
    import pyperf

    return {b.get_name(): b for b in pyperf.BenchmarkSuite.load(str(json_path)).get_benchmarks()}


@dataclass(frozen=True)
class RowSpec:
    tool: str
    case: str           # the benchmarks' case
    name: str
    base_case: str      # the case whose untraced benchmark is the baseline
    goal: float | None
    user_side: str = "port"  # the side standing for userspace: the port, or bcc's tool under hybrid bcc

    @property
    def user_label(self) -> str:
        return HYBRID_BCC_LABEL if self.user_side == "hybrid-bcc" else USER_LABEL


ROW_SPECS = (
    RowSpec("funclatency", "lea", "funclatency: function starting with `lea`", "lea", GOALS["funclatency"]),
    RowSpec("funclatency", "push", "funclatency: function starting with `push`", "push", GOALS["funclatency"]),
    RowSpec("syscount", "getppid", "syscount: getppid", "getppid", GOALS["syscount"]),
    RowSpec("syscount", "getppid-other", "syscount: untraced process", "getppid", None),
    RowSpec("memleak", "alloc", "memleak: malloc+free pair", "alloc", GOALS["memleak"]),
    RowSpec("opensnoop", "openat", "opensnoop: openat", "openat", GOALS["opensnoop"]),
    RowSpec("opensnoop", "openat-other", "opensnoop: untraced process", "openat", None),
    RowSpec("funclatency", "lea", "funclatency-bpfcc under `hybrid bcc`: function starting with `lea`", "lea",
            GOALS["funclatency"], "hybrid-bcc"),
    RowSpec("funclatency", "push", "funclatency-bpfcc under `hybrid bcc`: function starting with `push`", "push",
            GOALS["funclatency"], "hybrid-bcc"),
)


def _md(bench, key, default=None):
    return default if bench is None else bench.get_metadata().get(key, default)


def _kernel_side(spec: RowSpec, by: dict) -> tuple[str, str]:
    """The side standing for the kernel in this row, and its label."""
    base = by.get(bench_name(spec.tool, spec.base_case, "untraced"))
    version = _md(base, "hybrid_bcc_version", "?")
    if spec.tool == "opensnoop" and by.get(bench_name(spec.tool, spec.case, "bcc")) is None:
        problem = _md(base, "hybrid_bcc_problem") or _md(base, "hybrid_missing_bcc") or "not measured"
        return "port-kernel", ("kernel tracepoints (port --mode kernel): opensnoop-bpfcc does not run here (%s)"
                               % sn.refused_what(problem))
    how = {"funclatency": "kernel uprobes", "memleak": "kernel uprobes", "syscount": "raw_syscalls tracepoints",
           "opensnoop": "kernel probes"}[spec.tool]
    return "bcc", "bcc %s (%s)" % (version, how)


@dataclass(frozen=True)
class Line:
    """A row, with the benchmarks the summary shows beside it."""

    row: object          # report.Row
    spec: RowSpec
    base: object         # pyperf.Benchmark | None
    kernel: object
    user: object


def _lines(json_path) -> list[Line]:
    from report import Row, Stat

    by = _load(json_path)
    out = []
    for spec in ROW_SPECS:
        base = by.get(bench_name(spec.tool, spec.base_case, "untraced"))
        if base is None and not any(k.startswith("%s/%s/" % (SUITE, spec.tool)) for k in by):
            continue  # that tool was not run (--only)
        kside, klabel = _kernel_side(spec, by)
        kb, ub = by.get(bench_name(spec.tool, spec.case, kside)), by.get(bench_name(spec.tool, spec.case,
                                                                                    spec.user_side))
        bstat = Stat.of(base)
        kernel = Stat.of(kb, minus=bstat) if kb is not None and bstat is not None else None
        user = Stat.of(ub, minus=bstat) if ub is not None and bstat is not None else None
        why = []
        for side, stat in (("kernel", kernel), ("user", user)):
            if stat is None:
                s = kside if side == "kernel" else spec.user_side
                why.append("%s side (%s): %s" % (side, s, "no untraced baseline" if bstat is None else
                                                 _md(base, "hybrid_missing_" + s, "not measured in this run")))
        notes = []
        if kb is not None and ub is not None:
            nk, nu = _md(kb, "hybrid_calls"), _md(ub, "hybrid_calls")
            notes.append("calls per loop: %s%s" % (format(nu, ","), "" if nk == nu else " (kernel side %s)"
                                                   % format(nk, ",")))
        if spec.case.endswith("-other"):
            notes.append("added to another process running the same loop, untraced, while each tool traces "
                         "the first; the port runs nothing there: its value is run-to-run noise and kernel/port "
                         "is not meaningful")
        if spec.tool == "memleak":
            pk = by.get(bench_name("memleak", "alloc", "port-kernel"))
            if pk is not None and bstat is not None:
                notes.append("the port in --mode kernel (kernel uprobes): %s ns" % "{:,.0f}".format(
                    Stat.of(pk, minus=bstat).median))
        bad = [b.get_name().split("/")[-1] for b in (kb, ub) if b is not None and not _md(b, "hybrid_check_ok", 0)]
        if bad:
            notes.append("**check FAILED** (%s)" % ", ".join(bad))
        if spec.user_side == "hybrid-bcc":
            notes.append("the same funclatency-bpfcc, unmodified, with its uprobe and uretprobe run in the "
                         "process by `hybrid bcc`")
        row = Row(SUITE, spec.name, "ns added/call", kernel, user, reason="; ".join(why),
                  kernel_label=klabel, user_label=spec.user_label, note="; ".join(notes), goal=spec.goal,
                  no_ratio="the port runs nothing in this process: its value is noise"
                  if spec.case.endswith("-other") else "")
        out.append(Line(row, spec, base, kb, ub))
    return out


def rows(json_path) -> list:
    """The consolidated report's rows (bench/report.py): ns added per call (traced - untraced loop time)
    by bcc's tool (or the kernel's tracepoints, for opensnoop) and by the port."""
    return [ln.row for ln in _lines(json_path)]


def failed_checks(json_path) -> list[str]:
    return ["%s: check failed: %s" % (name, _md(b, "hybrid_check")) for name, b in _load(json_path).items()
            if not _md(b, "hybrid_check_ok", 1)]


def missed_goals(json_path) -> list[str]:
    out = ["%s/%s: %s %.0f, %s %.0f ns added/call (%.1fx, goal %gx)"
           % (SUITE, ln.row.name, ln.row.kernel_label.split(" (")[0], ln.row.kernel.median,
              "port" if ln.spec.user_side == "port" else "under hybrid bcc", ln.row.user.median,
              ln.row.ratio, ln.row.goal) for ln in _lines(json_path) if ln.row.goal_met is False]
    return out + ["%s/%s" % (SUITE, x) for x in failed_checks(json_path)]


def _ns(stat) -> str:
    from report import fmt_stat

    return fmt_stat(stat)


def summarize(json_path) -> str:
    """The markdown report of a tools JSON written by this script."""
    import bench_engines  # machine_line
    from report import fmt, fmt_ratio

    lines_ = _lines(json_path)
    by = _load(json_path)
    any_b = next(iter(by.values()), None)
    quick = _md(any_b, "hybrid_mode") == "quick"
    out = [
        "# bcc tools: the ports against Debian's bcc",
        "",
        bench_engines.machine_line() + "; bcc %s (Debian)." % _md(any_b, "hybrid_bcc_version", "?"),
        "",
        "A C workload times its own loop (CLOCK_MONOTONIC) with each tool attached to it (`-p PID`) before the "
        "loop starts: untraced, under Debian's `*-bpfcc` tool, and under the port (`tools/bcc_ports/*.py`, the "
        "probes inside the process); for funclatency also under Debian's `funclatency-bpfcc` itself run by "
        "`hybrid bcc` (its uprobes inside the process; the last two rows). The userspace column is the port's, "
        "or bcc's tool's under `hybrid bcc` in those rows. "
        "**ns added/call** = (traced − untraced loop time) per call, median ± stdev "
        "over the runs (a call: one function call, getppid, malloc+free pair or openat). Every tool's output "
        "is checked: exact counts, the leak reported (1,000 allocations of 100 bytes), every openat printed "
        "or counted lost. The \"untraced process\" rows: a second process runs the same loop, untraced, "
        "while the tool traces the first. Goals (**kernel/userspace**, the time bcc adds over the userspace "
        "side's): "
        "funclatency ≥ 100×, memleak ≥ 20×, syscount and opensnoop ≥ 1× (the port adds less)."
        + (" Quick run: few calls, one run each; noisy." if quick else ""),
        "",
        "| what | kernel side | untraced ns/call | kernel added | userspace added | kernel/userspace | goal | "
        "calls | check |",
        "|---|---|---:|---:|---:|---:|---|---|---|",
    ]
    for ln in lines_:
        r = ln.row
        if r.goal is None:
            goal = "—"
        elif r.goal_met is None:
            goal = "not checked (%s)" % r.reason
        else:
            goal = "≥ %g×: %s" % (r.goal, "met" if r.goal_met else "**MISSED**")
        calls = "—"
        if ln.kernel is not None and ln.user is not None:
            nk, nu = _md(ln.kernel, "hybrid_calls"), _md(ln.user, "hybrid_calls")
            calls = "{:,}".format(nu) if nk == nu else "{:,} (kernel side {:,})".format(nu, nk)
            calls += " × %d run%s" % (_md(ln.user, "hybrid_runs", 1), "" if _md(ln.user, "hybrid_runs", 1) == 1
                                      else "s")
        checks = []
        for b in (ln.kernel, ln.user):
            if b is not None:
                c = _md(b, "hybrid_check", "")
                checks.append(c if _md(b, "hybrid_check_ok", 0) else "**%s**" % c)
        if ln.spec.case.endswith("-other"):
            checks = ["(the tool's own check: in the row above)"]
        base = "—" if ln.base is None else fmt(ln.base.median() * 1e9)
        ratio = "— (port: noise)" if ln.spec.case.endswith("-other") else fmt_ratio(r.ratio)
        out.append("| %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
            r.name, r.kernel_label, base, _ns(r.kernel), _ns(r.user), ratio, goal, calls,
            " / ".join(checks).replace("|", "/") or r.reason))
    opens = by.get(bench_name("opensnoop", "openat", "untraced"))
    problem = _md(opens, "hybrid_bcc_problem")
    out.append("")
    if problem:
        out.append("opensnoop-bpfcc was tried and does not run here: `%s`; the kernel side of the opensnoop "
                   "rows is the port's `--mode kernel` (the same program on the syscalls tracepoints)." % problem)
    pk = by.get(bench_name("memleak", "alloc", "port-kernel"))
    mb = by.get(bench_name("memleak", "alloc", "untraced"))
    if pk is not None and mb is not None:
        out.append("memleak's port in `--mode kernel` (the same programs as kernel uprobes) adds %s ns per pair."
                   % fmt((pk.median() - mb.median()) * 1e9))
    kl = by.get(bench_name("funclatency", "lea", "bcc"))
    ul = by.get(bench_name("funclatency", "lea", "port"))
    if kl is not None and ul is not None and _md(kl, "hybrid_calls") != _md(ul, "hybrid_calls"):
        out.append("bcc's funclatency on the `lea` function makes %s calls per loop (%s µs each, single-stepped "
                   "by the kernel), the others %s: the values are per call." % (
                       "{:,}".format(_md(kl, "hybrid_calls")), fmt(kl.median() * 1e6),
                       "{:,}".format(_md(ul, "hybrid_calls"))))
    missed = missed_goals(json_path)
    out.append("Goals: " + ("all met." if not missed else "**MISSED**: " + "; ".join(missed) + "."))
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main())
