"""The load suite (bench/bench_load.py, bench/programs/load_workload.c): a libbpf-tools style loader alone
(its probes in the kernel) against the same loader under ``hybrid load``.  The workload is built and run for
real; the quick run of every suite (conftest.py) measures each case on the three sides, the loader's totals
checked exactly, and the report reads back from its JSON."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))

import bench_load as bl  # noqa: E402
import report  # noqa: E402

root = pytest.mark.skipif(os.geteuid() != 0, reason="the loader's kernel probes and hybrid's agent need root")
ROW_NAMES = [bl.ROW_NAMES[c] for c in bl.CASES]


def test_the_rows_and_sides():
    assert bl.CASES == ("work", "usdt", "getppid")
    assert bl.SIDES == ("untraced", "kernel", "hybrid")
    for sizes in (bl.FULL, bl.QUICK):
        for case in bl.CASES:
            n = sizes.calls[case]
            assert n["untraced"] == n["hybrid"] >= n["kernel"] > 0
    # the kernel uprobes of the work case cost tens of µs a call: fewer calls there, a few million in hybrid
    assert bl.FULL.calls["work"]["hybrid"] >= 1_000_000 and bl.FULL.calls["work"]["kernel"] <= 500_000
    assert bl.QUICK.repeat == 1 and bl.FULL.repeat >= 3


def test_expected_totals_are_the_test_program_s():
    """Case by case, the totals add up to those the hload tests expect of the test workload (same sums)."""
    from tests.compat.test_libbpf_kernel import NR_GETPPID, expected_totals

    if NR_GETPPID is None:
        pytest.skip("no getppid syscall number for this machine")
    n = 500
    got = {k: sum(bl.expected_totals(c, n)[k] for c in bl.CASES) for k in bl.expected_totals("work", n)}
    assert got == expected_totals(n, n, n)
    assert bl.hits("work", n) == 2 * n and bl.hits("usdt", n) == bl.hits("getppid", n) == n
    # sums wrap like the program's 64-bit atomic adds
    big = bl.expected_totals("usdt", 5_000_000)["usdt_sum2"]
    assert -(1 << 63) <= big < (1 << 63)
    assert big == ((bl.USDT_ARG2 * (5_000_000 * 5_000_001 // 2)) + (1 << 63)) % (1 << 64) - (1 << 63)


@pytest.fixture(scope="module")
def workload() -> Path:
    if shutil.which(bl.GCC) is None:
        pytest.skip("gcc not installed")
    try:
        return bl.build_workload()  # bench/build/, cached by content (shared with `make bench`)
    except bl.BuildError as e:
        pytest.skip(str(e))


def test_the_workload_has_what_hload_attaches_to(workload):
    assert bl.first_instruction(workload, "hload_work") == "lea"  # the kernel single-steps it
    notes = subprocess.run(["readelf", "-n", str(workload)], capture_output=True, text=True).stdout
    assert re.search(r"Provider: hload\s+Name: tick\s+Location: .*Semaphore: 0x0*[1-9a-f]", notes), notes


@pytest.mark.parametrize("case", bl.CASES)
def test_the_workload_times_its_loop_once_told_to_go(workload, tmp_path, case):
    go = tmp_path / "go"
    p = subprocess.Popen([str(workload), str(go), case, "1000"], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline() == "waiting %d\n" % p.pid
        time.sleep(0.05)
        assert p.poll() is None  # waits for the go-file
        go.touch()
        out, _ = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == 0
    assert re.search(r"^ns \d+$", out, re.M), out
    want = {"work": "work=1000 usdt=0 getppid=0", "usdt": "work=0 usdt=0 getppid=0",
            "getppid": "work=0 usdt=0 getppid=1000"}[case]
    assert "did %s semaphore=0" % want in out  # untraced: the USDT semaphore is not set, nothing fires


def test_bad_arguments(workload, tmp_path):
    for args in (["x"], [str(tmp_path / "go"), "nope", "10"], [str(tmp_path / "go"), "work", "-1"]):
        r = subprocess.run([str(workload), *args], capture_output=True, text=True, timeout=10)
        assert r.returncode == 2, r


def _suite_json(path: Path, names: list[str], metadata: dict | None = None) -> None:
    import pyperf

    for name in names:
        case, side = name.split("/")[1:]
        md = {"name": name, "unit": "second", "loops": 1, "inner_loops": 1000, "hybrid_case": case,
              "hybrid_side": side, "hybrid_calls": 1000, "hybrid_runs": 3, "hybrid_check_ok": 1,
              "hybrid_check": "untraced" if side == "untraced" else "totals exact"}
        if side == "untraced":
            md.update(metadata or {})
        run = pyperf.Run([3e-7, 3.1e-7, 2.9e-7] if side == "untraced" else [5e-7, 5.2e-7, 4.9e-7], metadata=md,
                         collect_metadata=False)
        pyperf.add_runs(str(path), pyperf.Benchmark([run]))


def test_rows_say_why_a_side_is_missing(tmp_path):
    refusal = "the loader exited before it was ready (exit 1): failed to attach uprobe: Operation not permitted"
    out = tmp_path / "partial.json"
    _suite_json(out, [bl.bench_name(c, s) for c in bl.CASES for s in ("untraced", "hybrid")],
                {"hybrid_missing_kernel": refusal})
    rows = bl.rows(out)
    assert [r.name for r in rows] == ROW_NAMES
    assert report.check_rows(rows) == []
    for r in rows:
        assert r.kernel is None and refusal in r.reason
        assert r.user is not None and r.user.median == pytest.approx(200.0)  # ns added over the baseline
    assert bl.missed_goals(out) == []
    text = bl.summarize(out)
    for name in ROW_NAMES:
        assert "| %s |" % name in text
    assert refusal in text


def test_only_the_cases_that_ran_have_rows(tmp_path):
    out = tmp_path / "only.json"
    _suite_json(out, [bl.bench_name("usdt", s) for s in bl.SIDES])
    rows = bl.rows(out)
    assert [r.name for r in rows] == [bl.ROW_NAMES["usdt"]]
    assert rows[0].ratio == pytest.approx(1.0)


@root
def test_quick_run_end_to_end(quick_bench):
    import pyperf

    out, section = quick_bench.suite("load")
    rows = bl.rows(out)
    assert [r.name for r in rows] == ROW_NAMES
    assert report.check_rows(rows) == []
    for r in rows:
        assert r.suite == "load" and r.unit == "ns/call" and r.goal is None
        assert (r.kernel_label, r.user_label) == ("libbpf loader alone (kernel)", "hybrid load (in the process)")
        assert r.user is not None, "%s: the hybrid side did not run: %s" % (r.name, r.reason)
        assert r.kernel is not None, "%s: the kernel side did not run: %s" % (r.name, r.reason)
        assert r.ratio is not None or r.user.median <= 0
        assert "dropped" in r.note
    benches = pyperf.BenchmarkSuite.load(str(out)).get_benchmarks()
    assert sorted(b.get_name() for b in benches) == sorted(bl.bench_name(c, s) for c in bl.CASES for s in bl.SIDES)
    for b in benches:
        md = b.get_metadata()
        case, side = md["hybrid_case"], md["hybrid_side"]
        assert md["unit"] == "second" and md["hybrid_calls"] == bl.QUICK.calls[case][side] == md["inner_loops"]
        assert md["hybrid_check_ok"] == 1 and md["hybrid_mode"] == "quick"
        if side == "untraced":
            continue
        # the loader's own report: the map's totals exact, the ring buffer's events and drops kept
        exp = bl.expected_totals(case, md["hybrid_calls"])
        assert bl.fields(md["hybrid_total"]) == exp
        ev = bl.fields(md["hybrid_events"])
        assert set(ev) >= {"uprobe", "uretprobe", "usdt", "getppid", "dropped"}
        assert md["hybrid_events_sent"] == bl.hits(case, md["hybrid_calls"])
        assert md["hybrid_command"].startswith("hybrid load -- hload -p PID" if side == "hybrid" else "hload -p PID")
    assert bl.missed_goals(out) == [] and bl.failed_checks(out) == []
    assert section.startswith("# hybrid load")
    for name in ROW_NAMES:
        assert "| %s |" % name in section
    assert "Checks: all passed." in section
    assert bl.summarize(out) == section
