"""The syscall benchmark's loop, target and programs: build them, attach them, count hits.

* ``programs/sysloop.c``: ``long getppid_loop(long n)``, ``n`` calls of
  libc's ``getppid()``; built with gcc into a shared library the measuring
  process calls through ctypes (:class:`Loop`) and, with ``-DSYSLOOP_MAIN``,
  into the executable the "untraced process" rows target (:class:`Child`: it
  sleeps in ``read`` and runs ``getppid_loop(n)`` for each ``n`` it is sent).
* ``programs/syscalls.bpf.c``: ``count_enter`` on
  ``tracepoint/syscalls/sys_enter_getppid`` and ``count_exit`` on
  ``tracepoint/syscalls/sys_exit_getppid``, counting in slot :data:`ENTER` /
  :data:`EXIT` of the ARRAY map ``counts`` only when the current tgid is the
  ``const volatile u32 target_tgid`` set before load.

The one object is loaded by both sides:

* the kernel (:class:`KernelProbes`): :class:`hybrid.kernel.KernelObject`
  (libbpf through ctypes), ``.rodata`` set to the target tgid, each program
  attached to its kernel tracepoint (the kernel runs it on every process's
  getppid, the program filters);
* hybrid (:class:`UserProbes`): ``hybrid.load(path, values=..., kernel=False)``
  and ``obj.attach(pid, programs=...)``: the agent hooks every ``syscall``
  instruction of libc (and of the main executable) of the traced process,
  in this process (JIT'd code) or, with a pid, in that process (ptrace, AOT
  code).  Only syscalls made from those modules are seen: a ``syscall``
  instruction in another library (a static binary's, an inline asm) is not.

Builds are cached by content in ``bench/build/`` like the other suites.
"""

from __future__ import annotations

import ctypes
import os
import select
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import map_programs as mp
import probe_programs as pp

BENCH = Path(__file__).resolve().parent
LOOP_SOURCE = BENCH / "programs" / "sysloop.c"
BPF_SOURCE = BENCH / "programs" / "syscalls.bpf.c"
BUILD = BENCH / "build"

GCC = pp.GCC
GCC_FLAGS = ("-O2", "-Wall", "-Werror")
CLANG = mp.CLANG
CLANG_FLAGS = mp.CLANG_FLAGS

ENTER, EXIT = 0, 1  # slots of the `counts` map
TARGET_VAR = "target_tgid"

# probe -> the programs attached (sys_enter only, or both)
PROBES: dict[str, tuple[str, ...]] = {
    "sys_enter": ("count_enter",),
    "sys_enter+sys_exit": ("count_enter", "count_exit"),
}

BuildError = pp.BuildError


class SideUnavailable(Exception):
    """A side (kernel or user) cannot attach here; the message says why."""


# --- building ---------------------------------------------------------------------


@dataclass(frozen=True)
class Artifacts:
    loop: Path  # sysloop.c as a shared library (getppid_loop)
    child: Path  # sysloop.c as an executable (the untraced rows' target)
    bpf: Path  # syscalls.bpf.o


def _build_gcc(out: Path, kind: str) -> Path:
    flags = [*GCC_FLAGS, *(("-shared", "-fPIC") if kind == "so" else ("-DSYSLOOP_MAIN",))]
    path = out / ("sysloop-%s%s" % (pp._digest(pp._version(GCC), " ".join(flags), LOOP_SOURCE.read_bytes()),
                                     ".so" if kind == "so" else ""))
    if not path.exists():
        pp._build_atomic(path, lambda tmp: [GCC, *flags, "-o", tmp, str(LOOP_SOURCE)], "sysloop.c (%s)" % kind)
        os.chmod(path, 0o755)
    return path


def build_bpf(out_dir: Path | str | None = None) -> Path:
    out = Path(out_dir) if out_dir is not None else BUILD
    out.mkdir(parents=True, exist_ok=True)
    if shutil.which(CLANG) is None:
        raise BuildError("%s is not installed: cannot build %s" % (CLANG, BPF_SOURCE.name))
    flags = [*CLANG_FLAGS, "-I%s" % pp.vmlinux_h(out), *mp._clang_system_includes(CLANG)]
    obj = out / ("syscalls-%s.bpf.o" % pp._digest(pp._version(CLANG), " ".join(flags), BPF_SOURCE.read_bytes()))
    if not obj.exists():
        pp._build_atomic(obj, lambda tmp: [CLANG, *flags, "-c", str(BPF_SOURCE), "-o", tmp], "syscalls.bpf.c")
    return obj


def build(out_dir: Path | str | None = None) -> Artifacts:
    """The loop library, the child executable and the eBPF object (cached by content)."""
    out = Path(out_dir) if out_dir is not None else BUILD
    out.mkdir(parents=True, exist_ok=True)
    if shutil.which(GCC) is None:
        raise BuildError("%s is not installed: cannot build %s" % (GCC, LOOP_SOURCE.name))
    return Artifacts(_build_gcc(out, "so"), _build_gcc(out, "exe"), build_bpf(out))


# --- the loop in this process, the child ------------------------------------------------


class Loop:
    """``getppid_loop`` loaded in this process: ``run(n)`` makes n getppid() calls through libc."""

    def __init__(self, lib: Path | str):
        self.lib = ctypes.CDLL(str(lib))
        self.fn = self.lib.getppid_loop
        self.fn.restype = ctypes.c_long
        self.fn.argtypes = [ctypes.c_long]

    def run(self, n: int) -> None:
        got = self.fn(n)
        if got != n:
            raise RuntimeError("getppid_loop(%d): %d calls returned a pid" % (n, got))


class Child:
    """The untraced rows' target: sysloop's executable, asleep in ``read`` until sent a count."""

    TIMEOUT = 10.0

    def __init__(self, exe: Path | str):
        self.p = subprocess.Popen([str(exe)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.pid = self.p.pid
        line = self._line()
        if line != "ready %d" % self.pid:
            self.close()
            raise RuntimeError("%s did not start: %r" % (exe, line))

    def _line(self) -> str:
        ready, _, _ = select.select([self.p.stdout], [], [], self.TIMEOUT)
        if not ready:
            raise RuntimeError("sysloop child %d: no answer in %.0f s" % (self.pid, self.TIMEOUT))
        return self.p.stdout.readline().strip()

    def run(self, n: int) -> None:
        """The child makes ``n`` getppid() calls (and has made them when this returns)."""
        self.p.stdin.write("%d\n" % n)
        self.p.stdin.flush()
        got = self._line()
        if got != str(n):
            raise RuntimeError("sysloop child %d: getppid_loop(%d) answered %r" % (self.pid, n, got))

    def close(self) -> None:
        p = getattr(self, "p", None)
        if p is None:
            return
        try:
            p.stdin.close()
            p.wait(timeout=2)
        except (OSError, subprocess.TimeoutExpired):
            p.kill()
            p.wait()
        p.stdout.close()


def getppid_code() -> bytes:
    """The first 16 bytes of libc's getppid as this process sees them (hybrid's in-process hook patches them)."""
    libc = ctypes.CDLL(None)
    return ctypes.string_at(ctypes.cast(libc.getppid, ctypes.c_void_p).value, 16)


def getppid_file_code() -> bytes:
    """The same 16 bytes in the libc file."""
    from hybrid.user.attach.symbols import find_library, read_code, resolve_symbol

    libc = os.path.realpath(find_library("libc.so.6"))
    return read_code(libc, resolve_symbol(libc, "getppid").vaddr, 16)


# --- the probes on each side -------------------------------------------------------


def _u64(raw) -> int:
    return 0 if raw is None else int.from_bytes(bytes(raw)[:8], "little")


def rodata(obj_path: Path | str, tgid: int) -> bytes:
    """The object's ``.rodata`` with ``target_tgid`` = tgid (what a skeleton's ``rodata->target_tgid = tgid`` sets)."""
    from hybrid.user.elf import load_object_spec

    spec = load_object_spec(os.fspath(obj_path)).with_values(**{TARGET_VAR: tgid})
    return spec.maps[spec.variable(TARGET_VAR).map_index].initial


class Probes:
    """The programs of one probe kind loaded and attached on one side; ``counts()`` = (enters, exits)."""

    side = "?"

    def counts(self) -> tuple[int, int]:
        return (_u64(self._lookup(ENTER)), _u64(self._lookup(EXIT)))

    def _lookup(self, slot: int):
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class KernelProbes(Probes):
    """libbpf (``hybrid.kernel.KernelObject``): the programs on the kernel's syscall tracepoints,
    counting the calls of process ``tgid`` (every process's getppid runs them)."""

    side = "kernel"

    def __init__(self, obj_path: Path | str, probe: str, tgid: int):
        from hybrid.errors import HybridError
        from hybrid.kernel import KernelObject

        self.k = None
        try:
            self.k = KernelObject(obj_path, programs=PROBES[probe], initial={".rodata": rodata(obj_path, tgid)})
            for name in PROBES[probe]:
                self.k.attach(name)
            self.map = self.k.map("counts")
        except HybridError as e:
            self.close()
            raise SideUnavailable(str(e)) from None
        except BaseException:
            self.close()
            raise

    def _lookup(self, slot: int):
        return self.map.lookup(slot.to_bytes(4, "little"))

    def close(self) -> None:
        k, self.k = self.k, None
        if k is not None:
            k.close()  # detaches the links


class UserProbes(Probes):
    """hybrid: the same object in hybrid's VM, attached in this process (``pid`` None: JIT'd code
    behind hooks of this process's libc syscall sites) or in process ``pid`` (ptrace, AOT code)."""

    side = "user"

    def __init__(self, obj_path: Path | str, probe: str, tgid: int, pid: int | None = None):
        import hybrid
        from hybrid.errors import HybridError

        self.obj = self.attachment = None
        try:
            self.obj = hybrid.load(obj_path, values={TARGET_VAR: tgid}, kernel=False)
            self.attachment = self.obj.attach(pid, programs=list(PROBES[probe]))
            self.map = self.obj.maps["counts"]
        except HybridError as e:
            self.close()
            raise SideUnavailable(str(e)) from None
        except BaseException:
            self.close()
            raise

    def _lookup(self, slot: int):
        return self.map.lookup(slot.to_bytes(4, "little"))

    def close(self) -> None:
        att, self.attachment = self.attachment, None
        try:
            if att is not None:
                att.detach()
        finally:
            obj, self.obj = self.obj, None
            if obj is not None:
                obj.close()


def attach(side: str, art: Artifacts, probe: str, tgid: int, pid: int | None = None) -> Probes:
    """``probe``'s programs on ``side`` counting process ``tgid``'s getppid calls; hybrid's are placed
    in process ``pid`` (None: this one), the kernel's are system-wide."""
    if side == "kernel":
        return KernelProbes(art.bpf, probe, tgid)
    if side == "user":
        return UserProbes(art.bpf, probe, tgid, pid)
    raise ValueError("unknown side %r" % side)


def expected_counts(probe: str, calls: int) -> tuple[int, int]:
    return (calls, calls if "count_exit" in PROBES[probe] else 0)


def check_counts(probes: Probes, before: tuple[int, int], want: tuple[int, int], what: str) -> tuple[int, int]:
    """The counts now; raises unless they grew by exactly ``want`` since ``before``."""
    now = probes.counts()
    got = (now[0] - before[0], now[1] - before[1])
    if got != want:
        raise RuntimeError("%s: the probes counted (enter, exit) = %s, expected %s" % (what, got, want))
    return now
