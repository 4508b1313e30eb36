"""The map benchmark (bench/bench_maps.py, bench/map_programs.py, bench/programs/maps.bpf.c).

The object is compiled for real and run on both sides: every program must
return the same r0 in the kernel (when the BPF syscall works here) and on
the JIT/AOT engines.  The slow test runs ``bench/run.py --quick --suite
maps`` end to end and checks that every row of the table has both sides
or says why not.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))

import bench_maps  # noqa: E402
import map_programs as mp  # noqa: E402


def need_clang() -> None:
    if shutil.which(mp.CLANG) is None:
        pytest.skip("clang is not installed: cannot build programs/maps.bpf.c")


@pytest.fixture(scope="module")
def obj_path(tmp_path_factory) -> Path:
    need_clang()
    return mp.build(tmp_path_factory.mktemp("maps-build"))


@pytest.fixture(scope="module")
def user(obj_path):
    with mp.UserObject(obj_path) as u:
        mp.fill(u)
        yield u


def test_cases_cover_every_map_and_op():
    assert len(mp.CASES) == len(mp.MAPS) * len(mp.OPS)
    unsupported = {c.program for c in mp.CASES if c.unsupported}
    assert unsupported == {"array_delete", "percpu_array_delete"}
    assert mp.PROGRAMS[0] == mp.BASELINE and len(mp.PROGRAMS) == 1 + len(mp.CASES) - 2


def test_the_object_has_one_tc_program_per_case(user):
    assert sorted(user.obj.programs) == sorted(mp.PROGRAMS)
    assert {lp.section for lp in user.obj.programs.values()} == {"tc"}
    assert set(user.obj.maps) >= set(mp.MAPS)


@pytest.mark.parametrize("engine", ["jit", "aot"])
def test_every_program_does_all_its_operations_in_hybrid(user, engine):
    for p in mp.PROGRAMS if engine == "jit" else (mp.BASELINE, "array_lookup", "hash_delete"):
        for _ in range(2):  # delete + re-insert leaves the map as it was
            assert user.engine(p, engine).run_ptr(0, 0) == mp.expected_r0(p), (p, engine)
    for name in mp.MAPS:
        assert len(list(user.obj.maps[name])) == mp.NR_KEYS


def test_array_lookups_are_inlined_and_the_rest_call_helpers(user):
    calls = {p: bench_maps.helper_calls(user.engine(p, "jit").ir_text) for p in mp.PROGRAMS}
    for m in ("array", "percpu_array"):
        assert "map_lookup_elem=0" in calls[m + "_lookup"], calls[m + "_lookup"]
    for m in ("hash", "percpu_hash", "lru_hash"):
        assert "map_lookup_elem=0" not in calls[m + "_lookup"], calls[m + "_lookup"]
    # (LLVM may unroll a loop: a call can appear more than once)
    assert "map_update_elem=0" not in calls["hash_update"] and "map_delete_elem=0" not in calls["hash_delete"]
    assert calls[mp.BASELINE] == "map_lookup_elem=0,map_update_elem=0,map_delete_elem=0"


@pytest.fixture(scope="module")
def kernel(obj_path):
    problem = mp.kernel_problem(obj_path)
    if problem:
        pytest.skip("the kernel side cannot run here: %s" % problem)
    with mp.KernelObject(obj_path) as k:
        mp.fill(k)
        yield k


@pytest.mark.root
@pytest.mark.kernel
def test_every_program_does_all_its_operations_in_the_kernel(kernel):
    for p in mp.PROGRAMS:
        r0, ns = kernel.run(p, repeat=3)
        assert r0 == mp.expected_r0(p), p
        assert ns > 0
    assert kernel.lookup("hash", mp.key_bytes(5)) == mp.value_bytes(5)
    assert kernel.lookup("percpu_array", mp.key_bytes(7)) == mp.value_bytes(7) * kernel.nr_cpus
    assert kernel.lookup("hash", mp.key_bytes(mp.NR_KEYS)) is None


# --- the report -----------------------------------------------------------------------


def _fake(path: Path, times_ns: dict[tuple[str, str], float], missing: str | None = None) -> None:
    import pyperf

    benches = []
    for (program, side), ns in times_ns.items():
        meta = {"name": bench_maps.bench_name(program, side), "loops": 1}
        if missing:
            meta["hybrid_missing"] = missing
        benches.append(pyperf.Benchmark([pyperf.Run([ns * 1e-9 * f for f in (0.99, 1.0, 1.01)], metadata=meta,
                                                    collect_metadata=False)]))
    for p in mp.PROGRAMS:
        calls = "map_lookup_elem=%d" % (0 if p in ("array_lookup", "percpu_array_lookup") else 1)
        benches.append(pyperf.Benchmark([pyperf.Run([0.02], metadata={
            "name": bench_maps.compile_name(p), "loops": 1, "hybrid_helper_calls": calls}, collect_metadata=False)]))
    pyperf.BenchmarkSuite(benches).dump(str(path))


def _rows(md: str) -> dict[str, dict[str, str]]:
    lines = [line for line in md.splitlines() if line.startswith("| ")]
    cols = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[1:]:
        cells = dict(zip(cols, (c.strip() for c in line.strip("|").split("|"))))
        rows["%s_%s" % (cells["map"], cells["op"].strip("*"))] = cells
    return rows


def test_summary_marks_missed_goals_and_unsupported_rows(tmp_path):
    times = {}
    for p in mp.PROGRAMS:
        times[p, "kernel"] = 2.0 if p == mp.BASELINE else 40.0
        times[p, "jit"] = 1.0 if p == mp.BASELINE else 20.0
    times["array_lookup", "kernel"], times["array_lookup", "jit"] = 3.0, 4.0  # kernel ahead
    times["hash_update", "kernel"], times["hash_update", "jit"] = 10.0, 9.5  # met raw, not net
    path = tmp_path / "maps.json"
    _fake(path, times)
    md = bench_maps.summarize(path)
    rows = _rows(md)
    assert "**MISSED** (0.75×)" in rows["array_lookup"]["goal (JIT ≤ kernel)"]
    assert rows["hash_lookup"]["goal (JIT ≤ kernel)"] == "met"
    assert rows["hash_lookup"]["kernel/JIT"] == "2.00×" and rows["hash_lookup"]["JIT net"] == "19.0"
    assert rows["hash_lookup"]["kernel net"] == "38.0" and rows["hash_lookup"]["kernel/JIT net"] == "2.00×"
    assert rows["array_delete"]["goal (JIT ≤ kernel)"].startswith("n/a: no delete on arrays")
    assert rows["hash_update"]["goal (JIT ≤ kernel)"] == "met" and rows["hash_update"]["kernel/JIT net"] == "0.94×"
    assert "Goal missed** on array_lookup" in md
    assert "Net of the loop, the kernel is ahead on hash_update" in md
    assert "inlined, no call to `hybrid_helper_map_lookup_elem`, on array, percpu_array;" in md
    assert [m.split(":")[0] for m in bench_maps.missed_goals(path)] == ["maps/array_lookup"]


def test_summary_says_why_a_side_is_missing(tmp_path):
    path = tmp_path / "maps.json"
    _fake(path, {(p, "jit"): 5.0 for p in mp.PROGRAMS}, missing="kernel: libbpf cannot load: Operation not permitted")
    md = bench_maps.summarize(path)
    for name, cells in _rows(md).items():
        if name.startswith("(empty_loop)"):
            continue
        goal = cells["goal (JIT ≤ kernel)"]
        assert goal.startswith("n/a:") or "no kernel result: kernel: libbpf cannot load" in goal, (name, goal)
    assert bench_maps.missed_goals(path) == []


# --- end to end ---------------------------------------------------------------------


@pytest.mark.slow
def test_run_quick_maps_gives_every_row_both_sides_or_a_reason(quick_bench):
    need_clang()
    json_path, md = quick_bench.suite("maps")
    data = json.loads(json_path.read_text())
    names = {b["metadata"]["name"] for b in data["benchmarks"]}
    assert {bench_maps.bench_name(p, "jit") for p in mp.PROGRAMS} <= names
    assert {bench_maps.compile_name(p) for p in mp.PROGRAMS} <= names

    assert md in (quick_bench.results / "summary.md").read_text()  # in the report as well
    rows = _rows(md)
    assert {c.program for c in mp.CASES} <= set(rows)
    kernel_ran = bench_maps.bench_name("hash_lookup", "kernel") in names
    for case in mp.CASES:
        cells = rows[case.program]
        goal = cells["goal (JIT ≤ kernel)"]
        if case.unsupported:
            assert goal == "n/a: " + case.unsupported
            continue
        assert cells["JIT"] != "—", case.program
        if kernel_ran:
            assert cells["kernel"] != "—" and cells["kernel wall"] != "—" and cells["kernel/JIT"] != "—", case
            assert goal == "met" or goal.startswith("**MISSED**"), (case.program, goal)
        else:
            assert "no kernel result: kernel:" in goal, (case.program, goal)
    assert "Array lookup inlining" in md and "on array, percpu_array;" in md
