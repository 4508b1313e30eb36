#!/usr/bin/env python3
"""Run hybrid's benchmark suites and report them: the ``make bench`` entry.

Each suite is a pyperf script run as a subprocess (pyperf spawns its own
worker processes) writing its JSON to ``bench/results/<suite>.json``; once
it has finished, the suite's summary is computed from that JSON in this
process, printed, and written to ``bench/results/<suite>.md``.

    .venv/bin/python bench/run.py [--quick] [--suite NAME ...] [--strict] [-- PYPERF-ARGS]

``--quick`` is a smoke test (about half a minute per suite, numbers noisy);
``--strict`` exits with status 3 when a suite's speed goal is missed
(otherwise goals are reported, not enforced).  Arguments after ``--`` go
to every suite's pyperf script.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

BENCH_DIR = Path(__file__).resolve().parent
RESULTS = BENCH_DIR / "results"
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))


@dataclass(frozen=True)
class Suite:
    name: str
    script: str  # a pyperf script in bench/, run as `python script -o JSON [--quick] ...`
    description: str
    report: Callable[[Path], str]  # JSON -> markdown
    missed_goals: Callable[[Path], list[str]]  # JSON -> what missed its goal

    @property
    def path(self) -> Path:
        return BENCH_DIR / self.script


def _engines_report(json_path: Path) -> str:
    import bench_engines

    return bench_engines.summarize(json_path)


def _engines_missed(json_path: Path) -> list[str]:
    import bench_engines

    return ["engines/%s: JIT %.2fx gcc -O2" % (r.program, r.jit_vs_gcc)
            for r in bench_engines.load_rows(json_path) if r.goal_met is False]


def _maps_report(json_path: Path) -> str:
    import bench_maps

    return bench_maps.summarize(json_path)


def _maps_missed(json_path: Path) -> list[str]:
    import bench_maps

    return bench_maps.missed_goals(json_path)


def _probes_report(json_path: Path) -> str:
    import bench_probes

    return bench_probes.summarize(json_path)


def _probes_missed(json_path: Path) -> list[str]:
    import bench_probes

    return bench_probes.missed_goals(json_path)


def _bridge_report(json_path: Path) -> str:
    import bench_bridge

    return bench_bridge.summarize(json_path)


def _bridge_missed(json_path: Path) -> list[str]:
    import bench_bridge

    return bench_bridge.missed_goals(json_path)


SUITES: list[Suite] = [
    Suite("engines", "bench_engines.py",
          "gcc -O2 / JIT / AOT / interpreter on sieve, loop, stack_mix, helpers",
          _engines_report, _engines_missed),
    Suite("maps", "bench_maps.py",
          "map lookup/update/delete, hybrid's JIT (and AOT) vs the kernel (BPF_PROG_TEST_RUN)",
          _maps_report, _maps_missed),
    Suite("probes", "bench_probes.py",
          "ns per probed call: kernel uprobes vs hybrid's in-process probes on lea/push/nop5 victims",
          _probes_report, _probes_missed),
    Suite("bridge", "bench_bridge.py",
          "ns per map op from a userspace program: kernel maps (mmap, bpf(), mirror) vs userspace maps",
          _bridge_report, _bridge_missed),
]


def run_suite(suite: Suite, index: int, total: int, args: argparse.Namespace) -> Path:
    """Run one suite's pyperf script; its JSON path.  Raises SystemExit on failure."""
    out = args.results / (suite.name + ".json")
    partial = out.with_name(suite.name + ".partial.json")  # pyperf refuses to overwrite: start afresh
    partial.unlink(missing_ok=True)
    cmd = [sys.executable, str(suite.path), "-o", str(partial)]
    if args.quick:
        cmd += ["--quick", "--quiet"]
    cmd += args.pyperf_args
    print("[%d/%d] %s: %s ..." % (index, total, suite.name, suite.description), flush=True)
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=BENCH_DIR.parent)
    elapsed = time.monotonic() - start
    if proc.returncode != 0:
        print("[%d/%d] %s: FAILED (exit %d) after %.0f s: %s"
              % (index, total, suite.name, proc.returncode, elapsed, " ".join(cmd)), flush=True)
        raise SystemExit(1)
    os.replace(partial, out)
    print("[%d/%d] %s: done in %.0f s -> %s" % (index, total, suite.name, elapsed, out), flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    pyperf_args: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, pyperf_args = argv[:i], argv[i + 1:]
    parser = argparse.ArgumentParser(description="Run hybrid's benchmark suites (pyperf) and report them.")
    parser.add_argument("--quick", action="store_true", help="smoke test: few processes and values")
    parser.add_argument("--suite", action="append", choices=[s.name for s in SUITES],
                        help="run only this suite (repeatable; default: all)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="output folder (default: bench/results)")
    parser.add_argument("--strict", action="store_true", help="exit 3 if a speed goal is missed")
    args = parser.parse_args(argv)
    args.pyperf_args = pyperf_args
    args.results.mkdir(parents=True, exist_ok=True)

    suites = [s for s in SUITES if not args.suite or s.name in args.suite]
    start = time.monotonic()
    reports = []
    for i, suite in enumerate(suites, 1):
        json_path = run_suite(suite, i, len(suites), args)
        md = suite.report(json_path)
        (args.results / (suite.name + ".md")).write_text(md)
        reports.append((suite, json_path, md))

    missed = []
    for suite, json_path, md in reports:
        print()
        print(md, end="")
        print("(written to %s)" % (args.results / (suite.name + ".md")))
        missed += suite.missed_goals(json_path)
    print()
    print("bench: %d suite(s) in %.0f s%s" % (len(suites), time.monotonic() - start,
                                             " (quick: smoke test, numbers are noisy)" if args.quick else ""))
    if missed:
        print("bench: goals missed: " + "; ".join(missed))
        if args.strict:
            return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
