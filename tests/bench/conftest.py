"""One quick run of every benchmark suite (``bench/run.py --quick``) shared by the bench tests.

Each suite's end-to-end test reads its JSON and markdown from this run
instead of starting its own: a quick run is most of these tests' time.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"


@dataclass
class QuickBench:
    results: Path
    proc: subprocess.CompletedProcess
    seconds: float

    @property
    def stdout(self) -> str:
        return self.proc.stdout.replace("\r", "\n")

    def ok(self) -> None:
        assert self.proc.returncode == 0, self.proc.stdout[-6000:] + self.proc.stderr[-3000:]

    def suite(self, name: str) -> tuple[Path, str]:
        """The suite's JSON path and markdown section."""
        self.ok()
        return self.results / (name + ".json"), (self.results / (name + ".md")).read_text()


@pytest.fixture(scope="session")
def quick_bench(tmp_path_factory) -> QuickBench:
    if os.geteuid() != 0:
        pytest.skip("the benchmark suites' kernel sides need root")
    out = tmp_path_factory.mktemp("bench-quick")
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, str(BENCH / "run.py"), "--quick", "--results", str(out)],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    return QuickBench(out, proc, time.monotonic() - t0)
