"""The xdp benchmark (bench/bench_xdp.py): a quick run measures every side on real packets and reports
every row, kernel XDP beside userspace XDP."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))

import bench_xdp  # noqa: E402
import report  # noqa: E402

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces, XDP and AF_XDP need root")


def test_frame_is_a_valid_udp_packet():
    f = bench_xdp.frame("02:00:00:00:00:01", "02:00:00:00:00:02")
    assert len(f) == 64 and f[12:14] == b"\x08\x00" and f[23] == 17
    assert int.from_bytes(f[36:38], "big") == bench_xdp.PORT


def test_quick_run_reports_both_sides(tmp_path):
    out = tmp_path / "xdp.json"
    proc = subprocess.run([sys.executable, str(BENCH / "bench_xdp.py"), "--quick", "-o", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = bench_xdp.rows(out)
    assert len(rows) == 4 * len(bench_xdp.PROGRAMS) + 1
    assert report.check_rows(rows) == []
    for r in rows:
        assert r.kernel is not None and r.user is not None, (r.name, r.reason)
        assert r.ratio is not None and r.ratio > 0
    for r in rows:
        if "throughput" in r.name:
            assert "100% of the burst processed" in r.note or "% of the burst processed" in r.note
    md = bench_xdp.summarize(out)
    assert md.startswith("# ") and "drop: throughput vs native XDP" in md
