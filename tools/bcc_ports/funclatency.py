#!/usr/bin/env python3
"""funclatency: time functions and print latency as a histogram (a port of bcc's funclatency).

The options, patterns and output are bcc's (``funclatency-bpfcc``).  The probes of user
functions (``lib:func``, ``/path:func``, wildcards, ``-r`` regular expressions) run inside
the traced process as hybrid's userspace uprobe/uretprobe pairs (``--mode user``, the
default with ``-p PID`` or ``-- COMMAND``), or as kernel uprobes (``--mode kernel``, the
default without a process: every process, as bcc does).  The eBPF C is
``progs/funclatency.bpf.c``; one entry/return pair of programs is generated per function.

    funclatency.py [bcc's options] pattern [-- COMMAND [ARG ...]]
"""

from __future__ import annotations

import argparse
import os
import re
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from time import strftime

if __package__ in (None, ""):  # run as a script: make `tools` and `hybrid` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tools.bcc_ports import common  # noqa: E402
from tools.bcc_ports.common import ToolError  # noqa: E402

TOOL = "funclatency"
PROBES_H = "funclatency_probes.h"
MAX_LEVEL = 32  # MAX_LEVEL of funclatency.bpf.c
MAX_FUNCTIONS = 500  # bcc refuses more than 1000 open probes (an entry and a return per function)
TID_SLOTS_MAX = 1 << 20

examples = """examples:
    ./funclatency do_sys_open       # time the do_sys_open() kernel function
    ./funclatency c:read            # time the read() C library function
    ./funclatency -u vfs_read       # time vfs_read(), in microseconds
    ./funclatency -m do_nanosleep   # time do_nanosleep(), in milliseconds
    ./funclatency -i 2 -d 10 c:open # output every 2 seconds, for duration 10s
    ./funclatency -mTi 5 vfs_read   # output every 5 seconds, with timestamps
    ./funclatency -p 181 vfs_read   # time process 181 only
    ./funclatency 'vfs_fstat*'      # time both vfs_fstat() and vfs_fstatat()
    ./funclatency 'c:*printf'       # time the *printf family of functions
    ./funclatency -F 'vfs_r*'       # show one histogram per matched function
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=TOOL,
        description="Time functions and print latency as a histogram",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=examples + "\n" + common.COMMAND_HELP)
    p.add_argument("-p", "--pid", type=int,
                   help="trace this PID only")
    p.add_argument("-i", "--interval", type=int,
                   help="summary interval, in seconds")
    p.add_argument("-d", "--duration", type=int,
                   help="total duration of trace, in seconds")
    p.add_argument("-T", "--timestamp", action="store_true",
                   help="include timestamp on output")
    p.add_argument("-u", "--microseconds", action="store_true",
                   help="microsecond histogram")
    p.add_argument("-m", "--milliseconds", action="store_true",
                   help="millisecond histogram")
    p.add_argument("-F", "--function", action="store_true",
                   help="show a separate histogram per function")
    p.add_argument("-r", "--regexp", action="store_true",
                   help="use regular expressions. Default is \"*\" wildcards only.")
    p.add_argument("-l", "--level", type=int,
                   help="set the level of nested or recursive functions")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="print the BPF program (for debugging purposes)")
    p.add_argument("pattern",
                   help="search expression for functions")
    p.add_argument("--ebpf", action="store_true",
                   help=argparse.SUPPRESS)
    common.add_mode_argument(p)
    common.usage_with_command(p)
    return p


# --- which functions ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Function:
    name: str  # the name printed (-F)
    vaddr: int
    target: str  # "binary:function" or "binary:0xOFFSET" of the uprobe section


def find_library(library: str, pid: int | None = None) -> str:
    """bcc's ``BPF.find_library(library) or BPF.find_exe(library)``: ``c`` is ``libc.so.*``
    (the one process ``pid`` maps, else the ld.so cache's), a path is itself, else a program
    on PATH; the real path."""
    from hybrid.errors import HybridError
    from hybrid.user.attach import symbols

    if "/" in library:
        if not os.path.isfile(library):
            raise ToolError("can't resolve library %s" % library)
        return os.path.realpath(library)
    prefix = "lib%s.so" % library
    if pid is not None:
        try:
            for path in symbols._maps_paths(pid):
                base = os.path.basename(path)
                if base.startswith(prefix) or base == library:
                    return os.path.realpath(path)
        except HybridError:
            pass
    for name, path in symbols._ldconfig_entries():
        if name.startswith(prefix) and os.path.isfile(path):
            return os.path.realpath(path)
    if ".so" in library:
        try:
            return os.path.realpath(symbols.find_library(library))
        except HybridError:
            pass
    import shutil

    exe = shutil.which(library)
    if exe:
        return os.path.realpath(exe)
    raise ToolError("can't resolve library %s" % library)


def _preference(name: str) -> tuple:
    return (name.startswith("_"), len(name), name)


def match_functions(path: str, regex: str) -> list[Function]:
    """The functions of ``path`` whose symbol name ``re.match``es ``regex``, one per address
    (bcc's ``get_user_addresses``: aliases are probed once)."""
    from hybrid.errors import HybridError
    from hybrid.user.attach import symbols

    try:
        img = symbols.elf_image(path)
    except HybridError as e:
        raise ToolError(str(e)) from None
    try:
        rx = re.compile(regex)
    except re.error as e:
        raise ToolError("bad pattern %r: %s" % (regex, e)) from None
    names: dict[int, set[str]] = {}
    for s in img.symbols:
        if s.type not in ("STT_FUNC", "STT_GNU_IFUNC") or s.shndx == 0 or not s.value:
            continue
        if rx.match(s.name):
            names.setdefault(s.value, set()).add(s.name)
    out = []
    for vaddr in sorted(names):
        name = min(names[vaddr], key=_preference)
        try:
            same = symbols.resolve_symbol(path, name).vaddr == vaddr
        except HybridError:
            same = False
        if same:
            target = "%s:%s" % (path, name)
        else:
            target = "%s:%#x" % (path, symbols.vaddr_to_offset(path, vaddr))
        out.append(Function(name.split("@", 1)[0], vaddr, target))
    return out


def patchable(funcs: list[Function]) -> tuple[list[Function], list[tuple[Function, str]]]:
    """The functions hybrid's userspace probes can patch (a jump at the entry), and the others with why;
    checked as the planner will (``agent._plan_function_window``).  Two IFUNCs that resolve to the same
    implementation are probed once."""
    from hybrid.errors import HybridError
    from hybrid.user.attach import symbols, x86
    from hybrid.user.elf import UprobeTarget

    ok, refused, seen = [], [], set()
    for f in funcs:
        binary, _, func = f.target.rpartition(":")
        try:
            loc = symbols.resolve_uprobe(UprobeTarget(binary, func))
            key = (loc.path, loc.vaddr)
            if key in seen:
                continue
            sym = loc.symbol
            start, size = (sym.vaddr, sym.size) if sym is not None else (loc.vaddr, 0)
            func_code = symbols.read_code(binary, start, size) if size else None
            code = symbols.read_code(binary, loc.vaddr, 32)
            x86.plan_window(code, loc.vaddr, func_start=start if func_code else None, func_code=func_code)
        except HybridError as e:
            refused.append((f, str(e)))
            continue
        seen.add(key)
        ok.append(f)
    return ok, refused


def probes_header(funcs: list[Function]) -> str:
    lines = ["/* generated by tools/bcc_ports/funclatency.py: FUNC_PROBE(index, \"binary:function\") */"]
    for i, f in enumerate(funcs):
        lines.append('FUNC_PROBE(%d, "%s")' % (i, f.target.replace("\\", "\\\\").replace('"', '\\"')))
    return "\n".join(lines) + "\n"


def tid_slots() -> int:
    try:
        with open("/proc/sys/kernel/pid_max") as f:
            return max(1024, min(int(f.read()), TID_SLOTS_MAX))
    except (OSError, ValueError):
        return 32768


# --- the tool ------------------------------------------------------------------------------------


def _u64(b: bytes) -> int:
    return struct.unpack("<Q", b)[0]


def _run(args, command: list[str]) -> int:
    if args.duration and not args.interval:
        args.interval = args.duration
    if not args.interval:
        args.interval = 99999999
    if args.pid is not None and command:
        raise ToolError("give either -p PID or a command, not both")
    parts = args.pattern.split(":")
    if len(parts) == 1 and args.ebpf:
        print(common.source(TOOL))
        print("/* %s: a kernel function; this port times user functions only */" % args.pattern)
        return 0
    if len(parts) == 1:
        # a kernel function: kprobes (the kernel side only)
        from hybrid.kernel import features

        features.require("kprobes", "funclatency %s" % args.pattern, args.pattern)
        features.require("kretprobes", "funclatency %s" % args.pattern, args.pattern)
        raise ToolError("kernel functions (%s) are not supported by this port: use funclatency-bpfcc"
                        % args.pattern)
    if len(parts) != 2:
        raise ToolError("unrecognized pattern format '%s'" % args.pattern)
    library, pattern = parts
    target_pid = args.pid
    mode = args.mode or ("user" if (target_pid is not None or command) else "kernel")
    if mode == "user" and target_pid is None and not command:
        raise ToolError("--mode user needs a process to run the probes in: -p PID or -- COMMAND")
    if target_pid is not None:
        common.check_pid(target_pid)
    if not args.regexp:
        pattern = pattern.replace("*", ".*")
        pattern = "^" + pattern + "$"
    if args.level is not None and args.level > MAX_LEVEL:
        raise ToolError("-l %d: at most %d levels" % (args.level, MAX_LEVEL))

    if args.milliseconds:
        factor, label = 1000000, "msecs"
    elif args.microseconds:
        factor, label = 1000, "usecs"
    else:
        factor, label = 1, "nsecs"
    # one histogram per function (and process): -F, or every process (bcc: a library and no -p)
    keyed = bool(args.function or (target_pid is None and not command))
    values = {"factor": factor, "level": args.level or 0, "keyed": int(keyed)}

    funcs: list[Function] = []
    problem = None
    try:
        path = find_library(library, target_pid)
        funcs = match_functions(path, pattern)
    except ToolError as e:
        if not args.ebpf:
            raise
        problem = str(e)
    if mode == "user" and funcs and not args.ebpf:
        funcs, refused = patchable(funcs)
        for f, why in refused:
            print("funclatency: not tracing %s: %s" % (f.name, why), file=sys.stderr)
    header = probes_header(funcs)
    defines = {"TID_SLOTS": tid_slots(), "FUNCLATENCY_PROBES": '"%s"' % PROBES_H}
    if args.verbose or args.ebpf:
        print(common.source(TOOL))
        print("/* %s (-DFUNCLATENCY_PROBES), %s */" % (PROBES_H, problem or "%d functions" % len(funcs)))
        print(header)
        print("/* -DTID_SLOTS=%d; .rodata: %s */" % (defines["TID_SLOTS"], ", ".join(
            "%s = %d" % kv for kv in values.items())))
        if args.ebpf:
            return 0
    if not funcs:
        print("0 functions matched by \"%s\". Exiting." % args.pattern, file=sys.stderr)
        return 1
    if len(funcs) > MAX_FUNCTIONS:
        raise ToolError("%d functions matched by \"%s\": Number of open probes would exceed global quota "
                        "(%d functions)" % (len(funcs), args.pattern, MAX_FUNCTIONS))

    import hybrid

    obj_path = common.build(TOOL, defines=defines, generated={PROBES_H: header})
    with hybrid.load(obj_path, kernel=(mode == "kernel"), values=values) as obj:
        target = common.start(obj, mode=mode, pid=target_pid, command=command,
                              on_pid=lambda pid: common.set_global(obj, "target_tgid", pid))
        try:
            names = [f.name for f in funcs]

            def banner() -> None:
                print("Tracing %d functions for \"%s\"... Hit Ctrl-C to end." % (len(funcs), args.pattern))

            def report(final: bool) -> None:
                print()
                if args.timestamp:
                    print("%-8s\n" % strftime("%H:%M:%S"), end="")
                if keyed:
                    fdist = obj.maps["fdist"]
                    hist = {}
                    for k, v in fdist.items():
                        func, pid, slot = struct.unpack("<QQQ", k)
                        hist[((func, pid), slot)] = _u64(v)
                    common.print_log2_hist(hist, label, "Function",
                                           section_print_fn=lambda b: "%s [%d]" % (names[b[0]], b[1]),
                                           bucket_sort_fn=sorted)
                    for k in list(fdist.keys()):
                        fdist.delete(k)
                else:
                    dist = obj.maps["dist"]
                    hist = {}
                    for k, v in dist.items():
                        n = _u64(v)
                        if n:
                            hist[struct.unpack("<I", k)[0]] = n
                    common.print_log2_hist(hist, label)
                    for slot in hist:
                        dist.update(struct.pack("<I", slot), bytes(8))
                avg = obj.maps["avg"]
                total = _u64(avg.lookup(struct.pack("<I", 0)))
                counts = _u64(avg.lookup(struct.pack("<I", 1)))
                if counts > 0:
                    if label == "msecs":
                        total /= 1000000
                    elif label == "usecs":
                        total /= 1000
                    print("\navg = %ld %s, total: %ld %s, count: %ld\n" % (total / counts, label, total, label,
                                                                          counts))
                for i in (0, 1):
                    avg.update(struct.pack("<I", i), bytes(8))
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
