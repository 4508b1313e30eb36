#!/usr/bin/env python3
"""Run hybrid's benchmark suites and report them: the ``make bench`` entry.

"Is userspace faster than the kernel, by how much, for what?"  Each suite is
a pyperf script (``bench_<suite>.py``) run as a subprocess, writing its JSON
to ``<results>/<suite>.json`` (``python -m pyperf stats|compare_to`` read
it).  Once a suite has run, its module turns the JSON into a markdown
section (``<suite>.md``) and into rows of the common format of
``report.py``: the same work on the kernel's side and on hybrid's, each
with median and spread, and their ratio.  At the end every row of every
suite goes into one table, ``summary.md`` (printed), with one PNG plot per
suite (``<suite>.png``); ``--update-readme`` puts the table into the
README.  A row whose side could not be measured (a kernel feature missing,
a refusal) says why instead of vanishing; a suite that fails is reported
as failed and the others still run.

    .venv/bin/python bench/run.py [--quick] [--suite NAME ...] [--strict] [--update-readme] [-- PYPERF-ARGS]

``--quick`` is a smoke test: every benchmark in the suite's own process
(no pyperf workers, a short calibration), under two minutes for all
suites, numbers noisy.  ``--strict`` exits with status 3 when a speed goal
is missed (otherwise goals are reported, not enforced).  Arguments after
``--`` go to every suite's pyperf script.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
RESULTS = BENCH_DIR / "results"
README = ROOT / "README.md"
README_START, README_END = "<!-- bench:summary:start -->", "<!-- bench:summary:end -->"
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))


@dataclass(frozen=True)
class Suite:
    name: str
    module: str  # bench/<module>.py: the pyperf script, and summarize/rows/missed_goals of its JSON
    description: str

    @property
    def path(self) -> Path:
        return BENCH_DIR / (self.module + ".py")

    def load(self):
        return importlib.import_module(self.module)

    def summarize(self, json_path: Path) -> str:
        return self.load().summarize(json_path)

    def rows(self, json_path: Path) -> list:
        return self.load().rows(json_path)

    def missed_goals(self, json_path: Path) -> list[str]:
        mod = self.load()
        if hasattr(mod, "missed_goals"):
            return mod.missed_goals(json_path)
        return ["%s/%s: %s" % (self.name, r.name, "goal missed") for r in self.rows(json_path)
                if r.goal_met is False]


SUITES: list[Suite] = [
    Suite("probes", "bench_probes",
          "uprobe, uretprobe, uprobe+uretprobe: kernel uprobes vs in-process probes on lea/push/nop5 victims"),
    Suite("syscalls", "bench_syscalls",
          "syscall tracepoint probes: kernel vs in-process, on the traced process and on an untraced one"),
    Suite("memory", "bench_memory",
          "bpf_probe_read_user / bpf_probe_write_user, 1 and 1000 calls per hit, kernel vs in-process"),
    Suite("maps", "bench_maps",
          "map lookup/update/delete on hash/array/percpu/lru: kernel (test run) vs hybrid's JIT"),
    Suite("engines", "bench_engines",
          "kernel (test run) / JIT / AOT / interpreter / gcc -O2 on compute programs, and compile time"),
    Suite("bridge", "bench_bridge",
          "kernel maps used from a userspace program (mmap, bpf(), mirror) vs userspace maps"),
    Suite("attach", "bench_attach",
          "attach latency: at launch and on a running process, kernel uprobes vs hybrid's agent"),
    Suite("tools", "bench_tools",
          "the ported bcc tools against Debian's bcc tools: what each adds to the traced workload"),
    Suite("load", "bench_load",
          "a libbpf-tools style program: its loader alone (kernel probes) vs under hybrid load (in the process)"),
    Suite("xdp", "bench_xdp",
          "XDP programs: kernel XDP (native, generic) vs userspace XDP over AF_XDP, packets/s and cost per packet"),
]


@dataclass
class Outcome:
    suite: Suite
    json_path: Path | None
    seconds: float
    error: str = ""


def _progress(line: str, tty: bool) -> None:
    if tty:
        sys.stdout.write("\r\033[K" + line[:150])
    else:
        sys.stdout.write(line + "\n")
    sys.stdout.flush()


def run_suite(suite: Suite, index: int, total: int, args: argparse.Namespace, t_all: float) -> Outcome:
    """Run one suite's pyperf script with a progress line; its outcome (the JSON, or why it failed)."""
    out = args.results / (suite.name + ".json")
    partial = out.with_name(suite.name + ".partial.json")  # pyperf refuses to overwrite: start afresh
    partial.unlink(missing_ok=True)
    cmd = [sys.executable, str(suite.path), "-o", str(partial)]
    if args.quick:
        cmd += ["--quick"]
    cmd += args.pyperf_args
    tty = sys.stdout.isatty()
    head = "[%d/%d] %s" % (index, total, suite.name)
    print("%s: %s ..." % (head, suite.description), flush=True)
    start = time.monotonic()
    done = 0
    tail: list[str] = []
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip("\n")
        tail = (tail + [line])[-25:]
        # pyperf (and the quick runner) print "name: value" once per finished benchmark
        if re.match(r"^[\w./+:-]+: (Mean \+- std dev: |)[\d.]+ ?(ns|us|ms|sec|s)\b", line):
            done += 1
            _progress("%s: %d benchmarks done, last %s  (%.0f s; total %.0f s)"
                      % (head, done, line.split(":")[0], time.monotonic() - start, time.monotonic() - t_all), tty)
        elif line.strip() and not tty:
            print("    " + line, flush=True)
    rc = proc.wait()
    elapsed = time.monotonic() - start
    if tty:
        _progress("", tty)
    if rc != 0:
        why = next((t for t in reversed(tail) if t.strip()), "no output")
        print("%s: FAILED (exit %d) after %.0f s: %s\n%s" % (head, rc, elapsed, " ".join(cmd), "\n".join(tail)),
              flush=True)
        return Outcome(suite, None, elapsed, "exit %d: %s" % (rc, why.strip()))
    os.replace(partial, out)
    print("%s: done in %.0f s -> %s" % (head, elapsed, out), flush=True)
    return Outcome(suite, out, elapsed)


def existing(suite: Suite, results: Path) -> Outcome:
    """A suite's outcome from the JSON an earlier run left in ``results`` (``--report``)."""
    path = results / (suite.name + ".json")
    if not path.exists():
        return Outcome(suite, None, 0.0, "no %s: run it first (make bench ARGS=\"--suite %s\")" % (path, suite.name))
    return Outcome(suite, path, 0.0)


def failed_row(outcome: Outcome):
    from report import Row

    return Row(outcome.suite.name, "(the suite did not run)", "—", None, None,
               reason="suite failed: %s" % outcome.error)


def update_readme(summary_table: str, machine: str, when: str, readme: Path = README) -> bool:
    """Replace the table between the README's bench markers; False when the markers are missing."""
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        return False
    block = "%s\n_Measured %s by `make bench` on: %s._\n\n%s\n%s" % (README_START, when, machine,
                                                                    summary_table.strip(), README_END)
    start, end = text.index(README_START), text.index(README_END) + len(README_END)
    readme.write_text(text[:start] + block + text[end:])
    return True


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    pyperf_args: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, pyperf_args = argv[:i], argv[i + 1:]
    parser = argparse.ArgumentParser(description="Run hybrid's benchmark suites (pyperf) and report them.")
    parser.add_argument("--quick", action="store_true", help="smoke test: in-process, few values (< 2 min)")
    parser.add_argument("--suite", action="append", choices=[s.name for s in SUITES],
                        help="run only this suite (repeatable; default: all)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="output folder (default: bench/results)")
    parser.add_argument("--strict", action="store_true", help="exit 3 if a speed goal is missed")
    parser.add_argument("--update-readme", action="store_true",
                        help="put the summary table into README.md (full runs only)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--report", action="store_true",
                        help="run nothing: report (and plot) the suites' JSON already in the results folder")
    args = parser.parse_args(argv)
    if args.update_readme and args.quick:
        parser.error("--update-readme takes a full run's numbers, not --quick's")
    if args.report and (args.quick or pyperf_args):
        parser.error("--report runs nothing: --quick and pyperf arguments do not apply")
    args.pyperf_args = pyperf_args
    args.results.mkdir(parents=True, exist_ok=True)

    import bench_engines  # machine_line
    import report

    suites = [s for s in SUITES if not args.suite or s.name in args.suite]
    t_all = time.monotonic()
    if args.report:
        outcomes = [existing(s, args.results) for s in suites]
    else:
        outcomes = [run_suite(s, i, len(suites), args, t_all) for i, s in enumerate(suites, 1)]

    rows, missed, sections = [], [], []
    for o in outcomes:
        if o.json_path is None:
            rows.append(failed_row(o))
            continue
        md = o.suite.summarize(o.json_path)
        (args.results / (o.suite.name + ".md")).write_text(md)
        sections.append(md)
        rows += o.suite.rows(o.json_path)
        missed += o.suite.missed_goals(o.json_path)
    machine = bench_engines.machine_line()
    when = time.strftime("%Y-%m-%d")
    title = "Kernel vs userspace: every suite%s" % (" (quick: smoke test, noisy)" if args.quick else "")
    table = report.markdown(rows, machine=machine + "; " + when, title=title)
    unexplained = report.check_rows(rows)
    (args.results / "summary.md").write_text(table + "\n" + "\n".join(sections))
    plots = [] if args.no_plots else report.plot(rows, args.results, machine="%d CPUs" % (os.cpu_count() or 0))

    print()
    print(table, end="")
    print("\n(summary and every suite's section: %s%s)" % (args.results / "summary.md",
                                                           "; plots: " + ", ".join(p.name for p in plots)
                                                           if plots else ""))
    if args.update_readme:
        if update_readme(report.markdown(rows, title="Latest `make bench`").split("\n", 2)[2], machine, when):
            print("README.md: bench table updated")
        else:
            print("README.md: no %s / %s markers: not updated" % (README_START, README_END))
    failed = [o for o in outcomes if o.json_path is None]
    print("bench: %d suite(s) in %.0f s%s%s" % (
        len(suites), time.monotonic() - t_all, " (quick: smoke test, numbers are noisy)" if args.quick else "",
        "; FAILED: " + ", ".join(o.suite.name for o in failed) if failed else ""))
    for u in unexplained:
        print("bench: row without a reason for its missing side: " + u)
    if missed:
        print("bench: goals missed: " + "; ".join(missed))
    if failed or unexplained:
        return 1
    if missed and args.strict:
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
