"""The syscall probe benchmark (bench/bench_syscalls.py, bench/syscall_programs.py,
bench/programs/sysloop.c and syscalls.bpf.c).

The loop, the child and the eBPF object are built for real; every subject
(the kernel's tracepoints and hybrid's libc hooks, on this process and on a
child) must count exactly the getppid calls of its target and none of the
others'.  Subjects that attach hybrid in the measuring process run in a
subprocess: hybrid's detach leaves libc's syscall sites hooked, which the
rest of the test session should not inherit.  The slow test runs the suite
with ``--quick`` end to end and checks its rows and summary.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))

import bench_syscalls as bs  # noqa: E402
import report  # noqa: E402
import syscall_programs as sp  # noqa: E402

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="kernel tracepoints and ptrace need root")

ROW_NAMES = ("traced process: sys_enter", "traced process: sys_enter+sys_exit", "untraced process: sys_enter")


def need_tools() -> None:
    import probe_programs as pp

    missing = [t for t in (sp.GCC, sp.CLANG) if shutil.which(t) is None]
    if pp._tool(pp.BPFTOOL) is None:
        missing.append(pp.BPFTOOL)
    if missing:
        pytest.skip("%s not installed: cannot build the syscall benchmark" % ", ".join(missing))
    if not pp.KERNEL_BTF.exists():
        pytest.skip("%s not found: cannot generate vmlinux.h" % pp.KERNEL_BTF)


@pytest.fixture(scope="module")
def art() -> sp.Artifacts:
    need_tools()
    return sp.build()  # bench/build/, cached by content (shared with `make bench`)


def test_the_rows_are_the_issue_s_rows():
    assert tuple(c.label for c in bs.CASES) == ROW_NAMES
    # hybrid's in-process (traced) benchmarks run last: they leave libc's syscall sites hooked
    hooked = [bs.leaves_hooks(c, s) for c, s in bs.ORDER]
    assert hooked == sorted(hooked) and sum(hooked) == 2
    assert sorted(c.bench(s) for c, s in bs.ORDER) == sorted(c.bench(s) for c in bs.CASES for s in bs.SIDES)


def test_loop_and_child(art):
    loop = sp.Loop(art.loop)
    loop.run(0)
    loop.run(1000)
    child = sp.Child(art.child)
    try:
        child.run(10)
        assert child.p.poll() is None
    finally:
        child.close()
    assert child.p.returncode == 0


def test_the_object_has_both_programs_and_the_filter(art):
    import hybrid

    with hybrid.load(art.bpf, values={"target_tgid": 1234}, kernel=False) as obj:
        assert {n: lp.section for n, lp in obj.programs.items()} == {
            "count_enter": "tracepoint/syscalls/sys_enter_getppid",
            "count_exit": "tracepoint/syscalls/sys_exit_getppid"}
    assert int.from_bytes(sp.rodata(art.bpf, 1234), "little") == 1234


# Runs every subject in a fresh process (see the module doc) and reports what each counted.
COUNT_SCRIPT = r"""
import json, os, sys
sys.path.insert(0, sys.argv[1])
import bench_syscalls as bs, syscall_programs as sp
art = sp.Artifacts(*sys.argv[2:5])
out = {}
for case, side in bs.ORDER:
    s = bs.Subject(case, side, 1000, art)
    try:
        c0 = s.probes.counts()
        s.loop.run(5000)                  # the measuring process: 5000 getppid calls
        c1 = s.probes.counts()
        child = None
        if s.child is not None:
            s.child.run(300)              # the target child: 300 calls
            child = [b - a for a, b in zip(c1, s.probes.counts())]
        hooked = sp.getppid_code() != sp.getppid_file_code()
        s.seen = s.probes.counts()
        s.time(2)                          # the benchmark's own checks (2 loops of 1000 calls)
        out[case.bench(side)] = {"self": [b - a for a, b in zip(c0, c1)], "child": child, "hooked": hooked}
    finally:
        s.close()
print(json.dumps(out))
"""


@root_only
def test_every_subject_counts_exactly(art):
    r = subprocess.run([sys.executable, "-c", COUNT_SCRIPT, str(BENCH), str(art.loop), str(art.child), str(art.bpf)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    for side in bs.SIDES:
        assert got["getppid/traced/sys_enter/" + side]["self"] == [5000, 0]
        assert got["getppid/traced/sys_enter+sys_exit/" + side]["self"] == [5000, 5000]
        u = got["getppid/untraced/sys_enter/" + side]
        assert u["self"] == [0, 0]  # the measuring process's calls are not counted
        assert u["child"] == [300, 0]  # the child's are: the probe is attached
    # hybrid hooks this process's libc only when it traces this process
    assert {k: v["hooked"] for k, v in got.items()} == {
        "getppid/%s/%s/%s" % (c.target, c.probe, s): s == "user" and c.target == "traced"
        for c in bs.CASES for s in bs.SIDES}


@root_only
def test_a_probe_that_does_not_count_fails_the_check(art):
    loop = sp.Loop(art.loop)
    with sp.attach("kernel", art, "sys_enter", tgid=1) as p:  # counts init's calls, not ours
        before = p.counts()
        loop.run(100)
        with pytest.raises(RuntimeError, match="counted"):
            sp.check_counts(p, before, sp.expected_counts("sys_enter", 100), "wrong target")


def _suite_json(path: Path, names: list[str], metadata: dict | None = None) -> None:
    import pyperf

    for name in names:
        md = {"name": name, "unit": "second", "loops": 1, "inner_loops": 1000}
        md.update(metadata or {})
        run = pyperf.Run([3e-7, 3.1e-7, 2.9e-7], metadata=md, collect_metadata=False)
        pyperf.add_runs(str(path), pyperf.Benchmark([run]))


def test_rows_say_why_a_side_is_missing(tmp_path):
    refusal = "libbpf: tracepoint syscalls/sys_enter_getppid: Permission denied"
    missing = {c.bench("kernel"): refusal for c in bs.CASES}
    out = tmp_path / "partial.json"
    _suite_json(out, [bs.BASELINE, bs.CASES[0].bench("user")], {"hybrid_missing": json.dumps(missing)})
    rows = bs.rows(out)
    assert [r.name for r in rows] == list(ROW_NAMES)
    assert report.check_rows(rows) == []
    assert all(r.kernel is None and refusal in r.reason for r in rows)
    assert rows[0].user is not None and abs(rows[0].user.median) < 1e-6  # same values as the baseline
    assert "no result" in rows[1].reason and "no result" in rows[2].reason  # hybrid's missing, unexplained
    assert bs.missed_goals(out) == []
    text = bs.summarize(out)
    for name in ROW_NAMES:
        assert name in text


@root_only
def test_quick_run_end_to_end(art, quick_bench):
    out, _ = quick_bench.suite("syscalls")
    rows = bs.rows(out)
    assert [r.name for r in rows] == list(ROW_NAMES)
    assert report.check_rows(rows) == []
    for row in rows:
        assert row.suite == "syscalls" and row.unit == "ns/syscall"
        assert (row.kernel is not None and row.user is not None) or row.reason, row
    by_name = bs._load(out)
    assert sorted(by_name) == sorted([bs.BASELINE] + [c.bench(s) for c in bs.CASES for s in bs.SIDES])
    assert all(b.get_metadata().get("inner_loops") == bs.CALLS[True] for b in by_name.values())
    text = bs.summarize(out)
    assert text.startswith("# Syscall probes")
    for name in ROW_NAMES:
        assert "| %s |" % name in text
    assert isinstance(bs.missed_goals(out), list)
