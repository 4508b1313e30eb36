#!/usr/bin/env python3
"""pyperf benchmark of bridge access: a userspace program using kernel maps, beside userspace-only maps.

``programs/bridge.bpf.c`` is loaded with ``hybrid.load``: its ``kernel_side``
program goes into the kernel and shares three maps with the userspace
programs, one per bridge path:

``shared_array``  an ARRAY: the kernel map (``BPF_F_MMAPABLE``) mapped into the region;
``shared_hash``   a HASH reached through ``bpf()`` (lookup, write-back, update);
``mirror_hash``   a HASH mirrored (``mirror=``): a userspace map synced to the kernel
                  map by a thread every 0.1 s, running during the measurement.

``user_array`` and ``user_hash`` are the userspace-only maps to compare with.
Each userspace program does a loop of lookups + atomic add (``lookup``) or of
updates (``update``) over 8 pre-filled keys: 1000 per run, 8 per run through
``bpf()`` (one lookup per key: a run keeps at most 16 lookups pending
write-back).  The JIT's native entry is called through ctypes, then
``hybrid_bridge_flush`` (the write-back every caller of a program makes
after a run; nothing to do for the other maps); values are seconds per
*operation* (pyperf ``inner_loops``).

Usage (normally through ``bench/run.py``)::

    python bench/bench_bridge.py -o bridge.json [--quick] [any pyperf option]
"""

from __future__ import annotations

import os
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
BUILD = BENCH_DIR / "build"
SOURCE = BENCH_DIR / "programs" / "bridge.bpf.c"

NR_KEYS, NR_OPS, NR_OPS_SYSCALL = 8, 1000, 8
MIRROR_INTERVAL = 0.1
FULL = (3, 3, 0.1)
QUICK = (1, 3, 0.02)


@dataclass(frozen=True)
class Case:
    map: str  # map name in bridge.bpf.c
    op: str  # lookup | update
    path: str  # how the program reaches the map
    baseline: str  # the userspace-only map to compare with

    @property
    def program(self) -> str:
        return "%s_%s" % (self.map, self.op)

    @property
    def ops(self) -> int:
        return NR_OPS_SYSCALL if self.map == "shared_hash" else NR_OPS


PATHS = {
    "user_array": ("array, userspace only", "user_array"),
    "shared_array": ("array, kernel map by mmap", "user_array"),
    "user_hash": ("hash, userspace only", "user_hash"),
    "shared_hash": ("hash, kernel map by bpf()", "user_hash"),
    "mirror_hash": ("hash, mirrored to the kernel map", "user_hash"),
}
CASES = [Case(m, op, *PATHS[m]) for op in ("lookup", "update") for m in PATHS]
GOAL = ("shared_array_lookup", 2.0)  # the mmap array within 2x of the userspace array


def build() -> Path:
    sys.path.insert(0, str(ROOT))
    from hybrid.user.toolchain import compile_bpf

    BUILD.mkdir(parents=True, exist_ok=True)
    return Path(compile_bpf(SOURCE, BUILD / "bridge.bpf.o"))


def kernel_problem() -> str | None:
    if os.geteuid() != 0:
        return "kernel maps need root"
    from hybrid.kernel import features

    f = features.check("bpf")
    return None if f.available else f.detail


_loaded = {}


def load(obj_path: str):
    """The object, loaded once per process, with every hash pre-filled (keys 0..7)."""
    obj = _loaded.get(obj_path)
    if obj is None:
        import hybrid

        obj = hybrid.load(obj_path, mirror={"mirror_hash": MIRROR_INTERVAL})
        for name in ("user_hash", "shared_hash"):
            for k in range(NR_KEYS):
                obj.maps[name].update(struct.pack("<I", k), struct.pack("<Q", 0))
        for k in range(NR_KEYS):
            obj.region["mirror_hash"].update(struct.pack("<I", k), struct.pack("<Q", 0))
        _loaded[obj_path] = obj
    return obj


class Subject:
    def __init__(self, case: Case, obj_path: str):
        from hybrid.user.engine import NativeEntry

        from hybrid.native import _native

        obj = load(obj_path)
        self.case = case
        self.call = NativeEntry(obj.programs[case.program].engine("jit").address)
        # what every caller of a program does after a run (the agent's dispatcher, Engine.run): write back
        # the copies handed out by lookups through bpf(); a no-op test for the other maps
        self.flush = _native().lib.hybrid_bridge_flush
        self.check()

    def check(self) -> None:
        r0 = self.call(0, 0)
        self.flush()
        if r0 != self.case.ops:
            raise RuntimeError("%s returned %d, expected %d: not the benchmarked work"
                               % (self.case.program, r0, self.case.ops))

    def time(self, loops: int) -> float:
        call, flush = self.call, self.flush
        t0 = time.perf_counter()
        for _ in range(loops):
            call(0, 0)
            flush()
        elapsed = time.perf_counter() - t0
        self.check()  # every operation still succeeds after the timed runs
        return elapsed


_subjects: dict[str, Subject] = {}


def time_case(loops: int, program: str, obj_path: str) -> float:
    s = _subjects.get(program)
    if s is None:
        s = _subjects[program] = Subject(next(c for c in CASES if c.program == program), obj_path)
    return s.time(loops)


def _forward_args(cmd: list[str], args) -> None:
    cmd.extend(("--object", args.object))


def main() -> None:
    import harness

    runner, quick = harness.suite_runner(
        FULL,
        QUICK,
        add_cmdline_args=_forward_args,
        description="Bridge access: kernel maps from a userspace program vs userspace maps")
    runner.argparser.add_argument("--object", default=None, help="the compiled bridge.bpf.o (default: build it)")
    args = runner.parse_args()
    if not args.worker:
        problem = kernel_problem()
        if problem:
            raise SystemExit("bench_bridge: cannot run: %s" % problem)
        args.object = str(args.object or build())
        for case in CASES:  # fail early and clearly, before spawning workers
            Subject(case, args.object)
    for case in CASES:
        runner.bench_time_func("bridge/%s" % case.program, time_case, case.program, args.object,
                               inner_loops=case.ops,
                               metadata={"hybrid_map": case.map, "hybrid_op": case.op, "hybrid_nr_ops": case.ops})


# --- the summary ------------------------------------------------------------------


@dataclass
class Row:
    case: Case
    bench: object
    base: object

    @property
    def ns(self) -> float | None:
        return None if self.bench is None else self.bench.median() * 1e9

    @property
    def ratio(self) -> float | None:
        if self.bench is None or self.base is None:
            return None
        return self.bench.median() / self.base.median()


def load_rows(json_path) -> list[Row]:
    from report import benchmarks

    by_name = benchmarks(json_path)
    rows = []
    for c in CASES:
        base = by_name.get("bridge/%s_%s" % (c.baseline, c.op))
        rows.append(Row(c, by_name.get("bridge/%s" % c.program), base))
    return rows


def missed_goals(json_path) -> list[str]:
    program, limit = GOAL
    return ["bridge/%s: %.2fx the userspace array (goal <= %.1fx)" % (program, r.ratio, limit)
            for r in load_rows(json_path) if r.case.program == program and r.ratio is not None and r.ratio > limit]


def rows(json_path) -> list:
    """The consolidated report's rows (bench/report.py): a kernel map used from userspace against the
    userspace-only map of the same type (kernel/user < 1: the shared map costs more)."""
    from report import Row, Stat

    out = []
    for r in load_rows(json_path):
        if r.case.map == r.case.baseline:
            continue
        note = ""
        if r.case.program == GOAL[0] and r.ratio is not None:
            note = "goal: within %.0f× of the userspace map: %s" % (GOAL[1], "met" if r.ratio <= GOAL[1]
                                                                    else "**MISSED**")
        out.append(Row("bridge", "%s %s" % (r.case.path, r.case.op), "ns/op", Stat.of(r.bench), Stat.of(r.base),
                       reason="" if r.bench is not None and r.base is not None else "not measured in this run",
                       kernel_label="kernel map, from userspace", user_label="userspace map", note=note))
    return out


def summarize(json_path) -> str:
    import bench_engines  # machine_line

    lines = [
        "# Bridge access: kernel maps from a userspace program",
        "",
        bench_engines.machine_line() + ".",
        "",
        "A JIT'd userspace program does %d lookups + atomic adds (**lookup**) or updates (**update**) per run "
        "over %d pre-filled keys (u32 key, u64 value), %d per run through bpf(); **ns per operation**, median "
        "± stdev of the pyperf values, measured in one run, the ctypes call and the write-back per run included "
        "(through bpf(): a lookup is a `BPF_MAP_LOOKUP_ELEM` and, at the end of the run, a `BPF_MAP_UPDATE_ELEM` "
        "of the changed copy). **× userspace** "
        "is the time over the same operation on the userspace-only map of the same type. Goal: the "
        "mmap-shared array within 2× of the userspace array (lookup)." % (NR_OPS, NR_KEYS, NR_OPS_SYSCALL),
        "",
        "| map | op | ns/op | × userspace | goal |",
        "|---|---|---:|---:|---|",
    ]
    for r in load_rows(json_path):
        if r.bench is None:
            lines.append("| %s | %s | not measured | — | |" % (r.case.path, r.case.op))
            continue
        sd = r.bench.stdev() * 1e9 if r.bench.get_nvalue() > 1 else 0.0
        goal = ""
        if r.case.program == GOAL[0] and r.ratio is not None:
            goal = "met (≤ %.0f×)" % GOAL[1] if r.ratio <= GOAL[1] else "MISSED (> %.0f×)" % GOAL[1]
        lines.append("| %s | %s | %.1f ± %.1f | %s | %s |" % (
            r.case.path, r.case.op, r.ns, sd, "—" if r.ratio is None else "%.2f×" % r.ratio, goal))
    lines += ["", "The mirrored hash is a userspace map: what the kernel side sees of it is up to %.1f s "
              "(the sync interval) plus one sync old." % MIRROR_INTERVAL]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
