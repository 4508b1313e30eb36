#!/usr/bin/env python3
"""opensnoop: trace open() syscalls -- a drop-in port of bcc's opensnoop (0.26) onto hybrid.

The options, the columns and the output format are bcc's.  What runs where:

- with a target (``-p PID``, ``-t TID``, or a command: ``-c CMD`` or
  ``-- CMD ARGS...``) the open/openat/openat2 probes run *inside* that process
  (hybrid's syscall probes at libc's ``syscall`` instructions, the
  ``syscalls:sys_{enter,exit}_open*`` records built in userspace): nothing
  is added to any other process's system calls;
- system-wide (no target), or with ``--mode kernel``, the same programs run
  on the kernel's ``syscalls`` tracepoints.

Events reach this process through a ring buffer (``progs/opensnoop.bpf.c``).

Differences from bcc, all deliberate (see the README of the report):
``-c``/``--`` and ``--mode`` are new; ``-F`` in a process completes relative
paths from ``/proc/PID/cwd`` (or the directory of ``dfd``) because there is no
``task_struct`` to walk there; ``-d`` is honoured even when nothing is
opened (bcc only checks it after an event); the tool ends when the traced
command or process ends; in a process only the opens made through libc are
seen (the dynamic loader's own, before ``main`` or in ``dlopen``, are not).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import struct
import sys
import time
from collections import defaultdict
from datetime import timedelta

if __package__ in (None, ""):  # run as a script: .venv/bin/python tools/bcc_ports/opensnoop.py
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _snoop_util as util  # type: ignore
else:
    from . import _snoop_util as util

util.ensure_importable()

PROG = "opensnoop"

# bcc's examples, then the port's additions.
examples = """examples:
    ./opensnoop                        # trace all open() syscalls
    ./opensnoop -T                     # include timestamps
    ./opensnoop -U                     # include UID
    ./opensnoop -x                     # only show failed opens
    ./opensnoop -p 181                 # only trace PID 181
    ./opensnoop -t 123                 # only trace TID 123
    ./opensnoop -u 1000                # only trace UID 1000
    ./opensnoop -d 10                  # trace for 10 seconds only
    ./opensnoop -n main                # only print process names containing "main"
    ./opensnoop -e                     # show extended fields
    ./opensnoop -f O_WRONLY -f O_RDWR  # only print calls for writing
    ./opensnoop -F                     # show full path for an open file with relative path
    ./opensnoop --cgroupmap mappath    # only trace cgroups in this BPF map
    ./opensnoop --mntnsmap mappath     # only trace mount namespaces in the map
    ./opensnoop -c 'cat /etc/passwd'   # run a command, trace its opens inside it (hybrid)
    ./opensnoop -x -- ls /nonexistent  # the same, the command after --
    ./opensnoop -p 181 --mode kernel   # PID 181 on the kernel's tracepoints instead

modes (hybrid):
    user    the probes run inside the target process (default with -p, -t or a command)
    kernel  the kernel's syscalls:sys_{enter,exit}_open* tracepoints (default without a target)
"""

EVENT_ENTRY, EVENT_END, EVENT_CWD = 0, 1, 2
AT_FDCWD = -100
# Files hybrid's agent itself opens in the traced process (its spec and error report): not the program's.
AGENT_FILE = re.compile(rb"^/dev/shm/hybrid-attach-[^/]+/spec\.\d+(\.err)?$")
# struct data_t of progs/opensnoop.bpf.c
DATA = struct.Struct("<QQIi16sIiiI255s")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Trace open() syscalls",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=examples)
    parser.add_argument("-T", "--timestamp", action="store_true",
                        help="include timestamp on output")
    parser.add_argument("-U", "--print-uid", action="store_true",
                        help="print UID column")
    parser.add_argument("-x", "--failed", action="store_true",
                        help="only show failed opens")
    parser.add_argument("-p", "--pid",
                        help="trace this PID only")
    parser.add_argument("-t", "--tid",
                        help="trace this TID only")
    parser.add_argument("--cgroupmap",
                        help="trace cgroups in this BPF map only")
    parser.add_argument("--mntnsmap",
                        help="trace mount namespaces in this BPF map only")
    parser.add_argument("-u", "--uid",
                        help="trace this UID only")
    parser.add_argument("-d", "--duration",
                        help="total duration of trace in seconds")
    parser.add_argument("-n", "--name",
                        help="only print process names containing this name")
    parser.add_argument("--ebpf", action="store_true",
                        help=argparse.SUPPRESS)
    parser.add_argument("-e", "--extended_fields", action="store_true",
                        help="show extended fields")
    parser.add_argument("-f", "--flag_filter", action="append",
                        help="filter on flags argument (e.g., O_WRONLY)")
    parser.add_argument("-F", "--full-path", action="store_true",
                        help="show full path for an open file with relative path")
    parser.add_argument("-b", "--buffer-pages", type=int, default=64,
                        help="size of the perf ring buffer "
                             "(must be a power of two number of pages and defaults to 64)")
    parser.add_argument("-c", "--command",
                        help="run this command and trace it (hybrid; or give it after --)")
    parser.add_argument("--mode", choices=("user", "kernel"),
                        help="where the probes run (hybrid): user = inside the target, "
                             "kernel = syscalls tracepoints")
    usage = parser.format_usage()[len("usage: "):].rstrip("\n")
    parser.usage = usage + " [-- COMMAND [ARG ...]]"
    return parser


def _int(value: str, what: str) -> int:
    try:
        return int(value, 0)
    except (TypeError, ValueError):
        raise util.ToolError("invalid %s: %r" % (what, value)) from None


class Config:
    """Parsed, checked options: what to load, where, and how to print."""

    def __init__(self, args, command: list[str]):
        self.args = args
        self.command = command
        self.flag_mask = 0
        for flag in args.flag_filter or []:
            if not flag.startswith("O_"):
                raise util.ToolError("Bad flag: %s" % flag)
            try:
                self.flag_mask |= getattr(os, flag)
            except AttributeError:
                raise util.ToolError("Bad flag: %s" % flag) from None
        self.duration = timedelta(seconds=_int(args.duration, "duration")) if args.duration else None
        self.pid = _int(args.pid, "PID") if args.pid else None
        self.tid = _int(args.tid, "TID") if args.tid else None
        self.uid = _int(args.uid, "UID") if args.uid else None
        if not util.power_of_two(args.buffer_pages):
            raise util.ToolError("Perf buffer page_cnt must be a power of two")
        has_target = bool(command) or self.pid is not None or self.tid is not None
        self.mode = args.mode or ("user" if has_target else "kernel")
        if self.mode == "user" and not has_target:
            raise util.ToolError("--mode user needs a target: -p PID, -t TID or a command (-c CMD or -- CMD)")
        if command and (self.pid is not None or self.tid is not None):
            raise util.ToolError("give either a command or -p/-t, not both")
        ncpu = os.cpu_count() or 1
        size = args.buffer_pages * 4096 * ncpu  # bcc: buffer_pages per CPU
        self.ring_bytes = 1 << (size - 1).bit_length()

    def defines(self) -> tuple[str, ...]:
        d = ["EVENTS_BYTES=%d" % self.ring_bytes]
        if self.mode == "kernel" and self.args.cgroupmap:
            d.append("CGROUP_FILTER")
        if self.mode == "kernel" and self.args.mntnsmap:
            d.append("MNTNS_FILTER")
        if self.mode == "user" and self.args.full_path:
            d.append("TRACK_CWD")
        if self.mode == "user":
            d.append("COMM_CACHE")
        return tuple(d)

    def values(self, tgid: int | None, filtered_out: bool = False) -> dict:
        v = {
            "targ_tgid": tgid or 0,
            "targ_tid": self.tid or 0,
            "targ_uid": self.uid if self.uid is not None else 0xFFFFFFFF,
            "flag_mask": self.flag_mask,
            "full_path": bool(self.args.full_path),
            "want_uid": bool(self.args.print_uid) or self.mode == "kernel",
            "filtered_out": filtered_out,
        }
        return v


class Printer:
    """bcc's header and print_event, on records of progs/opensnoop.bpf.c."""

    def __init__(self, cfg: Config, out):
        self.args = cfg.args
        self.out = out
        self.initial_ts = 0
        self.entries: dict[int, list[bytes]] = defaultdict(list)
        self.name = cfg.args.name.encode() if cfg.args.name else None
        self.events = 0
        self.cwd: dict[int, bytes] = {}              # -F in a process: pid -> working directory
        self.fds: dict[tuple[int, int], bytes] = {}  # (pid, fd) -> the path its open resolved to

    def header(self) -> None:
        a = self.args
        h = ""
        if a.timestamp:
            h += "%-14s" % ("TIME(s)")
        if a.print_uid:
            h += "%-6s" % ("UID")
        h += "%-6s %-16s %4s %3s " % ("TID" if a.tid else "PID", "COMM", "FD", "ERR")
        if a.extended_fields:
            h += "%-9s" % ("FLAGS")
        h += "PATH"
        self.out.write(h.encode() + b"\n")
        self.out.flush()

    def set_cwd(self, pid: int, cwd: bytes | None = None) -> None:
        """The working directory of ``pid`` when the probes went in (-F in a process)."""
        if cwd is None:
            try:
                cwd = os.fsencode(os.readlink("/proc/%d/cwd" % pid))
            except OSError:
                return
        self.cwd[pid] = cwd

    def _dir_of(self, pid: int, dfd: int) -> bytes | None:
        if dfd == AT_FDCWD:
            base = self.cwd.get(pid)
            link = "/proc/%d/cwd" % pid
        else:
            base = self.fds.get((pid, dfd))
            link = "/proc/%d/fd/%d" % (pid, dfd)
        if base is None:  # not seen: ask the process (if it still runs)
            try:
                base = os.fsencode(os.readlink(link))
            except OSError:
                return None
        return base

    def _user_full_path(self, ev_id: int, dfd: int, name: bytes) -> bytes:
        """-F in a process: a relative name completed from the tracked cwd (or the directory of dfd)."""
        if name.startswith(b"/"):
            return name
        base = self._dir_of(ev_id >> 32, dfd)
        return os.path.join(base, name) if base is not None else name

    def _cwd_event(self, ev_id: int, dfd: int, name: bytes) -> None:
        pid = ev_id >> 32
        if dfd == AT_FDCWD:  # chdir(name)
            base = self.cwd.get(pid)
            new = name if name.startswith(b"/") or base is None else os.path.join(base, name)
            self.cwd[pid] = os.path.normpath(new)
        else:  # fchdir(dfd)
            base = self._dir_of(pid, dfd)
            if base is not None:
                self.cwd[pid] = base

    def event(self, data: bytes) -> None:
        a = self.args
        (ev_id, ts, uid, ret, comm, etype, flags, dfd, kernel, name) = DATA.unpack_from(data)
        comm = comm.split(b"\0", 1)[0]
        name = name.split(b"\0", 1)[0]
        if etype == EVENT_CWD:
            self._cwd_event(ev_id, dfd, name)
            return
        if not a.full_path or etype == EVENT_END:
            skip = False
            if ret >= 0:
                fd_s, err = ret, 0
            else:
                fd_s, err = -1, -ret
            if not self.initial_ts:
                self.initial_ts = ts
            if a.failed and ret >= 0:
                skip = True
            if self.name is not None and self.name not in comm:
                skip = True
            if not kernel and AGENT_FILE.match(name):
                skip = True
            full = None
            if a.full_path and not kernel:  # a process: complete it now, and remember the fd's path
                full = self._user_full_path(ev_id, dfd, name)
                if ret >= 0:
                    self.fds[(ev_id >> 32, ret)] = full
            if not skip:
                line = b""
                if a.timestamp:
                    delta = ts - self.initial_ts
                    line += b"%-14.9f" % (float(delta) / 1000000)
                if a.print_uid:
                    line += b"%-6d" % uid
                line += b"%-6d %-16s %4d %3d " % (ev_id & 0xffffffff if a.tid else ev_id >> 32, comm, fd_s, err)
                if a.extended_fields:
                    line += b"%08o " % flags
                if not a.full_path:
                    line += b"%s" % name
                else:
                    paths = self.entries[ev_id]
                    if kernel:
                        paths.reverse()
                        line += b"%s" % os.path.join(*paths) if paths else name
                    else:
                        line += full
                self.out.write(line + b"\n")
                self.events += 1
            if a.full_path:
                self.entries.pop(ev_id, None)
        elif etype == EVENT_ENTRY:
            self.entries[ev_id].append(name)


class LostCounter:
    """The program's count of records the ring had no room for, said as bcc's perf reader says it."""

    def __init__(self, obj):
        var = obj.spec.variable("lost")
        self.map = obj.maps[var.section]
        self.offset = var.offset
        self.seen = 0

    def value(self) -> int:
        raw = self.map.lookup(b"\0\0\0\0")
        return int.from_bytes(raw[self.offset:self.offset + 8], "little") if raw else 0

    def report(self) -> None:
        n = self.value()
        if n > self.seen:
            print("Possibly lost %d samples" % (n - self.seen), file=sys.stderr)
            sys.stderr.flush()
            self.seen = n


def _container_filtered_out(cfg: Config, pid: int) -> bool:
    """--cgroupmap / --mntnsmap for a target process: decided once, here (the process is not in the kernel's view)."""
    a = cfg.args
    if a.cgroupmap:
        cg = util.cgroup_id(pid)
        if cg is None or not util.in_pinned_map(a.cgroupmap, cg, "--cgroupmap"):
            return True
    if a.mntnsmap:
        ns = util.mntns_id(pid)
        if ns is None or not util.in_pinned_map(a.mntnsmap, ns, "--mntnsmap"):
            return True
    return False


def run(cfg: Config, out=None) -> int:
    import hybrid
    from hybrid.errors import HybridError

    out = out or sys.stdout.buffer
    a = cfg.args
    tgid = None
    if cfg.tid is not None:
        tgid = util.tgid_of(cfg.tid)
    elif cfg.pid is not None:
        util.check_pid(cfg.pid)
        tgid = cfg.pid
    if cfg.command:
        util.check_command(cfg.command)

    share = {}
    filtered_out = False
    if cfg.mode == "kernel":
        if a.cgroupmap:
            share["cgroupset"] = util.pinned_map(a.cgroupmap, "--cgroupmap")
        if a.mntnsmap:
            share["mount_ns_set"] = util.pinned_map(a.mntnsmap, "--mntnsmap")
    else:  # a command starts in our cgroup and mount namespace
        filtered_out = _container_filtered_out(cfg, tgid if tgid is not None else os.getpid())

    path = util.build("opensnoop", cfg.defines())
    held = release = None
    if cfg.command and cfg.mode == "kernel":  # its pid goes into the filter: start it stopped at exec
        held, release = util.spawn_stopped(cfg.command)
        tgid = held.pid
    printer = Printer(cfg, out)
    obj = att = launched = None
    proc_pid = tgid
    try:
        try:
            obj = hybrid.load(path, kernel=(cfg.mode == "kernel"), values=cfg.values(tgid, filtered_out),
                              share=share or None)
            consumer = obj.ring_buffer("events", lambda data: printer.event(data))
            if cfg.mode == "kernel":
                att = obj.attach_kernel()
            elif cfg.command:
                launched = obj.launch(cfg.command)
                proc_pid = launched.pid
                printer.set_cwd(proc_pid, os.fsencode(os.getcwd()))  # it starts where we are
            else:
                printer.set_cwd(tgid)
                att = obj.attach(tgid)
        except HybridError as e:
            raise util.ToolError(util.one_line(e)) from None
        printer.header()
        if release is not None:
            release()
            release = None
        child = launched.popen if launched is not None else held
        start = time.monotonic()
        limit = cfg.duration.total_seconds() if cfg.duration else None
        lost = LostCounter(obj)
        try:
            while True:
                consumer.poll(100)
                out.flush()
                lost.report()
                if limit is not None and time.monotonic() - start >= limit:
                    break
                if child is not None and child.poll() is not None:
                    break
                if child is None and proc_pid is not None and not util.process_alive(proc_pid):
                    break
        except KeyboardInterrupt:
            pass
        # detach first, then print what is left in the ring
        if launched is not None:
            launched.detach()
        if att is not None:
            if isinstance(att, list):
                for link in att:
                    link.close()
            else:
                att.detach()
        att = None
        consumer.consume()
        out.flush()
        lost.report()
        return 0
    finally:
        if release is not None:  # the held command never ran: end it
            held.kill()
            release()
            held.wait()
        if obj is not None:
            obj.close()  # detaches whatever is still attached
        for m in share.values():
            m.close()
        for p in (held, launched.popen if launched is not None else None):
            if p is not None and p.poll() is not None:
                p.wait()  # reap it; a command still running (-d expired) is left to run


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    opts, command = util.split_command(argv)
    args = build_parser().parse_args(opts)
    try:
        if args.command:
            if command:
                raise util.ToolError("give the command either with -c or after --, not both")
            command = shlex.split(args.command)
        cfg = Config(args, command)
        if args.ebpf:
            print(util.source_text("opensnoop", cfg.defines(), cfg.values(cfg.pid)))
            return 0
        return run(cfg)
    except util.ToolError as e:
        print("%s: %s" % (PROG, e), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
