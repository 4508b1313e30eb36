"""The ``hybrid`` command line."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from hybrid.errors import HybridError


def _conformance(args: argparse.Namespace) -> int:
    from hybrid.user.conformance import run_directory

    passed = failed = 0
    for outcome in run_directory(args.directory, args.engine):
        if outcome.passed:
            passed += 1
            if args.verbose:
                print("PASS %s %s" % (outcome.case.name, outcome.reason))
        else:
            failed += 1
            print("FAIL %s: %s" % (outcome.case.name, outcome.reason))
        sys.stdout.flush()
    print("%d passed, %d failed" % (passed, failed))
    return 1 if failed or not passed else 0


def _read_program(path: str) -> bytes:
    data = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    return data


def _disasm(args: argparse.Namespace) -> int:
    from hybrid.user import isa

    print(isa.disasm(isa.decode(_read_program(args.file))))
    return 0


def _asm(args: argparse.Namespace) -> int:
    from hybrid.user.asm import assemble

    text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text()
    code = assemble(text)
    if args.output:
        Path(args.output).write_bytes(code)
    else:
        sys.stdout.buffer.write(code)
    return 0


def _run(args: argparse.Namespace) -> int:
    from hybrid.user.engine import create_engine
    from hybrid.user.program import Program

    data = _read_program(args.file)
    ctx = bytearray(bytes.fromhex(args.mem.replace(" ", "")) if args.mem else b"")
    if data[:4] == b"\x7fELF":
        return _run_object(data, args, ctx)
    prog = Program.load(data, name=Path(args.file).name)
    with create_engine(args.engine, prog) as engine:
        print("%#x" % engine.run(ctx))
    return 0


def _run_object(data: bytes, args: argparse.Namespace, ctx: bytearray) -> int:
    from hybrid.errors import HybridError
    from hybrid.user.object import load

    with load(data) as obj:
        names = sorted(obj.programs)
        name = args.program or (names[0] if len(names) == 1 else None)
        if name not in obj.programs:
            raise HybridError("%s: %s (programs: %s)" % (
                args.file, "no program %r" % name if name else "several programs: choose one with -p",
                ", ".join(names) or "none"))
        print("%#x" % obj.programs[name].run(ctx, engine=args.engine))
    return 0


def _print_maps(obj, out=None) -> None:
    """The object's maps at exit, like bpftrace: ``@name[key]: value`` (integers when they fit)."""
    from hybrid.user.attach.report import format_maps

    text = format_maps(obj)
    if text:
        print(text, file=out or sys.stdout)


def _note_skipped(obj, chosen) -> None:
    """Say where programs run: in the kernel, or not at all (and why)."""
    from hybrid.user.attach.agent import userspace_kind

    if chosen is not None:
        return
    if obj.kernel is not None:
        print("hybrid: in the kernel: %s" % ", ".join(
            "%s (%s)" % (n, p.section) for n, p in sorted(obj.kernel.programs.items())), file=sys.stderr)
    for why in obj.unavailable.values():
        print("hybrid: not attached: %s" % why, file=sys.stderr)
    names = sorted(n for n, lp in obj.programs.items() if n not in obj.unavailable
                   and (userspace_kind(lp) is None or lp.attach_target is None))
    if names:
        print("hybrid: not attached (no attach point in a process or the kernel): %s" % ", ".join(
            "%s (%s)" % (n, obj.programs[n].section) for n in names), file=sys.stderr)


def _load_for_attach(args: argparse.Namespace):
    import hybrid

    kernel = False if args.no_kernel else (args.kernel or None)
    return hybrid.load(args.object, kernel=kernel)


TOOLS_DIR = Path(__file__).resolve().parent.parent / "tools" / "bcc_ports"


def _tool(args: argparse.Namespace) -> int:
    """``hybrid tool NAME ARGS``: a ported bcc tool (tools/bcc_ports/NAME.py), its own options after the name."""
    import importlib

    names = sorted(p.stem for p in TOOLS_DIR.glob("*.py") if not p.stem.startswith("_") and p.stem != "common")
    if args.name not in names:
        raise HybridError("no tool %r (tools: %s)" % (args.name, ", ".join(names) or "none"))
    root = str(TOOLS_DIR.parent.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    module = importlib.import_module("tools.bcc_ports.%s" % args.name)
    return module.main(list(args.args))


def _bcc(args: argparse.Namespace) -> int:
    """``hybrid bcc -- TOOL ARGS``: an unmodified bcc tool, its uprobes in the traced process (hybrid/compat/bcc.py)."""
    from hybrid.compat.bcc import exec_tool

    command = list(args.cmd)
    if command and command[0] == "--":
        command = command[1:]
    exec_tool(command, mode=args.mode, interval=args.sync, verbose=args.verbose)  # returns only on an error
    return 2


def _load(args: argparse.Namespace) -> int:
    """``hybrid load -- LOADER ARGS``: an unmodified libbpf program, its uprobes/USDT/syscall probes in userspace."""
    from hybrid.compat.load import run_loader

    command = list(args.cmd)
    if command and command[0] == "--":
        command = command[1:]
    return run_loader(command, kernel=args.kernel, verbose=args.verbose)


def _host_run(command: list[str], verbose: bool) -> int:
    """``hybrid run -- CMD`` (no object): CMD runs the agent, and `hybrid load` sessions' probes reach it."""
    from hybrid.compat.load import run_host

    return run_host(command, verbose=verbose)


def _host_run_argv(argv: list[str]) -> tuple[list[str], bool] | None:
    """``run [-v] -- CMD ARGS`` (no object before ``--``): the command and -v; None for anything else."""
    if not argv or argv[0] != "run":
        return None
    rest, verbose = argv[1:], False
    while rest and rest[0] in ("-v", "--verbose"):
        rest, verbose = rest[1:], True
    return (rest[1:], verbose) if rest and rest[0] == "--" else None


def _attach_host(args: argparse.Namespace) -> int:
    """``hybrid attach -p PID`` (no object): the process takes the probes of `hybrid load` sessions."""
    from hybrid import registry
    from hybrid.compat.load import announce_host
    from hybrid.user.attach.agent import _check_pid

    _check_pid(args.pid)
    registry.add_host(args.pid)
    problems = announce_host(args.pid)
    for p in problems:
        print("hybrid attach: %s" % p, file=sys.stderr)
    print("hybrid: process %d takes the probes of hybrid load sessions (hybrid detach -p %d removes them)"
          % (args.pid, args.pid), file=sys.stderr)
    return 1 if problems else 0


def _xdp_attach(args: argparse.Namespace) -> int:
    from hybrid.xdp.cli import attach

    return attach(args)


def _features(args: argparse.Namespace) -> int:
    import json

    from hybrid.kernel import features

    rows = features.summary()
    if args.json:
        print(json.dumps([{"feature": f.name, "available": f.available, "detail": f.detail} for f in rows], indent=1))
        return 0
    width = max(len(f.name) for f in rows)
    for f in rows:
        print("%-*s  %-3s  %s" % (width, f.name, "yes" if f.available else "no", f.detail))
    return 0


def _attach_run(args: argparse.Namespace) -> int:
    import hybrid

    command = list(args.cmd)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise HybridError("hybrid run: no command given (hybrid run OBJ -- CMD ARGS)")
    with _load_for_attach(args) as obj:
        _note_skipped(obj, args.prog)
        with obj.launch(command, programs=args.prog or None) as proc:
            if args.verbose and proc.attachment is not None:
                for pl in proc.attachment.placements:
                    print("hybrid: %s %s at %s" % (pl.kind, pl.program, pl.where), file=sys.stderr)
            try:
                rc = proc.wait()
            except KeyboardInterrupt:
                proc.popen.send_signal(2)
                rc = proc.wait()
        obj.sync()
        if not args.quiet:
            _print_maps(obj)
    return rc if rc >= 0 else 128 - rc


def _attach_pid(args: argparse.Namespace) -> int:
    import time

    if args.object is None:
        return _attach_host(args)
    with _load_for_attach(args) as obj:
        _note_skipped(obj, args.prog)
        att = obj.attach(args.pid, programs=args.prog or None)
        for pl in att.placements:
            print("hybrid: %s %s at %s in process %d" % (pl.kind, pl.program, pl.where, args.pid), file=sys.stderr)
        print("hybrid: attached; Ctrl-C to detach", file=sys.stderr)
        deadline = time.monotonic() + args.duration if args.duration else None
        try:
            while deadline is None or time.monotonic() < deadline:
                if not os.path.exists("/proc/%d" % args.pid):
                    break
                time.sleep(0.1)
        except KeyboardInterrupt:
            pass
        att.detach()
        print("hybrid: detached", file=sys.stderr)
        obj.sync()
        if not args.quiet:
            _print_maps(obj)
    return 0


def _detach_pid(args: argparse.Namespace) -> int:
    from hybrid import inspection

    if args.link is not None:
        lk = inspection.detach_link(args.link)
        print("hybrid: link %d detached (%s %s in process %s)" % (args.link, lk["kind"], lk["program"],
                                                                   lk.get("pid")), file=sys.stderr)
        return 0
    if args.pid is None:
        raise HybridError("hybrid detach: give -p PID (every probe in the process) or --link ID")
    n = inspection.detach_process(args.pid)
    print("hybrid: process %d: every probe detached" % args.pid, file=sys.stderr)
    return 0 if n >= 0 else 1


def _inspect(args: argparse.Namespace) -> int:
    """``hybrid prog list``, ``map list``, ``map dump``, ``link list`` (see hybrid/inspection.py)."""
    from hybrid import inspection, registry

    scan = registry.scan()
    for note in scan.notes:
        print("hybrid: %s" % note, file=sys.stderr)
    what = args.inspect
    if what == "dump":
        row, entries = inspection.dump_map(args.map, scan)
        print(inspection.to_json({**row, "entries": entries}) if args.json else inspection.format_dump(row, entries))
        return 0
    rows = {"progs": inspection.programs, "maps": inspection.maps, "links": inspection.links}[what](scan)
    if args.json:
        print(inspection.to_json(rows))
    elif rows:
        print({"progs": inspection.format_programs, "maps": inspection.format_maps,
               "links": inspection.format_links}[what](rows))
    return 0


def _stats(args: argparse.Namespace) -> int:
    from hybrid import inspection

    if args.state == "status":
        from hybrid import registry

        print("hybrid: run-time statistics are %s for new objects; kernel.bpf_stats_enabled is %s"
              % ("on" if registry.stats_default() else "off",
                 {True: "1", False: "0", None: "unknown"}[inspection.kernel_stats_enabled()]))
        return 0
    n = inspection.set_stats(args.state == "on")
    print("hybrid: run-time statistics %s (%d loaded object%s, and objects loaded from now on)"
          % (args.state, n, "" if n == 1 else "s"), file=sys.stderr)
    if args.state == "on" and inspection.kernel_stats_enabled() is False:
        print("hybrid: programs in the kernel are counted while kernel.bpf_stats_enabled is 1 "
              "(sysctl -w kernel.bpf_stats_enabled=1)", file=sys.stderr)
    return 0


def _aot_build(args: argparse.Namespace) -> int:
    from hybrid.standalone import build

    values = {}
    for item in args.value:
        name, sep, value = item.partition("=")
        try:
            values[name] = int(value, 0)
        except ValueError:
            sep = ""
        if not sep or not name:
            raise HybridError("--value %r: want NAME=INTEGER" % item)
    llvm_ir = args.emit_llvm if args.emit_llvm != "" else args.output + ".ll"
    built = build(args.object, args.output, program=args.program, lib=args.lib, name=args.name,
                  emit_llvm=llvm_ir, native=args.native, values=values or None)
    print("%s: program %s%s%s" % (built.path, built.programs[0],
                                  " (tail calls: %s)" % ", ".join(built.programs[1:]) if built.programs[1:] else "",
                                  ", header %s" % built.header if built.header else ""))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hybrid", description="A kernel-cooperative eBPF runtime.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    engines = ("interp", "jit", "aot")

    c = sub.add_parser("conformance", help="run bpf_conformance .data vectors")
    c.add_argument("directory", help="folder of .data files")
    c.add_argument("--engine", choices=engines, default="interp")
    c.add_argument("-v", "--verbose", action="store_true", help="print passing vectors too")
    c.set_defaults(func=_conformance)

    d = sub.add_parser("disasm", help="disassemble raw eBPF bytecode")
    d.add_argument("file", help="bytecode file, or - for standard input")
    d.set_defaults(func=_disasm)

    a = sub.add_parser("asm", help="assemble text into raw eBPF bytecode")
    a.add_argument("file", help="assembler text, or - for standard input")
    a.add_argument("-o", "--output", help="write the bytecode here (default: standard output)")
    a.set_defaults(func=_asm)

    prog = sub.add_parser("prog", help="programs: run one once, list the loaded ones")
    prog_sub = prog.add_subparsers(dest="prog_command", required=True, metavar="ACTION")
    r = prog_sub.add_parser("run", help="verify and run a program once, print r0")
    r.add_argument("file", help="raw bytecode or a clang-compiled ELF object, or - for standard input")
    r.add_argument("--engine", choices=engines, default="jit")
    r.add_argument("--mem", help="input memory as hex bytes (r1 points at it, r2 is its length)")
    r.add_argument("-p", "--program", help="with an ELF object: the program to run (needed when it has several)")
    r.set_defaults(func=_run)
    pl = prog_sub.add_parser("list", aliases=["show"], help="every loaded program, where it runs, its run counts")
    pl.add_argument("--json", action="store_true", help="print JSON")
    pl.set_defaults(func=_inspect, inspect="progs")

    mp = sub.add_parser("map", help="maps: list, dump")
    mp_sub = mp.add_subparsers(dest="map_command", required=True, metavar="ACTION")
    ml = mp_sub.add_parser("list", aliases=["show"], help="every map of every loaded object")
    ml.add_argument("--json", action="store_true", help="print JSON")
    ml.set_defaults(func=_inspect, inspect="maps")
    md = mp_sub.add_parser("dump", help="the keys and values of one map (read-only)")
    md.add_argument("map", metavar="NAME|ID", help="the map's id (hybrid map list), or its name if only one has it")
    md.add_argument("--json", action="store_true", help="print JSON")
    md.set_defaults(func=_inspect, inspect="dump")

    lk = sub.add_parser("link", help="links: list")
    lk_sub = lk.add_subparsers(dest="link_command", required=True, metavar="ACTION")
    ll = lk_sub.add_parser("list", aliases=["show"], help="every attached program: where, in which process")
    ll.add_argument("--json", action="store_true", help="print JSON")
    ll.set_defaults(func=_inspect, inspect="links")

    st = sub.add_parser("stats", help="measure the run time of programs (on/off), like kernel.bpf_stats_enabled")
    st.add_argument("state", choices=("on", "off", "status"))
    st.set_defaults(func=_stats)

    run = sub.add_parser("run", help="run a command with an object's userspace probes attached from its start",
                         usage="hybrid run [-h] [--prog NAME] [-q] [-v] OBJ -- CMD [ARGS...]\n"
                               "       hybrid run [-v] -- CMD [ARGS...]   (the agent only: hybrid load's probes reach it)",
                         epilog="example: hybrid run count.bpf.o -- ./server --port 8080")
    run.add_argument("object", help="clang-compiled eBPF object (uprobe/uretprobe/usdt/syscall programs)")
    run.add_argument("cmd", nargs=argparse.REMAINDER, help="the command and its arguments, after --")
    run.add_argument("--prog", action="append", help="attach only this program (repeatable)")
    run.add_argument("-q", "--quiet", action="store_true", help="do not print the maps at exit")
    run.add_argument("-v", "--verbose", action="store_true", help="print where each program is attached")
    _placement_options(run)
    run.set_defaults(func=_attach_run)

    at = sub.add_parser("attach", help="attach an object's userspace probes to a running process",
                        epilog="example: hybrid attach count.bpf.o -p 1234   (Ctrl-C detaches)")
    at.add_argument("object", nargs="?", help="clang-compiled eBPF object (none: the process takes the probes of "
                                                "hybrid load sessions)")
    at.add_argument("-p", "--pid", type=int, required=True, help="the process to trace")
    at.add_argument("--prog", action="append", help="attach only this program (repeatable)")
    at.add_argument("-d", "--duration", type=float, help="detach after this many seconds (default: at Ctrl-C)")
    at.add_argument("-q", "--quiet", action="store_true", help="do not print the maps after detaching")
    _placement_options(at)
    at.set_defaults(func=_attach_pid)

    de = sub.add_parser("detach", help="remove every probe hybrid placed in a process, or one link")
    de.add_argument("-p", "--pid", type=int, help="the traced process: remove every probe in it")
    de.add_argument("--link", type=int, metavar="ID", help="remove this link only (hybrid link list)")
    de.set_defaults(func=_detach_pid)

    to = sub.add_parser("tool", help="run a ported bcc tool (opensnoop, funclatency, memleak, syscount)",
                        usage="hybrid tool NAME [TOOL OPTIONS...]",
                        epilog="example: hybrid tool funclatency -p 1234 c:malloc")
    to.add_argument("name", help="the tool")
    to.add_argument("args", nargs=argparse.REMAINDER, help="the tool's own options (see hybrid tool NAME -h)")
    to.set_defaults(func=_tool)

    bc = sub.add_parser("bcc", help="run an unmodified bcc tool with its uprobes inside the traced process",
                        usage="hybrid bcc [--mode user|kernel] [--sync SECONDS] [-v] -- TOOL [ARGS...]",
                        epilog="example: hybrid bcc -- funclatency-bpfcc -p 1234 /path/prog:work")
    bc.add_argument("--mode", choices=("user", "kernel"), default="user",
                    help="user (default): uprobes of a traced process (-p) run in it; kernel: every probe in "
                         "the kernel, as bcc alone")
    bc.add_argument("--sync", type=float, default=0.1, metavar="SECONDS",
                    help="push the userspace maps to bcc's kernel maps this often (default 0.1; the tool "
                         "itself reads the userspace maps: exact at any time)")
    bc.add_argument("-v", "--verbose", action="store_true", help="say where each probe runs")
    bc.add_argument("cmd", nargs=argparse.REMAINDER, help="the tool (searched in PATH) and its arguments, after --")
    bc.set_defaults(func=_bcc)

    lo = sub.add_parser("load", help="run an unmodified libbpf program with its uprobes, USDT and syscall probes "
                                     "in the traced processes",
                        usage="hybrid load [--kernel] [-v] -- LOADER [ARGS...]",
                        epilog="example: hybrid run -- ./server &  hybrid load -- ./uprobe_tool -p $!")
    lo.add_argument("--kernel", action="store_true", help="run the loader as it is, every probe in the kernel")
    lo.add_argument("-v", "--verbose", action="store_true", help="say where each probe runs")
    lo.add_argument("cmd", nargs=argparse.REMAINDER, help="the loader and its arguments, after --")
    lo.set_defaults(func=_load)

    fe = sub.add_parser("features", help="what the running kernel can do (kprobes, fentry, ring buffers...)")
    fe.add_argument("--json", action="store_true", help="print JSON")
    fe.set_defaults(func=_features)

    from hybrid.xdp.cli import add_parser as _xdp_parser

    _xdp_parser(sub, _xdp_attach)

    ao = sub.add_parser("aot", help="ahead-of-time compile a program into a standalone executable or library")
    ao_sub = ao.add_subparsers(dest="aot_command", required=True, metavar="ACTION")
    ab = ao_sub.add_parser("build", help="a program with its maps and helpers as a binary that needs only libc",
                           epilog="example: hybrid aot build count.bpf.o -p count -o count && ./count ctx.bin")
    ab.add_argument("object", help="clang-compiled eBPF object")
    ab.add_argument("-p", "--program", help="the program to build (needed when the object has several)")
    ab.add_argument("-o", "--output", required=True, help="the executable (or with --lib the .so) to write")
    ab.add_argument("--lib", action="store_true",
                    help="a shared library and its C header (OUTPUT with .h), not an executable")
    ab.add_argument("--name", help="with --lib: the prefix of its C functions (default: from OUTPUT, "
                                   "libcount.so -> count_run ...)")
    ab.add_argument("--emit-llvm", nargs="?", const="", metavar="FILE",
                    help="also write the optimized LLVM IR (default FILE: OUTPUT.ll)")
    ab.add_argument("--native", action="store_true", help="code for this machine's CPU (default: any x86-64)")
    ab.add_argument("--value", action="append", default=[], metavar="NAME=INT",
                    help="set a const volatile global before building (repeatable)")
    ab.set_defaults(func=_aot_build)
    return p


def _placement_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kernel", action="append", metavar="PROG",
                   help="run this program in the kernel (repeatable; e.g. a raw_tp/sys_enter counter, or a "
                        "uprobe as a kernel uprobe for comparison)")
    p.add_argument("--no-kernel", action="store_true",
                   help="load nothing into the kernel (kernel-only programs stay unattached)")


def main(argv: list[str] | None = None) -> int:
    host = _host_run_argv(sys.argv[1:] if argv is None else list(argv))
    args = build_parser().parse_args(argv) if host is None else None
    try:
        if host is not None:
            return _host_run(*host)
        return args.func(args)
    except HybridError as e:
        print("hybrid: %s: %s" % (type(e).__name__, e), file=sys.stderr)
        return 2
    except OSError as e:
        print("hybrid: %s" % e, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
