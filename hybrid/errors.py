"""The one exception module of hybrid.

Every error hybrid raises on purpose is a :class:`HybridError`.  Foreign
errors (pyelftools, llvmlite, OS errors from the kernel) are translated into
one of these once, at the boundary where they enter hybrid, so callers only
ever need ``except HybridError``.
"""

from __future__ import annotations


class HybridError(Exception):
    """Base class of every error hybrid raises."""


class DecodeError(HybridError):
    """Bytecode that cannot be split into instructions (truncated, misaligned)."""


class AssemblerError(HybridError):
    """Assembler text that cannot be assembled; names the line."""


class VerifierError(HybridError):
    """A program refused at load time; the message names the instruction.

    ``VerifierError: insn #5 (call 63): unknown helper 63``
    """

    def __init__(self, message: str, pc: int | None = None):
        super().__init__(message)
        self.pc = pc


class VmError(HybridError):
    """A fault while a program runs (bad memory access, call depth, ...)."""

    def __init__(self, message: str, pc: int | None = None):
        super().__init__(message)
        self.pc = pc


class EngineError(HybridError):
    """An engine could not compile or load a program (LLVM, linker, dlopen)."""


class ConformanceFormatError(HybridError):
    """A conformance ``.data`` file that cannot be parsed."""
