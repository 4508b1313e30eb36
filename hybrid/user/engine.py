"""One interface for the three engines: interpreter, LLVM JIT, AOT.

Every engine runs a verified :class:`~hybrid.user.program.Program` with the
calling convention of the kernel and of the conformance suite: ``r1`` points
at the context (the input memory), ``r2`` holds its length, the result is
``r0`` as an unsigned 64-bit integer.  Native engines (JIT, AOT) expose the
entry point as a C function ``uint64_t fn(void *ctx, uint64_t len)``.

After every run, every engine calls ``hybrid_bridge_flush()`` once this
process has maps backed by kernel maps in syscall mode
(:func:`enable_bridge_flush`): a program's writes through its lookups of
those maps reach the kernel at the end of the run (``hybrid/native/maps.c``).
"""

from __future__ import annotations

import ctypes
import importlib
from typing import Protocol, runtime_checkable

from hybrid.closable import Closable
from hybrid.errors import EngineError
from hybrid.user.program import Program

NativeEntry = ctypes.CFUNCTYPE(ctypes.c_uint64, ctypes.c_void_p, ctypes.c_uint64)

Ctx = bytes | bytearray | memoryview | None

# hybrid_bridge_flush of hybrid._native, once a syscall-mode bridged map exists in this process
_bridge_flush = None


def enable_bridge_flush(flush) -> None:
    """Call ``flush()`` after every run from now on (set by :mod:`hybrid.user.maps`)."""
    global _bridge_flush
    _bridge_flush = flush


def bridge_flush() -> None:
    """Write back the calling thread's pending lookups of syscall-mode bridged maps (a no-op without any)."""
    if _bridge_flush is not None:
        _bridge_flush()


@runtime_checkable
class Engine(Protocol):
    name: str
    program: Program

    def run(self, ctx: Ctx = None) -> int:
        """Run once on a copy of ``ctx``; a ``bytearray`` gets the program's writes back."""
        ...

    def run_ptr(self, addr: int, size: int) -> int:
        """Run once with ``r1 = addr``, ``r2 = size`` (memory owned by the caller)."""
        ...

    def close(self) -> None: ...


class EngineBase(Closable):
    """The ``run`` -> ``run_ptr`` copy shared by all engines; ``with`` closes."""

    name = "?"

    def run(self, ctx: Ctx = None) -> int:
        if not ctx:
            return self.run_ptr(0, 0)
        size = len(ctx)
        buf = (ctypes.c_char * size).from_buffer_copy(bytes(ctx))
        result = self.run_ptr(ctypes.addressof(buf), size)
        if isinstance(ctx, bytearray):
            ctx[:] = buf.raw
        return result

    def run_ptr(self, addr: int, size: int) -> int:  # pragma: no cover
        raise NotImplementedError


class NativeEngine(EngineBase):
    """An engine whose program is a native function ``u64 fn(void *ctx, u64 len)``."""

    def __init__(self, program: Program):
        self.program = program
        self._fn = None

    @property
    def address(self) -> int:
        """The entry point's address, for trampolines and benchmarks."""
        if self._fn is None:
            raise EngineError("%s engine for %r is closed" % (self.name, self.program.name))
        return ctypes.cast(self._fn, ctypes.c_void_p).value

    def run_ptr(self, addr: int, size: int) -> int:
        if self._fn is None:
            raise EngineError("%s engine for %r is closed" % (self.name, self.program.name))
        result = self._fn(addr, size)
        if _bridge_flush is not None:
            _bridge_flush()
        return result


ENGINES = {
    "interp": ("hybrid.user.interp", "Interpreter"),
    "jit": ("hybrid.user.jit", "LlvmJit"),
    "aot": ("hybrid.user.aot", "AotEngine"),
}


def create_engine(kind: str, program: Program) -> Engine:
    """The engine named ``kind`` ("interp", "jit", "aot") loaded with ``program``."""
    try:
        module, cls = ENGINES[kind]
    except KeyError:
        raise EngineError("unknown engine %r (choose from %s)" % (kind, ", ".join(ENGINES))) from None
    try:
        engine_cls = getattr(importlib.import_module(module), cls)
    except ImportError as e:
        raise EngineError("engine %r is not available: %s" % (kind, e)) from e
    return engine_cls(program)
