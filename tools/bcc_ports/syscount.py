#!/usr/bin/env python3
"""syscount: summarize syscall counts and latencies (a port of bcc's syscount).

The options and output are bcc's (``syscount-bpfcc``).  With a process to trace
(``-p PID``, ``-t TID`` or ``-- COMMAND``) the ``raw_tp/sys_enter``/``sys_exit``
programs run inside it (``--mode user``: hybrid's syscall probes, at the system calls
it makes through libc and its own executable); ``--mode kernel``, or no process
(every process, as bcc), puts the same programs on the kernel's raw tracepoints.
The eBPF C is ``progs/syscount.bpf.c``.

    syscount.py [bcc's options] [-- COMMAND [ARG ...]]
"""

from __future__ import annotations

import argparse
import errno
import itertools
import struct
import sys
from pathlib import Path
from time import strftime

if __package__ in (None, ""):  # run as a script: make `tools` and `hybrid` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tools.bcc_ports import common  # noqa: E402
from tools.bcc_ports.common import ToolError  # noqa: E402

TOOL = "syscount"


def handle_errno(errstr):
    try:
        return abs(int(errstr))
    except ValueError:
        pass
    try:
        return getattr(errno, errstr)
    except AttributeError:
        raise argparse.ArgumentTypeError("couldn't map %s to an errno" % errstr)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=TOOL,
        description="Summarize syscall counts and latencies.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=common.COMMAND_HELP)
    p.add_argument("-p", "--pid", type=int,
                   help="trace only this pid")
    p.add_argument("-t", "--tid", type=int,
                   help="trace only this tid")
    p.add_argument("-c", "--ppid", type=int,
                   help="trace only child of this pid")
    p.add_argument("-i", "--interval", type=int,
                   help="print summary at this interval (seconds)")
    p.add_argument("-d", "--duration", type=int,
                   help="total duration of trace, in seconds")
    p.add_argument("-T", "--top", type=int, default=10,
                   help="print only the top syscalls by count or latency")
    p.add_argument("-x", "--failures", action="store_true",
                   help="trace only failed syscalls (return < 0)")
    p.add_argument("-e", "--errno", type=handle_errno,
                   help="trace only syscalls that return this error (numeric or EPERM, etc.)")
    p.add_argument("-L", "--latency", action="store_true",
                   help="collect syscall latency")
    p.add_argument("-m", "--milliseconds", action="store_true",
                   help="display latency in milliseconds (default: microseconds)")
    p.add_argument("-P", "--process", action="store_true",
                   help="count by process and not by syscall")
    p.add_argument("-l", "--list", action="store_true",
                   help="print list of recognized syscalls and exit")
    p.add_argument("--syscall", type=str,
                   help="trace this syscall only (use option -l to get all recognized syscalls)")
    p.add_argument("--ebpf", action="store_true",
                   help=argparse.SUPPRESS)
    common.add_mode_argument(p)
    common.usage_with_command(p)
    return p


def syscalls() -> dict[int, str]:
    """number -> name (x86-64, ``asm/unistd_64.h``; bcc's table when the header is missing)."""
    from hybrid.user.attach.syscalls import syscall_table

    return {nr: name for name, nr in syscall_table().items()}


def syscall_name(nr: int, table: dict[int, str]) -> str:
    return table.get(nr, "[unknown: %d]" % nr)


def comm_for_pid(pid: int) -> str:
    try:
        with open("/proc/%d/comm" % pid, "rb") as f:
            return f.read().strip().decode(errors="replace")
    except Exception:  # noqa: BLE001 - as bcc: any failure is [unknown]
        return "[unknown]"


def _run(args, command: list[str]) -> int:
    if args.duration and not args.interval:
        args.interval = args.duration
    if not args.interval:
        args.interval = 99999999
    table = syscalls()

    syscall_nr = -1
    if args.syscall is not None:
        for key, value in table.items():
            if args.syscall == value:
                syscall_nr = key
                break
        if syscall_nr == -1:
            raise ToolError("syscall '%s' not found. Exiting." % args.syscall)

    if args.list:
        for grp in itertools.zip_longest(*(iter(sorted(table.values())),) * 4):
            print("   ".join(["%-22s" % s for s in grp if s is not None]))
        return 0

    if (args.pid is not None or args.tid is not None) and command:
        raise ToolError("give either -p PID / -t TID or a command, not both")
    # bcc: -p, else -t, else -c
    target_pid = None
    filter_tid = 0
    filter_ppid = 0
    if args.pid:
        target_pid = args.pid
    elif args.tid:
        filter_tid = args.tid
        target_pid = common.tgid_of(args.tid)
    elif args.ppid and not command:
        filter_ppid = args.ppid
    has_process = target_pid is not None or bool(command)
    mode = args.mode or ("user" if has_process else "kernel")
    if mode == "user" and not has_process:
        raise ToolError("--mode user needs a process to run the probes in: -p PID, -t TID or -- COMMAND"
                        + (" (-c PPID: --mode kernel)" if args.ppid else ""))
    if target_pid is not None:
        common.check_pid(target_pid)
    if filter_tid and mode == "user":
        filter_tid = common.own_pid(filter_tid)  # the tid a program running inside the process sees

    values = {"filter_tid": filter_tid, "filter_ppid": filter_ppid, "filter_syscall": syscall_nr,
              "filter_failed": int(args.failures), "filter_errno": abs(args.errno) if args.errno else 0,
              "latency": int(args.latency), "by_process": int(args.process)}
    if args.ebpf:
        print(common.source(TOOL))
        print("/* .rodata: %s */" % ", ".join("%s = %d" % kv for kv in values.items()))
        return 0

    import hybrid

    programs = ["sys_exit"] + (["sys_enter"] if args.latency else [])
    obj_path = common.build(TOOL)
    kernel = programs if mode == "kernel" else False
    with hybrid.load(obj_path, kernel=kernel, values=values) as obj:
        target = common.start(obj, mode=mode, pid=target_pid, command=command,
                              programs=programs if mode == "user" else None,
                              on_pid=lambda pid: common.set_global(obj, "target_tgid", pid))
        try:

            def banner() -> None:
                if args.syscall is not None:
                    print("Tracing %ssyscall '%s'... Ctrl+C to quit." %
                          ("failed " if args.failures else "", args.syscall))
                else:
                    print("Tracing %ssyscalls, printing top %d... Ctrl+C to quit." %
                          ("failed " if args.failures else "", args.top))

            agg_colname = "PID    COMM" if args.process else "SYSCALL"
            time_colname = "TIME (ms)" if args.milliseconds else "TIME (us)"

            def agg_colval(key: int) -> str:
                if args.process:
                    return "%-6d %-15s" % (key, comm_for_pid(key))
                return syscall_name(key, table)

            def read_data() -> list[tuple[int, int, int]]:
                data = obj.maps["data"]
                rows = []
                for k, v in data.items():
                    count, total_ns = struct.unpack("<QQ", v)
                    rows.append((struct.unpack("<I", k)[0], count, total_ns))
                for k in [struct.pack("<I", r[0]) for r in rows]:
                    data.delete(k)
                return rows

            def report(final: bool) -> None:
                rows = read_data()
                print("[%s]" % strftime("%H:%M:%S"))
                if args.latency:
                    print("%-22s %8s %16s" % (agg_colname, "COUNT", time_colname))
                    for key, count, total_ns in sorted(rows, key=lambda r: -r[2])[:args.top]:
                        if key == 0xFFFFFFFF:
                            continue  # happens occasionally, we don't need it
                        print(("%-22s %8d " + ("%16.6f" if args.milliseconds else "%16.3f")) %
                              (agg_colval(key), count, total_ns / (1e6 if args.milliseconds else 1e3)))
                else:
                    print("%-22s %8s" % (agg_colname, "COUNT"))
                    for key, count, _ in sorted(rows, key=lambda r: -r[1])[:args.top]:
                        if key == 0xFFFFFFFF:
                            continue  # happens occasionally, we don't need it
                        print("%-22s %8d" % (agg_colval(key), count))
                print("")
                sys.stdout.flush()

            common.trace_loop(target, args.interval, args.duration, report, banner)
        finally:
            target.detach()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv, command = common.split_command(argv)
    args = parser().parse_args(argv)
    return common.run(TOOL, lambda: _run(args, command))


if __name__ == "__main__":
    sys.exit(main())
