"""The bridge benchmark (bench/bench_bridge.py): every case computes what it claims, and the quick suite
runs end to end and reports every row with its ratio to the userspace-only map."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))

import bench_bridge  # noqa: E402

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="kernel maps need root")


def test_every_case_does_its_operations_on_the_right_map():
    path = str(bench_bridge.build())
    obj = bench_bridge.load(path)
    try:
        assert obj.maps["shared_array"].bridge == "mmap" and obj.maps["shared_hash"].bridge == "syscall"
        assert obj.maps["mirror_hash"] is obj.kernel.maps["mirror_hash"]  # the complete view: the kernel's
        for case in bench_bridge.CASES:
            bench_bridge.Subject(case, path)  # checks r0 == number of successful operations
        # the lookups really went to the kernel's maps
        k = obj.kernel.maps
        assert int.from_bytes(k["shared_array"].lookup(b"\0\0\0\0"), "little") > 0
        obj.sync()
        assert int.from_bytes(k["mirror_hash"].lookup(b"\1\0\0\0"), "little") > 0
    finally:
        bench_bridge._loaded.pop(path).close()
        bench_bridge._subjects.clear()


def test_quick_suite_reports_every_row(quick_bench):
    _, md = quick_bench.suite("bridge")
    rows = [line for line in md.splitlines() if line.startswith("| ") and "ns/op" not in line]
    assert len(rows) == len(bench_bridge.CASES)
    assert not any("not measured" in row for row in rows)
    assert "kernel map by mmap | lookup" in md and ("met" in md or "MISSED" in md)
