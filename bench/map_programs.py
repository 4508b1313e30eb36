"""The map benchmark's program: build it, load it into the kernel and into hybrid.

``programs/maps.bpf.c`` holds one tc program per (map type, operation) -
see :data:`CASES` - plus ``empty_loop``, the same loop without the map
operation.  Each does :data:`NR_OPS` operations on keys spread over
``0..NR_KEYS-1`` of a map that :func:`fill` has populated beforehand (value
of key k = k as a u64) and returns how many operations succeeded
(:attr:`Case.expected` when all did).

The one object is loaded twice:

* into the kernel with libbpf, through ctypes on Debian's ``libbpf.so.1``
  (:class:`KernelObject`), and run with ``BPF_PROG_TEST_RUN``
  (``bpf_prog_test_run_opts``, ``repeat`` runs per call; the kernel reports
  the mean duration of one run in ns).  The programs are ``SEC("tc")``
  (BPF_PROG_TYPE_SCHED_CLS) because its test run takes ``repeat`` and
  reports ``duration`` (``syscall`` and raw tracepoint test runs take
  neither) at no fixed cost per syscall: XDP's does too, but with
  ``repeat > 1`` it swaps the XDP dispatcher in and out around every call
  (code patching and an RCU grace period, ~20-40 ms here), which would
  swamp the wall-clock time.  The programs ignore their context (a 64-byte
  zero packet in the kernel, NULL in hybrid);
* into hybrid with ``hybrid.load`` (:class:`UserObject`); the JIT (or AOT)
  entry ``u64 fn(void *ctx, u64 len)`` of one program is called directly.

Builds are cached by content in ``bench/build/`` like the engine programs.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
SOURCE = BENCH / "programs" / "maps.bpf.c"
BUILD = BENCH / "build"

CLANG = "clang"  # a fixed name: pyperf's workers get a cleaned environment
CLANG_FLAGS = ("-O2", "-g", "-target", "bpf", "-D__TARGET_ARCH_x86", "-Wall", "-Werror")

NR_OPS = 1000  # operations per program run (maps.bpf.c)
NR_KEYS = 1024  # keys present in every map
BASELINE = "empty_loop"

MAPS = ("hash", "array", "percpu_hash", "percpu_array", "lru_hash")
OPS = ("lookup", "update", "delete")
PERCPU = {"percpu_hash", "percpu_array"}
NO_DELETE = {"array", "percpu_array"}

OP_UNITS = {
    "lookup": "bpf_map_lookup_elem of a present key (+ read the value)",
    "update": "bpf_map_update_elem(BPF_ANY) of a present key",
    "delete": "bpf_map_delete_elem + bpf_map_update_elem(BPF_NOEXIST) of the same key",
}


class BuildError(Exception):
    """The benchmark program failed to compile."""


class KernelUnavailable(Exception):
    """The kernel side cannot run here (no libbpf, no BPF syscall, not allowed...)."""


@dataclass(frozen=True)
class Case:
    """One (map type, operation) row of the benchmark."""

    map: str
    op: str

    @property
    def program(self) -> str:
        return "%s_%s" % (self.map, self.op)

    @property
    def expected(self) -> int:
        """r0 of a run in which every operation succeeded."""
        return 2 * NR_OPS if self.op == "delete" else NR_OPS

    @property
    def unsupported(self) -> str | None:
        """Why there is no program for this case, if there is none."""
        if self.op == "delete" and self.map in NO_DELETE:
            return "no delete on arrays (the kernel returns -EINVAL)"
        return None


CASES: tuple[Case, ...] = tuple(Case(m, op) for m in MAPS for op in OPS)
RUNNABLE: tuple[Case, ...] = tuple(c for c in CASES if c.unsupported is None)
PROGRAMS: tuple[str, ...] = (BASELINE,) + tuple(c.program for c in RUNNABLE)


def expected_r0(program: str) -> int:
    if program == BASELINE:
        return 0
    return next(c.expected for c in RUNNABLE if c.program == program)


def program_map(program: str) -> str | None:
    """The map ``program`` operates on (None for the baseline)."""
    if program == BASELINE:
        return None
    return next(c.map for c in RUNNABLE if c.program == program)


# --- building ---------------------------------------------------------------------


def _clang_system_includes(clang: str) -> list[str]:
    from hybrid.errors import HybridError
    from hybrid.user.toolchain import clang_system_includes

    try:
        return list(clang_system_includes(clang))
    except HybridError as e:
        raise BuildError(str(e)) from None


def build(out_dir: Path | str | None = None) -> Path:
    """The compiled ``maps.bpf.o`` (cached by the source, flags and clang version)."""
    out = Path(out_dir) if out_dir is not None else BUILD
    out.mkdir(parents=True, exist_ok=True)
    if shutil.which(CLANG) is None:
        raise BuildError("%s is not installed: cannot build %s" % (CLANG, SOURCE.name))
    includes = _clang_system_includes(CLANG)
    version = subprocess.run([CLANG, "--version"], capture_output=True, text=True).stdout
    h = hashlib.sha256()
    for part in (version, " ".join(CLANG_FLAGS), " ".join(includes)):
        h.update(part.encode() + b"\0")
    h.update(SOURCE.read_bytes())
    obj = out / ("maps-%s.bpf.o" % h.hexdigest()[:16])
    if obj.exists():
        return obj
    fd, tmp = tempfile.mkstemp(dir=out, prefix=obj.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        cmd = [CLANG, *CLANG_FLAGS, *includes, "-c", str(SOURCE), "-o", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise BuildError("%s failed (exit %d):\n%s" % (" ".join(cmd), proc.returncode,
                                                          (proc.stderr + proc.stdout).strip()))
        os.replace(tmp, obj)  # concurrent builds never see half a file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return obj


def key_bytes(k: int) -> bytes:
    return k.to_bytes(4, "little")


def value_bytes(k: int) -> bytes:
    """The value the fill stores for key ``k`` (and the programs write back)."""
    return k.to_bytes(8, "little")


# --- the kernel side: libbpf through ctypes ----------------------------------------


class TestRunOpts(ctypes.Structure):
    """``struct bpf_test_run_opts`` of libbpf >= 0.7 (bpf/bpf.h)."""

    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("data_in", ctypes.c_void_p),
        ("data_out", ctypes.c_void_p),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_void_p),
        ("ctx_out", ctypes.c_void_p),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("repeat", ctypes.c_int),
        ("duration", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
    ]


_libbpf = None


def libbpf() -> ctypes.CDLL:
    """Debian's ``libbpf.so.1`` with the prototypes this module uses."""
    global _libbpf
    if _libbpf is not None:
        return _libbpf
    name = "libbpf.so.1"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError:
        found = ctypes.util.find_library("bpf")
        if not found:
            raise KernelUnavailable("libbpf.so.1 not found (apt-get install libbpf1)") from None
        lib = ctypes.CDLL(found, use_errno=True)
    P, I, U32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32
    for fn, res, args in (
        ("bpf_object__open_file", P, [ctypes.c_char_p, P]),
        ("bpf_object__load", I, [P]),
        ("bpf_object__close", None, [P]),
        ("bpf_object__find_program_by_name", P, [P, ctypes.c_char_p]),
        ("bpf_object__next_program", P, [P, P]),
        ("bpf_program__name", ctypes.c_char_p, [P]),
        ("bpf_program__set_autoload", I, [P, ctypes.c_bool]),
        ("bpf_program__fd", I, [P]),
        ("bpf_object__find_map_by_name", P, [P, ctypes.c_char_p]),
        ("bpf_map__fd", I, [P]),
        ("bpf_map_update_elem", I, [I, P, P, ctypes.c_uint64]),
        ("bpf_map_lookup_elem", I, [I, P, P]),
        ("bpf_prog_test_run_opts", I, [I, ctypes.POINTER(TestRunOpts)]),
        ("libbpf_num_possible_cpus", I, []),
    ):
        f = getattr(lib, fn)
        f.restype, f.argtypes = res, args
    _libbpf = lib
    return lib


def _err(rc: int) -> int:
    """errno of a failed libbpf call (libbpf 1.x returns -errno and sets errno)."""
    return -rc if rc < 0 else (ctypes.get_errno() or errno.EINVAL)


class KernelObject:
    """``maps.bpf.o`` loaded into the kernel by libbpf (only ``programs``, if given).

    Raises :class:`KernelUnavailable` when libbpf or the bpf syscall is not usable.
    """

    PACKET = bytes(64)  # an skb test run needs at least an Ethernet header of data

    def __init__(self, path: Path | str, programs: list[str] | tuple[str, ...] | None = None):
        lib = libbpf()
        self.lib = lib
        self.obj = lib.bpf_object__open_file(os.fsencode(path), None)
        if not self.obj:
            e = ctypes.get_errno()
            raise KernelUnavailable("libbpf cannot open %s: %s" % (path, os.strerror(e) if e else "error"))
        try:
            if programs is not None:
                wanted = set(programs)
                p = lib.bpf_object__next_program(self.obj, None)
                while p:
                    lib.bpf_program__set_autoload(p, lib.bpf_program__name(p).decode() in wanted)
                    p = lib.bpf_object__next_program(self.obj, p)
            rc = lib.bpf_object__load(self.obj)
            if rc:
                e = _err(rc)
                hint = " (run as root)" if e in (errno.EPERM, errno.EACCES) else ""
                raise KernelUnavailable("libbpf cannot load %s into the kernel: %s%s"
                                        % (Path(path).name, os.strerror(e), hint))
            self.nr_cpus = lib.libbpf_num_possible_cpus()
            self._packet = ctypes.create_string_buffer(self.PACKET, len(self.PACKET))
        except BaseException:
            self.close()
            raise

    def prog_fd(self, name: str) -> int:
        p = self.lib.bpf_object__find_program_by_name(self.obj, name.encode())
        fd = self.lib.bpf_program__fd(p) if p else -1
        if fd < 0:
            raise KeyError("program %r is not loaded" % name)
        return fd

    def map_fd(self, name: str) -> int:
        m = self.lib.bpf_object__find_map_by_name(self.obj, name.encode())
        fd = self.lib.bpf_map__fd(m) if m else -1
        if fd < 0:
            raise KeyError("no map %r" % name)
        return fd

    def update(self, map_name: str, key: bytes, value: bytes) -> None:
        """Set ``key`` to ``value`` (on every CPU for per-CPU maps)."""
        if map_name in PERCPU:
            value = value.ljust((len(value) + 7) // 8 * 8, b"\0") * self.nr_cpus
        rc = self.lib.bpf_map_update_elem(self.map_fd(map_name), key, value, 0)
        if rc:
            raise OSError(_err(rc), "bpf_map_update_elem(%s): %s" % (map_name, os.strerror(_err(rc))))

    def lookup(self, map_name: str, key: bytes) -> bytes | None:
        """The value of ``key`` (per-CPU maps: the values of all CPUs, concatenated)."""
        size = 8 * self.nr_cpus if map_name in PERCPU else 8
        out = ctypes.create_string_buffer(size)
        rc = self.lib.bpf_map_lookup_elem(self.map_fd(map_name), key, out)
        if rc == -errno.ENOENT or (rc and ctypes.get_errno() == errno.ENOENT):
            return None
        if rc:
            raise OSError(_err(rc), "bpf_map_lookup_elem(%s): %s" % (map_name, os.strerror(_err(rc))))
        return out.raw

    def opts(self, repeat: int) -> TestRunOpts:
        """Test-run options for ``repeat`` runs on a 64-byte zero packet (reusable)."""
        return TestRunOpts(sz=ctypes.sizeof(TestRunOpts), data_in=ctypes.addressof(self._packet),
                           data_size_in=len(self.PACKET), repeat=repeat)

    def test_run(self, fd: int, opts: TestRunOpts) -> tuple[int, int]:
        """One ``BPF_PROG_TEST_RUN``: (r0, mean ns per run as the kernel measured it)."""
        while True:
            rc = self.lib.bpf_prog_test_run_opts(fd, ctypes.byref(opts))
            if rc == 0:
                return opts.retval, opts.duration
            e = _err(rc)
            if e != errno.EINTR:  # a signal stops the kernel's repeat loop: run again
                raise OSError(e, "BPF_PROG_TEST_RUN: %s" % os.strerror(e))

    def run(self, program: str, repeat: int = 1) -> tuple[int, int]:
        return self.test_run(self.prog_fd(program), self.opts(repeat))

    def close(self) -> None:
        obj, self.obj = getattr(self, "obj", None), None
        if obj:
            self.lib.bpf_object__close(obj)

    def __enter__(self) -> "KernelObject":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def kernel_problem(obj_path: Path | str) -> str | None:
    """None if the kernel side works here, else why not (loads and runs the baseline once)."""
    try:
        with KernelObject(obj_path, [BASELINE]) as k:
            k.run(BASELINE)
    except (KernelUnavailable, OSError) as e:
        return str(e)
    return None


# --- the userspace side: hybrid -------------------------------------------------------


class UserObject:
    """``maps.bpf.o`` loaded by ``hybrid.load``; :meth:`engine` builds one program's engine."""

    def __init__(self, path: Path | str):
        import hybrid

        self.obj = hybrid.load(path)
        self._engines: dict[tuple[str, str], object] = {}

    def update(self, map_name: str, key: bytes, value: bytes) -> None:
        self.obj.maps[map_name].update(key, value)  # per-CPU maps: the value on every CPU

    def lookup(self, map_name: str, key: bytes):
        return self.obj.maps[map_name].lookup(key)

    def engine(self, program: str, kind: str):
        """The ``kind`` engine of one program (only that program is compiled)."""
        from hybrid.user.engine import create_engine

        eng = self._engines.get((program, kind))
        if eng is None:
            eng = self._engines[program, kind] = create_engine(kind, self.obj.programs[program].program)
        return eng

    def close(self) -> None:
        for eng in self._engines.values():
            eng.close()
        self._engines.clear()
        self.obj.close()

    def __enter__(self) -> "UserObject":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def fill(side, maps: tuple[str, ...] | list[str] = MAPS) -> None:
    """Put keys 0..NR_KEYS-1 (value = key) into ``maps`` of a :class:`KernelObject` or :class:`UserObject`."""
    for name in maps:
        for k in range(NR_KEYS):
            side.update(name, key_bytes(k), value_bytes(k))


NativeEntry = ctypes.CFUNCTYPE(ctypes.c_uint64, ctypes.c_void_p, ctypes.c_uint64)
