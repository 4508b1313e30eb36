"""The LLVM JIT engine: lower, optimize at -O3, compile in memory with MCJIT.

Helper calls are direct calls to ``hybrid_helper_<name>``, bound to the
native helpers of ``hybrid._native`` with ``llvm.add_symbol`` before the
code is generated.
"""

from __future__ import annotations

import time

import llvmlite.binding as llvm

from hybrid import native
from hybrid.errors import EngineError
from hybrid.user import codegen
from hybrid.user.engine import NativeEngine, NativeEntry
from hybrid.user.helpers import RUNTIME_SYMBOLS, HelperSpec
from hybrid.user.lower import ENTRY, used_helpers
from hybrid.user.program import Program


def bind_helpers(helpers: list[HelperSpec]) -> None:
    """Make the native implementations of ``helpers`` visible to the JIT linker."""
    for spec in helpers:
        llvm.add_symbol(spec.symbol, native.helper_address(spec.native or spec.name))
    for symbol in RUNTIME_SYMBOLS:
        llvm.add_symbol(symbol, native.symbol_address(symbol))


class LlvmJit(NativeEngine):
    """A program compiled to native code in this process.

    ``compile_seconds`` is the time spent lowering, optimizing and generating
    code; ``ir_text`` is the optimized IR, ``asm_text`` (computed on first
    use) the native assembly.
    """

    name = "jit"

    def __init__(self, program: Program):
        super().__init__(program)
        self._engine: llvm.ExecutionEngine | None = None
        self._asm: str | None = None
        start = time.perf_counter()
        bind_helpers(used_helpers(program))
        tm = codegen.target_machine(jit=True)
        mod = codegen.optimized_module(program, tm)
        self.ir_text = str(mod)
        try:
            self._engine = llvm.create_mcjit_compiler(mod, tm)
            self._engine.finalize_object()
        except RuntimeError as e:
            raise EngineError("program %r: LLVM code generation failed: %s" % (program.name, e)) from None
        addr = self._engine.get_function_address(ENTRY)
        if not addr:
            raise EngineError("program %r: JIT produced no %s" % (program.name, ENTRY))
        self._fn = NativeEntry(addr)
        self.compile_seconds = time.perf_counter() - start

    @property
    def asm_text(self) -> str:
        """Native assembly of the program (recompiled from ``ir_text``, for reading only)."""
        if self._asm is None:
            self._asm = codegen.assembly(self.ir_text, self.program)
        return self._asm

    def close(self) -> None:
        """Free the generated code; the engine cannot run afterwards.  Idempotent."""
        self._fn = None
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.close()
