"""The tools suite (bench/bench_tools.py): a quick run measures every case on both sides (or says why
not), with every tool's output checked, and its report reads back from the JSON."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))

import bench_tools  # noqa: E402
import bench_tools_snoop  # noqa: E402
import report  # noqa: E402

root = pytest.mark.skipif(os.geteuid() != 0, reason="bcc and the ports' probes in another process need root")
ROWS = [s.name for s in bench_tools.ROW_SPECS]


def test_failure_cause_names_the_refused_call():
    err = ("bpf: Failed to load program: Operation not permitted\n\nTraceback (most recent call last):\n"
           "  File \"/usr/sbin/opensnoop-bpfcc\", line 387, in <module>\n    b = BPF(text=bpf_text)\n"
           "  File \"/usr/lib/python3/dist-packages/bcc/__init__.py\", line 1475, in _trace_autoload\n"
           "    self.attach_kretfunc(fn_name=func_name)\n"
           "  File \"/usr/lib/python3/dist-packages/bcc/__init__.py\", line 1149, in attach_kretfunc\n"
           "    fn = self.load_func(fn_name, BPF.TRACING)\n"
           "Exception: Need super-user privileges to run\n")
    cause = bench_tools_snoop.failure_cause(err)
    assert cause == ("attach_kretfunc: bpf: Failed to load program: Operation not permitted; "
                     "Exception: Need super-user privileges to run")
    assert bench_tools_snoop.refused_what(cause) == "kretfunc refused"
    assert bench_tools_snoop.failure_cause("") == ""


@pytest.fixture(scope="module")
def quick_json(quick_bench):
    return quick_bench.suite("tools")[0]


@root
def test_quick_run_has_every_row_with_both_sides_or_a_reason(quick_json):
    rows = bench_tools.rows(quick_json)
    assert [r.name for r in rows] == ROWS
    assert report.check_rows(rows) == []
    for r in rows:
        assert r.suite == "tools" and r.unit == "ns added/call"
        assert r.user is not None, "%s: the userspace side did not run: %s" % (r.name, r.reason)
        assert r.kernel is not None or r.reason, r.name
        assert r.user_label == ("bcc's tool under hybrid bcc (probes in the process)" if "hybrid bcc" in r.name
                                else "port (probes in the process)")
    by = {r.name: r for r in rows}
    assert by["funclatency: function starting with `lea`"].goal == 100
    assert by["memleak: malloc+free pair"].goal == 20
    assert by["syscount: getppid"].goal == by["opensnoop: openat"].goal == 1
    assert by["syscount: untraced process"].goal is None
    for name in ROWS[:5] + ROWS[-2:]:
        assert by[name].kernel_label.startswith("bcc 0.26"), by[name].kernel_label
        assert by[name].kernel is not None, by[name].reason
    assert ROWS[-2:] == ["funclatency-bpfcc under `hybrid bcc`: function starting with `lea`",
                         "funclatency-bpfcc under `hybrid bcc`: function starting with `push`"]
    assert by[ROWS[-2]].goal == 100
    # bcc's opensnoop was tried: either it ran (the kernel side is bcc) or its failure is quoted
    k = by["opensnoop: openat"].kernel_label
    assert k.startswith("bcc ") or k.startswith("kernel tracepoints (port --mode kernel): opensnoop-bpfcc does not "
                                                "run here ("), k


@root
def test_quick_run_checks_every_tools_output(quick_json):
    import pyperf

    benches = pyperf.BenchmarkSuite.load(str(quick_json)).get_benchmarks()
    names = {b.get_name() for b in benches}
    for tool, case in (("funclatency", "lea"), ("funclatency", "push"), ("syscount", "getppid"),
                       ("memleak", "alloc"), ("opensnoop", "openat")):
        for side in ("untraced", "port") + (("hybrid-bcc",) if tool == "funclatency" else ()):
            assert bench_tools.bench_name(tool, case, side) in names
    for b in benches:
        md = b.get_metadata()
        assert md["unit"] == "second" and md["hybrid_calls"] > 0 and md["hybrid_command"]
        assert md["hybrid_check_ok"] == 1, (b.get_name(), md["hybrid_check"])
        if md["hybrid_side"] == "port":
            assert md["hybrid_command"].startswith("python tools/bcc_ports/")
        if md["hybrid_side"] == "hybrid-bcc":
            assert md["hybrid_command"].startswith("python -m hybrid.cli bcc -- /usr/sbin/funclatency-bpfcc -p ")
    assert bench_tools.failed_checks(quick_json) == []
    md = {b.get_name(): b.get_metadata() for b in benches}
    assert md["tools/funclatency/lea/bcc"]["hybrid_check"] == "count 100000 of 100000"
    assert md["tools/funclatency/lea/hybrid-bcc"]["hybrid_check"] == "count 1000000 of 1000000"
    assert md["tools/memleak/alloc/port"]["hybrid_check"] == "leak reported"


@root
def test_quick_run_summary(quick_json):
    md = bench_tools.summarize(quick_json)
    assert md.startswith("# bcc tools")
    assert "CPU:" in md and "Goals:" in md
    for name in ROWS:
        assert "| %s |" % name in md
    assert ("met" in md) or ("MISSED" in md)
    assert isinstance(bench_tools.missed_goals(quick_json), list)
