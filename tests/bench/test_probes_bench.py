"""The probe benchmark (bench/bench_probes.py, bench/probe_programs.py, bench/programs/victims.c
and probes.bpf.c).

The victims and both builds of the program are compiled for real: the
victims must start with the instructions their rows are about, the two
objects must hold the same program bodies, and each side's probes must fire
once per call (the kernel's when uprobes work here, hybrid's in this
process).  The slow test runs ``bench/run.py --quick --suite probes`` end
to end and checks the table.
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

import bench_probes  # noqa: E402
import probe_programs as pp  # noqa: E402


def need_tools() -> None:
    missing = [t for t in (pp.GCC, pp.CLANG) if shutil.which(t) is None]
    if pp._tool(pp.BPFTOOL) is None:
        missing.append(pp.BPFTOOL)
    if missing:
        pytest.skip("%s not installed: cannot build the probe benchmark" % ", ".join(missing))
    if not pp.KERNEL_BTF.exists():
        pytest.skip("%s not found: cannot generate vmlinux.h" % pp.KERNEL_BTF)


@pytest.fixture(scope="module")
def art(tmp_path_factory) -> pp.Artifacts:
    need_tools()
    return pp.build(tmp_path_factory.mktemp("probes-build"))


@pytest.fixture(scope="module")
def victims(art) -> pp.Victims:
    return pp.Victims(art.victims)


def test_victims_start_with_the_instructions_of_their_rows(art):
    pp.check_victims(art.victims)  # raises otherwise
    import capstone

    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    md.detail = True
    first = {v.name: next(md.disasm(v.prologue, 0)) for v in pp.VICTIMS}
    assert (first["lea"].mnemonic, first["lea"].op_str) == ("lea", "rax, [rdi + rsi]")
    assert (first["push"].mnemonic, first["push"].op_str) == ("push", "rbp")
    assert first["nop5"].mnemonic == "nop" and first["nop5"].size == 5
    for v in pp.VICTIMS:
        insns = list(md.disasm(v.prologue, 0))
        assert insns[-1].mnemonic == "ret" and insns[-1].address >= 5, v.name  # a 5-byte patch window
        assert not any(i.group(capstone.CS_GRP_JUMP) for i in insns), v.name


def test_victim_loop_calls_each_victim_n_times(victims):
    for v in pp.VICTIMS:
        for n in (0, 1, 1000):
            assert victims.loop(v, n) == v.expected_sum(n)
    assert victims.fn(7, 10) == -1


def test_both_objects_hold_the_same_program_bodies(art):
    import hybrid

    with hybrid.load(art.kernel_object) as k, hybrid.load(art.user_object) as u:
        assert {n: lp.section for n, lp in k.programs.items()} == {"count": "uprobe", "count_ret": "uretprobe"}
        assert sorted(u.programs) == sorted("count%s_%s" % (r, v.name) for v in pp.VICTIMS for r in ("", "_ret"))
        for v in pp.VICTIMS:
            entry, ret = u.programs["count_" + v.name], u.programs["count_ret_" + v.name]
            assert entry.section == "uprobe/%s:%s" % (art.victims, v.symbol)
            assert ret.section == "uretprobe/%s:%s" % (art.victims, v.symbol)
            assert entry.spec.insns == k.programs["count"].spec.insns
            assert ret.spec.insns == k.programs["count_ret"].spec.insns
        assert k.programs["count"].spec.insns != k.programs["count_ret"].spec.insns  # another slot


def test_builds_are_cached_by_content(art, tmp_path):
    assert pp.build(art.victims.parent) == art
    assert pp.build_probes(tmp_path / "elsewhere.so", art.victims.parent) != art.user_object


def _fires(side: str, art, victims) -> None:
    problem = pp.side_problem(side, art)
    if problem:
        pytest.skip("the %s side cannot attach here: %s" % (side, problem))
    for v in pp.VICTIMS:
        for probe in pp.PROBES:
            n = 50 if side == "kernel" and v.name == "lea" else 500
            with pp.attach(side, art, v, probe) as p:
                before = p.counts()
                victims.loop(v, n)
                after = pp.check_fired(p, before, probe, n, "%s/%s" % (v.name, probe))
                assert after == tuple(b + e for b, e in zip(before, pp.expected_counts(probe, n)))
                with pytest.raises(RuntimeError, match="not benchmarking a probe that does not run"):
                    pp.check_fired(p, before, probe, n + 1, "x")
            victims.loop(v, 10)  # detached, the victim still computes the same
            assert pp.patched_insn(victims, v) == v.name  # and its bytes are back
    with pp.attach(side, art, pp.VICTIM["push"], "uprobe") as p:
        before = p.counts()
        victims.loop(pp.VICTIM["nop5"], 100)  # another victim: not counted
        assert p.counts() == before


def _patched(side: str, art, victims) -> dict[str, str]:
    """The first instruction of each victim while a uprobe is attached on ``side`` (after hits)."""
    out = {}
    for v in pp.VICTIMS:
        with pp.attach(side, art, v, "uprobe"):
            victims.loop(v, 20)
            out[v.name] = pp.patched_insn(victims, v)
    return out


@pytest.mark.root
@pytest.mark.kernel
def test_kernel_probes_fire_once_per_call(art, victims):
    _fires("kernel", art, victims)
    insn = _patched("kernel", art, victims)
    assert insn["lea"] == insn["push"] == "int3"
    assert insn["nop5"] in ("int3", "call")  # call: the kernel optimized it (Linux >= 6.18)


def test_user_probes_fire_once_per_call(art, victims):
    _fires("user", art, victims)
    assert set(_patched("user", art, victims).values()) == {"jmp"}  # inline hooks, no trap


def test_subject_times_and_checks_its_counts(art):
    if pp.side_problem("user", art):
        pytest.skip("hybrid cannot attach here")
    paths = bench_probes.Paths(str(art.victims), str(art.kernel_object), str(art.user_object))
    s = bench_probes.Subject("nop5", "uprobe+uretprobe", "user", 200, paths)
    try:
        assert s.time(3) > 0
        assert s.probes.counts() == (4 * 200, 4 * 200)  # the untimed first run + 3 timed loops
        s.seen = (0, 0)  # a probe that "missed" hits must fail the benchmark
        with pytest.raises(RuntimeError, match="fired"):
            s.time(1)
    finally:
        s.probes.close()


# --- the report -----------------------------------------------------------------------


def _fake(path: Path, times_ns: dict[str, float], missing: str | None = None) -> None:
    import pyperf

    benches = []
    for name, ns in times_ns.items():
        parts = name.split("/")
        meta = {"name": name, "loops": 1, "hybrid_victim": parts[0], "hybrid_side": parts[-1],
                "hybrid_calls": 10_000 if name.startswith("lea/") and name.endswith("/kernel") else 100_000}
        if missing:
            meta["hybrid_missing"] = missing
        if parts[-1] == "kernel":
            meta["hybrid_kernel_insn"] = "call" if parts[0] == "nop5" else "int3"
        benches.append(pyperf.Benchmark([pyperf.Run([ns * 1e-9 * f for f in (0.99, 1.0, 1.01)], metadata=meta,
                                                    collect_metadata=False)]))
    pyperf.BenchmarkSuite(benches).dump(str(path))


def _rows(md: str) -> dict[str, dict[str, str]]:
    lines = [line for line in md.splitlines() if line.startswith("| ")]
    cols = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[1:]:
        cells = dict(zip(cols, (c.strip() for c in line.strip("|").split("|"))))
        rows["%s/%s" % (cells["victim"], cells["probe"].strip("*"))] = cells
    return rows


def _times(sides=("kernel", "user")) -> dict[str, float]:
    times = {}
    for v in pp.VICTIMS:
        times[bench_probes.bench_name(v.name, None, "none")] = 3.0
        for probe in pp.PROBES:
            if "kernel" in sides:
                times[bench_probes.bench_name(v.name, probe, "kernel")] = 10_003.0 if v.name == "lea" else 1003.0
            if "user" in sides:
                times[bench_probes.bench_name(v.name, probe, "user")] = 53.0
    return times


def test_summary_subtracts_the_baseline_and_marks_missed_goals(tmp_path):
    times = _times()
    times["nop5/uprobe/kernel"] = 603.0  # 600 added vs 100 added: 6x
    times["nop5/uprobe/user"] = 103.0
    path = tmp_path / "probes.json"
    _fake(path, times)
    md = bench_probes.summarize(path)
    rows = _rows(md)
    assert len(rows) == len(pp.VICTIMS) * len(pp.PROBES)
    lea = rows["lea/uprobe"]
    assert lea["kernel added"].startswith("10,000 ± ") and lea["user added"].startswith("50.0 ± ")
    assert lea["kernel/user"] == "200.0×" and lea["goal (≥ 10×)"] == "met"
    assert lea["baseline (no probe)"].startswith("3.00 ± ")
    assert lea["kernel path"] == "single-stepped out of line (int3)"
    assert rows["nop5/uprobe"]["kernel path"] == "nop5 optimized (int3 → call)"
    assert rows["nop5/uprobe"]["goal (≥ 10×)"] == "**MISSED** (6.0×)"
    assert "Goal missed** on nop5/uprobe" in md
    assert "100,000 calls per ctypes call" in md and "kernel `lea` rows use 10,000 calls" in md
    assert [m.split(":")[0] for m in bench_probes.missed_goals(path)] == ["probes/nop5/uprobe"]


def test_summary_says_why_a_side_is_missing(tmp_path):
    path = tmp_path / "probes.json"
    _fake(path, _times(("kernel",)), missing="user: hybrid cannot attach count_lea: no agent")
    md = bench_probes.summarize(path)
    for name, cells in _rows(md).items():
        assert cells["user added"] == "—"
        assert cells["goal (≥ 10×)"] == "— (no user result: user: hybrid cannot attach count_lea: no agent)", name
    assert "Goal not checked" in md
    assert bench_probes.missed_goals(path) == []


def test_kernel_lea_rows_use_fewer_calls():
    assert bench_probes.calls_for("lea", "kernel", 100_000) == 100_000 // bench_probes.KERNEL_LEA_DIVISOR
    assert bench_probes.calls_for("lea", "user", 100_000) == 100_000
    assert bench_probes.calls_for("push", "kernel", 100_000) == 100_000


# --- end to end ---------------------------------------------------------------------


@pytest.mark.slow
def test_run_quick_probes_gives_every_row_both_sides_or_a_reason(quick_bench):
    need_tools()
    json_path, md = quick_bench.suite("probes")
    data = json.loads(json_path.read_text())
    names = {b["metadata"]["name"] for b in data["benchmarks"]}
    assert {bench_probes.bench_name(v.name, None, "none") for v in pp.VICTIMS} <= names
    assert md in (quick_bench.results / "summary.md").read_text()  # in the report as well
    rows = _rows(md)
    assert len(rows) == len(pp.VICTIMS) * len(pp.PROBES)
    for side in ("kernel", "user"):
        ran = bench_probes.bench_name("push", "uprobe", side) in names
        for name, cells in rows.items():
            if ran:
                assert cells["%s added" % side] != "—", (name, side)
            else:
                assert "no %s result: %s:" % (side, side) in cells["goal (≥ 10×)"], (name, cells)
    for name, cells in rows.items():
        if cells["kernel added"] != "—" and cells["user added"] != "—":
            assert cells["goal (≥ 10×)"] == "met" or cells["goal (≥ 10×)"].startswith("**MISSED**"), name
