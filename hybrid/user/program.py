"""A verified program: instructions plus the helpers it may call."""

from __future__ import annotations

from dataclasses import dataclass, field

from hybrid.user import isa
from hybrid.user.helpers import BASE_HELPERS, HelperTable


@dataclass(frozen=True)
class Program:
    """Instructions that passed the verifier, ready for any engine.

    Build one with :meth:`Program.load`, which decodes and verifies; the
    constructor itself trusts its arguments.
    """

    insns: tuple[isa.Insn, ...]
    name: str = "prog"
    helpers: HelperTable = field(default_factory=lambda: BASE_HELPERS)

    @classmethod
    def load(cls, code: bytes | list[isa.Insn] | tuple[isa.Insn, ...], *, name: str = "prog",
             helpers: HelperTable | None = None) -> "Program":
        from hybrid.user.verifier import verify

        insns = tuple(isa.decode(code)) if isinstance(code, (bytes, bytearray, memoryview)) else tuple(code)
        prog = cls(insns, name, BASE_HELPERS if helpers is None else helpers)
        verify(prog)
        return prog

    @property
    def code(self) -> bytes:
        return isa.encode(self.insns)

    def disasm(self) -> str:
        return isa.disasm(self.insns)
