#!/usr/bin/env python3
"""memleak: outstanding allocations and their stacks -- a drop-in port of bcc's memleak (0.26) onto hybrid.

The options and the output are bcc's.  For a process (``-p PID``) or a
command (``-c CMD``) the allocator probes -- uprobes and uretprobes on
malloc, calloc, realloc, mmap, posix_memalign, valloc, memalign, pvalloc,
aligned_alloc, free and munmap of the allocator's object (``-O``, libc by
default) -- run *inside* the process with hybrid: tens of nanoseconds per
call where the kernel's uprobes cost microseconds, which is what made
memleak unusable on allocation-heavy programs.  ``--mode kernel`` runs the
same programs as kernel uprobes.  Without a target, kernel allocations are
traced on the kmem (or, ``--percpu``, percpu) tracepoints in the kernel, as
bcc does.

Stacks come from ``bpf_get_stackid(ctx, &stack_traces, BPF_F_USER_STACK)``
(frame pointers, like the kernel's), symbolized from the process's
/proc/PID/maps and its ELF symbols.

Differences from bcc, all deliberate: ``--mode`` is new; ``-c`` starts the
command with the probes already in place (bcc attaches after it started,
missing its first allocations); Ctrl-C detaches and prints a last report
(bcc exits without one); the tool ends with a last report when the traced
process exits (bcc goes on printing the same table); ``--combined-only``
prints what bcc 0.26 meant to print (its code raises AttributeError: it
calls ``.decode()`` on a list).
"""

from __future__ import annotations

import argparse
import os
import resource
import shlex
import signal
import struct
import sys
import tempfile
import time
from datetime import datetime

if __package__ in (None, ""):  # run as a script: .venv/bin/python tools/bcc_ports/memleak.py
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _snoop_util as util  # type: ignore
else:
    from . import _snoop_util as util

util.ensure_importable()

PROG = "memleak"

examples = """
EXAMPLES:

./memleak -p $(pidof allocs)
        Trace allocations and display a summary of "leaked" (outstanding)
        allocations every 5 seconds
./memleak -p $(pidof allocs) -t
        Trace allocations and display each individual allocator function call
./memleak -ap $(pidof allocs) 10
        Trace allocations and display allocated addresses, sizes, and stacks
        every 10 seconds for outstanding allocations
./memleak -c "./allocs"
        Run the specified command and trace its allocations
./memleak
        Trace allocations in kernel mode and display a summary of outstanding
        allocations every 5 seconds
./memleak -o 60000
        Trace allocations in kernel mode and display a summary of outstanding
        allocations that are at least one minute (60 seconds) old
./memleak -s 5
        Trace roughly every 5th allocation, to reduce overhead
./memleak -c "./allocs" --mode kernel
        The same probes as kernel uprobes instead of inside the process (hybrid)
./memleak -o 0 -- ./allocs --size 100
        Run a command given after -- (hybrid; the same as -c)
"""

description = """
Trace outstanding memory allocations that weren't freed.
Supports both user-mode allocations made with libc functions and kernel-mode
allocations made with kmalloc/kmem_cache_alloc/get_free_pages and corresponding
memory release functions.
"""

# (function, required): bcc's attach_probes list; valloc, pvalloc and aligned_alloc may fail.
ALLOC_FUNCS = (("malloc", True), ("calloc", True), ("realloc", True), ("mmap", True),
               ("posix_memalign", True), ("valloc", False), ("memalign", True), ("pvalloc", False),
               ("aligned_alloc", False))
FREE_FUNCS = ("free", "munmap")
BPF_F_USER_STACK = 1 << 8
ALLOC_INFO = struct.Struct("<QQi4x")    # struct alloc_info_t
COMBINED_INFO = struct.Struct("<QQ")    # struct combined_alloc_info_t


class Allocation(object):
    def __init__(self, stack, size):
        self.stack = stack
        self.count = 1
        self.size = size

    def update(self, size):
        self.count += 1
        self.size += size


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=examples)
    parser.add_argument("-p", "--pid", type=int, default=-1,
                        help="the PID to trace; if not specified, trace kernel allocs")
    parser.add_argument("-t", "--trace", action="store_true",
                        help="print trace messages for each alloc/free call")
    parser.add_argument("interval", nargs="?", default=5, type=int,
                        help="interval in seconds to print outstanding allocations")
    parser.add_argument("count", nargs="?", type=int,
                        help="number of times to print the report before exiting")
    parser.add_argument("-a", "--show-allocs", default=False, action="store_true",
                        help="show allocation addresses and sizes as well as call stacks")
    parser.add_argument("-o", "--older", default=500, type=int,
                        help="prune allocations younger than this age in milliseconds")
    parser.add_argument("-c", "--command",
                        help="execute and trace the specified command")
    parser.add_argument("--combined-only", default=False, action="store_true",
                        help="show combined allocation statistics only")
    parser.add_argument("--wa-missing-free", default=False, action="store_true",
                        help="Workaround to alleviate misjudgments when free is missing")
    parser.add_argument("-s", "--sample-rate", default=1, type=int,
                        help="sample every N-th allocation to decrease the overhead")
    parser.add_argument("-T", "--top", type=int, default=10,
                        help="display only this many top allocating stacks (by size)")
    parser.add_argument("-z", "--min-size", type=int,
                        help="capture only allocations larger than this size")
    parser.add_argument("-Z", "--max-size", type=int,
                        help="capture only allocations smaller than this size")
    parser.add_argument("-O", "--obj", type=str, default="c",
                        help="attach to allocator functions in the specified object")
    parser.add_argument("--ebpf", action="store_true",
                        help=argparse.SUPPRESS)
    parser.add_argument("--percpu", default=False, action="store_true",
                        help="trace percpu allocations")
    parser.add_argument("--mode", choices=("user", "kernel"), default="user",
                        help="where the allocator probes run (hybrid): user = inside the process "
                             "(default), kernel = kernel uprobes")
    usage = parser.format_usage()[len("usage: "):].rstrip("\n")
    parser.usage = usage + " [-- COMMAND [ARG ...]]"
    return parser


# --- the allocator's object (bcc's -O) ----------------------------------------------


def resolve_obj(name: str, pid: int | None) -> str:
    """The file bcc's ``-O NAME`` means: a path, or library ``libNAME.so*`` (the one mapped in ``pid``
    first, then the ld.so cache), or a library/executable name as hybrid finds it."""
    from hybrid.errors import HybridError
    from hybrid.user.attach import symbols

    if "/" in name:
        path = os.path.abspath(name)
        if not os.path.isfile(path):
            raise util.ToolError("-O %s: no such file" % name)
        return os.path.realpath(path)
    prefixes = ("lib%s.so" % name, "lib%s-" % name)
    if pid is not None:
        try:
            mapped = symbols._maps_paths(pid)
        except HybridError:
            mapped = []
        for p in mapped:
            base = os.path.basename(p)
            if base == name or base.startswith(prefixes):
                return os.path.realpath(p)
    for soname, p in symbols._ldconfig_entries():
        if soname.startswith(prefixes[0]) and os.path.isfile(p):
            return os.path.realpath(p)
    try:
        return os.path.realpath(symbols.find_library(name, pid))
    except HybridError:
        raise util.ToolError("-O %s: cannot find the object (lib%s.so or %s)" % (name, name, name)) from None


def available_functions(path: str) -> dict[str, bool]:
    """Which allocator functions ``path`` defines; a required one missing is a ToolError."""
    from hybrid.errors import HybridError
    from hybrid.user.attach import symbols

    have = {}
    for fn, required in ALLOC_FUNCS + tuple((f, True) for f in FREE_FUNCS):
        try:
            sym = symbols.resolve_symbol(path, fn)
            have[fn] = sym.kind in ("FUNC", "IFUNC", "NOTYPE")
        except HybridError:
            have[fn] = False
        if required and not have[fn]:
            raise util.ToolError("%s has no function %s" % (path, fn))
    return have


# --- the tool -----------------------------------------------------------------------


class Tool:
    def __init__(self, args):
        self.args = args
        self.pid = args.pid
        self.command = args.command
        self.kernel_trace = (self.pid == -1 and self.command is None)
        self.min_age_ns = 1e6 * args.older
        self.obj_path = None
        self.have: dict[str, bool] = {}
        self.obj = None
        self.links: list = []
        self.att = None
        self.launched = None
        self.held = None
        self.syms = None
        self.trace_path = None
        self.tail = None
        self.libc_path = None
        self._refreshed = 0.0

    # configuration -----------------------------------------------------------------

    def resolve(self) -> None:
        if self.kernel_trace:
            return
        if self.pid != -1:
            util.check_pid(self.pid)
        else:
            util.check_command(shlex.split(self.command))
        self.obj_path = resolve_obj(self.args.obj, self.pid if self.pid != -1 else None)
        self.have = available_functions(self.obj_path)
        if self.command is not None:
            try:
                self.libc_path = resolve_obj("c", None)
            except util.ToolError:
                self.libc_path = None  # no libc to stop the command in: stacks may print unnamed

    def defines(self) -> tuple[str, ...]:
        if self.kernel_trace:
            return ("KERNEL_TRACE",) + (("PERCPU",) if self.args.percpu else ())
        d = ['OBJ="%s"' % (self.obj_path or "libc.so.6")]
        d += ["HAVE_%s" % fn for fn, required in ALLOC_FUNCS if not required and self.have.get(fn, True)]
        if self.command is not None and self.libc_path:
            d += ["STOP_AT_EXIT", 'LIBC="%s"' % self.libc_path]
        if self.args.mode == "user":
            d.append("STACK_WALK")
        return tuple(d)

    def values(self) -> dict:
        a = self.args
        return {
            "trace_all": bool(a.trace),
            "sample_every_n": a.sample_rate,
            "min_size": a.min_size if a.min_size is not None else 0,
            "max_size": a.max_size if a.max_size is not None else (1 << 64) - 1,
            "stack_flags": 0 if self.kernel_trace else BPF_F_USER_STACK,
            "wa_missing_free": bool(a.wa_missing_free) if self.kernel_trace else False,
            "page_size": resource.getpagesize(),
        }

    # attaching ---------------------------------------------------------------------

    def start(self) -> None:
        import hybrid
        from hybrid.errors import HybridError

        path = util.build("memleak", self.defines())
        kernel = self.kernel_trace or self.args.mode == "kernel"
        env = None
        if self.args.trace and not kernel and self.command is not None:
            d = tempfile.mkdtemp(prefix="memleak-trace-")
            self.trace_path = os.path.join(d, "trace")
            open(self.trace_path, "wb").close()
            env = dict(os.environ, HYBRID_TRACE_PIPE=self.trace_path)
        if self.args.trace:
            if self.trace_path is not None:  # our own file, given to the command: read it all
                self.tail = util.TraceTail(self.trace_path, from_start=True)
            else:
                self.trace_path = util.tracefs_pipe() if kernel else util.hybrid_trace_sink(
                    self.pid if self.pid != -1 else None)
                self.tail = util.TraceTail(self.trace_path)
        try:
            self.obj = hybrid.load(path, kernel=kernel, values=self.values())
            if self.kernel_trace:
                print("Attaching to kernel allocators, Ctrl+C to quit.")
                sys.stdout.flush()
                self.links = self.obj.attach_kernel()
                return
            if self.command is not None:
                argv = shlex.split(self.command)
                if kernel:  # kernel uprobes need the pid: the command waits, stopped at exec
                    self.held, release = util.spawn_stopped(argv)
                    self.pid = self.held.pid
                    print("Attaching to pid %d, Ctrl+C to quit." % self.pid)
                    sys.stdout.flush()
                    try:
                        self.links = self.obj.attach_kernel(self.pid)
                    except BaseException:
                        self.held.kill()  # never let it run untraced
                        raise
                    finally:
                        release()
                else:
                    self.launched = self.obj.launch(argv, env=env)
                    self.pid = self.launched.pid
                    print("Attaching to pid %d, Ctrl+C to quit." % self.pid)
                    sys.stdout.flush()
            else:
                print("Attaching to pid %d, Ctrl+C to quit." % self.pid)
                sys.stdout.flush()
                if kernel:
                    self.links = self.obj.attach_kernel(self.pid)
                else:
                    self.att = self.obj.attach(self.pid)
        except HybridError as e:
            raise util.ToolError(util.one_line(e)) from None
        self.syms = util.ProcSyms(self.pid)

    def child(self):
        if self.launched is not None:
            return self.launched.popen
        return self.held

    def continue_if_exiting(self) -> None:
        """A command we started stops itself in _exit (STOP_AT_EXIT): read its maps, let it go on."""
        c = self.child()
        if c is None or self.libc_path is None or c.poll() is not None:
            return
        try:
            with open("/proc/%d/stat" % c.pid) as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return
        if state == "T":
            if self.syms is not None:
                self.syms.refresh()
            os.kill(c.pid, signal.SIGCONT)

    def target_gone(self) -> bool:
        if self.kernel_trace:
            return False
        c = self.child()
        if c is not None:
            return c.poll() is not None
        return not util.process_alive(self.pid)

    def detach(self) -> None:
        if self.syms is not None and not self.target_gone():
            self.syms.refresh()
        if self.launched is not None:
            self.launched.detach()
        if self.att is not None:
            self.att.detach()
            self.att = None
        for link in self.links:
            link.close()
        self.links = []

    def close(self) -> None:
        try:
            self.continue_if_exiting()
            self.detach()
        finally:
            if self.obj is not None:
                self.obj.close()
                self.obj = None
            c = self.child()
            if c is not None and c.poll() is not None:
                c.wait()
            if self.trace_path and self.trace_path.startswith(tempfile.gettempdir()):
                import shutil

                shutil.rmtree(os.path.dirname(self.trace_path), ignore_errors=True)

    # reports (bcc's print_outstanding and print_outstanding_combined) -----------------

    def _stack(self, stack_id: int) -> list[int] | None:
        m = self.obj.maps["stack_traces"]
        if not 0 <= stack_id < 1 << 31:
            return None
        raw = m.lookup(stack_id.to_bytes(4, "little"))
        if raw is None:
            return None
        ips = []
        for i in range(0, len(raw), 8):
            ip = int.from_bytes(raw[i:i + 8], "little")
            if ip == 0:
                break
            ips.append(ip)
        return ips

    def _from_agent(self, ips: list[int] | None) -> bool:
        """An allocation hybrid's agent made inside the traced process (not the program's): not reported."""
        if self.kernel_trace or not ips:
            return False
        _, _, module = self.syms.resolve(ips[0])
        return module is not None and os.path.basename(module).startswith("libhybrid_agent")

    def _sym(self, addr: int) -> str:
        if self.kernel_trace:
            if not hasattr(self, "_ksyms"):
                self._ksyms = util.KernelSyms()
            return self._ksyms.sym(addr)
        return self.syms.sym(addr)

    def print_outstanding(self, out, snap: dict | None = None) -> None:
        a = self.args
        out.write("[%s] Top %d stacks with outstanding allocations:\n" % (datetime.now().strftime("%H:%M:%S"),
                                                                          a.top))
        alloc_info = {}
        agent: set[int] = set()
        allocs = snap["allocs"] if snap is not None else self.snapshot()["allocs"]
        now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        for address, size, ts, stack_id in sorted(allocs, key=lambda x: x[1]):
            if now - self.min_age_ns < ts:
                continue
            if stack_id < 0 or stack_id in agent:
                continue
            if stack_id in alloc_info:
                alloc_info[stack_id].update(size)
            else:
                stack = self._stack(stack_id) or []
                if self._from_agent(stack):
                    agent.add(stack_id)
                    continue
                combined = ["0x" + format(addr, "016x") + "\t" + self._sym(addr) for addr in stack]
                alloc_info[stack_id] = Allocation(combined, size)
            if a.show_allocs:
                out.write("\taddr = %x size = %s\n" % (address, size))
        to_show = sorted(alloc_info.values(), key=lambda x: x.size)[-a.top:]
        for alloc in to_show:
            out.write("\t%d bytes in %d allocations from stack\n\t\t%s\n" %
                      (alloc.size, alloc.count, "\n\t\t".join(alloc.stack)))

    def print_outstanding_combined(self, out, snap: dict | None = None) -> None:
        a = self.args
        stacks = list(snap["combined"] if snap is not None else self.snapshot()["combined"])
        stacks.sort(key=lambda s: -s[1])
        cnt = 1
        entries = []
        for stack_id, total, number in stacks:
            ips = self._stack(stack_id)
            if self._from_agent(ips):
                continue
            trace = "stack information lost" if ips is None else "\n\t\t".join(self._sym(x) for x in ips)
            entries.append("\t%d bytes in %d allocations from stack\n\t\t%s" % (total, number, trace))
            cnt += 1
            if cnt > a.top:
                break
        out.write("[%s] Top %d stacks with outstanding allocations:\n" % (datetime.now().strftime("%H:%M:%S"),
                                                                          a.top))
        out.write("\n".join(reversed(entries)) + "\n")

    def snapshot(self) -> dict:
        """The maps a report reads, copied (taken before a detach, printed after it)."""
        snap: dict = {"allocs": [], "combined": []}
        if self.args.combined_only:
            for k, v in self.obj.maps["combined_allocs"].items():
                total, number = COMBINED_INFO.unpack(v)
                snap["combined"].append((int.from_bytes(k, "little"), total, number))
        else:
            for k, v in self.obj.maps["allocs"].items():
                size, ts, stack_id = ALLOC_INFO.unpack(v)
                snap["allocs"].append((int.from_bytes(k, "little"), size, ts, stack_id))
        return snap

    def report(self, snap: dict | None = None) -> None:
        out = sys.stdout
        if self.args.combined_only:
            self.print_outstanding_combined(out, snap)
        else:
            self.print_outstanding(out, snap)
        out.flush()

    def final_report(self) -> None:
        """Detach, then print what was outstanding when the tool stopped (the agent's own detach work excluded)."""
        snap = self.snapshot()
        self.detach()
        self.report(snap)

    # main loops ------------------------------------------------------------------------

    def wait(self, seconds: float) -> bool:
        """Sleep ``seconds``; False if the target ended meanwhile."""
        end = time.monotonic() + seconds
        while True:
            if self.target_gone():
                return False
            if self.syms is not None and time.monotonic() - self._refreshed >= 0.5:
                self.syms.refresh()  # keep the maps of a live process: its stacks print after it exits
                self._refreshed = time.monotonic()
            self.continue_if_exiting()
            left = end - time.monotonic()
            if left <= 0:
                return True
            time.sleep(min(left, 0.05))

    def loop(self) -> int:
        a = self.args
        if a.trace:
            tail = self.tail or util.TraceTail(self.trace_path)
            try:
                while not self.target_gone():
                    self.continue_if_exiting()
                    for line in tail.lines(0.1):
                        fields = util.parse_trace_line(line)
                        if fields is not None:
                            print(fields)
                    sys.stdout.flush()
            except KeyboardInterrupt:
                pass
            finally:
                tail.close()
            return 0
        count_so_far = 0
        while True:
            try:
                alive = self.wait(a.interval)
                if alive:
                    self.report()
            except KeyboardInterrupt:  # bcc exits silently (or with a traceback while printing)
                self.final_report()
                return 0
            if not alive:  # the process ended: what it left outstanding, once
                self.final_report()
                return 0
            count_so_far += 1
            if a.count is not None and count_so_far >= a.count:
                return 0


def main(argv: list[str] | None = None) -> int:
    opts, command = util.split_command(sys.argv[1:] if argv is None else list(argv))
    args = build_parser().parse_args(opts)
    if command:  # hybrid: memleak [options] -- COMMAND ARGS..., the same as -c with the words quoted
        if args.command is not None:
            print("%s: give the command either with -c or after --, not both" % PROG, file=sys.stderr)
            return 1
        args.command = shlex.join(command)
    if args.min_size is not None and args.max_size is not None and args.min_size > args.max_size:
        print("min_size (-z) can't be greater than max_size (-Z)")
        return 1
    if args.sample_rate < 1:
        print("%s: -s must be at least 1" % PROG, file=sys.stderr)
        return 1
    tool = Tool(args)
    try:
        if args.command is not None and args.pid != -1:
            raise util.ToolError("give either -p or -c, not both")
        if args.mode == "kernel" and tool.kernel_trace:
            pass  # kernel allocators are always traced in the kernel
        tool.resolve()
        if args.ebpf:
            print(util.source_text("memleak", tool.defines(), tool.values()))
            return 0
        if args.command is not None:
            print("Executing '%s' and tracing the resulting process." % args.command)
            sys.stdout.flush()
        tool.start()
        return tool.loop()
    except util.ToolError as e:
        print("%s: %s" % (PROG, e), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:
        return 0
    finally:
        tool.close()


if __name__ == "__main__":
    sys.exit(main())
