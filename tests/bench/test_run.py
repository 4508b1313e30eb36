"""``make bench``'s driver (bench/run.py): the whole suite in quick mode, one consolidated report.

One quick run of every suite (module fixture) is checked for what the issue
asks of the report: pyperf JSON per suite, every row with both sides or a
stated reason, the kernel/userspace ratio, a progress line, PNG plots, and
the README block it can rewrite.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))

import report  # noqa: E402
import run  # noqa: E402

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the kernel sides need root (BPF, uprobes)")


@pytest.fixture(scope="module")
def quick(quick_bench):
    print("bench/run.py --quick: %.0f s" % quick_bench.seconds)
    return quick_bench.results, quick_bench.proc, quick_bench.seconds


def test_quick_run_succeeds_and_says_what_it_is_doing(quick):
    out, proc, _ = quick
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    for i, suite in enumerate(run.SUITES, 1):
        assert "[%d/%d] %s: " % (i, len(run.SUITES), suite.name) in proc.stdout
        assert re.search(r"\[%d/%d\] %s: done in \d+ s" % (i, len(run.SUITES), suite.name), proc.stdout)
    assert "bench: %d suite(s) in" % len(run.SUITES) in proc.stdout


def test_every_suite_writes_pyperf_json(quick):
    import pyperf

    out, _, _ = quick
    for suite in run.SUITES:
        benches = pyperf.BenchmarkSuite.load(str(out / (suite.name + ".json"))).get_benchmarks()
        assert benches, suite.name
        assert all(b.get_nvalue() >= 1 for b in benches)
        assert (out / (suite.name + ".md")).read_text().startswith("# ")


def test_every_row_has_both_sides_or_a_reason(quick):
    out, _, _ = quick
    for suite in run.SUITES:
        rows = suite.rows(out / (suite.name + ".json"))
        assert rows, suite.name
        assert report.check_rows(rows) == [], suite.name
        measured = [r for r in rows if r.kernel is not None and r.user is not None]
        assert measured, "%s: no row measured on both sides" % suite.name
        for r in measured:
            if r.ratio is None and not r.no_ratio:
                # a quick run takes three values: a small userspace cost can fall below its noise, and the
                # table then says so instead of printing a ratio (report.py); anything else is a missing ratio
                assert r.user.median <= 0, (suite.name, r.name)
                assert "below this run's noise" in report.markdown(rows), (suite.name, r.name)
                continue
            assert (r.ratio is not None and r.ratio > 0) or r.no_ratio, (suite.name, r.name)
            assert r.user.nvalues >= 1 and r.kernel.nvalues >= 1


def test_summary_table_has_every_row_with_its_ratio(quick):
    out, proc, _ = quick
    summary = (out / "summary.md").read_text()
    table = [line for line in summary.split("\n\n# ", 1)[0].splitlines() if line.startswith("| ")][1:]
    expected = sum(len(s.rows(out / (s.name + ".json"))) for s in run.SUITES)
    assert len(table) == expected
    for line in table:
        cells = [c.strip() for c in line.strip("|").split("|")]
        suite, name, unit, kernel, user, ratio, note = cells
        if kernel == "—" or user == "—":
            assert ratio == "—" and note, line  # a missing side says why
        elif ratio == "—":
            assert "no ratio: " in note, line  # both sides, but the ratio would mean nothing: says why
        else:
            assert re.fullmatch(r"[\d.,]+×", ratio), line
    assert summary.split("\n\n# ", 1)[0] in proc.stdout.replace("\r", "")  # the table is printed at the end


def test_plots_are_pngs_one_per_suite(quick):
    out, _, _ = quick
    for suite in run.SUITES:
        png = out / (suite.name + ".png")
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", suite.name


def test_readme_block_is_replaced_between_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("intro\n%s\nold table\n%s\nrest\n" % (run.README_START, run.README_END))
    assert run.update_readme("| a | b |\n", "CPU: test", "2026-01-01", readme)
    text = readme.read_text()
    assert "old table" not in text and "| a | b |" in text and "CPU: test" in text
    assert text.startswith("intro\n") and text.endswith("rest\n")
    readme.write_text("no markers\n")
    assert not run.update_readme("| a |", "m", "d", readme)


def test_a_row_without_a_reason_is_reported():
    rows = [report.Row("s", "x", "ns", report.Stat(1.0), None)]
    assert report.check_rows(rows) == ["s/x: user side missing, no reason"]
    rows = [report.Row("s", "x", "ns", report.Stat(1.0), None, reason="refused")]
    assert report.check_rows(rows) == []
    assert "refused" in report.markdown(rows)


def test_report_only_renders_the_existing_results(quick):
    import subprocess

    out, _, _ = quick
    before = (out / "summary.md").read_text()
    proc = subprocess.run([sys.executable, str(BENCH / "run.py"), "--report", "--no-plots", "--results", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "benchmarks done" not in proc.stdout  # nothing ran
    table = lambda md: [line for line in md.split("\n\n# ", 1)[0].splitlines() if line.startswith("| ")]  # noqa: E731
    after = (out / "summary.md").read_text()
    assert table(after) == table(before)  # the same rows from the same JSON


def test_a_userspace_side_below_the_noise_has_no_ratio_and_says_so():
    rows = [report.Row("s", "x", "ns", report.Stat(100.0), report.Stat(-3.0, 20.0, 3))]
    assert rows[0].ratio is None and report.check_rows(rows) == []
    line = [ln for ln in report.markdown(rows).splitlines() if ln.startswith("| s |")][0]
    assert "| — |" in line and "no ratio: the userspace side is below this run's noise" in line
