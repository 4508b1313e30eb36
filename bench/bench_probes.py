#!/usr/bin/env python3
"""pyperf benchmark of a probe hit: the kernel's uprobes against hybrid's in-process probes.

What one value is: the time per call of a tiny victim function called in a
C loop (``victim_loop(which, n)`` in ``programs/victims.c``, through one
ctypes call; pyperf ``inner_loops`` = n, so values are seconds per call),
with a counting program attached to the victim:

``<victim>/none``
    no probe: the baseline the summary subtracts (the call itself, ~3 ns);
``<victim>/<probe>/kernel``
    ``programs/probes.bpf.c`` (bare ``SEC("uprobe")`` sections) loaded by
    libbpf and attached with ``bpf_program__attach_uprobe`` to the victim's
    file offset, for this (worker) process;
``<victim>/<probe>/user``
    the same program bodies in ``SEC("uprobe/<victims.so>:victim_X")``
    sections, ``hybrid.load``-ed and attached in this process with
    ``BpfObject.attach(programs=...)`` (inline hook + trampoline calling the
    JIT's code).

for victims ``lea`` (the kernel single-steps the first instruction out of
line), ``push`` (the kernel emulates it) and ``nop5`` (the kernel optimizes a
uprobe on a 5-byte nop) and probes ``uprobe``, ``uretprobe`` and
``uprobe+uretprobe`` (both programs on the same victim).  See
``probe_programs.py``.

Every attached side is checked to fire exactly once per call (the programs
count their hits in an ARRAY map, read back through libbpf or hybrid's map)
before it is timed and again after every timed value; the victim's results
are checked too.  A probe that does not fire fails the benchmark.

The kernel ``lea`` rows cost ~10-20 us per call: they run ``victim_loop``
with n / 10 calls (:data:`KERNEL_LEA_DIVISOR`) so that a value stays around
0.1-0.2 s.  :func:`summarize` turns the JSON into the markdown table;
importing this module runs nothing.

Usage (normally through ``bench/run.py``)::

    python bench/bench_probes.py -o probes.json [--quick] [--sides kernel,user] [any pyperf option]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

import probe_programs as pp  # noqa: E402

SIDES = ("kernel", "user")
BASELINE = "none"
GOAL_RATIO = 10.0  # the user side must be at least this much cheaper than the kernel (added ns per call)

# Runner settings: (processes, values per process, min seconds per value) and calls per victim_loop.
FULL = (4, 4, 0.1)
QUICK = (1, 3, 0.02)
CALLS = {False: 100_000, True: 10_000}
KERNEL_LEA_DIVISOR = 10  # kernel lea rows: n / 10 calls per victim_loop (a single-step per hit, ~10-20 us)
PREFLIGHT_CALLS = 1000


def bench_name(victim: str, probe: str | None, side: str) -> str:
    return "%s/%s" % (victim, side) if side == BASELINE else "%s/%s/%s" % (victim, probe, side)


def calls_for(victim: str, side: str, n: int) -> int:
    """Victim calls per victim_loop (pyperf's inner_loops) of one benchmark."""
    return max(1, n // KERNEL_LEA_DIVISOR) if (side == "kernel" and victim == "lea") else n


# --- what one benchmark times (in pyperf's worker processes) ---------------------------


@dataclass(frozen=True)
class Paths:
    victims: str
    kernel_object: str
    user_object: str

    def artifacts(self) -> pp.Artifacts:
        return pp.Artifacts(Path(self.victims), Path(self.kernel_object), Path(self.user_object))


class Subject:
    """One victim with (or without) one probe on one side, attached and checked to fire."""

    def __init__(self, victim: str, probe: str | None, side: str, n: int, paths: Paths):
        self.victim = pp.VICTIM[victim]
        self.probe, self.side, self.n = probe, side, n
        self.victims = pp.Victims(paths.victims)
        self.probes = None if side == BASELINE else pp.attach(side, paths.artifacts(), self.victim, probe)
        self.what = bench_name(victim, probe, side)
        self.expected = self.victim.expected_sum(n)
        self.seen = self.probes.counts() if self.probes else None
        self.time(1)  # a checked, untimed first run: the probe fires once per call

    def time(self, loops: int) -> float:
        fn, which, n, expected = self.victims.fn, self.victim.which, self.n, self.expected
        it = range(loops)
        wrong = 0
        t0 = time.perf_counter()
        for _ in it:
            if fn(which, n) != expected:
                wrong += 1
        elapsed = time.perf_counter() - t0
        if wrong:
            raise RuntimeError("%s: victim_loop returned a wrong sum %d times out of %d" % (self.what, wrong, loops))
        if self.probes is not None:
            self.seen = pp.check_fired(self.probes, self.seen, self.probe, loops * n, self.what)
        return elapsed


_subjects: dict[str, Subject] = {}


def release_subjects() -> None:
    """Detach and close every cached subject (quick mode runs every benchmark in one process)."""
    while _subjects:
        _, subject = _subjects.popitem()
        if subject.probes is not None:
            subject.probes.close()


def time_subject(loops: int, victim: str, probe: str | None, side: str, n: int, paths: Paths) -> float:
    """pyperf time function: ``loops`` calls of victim_loop(victim, n); the first use attaches (untimed)."""
    name = bench_name(victim, probe, side)
    subject = _subjects.get(name)
    if subject is None:
        subject = _subjects[name] = Subject(victim, probe, side, n, paths)
    return subject.time(loops)


# --- parent-only checks --------------------------------------------------------------


def available_sides(wanted: tuple[str, ...], art: pp.Artifacts) -> tuple[tuple[str, ...], dict[str, str]]:
    """The sides of ``wanted`` that attach and fire here, and why the others do not."""
    found, missing = [], {}
    for side in wanted:
        problem = pp.side_problem(side, art)
        if problem:
            missing[side] = problem
            print("bench_probes: %s side not benchmarked: %s" % (side, problem), file=sys.stderr)
        else:
            found.append(side)
    return tuple(found), missing


def preflight(art: pp.Artifacts, sides: tuple[str, ...]) -> dict[str, str]:
    """Attach every (victim, probe) on every side once and check it fires once per call (fail early).

    Returns, per victim, what the kernel's uprobe left at its first instruction after the hits
    (``int3``, or ``call`` when the kernel optimized it): shown in the summary's kernel path column.
    """
    victims = pp.Victims(art.victims)
    kernel_insn = {}
    for side in sides:
        for v in pp.VICTIMS:
            for probe in pp.PROBES:
                n = calls_for(v.name, side, PREFLIGHT_CALLS)
                with pp.attach(side, art, v, probe) as p:
                    before = p.counts()
                    victims.loop(v, n)
                    pp.check_fired(p, before, probe, n, "preflight " + bench_name(v.name, probe, side))
                    if side == "kernel" and probe == "uprobe":
                        kernel_insn[v.name] = pp.patched_insn(victims, v)
                victims.loop(v, 10)  # detached: the victim still works
                if pp.patched_insn(victims, v) != v.name:
                    raise RuntimeError("%s: detaching left %s at %s" % (side, pp.patched_insn(victims, v), v.symbol))
    return kernel_insn


# --- the pyperf script --------------------------------------------------------------


def _forward_args(cmd: list[str], args) -> None:
    """Arguments pyperf's workers need to register the same benchmarks in the same order."""
    cmd.extend(("--sides", args.sides, "--victims", args.victims, "--kernel-object", args.kernel_object,
                "--user-object", args.user_object, "--calls", str(args.calls)))
    if args.missing:
        cmd.extend(("--missing", args.missing))
    if args.kernel_insn:
        cmd.extend(("--kernel-insn", args.kernel_insn))


def main() -> None:
    import harness

    runner, quick = harness.suite_runner(
        FULL,
        QUICK,
        add_cmdline_args=_forward_args,
        release=release_subjects,
        description="Probe hits: kernel uprobes against hybrid's in-process probes")
    runner.argparser.add_argument("--sides", default=",".join(SIDES),
                                  help="comma-separated sides among %s (default: all)" % ",".join(SIDES))
    runner.argparser.add_argument("--calls", type=int, default=CALLS[quick],
                                  help="victim calls per victim_loop (default %d; kernel lea rows: / %d)"
                                  % (CALLS[quick], KERNEL_LEA_DIVISOR))
    runner.argparser.add_argument("--victims", default=None, help="the built victims .so (default: build it)")
    runner.argparser.add_argument("--kernel-object", default=None, help=argparse.SUPPRESS)
    runner.argparser.add_argument("--user-object", default=None, help=argparse.SUPPRESS)
    runner.argparser.add_argument("--missing", default="", help=argparse.SUPPRESS)
    runner.argparser.add_argument("--kernel-insn", default="", help=argparse.SUPPRESS)
    args = runner.parse_args()
    wanted = tuple(s for s in args.sides.split(",") if s)
    unknown = [s for s in wanted if s not in SIDES]
    if unknown:
        runner.argparser.error("unknown side(s) %s (choose from %s)" % (", ".join(unknown), ", ".join(SIDES)))

    if not args.worker:
        if args.victims and args.kernel_object and args.user_object:
            art = pp.Artifacts(Path(args.victims), Path(args.kernel_object), Path(args.user_object))
        else:
            art = pp.build()
        args.victims, args.kernel_object, args.user_object = map(str, (art.victims, art.kernel_object,
                                                                       art.user_object))
        sides, missing = available_sides(wanted, art)
        args.sides = ",".join(sides)
        args.missing = "; ".join("%s: %s" % kv for kv in missing.items())
        kernel_insn = preflight(art, sides)  # fail early and clearly, before spawning workers
        args.kernel_insn = ",".join("%s=%s" % kv for kv in kernel_insn.items())
    sides = tuple(s for s in args.sides.split(",") if s)
    paths = Paths(args.victims, args.kernel_object, args.user_object)
    why = {"hybrid_missing": args.missing} if args.missing else {}
    kernel_insn = dict(kv.split("=", 1) for kv in args.kernel_insn.split(",") if kv)

    for v in pp.VICTIMS:
        for probe, side in [(None, BASELINE)] + [(p, s) for p in pp.PROBES for s in sides]:
            n = calls_for(v.name, side, args.calls)
            meta = {"hybrid_victim": v.name, "hybrid_probe": probe or BASELINE, "hybrid_side": side,
                    "hybrid_calls": n, **why}
            if side == "kernel" and v.name in kernel_insn:
                meta["hybrid_kernel_insn"] = kernel_insn[v.name]  # int3, or call (optimized)
            runner.bench_time_func(bench_name(v.name, probe, side), time_subject, v.name, probe, side, n, paths,
                                   inner_loops=n, metadata=meta)


# --- the summary ------------------------------------------------------------------


def _ns(bench) -> float | None:
    return None if bench is None else bench.median() * 1e9


def _sd(bench) -> float | None:
    if bench is None:
        return None
    return bench.stdev() * 1e9 if bench.get_nvalue() > 1 else 0.0


def _fmt(ns: float | None, sd: float | None = None) -> str:
    if ns is None:
        return "—"
    digits = 0 if abs(ns) >= 100 else 1 if abs(ns) >= 10 else 2
    if sd is None:
        return "{:,.{d}f}".format(ns, d=digits)
    return "{:,.{d}f} ± {:,.{d}f}".format(ns, sd, d=digits)


@dataclass
class Row:
    victim: pp.Victim
    probe: str
    kernel: object  # pyperf.Benchmark | None
    user: object
    base: object  # the victim's no-probe baseline

    @property
    def kernel_path(self) -> str:
        """What the kernel does on a hit, with the instruction its uprobe left there when it was measured."""
        insn = self.kernel.get_metadata().get("hybrid_kernel_insn") if self.kernel is not None else None
        if insn is None:
            return self.victim.kernel_path
        if self.victim.name == "nop5" and insn != "call":
            return "nop5 **not** optimized (%s)" % insn
        return "%s (%s)" % (self.victim.kernel_path, "int3 → call" if insn == "call" else insn)

    def added(self, side: str) -> float | None:
        """ns per call over the baseline on ``side``."""
        b = getattr(self, side)
        if b is None or self.base is None:
            return None
        return _ns(b) - _ns(self.base)

    @property
    def ratio(self) -> float | None:
        """kernel / user, added ns per call (> 1: hybrid cheaper)."""
        k, u = self.added("kernel"), self.added("user")
        if k is None or u is None or u <= 0:
            return None
        return k / u

    @property
    def goal_met(self) -> bool | None:
        r = self.ratio
        return None if r is None else r >= GOAL_RATIO


def _load(json_path: Path | str) -> dict:
    from report import benchmarks

    return benchmarks(json_path)


def missing_reason(by_name: dict) -> str | None:
    for b in by_name.values():
        reason = b.get_metadata().get("hybrid_missing")
        if reason:
            return reason
    return None


def load_rows(json_path: Path | str) -> list[Row]:
    by_name = _load(json_path)
    rows = []
    for v in pp.VICTIMS:
        base = by_name.get(bench_name(v.name, None, BASELINE))
        for probe in pp.PROBES:
            rows.append(Row(v, probe, by_name.get(bench_name(v.name, probe, "kernel")),
                            by_name.get(bench_name(v.name, probe, "user")), base))
    return rows


def missed_goals(json_path: Path | str) -> list[str]:
    return ["probes/%s/%s: kernel %.0f ns, user %.0f ns per call (%.1fx, goal %.0fx)"
            % (r.victim.name, r.probe, r.added("kernel"), r.added("user"), r.ratio, GOAL_RATIO)
            for r in load_rows(json_path) if r.goal_met is False]


def rows(json_path: Path | str) -> list:
    """The consolidated report's rows (bench/report.py): added ns per call, kernel against user."""
    from report import Row, Stat

    reason = missing_reason(_load(json_path)) or ""
    out = []
    for r in load_rows(json_path):
        base = Stat.of(r.base)
        kernel = Stat.of(r.kernel, minus=base) if base is not None else None
        user = Stat.of(r.user, minus=base) if base is not None else None
        why = reason or ("no baseline measured" if base is None else "")
        out.append(Row("probes", "%s: %s" % (r.victim.name, r.probe), "ns added/call", kernel, user,
                       reason=why, note="kernel path: %s" % r.kernel_path, goal=GOAL_RATIO))
    return out


def summarize(json_path: Path | str) -> str:
    """The markdown report of a probes JSON written by this script."""
    import bench_engines  # machine_line

    by_name = _load(json_path)
    rows = load_rows(json_path)
    reason = missing_reason(by_name)
    calls: dict[str, set] = {}  # "lea-kernel" (the kernel lea rows) or "other" -> victim calls per victim_loop
    for b in by_name.values():
        md = b.get_metadata()
        if md.get("hybrid_calls"):
            key = "lea-kernel" if (md.get("hybrid_victim"), md.get("hybrid_side")) == ("lea", "kernel") else "other"
            calls.setdefault(key, set()).add(int(md["hybrid_calls"]))

    def n_calls(key: str, default: str) -> str:
        return "/".join("{:,}".format(n) for n in sorted(calls[key])) if calls.get(key) else default
    lines = [
        "# Probe hits: kernel uprobes vs hybrid's in-process probes",
        "",
        bench_engines.machine_line() + ".",
        "",
        "Times are **ns per call** of a tiny victim function called in a C loop (`victim_loop`, %s calls per "
        "ctypes call), with a counting eBPF program (one ARRAY lookup + atomic add, `programs/probes.bpf.c`) "
        "attached to it; **added** = the time minus the victim's own time without a probe (baseline column), "
        "median ± stdev of the pyperf values. **kernel**: libbpf `bpf_program__attach_uprobe` at the victim's "
        "file offset, for the benchmark's process; **user**: `hybrid.load` of the same program bodies, "
        "`obj.attach()` in the process (inline hook + trampoline, JIT'd code). The victims differ in their "
        "first instruction, which decides the kernel's path: `lea` is single-stepped out of line, `push` "
        "emulated, `nop5` (a 5-byte nop) optimized. The kernel `lea` rows use %s calls per ctypes call "
        "(1/%d: ~10-20 µs per hit). Every probe is checked to fire once per call (its map count) before "
        "and after each timed value. Goal: hybrid at least %.0f× cheaper than the kernel (added ns) on "
        "every row."
        % (n_calls("other", "n"), n_calls("lea-kernel", "n / %d" % KERNEL_LEA_DIVISOR), KERNEL_LEA_DIVISOR,
           GOAL_RATIO),
        "",
        "| victim | kernel path | probe | kernel added | user added | kernel/user | baseline (no probe) "
        "| goal (≥ %.0f×) |" % GOAL_RATIO,
        "|---|---|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        if r.goal_met is None:
            why = []
            if r.kernel is None:
                why.append("no kernel result")
            if r.user is None:
                why.append("no user result")
            goal = "— (%s%s)" % (", ".join(why) or "not comparable", ": " + reason if reason else "")
        elif r.goal_met:
            goal = "met"
        else:
            goal = "**MISSED** (%.1f×)" % r.ratio
        lines.append("| %s | %s | %s | %s | %s | %s | %s | %s |" % (
            r.victim.name, r.kernel_path, "**%s**" % r.probe if r.goal_met is False else r.probe,
            _fmt(r.added("kernel"), _sd(r.kernel)), _fmt(r.added("user"), _sd(r.user)),
            "—" if r.ratio is None else "%.1f×" % r.ratio, _fmt(_ns(r.base), _sd(r.base)), goal))

    missed = ["%s/%s" % (r.victim.name, r.probe) for r in rows if r.goal_met is False]
    unknown = ["%s/%s" % (r.victim.name, r.probe) for r in rows if r.goal_met is None]
    lines.append("")
    if missed:
        lines.append("**Goal missed** on %s: hybrid's probe is less than %.0f× cheaper than the kernel's."
                     % (", ".join(missed), GOAL_RATIO))
    elif unknown:
        lines.append("Goal not checked on %s (missing results%s)." % (", ".join(unknown),
                                                                     ": " + reason if reason else ""))
    else:
        lines.append("Goal met: hybrid's probes are at least %.0f× cheaper than the kernel's on every row."
                     % GOAL_RATIO)
    benches = [b for r in rows for b in (r.kernel, r.user) if b is not None]
    if benches:
        def span(xs):
            return "%d" % xs[0] if min(xs) == max(xs) else "%d-%d" % (min(xs), max(xs))

        lines.append("")
        lines.append("pyperf: %s values per row and side, from %s runs (worker processes, with calibration)."
                     % (span([b.get_nvalue() for b in benches]), span([b.get_nrun() for b in benches])))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
