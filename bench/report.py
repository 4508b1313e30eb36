"""One row format for every suite, and the consolidated report built from it.

Every suite module (``bench_<suite>.py``) has ``rows(json_path) ->
list[Row]``: one :class:`Row` per question "kernel or userspace, which is
cheaper here, by how much", each side a :class:`Stat` (median, spread,
number of values) in the row's unit, or ``None`` with a ``reason`` saying
why that side was not measured (a missing kernel feature, a refusal by the
kernel, no such thing on that side).  :func:`markdown` renders the rows of
all suites as one table with the kernel/userspace ratio per row;
:func:`plot` draws them (matplotlib, one panel per suite).  A row with a
side missing and no reason is a bug: :func:`check_rows` says which.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Stat:
    """A measured side of a row, in the row's unit."""

    median: float
    stdev: float = 0.0
    nvalues: int = 1

    @classmethod
    def of(cls, bench, scale: float = 1e9, minus: "Stat | None" = None) -> "Stat | None":
        """From a pyperf Benchmark (seconds, ``scale``-d: 1e9 for ns), less ``minus``'s median (a baseline)."""
        if bench is None:
            return None
        n = bench.get_nvalue()
        med = bench.median() * scale - (minus.median if minus is not None else 0.0)
        sd = bench.stdev() * scale if n > 1 else 0.0
        return cls(med, sd, n)

    @classmethod
    def of_values(cls, values, scale: float = 1.0) -> "Stat | None":
        import statistics

        vals = [v * scale for v in values]
        if not vals:
            return None
        return cls(statistics.median(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0, len(vals))


@dataclass(frozen=True)
class Row:
    """One comparison: the same work on the kernel's side and on hybrid's."""

    suite: str
    name: str          # what is measured, e.g. "lea: uprobe+uretprobe"
    unit: str          # "ns/call", "ns/op", "ms", "x slowdown", ...
    kernel: Stat | None
    user: Stat | None
    reason: str = ""   # why a side is missing (required when one is None)
    kernel_label: str = "kernel"   # what the kernel side is, when not plainly "kernel"
    user_label: str = "hybrid"
    note: str = ""     # anything else the reader needs (goal, baseline)
    goal: float | None = None  # the kernel/user ratio this row must reach, if it has a goal
    no_ratio: str = ""  # why kernel/user means nothing here (e.g. the userspace side runs nothing: noise)

    @property
    def ratio(self) -> float | None:
        """kernel / userspace (> 1: userspace cheaper); None when a side is missing or ``no_ratio``."""
        if self.no_ratio or self.kernel is None or self.user is None or self.user.median <= 0:
            return None
        return self.kernel.median / self.user.median

    @property
    def goal_met(self) -> bool | None:
        r = self.ratio
        if self.goal is None or r is None:
            return None
        return r >= self.goal


def benchmarks(json_path) -> dict:
    """A suite's pyperf JSON as {benchmark name: pyperf.Benchmark}."""
    import pyperf

    return {b.get_name(): b for b in pyperf.BenchmarkSuite.load(str(json_path)).get_benchmarks()}


def missing_sides(by_name: dict) -> dict[str, str]:
    """The ``hybrid_missing`` metadata (JSON: benchmark name -> why it was not measured) of a suite's run."""
    import json

    for b in by_name.values():
        raw = b.get_metadata().get("hybrid_missing")
        if raw:
            return json.loads(raw)
    return {}


def check_rows(rows: list[Row]) -> list[str]:
    """Rows that lack a side, or a ratio, and do not say why."""
    bad = ["%s/%s: %s side missing, no reason" % (r.suite, r.name, "kernel" if r.kernel is None else "user")
           for r in rows if (r.kernel is None or r.user is None) and not r.reason.strip()]
    bad += ["%s/%s: both sides measured, no ratio, no reason" % (r.suite, r.name) for r in rows
            if r.kernel is not None and r.user is not None and r.ratio is None and not r.no_ratio
            and r.user.median > 0]
    return bad


def fmt(value: float | None, digits: int | None = None) -> str:
    if value is None:
        return "—"
    if digits is None:
        a = abs(value)
        digits = 0 if a >= 100 else 1 if a >= 10 else 2 if a >= 0.1 else 3
    return "{:,.{d}f}".format(value, d=digits)


def fmt_stat(s: Stat | None) -> str:
    if s is None:
        return "—"
    return "%s ± %s" % (fmt(s.median), fmt(s.stdev, None if s.stdev else 0))


def fmt_ratio(r: float | None) -> str:
    if r is None:
        return "—"
    return "%.1f×" % r if r >= 0.95 else "%.2f×" % r


def markdown(rows: list[Row], machine: str = "", title: str = "Kernel vs userspace: every suite") -> str:
    """The consolidated table: one line per row, grouped by suite."""
    lines = ["# " + title, ""]
    if machine:
        lines += [machine, ""]
    lines += [
        "Median ± stdev of the pyperf values, in each row's unit (lower is better); **kernel/user** > 1 "
        "means hybrid's userspace side is cheaper. A row missing a side says why.",
        "",
        "| suite | what | unit | kernel | userspace | kernel/user | note |",
        "|---|---|---|---:|---:|---:|---|",
    ]
    for r in rows:
        notes = []
        if r.kernel_label != "kernel" or r.user_label != "hybrid":
            notes.append("kernel = %s, userspace = %s" % (r.kernel_label, r.user_label))
        if r.reason and (r.kernel is None or r.user is None):
            notes.append(r.reason)
        elif r.no_ratio and r.kernel is not None and r.user is not None:
            notes.append("no ratio: " + r.no_ratio)
        elif r.kernel is not None and r.user is not None and r.user.median <= 0:
            notes.append("no ratio: the userspace side is below this run's noise (≤ 0)")
        if r.goal is not None:
            met = r.goal_met
            notes.append("goal ≥ %g×: %s" % (r.goal, "met" if met else "**MISSED**" if met is False else "not checked"))
        if r.note:
            notes.append(r.note)
        lines.append("| %s | %s | %s | %s | %s | %s | %s |" % (
            r.suite, r.name, r.unit, fmt_stat(r.kernel), fmt_stat(r.user), fmt_ratio(r.ratio),
            "; ".join(notes).replace("|", "/")))
    return "\n".join(lines) + "\n"


def plot(rows: list[Row], out: Path, machine: str = "") -> list[Path]:
    """One PNG per suite (horizontal bars, kernel beside userspace, log scale); the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    suites: dict[str, list[Row]] = {}
    for r in rows:
        suites.setdefault(r.suite, []).append(r)
    for suite, srows in suites.items():
        fig, ax = plt.subplots(figsize=(10, 0.45 * len(srows) + 1.6))
        ys = list(range(len(srows)))
        h = 0.38
        positive = [v for r in srows for s in (r.kernel, r.user) if s is not None for v in [s.median] if v > 0]
        floor = min(positive) / 2 if positive else 1.0
        for off, attr, color, label in ((-h / 2, "kernel", "#c0504d", "kernel"),
                                       (h / 2, "user", "#4f81bd", "userspace (hybrid)")):
            vals = [getattr(r, attr).median if getattr(r, attr) is not None else 0 for r in srows]
            errs = [getattr(r, attr).stdev if getattr(r, attr) is not None else 0 for r in srows]
            ax.barh([y + off for y in ys], [max(v, floor) if v > 0 else 0 for v in vals], height=h,
                    xerr=errs, color=color, label=label, error_kw={"elinewidth": 0.8, "capsize": 2})
        for y, r in zip(ys, srows):
            if r.kernel is None or r.user is None:
                missing = "kernel" if r.kernel is None else "userspace"
                ax.text(floor, y + (-h / 2 if r.kernel is None else h / 2), " no %s: %s" % (missing, r.reason[:60]),
                        va="center", fontsize=7, color="#555555")
            elif r.ratio is not None:
                ax.text(max(r.kernel.median, r.user.median) * 1.15, y, fmt_ratio(r.ratio), va="center", fontsize=8)
        ax.set_yticks(ys)
        ax.set_yticklabels(["%s (%s)" % (r.name, r.unit) for r in srows], fontsize=8)
        ax.invert_yaxis()
        if positive and max(positive) / min(positive) > 20:
            ax.set_xscale("log")
        ax.set_title("%s: kernel vs userspace%s" % (suite, " — " + machine if machine else ""), fontsize=9)
        ax.legend(fontsize=8, loc="lower right")
        fig.tight_layout()
        path = out / ("%s.png" % suite)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


@dataclass
class Report:
    """Rows gathered from every suite that ran, with what it took."""

    rows: list[Row] = field(default_factory=list)
    machine: str = ""

    def ratios(self) -> dict[str, float]:
        return {"%s/%s" % (r.suite, r.name): r.ratio for r in self.rows if r.ratio is not None and
                not math.isnan(r.ratio)}
