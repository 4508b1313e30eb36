#!/usr/bin/env python3
"""pyperf benchmark of the engines, the kernel's and gcc -O2 on compute-heavy programs.

For each program of ``bench/programs/`` (see ``engine_programs.py``) and
each engine - ``gcc`` (the same C built with ``gcc -O2``), ``kernel`` (the
very eBPF instructions loaded into the kernel as a tc program: its
verifier and x86 JIT, run with ``BPF_PROG_TEST_RUN``), and hybrid's
``jit``, ``aot`` and ``interp`` - one pyperf benchmark named
``<program>/<engine>``.  Every value is normalized to seconds per
*iteration unit* (pyperf ``inner_loops`` = the ``n`` the program was
called with), so the interpreter, which runs a smaller ``n``, is directly
comparable.

How one value is timed:

* ``gcc``, ``jit``, ``aot``: ``loops`` calls of the native entry from a
  native loop (``bench_repeat`` of the gcc library, bench.h), one ctypes
  call per value: the counterpart of the kernel's ``repeat``;
* ``kernel``: one ``BPF_PROG_TEST_RUN`` with ``repeat`` = ``loops``; the
  time is the kernel's own ``duration`` (mean ns per run, the syscall
  excluded);
* ``interp``: ``loops`` calls of the interpreter from Python.

Every engine's r0 is checked against the gcc build before it is timed (the
kernel's low 32 bits: a tc program's retval is a u32).  A program the
kernel's verifier refuses is not timed there: the verifier's message goes
into the metadata of the program's benchmarks (``hybrid_missing_kernel``)
and into the reports.

After the timed benchmarks the parent process measures build times:
``compile/jit/<program>`` (lowering + optimization + code generation, the
JIT's ``compile_seconds``), ``compile/aot/<program>`` (the same plus
writing and linking the shared library) and ``compile/kernel/<program>``
(one ``BPF_PROG_LOAD`` of the instructions: the kernel's verifier and
JIT, with the verifier's statistics as metadata), and adds them to the
``-o`` file.

Usage (normally through ``bench/run.py``)::

    python bench/bench_engines.py -o engines.json [--quick] [--programs sieve,loop]
                                  [--engines gcc,kernel,jit] [any pyperf option]

Full runs use pyperf's worker processes, which re-execute this script:
engines are created lazily in the worker, on the first (untimed) call of
the benchmark's time function.  ``--quick`` runs everything in this
process (``harness.InProcessRunner``).  :func:`summarize` turns the JSON
into the markdown table and :func:`rows` into the consolidated report's
rows; importing this module runs nothing.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

import engine_programs as ep  # noqa: E402

ENGINES = ("gcc", "kernel", "jit", "aot", "interp")
HYBRID = ("jit", "aot", "interp")  # hybrid's engines: one report row each, against the kernel
COMPILED = ("jit", "aot")  # hybrid engines whose build time is measured
BUILT = ("kernel",) + COMPILED  # every compile/<engine>/<program> benchmark
LABEL = {"gcc": "gcc -O2", "kernel": "kernel", "jit": "JIT", "aot": "AOT", "interp": "interpreter"}
GOAL = 1.5  # JIT time / gcc -O2 time, per program

# Runner settings: (processes, values per process, min seconds per value).
FULL = (8, 3, 0.1)
QUICK = (1, 2, 0.04)
COMPILE_REPEAT = {False: 7, True: 1}


def bench_name(program: str, engine: str) -> str:
    return "%s/%s" % (program, engine)


def compile_name(engine: str, program: str) -> str:
    return "compile/%s/%s" % (engine, program)


def missing_key(engine: str) -> str:
    """Metadata key, on every benchmark of a program, of why ``engine`` has no result for it."""
    return "hybrid_missing_%s" % engine


def available_engines(wanted: tuple[str, ...] = ENGINES) -> tuple[tuple[str, ...], dict[str, str]]:
    """The engines of ``wanted`` that can run here, and why the others cannot."""
    found, missing = [], {}
    for kind in wanted:
        problem = None
        if kind in COMPILED:
            try:
                importlib.import_module("hybrid.user." + kind)
            except ImportError as e:
                problem = "engine %s not available: %s" % (kind, e)
        elif kind == "kernel":
            problem = ep.kernel_problem()
            if problem:
                problem = "the kernel cannot run eBPF programs here: " + problem
        if problem:
            missing[kind] = problem
            print("bench_engines: %s not benchmarked: %s" % (kind, problem), file=sys.stderr)
        else:
            found.append(kind)
    return tuple(found), missing


def _one_line(text: str) -> str:
    return " ".join(text.split())


# --- what one benchmark times ---------------------------------------------------


@dataclass
class Subject:
    """One program on one engine, ready to time: ``time(loops)`` runs it ``loops`` times."""

    program: str
    engine: str
    n: int
    ctx: ep.Ctx
    timer: Callable[[int], float]  # seconds for ``loops`` runs of ``n`` units
    keep: tuple  # objects that own the code being run
    result: int  # r0 of the checking run
    stats: dict = field(default_factory=dict)  # the kernel verifier's statistics

    def time(self, loops: int) -> float:
        return self.timer(loops)

    def close(self) -> None:
        for obj in self.keep:
            close = getattr(obj, "close", None)
            if close is not None:
                close()


def _wrong(program: str, engine: str, got: int, expected: int, n: int, what: str = "") -> RuntimeError:
    return RuntimeError("%s on %s returned r0=%#x, the gcc -O2 build %#x (n=%d%s): wrong code, not "
                        "benchmarking it" % (program, engine, got, expected, n, what))


def make_subject(program: str, engine: str, build_dir: Path | None = None) -> Subject:
    """Build/load ``program`` on ``engine`` and check its r0 against the gcc build.

    Raises :class:`engine_programs.KernelRefused` when the kernel's verifier refuses it.
    """
    spec = ep.PROGRAMS[program]
    art = ep.build(program, build_dir)
    native = ep.load_native(art.native_library)
    n = spec.interp_n if engine == "interp" else spec.n
    ctx = ep.Ctx.make(n, spec.seed)
    expected = native.run(ctx) if spec.deterministic else None

    if engine == "kernel":
        k = ep.KernelProgram(art.code, program)
        try:
            result, _ = k.run(ctx)
            low = None if expected is None else expected & 0xFFFFFFFF
            if low is not None and result != low:
                raise _wrong(program, engine, result, low, n, ", low 32 bits: a tc retval")
        except BaseException:
            k.close()
            raise

        def kernel_timer(loops: int) -> float:
            r0, ns = k.test_run(k.opts(ctx, loops))
            if low is not None and r0 != low:
                raise _wrong(program, engine, r0, low, n, ", after %d runs" % loops)
            return ns * loops * 1e-9  # the kernel's mean per run, times the runs

        return Subject(program, engine, n, ctx, kernel_timer, (k, native), result, dict(k.stats))

    if engine == "gcc":
        address, keep, result = native.address, (native,), native.run(ctx)
    else:
        from hybrid.user.engine import create_engine

        eng = create_engine(engine, ep.load_program(art))
        keep = (native, eng)
        if engine == "interp":
            result = eng.run_ptr(ctx.address, ctx.size)
        else:
            address = eng.address
            result = ep.NativeEntry(address)(ctx.address, ctx.size)
    if expected is not None and result != expected:
        for obj in keep:
            getattr(obj, "close", lambda: None)()
        raise _wrong(program, engine, result, expected, n)

    if engine == "interp":
        run, addr, size = eng.run_ptr, ctx.address, ctx.size

        def interp_timer(loops: int) -> float:
            it = range(loops)
            t0 = time.perf_counter()
            for _ in it:
                run(addr, size)
            return time.perf_counter() - t0

        return Subject(program, engine, n, ctx, interp_timer, keep, result)

    repeat = native.repeat

    def native_timer(loops: int) -> float:
        t0 = time.perf_counter()
        r0 = repeat(address, ctx, loops)
        elapsed = time.perf_counter() - t0
        if expected is not None and r0 != expected:
            raise _wrong(program, engine, r0, expected, n, ", after %d runs" % loops)
        return elapsed

    return Subject(program, engine, n, ctx, native_timer, keep, result)


_subjects: dict[tuple[str, str], Subject] = {}


def release_subjects() -> None:
    """Close every cached subject (quick mode runs every benchmark in one process)."""
    while _subjects:
        _, subject = _subjects.popitem()
        subject.close()


def time_subject(loops: int, program: str, engine: str, build_dir: str) -> float:
    """pyperf time function: ``loops`` runs; the first use sets up (untimed)."""
    key = (program, engine)
    subject = _subjects.get(key)
    if subject is None:
        subject = _subjects[key] = make_subject(program, engine, Path(build_dir))
    return subject.time(loops)


# --- build times (parent only) ----------------------------------------------------


def measure_compile(program: str, engine: str, repeat: int, build_dir: Path | None = None,
                    metadata: dict | None = None):
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
                               "hybrid_program": program, "hybrid_engine": engine, **(metadata or {})},
                     collect_metadata=False)
    return pyperf.Benchmark([run])


def measure_kernel_load(program: str, repeat: int, build_dir: Path | None = None, metadata: dict | None = None):
    """A pyperf Benchmark ``compile/kernel/<program>``: ``repeat`` BPF_PROG_LOADs (+1 warmup), verifier + JIT.

    The verifier's statistics of one more load (BPF_LOG_STATS, not timed) go into the metadata.
    """
    import pyperf

    art = ep.build(program, build_dir)
    with ep.KernelProgram(art.code, program) as k:  # raises KernelRefused like the benchmark did
        stats = dict(k.stats)
    samples = [ep.timed_load(art.code, program) for _ in range(repeat + 1)]
    md = {"name": compile_name("kernel", program), "unit": "second", "loops": 1,
          "hybrid_program": program, "hybrid_engine": "kernel", "hybrid_bpf_jit_enable": ep.bpf_jit_enabled(),
          **{"hybrid_verifier_%s" % k: v for k, v in stats.items()}, **(metadata or {})}
    run = pyperf.Run(samples[1:], warmups=[(1, samples[0])], metadata=md, collect_metadata=False)
    return pyperf.Benchmark([run])


# --- the pyperf script ------------------------------------------------------------


def _forward_args(cmd: list[str], args) -> None:
    """Arguments pyperf's workers need to register the same benchmarks in the same order."""
    cmd.extend(("--programs", args.programs, "--build-dir", args.build_dir, "--engines", args.engines,
                "--missing", args.missing))


def preflight(programs: list[str], engines: tuple[str, ...], build_dir: Path, keep: bool) -> dict[str, str]:
    """Set every (program, engine) up once and check its r0: fail early on wrong code.

    Returns ``{"<program>/kernel": verifier's message}`` for the programs the
    kernel refuses.  With ``keep`` the subjects stay cached for the timing
    (quick mode: same process); otherwise they are closed.
    """
    refused = {}
    for program in programs:
        for engine in engines:
            try:
                subject = make_subject(program, engine, build_dir)
            except ep.KernelRefused as e:
                refused[bench_name(program, "kernel")] = "the kernel's verifier refused it: " + _one_line(e.reason)
                print("bench_engines: %s not run in the kernel: %s" % (program, _one_line(e.reason)),
                      file=sys.stderr)
                continue
            if keep:
                _subjects[program, engine] = subject
            else:
                subject.close()
    return refused


def program_missing(program: str, missing: dict[str, str]) -> dict[str, str]:
    """The metadata that says why engines have no result for ``program``."""
    out = {}
    for engine in ENGINES:
        why = missing.get(bench_name(program, engine)) or missing.get(engine)
        if why:
            out[missing_key(engine)] = _one_line(why)
    return out


def main() -> None:
    import pyperf

    import harness

    runner, quick = harness.suite_runner(FULL, QUICK, add_cmdline_args=_forward_args, release=release_subjects)
    runner.argparser.description = ("Compute programs on the kernel (test run), hybrid's JIT, AOT and "
                                    "interpreter, and gcc -O2; and their build times")
    runner.argparser.add_argument("--programs", default=",".join(ep.PROGRAMS),
                                  help="comma-separated programs (default: all)")
    runner.argparser.add_argument("--engines", default=",".join(ENGINES),
                                  help="comma-separated engines among %s (default: all)" % ",".join(ENGINES))
    runner.argparser.add_argument("--build-dir", default=str(ep.BUILD),
                                  help="cache of the compiled programs (default: bench/build)")
    runner.argparser.add_argument("--compile-repeat", type=int, default=COMPILE_REPEAT[quick],
                                  help="builds per program when measuring build and load times")
    runner.argparser.add_argument("--missing", default="{}", help=argparse.SUPPRESS)  # the parent's findings, for workers
    args = runner.parse_args()
    programs = [p for p in args.programs.split(",") if p]
    unknown = [p for p in programs if p not in ep.PROGRAMS]
    if unknown:
        runner.argparser.error("unknown program(s) %s (choose from %s)" % (", ".join(unknown), ", ".join(ep.PROGRAMS)))
    wanted = tuple(e for e in args.engines.split(",") if e)
    bad = [e for e in wanted if e not in ENGINES]
    if bad or "gcc" not in wanted:
        runner.argparser.error("engines must be among %s and include gcc (the reference), not %s"
                               % (", ".join(ENGINES), args.engines))
    build_dir = Path(args.build_dir)

    if not args.worker:
        engines, missing = available_engines(wanted)
        missing.update({e: "not run (--engines %s)" % args.engines for e in ENGINES if e not in wanted})
        # Fail early and clearly (a compile error, wrong code) before timing anything.
        missing.update(preflight(programs, engines, build_dir, keep=quick))
        args.engines, args.missing = ",".join(engines), json.dumps(missing, sort_keys=True)
    engines = tuple(e for e in args.engines.split(",") if e)
    missing = json.loads(args.missing)

    for program in programs:
        spec = ep.PROGRAMS[program]
        why = program_missing(program, missing)
        for engine in engines:
            if bench_name(program, engine) in missing:
                continue  # refused by the kernel: said in the metadata of the others
            n = spec.interp_n if engine == "interp" else spec.n
            md = {"hybrid_program": program, "hybrid_engine": engine, "hybrid_n": n, "hybrid_unit": spec.unit, **why}
            if engine == "kernel":
                md["hybrid_bpf_jit_enable"] = ep.bpf_jit_enabled()
            runner.bench_time_func(bench_name(program, engine), time_subject, program, engine, args.build_dir,
                                   inner_loops=n, metadata=md)

    if args.worker:
        return
    release_subjects()
    for program in programs:
        why = program_missing(program, missing)
        for engine in BUILT:
            if engine not in engines or bench_name(program, engine) in missing:
                continue
            if engine == "kernel":
                bench = measure_kernel_load(program, args.compile_repeat, build_dir, why)
            else:
                bench = measure_compile(program, engine, args.compile_repeat, build_dir, why)
            if not args.quiet:
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
    compile: dict  # engine (kernel, jit, aot) -> pyperf.Benchmark | None
    jit_vs_gcc: float | None
    missing: dict = field(default_factory=dict)  # engine -> why it has no result for this program

    @property
    def goal_met(self) -> bool | None:
        return None if self.jit_vs_gcc is None else self.jit_vs_gcc <= GOAL

    @property
    def kernel_vs_jit(self) -> float | None:
        """kernel / JIT, ns per unit (> 1: the JIT's code is faster)."""
        return _ratio(self.times.get("kernel"), self.times.get("jit"))

    def why(self, engine: str, json_path: Path | str | None = None) -> str:
        """Why ``engine`` has no result here (always a reason, for the report)."""
        if engine in self.missing:
            return self.missing[engine]
        return "no %s result for %s in %s" % (LABEL.get(engine, engine), self.program,
                                              Path(json_path).name if json_path else "this run")

    @property
    def verifier(self) -> dict[str, int]:
        """The kernel verifier's statistics (``insns``, ``usec``, ``states``) of the load-time benchmark."""
        b = self.compile.get("kernel")
        if b is None:
            return {}
        md = b.get_metadata()
        return {k[len("hybrid_verifier_"):]: v for k, v in md.items() if k.startswith("hybrid_verifier_")}


def load_rows(json_path: Path | str) -> list[Row]:
    import pyperf

    suite = pyperf.BenchmarkSuite.load(str(json_path))
    by_name = {b.get_name(): b for b in suite.get_benchmarks()}
    programs = [p for p in ep.PROGRAMS if any(n.startswith(p + "/") or n.endswith("/" + p) for n in by_name)]
    rows = []
    for p in programs:
        times = {e: by_name.get(bench_name(p, e)) for e in ENGINES}
        comp = {e: by_name.get(compile_name(e, p)) for e in BUILT}
        missing = {}
        for b in list(times.values()) + list(comp.values()):
            if b is None:
                continue
            md = b.get_metadata()
            for e in ENGINES:
                if md.get(missing_key(e)) and e not in missing:
                    missing[e] = md[missing_key(e)]
        rows.append(Row(p, times, comp, _ratio(times["jit"], times["gcc"]), missing))
    return rows


def missed_goals(json_path: Path | str) -> list[str]:
    """Programs whose JIT is more than GOAL x gcc -O2."""
    return ["engines/%s: JIT %.2fx gcc -O2 (goal <= %.1fx)" % (r.program, r.jit_vs_gcc, GOAL)
            for r in load_rows(json_path) if r.goal_met is False]


def rows(json_path: Path | str) -> list:
    """The consolidated report's rows (bench/report.py).

    Per program: one row per hybrid engine (JIT, AOT, interpreter), ns per
    iteration unit, the kernel's test run against that engine (gcc -O2's
    time in the note), and one row ``<program>: compile``, ms, the
    kernel's load (verifier + JIT) against the JIT's compile (the AOT
    build in the note).  A side without a result says why.
    """
    from report import Row as ReportRow
    from report import Stat

    out = []
    for r in load_rows(json_path):
        kernel = Stat.of(r.times["kernel"])
        gcc = r.times["gcc"]
        for engine in HYBRID:
            user = Stat.of(r.times[engine])
            reasons = []
            if kernel is None:
                reasons.append("kernel: " + r.why("kernel", json_path))
            if user is None:
                reasons.append("%s: %s" % (LABEL[engine], r.why(engine, json_path)))
            notes = []
            if gcc is not None:
                notes.append("gcc -O2: %s ns" % _fmt_ns(gcc).split(" ±")[0])
            if engine == "jit" and r.jit_vs_gcc is not None:
                notes.append("JIT/gcc %.2f× (goal ≤ %.1f×: %s)" % (r.jit_vs_gcc, GOAL,
                                                                 "met" if r.goal_met else "MISSED"))
            if engine == "interp":
                notes.append("N = %d per call (native: %d)" % (ep.PROGRAMS[r.program].interp_n,
                                                                ep.PROGRAMS[r.program].n))
            out.append(ReportRow("engines", "%s: %s" % (r.program, LABEL[engine]), "ns/iter", kernel, user,
                                 reason="; ".join(reasons), kernel_label="kernel (BPF_PROG_TEST_RUN)",
                                 user_label="hybrid %s" % LABEL[engine], note="; ".join(notes)))
        kload = Stat.of(r.compile["kernel"], scale=1e3)
        jit = Stat.of(r.compile["jit"], scale=1e3)
        reasons = []
        if kload is None:
            reasons.append("kernel: " + r.why("kernel", json_path))
        if jit is None:
            reasons.append("JIT: " + r.why("jit", json_path))
        notes = []
        if r.compile["aot"] is not None:
            notes.append("AOT build: %s ms" % _fmt_ms(r.compile["aot"]).split(" ±")[0])
        v = r.verifier
        if "insns" in v:
            notes.append("verifier: %s insns processed" % "{:,}".format(v["insns"]))
        out.append(ReportRow("engines", "%s: compile" % r.program, "ms", kload, jit, reason="; ".join(reasons),
                             kernel_label="kernel load (BPF_PROG_LOAD: verifier + JIT)",
                             user_label="hybrid JIT compile", note="; ".join(notes)))
    return out


def summarize(json_path: Path | str) -> str:
    """The markdown report of an engines JSON written by this script."""
    rows = load_rows(json_path)
    lines = [
        "# Engine benchmark: gcc -O2 vs the kernel vs JIT vs AOT vs interpreter",
        "",
        machine_line() + ".",
        "",
        "Times are **ns per iteration unit** (see the unit column), median ± stdev of all pyperf values, "
        "all measured in one run. Each value times `loops` runs of `entry(ctx, len)` doing N units each: "
        "**gcc -O2**, **JIT**, **AOT** from a native loop (`bench_repeat`, one ctypes call per value); "
        "**kernel**: the same eBPF instructions loaded with BPF_PROG_LOAD as a tc program (the kernel's "
        "verifier and x86 JIT) and run by BPF_PROG_TEST_RUN with `repeat` = loops, the kernel's own "
        "`duration` (syscall excluded); **interp** from Python. "
        "The interpreter runs a smaller N (column N), and is normalized the same way; N is bounded by each "
        "program's MAX_N, the loop bound the kernel's verifier has to walk. "
        "Ratios are of medians (< 1 means faster than the denominator; kernel/JIT > 1: hybrid's JIT is faster). "
        "Goal: JIT within %.1f× of gcc -O2 on each program. "
        "Build times: median ± stdev of repeated builds in one process (the first, which also "
        "initializes LLVM, is excluded); kernel load = one BPF_PROG_LOAD (verifier + JIT), "
        "JIT = lower + optimize + codegen, AOT = the same + link a .so." % GOAL,
        "",
        "| program | unit | N (native / interp) | gcc -O2 | kernel | JIT | AOT | interp | JIT/gcc | AOT/gcc "
        "| kernel/JIT | interp/JIT | kernel load ms | JIT compile ms | AOT build ms | goal (JIT/gcc ≤ %.1f) |" % GOAL,
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
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

        def cell(engine, bench, fmt):
            """The value, or why there is none (the reason itself is in the footnote)."""
            if bench is not None or engine not in r.missing:
                return fmt(bench)
            return "refused ¹" if "verifier refused" in r.missing[engine] else "— ¹"

        lines.append("| %s | %s | %d / %d | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
            "**%s**" % r.program if r.goal_met is False else r.program, spec.unit, spec.n, spec.interp_n,
            _fmt_ns(t["gcc"]), cell("kernel", t["kernel"], _fmt_ns), cell("jit", t["jit"], _fmt_ns),
            cell("aot", t["aot"], _fmt_ns), cell("interp", t["interp"], _fmt_ns),
            _fmt_ratio(r.jit_vs_gcc), _fmt_ratio(_ratio(t["aot"], t["gcc"])), _fmt_ratio(r.kernel_vs_jit),
            _fmt_ratio(_ratio(t["interp"], t["jit"])), cell("kernel", r.compile["kernel"], _fmt_ms),
            cell("jit", r.compile["jit"], _fmt_ms), cell("aot", r.compile["aot"], _fmt_ms), goal))
    missed = [r.program for r in rows if r.goal_met is False]
    unknown = [r.program for r in rows if r.goal_met is None]
    lines.append("")
    if missed:
        lines.append("**Goal missed** on %s: JIT slower than %.1f× gcc -O2." % (", ".join(missed), GOAL))
    elif unknown:
        lines.append("Goal not checked on %s (missing results)." % ", ".join(unknown))
    else:
        lines.append("Goal met: JIT within %.1f× of gcc -O2 on every program." % GOAL)
    absent = [(r.program, e, why) for r in rows for e, why in r.missing.items()]
    if absent:
        lines.append("")
        lines.append("¹ Not measured: " + "; ".join("%s on %s: %s" % (p, LABEL.get(e, e), why)
                                                   for p, e, why in absent) + ".")
    verified = [(r.program, r.verifier) for r in rows if r.verifier.get("insns")]
    if verified:
        lines.append("")
        lines.append("Kernel verifier work per load (BPF_LOG_STATS of one load): " + ", ".join(
            "%s %s insns processed in %s ms" % (p, "{:,}".format(v["insns"]),
                                               "%.1f" % (v["usec"] / 1e3) if "usec" in v else "?")
            for p, v in verified) + ". It walks every iteration of every loop, so it grows with MAX_N.")
    values = [b.get_nvalue() for r in rows for b in r.times.values() if b is not None]
    runs = [b.get_nrun() for r in rows for b in r.times.values() if b is not None]
    if values:
        lines.append("")

        def span(xs):
            return "%d" % xs[0] if min(xs) == max(xs) else "%d-%d" % (min(xs), max(xs))

        quick = any(b.get_metadata().get("hybrid_quick") for r in rows for b in r.times.values() if b is not None)
        lines.append("pyperf: %s values per engine and program, from %s runs (%s)."
                     % (span(values), span(runs), "in-process quick run: noisy" if quick
                        else "worker processes, with calibration"))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
