"""The example agent (make demo): per thread, syscalls counted by a kernel raw_tp/sys_enter program and
calls of work() counted by a uprobe, in one shared map; every count checked against the workload's own."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="kernel programs and launching with probes need root")


@pytest.fixture(scope="module")
def threadstat():
    spec = importlib.util.spec_from_file_location("threadstat", ROOT / "examples" / "threadstat" / "threadstat.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["threadstat"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("mode", ["mirror", "syscall", "kernel"])
def test_counts_are_exact_per_thread(threadstat, tmp_path, mode):
    rows, facts = threadstat.run(threads=3, calls=20000, mode=mode, interval=0.05, build_dir=tmp_path)
    workers = [r for r in rows if r.expected_calls is not None]
    assert len(workers) == 3
    for i, r in enumerate(sorted(workers, key=lambda r: r.expected_calls)):
        assert (r.calls, r.getppid) == (20000 * (i + 1), 10 * (i + 1)), threadstat.table(rows)
        assert r.syscalls > r.getppid  # gettid, the thread's own start-up and exit
    # the main thread made syscalls (clone, futex, write) but called work() never
    assert all(r.calls == 0 for r in rows if r.expected_calls is None)


def test_main_prints_the_table(threadstat, capsys):
    assert threadstat.main(["-t", "2", "-c", "1000"]) == 0
    out = capsys.readouterr().out
    assert "TID" in out and "work() CALLS" in out and "2 of 2 threads counted exactly" in out
