#!/usr/bin/env python3
"""pyperf benchmark of attach latency: kernel uprobes (libbpf) against hybrid's agent.

How long it takes until a probe is live in another process, on a fresh
target process each repetition (``programs/attach_target.c``: ten
``noinline`` functions ``attach_fn0..9``, driven over stdin/stdout; see its
header).  One value is one repetition, in seconds (shown in ms):

``attach/<n>/kernel``
    ``bpf_program__attach_uprobe(prog, false, pid, exe, offset)`` of an
    already loaded program (``count``, a bare ``SEC("uprobe")``) at ``n``
    functions of a running target: the attach calls alone;
``attach/<n>/user``
    ``obj.attach(pid, programs=[count_0, ...])`` of an object already loaded
    and attached once before (so its AOT libraries are built): until it
    returns, the agent injected into the target through ptrace and the
    probes live (AOT code in the target);
``attach-first/10/kernel``
    the first of the ten kernel attach calls alone (the slow one, see
    :func:`summarize`);
``detach/<n>/<side>``
    ``bpf_link__destroy`` of the ``n`` links / ``Attachment.detach()``, in
    the same repetition;
``load+attach/1/<side>``
    libbpf open + load + attach, against ``hybrid.load`` + ``attach(pid)``
    of a one-program object (hybrid's first attach of an object builds its
    AOT library);
``launch/1/<side>``, ``launch/none``, ``launch/gate``
    from spawning the target until it reached ``main`` (it writes "ready"
    there) with one uprobe attached before ``main``: the kernel the way
    bpftrace ``-c`` does it (the target started through ``attach_target
    --gate``, which waits on a pipe, then execs it with the same pid; the
    uprobe is attached for that pid in between and the gate released);
    hybrid with ``obj.launch(argv)`` (the agent ``LD_PRELOAD``-ed, applying
    the spec before ``main``).  ``launch/none`` is a plain spawn without a
    probe, ``launch/gate`` a spawn through the gate without a probe,
    ``launch-returned/1/user`` until ``obj.launch`` returned.

Every probe is checked to fire outside the timed part before the next
repetition: the target calls the probed functions, the programs count the
hits in an ARRAY map (read through libbpf or hybrid's shared map), and the
count must be exactly one per call; after a detach, calls must count
nothing; a probe attached at launch must have counted the call ``main``
makes first.  The target's answers are checked too (patching must not
change what a function returns).  A probe that does not fire fails the
suite.

All values are measured in this (the parent) process as one-shots (like
bench_maps' compile times) and written as pyperf runs with ``loops`` = 1:
a value must be one attach to one fresh process, not a mean over pyperf's
calibrated loops, and a repetition yields its attach and its detach time
at once (a kernel repetition with 10 uprobes spends ~1 s in the detach:
pyperf workers calibrating each benchmark separately would take minutes).
The runner of :mod:`harness` provides the command line.  The first
repetition of each benchmark is pyperf's warmup (libraries loaded, caches
warm, hybrid's AOT libraries built).  ``--quick`` runs fewer repetitions.
Importing this module runs nothing.

Usage (normally through ``bench/run.py``)::

    python bench/bench_attach.py -o attach.json [--quick] [--quiet] [--reps N]
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

import harness  # noqa: E402
import map_programs as mp  # noqa: E402
import probe_programs as pp  # noqa: E402

SUITE = "attach"
SIDES = ("kernel", "user")
SOURCE = BENCH_DIR / "programs" / "attach_target.c"
NFUNCS = 10
FUNCS = tuple("attach_fn%d" % i for i in range(NFUNCS))
COUNTS = (1, NFUNCS)  # uprobes per attach row
GCC_FLAGS = ("-O2", "-Wall", "-Werror")
CALLS = 3  # calls of each probed function per check
TIMEOUT = 10.0  # seconds to wait for the target's answer

# processes, values, min_time for harness.make_runner (the values here are one-shots measured in the
# parent, so only its command line is used) and repetitions per benchmark (+1 warmup).
RUNNER = {False: (1, 3, 0.1), True: (1, 3, 0.02)}
REPS = {False: 20, True: 3}


class BuildError(Exception):
    """The target or its probes failed to build."""


class SideUnavailable(Exception):
    """A side cannot load or attach here."""


# --- building ------------------------------------------------------------------------


@dataclass(frozen=True)
class Artifacts:
    target: Path  # the target executable
    kernel_object: Path  # `count` in a bare SEC("uprobe")
    user_object: Path  # count_0..9 in SEC("uprobe/<target>:attach_fnN")
    user_one: Path  # count_0 only


def build(out_dir: Path | str | None = None) -> Artifacts:
    """The target and the three builds of its probes (cached by content in ``bench/build``)."""
    out = Path(out_dir) if out_dir is not None else pp.BUILD
    out.mkdir(parents=True, exist_ok=True)
    for tool in (pp.GCC, pp.CLANG):
        if shutil.which(tool) is None:
            raise BuildError("%s is not installed: cannot build %s" % (tool, SOURCE.name))
    src = SOURCE.read_bytes()
    exe = out / ("attach_target-%s" % pp._digest(pp._version(pp.GCC), " ".join(GCC_FLAGS), src))
    if not exe.exists():
        pp._build_atomic(exe, lambda tmp: [pp.GCC, *GCC_FLAGS, "-o", tmp, str(SOURCE)], "attach_target")
        os.chmod(exe, 0o755)
    check_target(exe)
    header_dir = pp.vmlinux_h(out)
    base = [*pp.CLANG_FLAGS, "-I%s" % header_dir, *mp._clang_system_includes(pp.CLANG)]

    def bpf(kind: str, defines: list[str]) -> Path:
        flags = base + defines
        obj = out / ("attach-%s-%s.bpf.o" % (kind, pp._digest(pp._version(pp.CLANG), " ".join(flags), src)))
        if not obj.exists():
            pp._build_atomic(obj, lambda tmp: [pp.CLANG, *flags, "-c", str(SOURCE), "-o", tmp],
                             "attach_target.c (%s probes)" % kind)
        return obj

    target = ['-DTARGET_EXE="%s"' % os.fspath(exe)]
    try:
        return Artifacts(exe, bpf("kernel", []), bpf("user", target), bpf("user-one", target + ["-DONE_PROBE"]))
    except pp.BuildError as e:
        raise BuildError(str(e)) from None


def check_target(exe: Path | str) -> None:
    """Every probed function is a separate function of the target (not inlined, not folded)."""
    from hybrid.user.attach.symbols import resolve_symbol

    seen = set()
    for fn in FUNCS:
        sym = resolve_symbol(str(exe), fn)
        if sym.size < 5 or sym.vaddr in seen:
            raise BuildError("%s in %s: %d bytes at %#x, expected a function of its own" % (fn, exe, sym.size,
                                                                                           sym.vaddr))
        seen.add(sym.vaddr)


def offsets(exe: Path | str) -> dict[str, int]:
    """Each probed function's file offset (libbpf's ``func_offset``)."""
    from hybrid.user.attach.symbols import resolve_symbol

    return {fn: resolve_symbol(str(exe), fn).file_offset for fn in FUNCS}


# --- the target process --------------------------------------------------------------------


class Target:
    """A running attach_target: ``call(n)`` makes it call every probed function ``n`` times."""

    def __init__(self, popen: subprocess.Popen, what: str = "target"):
        self.popen = popen
        self.pid = popen.pid
        self.what = what
        self._buf = b""
        self._sink = 0  # the target's `sink`, to check its answers

    @classmethod
    def spawn(cls, exe: Path | str) -> "Target":
        t = cls(subprocess.Popen([os.fspath(exe)], stdin=subprocess.PIPE, stdout=subprocess.PIPE))
        t.ready()
        return t

    def readline(self) -> bytes:
        fd = self.popen.stdout.fileno()
        deadline = time.monotonic() + TIMEOUT
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise RuntimeError("%s (pid %d) did not answer within %.0f s" % (self.what, self.pid, TIMEOUT))
            chunk = os.read(fd, 4096)
            if not chunk:
                raise RuntimeError("%s (pid %d) exited (status %s)" % (self.what, self.pid, self.popen.wait()))
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line

    def ready(self) -> None:
        """Wait for the target to reach main ("ready <pid>")."""
        line = self.readline()
        if line != b"ready %d" % self.pid:
            raise RuntimeError("%s (pid %d) said %r, expected 'ready %d'" % (self.what, self.pid, line, self.pid))

    def call(self, n: int) -> None:
        """Every probed function called ``n`` times; raises if the target's answer is wrong."""
        self.popen.stdin.write(b"%d\n" % n)
        self.popen.stdin.flush()
        line = self.readline()
        want, s = 0, self._sink
        for i in range(n):
            for f in range(NFUNCS):
                want += s * (f + 3) + i
                s += i
        self._sink = s
        if line != b"done %d" % want:
            raise RuntimeError("%s (pid %d) answered %r, expected 'done %d': a probe changed the target"
                               % (self.what, self.pid, line, want))

    def close(self) -> None:
        p = self.popen
        try:
            if p.stdin and not p.stdin.closed:
                p.stdin.close()
            p.wait(timeout=TIMEOUT)
        except (subprocess.TimeoutExpired, BrokenPipeError):
            p.kill()
            p.wait()
        finally:
            if p.stdout:
                p.stdout.close()


# --- the two sides -------------------------------------------------------------------


def _check_count(before: int, after: int, want: int, what: str) -> None:
    if after - before != want:
        raise RuntimeError("%s: the probes counted %d hits, expected %d: not benchmarking a probe that "
                           "does not run" % (what, after - before, want))


class KernelSide:
    """``count`` loaded by libbpf, attached with ``bpf_program__attach_uprobe`` for one pid."""

    side = "kernel"

    def __init__(self, art: Artifacts):
        self.art = art
        self.exe = os.fsencode(art.target)
        self.offsets = offsets(art.target)
        self.k = self.load()
        self.api = self.k.lib
        self.prog = self.program(self.k)

    def load(self) -> mp.KernelObject:
        try:
            k = mp.KernelObject(self.art.kernel_object, ["count"])
        except mp.KernelUnavailable as e:
            raise SideUnavailable(str(e)) from None
        pp._libbpf_attach_api(k.lib)
        return k

    @staticmethod
    def program(k: mp.KernelObject) -> int:
        prog = k.lib.bpf_object__find_program_by_name(k.obj, b"count")
        if not prog:
            raise SideUnavailable("no program `count` in the kernel object")
        return prog

    def attach(self, pid: int, n: int, prog: int | None = None) -> list[int]:
        """``count`` at attach_fn0 .. attach_fn<n - 1> for ``pid``: the links.

        ``first_seconds`` is how long the first of the attach calls took.
        """
        prog = self.prog if prog is None else prog
        links: list[int] = []
        for fn in FUNCS[:n]:
            t0 = time.perf_counter()
            link = self.api.bpf_program__attach_uprobe(prog, False, pid, self.exe, self.offsets[fn])
            if not links:
                self.first_seconds = time.perf_counter() - t0
            if not link:
                err = ctypes.get_errno() or errno.EINVAL
                self.detach(links)
                raise SideUnavailable("libbpf cannot attach a uprobe to %s+%#x for pid %d: %s"
                                      % (fn, self.offsets[fn], pid, os.strerror(err)))
            links.append(link)
        return links

    def detach(self, links: list[int]) -> None:
        for link in links:
            self.api.bpf_link__destroy(link)
        del links[:]

    def count(self, k: mp.KernelObject | None = None) -> int:
        return pp._u64((k or self.k).lookup("counts", bytes(4)))

    def close(self) -> None:
        self.k.close()


class UserSide:
    """The object loaded by ``hybrid.load``, attached with ``obj.attach(pid)`` / ``obj.launch``."""

    side = "user"

    def __init__(self, art: Artifacts):
        import hybrid

        self.art = art
        self.obj = hybrid.load(art.user_object)
        self.engine = "?"

    @staticmethod
    def programs(n: int) -> list[str]:
        return ["count_%d" % i for i in range(n)]

    def attach(self, pid: int, n: int, obj=None):
        """count_0 .. count_<n - 1> in process ``pid``: the Attachment."""
        from hybrid.errors import HybridError

        try:
            att = (obj or self.obj).attach(pid, programs=self.programs(n))
        except HybridError as e:
            raise SideUnavailable("hybrid cannot attach to pid %d: %s" % (pid, e)) from None
        self.engine = att.engine
        return att

    def count(self, obj=None) -> int:
        return pp._u64((obj or self.obj).maps["counts"].lookup(bytes(4)))

    def close(self) -> None:
        self.obj.close()


# --- one repetition of each measurement (fresh target; checked; returns name -> seconds) -----------


def bench_name(what: str, n: int | None, side: str | None) -> str:
    return "/".join(str(p) for p in (what, n, side) if p is not None)


def rep_running(side, exe: Path, n: int) -> dict[str, float]:
    """Attach ``n`` uprobes to a running target, check them, detach, check they are gone."""
    t = Target.spawn(exe)
    try:
        before = side.count()
        t0 = time.perf_counter()
        handle = side.attach(t.pid, n)
        attached = time.perf_counter() - t0
        try:
            t.call(CALLS)
            _check_count(before, side.count(), CALLS * n, "%s attach of %d uprobes" % (side.side, n))
        finally:
            t0 = time.perf_counter()
            side.detach(handle) if side.side == "kernel" else handle.detach()
            detached = time.perf_counter() - t0
        before = side.count()
        t.call(CALLS)
        _check_count(before, side.count(), 0, "%s after detaching %d uprobes" % (side.side, n))
    finally:
        t.close()
    out = {bench_name("attach", n, side.side): attached, bench_name("detach", n, side.side): detached}
    if side.side == "kernel" and n > 1:
        out[bench_name("attach-first", n, "kernel")] = side.first_seconds
    return out


def rep_load_attach(side, art: Artifacts) -> dict[str, float]:
    """Load the one-probe object and attach it to a running target (a cold start)."""
    t = Target.spawn(art.target)
    try:
        if side.side == "kernel":
            t0 = time.perf_counter()
            k = side.load()
            links = side.attach(t.pid, 1, side.program(k))
            elapsed = time.perf_counter() - t0
            try:
                before = side.count(k)
                t.call(CALLS)
                _check_count(before, side.count(k), CALLS, "kernel load + attach")
            finally:
                side.detach(links)
                k.close()
        else:
            import hybrid

            t0 = time.perf_counter()
            obj = hybrid.load(art.user_one)
            try:
                att = side.attach(t.pid, 1, obj)
                elapsed = time.perf_counter() - t0
                before = side.count(obj)
                t.call(CALLS)
                _check_count(before, side.count(obj), CALLS, "hybrid load + attach")
                att.detach()
            finally:
                obj.close()
    finally:
        t.close()
    return {bench_name("load+attach", 1, side.side): elapsed}


def _spawn_gated(exe: Path) -> tuple[Target, int]:
    """The target started through ``--gate``: waiting on a pipe before its exec; (target, write end)."""
    r, w = os.pipe()
    try:
        popen = subprocess.Popen([os.fspath(exe), "--gate", str(r), os.fspath(exe)], pass_fds=(r,),
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    except BaseException:
        os.close(w)
        raise
    finally:
        os.close(r)
    return Target(popen, "gated target"), w


def rep_launch(side, art: Artifacts) -> dict[str, float]:
    """Start the target with one uprobe attached before main; until it reached main."""
    exe = os.fspath(art.target)
    before = side.count()
    out = {}
    if side.side == "kernel":
        t0 = time.perf_counter()
        t, w = _spawn_gated(art.target)
        links: list[int] = []
        try:
            try:
                links = side.attach(t.pid, 1)
                os.write(w, b"g")
            finally:
                os.close(w)
            t.ready()
            out[bench_name("launch", 1, "kernel")] = time.perf_counter() - t0
            _check_launched(side, t, before)
        finally:
            t.close()
            side.detach(links)
    else:
        from hybrid.errors import HybridError

        t0 = time.perf_counter()
        try:
            launched = side.obj.launch([exe], programs=side.programs(1), stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE)
        except HybridError as e:
            raise SideUnavailable("hybrid cannot launch %s: %s" % (exe, e)) from None
        returned = time.perf_counter() - t0
        t = Target(launched.popen, "launched target")
        try:
            t.ready()
            out[bench_name("launch", 1, "user")] = time.perf_counter() - t0
            out["launch-returned/1/user"] = returned
            side.engine = launched.attachment.engine
            _check_launched(side, t, before)
        finally:
            t.close()
            launched.close()
    return out


def _check_launched(side, t: Target, before: int) -> None:
    # main called attach_fn0 once before saying "ready": the probe was there before main.
    _check_count(before, side.count(), 1, "%s launch: the call main makes first" % side.side)
    before = side.count()
    t.call(CALLS)
    _check_count(before, side.count(), CALLS, "%s launch" % side.side)


def rep_spawn(art: Artifacts) -> dict[str, float]:
    """The launch baselines: a plain spawn until main, and a spawn through the gate, no probe."""
    t0 = time.perf_counter()
    t = Target.spawn(art.target)
    plain = time.perf_counter() - t0
    t.close()
    t0 = time.perf_counter()
    t, w = _spawn_gated(art.target)
    os.write(w, b"g")
    os.close(w)
    t.ready()
    gated = time.perf_counter() - t0
    t.close()
    return {"launch/none": plain, "launch/gate": gated}


# --- measuring (in this process) ------------------------------------------------------------

GROUPS = ("attach/1", "attach/10", "load+attach", "launch")


def _group_names(group: str, side: str) -> list[str]:
    if group.startswith("attach/"):
        n = int(group.split("/")[1])
        return [bench_name("attach", n, side), bench_name("detach", n, side)] + \
            ([bench_name("attach-first", n, side)] if side == "kernel" and n > 1 else [])
    if group == "load+attach":
        return [bench_name("load+attach", 1, side)]
    return [bench_name("launch", 1, side)] + (["launch-returned/1/user"] if side == "user" else [])


def _rep(group: str, side, art: Artifacts) -> dict[str, float]:
    if group.startswith("attach/"):
        return rep_running(side, art.target, int(group.split("/")[1]))
    if group == "load+attach":
        return rep_load_attach(side, art)
    return rep_launch(side, art)


def open_sides(art: Artifacts, wanted: tuple[str, ...]) -> tuple[dict, dict[str, str]]:
    """The sides of ``wanted`` that load here, and why the others do not."""
    sides, missing = {}, {}
    for name in wanted:
        try:
            sides[name] = KernelSide(art) if name == "kernel" else UserSide(art)
        except SideUnavailable as e:
            missing[name] = str(e)
    return sides, missing


def measure(art: Artifacts, sides: dict, reps: int, missing: dict[str, str],
            log=None) -> dict[str, list[float]]:
    """``reps`` + 1 repetitions (the first one a warmup) of every group on every side: name -> seconds.

    A side that cannot attach (SideUnavailable) is dropped from that group, the reason
    recorded in ``missing`` under the group's benchmark names.
    """
    values: dict[str, list[float]] = {}

    def drop(group: str, side, e: SideUnavailable) -> None:
        for name in _group_names(group, side.side):
            missing[name] = str(e)
            values.pop(name, None)
        live.remove(side)

    for group in GROUPS:
        live = list(sides.values())
        t_group = time.monotonic()
        for r in range(reps + 1):
            for side in (live if r % 2 == 0 else live[::-1]):  # alternate which side goes first
                try:
                    got = _rep(group, side, art)
                except SideUnavailable as e:
                    drop(group, side, e)
                    continue
                for name, v in got.items():
                    values.setdefault(name, []).append(v)
            if group == "launch":
                for name, v in rep_spawn(art).items():
                    values.setdefault(name, []).append(v)
        if log:
            log("%s: %d repetitions in %.1f s" % (group, reps + 1, time.monotonic() - t_group))
    return values


def benchmarks(values: dict[str, list[float]], missing: dict[str, str], engine: str) -> list:
    """One pyperf Benchmark per name: the first value the warmup, one repetition per value."""
    import json

    import pyperf

    out = []
    for name, vals in values.items():
        parts = name.split("/")
        md = {"name": name, "unit": "second", "loops": 1, "hybrid_what": parts[0],
              "hybrid_side": parts[-1], "hybrid_reps": len(vals) - 1,
              "hybrid_calls_per_check": CALLS}
        if len(parts) == 3:
            md["hybrid_probes"] = int(parts[1])
        if parts[-1] == "user":
            md["hybrid_engine"] = engine
        if missing:
            md["hybrid_missing"] = json.dumps(missing, sort_keys=True)
        run = pyperf.Run(vals[1:], warmups=[(1, vals[0])], metadata=md, collect_metadata=False)
        out.append(pyperf.Benchmark([run]))
    return out


# --- the pyperf script --------------------------------------------------------------------


def _forward_args(cmd: list[str], args) -> None:
    """Arguments a pyperf worker would need (none is spawned: every value is measured in the parent)."""
    cmd.extend(("--reps", str(args.reps), "--sides", args.sides))
    if args.build_dir:
        cmd.extend(("--build-dir", args.build_dir))


def main() -> None:
    quick = harness.take_quick()
    processes, nvalues, min_time = RUNNER[quick]
    runner = harness.make_runner(quick, processes=processes, values=nvalues, min_time=min_time,
                                 add_cmdline_args=_forward_args)
    runner.argparser.description = "Attach latency: kernel uprobes (libbpf) vs hybrid's agent (ptrace, LD_PRELOAD)"
    runner.argparser.add_argument("--reps", type=int, default=REPS[quick],
                                  help="repetitions per benchmark, each on a fresh target, plus one warmup "
                                  "(default %d)" % REPS[quick])
    runner.argparser.add_argument("--sides", default=",".join(SIDES),
                                  help="comma-separated sides among %s (default: all)" % ",".join(SIDES))
    runner.argparser.add_argument("--build-dir", default=None, help="where to build (default bench/build)")
    args = runner.parse_args()
    if getattr(args, "worker", False):
        return
    wanted = tuple(s for s in args.sides.split(",") if s)
    unknown = [s for s in wanted if s not in SIDES]
    if unknown:
        runner.argparser.error("unknown side(s) %s (choose from %s)" % (", ".join(unknown), ", ".join(SIDES)))
    if args.reps < 1:
        runner.argparser.error("--reps must be at least 1")
    if args.output and os.path.exists(args.output) and not getattr(args, "append", False):
        runner.argparser.error("the JSON file %s already exists" % args.output)

    def log(msg: str) -> None:
        if not args.quiet:
            print("bench_attach: " + msg, file=sys.stderr, flush=True)

    import pyperf

    art = build(args.build_dir)
    sides, side_missing = open_sides(art, wanted)
    missing = {}
    for side, why in side_missing.items():
        log("%s side not benchmarked: %s" % (side, why))
        for group in GROUPS:
            for name in _group_names(group, side):
                missing[name] = why
    try:
        values = measure(art, sides, args.reps, missing, log)
    finally:
        for s in sides.values():
            s.close()
    engine = getattr(sides.get("user"), "engine", "?")
    for bench in benchmarks(values, missing, engine):
        if not args.quiet:
            print("%s: %s" % (bench.get_name(), bench.format_value(bench.median())), flush=True)
        if args.output:
            pyperf.add_runs(args.output, bench)


# --- rows and the summary ---------------------------------------------------------------


@dataclass(frozen=True)
class RowDef:
    name: str
    what: str  # benchmark prefix: attach, detach, load+attach, launch
    n: int
    kernel_label: str
    user_label: str


ROWS: tuple[RowDef, ...] = (
    RowDef("attach to a running process: 1 uprobe", "attach", 1,
           "libbpf attach_uprobe", "hybrid attach(pid)"),
    RowDef("attach to a running process: 10 uprobes", "attach", 10,
           "libbpf attach_uprobe ×10", "hybrid attach(pid)"),
    RowDef("load + attach to a running process: 1 uprobe", "load+attach", 1,
           "libbpf open+load+attach_uprobe", "hybrid.load + attach(pid)"),
    RowDef("launch with probes before main: 1 uprobe", "launch", 1,
           "gate, attach_uprobe, release", "hybrid launch(argv)"),
    RowDef("detach from a running process: 1 uprobe", "detach", 1,
           "bpf_link__destroy", "Attachment.detach()"),
    RowDef("detach from a running process: 10 uprobes", "detach", 10,
           "bpf_link__destroy ×10", "Attachment.detach()"),
)


def _load(json_path: Path | str) -> dict:
    from report import benchmarks

    return benchmarks(json_path)


def _missing(by_name: dict) -> dict[str, str]:
    from report import missing_sides

    return missing_sides(by_name)


def _ms(bench) -> str:
    return "—" if bench is None else "%.1f ms" % (bench.median() * 1e3)


def _engine(by_name: dict) -> str:
    for b in by_name.values():
        e = b.get_metadata().get("hybrid_engine")
        if e:
            return str(e).upper()
    return "?"


def _med_ms(bench) -> float | None:
    return None if bench is None else bench.median() * 1e3


def _note(d: RowDef, by_name: dict) -> str:
    engine = _engine(by_name)
    if d.what == "attach" and d.n == 1:
        return ("kernel: perf_event_open (uprobe PMU) + BPF link; hybrid: agent injected through ptrace, "
                "%s code in the target" % engine)
    if d.what == "attach":
        first = _med_ms(by_name.get(bench_name("attach-first", d.n, "kernel")))
        total = _med_ms(by_name.get(bench_name("attach", d.n, "kernel")))
        kernel = ""
        if first is not None and total is not None:
            kernel = "kernel: the first uprobe %.1f ms, the %d others ~%.2f ms each; " % (
                first, d.n - 1, max(0.0, total - first) / (d.n - 1))
        return kernel + "hybrid: one injection places all %d (%d %s libraries)" % (d.n, d.n, engine)
    if d.what == "detach":
        total = _med_ms(by_name.get(bench_name("detach", d.n, "kernel")))
        per = "" if total is None or d.n == 1 else " (%.0f ms per link)" % (total / d.n)
        return "kernel: bpf_link__destroy per uprobe%s; hybrid: one ptrace'd call into the agent" % per
    if d.what == "load+attach":
        return "one-program objects; hybrid's first attach of an object builds its %s library" % engine
    if d.what == "launch":
        return ("spawn until the target reaches main, probe live before main; no probe: %s (plain spawn), "
                "%s (through the gate); hybrid's launch() returns after %s"
                % (_ms(by_name.get("launch/none")), _ms(by_name.get("launch/gate")),
                   _ms(by_name.get("launch-returned/1/user"))))
    return ""


def rows(json_path: Path | str) -> list:
    """One report.Row per RowDef (ms), each side measured or None with the reason."""
    import report

    by_name = _load(json_path)
    missing = _missing(by_name)
    out = []
    for d in ROWS:
        stats, why = {}, []
        for side in SIDES:
            name = bench_name(d.what, d.n, side)
            b = by_name.get(name)
            stats[side] = report.Stat.of(b, scale=1e3)
            if b is None:
                why.append("%s: %s" % ("kernel" if side == "kernel" else "hybrid",
                                       missing.get(name, "not measured (no %s in the JSON)" % name)))
        out.append(report.Row(SUITE, d.name, "ms", stats["kernel"], stats["user"], reason="; ".join(why),
                              kernel_label=d.kernel_label, user_label=d.user_label, note=_note(d, by_name)))
    return out


def missed_goals(json_path: Path | str) -> list[str]:
    return []  # attach latency has no goal: the rows are reported, not enforced


def summarize(json_path: Path | str) -> str:
    """The markdown section of an attach JSON written by this script."""
    import bench_engines  # machine_line
    import report

    by_name = _load(json_path)
    rs = rows(json_path)
    reps = sorted({b.get_nvalue() for b in by_name.values()})
    lines = [
        "# Attach latency: kernel uprobes vs hybrid's agent",
        "",
        bench_engines.machine_line() + ".",
        "",
        "Times are **ms** until the probes are live in another process, median ± stdev over %s repetitions "
        "(plus one warmup), each on a fresh target process (`programs/attach_target.c`), lower is better; "
        "**kernel/hybrid** < 1 means the kernel is faster. **kernel**: libbpf `bpf_program__attach_uprobe` "
        "(pid, file offset) of the `count` program; **hybrid**: `BpfObject.attach(pid)` (the agent injected "
        "through ptrace, programs as %s libraries in the target) and `BpfObject.launch(argv)` (the agent "
        "`LD_PRELOAD`ed, the spec applied before `main`). Attach rows time a loaded object (hybrid's "
        "libraries already built); *load + attach* starts from the object file. The kernel launches the "
        "way bpftrace `-c` does: the target waits in a gate (`attach_target --gate`) until the uprobe is "
        "attached for its pid, then execs. After every attach the target calls the probed functions and the "
        "probes' count (an ARRAY map) must grow by one per call; after a detach, by none. Only the "
        "kernel's first uprobe of a burst is slow (see the 10-uprobe row: the next ones take ~0.1 ms): "
        "registering takes uprobes' `dup_mmap_sem` (a per-CPU rw-semaphore) for writing, which waits for "
        "an RCU grace period unless a writer had it moments ago; each link destroy waits for grace periods "
        "too."
        % ("/".join(str(r) for r in reps) or "?", _engine(by_name)),
        "",
        "| what | kernel (ms) | hybrid (ms) | kernel/hybrid | kernel side | hybrid side | note |",
        "|---|---:|---:|---:|---|---|---|",
    ]
    for r in rs:
        note = "; ".join(x for x in (r.reason if (r.kernel is None or r.user is None) else "", r.note) if x)
        lines.append("| %s | %s | %s | %s | %s | %s | %s |" % (
            r.name, report.fmt_stat(r.kernel), report.fmt_stat(r.user), report.fmt_ratio(r.ratio),
            r.kernel_label, r.user_label, note.replace("|", "/")))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
