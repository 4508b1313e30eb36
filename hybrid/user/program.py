"""A verified program: instructions, the helpers it may call, the maps it refers to."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

from hybrid.user import isa
from hybrid.user.helpers import ALL_HELPERS, HelperTable


@dataclass(frozen=True)
class ArrayLayout:
    """Where an array map keeps its values, for lookups inlined into native code.

    Value ``i`` (of CPU ``c``, for a per-CPU array) is at
    ``header + offset + c * plane + i * stride``, for ``i < max_entries``.
    Offsets are from the map's header, so they hold wherever the map is
    mapped.
    """

    offset: int
    stride: int
    max_entries: int
    plane: int = 0  # per-CPU arrays: bytes from one CPU's values to the next; 0 for a plain array
    nr_cpus: int = 0  # per-CPU arrays: the number of CPU slots; 0 for a plain array

    @property
    def percpu(self) -> bool:
        return self.nr_cpus > 0


@dataclass(frozen=True)
class MapRef:
    """What an ``lddw`` with a map source resolves to.

    ``lddw rX, map`` (src 1 = map fd, src 5 = map index) yields ``address``,
    the map's header, which map helpers take; ``lddw rX, map_value + off``
    (src 2 or 6) yields ``value_address + off``, for maps whose value can be
    addressed directly (arrays, global data).  ``inline_array`` describes an
    ARRAY or PERCPU_ARRAY map's values so that the native engines can do its
    ``bpf_map_lookup_elem`` without calling the helper.
    """

    name: str
    address: int
    value_size: int
    value_address: int = 0  # 0: no direct value access
    inline_array: ArrayLayout | None = None  # None: lookups go through the helper


@dataclass(frozen=True)
class MemRegion:
    """Memory outside the stack and the context that a program may touch (maps)."""

    start: int
    size: int
    name: str
    writable: bool = True


_NO_MAPS: Mapping[int, MapRef] = MappingProxyType({})


@dataclass(frozen=True)
class Program:
    """Instructions that passed the verifier, ready for any engine.

    Build one with :meth:`Program.load`, which decodes and verifies; the
    constructor itself trusts its arguments.  ``maps`` is keyed by the
    number an ``lddw`` carries in its imm (a map fd or a map index).
    """

    insns: tuple[isa.Insn, ...]
    name: str = "prog"
    helpers: HelperTable = field(default_factory=lambda: ALL_HELPERS)
    maps: Mapping[int, MapRef] = field(default_factory=lambda: _NO_MAPS)
    regions: tuple[MemRegion, ...] = ()

    @classmethod
    def load(cls, code: bytes | list[isa.Insn] | tuple[isa.Insn, ...], *, name: str = "prog",
             helpers: HelperTable | None = None, maps: Mapping[int, MapRef] | None = None,
             regions: tuple[MemRegion, ...] = ()) -> "Program":
        from hybrid.user.verifier import verify

        insns = tuple(isa.decode(code)) if isinstance(code, (bytes, bytearray, memoryview)) else tuple(code)
        prog = cls(insns, name, ALL_HELPERS if helpers is None else helpers,
                   _NO_MAPS if not maps else MappingProxyType(dict(maps)), tuple(regions))
        verify(prog)
        return prog

    @property
    def code(self) -> bytes:
        return isa.encode(self.insns)

    def disasm(self) -> str:
        return isa.disasm(self.insns)

    def lddw_value(self, insn: isa.Insn) -> int:
        """The 64-bit value an ``lddw`` loads (the verifier has checked its map)."""
        if insn.src == isa.PSEUDO_NONE:
            return insn.imm64
        ref = self.maps[insn.imm]
        if insn.src in (isa.PSEUDO_MAP_FD, isa.PSEUDO_MAP_IDX):
            return ref.address
        return (ref.value_address + (insn.imm_hi & 0xFFFFFFFF)) & ((1 << 64) - 1)
