"""The engine benchmark's programs and scripts (bench/).

The programs are compiled for real (clang -target bpf and gcc -O2): the
eBPF build must give the gcc build's r0 on every engine, and both must
agree with a Python model where the logic is small enough to model.  The
slow test runs ``bench/run.py --quick`` end to end.
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

# Iterations for the correctness checks: small for the interpreter.
CHECK_N = {"interp": {"sieve": 2, "loop": 300, "stack_mix": 4, "helpers": 20},
           "native": {"sieve": 300, "loop": 100_000, "stack_mix": 2_000, "helpers": 2_000}}
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


# --- the report --------------------------------------------------------------------


def _fake_results(path: Path, times_ns: dict[tuple[str, str], float]) -> None:
    import pyperf

    suite = None
    for (program, engine), ns in times_ns.items():
        runs = [pyperf.Run([ns * 1e-9 * f for f in (0.99, 1.0, 1.01)],
                           metadata={"name": bench_engines.bench_name(program, engine), "loops": 1},
                           collect_metadata=False)]
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


def test_summary_shows_missing_engines(tmp_path):
    path = tmp_path / "engines.json"
    _fake_results(path, {("loop", "gcc"): 3.0, ("loop", "interp"): 9000.0})
    md = bench_engines.summarize(path)
    row = next(line for line in md.splitlines() if line.startswith("| loop"))
    assert row.count("—") >= 4 and "no JIT or gcc result" in row
    assert "Goal not checked on loop" in md


# --- end to end ---------------------------------------------------------------------


@pytest.mark.slow
def test_run_quick_writes_a_complete_table(tmp_path):
    need_clang()
    proc = subprocess.run([sys.executable, str(BENCH / "run.py"), "--quick", "--suite", "engines",
                           "--results", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[1/1] engines:" in proc.stdout

    data = json.loads((tmp_path / "engines.json").read_text())
    names = {b["metadata"]["name"] for b in data["benchmarks"]}
    for program in ep.PROGRAMS:
        for engine in bench_engines.ENGINES:
            assert bench_engines.bench_name(program, engine) in names
        for engine in bench_engines.COMPILED:
            assert bench_engines.compile_name(engine, program) in names

    md = (tmp_path / "engines.md").read_text()
    assert md in proc.stdout  # printed as well as written
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
