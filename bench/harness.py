"""The runner every suite uses: pyperf's, or an in-process one for ``--quick``.

Full runs use :class:`pyperf.Runner` (worker processes, calibration, the
numbers to publish).  A pyperf worker is a fresh Python process that sets
its subject up again (load, JIT, attach), which costs more than the quick
mode's whole budget on suites with dozens of rows.  ``--quick`` therefore
runs every benchmark in the suite's own process with
:class:`InProcessRunner`: the same ``bench_time_func`` interface, a short
calibration of ``loops`` (until one value takes ``min_time``), ``values``
values, and the same pyperf JSON (``pyperf stats``/``compare_to`` read it).
Subjects a suite caches per benchmark are released between benchmarks
through ``runner.after_each`` (a probe left attached would slow the next
row down), so quick numbers are noisy, not wrong.

    runner = harness.make_runner(quick, processes=4, values=3, min_time=0.1,
                                 add_cmdline_args=_forward_args)
    runner.after_each = release_subjects   # optional; pyperf's runner ignores it
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Callable


def take_quick(argv: list[str] | None = None) -> bool:
    """Remove ``--quick`` from ``argv`` (``sys.argv`` by default); whether it was there."""
    argv = sys.argv if argv is None else argv
    if "--quick" in argv:
        argv.remove("--quick")
        return True
    return False


def make_runner(quick: bool, *, processes: int, values: int, min_time: float,
                add_cmdline_args: Callable | None = None):
    """pyperf's Runner for full runs; :class:`InProcessRunner` when ``quick``."""
    if quick:
        return InProcessRunner(values=values, min_time=min_time)
    import pyperf

    return pyperf.Runner(processes=processes, values=values, min_time=min_time,
                         add_cmdline_args=add_cmdline_args)


def suite_runner(full: tuple, quick_settings: tuple, *, add_cmdline_args: Callable | None = None,
                 release: Callable[[], None] | None = None, description: str = ""):
    """What every suite's ``main`` starts with: ``(runner, quick)``.

    ``full`` / ``quick_settings`` are (processes, values, min_time); ``release`` closes the suite's cached
    subjects between benchmarks in quick mode (pyperf's own runner ignores it).
    """
    quick = take_quick()
    processes, values, min_time = quick_settings if quick else full
    runner = make_runner(quick, processes=processes, values=values, min_time=min_time,
                         add_cmdline_args=add_cmdline_args)
    if release is not None:
        runner.after_each = release
    if description:
        runner.argparser.description = description
    return runner, quick


class InProcessRunner:
    """pyperf.Runner's interface, every benchmark run in this process (quick mode)."""

    def __init__(self, values: int = 3, min_time: float = 0.02):
        self.values = max(1, values)
        self.min_time = min_time
        self.after_each: Callable[[], None] | None = None
        self.argparser = argparse.ArgumentParser()
        self.argparser.add_argument("-o", "--output", default=None, help="pyperf JSON file to write")
        self.argparser.add_argument("-q", "--quiet", action="store_true")
        self.argparser.add_argument("-v", "--verbose", action="store_true")
        self.args = None

    def parse_args(self, args=None):
        self.args = self.argparser.parse_args(args)
        self.args.worker = False  # this process is the parent and the worker
        return self.args

    def _calibrate(self, func, args) -> int:
        loops = 1
        while True:
            if func(loops, *args) >= self.min_time or loops >= 1 << 30:
                return loops
            loops *= 2

    def bench_time_func(self, name: str, func, *args, inner_loops: int | None = None,
                        metadata: dict | None = None):
        """Time ``func(loops, *args)`` (seconds for ``loops`` iterations) like pyperf, in this process."""
        import pyperf

        if self.args is None:
            self.parse_args()
        inner = inner_loops or 1
        try:
            loops = self._calibrate(func, args)  # also the warmup: first use sets the subject up
            samples = [func(loops, *args) for _ in range(self.values)]
        finally:
            if self.after_each is not None:
                self.after_each()
        md = {"name": name, "loops": loops, "unit": "second", "hybrid_quick": "in-process"}
        if inner_loops:
            md["inner_loops"] = inner
        md.update(metadata or {})
        run = pyperf.Run([s / (loops * inner) for s in samples], metadata=md, collect_metadata=False)
        bench = pyperf.Benchmark([run])
        if not self.args.quiet:
            print("%s: %s" % (name, bench.format_value(bench.median())), flush=True)
        if self.args.output:
            pyperf.add_runs(self.args.output, bench)
        return bench

    def bench_func(self, name: str, func, *args, inner_loops: int | None = None, metadata: dict | None = None):
        """pyperf's ``bench_func``: ``func(*args)`` called ``loops`` times."""
        def timed(loops, *a):
            t0 = time.perf_counter()
            for _ in range(loops):
                func(*a)
            return time.perf_counter() - t0

        return self.bench_time_func(name, timed, *args, inner_loops=inner_loops, metadata=metadata)
