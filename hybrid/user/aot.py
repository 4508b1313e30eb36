"""The AOT engine: compile a program to a native object / shared library.

:func:`compile_object` emits a position-independent ELF object with the
same lowering and ``-O3`` pipeline as the JIT; :func:`build_shared` links
it with ``cc -shared`` into a ``.so`` exporting ``bpf_entry``.  The
helpers stay undefined symbols (``hybrid_helper_<name>``), resolved when
the library is loaded by :func:`load_shared` against the helper runtime
``hybrid._native``.  Loading needs no LLVM: llvmlite is imported only to
compile.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from hybrid.errors import EngineError
from hybrid.user.engine import NativeEngine, NativeEntry
from hybrid.user.program import Program

ENTRY = "bpf_entry"  # == hybrid.user.lower.ENTRY, kept here so loading never imports llvmlite
CC = os.environ.get("CC", "cc")

PathLike = str | os.PathLike


def compile_object(program: Program, path: PathLike | None = None) -> bytes:
    """The native object code of ``program``; also written to ``path`` if given."""
    from hybrid.user import codegen

    tm = codegen.target_machine(jit=False)
    mod = codegen.optimized_module(program, tm, entry=ENTRY)
    try:
        obj = tm.emit_object(mod)
    except RuntimeError as e:
        raise EngineError("program %r: LLVM code generation failed: %s" % (program.name, e)) from None
    if path is not None:
        Path(path).write_bytes(obj)
    return obj


def link_shared(obj_path: PathLike, out_path: PathLike, program_name: str = "prog") -> None:
    """``cc -shared`` the object into a library, leaving helper symbols undefined."""
    # -Bsymbolic: a program's own functions bind inside its library, never to another program's.
    cmd = [CC, "-shared", "-Wl,-Bsymbolic", "-o", os.fspath(out_path), os.fspath(obj_path)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        raise EngineError("program %r: cannot run the linker %r: %s" % (program_name, CC, e.strerror)) from None
    if proc.returncode != 0:
        raise EngineError("program %r: %s failed (exit %d): %s"
                          % (program_name, " ".join(cmd), proc.returncode, proc.stderr.strip()))


def build_shared(program: Program, out_path: PathLike) -> Path:
    """Compile ``program`` into the shared library ``out_path`` (exports ``bpf_entry``)."""
    out = Path(out_path)
    with tempfile.TemporaryDirectory(prefix="hybrid-aot-") as tmp:
        obj = Path(tmp) / "prog.o"
        compile_object(program, obj)
        link_shared(obj, out, program.name)
    return out


def export_helpers() -> None:
    """Make the ``hybrid_helper_*`` symbols of ``hybrid._native`` global for later dlopens.

    Python loads extension modules with ``RTLD_LOCAL``; re-opening the same
    file with ``RTLD_NOLOAD | RTLD_GLOBAL`` promotes its symbols.
    """
    from hybrid.native import module_path

    path = module_path()
    try:
        ctypes.CDLL(path, mode=os.RTLD_GLOBAL | os.RTLD_NOLOAD)
    except OSError as e:
        raise EngineError("cannot export the helper runtime %s: %s" % (path, e)) from None


def load_shared(path: PathLike, program: Program | None = None) -> tuple[ctypes.CDLL, NativeEntry]:
    """dlopen a library built by :func:`build_shared`: its handle and entry point."""
    name = program.name if program is not None else os.fspath(path)
    export_helpers()
    try:
        lib = ctypes.CDLL(os.fspath(path), mode=os.RTLD_LOCAL | os.RTLD_NOW)
        entry = getattr(lib, ENTRY)
    except (OSError, AttributeError) as e:
        raise EngineError("program %r: cannot load %s: %s" % (name, path, e)) from None
    return lib, NativeEntry(ctypes.cast(entry, ctypes.c_void_p).value)


def unload_shared(lib: ctypes.CDLL) -> None:
    """dlclose a library from :func:`load_shared`; its code must not run afterwards."""
    import _ctypes

    _ctypes.dlclose(lib._handle)


class AotEngine(NativeEngine):
    """A program compiled ahead of time into a shared library, then loaded.

    The library lives in a temporary directory removed by :meth:`close`.
    ``compile_seconds`` covers lowering, optimization, code generation and
    linking; ``library_path`` is the ``.so``.
    """

    name = "aot"

    def __init__(self, program: Program):
        super().__init__(program)
        self._lib: ctypes.CDLL | None = None
        self._dir: str | None = tempfile.mkdtemp(prefix="hybrid-aot-")
        try:
            start = time.perf_counter()
            self.library_path = build_shared(program, Path(self._dir) / "prog.so")
            self.compile_seconds = time.perf_counter() - start
            self._lib, self._fn = load_shared(self.library_path, program)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Unload the library and remove its directory.  Idempotent."""
        self._fn = None
        lib, self._lib = self._lib, None
        if lib is not None:
            unload_shared(lib)
        tmp, self._dir = self._dir, None
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
