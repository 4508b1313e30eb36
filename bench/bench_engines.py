#!/usr/bin/env python3
"""pyperf benchmark of the engines against gcc -O2 on compute-heavy programs.

For each program of ``bench/programs/`` (see ``engine_programs.py``) and
each engine - ``gcc`` (the same C built with ``gcc -O2``, called through
ctypes like the others), ``jit``, ``aot`` and ``interp`` - one pyperf
benchmark named ``<program>/<engine>``.  Every value is normalized to
seconds per *iteration unit* (pyperf ``inner_loops`` = the ``n`` the
program was called with), so the interpreter, which runs a ~1000x smaller
``n``, is directly comparable.

After the timed benchmarks the parent process measures compile times:
``compile/jit/<program>`` (lowering + optimization + code generation, the
JIT's ``compile_seconds``) and ``compile/aot/<program>`` (the same plus
writing and linking the shared library), and adds them to the ``-o`` file.

Usage (normally through ``bench/run.py``)::

    python bench/bench_engines.py -o engines.json [--quick] [--programs sieve,loop]
                                  [any pyperf option]

pyperf runs every benchmark in fresh worker processes that re-execute this
script: engines are created lazily in the worker, on the first (untimed)
call of the benchmark's time function, and checked against the gcc build
before being timed.  :func:`summarize` turns the JSON into the markdown
table; importing this module runs nothing.
"""

from __future__ import annotations

import importlib
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

import engine_programs as ep  # noqa: E402

ENGINES = ("gcc", "jit", "aot", "interp")
COMPILED = ("jit", "aot")  # engines whose build time is measured
GOAL = 1.5  # JIT time / gcc -O2 time, per program

# Runner settings: (processes, values per process, min seconds per value).
FULL = (8, 3, 0.1)
QUICK = (2, 2, 0.05)
COMPILE_REPEAT = {False: 7, True: 3}


def bench_name(program: str, engine: str) -> str:
    return "%s/%s" % (program, engine)


def compile_name(engine: str, program: str) -> str:
    return "compile/%s/%s" % (engine, program)


def available_engines() -> tuple[str, ...]:
    """The engines that can run here; the same answer in the parent and every worker."""
    found = []
    for kind in ENGINES:
        if kind in COMPILED:
            try:
                importlib.import_module("hybrid.user." + kind)
            except ImportError as e:
                print("bench_engines: engine %s not available, not benchmarked: %s" % (kind, e),
                      file=sys.stderr)
                continue
        found.append(kind)
    return tuple(found)


# --- what one benchmark times ---------------------------------------------------


@dataclass
class Subject:
    """One program on one engine, ready to call: ``call(ctx.address, ctx.size)``."""

    program: str
    engine: str
    n: int
    ctx: ep.Ctx
    call: Callable[[int, int], int]
    keep: tuple  # objects that own the code being called
    result: int  # r0 of the checking call

    def close(self) -> None:
        for obj in self.keep:
            close = getattr(obj, "close", None)
            if close is not None:
                close()


def make_subject(program: str, engine: str, build_dir: Path | None = None) -> Subject:
    """Build/load ``program`` on ``engine`` and check its r0 against the gcc build."""
    from hybrid.user.engine import create_engine

    spec = ep.PROGRAMS[program]
    art = ep.build(program, build_dir)
    native = ep.load_native(art.native_library)
    n = spec.interp_n if engine == "interp" else spec.n
    ctx = ep.Ctx.make(n, spec.seed)
    keep: tuple = (native,)
    if engine == "gcc":
        call = native.fn
    else:
        eng = create_engine(engine, ep.load_program(art))
        keep = (native, eng)
        # Native engines are called exactly like gcc's entry: one ctypes call.
        call = eng.run_ptr if engine == "interp" else ep.NativeEntry(eng.address)
    result = call(ctx.address, ctx.size)
    if spec.deterministic:
        expected = native.run(ctx)
        if result != expected:
            raise RuntimeError("%s on %s returned r0=%#x, the gcc -O2 build %#x (n=%d): wrong code, "
                               "not benchmarking it" % (program, engine, result, expected, n))
    return Subject(program, engine, n, ctx, call, keep, result)


_subjects: dict[tuple[str, str], Subject] = {}


def time_subject(loops: int, program: str, engine: str, build_dir: str) -> float:
    """pyperf time function: ``loops`` calls; the first use sets up (untimed)."""
    key = (program, engine)
    subject = _subjects.get(key)
    if subject is None:
        subject = _subjects[key] = make_subject(program, engine, Path(build_dir))
    call, addr, size = subject.call, subject.ctx.address, subject.ctx.size
    it = range(loops)
    t0 = time.perf_counter()
    for _ in it:
        call(addr, size)
    return time.perf_counter() - t0


# --- compile times (parent only) --------------------------------------------------


def measure_compile(program: str, engine: str, repeat: int, build_dir: Path | None = None):
    """A pyperf Benchmark of ``repeat`` builds of ``program`` by ``engine`` (+1 warmup)."""
    import pyperf
    from hybrid.user.engine import create_engine

    prog = ep.load_program(ep.build(program, build_dir))
    samples = []
    for _ in range(repeat + 1):
        t0 = time.perf_counter()
        eng = create_engine(engine, prog)
        wall = time.perf_counter() - t0
        secs = getattr(eng, "compile_seconds", None)
        eng.close()
        samples.append(secs if secs else wall)
    # The first build in a process also initializes LLVM: recorded as the warmup.
    run = pyperf.Run(samples[1:], warmups=[(1, samples[0])],
                     metadata={"name": compile_name(engine, program), "unit": "second", "loops": 1,
                               "hybrid_program": program, "hybrid_engine": engine},
                     collect_metadata=False)
    return pyperf.Benchmark([run])


# --- the pyperf script ------------------------------------------------------------


def _forward_args(cmd: list[str], args) -> None:
    """Arguments pyperf's workers need to register the same benchmarks in the same order."""
    cmd.extend(("--programs", args.programs, "--build-dir", args.build_dir))


def main() -> None:
    import pyperf

    quick = "--quick" in sys.argv
    if quick:
        sys.argv.remove("--quick")
    processes, values, min_time = QUICK if quick else FULL
    runner = pyperf.Runner(processes=processes, values=values, min_time=min_time,
                           add_cmdline_args=_forward_args)
    runner.argparser.description = "Engines (gcc -O2, JIT, AOT, interpreter) on compute-heavy programs"
    runner.argparser.add_argument("--programs", default=",".join(ep.PROGRAMS),
                                  help="comma-separated programs (default: all)")
    runner.argparser.add_argument("--build-dir", default=str(ep.BUILD),
                                  help="cache of the compiled programs (default: bench/build)")
    runner.argparser.add_argument("--compile-repeat", type=int, default=COMPILE_REPEAT[quick],
                                  help="builds per program when measuring compile time")
    args = runner.parse_args()
    programs = [p for p in args.programs.split(",") if p]
    unknown = [p for p in programs if p not in ep.PROGRAMS]
    if unknown:
        runner.argparser.error("unknown program(s) %s (choose from %s)" % (", ".join(unknown), ", ".join(ep.PROGRAMS)))
    engines = available_engines()
    build_dir = Path(args.build_dir)

    if not args.worker:
        # Fail early and clearly (a compile error, wrong code) before spawning workers.
        for program in programs:
            for engine in engines:
                make_subject(program, engine, build_dir).close()

    for program in programs:
        spec = ep.PROGRAMS[program]
        for engine in engines:
            n = spec.interp_n if engine == "interp" else spec.n
            runner.bench_time_func(bench_name(program, engine), time_subject, program, engine, args.build_dir,
                                   inner_loops=n,
                                   metadata={"hybrid_program": program, "hybrid_engine": engine,
                                             "hybrid_n": n, "hybrid_unit": spec.unit})

    if args.worker:
        return
    for program in programs:
        for engine in engines:
            if engine not in COMPILED:
                continue
            bench = measure_compile(program, engine, args.compile_repeat, build_dir)
            print("%s: median %.1f ms +- %.1f ms" % (bench.get_name(), bench.median() * 1e3,
                                                      (bench.stdev() if bench.get_nvalue() > 1 else 0) * 1e3))
            if args.output:
                pyperf.add_runs(args.output, bench)


# --- the summary ------------------------------------------------------------------


def _first_line(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return "?"
    return out.splitlines()[0].strip() if out else "?"


def machine_line() -> str:
    """CPU model, cores, kernel, and the toolchain versions."""
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    gcc = re.sub(r"^gcc\s*(\(.*?\))?\s*", "", _first_line([ep.GCC, "--version"]))
    clang = _first_line([ep.CLANG, "--version"])
    clang = re.search(r"version\s+(\S+)", clang).group(1) if "version" in clang else clang
    try:
        import llvmlite
        import llvmlite.binding as llvm

        llvm_version = "LLVM %s (llvmlite %s)" % (".".join(map(str, llvm.llvm_version_info)), llvmlite.__version__)
    except ImportError:
        llvm_version = "no llvmlite"
    return ("CPU: %s (%d logical CPUs); kernel: Linux %s; Python %s; gcc %s; clang %s (eBPF build); JIT: %s"
            % (cpu, os.cpu_count() or 0, platform.release(), platform.python_version(), gcc, clang, llvm_version))


def _fmt_ns(bench) -> str:
    if bench is None:
        return "—"
    med = bench.median() * 1e9
    sd = bench.stdev() * 1e9 if bench.get_nvalue() > 1 else 0.0
    digits = 0 if med >= 1000 else 1 if med >= 10 else 2
    return "{:,.{d}f} ± {:,.{d}f}".format(med, sd, d=digits)


def _ratio(a, b) -> float | None:
    if a is None or b is None:
        return None
    return a.median() / b.median()


def _fmt_ratio(r: float | None) -> str:
    return "—" if r is None else ("{:,.0f}×".format(r) if r >= 100 else "%.2f×" % r)


def _fmt_ms(bench) -> str:
    if bench is None:
        return "—"
    sd = bench.stdev() if bench.get_nvalue() > 1 else 0.0
    return "%.1f ± %.1f" % (bench.median() * 1e3, sd * 1e3)


@dataclass
class Row:
    program: str
    times: dict  # engine -> pyperf.Benchmark | None
    compile: dict  # engine -> pyperf.Benchmark | None
    jit_vs_gcc: float | None

    @property
    def goal_met(self) -> bool | None:
        return None if self.jit_vs_gcc is None else self.jit_vs_gcc <= GOAL


def load_rows(json_path: Path | str) -> list[Row]:
    import pyperf

    suite = pyperf.BenchmarkSuite.load(str(json_path))
    by_name = {b.get_name(): b for b in suite.get_benchmarks()}
    programs = [p for p in ep.PROGRAMS if any(n.startswith(p + "/") for n in by_name)]
    rows = []
    for p in programs:
        times = {e: by_name.get(bench_name(p, e)) for e in ENGINES}
        comp = {e: by_name.get(compile_name(e, p)) for e in COMPILED}
        rows.append(Row(p, times, comp, _ratio(times["jit"], times["gcc"])))
    return rows


def summarize(json_path: Path | str) -> str:
    """The markdown report of an engines JSON written by this script."""
    rows = load_rows(json_path)
    lines = [
        "# Engine benchmark: gcc -O2 vs JIT vs AOT vs interpreter",
        "",
        machine_line() + ".",
        "",
        "Times are **ns per iteration unit** (see the unit column), median ± stdev of all pyperf values, "
        "all measured in one run; each call is one ctypes call `entry(ctx, len)` doing N units. "
        "The interpreter runs a smaller N (column N), and is normalized the same way. "
        "Ratios are of medians (< 1 means faster than the denominator). "
        "Goal: JIT within %.1f× of gcc -O2 on each program. "
        "Compile times: median ± stdev of repeated builds in one process (the first, which also "
        "initializes LLVM, is excluded); JIT = lower + optimize + codegen, AOT = the same + link a .so." % GOAL,
        "",
        "| program | unit | N (native / interp) | gcc -O2 | JIT | AOT | interp | JIT/gcc | AOT/gcc | interp/JIT "
        "| JIT compile ms | AOT build ms | goal (JIT/gcc ≤ %.1f) |" % GOAL,
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        spec = ep.PROGRAMS[r.program]
        if r.goal_met is None:
            goal = "— (no JIT or gcc result)"
        elif r.goal_met:
            goal = "met"
        else:
            goal = "**MISSED** (%.2f× > %.1f×)" % (r.jit_vs_gcc, GOAL)
        t = r.times
        lines.append("| %s | %s | %d / %d | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
            "**%s**" % r.program if r.goal_met is False else r.program, spec.unit, spec.n, spec.interp_n,
            _fmt_ns(t["gcc"]), _fmt_ns(t["jit"]), _fmt_ns(t["aot"]), _fmt_ns(t["interp"]),
            _fmt_ratio(r.jit_vs_gcc), _fmt_ratio(_ratio(t["aot"], t["gcc"])),
            _fmt_ratio(_ratio(t["interp"], t["jit"])),
            _fmt_ms(r.compile["jit"]), _fmt_ms(r.compile["aot"]), goal))
    missed = [r.program for r in rows if r.goal_met is False]
    unknown = [r.program for r in rows if r.goal_met is None]
    lines.append("")
    if missed:
        lines.append("**Goal missed** on %s: JIT slower than %.1f× gcc -O2." % (", ".join(missed), GOAL))
    elif unknown:
        lines.append("Goal not checked on %s (missing results)." % ", ".join(unknown))
    else:
        lines.append("Goal met: JIT within %.1f× of gcc -O2 on every program." % GOAL)
    values = [b.get_nvalue() for r in rows for b in r.times.values() if b is not None]
    runs = [b.get_nrun() for r in rows for b in r.times.values() if b is not None]
    if values:
        lines.append("")
        def span(xs):
            return "%d" % xs[0] if min(xs) == max(xs) else "%d-%d" % (min(xs), max(xs))

        lines.append("pyperf: %s values per engine and program, from %s runs (worker processes, with calibration)."
                     % (span(values), span(runs)))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
