"""The attach latency benchmark (bench/bench_attach.py, bench/programs/attach_target.c).

The target and the three builds of its probes are compiled for real.  Every
subject (kernel and hybrid; attach to a running process with 1 and 10
uprobes, load + attach, launch) is run once: each repetition checks itself
that its probes fire once per call and stop firing after detach, and these
tests check that the checking itself catches a probe that does not fire.
The slow test runs ``bench/bench_attach.py --quick --quiet`` end to end and
checks its rows and summary.  Everything needs root (ptrace, BPF).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))

import bench_attach as ba  # noqa: E402
import probe_programs as pp  # noqa: E402
import report  # noqa: E402

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="attaching to another process needs root")


def need_tools() -> None:
    missing = [t for t in (pp.GCC, pp.CLANG) if shutil.which(t) is None]
    if pp._tool(pp.BPFTOOL) is None:
        missing.append(pp.BPFTOOL)
    if missing:
        pytest.skip("%s not installed: cannot build the attach benchmark" % ", ".join(missing))
    if not pp.KERNEL_BTF.exists():
        pytest.skip("%s not found: cannot generate vmlinux.h" % pp.KERNEL_BTF)


@pytest.fixture(scope="module")
def art(tmp_path_factory) -> ba.Artifacts:
    need_tools()
    return ba.build(tmp_path_factory.mktemp("attach-build"))


@pytest.fixture(scope="module")
def kernel(art):
    try:
        side = ba.KernelSide(art)
    except ba.SideUnavailable as e:
        pytest.skip("kernel side unavailable here: %s" % e)
    yield side
    side.close()


@pytest.fixture(scope="module")
def user(art):
    side = ba.UserSide(art)
    yield side
    side.close()


def test_target_calls_its_functions_and_answers_right(art):
    ba.check_target(art.target)
    t = ba.Target.spawn(art.target)
    try:
        t.call(3)  # checks the answer against the Python model of the target
        t.call(5)
    finally:
        t.close()
    assert t.popen.returncode == 0


def test_the_gate_execs_the_target_with_the_same_pid(art):
    t, w = ba._spawn_gated(art.target)
    try:
        os.write(w, b"g")
        os.close(w)
        t.ready()  # "ready <pid>" with the gate's pid
        t.call(2)
    finally:
        t.close()


def test_the_gate_exits_when_not_released(art):
    t, w = ba._spawn_gated(art.target)
    os.close(w)
    assert t.popen.wait(timeout=10) == 65
    t.close()


@pytest.mark.parametrize("side_name", ["kernel", "user"])
def test_every_subject_fires_after_attach(request, art, side_name):
    """Each measurement, once: the repetitions raise unless the probes fire once per call."""
    side = request.getfixturevalue(side_name)
    got = {}
    for n in ba.COUNTS:
        got.update(ba.rep_running(side, art.target, n))
    got.update(ba.rep_load_attach(side, art))
    got.update(ba.rep_launch(side, art))
    expected = {ba.bench_name(w, n, side_name) for w in ("attach", "detach") for n in ba.COUNTS}
    expected |= {ba.bench_name("load+attach", 1, side_name), ba.bench_name("launch", 1, side_name)}
    assert expected <= set(got)
    assert all(0 < v < 30 for v in got.values()), got
    if side_name == "user":
        assert side.engine == "aot"  # attached in another process: AOT code


def test_the_launch_baselines_run(art):
    got = ba.rep_spawn(art)
    assert set(got) == {"launch/none", "launch/gate"} and all(v > 0 for v in got.values())


class _Silent:
    """A side whose attach places nothing: the repetition must refuse to time it."""

    side = "user"

    def __init__(self):
        self.engine = "none"

    def attach(self, pid, n, obj=None):
        class Handle:
            def detach(self):
                pass

        return Handle()

    def count(self, obj=None):
        return 0


def test_a_probe_that_does_not_fire_fails_the_repetition(art):
    with pytest.raises(RuntimeError, match="does not run"):
        ba.rep_running(_Silent(), art.target, 1)


def test_kernel_probe_counts_only_its_pid(art, kernel):
    """The kernel probe is for one pid: calls in another target running the same binary do not count."""
    a, b = ba.Target.spawn(art.target), ba.Target.spawn(art.target)
    links = kernel.attach(a.pid, 1)
    try:
        before = kernel.count()
        b.call(4)
        assert kernel.count() == before
        a.call(4)
        assert kernel.count() == before + 4
    finally:
        kernel.detach(links)
        a.close()
        b.close()


def test_quick_run_gives_every_row(quick_bench):
    need_tools()
    out, _ = quick_bench.suite("attach")
    rows = ba.rows(out)
    assert [r.name for r in rows] == [d.name for d in ba.ROWS]
    assert report.check_rows(rows) == []
    for r in rows:
        assert r.suite == "attach" and r.unit == "ms"
        assert (r.kernel is not None and r.user is not None) or r.reason, r
        for s in (r.kernel, r.user):
            assert s is None or (s.median > 0 and s.nvalues == ba.REPS[True])
    md = ba.summarize(out)
    assert md.startswith("# Attach latency")
    for r in rows:
        assert "| %s |" % r.name in md
    assert ba.missed_goals(out) == []
    import pyperf

    names = {b.get_name() for b in pyperf.BenchmarkSuite.load(str(out)).get_benchmarks()}
    assert {"launch/none", "launch/gate"} <= names
    user = [b for b in pyperf.BenchmarkSuite.load(str(out)).get_benchmarks() if b.get_name() == "attach/1/user"]
    if user:
        assert user[0].get_metadata()["hybrid_engine"] == "aot"


def test_importing_runs_nothing():
    code = "import sys; sys.path.insert(0, %r); import bench_attach" % str(BENCH)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout == "" and proc.stderr == ""
