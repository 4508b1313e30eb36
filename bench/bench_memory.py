#!/usr/bin/env python3
"""pyperf benchmark of bpf_probe_read_user and bpf_probe_write_user: kernel uprobes against hybrid.

What one value is: the time per call of ``victim_buf(buf, i)``
(``programs/memvictim.c``: a 5-byte nop, then ``return buf[0]``) called in a
C loop by ``buf_loop(buf, n)`` through one ctypes call (pyperf
``inner_loops`` = n, so values are seconds per call), with one program of
``programs/memory.bpf.c`` attached to the victim's entry, reading or writing
the caller's 8192-byte buffer through ``PT_REGS_PARM1``:

``none``
    no probe: the baseline :func:`rows` subtracts (the call itself);
``<program>/kernel``
    the program in a bare ``SEC("uprobe")`` section, loaded by libbpf alone
    (a kernel refusing one program does not stop the others) and attached
    with ``bpf_program__attach_uprobe`` at the victim's file offset for this
    (worker) process;
``<program>/user``
    the same body in a ``SEC("uprobe/<memvictim.so>:victim_buf")`` section,
    ``hybrid.load``-ed and attached in this process with
    ``BpfObject.attach(programs=[...])``.

The programs (:data:`CASES`): ``read1`` reads buf[0] with one
bpf_probe_read_user of 8 bytes per hit, ``read1000`` reads buf[0..999] (1000
reads of 8 bytes at distinct offsets, a bounded loop), ``write1`` writes the
call's index i to buf[0] with one bpf_probe_write_user, ``write1000`` writes
i + k to buf[k] for k < 1000.  The ×1000 rows run n / :data:`WORDS_DIVISOR`
calls per ``buf_loop`` (a kernel hit then costs tens of µs).

Every attached program is checked before it is timed and after every timed
value: its ``stats`` map counts one hit per call and ``words`` successful
helper calls per hit, the read programs' sum of what they read matches the
buffer, the victim returned what the buffer held (for the writes: i, set by
the probe just before the victim loads it), and the buffer holds what the
last call wrote.  A program that does not do its work fails the benchmark.

A kernel that refuses a program (``bpf_probe_write_user`` under lockdown:
the verifier says "cannot use helper") has no kernel benchmark for it; the
verifier's words go to the JSON's metadata and become the row's ``reason``.
Importing this module runs nothing.

Usage (normally through ``bench/run.py``)::

    python bench/bench_memory.py -o memory.json [--quick] [--quiet] [any pyperf option]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

import map_programs as mp  # noqa: E402
import probe_programs as pp  # noqa: E402

SUITE = "memory"
VICTIM_SOURCE = BENCH_DIR / "programs" / "memvictim.c"
PROGRAM_SOURCE = BENCH_DIR / "programs" / "memory.bpf.c"
BUILD = BENCH_DIR / "build"
LOCKDOWN = Path("/sys/kernel/security/lockdown")

# victim_buf: nopl 0x0(%rax,%rax,1); mov (%rdi),%rax; ret
VICTIM = pp.Victim("buf", 0, bytes.fromhex("0f1f440000 488b07 c3"), "nop5 optimized")

NR_WORDS = 1000  # words the ×1000 programs read or write (memory.bpf.c)
BUF_WORDS = 1024  # the buffer: 8192 bytes
HITS, OK, SUM = 0, 1, 2  # slots of the `stats` map
MASK = (1 << 64) - 1

SIDES = ("kernel", "user")
BASELINE = "none"

# Runner settings: (processes, values per process, min seconds per value); victim calls per buf_loop.
FULL = (4, 4, 0.1)
QUICK = (1, 3, 0.02)
CALLS = {False: 100_000, True: 10_000}
WORDS_DIVISOR = 100  # the ×1000 rows: n / 100 calls per buf_loop
PREFLIGHT_CALLS = 200


@dataclass(frozen=True)
class Case:
    program: str
    row: str  # the report's row name
    words: int  # helper calls per hit, 8 bytes each
    write: bool
    note: str  # what one call reads or writes

    def calls(self, n: int) -> int:
        """Victim calls per buf_loop (pyperf's inner_loops)."""
        return max(1, n // WORDS_DIVISOR) if self.words > 1 else n


CASES: tuple[Case, ...] = (
    Case("read1", "probe_read_user ×1", 1, False,
         "one call reads 8 bytes (buf[0]) with 1 bpf_probe_read_user"),
    Case("read1000", "probe_read_user ×1000", NR_WORDS, False,
         "one call reads buf[0..999] (8000 distinct bytes) with 1000 bpf_probe_read_user of 8 bytes"),
    Case("write1", "probe_write_user ×1", 1, True,
         "one call writes 8 bytes (buf[0] = i) with 1 bpf_probe_write_user"),
    Case("write1000", "probe_write_user ×1000", NR_WORDS, True,
         "one call writes buf[0..999] (8000 distinct bytes, buf[k] = i + k) with 1000 bpf_probe_write_user "
         "of 8 bytes"),
)
CASE = {c.program: c for c in CASES}


def bench_name(program: str | None, side: str) -> str:
    return BASELINE if side == BASELINE else "%s/%s" % (program, side)


def initial(k: int) -> int:
    """buf[k] before any write: small, distinct values (the victim's sums never overflow)."""
    return 3 * k + 7


def read_sum(words: int) -> int:
    """What one hit of a read program adds to SUM: buf[0] + ... + buf[words-1]."""
    return sum(initial(k) for k in range(words)) & MASK


def victim_sum(case: Case | None, n: int) -> int:
    """buf_loop(buf, n): the buf[0] each call returned (i when a write program set it first)."""
    if case is not None and case.write:
        return n * (n - 1) // 2
    return n * initial(0)


# --- building ---------------------------------------------------------------------


@dataclass(frozen=True)
class Artifacts:
    victim: Path  # memvictim.so
    kernel_object: Path  # bare SEC("uprobe") sections
    user_object: Path  # SEC("uprobe/<memvictim.so>:victim_buf") sections


def build_victim(out_dir: Path | str | None = None) -> Path:
    """``memvictim.so`` (cached by source, flags and gcc version), checked to start as its rows say."""
    out = Path(out_dir) if out_dir is not None else BUILD
    out.mkdir(parents=True, exist_ok=True)
    if shutil.which(pp.GCC) is None:
        raise pp.BuildError("%s is not installed: cannot build %s" % (pp.GCC, VICTIM_SOURCE.name))
    lib = out / ("memvictim-%s.so" % pp._digest(pp._version(pp.GCC), " ".join(pp.GCC_FLAGS),
                                                 VICTIM_SOURCE.read_bytes()))
    if not lib.exists():
        pp._build_atomic(lib, lambda tmp: [pp.GCC, *pp.GCC_FLAGS, "-o", tmp, str(VICTIM_SOURCE)], "memvictim")
    check_victim(lib)
    return lib


def check_victim(lib: Path | str) -> None:
    """victim_buf is exactly a 5-byte nop, ``mov (%rdi),%rax``, ``ret`` (not what a compiler chose)."""
    from hybrid.user.attach.symbols import read_code, resolve_symbol

    sym = resolve_symbol(str(lib), VICTIM.symbol)
    code = read_code(str(lib), sym.vaddr, len(VICTIM.prologue))
    if code != VICTIM.prologue or sym.size != len(VICTIM.prologue):
        raise pp.BuildError("%s in %s is %s (%d bytes), expected %s"
                            % (VICTIM.symbol, lib, code.hex(" "), sym.size, VICTIM.prologue.hex(" ")))


def build_programs(victim_lib: Path | str | None = None, out_dir: Path | str | None = None) -> Path:
    """``memory.bpf.o``: bare sections (kernel), or ``uprobe/<victim_lib>:victim_buf`` ones (hybrid)."""
    out = Path(out_dir) if out_dir is not None else BUILD
    out.mkdir(parents=True, exist_ok=True)
    if shutil.which(pp.CLANG) is None:
        raise pp.BuildError("%s is not installed: cannot build %s" % (pp.CLANG, PROGRAM_SOURCE.name))
    header_dir = pp.vmlinux_h(out)
    defines = [] if victim_lib is None else ['-DVICTIM_LIB="%s"' % os.fspath(victim_lib)]
    flags = [*pp.CLANG_FLAGS, "-I%s" % header_dir, *mp._clang_system_includes(pp.CLANG), *defines]
    obj = out / ("memory-%s-%s.bpf.o" % ("kernel" if victim_lib is None else "user",
                                         pp._digest(pp._version(pp.CLANG), " ".join(flags),
                                                    PROGRAM_SOURCE.read_bytes())))
    if not obj.exists():
        pp._build_atomic(obj, lambda tmp: [pp.CLANG, *flags, "-c", str(PROGRAM_SOURCE), "-o", tmp], "memory.bpf.c")
    return obj


def build(out_dir: Path | str | None = None) -> Artifacts:
    lib = build_victim(out_dir)
    return Artifacts(lib, build_programs(None, out_dir), build_programs(lib, out_dir))


# --- the victim and its buffer, called through ctypes --------------------------------


class Victim:
    """memvictim.so loaded in this process, with a buffer of its own: ``loop(n)`` runs buf_loop(buf, n)."""

    def __init__(self, lib: Path | str):
        self.path = str(lib)
        self.lib = ctypes.CDLL(self.path)
        self.fn = self.lib.buf_loop
        self.fn.restype = ctypes.c_long
        self.fn.argtypes = [ctypes.c_void_p, ctypes.c_long]
        self.buf = (ctypes.c_uint64 * BUF_WORDS)()
        self.addr = ctypes.addressof(self.buf)
        self.reset()

    def reset(self) -> None:
        for k in range(BUF_WORDS):
            self.buf[k] = initial(k)

    def loop(self, n: int) -> int:
        return self.fn(self.addr, n)

    def words(self) -> list[int]:
        return list(self.buf)

    def check_buffer(self, case: Case | None, n: int, what: str) -> None:
        """The buffer holds what the last of ``n`` calls left: i + k in the words a write program wrote."""
        written = case.words if case is not None and case.write else 0
        want = [(n - 1 + k) & MASK if k < written else initial(k) for k in range(BUF_WORDS)]
        got = self.words()
        if got != want:
            bad = next(k for k in range(BUF_WORDS) if got[k] != want[k])
            raise RuntimeError("%s: buf[%d] = %d after %d calls, expected %d" % (what, bad, got[bad], n, want[bad]))


# --- libbpf's messages (the verifier log of a refused program) ---------------------------

_PRINT_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)


@contextlib.contextmanager
def libbpf_messages():
    """Collect what libbpf prints (warnings, the verifier log of a failed load) instead of printing it."""
    lib = mp.libbpf()
    lib.libbpf_set_print.restype = ctypes.c_void_p
    lib.libbpf_set_print.argtypes = [ctypes.c_void_p]
    libc = ctypes.CDLL(None)
    vsnprintf = libc.vsnprintf
    vsnprintf.restype = ctypes.c_int
    vsnprintf.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_void_p]
    out: list[str] = []
    buf = ctypes.create_string_buffer(1 << 16)

    def printer(level, fmt, ap):  # va_list is a pointer on x86-64
        vsnprintf(buf, len(buf), fmt, ap)
        out.append(buf.value.decode(errors="replace"))
        return 0

    cb = _PRINT_FN(printer)
    prev = lib.libbpf_set_print(ctypes.cast(cb, ctypes.c_void_p))
    try:
        yield out
    finally:
        lib.libbpf_set_print(prev)


def verifier_verdict(messages: list[str]) -> str:
    """The verifier's last word in libbpf's messages (the line before its statistics), or ''."""
    text = "".join(messages)
    if "-- BEGIN PROG LOAD LOG --" not in text:
        return ""
    log = text.split("-- BEGIN PROG LOAD LOG --", 1)[1].split("-- END PROG LOAD LOG --", 1)[0]
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith(("processed ", "verification time", "stack depth"))]
    return lines[-1] if lines else ""


def lockdown_state() -> str:
    """The kernel's lockdown mode when securityfs shows it (``integrity``), else ''."""
    try:
        text = LOCKDOWN.read_text()
    except OSError:
        return ""
    chosen = [w.strip("[]") for w in text.split() if w.startswith("[")]
    return chosen[0] if chosen else ""


# --- the programs on each side ---------------------------------------------------------


class KernelRefused(pp.SideUnavailable):
    """The kernel would not load a program (the verifier's refusal, or no BPF here)."""


class MemProbe(pp.Probes):
    """One program of memory.bpf.o attached to victim_buf; ``stats()`` is (hits, ok, sum)."""

    def stats(self) -> tuple[int, int, int]:
        return tuple(pp._u64(self._lookup(slot)) for slot in (HITS, OK, SUM))


def load_kernel(kernel_object: Path | str, program: str) -> mp.KernelObject:
    """``program`` alone loaded by libbpf; :class:`KernelRefused` with the kernel's words if it will not."""
    with libbpf_messages() as messages:
        try:
            return mp.KernelObject(kernel_object, [program])
        except mp.KernelUnavailable as e:
            error = str(e)
    verdict = verifier_verdict(messages)
    if not verdict:
        raise KernelRefused(error)
    helper = next((h for h in ("bpf_probe_write_user", "bpf_probe_read_user") if h in verdict), program)
    failure = error.rsplit(": ", 1)[-1] if ": " in error else error
    mode = lockdown_state()
    raise KernelRefused("kernel refuses %s: the verifier says \"%s\" (%s load failed: %s%s)"
                        % (helper, verdict, program, failure, "; lockdown: %s" % mode if mode else ""))


class KernelMemProbe(MemProbe):
    """libbpf: ``program`` loaded alone, attached at victim_buf's file offset for this process."""

    side = "kernel"

    def __init__(self, kernel_object: Path | str, lib: Path | str, program: str, pid: int | None = None):
        self.links: list[int] = []
        self.k = load_kernel(kernel_object, program)
        try:
            api = pp._libbpf_attach_api(self.k.lib)
            offset = pp.victim_offset(lib, VICTIM)
            prog = api.bpf_object__find_program_by_name(self.k.obj, program.encode())
            link = api.bpf_program__attach_uprobe(prog, False, os.getpid() if pid is None else pid,
                                                  os.fsencode(lib), offset)
            if not link:
                e = ctypes.get_errno() or errno.EINVAL
                raise pp.SideUnavailable("libbpf cannot attach %s to %s+%#x: %s"
                                         % (program, VICTIM.symbol, offset, os.strerror(e)))
            self.links.append(link)
        except BaseException:
            self.close()
            raise

    def _lookup(self, slot: int) -> bytes | None:
        return self.k.lookup("stats", slot.to_bytes(4, "little"))

    close = pp.KernelProbes.close


class UserMemProbe(MemProbe):
    """hybrid: the object loaded by ``hybrid.load``, ``program`` attached in this process."""

    side = "user"

    def __init__(self, user_object: Path | str, program: str, engine: str = "jit"):
        import hybrid
        from hybrid.errors import HybridError

        self.obj = hybrid.load(user_object)
        self.attachment = None
        try:
            self.attachment = self.obj.attach(programs=[program], engine=engine)
        except HybridError as e:
            self.close()
            raise pp.SideUnavailable("hybrid cannot attach %s: %s" % (program, e)) from None
        except BaseException:
            self.close()
            raise

    def _lookup(self, slot: int) -> bytes | None:
        return self.obj.maps["stats"].lookup(slot.to_bytes(4, "little"))

    close = pp.UserProbes.close


def attach(side: str, art: Artifacts, program: str) -> MemProbe:
    if side == "kernel":
        return KernelMemProbe(art.kernel_object, art.victim, program)
    if side == "user":
        return UserMemProbe(art.user_object, program)
    raise ValueError("unknown side %r" % side)


def check_stats(probe: MemProbe, before: tuple[int, int, int], case: Case, calls: int,
                what: str) -> tuple[int, int, int]:
    """The stats now; raises unless each of ``calls`` hits made ``case.words`` good helper calls (and read
    the buffer's words) since ``before``."""
    now = probe.stats()
    got = tuple((a - b) & MASK for a, b in zip(now, before))
    want = (calls, calls * case.words, 0 if case.write else calls * read_sum(case.words) & MASK)
    if got != want:
        raise RuntimeError("%s: (hits, helper calls returning 0, sum read) = %s for %d calls, expected %s: "
                           "not benchmarking a program that does not do its work" % (what, got, calls, want))
    return now


# --- what one benchmark times (in pyperf's worker processes) ---------------------------


class Subject:
    """victim_buf with (or without) one program on one side, attached and checked."""

    def __init__(self, program: str | None, side: str, n: int, art: Artifacts):
        self.case = CASE[program] if program else None
        self.side, self.n = side, n
        self.what = bench_name(program, side)
        self.victim = Victim(art.victim)
        self.expected = victim_sum(self.case, n)
        self.probe = None if side == BASELINE else attach(side, art, program)
        try:
            self.seen = self.probe.stats() if self.probe else None
            self.time(1)  # a checked, untimed first run
        except BaseException:
            self.close()
            raise

    def time(self, loops: int) -> float:
        fn, addr, n, expected = self.victim.fn, self.victim.addr, self.n, self.expected
        wrong = 0
        t0 = time.perf_counter()
        for _ in range(loops):
            if fn(addr, n) != expected:
                wrong += 1
        elapsed = time.perf_counter() - t0
        if wrong:
            raise RuntimeError("%s: buf_loop returned a wrong sum %d times out of %d (expected %d)"
                               % (self.what, wrong, loops, expected))
        if self.probe is not None:
            self.seen = check_stats(self.probe, self.seen, self.case, loops * n, self.what)
        self.victim.check_buffer(self.case, n, self.what)
        return elapsed

    def close(self) -> None:
        probe, self.probe = self.probe, None
        if probe is not None:
            probe.close()


_subjects: dict[str, Subject] = {}


def release_subjects() -> None:
    """Detach and close every cached subject (quick mode runs every benchmark in one process)."""
    while _subjects:
        _subjects.popitem()[1].close()


def time_subject(loops: int, program: str | None, side: str, n: int, art: Artifacts) -> float:
    """pyperf time function: ``loops`` calls of buf_loop(buf, n); the first use attaches (untimed)."""
    name = bench_name(program, side)
    subject = _subjects.get(name)
    if subject is None:
        subject = _subjects[name] = Subject(program, side, n, art)
    return subject.time(loops)


# --- parent-only checks --------------------------------------------------------------


def preflight(art: Artifacts) -> tuple[list[tuple[str, str]], dict[str, str], str]:
    """Attach every program on every side once and check it does its work (fail early).

    Returns the (program, side) pairs to benchmark, why each other pair cannot be (by bench name:
    the kernel's refusal), and the instruction the kernel's uprobe left at victim_buf ('call' when
    it optimized the nop5, 'int3' otherwise; '' if no kernel program ran).
    """
    Subject(None, BASELINE, PREFLIGHT_CALLS, art).close()
    plan, missing, kernel_insn = [], {}, ""
    for case in CASES:
        for side in SIDES:
            name = bench_name(case.program, side)
            try:
                s = Subject(case.program, side, case.calls(PREFLIGHT_CALLS), art)
            except pp.SideUnavailable as e:
                missing[name] = str(e)
                print("bench_memory: %s not benchmarked: %s" % (name, e), file=sys.stderr)
                continue
            if side == "kernel" and not kernel_insn:
                kernel_insn = pp.patched_insn(s.victim, VICTIM)
            s.close()
            if pp.patched_insn(s.victim, VICTIM) != VICTIM.name:
                raise RuntimeError("%s: detaching left %s at %s" % (name, pp.patched_insn(s.victim, VICTIM),
                                                                     VICTIM.symbol))
            plan.append((case.program, side))
    return plan, missing, kernel_insn


# --- the pyperf script --------------------------------------------------------------


def _forward_args(cmd: list[str], args) -> None:
    """Arguments pyperf's workers need to register the same benchmarks in the same order."""
    cmd.extend(("--victim", args.victim, "--kernel-object", args.kernel_object, "--user-object",
                args.user_object, "--calls", str(args.calls), "--plan", args.plan))
    for name, reason in args.missing:
        cmd.extend(("--missing", "%s=%s" % (name, reason)))
    if args.kernel_insn:
        cmd.extend(("--kernel-insn", args.kernel_insn))


def _missing_arg(text: str) -> tuple[str, str]:
    name, _, reason = text.partition("=")
    return name, reason


def main() -> None:
    import harness

    runner, quick = harness.suite_runner(
        FULL,
        QUICK,
        add_cmdline_args=_forward_args,
        release=release_subjects,
        description="bpf_probe_read_user / bpf_probe_write_user: kernel uprobes against hybrid")
    runner.argparser.add_argument("--calls", type=int, default=CALLS[quick],
                                  help="victim calls per buf_loop (default %d; the ×1000 rows: / %d)"
                                  % (CALLS[quick], WORDS_DIVISOR))
    runner.argparser.add_argument("--victim", default=None, help=argparse.SUPPRESS)
    runner.argparser.add_argument("--kernel-object", default=None, help=argparse.SUPPRESS)
    runner.argparser.add_argument("--user-object", default=None, help=argparse.SUPPRESS)
    runner.argparser.add_argument("--plan", default="", help=argparse.SUPPRESS)
    runner.argparser.add_argument("--missing", action="append", type=_missing_arg, default=[],
                                  help=argparse.SUPPRESS)
    runner.argparser.add_argument("--kernel-insn", default="", help=argparse.SUPPRESS)
    args = runner.parse_args()

    if not args.worker:
        art = build()
        args.victim, args.kernel_object, args.user_object = map(str, (art.victim, art.kernel_object,
                                                                      art.user_object))
        plan, missing, args.kernel_insn = preflight(art)  # fail early and clearly, before any worker
        args.plan = ",".join("%s:%s" % ps for ps in plan)
        args.missing = sorted(missing.items())
    art = Artifacts(Path(args.victim), Path(args.kernel_object), Path(args.user_object))
    planned = set(tuple(ps.split(":", 1)) for ps in args.plan.split(",") if ps)
    why = {"hybrid_missing_" + name.replace("/", "_"): " ".join(reason.split()) for name, reason in args.missing}

    def meta(program: str | None, side: str, n: int) -> dict:
        md = {"hybrid_program": program or BASELINE, "hybrid_side": side, "hybrid_calls": n, **why}
        if side == "kernel" and args.kernel_insn:
            md["hybrid_kernel_insn"] = args.kernel_insn
        return md

    runner.bench_time_func(BASELINE, time_subject, None, BASELINE, args.calls, art, inner_loops=args.calls,
                           metadata=meta(None, BASELINE, args.calls))
    for case in CASES:
        for side in SIDES:
            if (case.program, side) in planned:
                n = case.calls(args.calls)
                runner.bench_time_func(bench_name(case.program, side), time_subject, case.program, side, n, art,
                                       inner_loops=n, metadata=meta(case.program, side, n))


# --- the summary ------------------------------------------------------------------


def _load(json_path: Path | str) -> dict:
    from report import benchmarks

    return benchmarks(json_path)


def _metadata(by_name: dict) -> dict:
    md: dict = {}
    for b in by_name.values():
        md.update(b.get_metadata())
    return md


def _why_missing(md: dict, program: str, side: str, base) -> str:
    if base is None:
        return "no baseline (victim without a probe) measured"
    reason = md.get("hybrid_missing_%s_%s" % (program, side))
    return str(reason) if reason else "%s side of %s not measured" % (side, program)


def rows(json_path: Path | str) -> list:
    """The consolidated report's rows (bench/report.py): ns added per call, kernel against hybrid."""
    from report import Row, Stat

    by_name = _load(json_path)
    md = _metadata(by_name)
    base = Stat.of(by_name.get(BASELINE))
    insn = md.get("hybrid_kernel_insn")
    kernel_label = "kernel uprobe (%s)" % ("nop5 optimized: call" if insn == "call" else insn) if insn else "kernel"
    out = []
    for case in CASES:
        sides = {}
        for side in SIDES:
            b = by_name.get(bench_name(case.program, side))
            sides[side] = Stat.of(b, minus=base) if (b is not None and base is not None) else None
        reason = "; ".join("%s%s" % ("" if side == "kernel" else "hybrid: ",
                                     _why_missing(md, case.program, side, base))
                           for side in SIDES if sides[side] is None)
        out.append(Row(SUITE, case.row, "ns added/call", sides["kernel"], sides["user"], reason=reason,
                       kernel_label=kernel_label, note=case.note))
    return out


def missed_goals(json_path: Path | str) -> list[str]:
    """This suite measures; it has no speed goal to miss."""
    return []


def summarize(json_path: Path | str) -> str:
    """The markdown report of a memory JSON written by this script."""
    import bench_engines  # machine_line
    from report import Stat, fmt, fmt_ratio, fmt_stat

    by_name = _load(json_path)
    md = _metadata(by_name)
    table = rows(json_path)
    base = by_name.get(BASELINE)
    n = base.get_metadata().get("hybrid_calls") if base is not None else None
    insn = md.get("hybrid_kernel_insn")
    lines = [
        "# Memory helpers: bpf_probe_read_user and bpf_probe_write_user, kernel uprobes vs hybrid",
        "",
        bench_engines.machine_line() + ".",
        "",
        "Times are **ns added per call** of `victim_buf(buf, i)` (a 5-byte nop, then `return buf[0]`; "
        "`programs/memvictim.c`) called in a C loop (`buf_loop`, %s calls per ctypes call; the ×1000 rows "
        "1/%d of that) with one program of `programs/memory.bpf.c` on its entry reading or writing the "
        "caller's buffer through `PT_REGS_PARM1`: the time per call minus the victim's own time without a "
        "probe (%s ns), median ± stdev of the pyperf values. **kernel**: libbpf `bpf_program__attach_uprobe` "
        "at the victim's file offset, for the benchmark's process, each program loaded alone%s; "
        "**hybrid**: `hybrid.load` of the same program bodies, `obj.attach()` in the process (inline hook "
        "+ trampoline, JIT'd code). Every program is checked before and after each timed value: one hit "
        "per call, every helper call returning 0, the sum of the words read equal to the buffer's, the "
        "words written found in the buffer and returned by the victim."
        % ("{:,}".format(int(n)) if n else "n",
           WORDS_DIVISOR, fmt_stat(Stat.of(base)) if base is not None else "—",
           " (the uprobe left `%s` at the victim%s)" % (insn, ": the kernel's optimized nop5 path"
                                                        if insn == "call" else "") if insn else ""),
        "",
        "| what | one call does | kernel added | hybrid added | kernel/hybrid | note |",
        "|---|---|---:|---:|---:|---|",
    ]
    for r in table:
        lines.append("| %s | %s | %s | %s | %s | %s |" % (
            r.name, r.note.replace("one call ", ""), fmt_stat(r.kernel), fmt_stat(r.user), fmt_ratio(r.ratio),
            (r.reason if (r.kernel is None or r.user is None) else "").replace("|", "/")))
    per = []
    for kind in ("read", "write"):
        one, many = [r for r in table if r.name.startswith("probe_%s_user" % kind)]
        parts = []
        for side, label in (("kernel", "kernel"), ("user", "hybrid")):
            a, b = getattr(one, side), getattr(many, side)
            if a is not None and b is not None:
                parts.append("%s %s ns" % (label, fmt((b.median - a.median) / (NR_WORDS - 1))))
        if parts:
            per.append("bpf_probe_%s_user: %s" % (kind, ", ".join(parts)))
    if per:
        lines += ["", "Cost of one more 8-byte helper call ((×1000 − ×1) / 999): %s." % "; ".join(per)]
    benches = list(by_name.values())
    if benches:
        nv = sorted({b.get_nvalue() for b in benches})
        lines += ["", "pyperf: %s values per benchmark, no speed goal (this suite measures)."
                  % ("%d" % nv[0] if len(nv) == 1 else "%d-%d" % (nv[0], nv[-1]))]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
