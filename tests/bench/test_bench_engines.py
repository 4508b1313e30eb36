"""The engine benchmark's programs and scripts (bench/).

The programs are compiled for real (clang -target bpf and gcc -O2): the
eBPF build must give the gcc build's r0 on every engine - the kernel's
too, where its verifier accepts the program - and both must agree with a
Python model where the logic is small enough to model.  The slow tests
run ``bench/bench_engines.py --quick`` and ``bench/run.py --quick`` end to
end.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))

import bench_engines  # noqa: E402
import engine_programs as ep  # noqa: E402

ENGINES = ("interp", "jit", "aot")
DETERMINISTIC = [name for name, p in ep.PROGRAMS.items() if p.deterministic]
M64 = (1 << 64) - 1
M32 = (1 << 32) - 1

# Iterations for the correctness checks: small for the interpreter, at most MAX_N for the others.
CHECK_N = {"interp": {"sieve": 2, "loop": 300, "stack_mix": 4, "helpers": 20},
           "native": {"sieve": 300, "loop": 4_096, "stack_mix": 16, "helpers": 1_024}}
SEEDS = (0x5EED_1234_ABCD, 0xFFFF_FFFF_FFFF_FFC3, 7)


def need_clang() -> None:
    if shutil.which(ep.CLANG) is None:
        pytest.skip("clang is not installed: cannot build the eBPF versions of the benchmark programs")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, ep.Artifacts]:
    """All programs, compiled afresh (no cache) into a temporary folder."""
    need_clang()
    out = tmp_path_factory.mktemp("bench-build")
    return {name: ep.build(name, out) for name in ep.PROGRAMS}


@pytest.fixture(scope="module")
def natives(built) -> dict[str, ep.NativeLibrary]:
    return {name: ep.load_native(art.native_library) for name, art in built.items()}


@pytest.fixture(scope="module")
def engines(built):
    from hybrid.user.engine import create_engine

    made = {}
    for name, art in built.items():
        prog = ep.load_program(art)
        for kind in ENGINES:
            made[name, kind] = create_engine(kind, prog)
    yield made
    for eng in made.values():
        eng.close()


@pytest.fixture(scope="module")
def kernel_programs(built):
    """Each program loaded into the kernel: a KernelProgram, or the KernelRefused the verifier gave."""
    problem = ep.kernel_problem()
    if problem:
        pytest.skip("the kernel cannot load and test-run eBPF programs here: %s" % problem)
    made = {}
    for name, art in built.items():
        try:
            made[name] = ep.KernelProgram(art.code, name)
        except ep.KernelRefused as e:
            made[name] = e
    yield made
    for k in made.values():
        if isinstance(k, ep.KernelProgram):
            k.close()


# --- Python models of the simple programs -------------------------------------------


def model_sieve(n: int, seed: int) -> int:
    def is_prime(k: int) -> bool:
        return k >= 2 and all(k % d for d in range(2, int(k ** 0.5) + 1))

    primes_below = [0]
    for k in range(1, 401):
        primes_below.append(primes_below[-1] + is_prime(k - 1))
    return sum(primes_below[400 - ((seed + p) & 63)] for p in range(n))


def model_loop(n: int, seed: int) -> int:
    x, acc = seed | 1, 0x243F6A8885A308D3
    for i in range(n):
        x ^= (x << 13) & M64
        x ^= x >> 7
        x ^= (x << 17) & M64
        acc = (acc + x * 0x9E3779B97F4A7C15) & M64
        acc = ((acc << 23) | (acc >> 41)) & M64
        acc ^= (i + (acc >> 31)) & M64
    return acc ^ x


MODELS = {"sieve": model_sieve, "loop": model_loop}


# --- building -------------------------------------------------------------------------


def test_programs_are_whole_ebpf_programs(built):
    from hybrid.user import isa

    assert set(built) == {"sieve", "loop", "stack_mix", "helpers"}
    for name, art in built.items():
        prog = ep.load_program(art)  # verifies
        assert len(prog.insns) > 10, name
        assert art.native_library.exists()
    calls = [(i.src, i.imm) for i in ep.load_program(built["helpers"]).insns
             if isa.OPS[i.opcode].kind is isa.Kind.CALL]
    assert {imm for src, imm in calls if src == isa.CALL_HELPER} == {5, 7, 8}
    local = [i for i in ep.load_program(built["stack_mix"]).insns
             if isa.OPS[i.opcode].kind is isa.Kind.CALL and i.src == isa.CALL_LOCAL]
    assert local, "stack_mix must keep its bpf-to-bpf call"


BAD_SOURCES = {
    "global": ("static volatile unsigned long long counter;\n"
               "unsigned long long entry(void *ctx) { return counter++; }\n", "relocation"),
    "rodata": ("unsigned long long entry(unsigned long long *ctx) {\n"
               "    static const unsigned long long t[8] = {3, 1, 4, 1, 5, 9, 2, 6};\n"
               "    return t[*ctx & 7]; }\n", "relocation"),
    "entry_not_first": ("unsigned long long other(unsigned long long x) { return x * x + 1; }\n"
                        "unsigned long long entry(unsigned long long *ctx) { return *ctx; }\n",
                        "offset"),
    "global_call": ("__attribute__((noinline)) unsigned long long f(unsigned long long x) { return x * x; }\n"
                    "unsigned long long entry(unsigned long long *ctx) { return f(*ctx) + f(ctx[1]); }\n",
                    "relocation"),
    "named_section": ("__attribute__((section(\"xdp\"))) unsigned long long entry(void *ctx)"
                      " { return 1; }\n", "text|section"),
}


@pytest.mark.parametrize("case", sorted(BAD_SOURCES))
def test_bpf_text_refuses_what_is_not_one_relocation_free_program(case, tmp_path):
    need_clang()
    source, message = BAD_SOURCES[case]
    src, obj = tmp_path / "bad.c", tmp_path / "bad.o"
    src.write_text(source)
    subprocess.run([ep.CLANG, *ep.CLANG_FLAGS, str(src), "-o", str(obj)], check=True, capture_output=True)
    with pytest.raises(ep.BuildError, match=message):
        ep.bpf_text(obj, case)


def test_n_stays_within_each_programs_max_n():
    """A larger n would be clamped by the program: the per-unit times would be wrong."""
    for name, spec in ep.PROGRAMS.items():
        max_n = ep.source_max_n(name)
        assert 0 < spec.interp_n <= max_n and 0 < spec.n <= max_n, (name, spec, max_n)
        for where in CHECK_N.values():
            assert where[name] <= max_n, (name, where[name], max_n)


def test_compile_errors_are_reported(tmp_path, monkeypatch):
    need_clang()
    monkeypatch.setattr(ep, "SOURCES", tmp_path)
    (tmp_path / "loop.c").write_text("this is not C\n")
    with pytest.raises(ep.BuildError, match="loop .eBPF.: clang"):
        ep.build("loop", tmp_path / "out")


# --- same results -------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MODELS))
def test_gcc_build_matches_the_python_model(name, natives):
    for seed in SEEDS:
        for n in (0, 1, 5, 64):
            ctx = ep.Ctx.make(n, seed)
            assert natives[name].run(ctx) == MODELS[name](n, seed), (name, n, hex(seed))


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name", DETERMINISTIC)
def test_ebpf_r0_equals_gcc_r0(name, engine, engines, natives):
    n_main = CHECK_N["interp" if engine == "interp" else "native"][name]
    results = set()
    for seed in SEEDS:
        for n in (0, 1, n_main):
            ctx = ep.Ctx.make(n, seed)
            expected = natives[name].run(ctx)
            got = engines[name, engine].run_ptr(ctx.address, ctx.size)
            assert got == expected, "%s on %s, n=%d seed=%#x: r0 %#x, gcc -O2 %#x" % (
                name, engine, n, seed, got, expected)
            results.add(expected)
    assert len(results) > 3, "%s gives the same r0 for different inputs: a useless benchmark" % name


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_kernel_r0_equals_gcc_r0(name, kernel_programs, natives):
    """The kernel runs the very .text hybrid runs (a tc program, the context as its __sk_buff)."""
    k = kernel_programs[name]
    if isinstance(k, ep.KernelRefused):
        assert k.reason.strip() and k.log.strip(), "a refusal must carry the verifier's message"
        pytest.skip("the kernel's verifier refuses %s: %s" % (name, k.reason))
    n_main = CHECK_N["native"][name]
    results = set()
    for seed in SEEDS:
        for n in (0, 1, n_main):
            ctx = ep.Ctx.make(n, seed)
            expected = natives[name].run(ctx) & M32  # a tc program's retval is a u32
            got, ns = k.run(ctx)
            assert got == expected, "%s in the kernel, n=%d seed=%#x: r0 %#x, gcc -O2 %#x" % (
                name, n, seed, got, expected)
            results.add(expected)
    assert len(results) > 3
    assert k.stats.get("insns", 0) > 0  # the verifier's statistics of the load


def test_the_kernel_loads_most_programs(kernel_programs):
    """Refusals are recorded with the verifier's message; the loops that fit its limits load."""
    loaded = [n for n, k in kernel_programs.items() if isinstance(k, ep.KernelProgram)]
    assert {"loop", "stack_mix", "helpers"} <= set(loaded), {n: getattr(k, "reason", "loaded")
                                                            for n, k in kernel_programs.items()}
    for name, k in kernel_programs.items():
        if isinstance(k, ep.KernelRefused):
            assert "[E" in k.reason and len(k.reason.splitlines()) == 1, k.reason


def test_kernel_load_time_is_measured(built, kernel_programs):
    loaded = next(n for n, k in kernel_programs.items() if isinstance(k, ep.KernelProgram))
    secs = ep.timed_load(built[loaded].code, loaded)
    assert 0 < secs < 30


def test_native_repeat_runs_any_entry(built, natives, engines):
    """bench_repeat (bench.h) calls gcc's entry or the JIT's from native code, r0 of the last call."""
    ctx = ep.Ctx.make(100, 3)
    nat = natives["loop"]
    assert nat.repeat(nat.address, ctx, 5) == nat.run(ctx)
    assert nat.repeat(engines["loop", "jit"].address, ctx, 5) == nat.run(ctx)
    assert nat.repeat(nat.address, ctx, 0) == 0


@pytest.mark.parametrize("engine", ENGINES + ("gcc",))
def test_helpers_program_runs(engine, engines, natives):
    n = CHECK_N["interp" if engine == "interp" else "native"]["helpers"]
    ctx = ep.Ctx.make(n, 1)
    if engine == "gcc":
        results = {natives["helpers"].run(ctx) for _ in range(3)}
    else:
        results = {engines["helpers", engine].run_ptr(ctx.address, ctx.size) for _ in range(3)}
    # Random numbers and the clock go into r0: three runs cannot agree.
    assert len(results) == 3


def test_make_subject_refuses_wrong_code(built, monkeypatch):
    """The benchmark checks each engine against gcc before timing it."""
    out = built["sieve"].bpf_object.parent
    subject = bench_engines.make_subject("sieve", "interp", out)
    assert subject.result == model_sieve(ep.PROGRAMS["sieve"].interp_n, ep.PROGRAMS["sieve"].seed)
    real = ep.load_program
    monkeypatch.setattr(ep, "load_program", lambda art: real(built["loop"]))
    with pytest.raises(RuntimeError, match="wrong code"):
        bench_engines.make_subject("sieve", "jit", out)


def test_kernel_subject_is_checked_and_timed(built, kernel_programs, monkeypatch):
    if not isinstance(kernel_programs["loop"], ep.KernelProgram):
        pytest.skip("the kernel refuses loop")
    out = built["loop"].bpf_object.parent
    subject = bench_engines.make_subject("loop", "kernel", out)
    try:
        assert subject.n == ep.PROGRAMS["loop"].n
        assert subject.result == model_loop(subject.n, ep.PROGRAMS["loop"].seed) & M32
        assert subject.stats["insns"] > subject.n  # the verifier walked the loop
        assert 0 < subject.time(10) < 1
    finally:
        subject.close()
    real = ep.KernelProgram
    monkeypatch.setattr(ep, "KernelProgram", lambda code, name: real(built["helpers"].code, name))
    with pytest.raises(RuntimeError, match="wrong code"):
        bench_engines.make_subject("loop", "kernel", out)


def test_a_refused_program_is_reported_not_timed(built, kernel_programs):
    refused = [n for n, k in kernel_programs.items() if isinstance(k, ep.KernelRefused)]
    if not refused:
        pytest.skip("the kernel loads every program")
    out = built[refused[0]].bpf_object.parent
    found = bench_engines.preflight([refused[0]], ("gcc", "kernel"), out, keep=False)
    assert list(found) == ["%s/kernel" % refused[0]]
    assert "verifier refused" in found["%s/kernel" % refused[0]]


# --- the report --------------------------------------------------------------------


def _fake_results(path: Path, times_ns: dict[tuple[str, str], float], missing: dict | None = None) -> None:
    import pyperf

    suite = None
    for (program, engine), ns in times_ns.items():
        md = {"name": bench_engines.bench_name(program, engine), "loops": 1}
        md.update(bench_engines.program_missing(program, missing or {}))
        runs = [pyperf.Run([ns * 1e-9 * f for f in (0.99, 1.0, 1.01)], metadata=md, collect_metadata=False)]
        bench = pyperf.Benchmark(runs)
        if suite is None:
            suite = pyperf.BenchmarkSuite([bench])
        else:
            suite.add_benchmark(bench)
    for program in {p for p, _ in times_ns}:
        for engine in ("jit", "aot"):
            run = pyperf.Run([0.020, 0.021], metadata={"name": bench_engines.compile_name(engine, program),
                                                       "loops": 1}, collect_metadata=False)
            suite.add_benchmark(pyperf.Benchmark([run]))
    suite.dump(str(path))


def test_summary_marks_missed_goals(tmp_path):
    path = tmp_path / "engines.json"
    times = {}
    for engine, ns in (("gcc", 100.0), ("jit", 120.0), ("aot", 130.0), ("interp", 100_000.0)):
        times["loop", engine] = ns
    for engine, ns in (("gcc", 100.0), ("jit", 200.0), ("aot", 140.0), ("interp", 300_000.0)):
        times["sieve", engine] = ns
    _fake_results(path, times)
    md = bench_engines.summarize(path)
    rows = {line.split("|")[1].strip(" *"): line for line in md.splitlines() if line.startswith("| ")}
    assert set(rows) >= {"loop", "sieve"}
    assert "1.20×" in rows["loop"] and "1.30×" in rows["loop"] and "833×" in rows["loop"]
    assert "| met |" in rows["loop"] and "MISSED" not in rows["loop"]
    assert "**MISSED** (2.00× > 1.5×)" in rows["sieve"] and "1,500×" in rows["sieve"] and "300,000 ± 3,000" in rows["sieve"]
    assert "20.5 ± 0.7" in rows["sieve"]  # compile ms
    assert "Goal missed** on sieve" in md
    assert "model name" not in md and "kernel: Linux" in md
    assert [r.program for r in bench_engines.load_rows(path) if r.goal_met is False] == ["sieve"]


def test_rows_pair_the_kernel_with_each_hybrid_engine(tmp_path):
    import report

    path = tmp_path / "engines.json"
    times = {}
    for engine, ns in (("gcc", 2.0), ("kernel", 3.0), ("jit", 2.5), ("aot", 2.4), ("interp", 20_000.0)):
        times["loop", engine] = ns
    for engine, ns in (("gcc", 300.0), ("jit", 320.0), ("aot", 310.0), ("interp", 9e6)):
        times["sieve", engine] = ns
    why = "the kernel's verifier refused it: BPF program is too large. Processed 1000001 insn [E2BIG]"
    _fake_results(path, times, missing={"sieve/kernel": why})
    rows = {r.name: r for r in bench_engines.rows(path)}
    assert set(rows) == {"%s: %s" % (p, e) for p in ("loop", "sieve")
                         for e in ("JIT", "AOT", "interpreter", "compile")}
    assert report.check_rows(list(rows.values())) == []
    jit = rows["loop: JIT"]
    assert jit.unit == "ns/iter" and abs(jit.kernel.median - 3.0) < 1e-6 and abs(jit.user.median - 2.5) < 1e-6
    assert abs(jit.ratio - 1.2) < 1e-6 and "gcc -O2: 2.00 ns" in jit.note and "JIT/gcc 1.25×" in jit.note
    assert abs(rows["loop: interpreter"].user.median - 20_000) < 1e-3  # per unit, not per call
    comp = rows["loop: compile"]
    assert comp.unit == "ms" and comp.kernel is None and abs(comp.user.median - 20.5) < 1e-6
    assert "no kernel result" in comp.reason and "AOT build: 20.5 ms" in comp.note
    for e in ("JIT", "AOT", "interpreter", "compile"):
        r = rows["sieve: %s" % e]
        assert r.kernel is None and "BPF program is too large" in r.reason, r
    md = bench_engines.summarize(path)
    sieve = next(line for line in md.splitlines() if line.startswith("| sieve"))
    assert "refused ¹" in sieve
    assert "sieve on kernel: the kernel's verifier refused it: BPF program is too large" in md
    loop = next(line for line in md.splitlines() if line.startswith("| loop"))
    assert "3.00 ± 0.03" in loop and "1.20×" in loop  # kernel, kernel/JIT


def test_summary_shows_missing_engines(tmp_path):
    path = tmp_path / "engines.json"
    _fake_results(path, {("loop", "gcc"): 3.0, ("loop", "interp"): 9000.0})
    md = bench_engines.summarize(path)
    row = next(line for line in md.splitlines() if line.startswith("| loop"))
    assert row.count("—") >= 4 and "no JIT or gcc result" in row
    assert "Goal not checked on loop" in md


# --- end to end ---------------------------------------------------------------------




@pytest.mark.slow
def test_quick_run_gives_rows_with_both_sides_or_a_reason(quick_bench):
    import report

    need_clang()
    out, _ = quick_bench.suite("engines")
    rows = bench_engines.rows(out)
    assert len(rows) == 4 * len(ep.PROGRAMS)
    assert report.check_rows(rows) == []
    for r in rows:
        assert r.user is not None, r
        assert r.kernel is not None or r.reason, r
        assert r.unit == ("ms" if r.name.endswith(": compile") else "ns/iter")
    names = {b["metadata"]["name"] for b in json.loads(out.read_text())["benchmarks"]}
    for program in ep.PROGRAMS:
        program_rows = [r for r in rows if r.name.startswith(program + ":")]
        if bench_engines.bench_name(program, "kernel") in names:
            assert all(r.kernel is not None for r in program_rows)
        else:
            assert all(r.reason.startswith("kernel: ") for r in program_rows), program_rows


@pytest.mark.slow
def test_run_quick_writes_a_complete_table(quick_bench):
    need_clang()
    tmp_path, proc = quick_bench.results, quick_bench.proc
    quick_bench.ok()

    data = json.loads((tmp_path / "engines.json").read_text())
    names = {b["metadata"]["name"] for b in data["benchmarks"]}
    refused = {r.program for r in bench_engines.load_rows(tmp_path / "engines.json") if "kernel" in r.missing}
    for program in ep.PROGRAMS:
        for engine in bench_engines.ENGINES:
            if engine == "kernel" and program in refused:
                assert bench_engines.bench_name(program, engine) not in names
                continue
            assert bench_engines.bench_name(program, engine) in names
        for engine in bench_engines.BUILT:
            assert (bench_engines.compile_name(engine, program) in names) != (engine == "kernel" and program in refused)

    md = (tmp_path / "engines.md").read_text()
    assert "| engines | loop: JIT | ns/iter |" in proc.stdout  # the consolidated table, printed
    header = next(line for line in md.splitlines() if line.startswith("| program"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    rows = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| program")]
    assert len(rows) == len(ep.PROGRAMS)
    for line in rows:
        cells = dict(zip(cols, (c.strip() for c in line.strip("|").split("|"))))
        for col in ("gcc -O2", "JIT", "AOT", "interp", "JIT/gcc", "AOT/gcc", "interp/JIT",
                    "JIT compile ms", "AOT build ms"):
            assert cells[col] and cells[col] != "—", (cells["program"], col, line)
        assert float(cells["JIT compile ms"].split()[0]) > 0
    assert "CPU:" in md and "ns per iteration unit" in md
