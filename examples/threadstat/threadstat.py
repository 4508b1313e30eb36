#!/usr/bin/env python3
"""threadstat: per thread of a process, its system calls (counted in the kernel) and the calls of one of
its functions (counted by a uprobe running inside the process), in one map shared by both sides.

The example agent of hybrid's kernel-cooperative design, run by ``make demo``:
``threadstat.bpf.c`` holds both programs; ``hybrid.load`` puts the raw
tracepoint into the kernel and the uprobe into the workload process, and the
map ``counts`` is shared.  It starts the workload (``workload.c``), lets it
run, and prints one row per thread next to what the workload itself says it
did.

    threadstat.py [-t THREADS] [-c CALLS] [--mode mirror|syscall|kernel] [--interval S]

modes:
  mirror   the uprobe counts into a userspace copy of `counts`, synced to
           the kernel map every --interval seconds (default; ns per call)
  syscall  the uprobe reaches the kernel map through bpf() (µs per call; its
           own bpf() calls show up among the thread's syscalls)
  kernel   the uprobe runs in the kernel as a kernel uprobe (the baseline)

examples:
  threadstat.py                      # 4 threads, 100000 calls each (x thread number)
  threadstat.py -t 2 -c 1000000 --mode kernel
"""

from __future__ import annotations

import argparse
import os
import re
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
BUILD = ROOT / "build" / "examples" / "threadstat"
CALLS_KEY = 0xFFFFFFFF
MODES = ("mirror", "syscall", "kernel")


@dataclass
class ThreadRow:
    tid: int
    syscalls: int = 0
    getppid: int = 0
    calls: int = 0
    expected_calls: int | None = None
    expected_getppid: int | None = None

    @property
    def exact(self) -> bool:
        return self.calls == self.expected_calls and self.getppid == self.expected_getppid


def build(build_dir: Path = BUILD) -> tuple[str, str]:
    """Compile the eBPF object and the workload (once); returns their paths."""
    from hybrid.user.toolchain import compile_bpf, compile_c

    build_dir.mkdir(parents=True, exist_ok=True)
    obj = compile_bpf(HERE / "threadstat.bpf.c", build_dir / "threadstat.bpf.o")
    exe = compile_c(HERE / "workload.c", build_dir / "threadstat-workload", "-pthread")
    return obj, exe


def set_target(obj, tgid: int) -> None:
    """``target_tgid = tgid`` in .bss, written straight into the kernel's memory (the map is mmap-shared)."""
    var = obj.spec.variable("target_tgid")
    bss = obj.maps[var.section]
    value = bytearray(bss.lookup(b"\0\0\0\0"))
    value[var.offset:var.offset + 4] = struct.pack("<I", tgid)
    bss.update(b"\0\0\0\0", bytes(value))


def run(threads: int = 4, calls: int = 100000, mode: str = "mirror", interval: float = 0.1,
        build_dir: Path = BUILD) -> tuple[list[ThreadRow], dict]:
    """Run the workload under both programs; returns a row per thread and facts about the run."""
    import hybrid
    from hybrid.user.attach.syscalls import syscall_number

    if mode not in MODES:
        raise ValueError("mode must be one of %s" % ", ".join(MODES))
    obj_path, exe = build(build_dir)
    kernel = ["count_syscalls"] + (["count_calls"] if mode == "kernel" else [])
    mirror = {"counts": interval} if mode == "mirror" else None
    t0 = time.monotonic()
    with hybrid.load(obj_path, kernel=kernel, mirror=mirror) as obj:
        loaded = time.monotonic()
        with obj.launch([exe, str(threads), str(calls)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                        text=True) as proc:
            attached = time.monotonic()
            set_target(obj, proc.pid)
            start = time.monotonic()
            out, _ = proc.popen.communicate("go\n")
            ran = time.monotonic() - start
            if proc.popen.returncode:
                raise RuntimeError("the workload exited with status %d" % proc.popen.returncode)
        obj.sync()
        getppid = syscall_number("getppid")
        rows: dict[int, ThreadRow] = {}
        for key, value in obj.maps["counts"].items():
            tid, what = struct.unpack("<II", key)
            n = struct.unpack("<Q", value)[0]
            row = rows.setdefault(tid, ThreadRow(tid))
            if what == CALLS_KEY:
                row.calls += n
            else:
                row.syscalls += n
                if what == getppid:
                    row.getppid += n
        for m in re.finditer(r"^thread (\d+) work=(\d+) getppid=(\d+)$", out, re.M):
            row = rows.setdefault(int(m.group(1)), ThreadRow(int(m.group(1))))
            row.expected_calls, row.expected_getppid = int(m.group(2)), int(m.group(3))
    facts = {"mode": mode, "load_s": loaded - t0, "attach_s": attached - loaded, "run_s": ran,
             "workload_pid": proc.pid}
    return sorted(rows.values(), key=lambda r: (r.expected_calls is None, r.tid)), facts


def table(rows: list[ThreadRow]) -> str:
    lines = ["%-8s %10s %10s %12s   %s" % ("TID", "SYSCALLS", "GETPPID", "work() CALLS", "WORKLOAD SAYS")]
    for r in rows:
        says = "main thread" if r.expected_calls is None else "work=%d getppid=%d %s" % (
            r.expected_calls, r.expected_getppid, "ok" if r.exact else "MISMATCH")
        lines.append("%-8d %10d %10d %12d   %s" % (r.tid, r.syscalls, r.getppid, r.calls, says))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="threadstat", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__[__doc__.index("modes:"):])
    parser.add_argument("-t", "--threads", type=int, default=4, help="worker threads (default 4)")
    parser.add_argument("-c", "--calls", type=int, default=100000, help="work() calls per thread, times its number")
    parser.add_argument("--mode", choices=MODES, default="mirror", help="where the uprobe counts (default mirror)")
    parser.add_argument("--interval", type=float, default=0.1, help="mirror sync interval in seconds (default 0.1)")
    args = parser.parse_args(argv)
    from hybrid.errors import HybridError

    try:
        rows, facts = run(args.threads, args.calls, args.mode, args.interval)
    except HybridError as e:
        print("threadstat: %s" % e, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    where = {"mirror": "in the process, into a userspace map mirrored to the kernel every %gs" % args.interval,
             "syscall": "in the process, into the kernel map through bpf()",
             "kernel": "in the kernel (kernel uprobe)"}[args.mode]
    print("syscalls counted in the kernel (raw_tp/sys_enter); work() calls counted %s" % where)
    print("workload pid %d: %d threads ran in %.1f ms (load %.0f ms, attach %.0f ms)\n" % (
        facts["workload_pid"], args.threads, facts["run_s"] * 1e3, facts["load_s"] * 1e3, facts["attach_s"] * 1e3))
    print(table(rows))
    workers = [r for r in rows if r.expected_calls is not None]
    bad = [r for r in workers if not r.exact]
    print("\n%d of %d threads counted exactly" % (len(workers) - len(bad), len(workers)))
    return 1 if bad or not workers else 0


if __name__ == "__main__":
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
