#!/usr/bin/env python3
"""A libbpf-tools style program under ``hybrid load`` against the same program in the kernel, in one run.

The program is the ``hybrid load`` test program (``tests/compat/progs/hload.bpf.c`` and its loader
``hload.c``, a bpftool skeleton linked with the system's libbpf, built by
``tests/compat/libbpf_progs.py``): a uprobe and a uretprobe on ``hload_work(int)``, a USDT probe
``hload:tick`` (with a semaphore), and a ``syscalls/sys_enter_getppid`` tracepoint filtered on the
target's tgid; every hit adds to a ``totals`` array map and sends one event through a ring buffer,
which the loader prints (one line per event) and counts, with the reservations that failed
(``dropped``).  The workload, ``programs/load_workload.c`` (``gcc -O2``), defines ``hload_work`` and
``hload:tick`` like the test workload, waits for a go-file, then times its own loop
(CLOCK_MONOTONIC) of N iterations of one case:

=========  ==========================================================================================
case       one iteration
=========  ==========================================================================================
work       a call of ``hload_work(i)`` (first instruction ``lea``): the uprobe and the uretprobe
usdt       the semaphore read, and the USDT probe ``hload:tick(i, -1000000007 * i)`` when it is set
getppid    libc's ``getppid()``: the ``sys_enter_getppid`` tracepoint
=========  ==========================================================================================

each three ways (sides): ``untraced`` (no loader); ``kernel`` (``hload -p PID -b load_workload -r
READY``: the loader alone, every probe in the kernel); ``hybrid`` (``hybrid load -- hload ...``: the
same loader, unmodified, with its probes run inside the workload by hybrid's agent, injected by pid;
``--host`` starts the workload under ``hybrid run --`` instead).  The loader attaches everything
before the loop starts (the workload waits until the loader's ready file exists) and is stopped with
SIGINT after it; its stdout goes to a file, of which the last lines are read: ``total ...`` (the map)
must be exactly the hits the case made (and nothing else), or the suite fails.  The ring buffer
(256 KiB) drops events when the loader does not keep up (on either side, depending on the case):
the events the loader received and the drops are kept as metadata, not checked.

Benchmarks are ``load/<case>/<side>``, values the loop time per iteration (seconds; one value per
run, ``loops`` 1, ``inner_loops`` the iterations); the sides of a case are run interleaved, run
after run.  A kernel uprobe + uretprobe costs 30-60 µs a call here, so the kernel side makes fewer
calls (values are per call).  Full runs: 5 runs of 5M iterations (kernel side: 200k) for work and
usdt, 1M getppid; about 1.5 minutes, most of it the kernel's work side.  ``--quick``: one run each
of 200k iterations (kernel side: 5k work, 20k usdt), 100k getppid; under 10 s.

:func:`rows`, :func:`summarize` and :func:`missed_goals` read the JSON; importing this module runs
nothing.

    python bench/bench_load.py -o OUT.json [--quick] [--quiet] [--only CASE ...] [--host]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
for _p in (str(BENCH_DIR), str(ROOT)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

SUITE = "load"
CASES = ("work", "usdt", "getppid")
SIDES = ("untraced", "kernel", "hybrid")
WORKLOAD_SOURCE = BENCH_DIR / "programs" / "load_workload.c"
BUILD = BENCH_DIR / "build"
GCC = "gcc"
WORKLOAD_FLAGS = ("-O2", "-g", "-Wall")
HYBRID = [sys.executable, "-m", "hybrid.cli"]
NR_GETPPID = {"x86_64": 110, "aarch64": 173}
USDT_ARG2 = -1000000007  # hload:tick's second argument is USDT_ARG2 * i
KERNEL_LABEL = "libbpf loader alone (kernel)"
USER_LABEL = "hybrid load (in the process)"

ROW_NAMES = {
    "work": "uprobe+uretprobe: a call of hload_work()",
    "usdt": "USDT hload:tick (semaphore): one firing",
    "getppid": "tracepoint sys_enter_getppid: a getppid() call",
}
MEASURES = {
    "work": "a uprobe and a uretprobe hit (a lea first: the kernel single-steps it), each a map update "
            "and a ring buffer event",
    "usdt": "a USDT firing (semaphore set by the loader), a map update and a ring buffer event",
    "getppid": "a getppid() through libc with the sys_enter_getppid tracepoint program (tgid filter, a map "
               "update, a ring buffer event)",
}


@dataclass(frozen=True)
class Sizes:
    calls: dict   # case -> side -> iterations per loop
    repeat: int   # runs per side, interleaved


FULL = Sizes({"work": {"untraced": 5_000_000, "kernel": 200_000, "hybrid": 5_000_000},
              "usdt": {"untraced": 5_000_000, "kernel": 200_000, "hybrid": 5_000_000},
              "getppid": {"untraced": 1_000_000, "kernel": 1_000_000, "hybrid": 1_000_000}}, 5)
QUICK = Sizes({"work": {"untraced": 200_000, "kernel": 5_000, "hybrid": 200_000},
               "usdt": {"untraced": 200_000, "kernel": 20_000, "hybrid": 200_000},
               "getppid": {"untraced": 100_000, "kernel": 100_000, "hybrid": 100_000}}, 1)
ATTACH_TRIES = 3  # a workload that dies while the loader attaches is run again (counted in the metadata)


def bench_name(case: str, side: str) -> str:
    return "%s/%s/%s" % (SUITE, case, side)


# --- building --------------------------------------------------------------------------------


class BuildError(Exception):
    pass


@dataclass(frozen=True)
class Artifacts:
    workload: Path  # programs/load_workload.c
    loader: Path    # hload (tests/compat/progs/hload.c)
    bpf_object: Path


def build_workload(out_dir: Path | None = None) -> Path:
    import probe_programs as pp

    out = Path(out_dir) if out_dir is not None else BUILD
    out.mkdir(parents=True, exist_ok=True)
    if shutil.which(GCC) is None:
        raise BuildError("%s is not installed: cannot build %s" % (GCC, WORKLOAD_SOURCE.name))
    exe = out / ("load_workload-%s" % pp._digest(pp._version(GCC), " ".join(WORKLOAD_FLAGS),
                                                  WORKLOAD_SOURCE.read_bytes()))
    if not exe.exists():
        try:
            pp._build_atomic(exe, lambda tmp: [GCC, *WORKLOAD_FLAGS, "-o", tmp, str(WORKLOAD_SOURCE)],
                             WORKLOAD_SOURCE.name)
        except pp.BuildError as e:
            raise BuildError("%s (needs <sys/sdt.h>: apt-get install systemtap-sdt-dev)" % e) from None
        os.chmod(exe, 0o755)
    return exe


def build(out_dir: Path | None = None) -> Artifacts:
    """The workload, and hload with its object (``tests/compat/libbpf_progs.py``), cached by content."""
    import pytest

    from tests.compat import libbpf_progs

    out = Path(out_dir) if out_dir is not None else BUILD
    workload = build_workload(out)
    try:
        art = libbpf_progs.build(out / "load")
    except (pytest.skip.Exception, pytest.fail.Exception) as e:  # how that builder reports a problem
        raise BuildError("building hload: %s" % getattr(e, "msg", e)) from None
    return Artifacts(workload, art.loader, art.bpf_object)


def first_instruction(exe: Path, func: str) -> str:
    out = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(exe)], capture_output=True, text=True).stdout
    m = re.search(r"<%s>:\n\s+[0-9a-f]+:\s+(\S+)" % re.escape(func), out)
    return m.group(1) if m else "?"


# --- what the loader must report ----------------------------------------------------------------


def _s64(x: int) -> int:
    return (x + (1 << 63)) % (1 << 64) - (1 << 63)


def expected_totals(case: str, n: int) -> dict[str, int]:
    """The loader's ``total`` line after ``n`` iterations of ``case`` (the map's sums wrap at 64 bits)."""
    import platform

    t = dict.fromkeys(("uprobe_calls", "uprobe_sum", "uretprobe_calls", "uretprobe_sum", "usdt_calls",
                       "usdt_sum", "usdt_sum2", "getppid", "getppid_sum"), 0)
    tri = n * (n + 1) // 2
    if case == "work":
        t.update(uprobe_calls=n, uprobe_sum=tri, uretprobe_calls=n, uretprobe_sum=_s64(2 * tri + n))
    elif case == "usdt":
        t.update(usdt_calls=n, usdt_sum=tri, usdt_sum2=_s64(USDT_ARG2 * tri))
    else:
        t.update(getppid=n, getppid_sum=_s64(NR_GETPPID[platform.machine()] * n))
    return t


def hits(case: str, n: int) -> int:
    """Ring buffer events the case's iterations send: one per probe hit."""
    return 2 * n if case == "work" else n


def fields(line: str) -> dict[str, int]:
    return {k: int(v) for k, v in (kv.split("=") for kv in line.split())}


TOTAL = re.compile(rb"^total (.*)$", re.M)
EVENTS = re.compile(rb"^events (.*)$", re.M)
DID = re.compile(r"^did work=(\d+) usdt=(\d+) getppid=(\d+) semaphore=(\d+)$", re.M)


# --- one run ---------------------------------------------------------------------------------------


class SideFailed(Exception):
    """The loader did not start or stop cleanly on this side: the side is reported missing with this."""


class WorkloadDied(Exception):
    """The workload died before its loop (while the loader attached): the run is tried again."""


class CheckFailed(Exception):
    """The loader's totals are not the workload's hits: a probe is missing.  The suite fails."""


@dataclass
class Once:
    seconds: float
    total: str = ""       # the loader's "total ..." line
    events: str = ""      # its "events ..." line
    received: int = 0     # events the loader printed
    dropped: int = 0      # reservations that failed (the program's own count)
    attach_s: float = 0.0  # from the loader's start to its ready file


def _tail(path: Path, size: int = 8192) -> bytes:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - size))
        return f.read()


def _kill_group(p: subprocess.Popen | None) -> None:
    if p is not None and p.poll() is None:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()


class Runner:
    """Runs the workload on each side; ``run_dir`` isolates hybrid's registry (hosts, links) from other users'."""

    def __init__(self, art: Artifacts, host: bool = False):
        self.art = art
        self.host = host
        self.tmp = Path(tempfile.mkdtemp(prefix="hybrid-bench-load-"))
        self.env = dict(os.environ, HYBRID_RUN_DIR=str(self.tmp / "run"), PYTHONUNBUFFERED="1",
                        PYTHONPATH=str(ROOT) + (os.pathsep + os.environ["PYTHONPATH"]
                                                if os.environ.get("PYTHONPATH") else ""))
        (self.tmp / "run").mkdir()
        self.seq = 0

    def close(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def loader_argv(self, side: str, pid: int | str, ready: Path | str) -> list[str]:
        argv = [str(self.art.loader), "-p", str(pid), "-b", str(self.art.workload), "-r", str(ready)]
        return HYBRID + ["load", "--"] + argv if side == "hybrid" else argv

    def workload_argv(self, side: str, go: Path | str, case: str, n: int) -> list[str]:
        argv = [str(self.art.workload), str(go), case, str(n)]
        return HYBRID + ["run", "--"] + argv if side == "hybrid" and self.host else argv

    def command(self, side: str) -> str:
        """The side's commands, as the metadata shows them."""
        if side == "untraced":
            return "load_workload"
        loader = " ".join(["hload"] + self.loader_argv("kernel", "PID", "READY")[1:]).replace(
            str(self.art.workload), "load_workload")
        if side == "kernel":
            return loader
        return ("hybrid load -- %s; the workload %s" % (loader, "under hybrid run --" if self.host
                                                       else "started plainly (agent injected by pid)"))

    def once(self, case: str, side: str, n: int) -> Once:
        self.seq += 1
        d = self.tmp / ("r%d" % self.seq)
        d.mkdir()
        go, ready, out, err = d / "go", d / "ready", d / "loader.out", d / "loader.err"
        w = ld = None
        try:
            w = subprocess.Popen(self.workload_argv(side, go, case, n), stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, env=self.env, start_new_session=True)
            first = w.stdout.readline()
            m = re.fullmatch(r"waiting (\d+)\n", first)
            if not m:
                raise RuntimeError("the workload did not start: %r %s" % (first, w.stderr.read()))
            pid = int(m[1])
            attach_s = 0.0
            if side != "untraced":
                t0 = time.monotonic()
                with open(out, "wb") as fo, open(err, "wb") as fe:
                    ld = subprocess.Popen(self.loader_argv(side, pid, ready), stdout=fo, stderr=fe, env=self.env,
                                          cwd=str(ROOT), start_new_session=True)
                deadline = t0 + 120
                while not ready.exists():
                    if w.poll() is not None:
                        raise WorkloadDied("the workload exited with %d while the loader attached; loader: %s"
                                           % (w.returncode, err.read_text(errors="replace").strip()[-600:]))
                    if ld.poll() is not None or time.monotonic() > deadline:
                        raise SideFailed("%s (exit %s): %s" % (
                            "the loader exited before it was ready" if ld.poll() is not None else
                            "the loader was not ready after 120 s", ld.returncode,
                            err.read_text(errors="replace").strip()[-600:]))
                    time.sleep(0.005)
                attach_s = time.monotonic() - t0
            go.touch()
            wout, werr = w.communicate(timeout=900)
            if w.returncode != 0:
                raise RuntimeError("the workload exited with %d: %s" % (w.returncode, werr.strip()[-600:]))
            ns = re.search(r"^ns (\d+)$", wout, re.M)
            did = DID.search(wout)
            if not ns or not did:
                raise RuntimeError("the workload did not report its loop: %r" % wout)
            want = {"work": (n, 0, 0), "usdt": (0, n if side != "untraced" else 0, 0), "getppid": (0, 0, n)}[case]
            if tuple(int(x) for x in did.groups()[:3]) != want:
                raise CheckFailed("%s/%s: the workload did %s, expected work/usdt/getppid %s"
                                  % (case, side, did[0], want))
            if side != "untraced" and int(did[4]) < 1:
                raise CheckFailed("%s/%s: the USDT semaphore was not set by the loader: %s" % (case, side, did[0]))
            r = Once(int(ns[1]) / 1e9, attach_s=attach_s)
            if ld is None:
                return r
            os.killpg(ld.pid, signal.SIGINT)
            try:
                ld.wait(timeout=60)
            except subprocess.TimeoutExpired:
                raise SideFailed("the loader did not stop at SIGINT within 60 s: %s"
                                 % err.read_text(errors="replace").strip()[-600:]) from None
            tail = _tail(out)
            if ld.returncode != 0:
                raise SideFailed("the loader exited with %d: %s" % (ld.returncode,
                                                                      err.read_text(errors="replace").strip()[-600:]))
            total, events = TOTAL.search(tail), EVENTS.search(tail)
            if not total or not events:
                raise CheckFailed("%s/%s: no totals in the loader's output: %r %s" % (
                    case, side, tail[-400:], err.read_text(errors="replace").strip()[-400:]))
            r.total, r.events = total[1].decode(), events[1].decode()
            got, exp = fields(r.total), expected_totals(case, n)
            if got != exp:
                raise CheckFailed("%s/%s: the loader's totals are not the workload's %d iterations (a probe is "
                                  "missing or fired elsewhere): got %s, expected %s" % (
                                      case, side, n, r.total, " ".join("%s=%d" % kv for kv in exp.items())))
            ev = fields(r.events)
            r.dropped = ev.get("dropped", 0)
            r.received = sum(v for k, v in ev.items() if k in ("uprobe", "uretprobe", "usdt", "getppid"))
            return r
        finally:
            _kill_group(ld)
            _kill_group(w)
            shutil.rmtree(d, ignore_errors=True)


# --- the suite ---------------------------------------------------------------------------------------


@dataclass
class Side:
    """What the runs of one (case, side) gathered."""

    n: int
    times: list = field(default_factory=list)
    runs: list = field(default_factory=list)  # Once
    retries: int = 0
    retry_why: str = ""
    failed: str = ""


def _one_line(text: str) -> str:
    return " ".join(str(text).split())[:500] or "failed"


def measure_case(runner: Runner, case: str, sizes: Sizes) -> dict[str, Side]:
    """``sizes.repeat`` runs of each side, interleaved run after run; a side whose loader fails is not run again."""
    sides = {s: Side(sizes.calls[case][s]) for s in SIDES}
    for _ in range(sizes.repeat):
        for name, s in sides.items():
            if s.failed:
                continue
            for attempt in range(ATTACH_TRIES):
                try:
                    r = runner.once(case, name, s.n)
                except WorkloadDied as e:
                    s.retries += 1
                    s.retry_why = _one_line(e)
                    print("%s: %s (try %d of %d)" % (bench_name(case, name), s.retry_why, attempt + 1,
                                                     ATTACH_TRIES), file=sys.stderr, flush=True)
                    if attempt + 1 == ATTACH_TRIES:
                        s.failed = "the workload died while the loader attached, %d times: %s" % (
                            ATTACH_TRIES, s.retry_why)
                    continue
                except SideFailed as e:
                    if name == "untraced":
                        raise
                    s.failed = _one_line(e)
                    print("%s: not measured: %s" % (bench_name(case, name), s.failed), file=sys.stderr, flush=True)
                    break
                s.times.append(r.seconds)
                s.runs.append(r)
                break
    if sides["untraced"].failed:
        raise RuntimeError("%s: %s" % (bench_name(case, "untraced"), sides["untraced"].failed))
    return sides


def write_case(runner: Runner, case: str, sides: dict[str, Side], common: dict, output: str | None,
               quiet: bool) -> None:
    import pyperf

    missing = {"hybrid_missing_" + k: s.failed for k, s in sides.items() if s.failed}
    for name, s in sides.items():
        if not s.times:
            continue
        md = {"name": bench_name(case, name), "unit": "second", "loops": 1, "inner_loops": s.n,
              "hybrid_case": case, "hybrid_side": name, "hybrid_calls": s.n, "hybrid_runs": len(s.times),
              "hybrid_command": runner.command(name), "hybrid_attach_retries": s.retries}
        if s.retries:
            md["hybrid_attach_retry_why"] = s.retry_why
        if name == "untraced":
            md["hybrid_check"] = "untraced"
            md.update(missing)
        else:
            md["hybrid_check"] = "totals exact (%s iterations x %d run%s)" % (format(s.n, ","), len(s.runs),
                                                                            "" if len(s.runs) == 1 else "s")
            md["hybrid_total"] = s.runs[-1].total
            md["hybrid_events"] = s.runs[-1].events
            md["hybrid_events_received"] = ",".join(str(r.received) for r in s.runs)
            md["hybrid_events_dropped"] = ",".join(str(r.dropped) for r in s.runs)
            md["hybrid_events_sent"] = hits(case, s.n)
            # every hit either reached the loader or was counted as dropped by the program
            md["hybrid_events_accounted"] = int(all(r.received + r.dropped == hits(case, s.n) for r in s.runs))
            md["hybrid_attach_seconds"] = round(min(r.attach_s for r in s.runs), 3)
        md["hybrid_check_ok"] = 1
        md.update(common)
        b = pyperf.Benchmark([pyperf.Run([t / s.n for t in s.times], metadata=md, collect_metadata=False)])
        if not quiet:
            print("%s: %s" % (b.get_name(), b.format_value(b.median())), flush=True)
        if output:
            pyperf.add_runs(output, b)


def main(argv: list[str] | None = None) -> int:
    from harness import take_quick

    argv = list(sys.argv[1:] if argv is None else argv)
    quick = take_quick(argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-o", "--output", help="pyperf JSON file to write (must not exist)")
    ap.add_argument("-q", "--quiet", action="store_true", help="no line per benchmark")
    ap.add_argument("--only", nargs="+", choices=CASES, default=list(CASES), help="some cases only")
    ap.add_argument("--host", action="store_true",
                    help="hybrid side: start the workload under `hybrid run --` (default: plainly, the agent "
                         "injected by pid)")
    args, unknown = ap.parse_known_args(argv)
    if unknown:
        print("bench_load: ignoring %s (not a pyperf Runner: no pyperf options)" % " ".join(unknown),
              file=sys.stderr)
    if args.output and os.path.exists(args.output):
        ap.error("%s exists (pyperf would add to it): remove it first" % args.output)
    if os.geteuid() != 0:
        print("bench_load: needs root (the loader's kernel probes, hybrid's agent in another process)",
              file=sys.stderr)
        return 2
    sizes = QUICK if quick else FULL
    t0 = time.monotonic()
    art = build()
    common = {"hybrid_mode": "quick" if quick else "full", "hybrid_first_insn": first_instruction(
        art.workload, "hload_work"), "hybrid_workload_host": "hybrid run" if args.host else "plain"}
    runner = Runner(art, host=args.host)
    try:
        for case in CASES:
            if case in args.only:
                write_case(runner, case, measure_case(runner, case, sizes), common, args.output, args.quiet)
    finally:
        runner.close()
    if not args.quiet:
        print("bench_load: done in %.0f s" % (time.monotonic() - t0), file=sys.stderr)
    return 0


# --- the report ------------------------------------------------------------------------------------


def _load(json_path) -> dict:
    import pyperf

    return {b.get_name(): b for b in pyperf.BenchmarkSuite.load(str(json_path)).get_benchmarks()}


def _md(bench, key, default=None):
    return default if bench is None else bench.get_metadata().get(key, default)


def _drops(b) -> str:
    """"received / sent, D dropped" of a side's last run."""
    if b is None:
        return "—"
    received = str(_md(b, "hybrid_events_received", "")).split(",")[-1]
    dropped = str(_md(b, "hybrid_events_dropped", "")).split(",")[-1]
    text = "%s of %s received, %s dropped" % ("{:,}".format(int(received)) if received.isdigit() else received,
                                            "{:,}".format(_md(b, "hybrid_events_sent", 0)),
                                            "{:,}".format(int(dropped)) if dropped.isdigit() else dropped)
    if not _md(b, "hybrid_events_accounted", 1):
        text += " (**received + dropped ≠ sent**)"
    return text


@dataclass(frozen=True)
class Line:
    row: object   # report.Row
    case: str
    base: object  # pyperf.Benchmark | None
    kernel: object
    user: object


def _lines(json_path) -> list[Line]:
    from report import Row, Stat

    by = _load(json_path)
    out = []
    for case in CASES:
        base = by.get(bench_name(case, "untraced"))
        if base is None and not any(k.startswith("%s/%s/" % (SUITE, case)) for k in by):
            continue  # that case was not run (--only)
        kb, ub = by.get(bench_name(case, "kernel")), by.get(bench_name(case, "hybrid"))
        bstat = Stat.of(base)
        kernel = Stat.of(kb, minus=bstat) if kb is not None and bstat is not None else None
        user = Stat.of(ub, minus=bstat) if ub is not None and bstat is not None else None
        why = []
        for side, stat in (("kernel", kernel), ("hybrid", user)):
            if stat is None:
                why.append("%s side: %s" % (side, "no untraced baseline" if bstat is None else
                                            _md(base, "hybrid_missing_" + side, "not measured in this run")))
        notes = ["added per iteration over the untraced loop: " + MEASURES[case]]
        if kb is not None and ub is not None:
            nk, nu = _md(kb, "hybrid_calls"), _md(ub, "hybrid_calls")
            notes.append("iterations per loop: %s%s" % ("{:,}".format(nu), "" if nk == nu else
                                                       " (kernel side {:,})".format(nk)))
        drops = ["%s %s of %s" % (label, "{:,}".format(int(str(_md(b, "hybrid_events_dropped", "0")).split(",")[-1])),
                                  "{:,}".format(_md(b, "hybrid_events_sent", 0)))
                 for label, b in (("kernel", kb), ("hybrid", ub)) if b is not None]
        if drops:
            notes.append("ring buffer events dropped (last run, not checked): " + ", ".join(drops))
        for label, b in (("kernel", kb), ("hybrid", ub)):
            if b is not None and not _md(b, "hybrid_events_accounted", 1):
                notes.append("%s side: events received + dropped ≠ sent" % label)
            if b is not None and _md(b, "hybrid_attach_retries", 0):
                notes.append("%s side: the workload died while the loader attached, run again %d time(s)"
                             % (label, _md(b, "hybrid_attach_retries")))
        bad = [side for side, b in (("kernel", kb), ("hybrid", ub)) if b is not None and
               not _md(b, "hybrid_check_ok", 0)]
        if bad:
            notes.append("**check FAILED** (%s)" % ", ".join(bad))
        row = Row(SUITE, ROW_NAMES[case], "ns/call", kernel, user, reason="; ".join(why),
                  kernel_label=KERNEL_LABEL, user_label=USER_LABEL, note="; ".join(notes))
        out.append(Line(row, case, base, kb, ub))
    return out


def rows(json_path) -> list:
    """The consolidated report's rows (bench/report.py): ns added per iteration by the loader in the kernel,
    and by the same loader under ``hybrid load``; no goal."""
    return [ln.row for ln in _lines(json_path)]


def failed_checks(json_path) -> list[str]:
    return ["%s: check failed: %s" % (name, _md(b, "hybrid_check")) for name, b in _load(json_path).items()
            if not _md(b, "hybrid_check_ok", 1)]


def missed_goals(json_path) -> list[str]:
    """No goal is set for these rows; failed checks are reported here."""
    return ["%s/%s" % (SUITE, x) for x in failed_checks(json_path)]


def summarize(json_path) -> str:
    """The markdown report of a load JSON written by this script."""
    import bench_engines  # machine_line
    from report import fmt, fmt_ratio, fmt_stat

    by = _load(json_path)
    any_b = next(iter(by.values()), None)
    quick = _md(any_b, "hybrid_mode") == "quick"
    host = _md(any_b, "hybrid_workload_host") == "hybrid run"
    out = [
        "# hybrid load: a libbpf-tools style program, in the process and in the kernel",
        "",
        bench_engines.machine_line() + ".",
        "",
        "The `hybrid load` test program (`tests/compat/progs/hload.bpf.c` and its loader `hload.c`: a "
        "bpftool skeleton linked with the system's libbpf; a uprobe and a uretprobe on `hload_work()`, the "
        "USDT probe `hload:tick` with its semaphore, the `sys_enter_getppid` tracepoint filtered on the "
        "target; each hit updates a map and sends a ring buffer event, printed by the loader) traces "
        "`programs/load_workload.c`, which times its own loop (CLOCK_MONOTONIC) with the loader attached "
        "before the loop starts: untraced, under the loader alone (**kernel**: its probes in the kernel) and "
        "under `hybrid load -- hload ...` (**hybrid**: the same loader, unmodified, its probes run in the "
        "workload, %s). **added** = (traced − untraced loop time) per iteration, median ± stdev over the runs. "
        "After every run the loader's totals (its map) are checked to be exactly the workload's hits. The "
        "ring buffer drops the events the loader does not read in time (counted by the program); that is "
        "not checked. No goal is set for these rows." % (
            "started under `hybrid run --`" if host else "the agent injected by pid")
        + (" Quick run: few iterations, one run each; noisy." if quick else ""),
        "",
        "| what | untraced ns/call | kernel added | hybrid added | kernel/hybrid | iterations × runs | "
        "events, kernel side | events, hybrid side | check |",
        "|---|---:|---:|---:|---:|---|---|---|---|",
    ]
    for ln in _lines(json_path):
        r = ln.row
        calls = "—"
        if ln.kernel is not None and ln.user is not None:
            nk, nu = _md(ln.kernel, "hybrid_calls"), _md(ln.user, "hybrid_calls")
            runs = _md(ln.user, "hybrid_runs", 1)
            calls = ("{:,}".format(nu) if nk == nu else "{:,} (kernel side {:,})".format(nu, nk)) + " × %d" % runs
        checks = [_md(b, "hybrid_check", "") if _md(b, "hybrid_check_ok", 0) else "**%s**" % _md(b, "hybrid_check")
                  for b in (ln.kernel, ln.user) if b is not None]
        base = "—" if ln.base is None else fmt(ln.base.median() * 1e9)
        out.append("| %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
            r.name, base, fmt_stat(r.kernel), fmt_stat(r.user), fmt_ratio(r.ratio), calls, _drops(ln.kernel),
            _drops(ln.user), (" / ".join(checks) or r.reason).replace("|", "/")))
    out.append("")
    why = [ln.row.reason for ln in _lines(json_path) if ln.row.reason]
    if why:
        out.append("Sides not measured: " + "; ".join(why) + ".")
    kb = by.get(bench_name("work", "kernel"))
    if kb is not None:
        out.append("The kernel's uprobe + uretprobe on `hload_work` (first instruction `%s`) costs %s µs a call "
                   "here: that side makes fewer calls; values are per call."
                   % (_md(kb, "hybrid_first_insn", "?"), fmt(kb.median() * 1e6)))
    failed = failed_checks(json_path)
    out.append("Checks: " + ("all passed." if not failed else "**FAILED**: " + "; ".join(failed) + "."))
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main())
