"""The probe benchmark's victims and programs: build them, attach them, count hits.

* ``programs/victims.c``: ``victim_lea``, ``victim_push``, ``victim_nop5``
  (assembly: their first instructions decide the kernel's uprobe path, see
  :data:`VICTIMS`) and ``long victim_loop(int which, long n)``, which calls
  one of them ``n`` times; built with gcc into a shared library
  (:func:`build_victims`) and called through ctypes (:class:`Victims`).
* ``programs/probes.bpf.c``: a counting uprobe and uretprobe (slot
  :data:`ENTRY` / :data:`RETURN` of the ARRAY map ``counts``).  Built
  twice (:func:`build_probes`): with bare ``SEC("uprobe")`` sections for
  the kernel, where libbpf attaches them by file offset
  (:class:`KernelProbes`), and with ``SEC("uprobe/<victims.so>:victim_X")``
  sections for hybrid, whose ``BpfObject.attach(programs=...)`` attaches by
  section name (:class:`UserProbes`).  The program bodies are the same.

Both sides count their hits in the map: :meth:`Probes.counts` reads it, and
the benchmark checks that every call of a victim was seen before timing.
Builds are cached by content in ``bench/build/`` like the other suites.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import map_programs as mp

BENCH = Path(__file__).resolve().parent
VICTIMS_SOURCE = BENCH / "programs" / "victims.c"
PROBES_SOURCE = BENCH / "programs" / "probes.bpf.c"
BUILD = BENCH / "build"
KERNEL_BTF = Path("/sys/kernel/btf/vmlinux")

GCC = "gcc"
GCC_FLAGS = ("-O2", "-shared", "-fPIC", "-Wl,-Bsymbolic", "-Wall", "-Werror")
CLANG = mp.CLANG
CLANG_FLAGS = mp.CLANG_FLAGS
BPFTOOL = "bpftool"

ENTRY, RETURN = 0, 1  # slots of the `counts` map


@dataclass(frozen=True)
class Victim:
    name: str  # lea, push, nop5
    which: int  # victim_loop's selector
    prologue: bytes  # the function's first bytes, checked in the built library
    kernel_path: str  # what the kernel does on a uprobe hit there

    @property
    def symbol(self) -> str:
        return "victim_" + self.name

    def expected_sum(self, n: int) -> int:
        """victim_loop(which, n): sum of victim(i, 1) for i < n."""
        return n * (n + 1) // 2 + (n if self.name == "lea" else 0)


VICTIMS: tuple[Victim, ...] = (
    Victim("lea", 0, bytes.fromhex("488d0437 4883c001 c3"), "single-stepped out of line"),
    Victim("push", 1, bytes.fromhex("55 4889e5 488d0437 5d c3"), "push emulated"),
    Victim("nop5", 2, bytes.fromhex("0f1f440000 488d0437 c3"), "nop5 optimized"),
)
VICTIM = {v.name: v for v in VICTIMS}

# probe kind -> (entry program?, return program?)
PROBES: dict[str, tuple[bool, bool]] = {
    "uprobe": (True, False),
    "uretprobe": (False, True),
    "uprobe+uretprobe": (True, True),
}


class BuildError(Exception):
    """A benchmark input failed to build."""


class SideUnavailable(Exception):
    """A side (kernel or user) cannot attach here."""


# --- building ---------------------------------------------------------------------


def _tool(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/local/sbin")


def _digest(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update((p.encode() if isinstance(p, str) else p) + b"\0")
    return h.hexdigest()[:16]


def _build_atomic(out: Path, cmd_for, what: str, stdout_to_file: bool = False) -> None:
    """Run ``cmd_for(tmp)`` producing ``out`` via a temporary file (concurrent builds never see half a file)."""
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=out.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        cmd = cmd_for(tmp)
        if stdout_to_file:
            with open(tmp, "w") as f:
                proc = subprocess.run(cmd, stdout=f, stderr=subprocess.PIPE, text=True)
            out_text = proc.stderr
        else:
            proc = subprocess.run(cmd, capture_output=True, text=True)
            out_text = proc.stderr + proc.stdout
        if proc.returncode != 0:
            raise BuildError("%s: %s failed (exit %d):\n%s" % (what, " ".join(cmd), proc.returncode, out_text.strip()))
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _version(tool: str) -> str:
    return subprocess.run([tool, "--version"], capture_output=True, text=True).stdout


def build_victims(out_dir: Path | str | None = None) -> Path:
    """The victims' shared library (cached by source, flags and gcc version)."""
    out = Path(out_dir) if out_dir is not None else BUILD
    out.mkdir(parents=True, exist_ok=True)
    if shutil.which(GCC) is None:
        raise BuildError("%s is not installed: cannot build %s" % (GCC, VICTIMS_SOURCE.name))
    lib = out / ("victims-%s.so" % _digest(_version(GCC), " ".join(GCC_FLAGS), VICTIMS_SOURCE.read_bytes()))
    if not lib.exists():
        _build_atomic(lib, lambda tmp: [GCC, *GCC_FLAGS, "-o", tmp, str(VICTIMS_SOURCE)], "victims")
    check_victims(lib)
    return lib


def victim_offset(lib: Path | str, victim: Victim) -> int:
    """The file offset of ``victim``'s first instruction (libbpf's ``func_offset``)."""
    from hybrid.user.attach.symbols import resolve_symbol

    return resolve_symbol(str(lib), victim.symbol).file_offset


def check_victims(lib: Path | str) -> None:
    """Every victim starts with the instructions its row is about (not what a compiler chose)."""
    from hybrid.user.attach.symbols import read_code, resolve_symbol

    for v in VICTIMS:
        sym = resolve_symbol(str(lib), v.symbol)
        code = read_code(str(lib), sym.vaddr, len(v.prologue))
        if code != v.prologue or sym.size != len(v.prologue):
            raise BuildError("%s in %s is %s (%d bytes), expected %s" % (v.symbol, lib, code.hex(" "), sym.size,
                                                                        v.prologue.hex(" ")))


def vmlinux_h(out_dir: Path | str | None = None) -> Path:
    """The directory of a ``vmlinux.h`` generated from this kernel's BTF (cached by the BTF's content)."""
    out = Path(out_dir) if out_dir is not None else BUILD
    out.mkdir(parents=True, exist_ok=True)
    bpftool = _tool(BPFTOOL)
    if bpftool is None:
        raise BuildError("bpftool is not installed: cannot generate vmlinux.h")
    if not KERNEL_BTF.exists():
        raise BuildError("%s does not exist: cannot generate vmlinux.h" % KERNEL_BTF)
    d = out / ("vmlinux-%s" % _digest(KERNEL_BTF.read_bytes()))
    header = d / "vmlinux.h"
    if not header.exists():
        d.mkdir(exist_ok=True)
        _build_atomic(header, lambda tmp: [bpftool, "btf", "dump", "file", str(KERNEL_BTF), "format", "c"],
                      "vmlinux.h", stdout_to_file=True)
    return d


def build_probes(victims_lib: Path | str | None = None, out_dir: Path | str | None = None) -> Path:
    """``probes.bpf.o``: bare sections (kernel), or ``uprobe/<victims_lib>:victim_X`` ones (hybrid)."""
    out = Path(out_dir) if out_dir is not None else BUILD
    out.mkdir(parents=True, exist_ok=True)
    if shutil.which(CLANG) is None:
        raise BuildError("%s is not installed: cannot build %s" % (CLANG, PROBES_SOURCE.name))
    header_dir = vmlinux_h(out)
    includes = mp._clang_system_includes(CLANG)
    defines = [] if victims_lib is None else ['-DVICTIM_LIB="%s"' % os.fspath(victims_lib)]
    flags = [*CLANG_FLAGS, "-I%s" % header_dir, *includes, *defines]
    obj = out / ("probes-%s-%s.bpf.o" % ("kernel" if victims_lib is None else "user",
                                         _digest(_version(CLANG), " ".join(flags), PROBES_SOURCE.read_bytes())))
    if not obj.exists():
        _build_atomic(obj, lambda tmp: [CLANG, *flags, "-c", str(PROBES_SOURCE), "-o", tmp], "probes.bpf.c")
    return obj


@dataclass(frozen=True)
class Artifacts:
    victims: Path  # the victims' shared library
    kernel_object: Path  # bare SEC("uprobe") sections
    user_object: Path  # SEC("uprobe/<victims>:victim_X") sections


def build(out_dir: Path | str | None = None) -> Artifacts:
    lib = build_victims(out_dir)
    return Artifacts(lib, build_probes(None, out_dir), build_probes(lib, out_dir))


# --- the victims, called through ctypes ------------------------------------------------


class Victims:
    """The victims' library loaded in this process: ``loop(victim, n)`` runs ``victim_loop``."""

    def __init__(self, lib: Path | str):
        self.path = str(lib)
        self.lib = ctypes.CDLL(self.path)
        self.fn = self.lib.victim_loop
        self.fn.restype = ctypes.c_long
        self.fn.argtypes = [ctypes.c_int, ctypes.c_long]

    def loop(self, victim: Victim, n: int) -> int:
        got = self.fn(victim.which, n)
        if got != victim.expected_sum(n):
            raise RuntimeError("victim_loop(%s, %d) returned %d, expected %d: a probe changed the victim's result"
                               % (victim.name, n, got, victim.expected_sum(n)))
        return got


# --- the probes on each side -------------------------------------------------------


def _u64(raw: bytes | None) -> int:
    return 0 if raw is None else int.from_bytes(raw[:8], "little")


class Probes:
    """A probe kind attached to one victim on one side; ``counts()`` is (entry hits, return hits)."""

    side = "?"

    def counts(self) -> tuple[int, int]:
        return (_u64(self._lookup(ENTRY)), _u64(self._lookup(RETURN)))

    def _lookup(self, slot: int) -> bytes | None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _libbpf_attach_api(lib: ctypes.CDLL) -> ctypes.CDLL:
    P = ctypes.c_void_p
    for fn, res, args in (
        ("bpf_program__attach_uprobe", P, [P, ctypes.c_bool, ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t]),
        ("bpf_link__destroy", ctypes.c_int, [P]),
    ):
        f = getattr(lib, fn)
        f.restype, f.argtypes = res, args
    return lib


class KernelProbes(Probes):
    """The bare-section object loaded by libbpf; ``count``/``count_ret`` attached to the victim
    with ``bpf_program__attach_uprobe(prog, retprobe, pid, lib, file offset)`` (this process only)."""

    side = "kernel"

    def __init__(self, kernel_object: Path | str, lib: Path | str, victim: Victim, probe: str, pid: int | None = None):
        entry, ret = PROBES[probe]
        progs = (["count"] if entry else []) + (["count_ret"] if ret else [])
        try:
            self.k = mp.KernelObject(kernel_object, progs)
        except mp.KernelUnavailable as e:
            raise SideUnavailable(str(e)) from None
        self.links: list[int] = []
        try:
            api = _libbpf_attach_api(self.k.lib)
            offset = victim_offset(lib, victim)
            for name in progs:
                prog = api.bpf_object__find_program_by_name(self.k.obj, name.encode())
                link = api.bpf_program__attach_uprobe(prog, name == "count_ret", os.getpid() if pid is None else pid,
                                                      os.fsencode(lib), offset)
                if not link:
                    e = ctypes.get_errno() or errno.EINVAL
                    raise SideUnavailable("libbpf cannot attach %s to %s+%#x: %s"
                                          % (name, victim.symbol, offset, os.strerror(e)))
                self.links.append(link)
        except BaseException:
            self.close()
            raise

    def _lookup(self, slot: int) -> bytes | None:
        return self.k.lookup("counts", slot.to_bytes(4, "little"))

    def close(self) -> None:
        for link in getattr(self, "links", ()):
            self.k.lib.bpf_link__destroy(link)
        self.links = []
        k = getattr(self, "k", None)
        if k is not None:
            k.close()


class UserProbes(Probes):
    """The named-section object loaded by ``hybrid.load`` and attached in this process
    (``obj.attach(programs=[count_<victim>, ...])``: inline hooks calling the JIT's code)."""

    side = "user"

    def __init__(self, user_object: Path | str, victim: Victim, probe: str, engine: str = "jit"):
        import hybrid
        from hybrid.errors import HybridError

        entry, ret = PROBES[probe]
        progs = (["count_" + victim.name] if entry else []) + (["count_ret_" + victim.name] if ret else [])
        self.obj = hybrid.load(user_object)
        self.attachment = None
        try:
            self.attachment = self.obj.attach(programs=progs, engine=engine)
        except HybridError as e:
            self.close()
            raise SideUnavailable("hybrid cannot attach %s: %s" % (", ".join(progs), e)) from None
        except BaseException:
            self.close()
            raise

    def _lookup(self, slot: int) -> bytes | None:
        return self.obj.maps["counts"].lookup(slot.to_bytes(4, "little"))

    def close(self) -> None:
        att, self.attachment = getattr(self, "attachment", None), None
        try:
            if att is not None:
                att.detach()
        finally:
            obj, self.obj = getattr(self, "obj", None), None
            if obj is not None:
                obj.close()


def patched_insn(victims: "Victims", victim: Victim) -> str:
    """What the first instruction of ``victim`` is in this process's memory now: ``int3`` (a kernel
    uprobe's breakpoint), ``call`` (the kernel's optimized uprobe on a nop5), ``jmp`` (an inline hook),
    or the original (``lea``/``push``/``nop5``)."""
    code = ctypes.string_at(ctypes.cast(getattr(victims.lib, victim.symbol), ctypes.c_void_p).value, 5)
    if code == victim.prologue[:5]:
        return victim.name
    return {0xCC: "int3", 0xE8: "call", 0xE9: "jmp"}.get(code[0], code.hex(" "))


def attach(side: str, art: Artifacts, victim: Victim, probe: str) -> Probes:
    if side == "kernel":
        return KernelProbes(art.kernel_object, art.victims, victim, probe)
    if side == "user":
        return UserProbes(art.user_object, victim, probe)
    raise ValueError("unknown side %r" % side)


def expected_counts(probe: str, calls: int) -> tuple[int, int]:
    entry, ret = PROBES[probe]
    return (calls if entry else 0, calls if ret else 0)


def check_fired(probes: Probes, before: tuple[int, int], probe: str, calls: int, what: str) -> tuple[int, int]:
    """The counts now; raises unless the probe fired exactly once per call since ``before``."""
    now = probes.counts()
    got = (now[0] - before[0], now[1] - before[1])
    want = expected_counts(probe, calls)
    if got != want:
        raise RuntimeError("%s: %s probe fired (entry, return) = %s times for %d calls, expected %s: "
                           "not benchmarking a probe that does not run" % (what, probe, got, calls, want))
    return now


def side_problem(side: str, art: Artifacts) -> str | None:
    """None if ``side`` attaches and fires here (one uprobe on victim_push, 10 calls), else why not."""
    victims = Victims(art.victims)
    v = VICTIM["push"]
    try:
        with attach(side, art, v, "uprobe") as p:
            before = p.counts()
            victims.loop(v, 10)
            check_fired(p, before, "uprobe", 10, "%s side" % side)
    except SideUnavailable as e:
        return str(e)
    return None
