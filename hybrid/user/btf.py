"""BTF and BTF.ext: the type information of eBPF objects and of the kernel.

Pure Python (``struct``), little-endian only, every kind of the kernel's
``include/uapi/linux/btf.h`` (INT ... ENUM64).  One parser reads an object's
``.BTF`` section and the kernel's ``/sys/kernel/btf/vmlinux`` (about 100k
types): the first pass only records where each type starts, a type is
decoded into a frozen dataclass the first time it is asked for, and the
by-name index is built on the first lookup by name.  :func:`kernel_btf`
parses the running kernel's BTF once per process.

Helpers follow libbpf's semantics (``btf.h``, ``btf.c``):
:meth:`Btf.resolve` skips modifiers and typedefs, :meth:`Btf.size_of` is
``btf__resolve_size``, :meth:`Btf.align_of` is ``btf__align_of``,
:meth:`Btf.member` finds a member by name, looking into anonymous
struct/union members.

Malformed input raises :class:`~hybrid.errors.BtfError` naming the section,
the type id and the byte offset; every loop over a count read from the data
is bounded by the size of the data, and every walk along type references is
bounded (``MAX_RESOLVE_DEPTH``), so hostile input cannot hang the parser.
"""

from __future__ import annotations

import functools
import os
import struct
import sys
from array import array
from dataclasses import dataclass
from enum import IntEnum
from typing import ClassVar, Iterator

from hybrid.errors import BtfError

MAGIC = 0xEB9F
HEADER_LEN = 24  # struct btf_header up to str_len
MAX_RESOLVE_DEPTH = 32  # libbpf's limit on typedef/modifier/array chains
KERNEL_BTF_PATH = "/sys/kernel/btf/vmlinux"
PTR_SIZE = 8  # BPF is a 64-bit target


class Kind(IntEnum):
    UNKN = 0  # void (type id 0)
    INT = 1
    PTR = 2
    ARRAY = 3
    STRUCT = 4
    UNION = 5
    ENUM = 6
    FWD = 7
    TYPEDEF = 8
    VOLATILE = 9
    CONST = 10
    RESTRICT = 11
    FUNC = 12
    FUNC_PROTO = 13
    VAR = 14
    DATASEC = 15
    FLOAT = 16
    DECL_TAG = 17
    TYPE_TAG = 18
    ENUM64 = 19


MAX_KIND = max(Kind)

# INT encoding bits
INT_SIGNED, INT_CHAR, INT_BOOL = 1, 2, 4
# VAR linkage
VAR_STATIC, VAR_GLOBAL_ALLOCATED, VAR_GLOBAL_EXTERN = 0, 1, 2
# FUNC linkage
FUNC_STATIC, FUNC_GLOBAL, FUNC_EXTERN = 0, 1, 2

# bytes that follow the 12-byte btf_type: (fixed, per vlen entry)
_EXTRA = {
    Kind.INT: (4, 0),
    Kind.PTR: (0, 0),
    Kind.ARRAY: (12, 0),
    Kind.STRUCT: (0, 12),
    Kind.UNION: (0, 12),
    Kind.ENUM: (0, 8),
    Kind.FWD: (0, 0),
    Kind.TYPEDEF: (0, 0),
    Kind.VOLATILE: (0, 0),
    Kind.CONST: (0, 0),
    Kind.RESTRICT: (0, 0),
    Kind.FUNC: (0, 0),
    Kind.FUNC_PROTO: (0, 8),
    Kind.VAR: (4, 0),
    Kind.DATASEC: (0, 12),
    Kind.FLOAT: (0, 0),
    Kind.DECL_TAG: (4, 0),
    Kind.TYPE_TAG: (0, 0),
    Kind.ENUM64: (0, 12),
}
_EXTRA_BY_NUM = [(-1, -1)] * (MAX_KIND + 1)
for _k, _v in _EXTRA.items():
    _EXTRA_BY_NUM[_k] = _v

_MODIFIERS = frozenset({Kind.TYPEDEF, Kind.VOLATILE, Kind.CONST, Kind.RESTRICT, Kind.TYPE_TAG})

_U32 = struct.Struct("<I")
_TYPE = struct.Struct("<III")  # name_off, info, size/type
_HDR = struct.Struct("<HBBIIIII")


# --- types -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Member:
    """A struct/union member; ``bit_offset`` is from the start of its struct."""

    name: str
    type: int
    bit_offset: int
    bitfield_size: int = 0

    @property
    def byte_offset(self) -> int:
        return self.bit_offset // 8


@dataclass(frozen=True, slots=True)
class EnumValue:
    name: str
    value: int


@dataclass(frozen=True, slots=True)
class Param:
    name: str
    type: int


@dataclass(frozen=True, slots=True)
class VarSecinfo:
    type: int  # a VAR (or FUNC, in .ksyms)
    offset: int
    size: int


@dataclass(frozen=True, slots=True)
class BtfType:
    """Base of every decoded type; ``id`` is the type id, ``name`` "" when anonymous."""

    id: int
    name: str
    KIND: ClassVar[Kind] = Kind.UNKN

    @property
    def kind(self) -> Kind:
        return self.KIND


@dataclass(frozen=True, slots=True)
class Void(BtfType):
    KIND: ClassVar[Kind] = Kind.UNKN


@dataclass(frozen=True, slots=True)
class Int(BtfType):
    size: int
    encoding: int  # INT_SIGNED | INT_CHAR | INT_BOOL
    bit_offset: int
    bits: int
    KIND: ClassVar[Kind] = Kind.INT

    @property
    def signed(self) -> bool:
        return bool(self.encoding & INT_SIGNED)


@dataclass(frozen=True, slots=True)
class Ptr(BtfType):
    type: int
    KIND: ClassVar[Kind] = Kind.PTR


@dataclass(frozen=True, slots=True)
class Array(BtfType):
    type: int
    index_type: int
    nelems: int
    KIND: ClassVar[Kind] = Kind.ARRAY


@dataclass(frozen=True, slots=True)
class Composite(BtfType):
    size: int
    members: tuple[Member, ...]


@dataclass(frozen=True, slots=True)
class Struct(Composite):
    KIND: ClassVar[Kind] = Kind.STRUCT


@dataclass(frozen=True, slots=True)
class Union(Composite):
    KIND: ClassVar[Kind] = Kind.UNION


@dataclass(frozen=True, slots=True)
class AnyEnum(BtfType):
    size: int
    values: tuple[EnumValue, ...]
    signed: bool  # the kind_flag: values are signed


@dataclass(frozen=True, slots=True)
class Enum(AnyEnum):
    KIND: ClassVar[Kind] = Kind.ENUM


@dataclass(frozen=True, slots=True)
class Enum64(AnyEnum):
    KIND: ClassVar[Kind] = Kind.ENUM64


@dataclass(frozen=True, slots=True)
class Fwd(BtfType):
    is_union: bool
    KIND: ClassVar[Kind] = Kind.FWD


@dataclass(frozen=True, slots=True)
class RefType(BtfType):
    """Typedefs and modifiers: a name (typedef) or a qualifier on ``type``."""

    type: int


@dataclass(frozen=True, slots=True)
class Typedef(RefType):
    KIND: ClassVar[Kind] = Kind.TYPEDEF


@dataclass(frozen=True, slots=True)
class Volatile(RefType):
    KIND: ClassVar[Kind] = Kind.VOLATILE


@dataclass(frozen=True, slots=True)
class Const(RefType):
    KIND: ClassVar[Kind] = Kind.CONST


@dataclass(frozen=True, slots=True)
class Restrict(RefType):
    KIND: ClassVar[Kind] = Kind.RESTRICT


@dataclass(frozen=True, slots=True)
class TypeTag(RefType):
    KIND: ClassVar[Kind] = Kind.TYPE_TAG


@dataclass(frozen=True, slots=True)
class Func(BtfType):
    type: int  # a FUNC_PROTO
    linkage: int
    KIND: ClassVar[Kind] = Kind.FUNC


@dataclass(frozen=True, slots=True)
class FuncProto(BtfType):
    ret: int
    params: tuple[Param, ...]
    KIND: ClassVar[Kind] = Kind.FUNC_PROTO


@dataclass(frozen=True, slots=True)
class Var(BtfType):
    type: int
    linkage: int
    KIND: ClassVar[Kind] = Kind.VAR


@dataclass(frozen=True, slots=True)
class Datasec(BtfType):
    size: int
    vars: tuple[VarSecinfo, ...]
    KIND: ClassVar[Kind] = Kind.DATASEC


@dataclass(frozen=True, slots=True)
class Float(BtfType):
    size: int
    KIND: ClassVar[Kind] = Kind.FLOAT


@dataclass(frozen=True, slots=True)
class DeclTag(BtfType):
    type: int
    component_idx: int  # -1: the tag is on the type itself
    KIND: ClassVar[Kind] = Kind.DECL_TAG


VOID = Void(0, "")


def essential_name_len(name: str) -> int:
    """libbpf's ``bpf_core_essential_name_len``: the name without a ``___flavor`` suffix."""
    n = len(name)
    for i in range(n - 5, -1, -1):
        if name[i] != "_" and name[i + 1:i + 4] == "___" and name[i + 4] != "_":
            return i + 1
    return n


def essential_name(name: str) -> str:
    return name[:essential_name_len(name)]


# --- the parser ----------------------------------------------------------------


class Btf:
    """Parsed BTF: ``btf[type_id]`` is a :class:`BtfType`; ``len(btf)`` counts void too.

    ``validate=True`` (the default, right for objects) decodes every type
    at once so that a malformed ``.BTF`` is refused at load; the kernel's
    BTF is parsed with ``validate=False`` and decoded on demand.
    """

    def __init__(self, data: bytes | bytearray | memoryview, *, name: str = ".BTF", validate: bool = True):
        self.name = name
        self._data = bytes(data)
        self._parse_header()
        self._offs = array("I", [0])  # type id -> offset of its btf_type in _data
        self._scan_types()
        self._cache: list[BtfType | None] = [None] * len(self._offs)
        self._cache[0] = VOID
        self._strings: dict[int, str] = {}
        self._by_name: dict[str, list[int]] | None = None
        self._by_essential: dict[str, list[int]] | None = None
        if validate:
            for i in range(1, len(self._offs)):
                self._check_refs(self[i])

    # ..... parsing ..............................................................

    def _err(self, what: str, type_id: int | None = None, offset: int | None = None) -> BtfError:
        where = [self.name]
        if type_id is not None:
            where.append("type id %d" % type_id)
        if offset is not None:
            where.append("offset %#x" % offset)
        return BtfError("%s: %s" % (", ".join(where), what))

    def _parse_header(self) -> None:
        d = self._data
        if len(d) < HEADER_LEN:
            raise self._err("truncated header: %d bytes, need %d" % (len(d), HEADER_LEN), offset=0)
        magic, version, _flags, hdr_len, type_off, type_len, str_off, str_len = _HDR.unpack_from(d, 0)
        if magic == 0x9FEB:
            raise self._err("big-endian BTF is not supported", offset=0)
        if magic != MAGIC:
            raise self._err("bad magic %#06x (expected %#06x)" % (magic, MAGIC), offset=0)
        if version != 1:
            raise self._err("unsupported BTF version %d" % version, offset=2)
        if hdr_len < HEADER_LEN or hdr_len > len(d):
            raise self._err("bad header length %d (data has %d bytes)" % (hdr_len, len(d)), offset=4)
        if any(d[HEADER_LEN:hdr_len]):
            raise self._err("unknown non-zero fields in the %d-byte header" % hdr_len, offset=HEADER_LEN)
        body = len(d) - hdr_len
        if type_off % 4:
            raise self._err("type section is not 4-byte aligned (type_off %d)" % type_off, offset=8)
        if str_off + str_len > body:
            raise self._err("string section (%d + %d) extends past the end of the data (%d bytes after the header)"
                            % (str_off, str_len, body), offset=16)
        if type_off + type_len > str_off and type_off < str_off + str_len:
            raise self._err("type section (%d + %d) overlaps the string section (%d + %d)"
                            % (type_off, type_len, str_off, str_len), offset=8)
        if type_off + type_len > body:
            raise self._err("type section (%d + %d) extends past the end of the data" % (type_off, type_len), offset=8)
        if str_len == 0 or d[hdr_len + str_off] != 0:
            raise self._err("string section must start with an empty string", offset=hdr_len + str_off)
        if d[hdr_len + str_off + str_len - 1] != 0:
            raise self._err("string section is not NUL-terminated", offset=hdr_len + str_off + str_len - 1)
        self._types_start = hdr_len + type_off
        self._types_end = self._types_start + type_len
        self._str_start = hdr_len + str_off
        self._str_len = str_len

    def _scan_types(self) -> None:
        start, end = self._types_start, self._types_end
        if (end - start) % 4:
            raise self._err("type section length %d is not a multiple of 4" % (end - start), offset=start)
        words = array("I")
        words.frombytes(self._data[start:end])
        if sys.byteorder != "little":
            words.byteswap()
        self._words = words
        offs = self._offs
        extra = _EXTRA_BY_NUM
        n = len(words)
        i = 0
        tid = 1
        while i < n:
            if i + 3 > n:
                raise self._err("truncated type record (%d bytes left, need 12)" % (4 * (n - i)), tid, start + 4 * i)
            info = words[i + 1]
            kind = (info >> 24) & 0x1F
            if kind > MAX_KIND or kind == 0:
                raise self._err("unknown kind %d" % kind, tid, start + 4 * i)
            fixed, per = extra[kind]
            size = 3 + (fixed + per * (info & 0xFFFF)) // 4
            if i + size > n:
                raise self._err("%s record of %d bytes extends past the type section" % (Kind(kind).name, 4 * size),
                                tid, start + 4 * i)
            offs.append(start + 4 * i)
            i += size
            tid += 1

    def string(self, off: int) -> str:
        """The NUL-terminated string at ``off`` in the string section."""
        s = self._strings.get(off)
        if s is not None:
            return s
        if not 0 <= off < self._str_len:
            raise self._err("string offset %d is outside the %d-byte string section" % (off, self._str_len))
        start = self._str_start + off
        end = self._data.find(b"\0", start, self._str_start + self._str_len)
        s = self._data[start:end].decode("utf-8", "replace")  # end >= 0: the section ends in NUL
        self._strings[off] = s
        return s

    def _decode(self, tid: int) -> BtfType:
        d = self._data
        off = self._offs[tid]
        name_off, info, sz = _TYPE.unpack_from(d, off)
        try:
            name = self.string(name_off)
        except BtfError:
            raise self._err("name offset %d is outside the string section" % name_off, tid, off) from None
        kind = (info >> 24) & 0x1F
        vlen = info & 0xFFFF
        kflag = bool(info >> 31)
        p = off + 12
        K = Kind
        if kind == K.INT:
            v = _U32.unpack_from(d, p)[0]
            return Int(tid, name, sz, (v >> 24) & 0x0F, (v >> 16) & 0xFF, v & 0xFF)
        if kind == K.PTR:
            return Ptr(tid, name, sz)
        if kind == K.ARRAY:
            t, idx, n = _TYPE.unpack_from(d, p)
            return Array(tid, name, t, idx, n)
        if kind in (K.STRUCT, K.UNION):
            members = []
            for i in range(vlen):
                m_name, m_type, m_off = _TYPE.unpack_from(d, p + 12 * i)
                bits = 0
                if kflag:
                    bits, m_off = m_off >> 24, m_off & 0xFFFFFF
                members.append(Member(self._member_name(m_name, tid, p + 12 * i), m_type, m_off, bits))
            cls = Struct if kind == K.STRUCT else Union
            return cls(tid, name, sz, tuple(members))
        if kind == K.ENUM:
            values = []
            for i in range(vlen):
                v_name, val = struct.unpack_from("<Ii", d, p + 8 * i)
                values.append(EnumValue(self._member_name(v_name, tid, p + 8 * i), val if kflag else val & 0xFFFFFFFF))
            return Enum(tid, name, sz, tuple(values), kflag)
        if kind == K.ENUM64:
            values = []
            for i in range(vlen):
                v_name, lo, hi = _TYPE.unpack_from(d, p + 12 * i)
                val = (hi << 32) | lo
                if kflag and val >> 63:
                    val -= 1 << 64
                values.append(EnumValue(self._member_name(v_name, tid, p + 12 * i), val))
            return Enum64(tid, name, sz, tuple(values), kflag)
        if kind == K.FWD:
            return Fwd(tid, name, kflag)
        if kind == K.TYPEDEF:
            return Typedef(tid, name, sz)
        if kind == K.VOLATILE:
            return Volatile(tid, name, sz)
        if kind == K.CONST:
            return Const(tid, name, sz)
        if kind == K.RESTRICT:
            return Restrict(tid, name, sz)
        if kind == K.TYPE_TAG:
            return TypeTag(tid, name, sz)
        if kind == K.FUNC:
            return Func(tid, name, sz, vlen)
        if kind == K.FUNC_PROTO:
            params = []
            for i in range(vlen):
                a_name, a_type = struct.unpack_from("<II", d, p + 8 * i)
                params.append(Param(self._member_name(a_name, tid, p + 8 * i), a_type))
            return FuncProto(tid, name, sz, tuple(params))
        if kind == K.VAR:
            return Var(tid, name, sz, _U32.unpack_from(d, p)[0])
        if kind == K.DATASEC:
            return Datasec(tid, name, sz, tuple(VarSecinfo(*_TYPE.unpack_from(d, p + 12 * i)) for i in range(vlen)))
        if kind == K.FLOAT:
            return Float(tid, name, sz)
        if kind == K.DECL_TAG:
            return DeclTag(tid, name, sz, struct.unpack_from("<i", d, p)[0])
        raise self._err("unknown kind %d" % kind, tid, off)  # unreachable: _scan_types checked it

    def _member_name(self, name_off: int, tid: int, off: int) -> str:
        try:
            return self.string(name_off)
        except BtfError:
            raise self._err("member name offset %d is outside the string section" % name_off, tid, off) from None

    def _check_refs(self, t: BtfType) -> None:
        """Every type id a type refers to must exist; sizes must be sane."""
        n = len(self._offs)

        def ref(what: str, r: int) -> None:
            if not 0 <= r < n:
                raise self._err("%s refers to type id %d, but the highest type id is %d" % (what, r, n - 1),
                                t.id, self._offs[t.id])

        if isinstance(t, (RefType, Ptr, Func, Var, DeclTag)):
            ref(t.KIND.name, t.type)
        elif isinstance(t, Array):
            ref("ARRAY element", t.type)
            ref("ARRAY index", t.index_type)
        elif isinstance(t, Composite):
            for m in t.members:
                ref("member %r" % m.name, m.type)
        elif isinstance(t, FuncProto):
            ref("return type", t.ret)
            for a in t.params:
                ref("parameter %r" % a.name, a.type)
        elif isinstance(t, Datasec):
            for v in t.vars:
                ref("DATASEC entry", v.type)
        elif isinstance(t, Int):
            if t.size not in (1, 2, 4, 8, 16) or t.bits > 128 or t.bits + t.bit_offset > 8 * t.size:
                raise self._err("bad INT: size %d, %d bits at bit offset %d" % (t.size, t.bits, t.bit_offset),
                                t.id, self._offs[t.id])

    # ..... access ...............................................................

    def __len__(self) -> int:
        return len(self._offs)

    def __getitem__(self, tid: int) -> BtfType:
        if not isinstance(tid, int) or not 0 <= tid < len(self._cache):
            raise self._err("no type id %r (the highest is %d)" % (tid, len(self._offs) - 1))
        t = self._cache[tid]
        if t is None:
            t = self._decode(tid)
            self._cache[tid] = t
        return t

    def get(self, tid: int) -> BtfType | None:
        return self[tid] if isinstance(tid, int) and 0 <= tid < len(self._offs) else None

    def __iter__(self) -> Iterator[BtfType]:
        for i in range(1, len(self._offs)):
            yield self[i]

    def kind_of(self, tid: int) -> Kind:
        """The kind of a type without decoding it (fast, for scans of the kernel BTF)."""
        if tid == 0:
            return Kind.UNKN
        if not 0 < tid < len(self._offs):
            raise self._err("no type id %d (the highest is %d)" % (tid, len(self._offs) - 1))
        return Kind((self._words[((self._offs[tid] - self._types_start) >> 2) + 1] >> 24) & 0x1F)

    def _name_index(self) -> dict[str, list[int]]:
        if self._by_name is None:
            by_off: dict[int, list[int]] = {}
            words, offs, base = self._words, self._offs, self._types_start
            for tid in range(1, len(offs)):
                name_off = words[(offs[tid] - base) >> 2]
                if name_off:
                    by_off.setdefault(name_off, []).append(tid)
            index: dict[str, list[int]] = {}
            for name_off, ids in by_off.items():
                try:
                    name = self.string(name_off)
                except BtfError:
                    continue  # reported when the type itself is decoded
                index.setdefault(name, []).extend(ids)
            self._by_name = index
        return self._by_name

    def ids_by_name(self, name: str, kind: Kind | None = None) -> list[int]:
        """Ids of every type called ``name`` (optionally of one kind), ascending."""
        ids = sorted(self._name_index().get(name, ()))
        if kind is not None:
            ids = [i for i in ids if self.kind_of(i) == kind]
        return ids

    def ids_by_essential_name(self, name: str) -> list[int]:
        """Ids of every type whose name without ``___flavor`` is ``essential_name(name)``."""
        if self._by_essential is None:
            ess: dict[str, list[int]] = {}
            for n, ids in self._name_index().items():
                ess.setdefault(n[:essential_name_len(n)], []).extend(ids)
            self._by_essential = ess
        return sorted(self._by_essential.get(essential_name(name), ()))

    def find(self, name: str, kind: Kind | None = None) -> BtfType | None:
        """The first type called ``name`` (of ``kind``), or None."""
        ids = self.ids_by_name(name, kind)
        return self[ids[0]] if ids else None

    def find_struct(self, name: str) -> Composite | None:
        t = self.find(name, Kind.STRUCT) or self.find(name, Kind.UNION)
        return t  # type: ignore[return-value]

    # ..... semantics ............................................................

    def resolve_id(self, tid: int) -> int:
        """Skip typedefs, const/volatile/restrict and type tags (libbpf ``skip_mods_and_typedefs``)."""
        for _ in range(MAX_RESOLVE_DEPTH):
            t = self[tid]
            if t.KIND not in _MODIFIERS:
                return tid
            tid = t.type  # type: ignore[attr-defined]
        raise self._err("chain of typedefs/modifiers longer than %d (a loop?)" % MAX_RESOLVE_DEPTH, tid)

    def resolve(self, tid: int) -> BtfType:
        return self[self.resolve_id(tid)]

    def size_of(self, tid: int) -> int:
        """Size in bytes (libbpf ``btf__resolve_size``); BtfError for void, functions, ..."""
        nelems = 1
        start = tid
        for _ in range(MAX_RESOLVE_DEPTH):
            t = self[tid]
            k = t.KIND
            if k in (Kind.INT, Kind.STRUCT, Kind.UNION, Kind.ENUM, Kind.ENUM64, Kind.DATASEC, Kind.FLOAT):
                size = t.size  # type: ignore[attr-defined]
                break
            if k == Kind.PTR:
                size = PTR_SIZE
                break
            if k in _MODIFIERS or k in (Kind.VAR, Kind.DECL_TAG):
                tid = t.type  # type: ignore[attr-defined]
                continue
            if k == Kind.ARRAY:
                nelems *= t.nelems  # type: ignore[attr-defined]
                if nelems > 0xFFFFFFFF:
                    raise self._err("array size overflows 32 bits", start)
                tid = t.type  # type: ignore[attr-defined]
                continue
            raise self._err("%s has no size" % self.describe(tid), start)
        else:
            raise self._err("chain of types longer than %d (a loop?)" % MAX_RESOLVE_DEPTH, start)
        if nelems and size > 0xFFFFFFFF // nelems:
            raise self._err("type size overflows 32 bits", start)
        return nelems * size

    def align_of(self, tid: int, _depth: int = 0) -> int:
        """Alignment in bytes (libbpf ``btf__align_of``)."""
        if _depth > MAX_RESOLVE_DEPTH:
            raise self._err("type nesting deeper than %d (a loop?)" % MAX_RESOLVE_DEPTH, tid)
        t = self[tid]
        k = t.KIND
        if k in (Kind.INT, Kind.ENUM, Kind.ENUM64, Kind.FLOAT):
            return max(1, min(PTR_SIZE, t.size))  # type: ignore[attr-defined]
        if k == Kind.PTR:
            return PTR_SIZE
        if k in _MODIFIERS:
            return self.align_of(t.type, _depth + 1)  # type: ignore[attr-defined]
        if k == Kind.ARRAY:
            return self.align_of(t.type, _depth + 1)  # type: ignore[attr-defined]
        if isinstance(t, Composite):
            best = 1
            for m in t.members:
                a = self.align_of(m.type, _depth + 1)
                best = max(best, a)
                if m.bitfield_size == 0 and m.bit_offset % (8 * a):
                    return 1  # packed
            return 1 if t.size % best else best
        raise self._err("%s has no alignment" % self.describe(tid), tid)

    def member(self, tid: int, name: str) -> tuple[Member, int]:
        """Member ``name`` of the struct/union ``tid`` (through typedefs), looking into
        anonymous members; returns the member and its bit offset from the start of ``tid``."""
        found = self._find_member(self.resolve_id(tid), name, 0, 0)
        if found is None:
            raise self._err("%s has no member %r" % (self.describe(tid), name), tid)
        return found

    def _find_member(self, tid: int, name: str, base: int, depth: int) -> tuple[Member, int] | None:
        if depth > MAX_RESOLVE_DEPTH:
            return None
        t = self[tid]
        if not isinstance(t, Composite):
            raise self._err("%s is not a struct or union" % self.describe(tid), tid)
        for m in t.members:
            if m.name == name:
                return m, base + m.bit_offset
        for m in t.members:
            if not m.name:
                inner = self.resolve_id(m.type)
                if isinstance(self[inner], Composite):
                    got = self._find_member(inner, name, base + m.bit_offset, depth + 1)
                    if got is not None:
                        return got
        return None

    def offsetof(self, tid_or_name: int | str, path: str) -> int:
        """Byte offset of ``path`` ("a.b.c", members of nested structs) in a struct."""
        if isinstance(tid_or_name, str):
            t = self.find_struct(tid_or_name)
            if t is None:
                raise self._err("no struct or union named %r" % tid_or_name)
            tid = t.id
        else:
            tid = tid_or_name
        bits = 0
        for part in path.split("."):
            m, off = self.member(tid, part)
            bits += off
            tid = m.type
        return bits // 8

    def describe(self, tid: int) -> str:
        """A short C-like name for messages: ``struct pt_regs``, ``u64``, ``int *``, ``[17] VAR 'x'``."""
        try:
            t = self[tid]
        except BtfError:
            return "type id %d" % tid
        k = t.KIND
        if k == Kind.UNKN:
            return "void"
        if k in (Kind.STRUCT, Kind.UNION, Kind.ENUM, Kind.ENUM64):
            kw = {Kind.STRUCT: "struct", Kind.UNION: "union"}.get(k, "enum")
            return "%s %s" % (kw, t.name or "(anon)")
        if k == Kind.FWD:
            return "%s %s" % ("union" if t.is_union else "struct", t.name)  # type: ignore[attr-defined]
        if k in (Kind.INT, Kind.TYPEDEF, Kind.FLOAT) and t.name:
            return t.name
        if k == Kind.PTR:
            target = self.get(t.type)  # type: ignore[attr-defined]
            inner = "void" if target is None or target.KIND == Kind.UNKN else (
                target.name if target.name else "[%d] %s" % (target.id, target.KIND.name))
            if target is not None and target.KIND in (Kind.STRUCT, Kind.UNION):
                inner = self.describe(target.id)
            return inner + " *"
        return "[%d] %s '%s'" % (tid, k.name, t.name)

    def datasec(self, name: str) -> Datasec | None:
        t = self.find(name, Kind.DATASEC)
        return t  # type: ignore[return-value]


def parse_btf(data: bytes | bytearray | memoryview, name: str = ".BTF") -> Btf:
    """Parse and fully validate an object's ``.BTF`` section."""
    return Btf(data, name=name, validate=True)


@functools.lru_cache(maxsize=4)
def _kernel_btf(path: str, mtime_ns: int) -> Btf:
    with open(path, "rb") as f:
        data = f.read()
    return Btf(data, name=path, validate=False)


def kernel_btf(path: str = KERNEL_BTF_PATH) -> Btf | None:
    """The running kernel's BTF, parsed once per process; None if ``path`` does not exist."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    try:
        return _kernel_btf(path, st.st_mtime_ns)
    except OSError as e:
        raise BtfError("%s: cannot read: %s" % (path, e)) from e


# --- BTF.ext -------------------------------------------------------------------


class CoreReloKind(IntEnum):
    """``enum bpf_core_relo_kind``."""

    FIELD_BYTE_OFFSET = 0
    FIELD_BYTE_SIZE = 1
    FIELD_EXISTS = 2
    FIELD_SIGNED = 3
    FIELD_LSHIFT_U64 = 4
    FIELD_RSHIFT_U64 = 5
    TYPE_ID_LOCAL = 6
    TYPE_ID_TARGET = 7
    TYPE_EXISTS = 8
    TYPE_SIZE = 9
    ENUMVAL_EXISTS = 10
    ENUMVAL_VALUE = 11
    TYPE_MATCHES = 12


@dataclass(frozen=True, slots=True)
class FuncInfo:
    insn_off: int  # as stored in the object: a byte offset in the section
    type_id: int  # a FUNC

    @property
    def insn(self) -> int:
        return self.insn_off // 8


@dataclass(frozen=True, slots=True)
class LineInfo:
    insn_off: int
    file_name: str
    line: str  # the source line's text
    line_num: int
    column: int

    @property
    def insn(self) -> int:
        return self.insn_off // 8


@dataclass(frozen=True, slots=True)
class CoreRelo:
    insn_off: int
    type_id: int
    access: str  # "0:1:2"
    kind: int  # a CoreReloKind value (kept as int: unknown kinds are reported at resolution)

    @property
    def insn(self) -> int:
        return self.insn_off // 8

    @property
    def kind_name(self) -> str:
        try:
            return CoreReloKind(self.kind).name.lower()
        except ValueError:
            return "kind %d" % self.kind


@dataclass(frozen=True)
class BtfExt:
    """``.BTF.ext``: per-section func_info, line_info and CO-RE relocation records."""

    func_info: dict[str, tuple[FuncInfo, ...]]
    line_info: dict[str, tuple[LineInfo, ...]]
    core_relos: dict[str, tuple[CoreRelo, ...]]


_EXT_HDR = struct.Struct("<HBBIIIII")  # magic, version, flags, hdr_len, func_info off/len, line_info off/len


def parse_btf_ext(data: bytes | bytearray | memoryview, btf: Btf, name: str = ".BTF.ext") -> BtfExt:
    """Parse ``.BTF.ext``; strings (section names, access strings) come from ``btf``."""
    d = bytes(data)

    def err(what: str, offset: int | None = None) -> BtfError:
        return BtfError("%s: %s%s" % (name, "offset %#x: " % offset if offset is not None else "", what))

    if len(d) < _EXT_HDR.size:
        raise err("truncated header: %d bytes, need %d" % (len(d), _EXT_HDR.size), 0)
    magic, version, _flags, hdr_len, fi_off, fi_len, li_off, li_len = _EXT_HDR.unpack_from(d, 0)
    if magic != MAGIC:
        raise err("bad magic %#06x (expected %#06x)" % (magic, MAGIC), 0)
    if version != 1:
        raise err("unsupported version %d" % version, 2)
    if hdr_len < _EXT_HDR.size or hdr_len > len(d):
        raise err("bad header length %d (data has %d bytes)" % (hdr_len, len(d)), 4)
    cr_off = cr_len = 0
    if hdr_len >= _EXT_HDR.size + 8:
        cr_off, cr_len = struct.unpack_from("<II", d, _EXT_HDR.size)

    def string(off: int, where: int) -> str:
        try:
            return btf.string(off)
        except BtfError:
            raise err("string offset %d is outside the BTF string section" % off, where) from None

    def records(what: str, off: int, length: int, min_size: int):
        """Yield (section name, record offset) for one info subsection."""
        out: dict[str, list[int]] = {}
        if length == 0:
            return out, 0
        start = hdr_len + off
        end = start + length
        if off % 4 or end > len(d):
            raise err("%s subsection (%d + %d) is misaligned or extends past the data" % (what, off, length), start)
        if length < 4:
            raise err("%s subsection too short for its record size" % what, start)
        rec_size = _U32.unpack_from(d, start)[0]
        if rec_size < min_size or rec_size % 4:
            raise err("%s record size %d is invalid (minimum %d, multiple of 4)" % (what, rec_size, min_size), start)
        p = start + 4
        while p < end:
            if p + 8 > end:
                raise err("%s: truncated section header" % what, p)
            sec_off, count = struct.unpack_from("<II", d, p)
            sec = string(sec_off, p)
            if count == 0:
                raise err("%s for section %r has no records" % (what, sec), p)
            p += 8
            if count > (end - p) // rec_size:
                raise err("%s for section %r: %d records of %d bytes extend past the subsection"
                          % (what, sec, count, rec_size), p)
            out.setdefault(sec, []).extend(range(p, p + count * rec_size, rec_size))
            p += count * rec_size
        return out, rec_size

    raw, _ = records("func_info", fi_off, fi_len, 8)
    func_info = {s: tuple(FuncInfo(*struct.unpack_from("<II", d, p)) for p in ps) for s, ps in raw.items()}
    raw, _ = records("line_info", li_off, li_len, 16)
    line_info = {}
    for s, ps in raw.items():
        out = []
        for p in ps:
            insn_off, file_off, line_off, line_col = struct.unpack_from("<IIII", d, p)
            out.append(LineInfo(insn_off, string(file_off, p), string(line_off, p), line_col >> 10, line_col & 0x3FF))
        line_info[s] = tuple(out)
    raw, _ = records("core_relo", cr_off, cr_len, 16)
    core = {}
    for s, ps in raw.items():
        out = []
        for p in ps:
            insn_off, type_id, access_off, kind = struct.unpack_from("<IIII", d, p)
            out.append(CoreRelo(insn_off, type_id, string(access_off, p), kind))
        core[s] = tuple(out)
    return BtfExt(func_info, line_info, core)
