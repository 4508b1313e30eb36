"""The engine benchmark's programs: build each C source two ways, load, run.

Every program in ``bench/programs/`` is one C source (see ``bench.h`` there)
built

* with ``clang -O2 -target bpf -c``: the eBPF version.  Its ``.text``
  section is the program (extracted with pyelftools), with ``entry`` at
  offset 0; no maps, global data or relocations are accepted;
* with ``gcc -O2 -shared -fPIC``: the native baseline, a library exporting
  ``uint64_t entry(void *ctx, uint64_t len)`` whose helper calls go to the
  same native helpers (``hybrid_helper_*`` of ``hybrid._native``) that the
  JIT and AOT engines call.

Both read their parameters from the same context (:class:`Ctx`: ``u64 n``,
the iteration count, and ``u64 seed``, laid out as ``cb[0..3]`` of a
``struct __sk_buff``).  Builds are cached by content in ``bench/build/``
(or the ``out_dir`` given), so pyperf's worker processes reuse what the
parent built.

The same ``.text`` also runs in the kernel (:class:`KernelProgram`): loaded
with ``BPF_PROG_LOAD`` (libbpf's ``bpf_prog_load`` through ctypes, the
helpers of ``map_programs``) as a tc program - the kernel's verifier and
x86 JIT - and run with ``BPF_PROG_TEST_RUN``, the context passed as the
``__sk_buff`` (``ctx_in``) of a 64-byte zero packet.  A program the
verifier refuses raises :class:`KernelRefused` with the verifier's message.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
SOURCES = BENCH / "programs"
BUILD = BENCH / "build"

# Fixed names, not environment variables: pyperf's workers get a cleaned
# environment and must find the very builds their parent made.
CLANG = "clang"
GCC = "gcc"
CLANG_FLAGS = ("-O2", "-target", "bpf", "-c")
GCC_FLAGS = ("-O2", "-shared", "-fPIC")

# Sections clang may leave in a relocation-free, data-free object besides .text.
HARMLESS_SECTIONS = {"", ".text", ".strtab", ".symtab", ".llvm_addrsig", ".comment", ".note.GNU-stack"}


class BuildError(Exception):
    """A benchmark program failed to compile, or its object is unusable."""


@dataclass(frozen=True)
class BenchProgram:
    name: str
    n: int  # iterations per call for the native engines (gcc, kernel, jit, aot); <= the source's MAX_N
    interp_n: int  # iterations per call for the interpreter (~1000x slower)
    unit: str  # what one iteration is
    deterministic: bool  # r0 depends only on the context (not on helpers' results)
    seed: int = 0x5EED_1234_ABCD

    @property
    def source(self) -> Path:
        return SOURCES / (self.name + ".c")


PROGRAMS: dict[str, BenchProgram] = {
    p.name: p
    for p in (
        BenchProgram("sieve", n=4_000, interp_n=3, unit="one sieve of the numbers below ~400",
                     deterministic=True),
        BenchProgram("loop", n=4_096, interp_n=1_000, unit="one iteration of the mixing loop",
                     deterministic=True),
        BenchProgram("stack_mix", n=16, interp_n=8, unit="one round over 16 stack slots + one call",
                     deterministic=True),
        BenchProgram("helpers", n=1_024, interp_n=500, unit="one round of 4 helper calls",
                     deterministic=False),
    )
}


@dataclass(frozen=True)
class Artifacts:
    """What :func:`build` produced for one program."""

    name: str
    bpf_object: Path  # clang -target bpf object
    native_library: Path  # gcc -O2 shared library
    code: bytes  # the eBPF instructions (.text of bpf_object)


def _run(cmd: list[str], what: str) -> None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        raise BuildError("%s: cannot run %r: %s" % (what, cmd[0], e.strerror)) from None
    if proc.returncode != 0:
        raise BuildError("%s: %s failed (exit %d):\n%s" % (what, " ".join(cmd), proc.returncode,
                                                            (proc.stderr + proc.stdout).strip()))


def _digest(prog: BenchProgram) -> str:
    h = hashlib.sha256()
    for part in (CLANG, GCC, " ".join(CLANG_FLAGS), " ".join(GCC_FLAGS)):
        h.update(part.encode() + b"\0")
    for path in sorted(SOURCES.glob("*.h")) + [prog.source]:
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _compile_to(cmd_head: list[str], src: Path, out: Path, what: str) -> None:
    """Compile into a temporary file and rename it: concurrent builds never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=out.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        _run(cmd_head + ["-I", str(SOURCES), str(src), "-o", tmp], what)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def bpf_text(obj_path: Path | str, name: str = "prog") -> bytes:
    """The ``.text`` of an eBPF object, checked to be a whole program starting at ``entry``.

    Refuses objects with relocations, data sections (maps, globals,
    constants), code in other sections, or ``entry`` anywhere but offset 0.
    """
    from elftools.elf.elffile import ELFFile

    with open(obj_path, "rb") as f:
        elf = ELFFile(f)
        if elf["e_machine"] != "EM_BPF":
            raise BuildError("%s: %s is not an eBPF object (%s)" % (name, obj_path, elf["e_machine"]))
        text = elf.get_section_by_name(".text")
        if text is None or text.data_size == 0:
            raise BuildError("%s: no .text section in %s" % (name, obj_path))
        for sec in elf.iter_sections():
            if sec["sh_type"] in ("SHT_REL", "SHT_RELA"):
                raise BuildError("%s: relocation section %s: the program must not need relocations "
                                 "(no maps, globals or constant tables)" % (name, sec.name))
            if sec.name not in HARMLESS_SECTIONS and sec["sh_size"] > 0 and sec["sh_type"] != "SHT_NOBITS":
                raise BuildError("%s: unexpected section %s (%s, %d bytes): the whole program must be "
                                 "in .text" % (name, sec.name, sec["sh_type"], sec["sh_size"]))
            if sec["sh_type"] == "SHT_NOBITS" and sec["sh_size"] > 0:
                raise BuildError("%s: unexpected section %s: no global data allowed" % (name, sec.name))
        symtab = elf.get_section_by_name(".symtab")
        text_index = elf.get_section_index(".text")
        entry = [s for s in symtab.iter_symbols() if s.name == "entry"] if symtab else []
        if len(entry) != 1:
            raise BuildError("%s: %s has %d symbols named entry" % (name, obj_path, len(entry)))
        sym = entry[0]
        if sym["st_shndx"] != text_index or sym["st_info"]["type"] != "STT_FUNC":
            raise BuildError("%s: entry is not a function in .text" % name)
        if sym["st_value"] != 0:
            raise BuildError("%s: entry is at offset %d of .text, not 0: define it first in the source"
                             % (name, sym["st_value"]))
        code = text.data()
    if len(code) % 8:
        raise BuildError("%s: .text is %d bytes, not a whole number of instructions" % (name, len(code)))
    return code


def build(name: str, out_dir: Path | str | None = None) -> Artifacts:
    """Build (or reuse) the eBPF object and the gcc library of program ``name``."""
    prog = PROGRAMS[name]
    out = Path(out_dir) if out_dir is not None else BUILD
    out.mkdir(parents=True, exist_ok=True)
    stem = "%s-%s" % (name, _digest(prog))
    obj, lib = out / (stem + ".bpf.o"), out / (stem + ".so")
    if not obj.exists():
        _compile_to([CLANG, *CLANG_FLAGS, "-Wall", "-Werror"], prog.source, obj, name + " (eBPF)")
    if not lib.exists():
        _compile_to([GCC, *GCC_FLAGS, "-Wall", "-Werror"], prog.source, lib, name + " (gcc)")
    return Artifacts(name, obj, lib, bpf_text(obj, name))


def source_max_n(name: str) -> int:
    """The ``MAX_N`` clamp of program ``name``'s source: no call does more units."""
    text = PROGRAMS[name].source.read_text()
    m = re.search(r"^#define MAX_N\s+(.+)$", text, re.M)
    if m is None:
        raise BuildError("%s: no #define MAX_N in %s" % (name, PROGRAMS[name].source))
    expr = re.sub(r"(?<=\d)(ull|ul|u|ll|l)\b", "", m.group(1).split("/*")[0].strip(), flags=re.I)
    if not re.fullmatch(r"[\d\s()<+*x-]+", expr):
        raise BuildError("%s: cannot read MAX_N %r" % (name, m.group(1)))
    return int(eval(expr, {"__builtins__": {}}))


def tools_missing() -> list[str]:
    """The compilers this module needs that are not on PATH."""
    return [tool for tool in (CLANG, GCC) if shutil.which(tool) is None]


# --- running -----------------------------------------------------------------

NativeEntry = ctypes.CFUNCTYPE(ctypes.c_uint64, ctypes.c_void_p, ctypes.c_uint64)


class Ctx(ctypes.Structure):
    """``struct bench_ctx`` of bench.h: the start of a ``struct __sk_buff``, ``n`` and ``seed`` in ``cb[0..3]``."""

    _fields_ = [("skb_head", ctypes.c_uint32 * 12), ("n", ctypes.c_uint64), ("seed", ctypes.c_uint64)]

    @classmethod
    def make(cls, n: int, seed: int) -> "Ctx":
        return cls(n=n, seed=seed)

    @property
    def address(self) -> int:
        return ctypes.addressof(self)

    @property
    def size(self) -> int:
        return ctypes.sizeof(self)

    def raw(self) -> bytes:
        return ctypes.string_at(self.address, self.size)


def export_helpers() -> None:
    """Promote ``hybrid._native``'s symbols to global, so the gcc libraries can bind to them."""
    import hybrid._native

    ctypes.CDLL(hybrid._native.__file__, mode=os.RTLD_GLOBAL | os.RTLD_NOLOAD)


@dataclass
class NativeLibrary:
    """A gcc-built program, loaded: ``fn(ctx_address, size)`` is its ``entry``.

    ``repeat(address, ctx, count)`` calls the native entry at ``address``
    (this library's, or a JIT's or AOT library's) ``count`` times from the
    library's ``bench_repeat`` (bench.h): the native engines' counterpart of
    the kernel test run's ``repeat``; r0 of the last call.
    """

    path: Path
    lib: ctypes.CDLL
    fn: NativeEntry

    @property
    def address(self) -> int:
        return ctypes.cast(self.fn, ctypes.c_void_p).value

    def run(self, ctx: Ctx) -> int:
        return self.fn(ctx.address, ctx.size)

    def repeat(self, address: int, ctx: Ctx, count: int) -> int:
        return self.lib.bench_repeat(address, ctx.address, ctx.size, count)


def load_native(path: Path | str) -> NativeLibrary:
    export_helpers()
    lib = ctypes.CDLL(os.fspath(path), mode=os.RTLD_LOCAL | os.RTLD_NOW)
    fn = NativeEntry(ctypes.cast(lib.entry, ctypes.c_void_p).value)
    lib.bench_repeat.restype = ctypes.c_uint64
    lib.bench_repeat.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint64]
    return NativeLibrary(Path(path), lib, fn)


def load_program(art: Artifacts):
    """The eBPF version as a verified :class:`hybrid.user.program.Program`."""
    from hybrid.user.program import Program

    return Program.load(art.code, name=art.name)


# --- the kernel ---------------------------------------------------------------
#
# The libbpf handle, BPF_PROG_TEST_RUN's options and the errno convention are
# map_programs' (the map benchmark's kernel side); BPF_PROG_LOAD of a bare
# instruction array is added here, since these programs are one .text, not
# an object with program sections for bpf_object__load.

BPF_PROG_TYPE_SCHED_CLS = 3  # tc: its test run takes ctx_in (cb[] is the context) and `repeat`
LOG_STATS = 4  # BPF_LOG_STATS: the verifier's statistics, and its messages on failure, no state dumps
LOG_SIZE = 1 << 16
TC_PACKET = bytes(64)  # an skb test run needs at least an Ethernet header of data


class KernelUnavailable(Exception):
    """The kernel side cannot run here at all (no libbpf, no bpf syscall, not allowed)."""


class KernelRefused(Exception):
    """The kernel's verifier refused a program; ``reason`` is its message (one line)."""

    def __init__(self, reason: str, log: str = ""):
        super().__init__(reason)
        self.reason = reason
        self.log = log


class LoadOpts(ctypes.Structure):
    """``struct bpf_prog_load_opts`` of libbpf >= 1.0 (bpf/bpf.h), up to ``log_buf``."""

    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("attempts", ctypes.c_int),
        ("expected_attach_type", ctypes.c_int),
        ("prog_btf_fd", ctypes.c_uint32),
        ("prog_flags", ctypes.c_uint32),
        ("prog_ifindex", ctypes.c_uint32),
        ("kern_version", ctypes.c_uint32),
        ("attach_btf_id", ctypes.c_uint32),
        ("attach_prog_fd", ctypes.c_uint32),
        ("attach_btf_obj_fd", ctypes.c_uint32),
        ("fd_array", ctypes.c_void_p),
        ("func_info", ctypes.c_void_p),
        ("func_info_cnt", ctypes.c_uint32),
        ("func_info_rec_size", ctypes.c_uint32),
        ("line_info", ctypes.c_void_p),
        ("line_info_cnt", ctypes.c_uint32),
        ("line_info_rec_size", ctypes.c_uint32),
        ("log_level", ctypes.c_uint32),
        ("log_size", ctypes.c_uint32),
        ("log_buf", ctypes.c_void_p),
    ]


def _libbpf():
    """map_programs' libbpf handle, with the prototype of ``bpf_prog_load``; (module, lib)."""
    import map_programs as mp

    try:
        lib = mp.libbpf()
    except mp.KernelUnavailable as e:
        raise KernelUnavailable(str(e)) from None
    fn = lib.bpf_prog_load
    if fn.argtypes is None:
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t,
                       ctypes.POINTER(LoadOpts)]
    return mp, lib


STAT_LINE = re.compile(r"^(processed \d+ insns|verification time|stack depth|max_states_per_insn)")


def verifier_reason(log: str, err: int) -> str:
    """One line: the verifier's last message (its statistics left out) and the errno."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    messages = [line for line in lines if not STAT_LINE.match(line)]
    stats = [line for line in lines if line.startswith("processed ")]
    text = messages[-1] if messages else "no message"
    if stats:
        text += " (%s)" % stats[-1].split(" max_states")[0]
    return "%s [%s]" % (text, errno.errorcode.get(err, str(err)))


def verifier_stats(log: str) -> dict[str, int]:
    """``insns`` (processed), ``usec`` (verification time) and ``states`` from a BPF_LOG_STATS log."""
    out = {}
    for key, pattern in (("insns", r"processed (\d+) insns"), ("usec", r"verification time (\d+) usec"),
                         ("states", r"total_states (\d+)")):
        m = re.search(pattern, log)
        if m:
            out[key] = int(m.group(1))
    return out


def prog_load(code: bytes, name: str = "entry", log_level: int = 0) -> tuple[int, str, int]:
    """One ``BPF_PROG_LOAD`` of ``code`` as a tc program: (fd or -1, the verifier's log, errno)."""
    _, lib = _libbpf()
    insns = ctypes.create_string_buffer(bytes(code), len(code))
    opts = LoadOpts(sz=ctypes.sizeof(LoadOpts))
    buf = None
    if log_level:
        buf = ctypes.create_string_buffer(LOG_SIZE)
        opts.log_level, opts.log_size, opts.log_buf = log_level, LOG_SIZE, ctypes.addressof(buf)
    ctypes.set_errno(0)
    fd = lib.bpf_prog_load(BPF_PROG_TYPE_SCHED_CLS, name.encode()[:15], b"GPL", insns, len(code) // 8,
                           ctypes.byref(opts))
    err = -fd if fd < 0 else 0  # libbpf >= 1.0 returns -errno
    log = buf.value.decode(errors="replace") if buf is not None else ""
    return fd, log, err


def timed_load(code: bytes, name: str = "entry") -> float:
    """Seconds of one ``BPF_PROG_LOAD`` (verifier + JIT, no log); the program is unloaded after."""
    import time

    _, lib = _libbpf()
    insns = ctypes.create_string_buffer(bytes(code), len(code))
    opts = LoadOpts(sz=ctypes.sizeof(LoadOpts))
    cname = name.encode()[:15]
    t0 = time.perf_counter()
    fd = lib.bpf_prog_load(BPF_PROG_TYPE_SCHED_CLS, cname, b"GPL", insns, len(code) // 8, ctypes.byref(opts))
    elapsed = time.perf_counter() - t0
    if fd < 0:
        err = -fd
        raise OSError(err, "BPF_PROG_LOAD of %s: %s" % (name, os.strerror(err)))
    os.close(fd)
    return elapsed


class KernelProgram:
    """A program's ``.text`` loaded into the kernel as a tc program, run with ``BPF_PROG_TEST_RUN``.

    Raises :class:`KernelRefused` (the verifier's message) or
    :class:`KernelUnavailable` (no bpf() here, not root).  ``stats`` holds
    the verifier's statistics of the load (``insns``, ``usec``, ``states``).
    """

    def __init__(self, code: bytes, name: str = "entry"):
        self.fd = -1
        fd, log, err = prog_load(code, name, LOG_STATS)
        if fd < 0:
            if err in (errno.EPERM, errno.ENOSYS) or not log.strip():
                hint = " (run as root)" if err in (errno.EPERM, errno.EACCES) else ""
                raise KernelUnavailable("BPF_PROG_LOAD of %s: %s%s" % (name, os.strerror(err), hint))
            raise KernelRefused(verifier_reason(log, err), log)
        self.fd, self.name, self.log = fd, name, log
        self.stats = verifier_stats(log)
        self._mp, self.lib = _libbpf()
        self._packet = ctypes.create_string_buffer(TC_PACKET, len(TC_PACKET))
        self._ctx = None

    def opts(self, ctx: Ctx, repeat: int):
        """Test-run options: ``repeat`` runs, ``ctx`` as the ``__sk_buff`` (copied now)."""
        self._ctx = ctypes.create_string_buffer(ctx.raw(), ctx.size)  # kept alive with the options
        return self._mp.TestRunOpts(sz=ctypes.sizeof(self._mp.TestRunOpts), data_in=ctypes.addressof(self._packet),
                                    data_size_in=len(TC_PACKET), ctx_in=ctypes.addressof(self._ctx),
                                    ctx_size_in=ctx.size, repeat=repeat)

    def test_run(self, opts) -> tuple[int, int]:
        """One ``BPF_PROG_TEST_RUN``: (r0 (its low 32 bits: a tc retval is a u32), mean ns per run)."""
        while True:
            rc = self.lib.bpf_prog_test_run_opts(self.fd, ctypes.byref(opts))
            if rc == 0:
                return opts.retval, opts.duration
            e = self._mp._err(rc)
            if e != errno.EINTR:  # a signal stops the kernel's repeat loop: run again
                raise OSError(e, "BPF_PROG_TEST_RUN of %s: %s" % (self.name, os.strerror(e)))

    def run(self, ctx: Ctx, repeat: int = 1) -> tuple[int, int]:
        return self.test_run(self.opts(ctx, repeat))

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> "KernelProgram":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# mov r0, 0; exit
_TRIVIAL = bytes.fromhex("b700000000000000" "9500000000000000")


def kernel_problem() -> str | None:
    """None if programs can be loaded and test-run in the kernel here, else why not."""
    try:
        with KernelProgram(_TRIVIAL, "probe") as k:
            k.run(Ctx.make(0, 0))
    except (KernelUnavailable, KernelRefused, OSError) as e:
        return str(e)
    return None


def bpf_jit_enabled() -> str:
    """``net.core.bpf_jit_enable`` ("1": the kernel JITs its programs; "0": its interpreter runs them)."""
    try:
        with open("/proc/sys/net/core/bpf_jit_enable") as f:
            return f.read().strip()
    except OSError:
        return "?"
