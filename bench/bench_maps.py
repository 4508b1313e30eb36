#!/usr/bin/env python3
"""pyperf benchmark of map operations: hybrid's JIT'd code against the kernel.

One eBPF object (``programs/maps.bpf.c``, see ``map_programs.py``) has a
program per (map type, operation), each doing ``NR_OPS`` = 1000 operations
per run on varying keys of a pre-filled map, and ``empty_loop``, the same
loop without the map operation.  Each program is timed on each side:

``<program>/kernel``
    loaded by libbpf, run with ``BPF_PROG_TEST_RUN`` (``repeat`` = pyperf's
    loops, one syscall per value); the time is the kernel's own measurement
    (``duration``: mean ns per run, syscall and setup excluded).
``<program>/jit``, ``<program>/aot``
    loaded by ``hybrid.load``; the engine's native entry is called through
    ctypes in a tight loop (the ctypes call, ~0.1-0.3 us, is included).

Values are seconds per *operation* (pyperf ``inner_loops`` = NR_OPS).  The
parent process also measures, after the pyperf benchmarks:

``<program>/kernel-wall``
    wall-clock time of ``BPF_PROG_TEST_RUN`` syscalls (with ``repeat``
    runs each), per operation;
``compile/jit/<program>``
    the JIT's compile time, with the number of ``hybrid_helper_map_*``
    calls left in the optimized IR as metadata (``hybrid_helper_calls``,
    e.g. ``map_lookup_elem=0``): how the array lookup inlining is checked.

Every side is checked to return the expected r0 (all operations
succeeded) before it is timed.  :func:`summarize` turns the JSON into the
markdown table; importing this module runs nothing.

Usage (normally through ``bench/run.py``)::

    python bench/bench_maps.py -o maps.json [--quick] [--sides kernel,jit,aot] [any pyperf option]
"""

from __future__ import annotations

import importlib
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

import map_programs as mp  # noqa: E402

SIDES = ("kernel", "jit", "aot")
USER = ("jit", "aot")

# Runner settings: (processes, values per process, min seconds per value).
FULL = (4, 3, 0.1)
QUICK = (1, 3, 0.02)
# BPF_PROG_TEST_RUN wall-clock values per program, measured in the parent (values, ~seconds each).
WALL = {False: (10, 0.02), True: (3, 0.01)}
COMPILE_REPEAT = {False: 3, True: 1}


def bench_name(program: str, side: str) -> str:
    return "%s/%s" % (program, side)


def compile_name(program: str) -> str:
    return "compile/jit/%s" % program


def available_sides(wanted: tuple[str, ...], obj_path: Path) -> tuple[tuple[str, ...], dict[str, str]]:
    """The sides of ``wanted`` that work here, and why the others do not."""
    found, missing = [], {}
    for side in wanted:
        if side == "kernel":
            problem = mp.kernel_problem(obj_path)
        else:
            try:
                importlib.import_module("hybrid.user." + side)
                problem = None
            except ImportError as e:
                problem = "engine %s not available: %s" % (side, e)
        if problem:
            missing[side] = problem
            print("bench_maps: %s side not benchmarked: %s" % (side, problem), file=sys.stderr)
        else:
            found.append(side)
    return tuple(found), missing


# --- what one benchmark times (in pyperf's worker processes) ---------------------------


_subjects: dict[tuple[str, str], object] = {}


class KernelSubject:
    def __init__(self, program: str, obj_path: Path):
        self.program = program
        self.k = mp.KernelObject(obj_path, [program])
        m = mp.program_map(program)
        if m:
            mp.fill(self.k, [m])
        self.fd = self.k.prog_fd(program)
        self.expected = mp.expected_r0(program)
        self.check(self.k.run(program)[0])

    def check(self, r0: int) -> None:
        if r0 != self.expected:
            raise RuntimeError("%s in the kernel returned %d, expected %d: not the benchmarked work"
                               % (self.program, r0, self.expected))

    def time(self, loops: int) -> float:
        r0, ns = self.k.test_run(self.fd, self.k.opts(loops))
        self.check(r0)
        return ns * loops * 1e-9  # the kernel's mean per run, times the runs


class UserSubject:
    def __init__(self, program: str, engine: str, obj_path: Path):
        self.u = mp.UserObject(obj_path)
        m = mp.program_map(program)
        if m:
            mp.fill(self.u, [m])
        self.program, self.engine = program, engine
        self.call = mp.NativeEntry(self.u.engine(program, engine).address)
        r0, self.expected = self.call(0, 0), mp.expected_r0(program)
        if r0 != self.expected:
            raise RuntimeError("%s on %s returned %d, expected %d: wrong code, not benchmarking it"
                               % (program, engine, r0, self.expected))

    def time(self, loops: int) -> float:
        call = self.call
        it = range(loops)
        t0 = time.perf_counter()
        for _ in it:
            call(0, 0)
        elapsed = time.perf_counter() - t0
        if call(0, 0) != self.expected:  # the map still holds every key
            raise RuntimeError("%s on %s: wrong r0 after timing" % (self.program, self.engine))
        return elapsed


def release_subjects() -> None:
    """Close every cached subject (quick mode runs every benchmark in one process)."""
    while _subjects:
        _, subject = _subjects.popitem()
        obj = getattr(subject, "k", None) or getattr(subject, "u", None)
        if obj is not None:
            obj.close()


def time_subject(loops: int, program: str, side: str, obj_path: str) -> float:
    """pyperf time function: ``loops`` runs of ``program`` on ``side``; the first use sets up (untimed)."""
    subject = _subjects.get((program, side))
    if subject is None:
        if side == "kernel":
            subject = KernelSubject(program, Path(obj_path))
        else:
            subject = UserSubject(program, side, Path(obj_path))
        _subjects[program, side] = subject
    return subject.time(loops)


# --- parent-only measurements --------------------------------------------------------


def preflight(obj_path: Path, sides: tuple[str, ...]) -> dict[str, int]:
    """Run every program once on every side and check r0; the kernel's ns per run (for sizing)."""
    kernel_ns = {}
    if "kernel" in sides:
        with mp.KernelObject(obj_path) as k:
            mp.fill(k)
            for p in mp.PROGRAMS:
                r0, ns = k.run(p, 10)
                if r0 != mp.expected_r0(p):
                    raise RuntimeError("%s in the kernel returned %d, expected %d" % (p, r0, mp.expected_r0(p)))
                kernel_ns[p] = max(ns, 1)
    for engine in (s for s in sides if s in USER):
        with mp.UserObject(obj_path) as u:
            mp.fill(u)
            for p in mp.PROGRAMS:
                r0 = u.engine(p, engine).run_ptr(0, 0)
                if r0 != mp.expected_r0(p):
                    raise RuntimeError("%s on %s returned %d, expected %d: wrong code"
                                       % (p, engine, r0, mp.expected_r0(p)))
    return kernel_ns


def measure_kernel_wall(obj_path: Path, kernel_ns: dict[str, int], quick: bool, metadata: dict) -> list:
    """pyperf Benchmarks ``<program>/kernel-wall``: wall time of BPF_PROG_TEST_RUN syscalls per operation."""
    import pyperf

    nvalues, seconds = WALL[quick]
    out = []
    with mp.KernelObject(obj_path) as k:
        mp.fill(k)
        for p in mp.PROGRAMS:
            repeat = max(1, int(seconds * 1e9 / kernel_ns[p]))
            fd, opts = k.prog_fd(p), k.opts(repeat)
            k.test_run(fd, opts)  # warmup
            values = []
            for _ in range(nvalues):
                t0 = time.perf_counter()
                k.test_run(fd, opts)
                values.append((time.perf_counter() - t0) / (repeat * mp.NR_OPS))
            run = pyperf.Run(values, metadata={"name": bench_name(p, "kernel-wall"), "unit": "second",
                                               "loops": repeat, "inner_loops": mp.NR_OPS,
                                               "hybrid_program": p, "hybrid_side": "kernel-wall", **metadata},
                             collect_metadata=False)
            out.append(pyperf.Benchmark([run]))
    return out


HELPER_CALL = re.compile(r"call i64 @hybrid_helper_(map_\w+)\(")


def helper_calls(ir_text: str) -> str:
    """``map_lookup_elem=1,map_update_elem=0``-style counts of map helper calls in optimized IR."""
    counts = {"map_lookup_elem": 0, "map_update_elem": 0, "map_delete_elem": 0}
    for name in HELPER_CALL.findall(ir_text):
        counts[name] = counts.get(name, 0) + 1
    return ",".join("%s=%d" % kv for kv in counts.items())


def measure_compile(obj_path: Path, repeat: int, metadata: dict) -> list:
    """pyperf Benchmarks ``compile/jit/<program>`` with the IR's helper calls as metadata."""
    import pyperf

    out = []
    with mp.UserObject(obj_path) as u:
        for p in mp.PROGRAMS:
            program = u.obj.programs[p].program
            from hybrid.user.jit import LlvmJit

            samples, ir_text = [], ""
            for _ in range(repeat):
                with LlvmJit(program) as eng:
                    samples.append(eng.compile_seconds)
                    ir_text = eng.ir_text
            run = pyperf.Run(samples, metadata={"name": compile_name(p), "unit": "second", "loops": 1,
                                                "hybrid_program": p, "hybrid_helper_calls": helper_calls(ir_text),
                                                **metadata},
                             collect_metadata=False)
            out.append(pyperf.Benchmark([run]))
    return out


# --- the pyperf script --------------------------------------------------------------


def _forward_args(cmd: list[str], args) -> None:
    """Arguments pyperf's workers need to register the same benchmarks in the same order."""
    cmd.extend(("--sides", args.sides, "--object", args.object))


def main() -> None:
    import pyperf

    import harness

    runner, quick = harness.suite_runner(
        FULL,
        QUICK,
        add_cmdline_args=_forward_args,
        release=release_subjects,
        description="Map operations: hybrid's JIT/AOT against the kernel (BPF_PROG_TEST_RUN)")
    runner.argparser.add_argument("--sides", default=",".join(SIDES),
                                  help="comma-separated sides among %s (default: all)" % ",".join(SIDES))
    runner.argparser.add_argument("--object", default=None,
                                  help="the compiled maps.bpf.o (default: build it into bench/build)")
    runner.argparser.add_argument("--compile-repeat", type=int, default=COMPILE_REPEAT[quick])
    args = runner.parse_args()
    wanted = tuple(s for s in args.sides.split(",") if s)
    unknown = [s for s in wanted if s not in SIDES]
    if unknown:
        runner.argparser.error("unknown side(s) %s (choose from %s)" % (", ".join(unknown), ", ".join(SIDES)))

    missing: dict[str, str] = {}
    if not args.worker:
        obj_path = Path(args.object) if args.object else mp.build()
        args.object = str(obj_path)
        sides, missing = available_sides(wanted, obj_path)
        args.sides = ",".join(sides)
        # Fail early and clearly (a verifier refusal, wrong code) before spawning workers.
        kernel_ns = preflight(obj_path, sides)
    sides = tuple(s for s in args.sides.split(",") if s)

    for p in mp.PROGRAMS:
        for side in sides:
            runner.bench_time_func(bench_name(p, side), time_subject, p, side, args.object,
                                   inner_loops=mp.NR_OPS,
                                   metadata={"hybrid_program": p, "hybrid_side": side, "hybrid_nr_ops": mp.NR_OPS})

    if args.worker:
        return
    # why a side is absent, for the report
    why = {"hybrid_missing": "; ".join("%s: %s" % kv for kv in missing.items())} if missing else {}
    extra = []
    if "kernel" in sides:
        extra += measure_kernel_wall(obj_path, kernel_ns, quick, why)
    if any(s in USER for s in sides):
        extra += measure_compile(obj_path, args.compile_repeat, why)
    for bench in extra:
        if args.output:
            pyperf.add_runs(args.output, bench)
    if not extra and missing:
        raise SystemExit("bench_maps: nothing to measure: %s" % "; ".join("%s: %s" % kv for kv in missing.items()))


# --- the summary ------------------------------------------------------------------


def _ns(bench) -> float | None:
    return None if bench is None else bench.median() * 1e9


def _fmt(ns: float | None, sd: float | None = None) -> str:
    if ns is None:
        return "—"
    digits = 0 if abs(ns) >= 100 else 1 if abs(ns) >= 10 else 2
    if sd is None:
        return "{:,.{d}f}".format(ns, d=digits)
    return "{:,.{d}f} ± {:,.{d}f}".format(ns, sd, d=digits)


def _fmt_net(ns: float | None) -> str:
    """A net time; at or below zero the operation costs less than the noise of the baseline."""
    if ns is not None and ns <= 0:
        return "≈0"
    return _fmt(ns)


def _fmt_bench(bench) -> str:
    if bench is None:
        return "—"
    return _fmt(bench.median() * 1e9, bench.stdev() * 1e9 if bench.get_nvalue() > 1 else 0.0)


def _fmt_ratio(r: float | None) -> str:
    return "—" if r is None else "%.2f×" % r


@dataclass
class Row:
    case: mp.Case
    kernel: object  # pyperf.Benchmark | None: kernel-reported time
    kernel_wall: object
    jit: object
    aot: object
    base: dict  # side -> baseline (empty_loop) Benchmark | None
    helper_calls: str | None  # map helper calls in the JIT's optimized IR

    def net(self, side: str) -> float | None:
        """ns per op minus the empty loop's, on ``side``."""
        b, base = getattr(self, side), self.base.get(side)
        if b is None or base is None:
            return None
        return _ns(b) - _ns(base)

    @property
    def ratio(self) -> float | None:
        """kernel / JIT, ns per op (> 1: userspace faster)."""
        if self.kernel is None or self.jit is None:
            return None
        return _ns(self.kernel) / _ns(self.jit)

    @property
    def net_ratio(self) -> float | None:
        k, j = self.net("kernel"), self.net("jit")
        if k is None or j is None or j <= 0 or k <= 0:
            return None
        return k / j

    @property
    def goal_met(self) -> bool | None:
        """JIT no slower than the kernel per op (None: not measured)."""
        r = self.ratio
        return None if r is None else r >= 1.0

    @property
    def lookup_inlined(self) -> bool | None:
        if self.case.op != "lookup" or self.helper_calls is None:
            return None
        return "map_lookup_elem=0" in self.helper_calls


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
    base = {s: by_name.get(bench_name(mp.BASELINE, s)) for s in SIDES + ("kernel-wall",)}
    rows = []
    for case in mp.CASES:
        p = case.program
        comp = by_name.get(compile_name(p))
        rows.append(Row(case, by_name.get(bench_name(p, "kernel")), by_name.get(bench_name(p, "kernel-wall")),
                        by_name.get(bench_name(p, "jit")), by_name.get(bench_name(p, "aot")), base,
                        comp.get_metadata().get("hybrid_helper_calls") if comp is not None else None))
    return rows


def missed_goals(json_path: Path | str) -> list[str]:
    return ["maps/%s: JIT %.2f ns/op, kernel %.2f ns/op" % (r.case.program, _ns(r.jit), _ns(r.kernel))
            for r in load_rows(json_path) if r.goal_met is False]


def rows(json_path: Path | str) -> list:
    """The consolidated report's rows (bench/report.py): ns per map operation, kernel test run against the JIT."""
    from report import Row, Stat

    reason = missing_reason(_load(json_path)) or ""
    out = []
    for r in load_rows(json_path):
        notes = []
        if r.aot is not None:
            notes.append("AOT %s ns" % _fmt(_ns(r.aot)))
        if r.net_ratio is not None:
            notes.append("net of the empty loop: %.1f×" % r.net_ratio)
        out.append(Row("maps", "%s %s" % (r.case.map, r.case.op), "ns/op", Stat.of(r.kernel), Stat.of(r.jit),
                       reason=r.case.unsupported or reason, kernel_label="kernel (BPF_PROG_TEST_RUN)", user_label="hybrid JIT",
                       note=", ".join(notes), goal=1.0))
    return out


def summarize(json_path: Path | str) -> str:
    """The markdown report of a maps JSON written by this script."""
    import bench_engines  # machine_line

    by_name = _load(json_path)
    rows = load_rows(json_path)
    reason = missing_reason(by_name)
    lines = [
        "# Map operations: hybrid (userspace JIT) vs the kernel",
        "",
        bench_engines.machine_line() + ".",
        "",
        "Each program does %d operations per run on keys spread over the %d keys of a pre-filled map "
        "(u32 key, u64 value); times are **ns per operation**, median ± stdev of the pyperf values, all "
        "measured in one run. **kernel**: the same object loaded by libbpf, run with BPF_PROG_TEST_RUN "
        "(`repeat`), the kernel's own `duration` (syscall excluded; **kernel wall** includes it, amortized "
        "over the repeats, and is measured afterwards in the parent process: differences between the two "
        "columns of ~10-20%% either way are run-to-run variation). **JIT**/**AOT**: `hybrid.load` of the "
        "object, the native entry called through ctypes (the call, a fraction of a µs per %d ops, is included). **raw** times include the loop "
        "around the operation; **net** subtracts, per side, the time of `empty_loop` (the same loop "
        "without the map operation: for the kernel ≈ its loop, for hybrid ≈ the ctypes call, since LLVM "
        "reduces that loop to almost nothing). `delete` is a delete of a present key followed by its "
        "re-insert (BPF_NOEXIST), one pair counted as one op. "
        "Goal: JIT no slower than the kernel per op on every row (raw times, kernel/JIT ≥ 1)."
        % (mp.NR_OPS, mp.NR_KEYS, mp.NR_OPS),
        "",
        "| map | op | kernel | kernel wall | JIT | AOT | kernel net | JIT net | kernel/JIT | kernel/JIT net "
        "| goal (JIT ≤ kernel) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        if r.case.unsupported:
            lines.append("| %s | %s | — | — | — | — | — | — | — | — | n/a: %s |"
                         % (r.case.map, r.case.op, r.case.unsupported))
            continue
        if r.goal_met is None:
            why = []
            if r.kernel is None:
                why.append("no kernel result")
            if r.jit is None:
                why.append("no JIT result")
            goal = "— (%s%s)" % (", ".join(why), ": " + reason if reason else "")
        elif r.goal_met:
            goal = "met"
        else:
            goal = "**MISSED** (%.2f×)" % r.ratio
        lines.append("| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
            r.case.map, "**%s**" % r.case.op if r.goal_met is False else r.case.op,
            _fmt_bench(r.kernel), _fmt_bench(r.kernel_wall), _fmt_bench(r.jit), _fmt_bench(r.aot),
            _fmt_net(r.net("kernel")), _fmt_net(r.net("jit")), _fmt_ratio(r.ratio), _fmt_ratio(r.net_ratio), goal))
    b = rows[0].base
    lines.append("| (empty_loop) | — | %s | %s | %s | %s | | | | | baseline subtracted for net |"
                 % (_fmt_bench(b.get("kernel")), _fmt_bench(b.get("kernel-wall")), _fmt_bench(b.get("jit")),
                    _fmt_bench(b.get("aot"))))

    measured = [r for r in rows if not r.case.unsupported]
    missed = [r.case.program for r in measured if r.goal_met is False]
    unknown = [r.case.program for r in measured if r.goal_met is None]
    net_worse = [r.case.program for r in measured if r.goal_met and r.net_ratio is not None and r.net_ratio < 1]
    lines.append("")
    if missed:
        lines.append("**Goal missed** on %s: the JIT'd program is slower than the kernel's." % ", ".join(missed))
    elif unknown:
        lines.append("Goal not checked on %s (missing results%s)." % (", ".join(unknown),
                                                                     ": " + reason if reason else ""))
    else:
        lines.append("Goal met: the JIT'd code is no slower than the kernel on every operation.")
    if net_worse:
        lines.append("")
        lines.append("Net of the loop, the kernel is ahead on %s: hybrid's lead there is its cheaper loop "
                     "(LLVM vs the kernel's JIT), not the map operation." % ", ".join(net_worse))
    lookups = [r for r in rows if r.case.op == "lookup" and r.helper_calls is not None]
    if lookups:
        inlined = [r.case.map for r in lookups if r.lookup_inlined]
        called = [r.case.map for r in lookups if not r.lookup_inlined]
        lines.append("")
        lines.append("Array lookup inlining (helper calls left in the JIT's optimized IR): inlined, no call to "
                     "`hybrid_helper_map_lookup_elem`, on %s; through the helper on %s. The kernel inlines "
                     "array and per-CPU array lookups in its JIT as well, and calls hash lookups "
                     "directly. With no call left in the loop, LLVM may also unroll and vectorize an "
                     "inlined lookup loop, which the kernel's JIT does not: a JIT net of ≈0 means the "
                     "lookups cost less than the noise of the ctypes call." % (
                         ", ".join(inlined) or "none", ", ".join(called) or "none"))
    runs = [b.get_nrun() for r in measured for b in (r.kernel, r.jit, r.aot) if b is not None]
    values = [b.get_nvalue() for r in measured for b in (r.kernel, r.jit, r.aot) if b is not None]
    if values:
        def span(xs):
            return "%d" % xs[0] if min(xs) == max(xs) else "%d-%d" % (min(xs), max(xs))

        lines.append("")
        lines.append("pyperf: %s values per side and program, from %s runs (worker processes, with calibration)."
                     % (span(values), span(runs)))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
