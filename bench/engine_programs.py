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
the iteration count, and ``u64 seed``).  Builds are cached by content in
``bench/build/`` (or the ``out_dir`` given), so pyperf's worker processes
reuse what the parent built.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
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
    n: int  # iterations per call for the native engines (gcc, jit, aot)
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
        BenchProgram("loop", n=1_000_000, interp_n=1_000, unit="one iteration of the mixing loop",
                     deterministic=True),
        BenchProgram("stack_mix", n=20_000, interp_n=20, unit="one round over 16 stack slots + one call",
                     deterministic=True),
        BenchProgram("helpers", n=100_000, interp_n=500, unit="one round of 4 helper calls",
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


def tools_missing() -> list[str]:
    """The compilers this module needs that are not on PATH."""
    return [tool for tool in (CLANG, GCC) if shutil.which(tool) is None]


# --- running -----------------------------------------------------------------

NativeEntry = ctypes.CFUNCTYPE(ctypes.c_uint64, ctypes.c_void_p, ctypes.c_uint64)


class Ctx(ctypes.Structure):
    """``struct bench_ctx`` of bench.h."""

    _fields_ = [("n", ctypes.c_uint64), ("seed", ctypes.c_uint64)]

    @classmethod
    def make(cls, n: int, seed: int) -> "Ctx":
        return cls(n, seed)

    @property
    def address(self) -> int:
        return ctypes.addressof(self)

    @property
    def size(self) -> int:
        return ctypes.sizeof(self)


def export_helpers() -> None:
    """Promote ``hybrid._native``'s symbols to global, so the gcc libraries can bind to them."""
    import hybrid._native

    ctypes.CDLL(hybrid._native.__file__, mode=os.RTLD_GLOBAL | os.RTLD_NOLOAD)


@dataclass
class NativeLibrary:
    """A gcc-built program, loaded: ``fn(ctx_address, size)`` is its ``entry``."""

    path: Path
    lib: ctypes.CDLL
    fn: NativeEntry

    @property
    def address(self) -> int:
        return ctypes.cast(self.fn, ctypes.c_void_p).value

    def run(self, ctx: Ctx) -> int:
        return self.fn(ctx.address, ctx.size)


def load_native(path: Path | str) -> NativeLibrary:
    export_helpers()
    lib = ctypes.CDLL(os.fspath(path), mode=os.RTLD_LOCAL | os.RTLD_NOW)
    fn = NativeEntry(ctypes.cast(lib.entry, ctypes.c_void_p).value)
    return NativeLibrary(Path(path), lib, fn)


def load_program(art: Artifacts):
    """The eBPF version as a verified :class:`hybrid.user.program.Program`."""
    from hybrid.user.program import Program

    return Program.load(art.code, name=art.name)
