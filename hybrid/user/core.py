"""CO-RE: resolving ``.BTF.ext`` relocation records against a target BTF.

This is libbpf's ``relo_core.c`` in Python, with the same decisions:

* the local *spec* is parsed from the access string ("0:1:2") against the
  object's BTF (``bpf_core_parse_spec``);
* *candidates* are the target types of the same kind whose name, without a
  ``___flavor`` suffix, equals the local name (``bpf_core_find_cands``);
* each candidate is matched field by field, by name, looking into anonymous
  members (``bpf_core_spec_match``); all matching candidates must agree;
* the instruction is patched like ``bpf_core_patch_insn``: the ``off`` of
  ldx/st/stx (and its size, when a pointer or unsigned integer changed
  size), the ``imm`` of an ALU instruction, the 64-bit constant of an
  ``lddw`` -- each checked against the value the compiler put there;
* a relocation that cannot be satisfied (field or enum value missing in the
  target) *poisons* its instruction exactly as libbpf does: it becomes
  ``call 0xbad2310`` (:data:`POISON_HELPER_ID`), and an ``lddw``'s both
  slots are poisoned.  A program whose poisoned instruction is dead code
  (guarded by ``bpf_core_field_exists``) still loads; reaching it is an
  error the loader reports with :attr:`CoreFailure.message`.

Malformed relocation records (a bad access string, an access to a member
that does not exist in the *local* BTF, an instruction of the wrong kind)
are errors, not poison: :class:`~hybrid.errors.BtfError`, as libbpf refuses
the object.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hybrid.user import isa
from hybrid.errors import BtfError
from hybrid.user.btf import (
    Array,
    AnyEnum,
    Btf,
    Composite,
    CoreRelo,
    CoreReloKind,
    Enum,
    Fwd,
    FuncProto,
    Int,
    INT_SIGNED,
    Kind,
    Ptr,
    essential_name,
    essential_name_len,
)

POISON_HELPER_ID = isa.CORE_POISON_HELPER  # 195896080: libbpf's "invalid func unknown#195896080"
SPEC_MAX_LEN = 64  # BPF_CORE_SPEC_MAX_LEN
MAX_STEPS = 200_000  # bound on matching work per relocation (hostile BTF)
MAX_TOTAL_STEPS = 4_000_000  # ... and per object

FIELD_KINDS = frozenset(range(0, 6))
TYPE_KINDS = frozenset({6, 7, 8, 9, 12})
ENUMVAL_KINDS = frozenset({10, 11})

_BPF_CALL = 0x85
_BPF_LDDW = 0x18
_SIZE_BYTES = {0x00: 4, 0x08: 2, 0x10: 1, 0x18: 8}
_BYTES_SIZE = {v: k for k, v in _SIZE_BYTES.items()}


class _Poison(Exception):
    """libbpf's -EUCLEAN: the relocation cannot be satisfied; poison the instruction."""


@dataclass
class _Acc:
    type_id: int
    idx: int
    name: str | None = None


@dataclass
class _Spec:
    btf: Btf
    root_type_id: int
    kind: int
    raw: list[int] = field(default_factory=list)
    acc: list[_Acc] = field(default_factory=list)
    bit_offset: int = 0


@dataclass(frozen=True)
class CoreResult:
    """What a relocation resolves to (``struct bpf_core_relo_res``)."""

    orig_val: int
    new_val: int
    poison: bool = False
    validate: bool = True
    fail_memsz_adjust: bool = False
    orig_sz: int = 0
    new_sz: int = 0
    orig_type_id: int = 0
    new_type_id: int = 0
    reason: str = ""  # why it is poisoned


@dataclass(frozen=True)
class CoreFailure:
    """A poisoned instruction: where it is and why (for the loader's error message)."""

    section: str
    insn: int  # slot index in the section (before subprograms are appended)
    kind: str  # e.g. "field_byte_offset"
    type_name: str  # e.g. "struct task_struct"
    access: str  # the access string, e.g. "0:92"
    spec: str  # the access spelled out, e.g. "task_struct.pid"
    reason: str

    @property
    def message(self) -> str:
        return "CO-RE relocation failed for %s (%s, %s) in %s: %s" % (
            self.access, self.spec, self.kind, self.type_name, self.reason)


def _err(local: Btf, relo: CoreRelo, what: str) -> BtfError:
    return BtfError("CO-RE relocation (%s) of %s, access %r: %s"
                    % (relo.kind_name, local.describe(relo.type_id) if local.get(relo.type_id) else
                       "type id %d" % relo.type_id, relo.access, what))


# --- specs -----------------------------------------------------------------------


def parse_spec(btf: Btf, relo: CoreRelo) -> _Spec:
    """``bpf_core_parse_spec``: the local access path; BtfError if malformed."""
    s = relo.access
    spec = _Spec(btf, relo.type_id, relo.kind)
    if not s or s[0] == ":":
        raise _err(btf, relo, "empty or malformed access string")
    if not 0 <= relo.type_id < len(btf):
        raise _err(btf, relo, "no type id %d in the local BTF" % relo.type_id)
    if relo.kind in TYPE_KINDS:
        if s != "0":
            raise _err(btf, relo, "a type relocation must have access string \"0\"")
        return spec
    if relo.kind not in FIELD_KINDS and relo.kind not in ENUMVAL_KINDS:
        raise _err(btf, relo, "unknown relocation kind %d" % relo.kind)
    parts = s.split(":")
    if len(parts) > SPEC_MAX_LEN:
        raise _err(btf, relo, "access string longer than %d steps" % SPEC_MAX_LEN)
    try:
        spec.raw = [int(p, 10) for p in parts]
    except ValueError:
        raise _err(btf, relo, "access string is not ':'-separated integers") from None
    if any(i < 0 for i in spec.raw):
        raise _err(btf, relo, "negative index in the access string")
    tid = btf.resolve_id(relo.type_id)
    t = btf[tid]
    idx = spec.raw[0]
    spec.acc.append(_Acc(tid, idx))
    if relo.kind in ENUMVAL_KINDS:
        if not isinstance(t, AnyEnum) or len(spec.raw) > 1 or idx >= len(t.values):
            raise _err(btf, relo, "enum value access %r does not fit %s" % (s, btf.describe(tid)))
        spec.acc[0].name = t.values[idx].name
        return spec
    spec.bit_offset = idx * btf.size_of(tid) * 8
    for idx in spec.raw[1:]:
        tid = btf.resolve_id(tid)
        t = btf[tid]
        if isinstance(t, Composite):
            if idx >= len(t.members):
                raise _err(btf, relo, "%s has no member #%d" % (btf.describe(tid), idx))
            m = t.members[idx]
            spec.bit_offset += m.bit_offset
            if m.name:
                spec.acc.append(_Acc(tid, idx, m.name))
            tid = m.type
        elif isinstance(t, Array):
            elem = btf.resolve_id(t.type)
            if not _is_flex(btf, spec.acc[-1], t) and idx >= t.nelems:
                raise _err(btf, relo, "index %d out of bounds of %s[%d]" % (idx, btf.describe(elem), t.nelems))
            spec.acc.append(_Acc(elem, idx))
            spec.bit_offset += idx * btf.size_of(elem) * 8
            tid = elem
        else:
            raise _err(btf, relo, "access step %d goes into %s, which is neither struct, union nor array"
                       % (idx, btf.describe(tid)))
    return spec


def _is_flex(btf: Btf, acc: _Acc, arr: Array) -> bool:
    if acc.name is None or arr.nelems > 0:
        return False
    t = btf[acc.type_id]
    return isinstance(t, Composite) and acc.idx == len(t.members) - 1


def format_spec(btf: Btf, relo: CoreRelo) -> str:
    """The access spelled out: ``task_struct.pid``, ``pt_regs.di``, ``enum x::A`` (best effort)."""
    try:
        spec = parse_spec(btf, relo)
    except BtfError:
        return relo.access
    root = btf[relo.type_id]
    name = root.name or "(anon)"
    if relo.kind in TYPE_KINDS:
        return name
    if relo.kind in ENUMVAL_KINDS:
        return "%s::%s" % (name, spec.acc[0].name)
    out = name
    if spec.acc[0].idx:
        out += "[%d]" % spec.acc[0].idx
    for a in spec.acc[1:]:
        out += ".%s" % a.name if a.name is not None else "[%d]" % a.idx
    return out


# --- matching ---------------------------------------------------------------------


class _Budget:
    def __init__(self, parent: "_Budget | None" = None, limit: int = MAX_STEPS) -> None:
        self.left = self.limit = limit
        self.parent = parent

    def step(self) -> None:
        self.left -= 1
        if self.left < 0:
            raise BtfError("CO-RE matching exceeded %d steps (malformed or cyclic BTF?)" % self.limit)
        if self.parent is not None:
            self.parent.step()


def _kind_compat(a: Kind, b: Kind) -> bool:
    enums = (Kind.ENUM, Kind.ENUM64)
    return a == b or (a in enums and b in enums)


def _names_match(a: str, b: str) -> bool:
    if not a or not b:
        return True
    return essential_name(a) == essential_name(b)


def _fields_compat(lb: Btf, lid: int, tb: Btf, tid: int, budget: _Budget) -> bool:
    """``bpf_core_fields_are_compat``."""
    for _ in range(SPEC_MAX_LEN):
        budget.step()
        lid, tid = lb.resolve_id(lid), tb.resolve_id(tid)
        lt, tt = lb[lid], tb[tid]
        if isinstance(lt, Composite) and isinstance(tt, Composite):
            return True
        if not _kind_compat(lt.KIND, tt.KIND):
            return False
        k = lt.KIND
        if k in (Kind.PTR, Kind.FLOAT):
            return True
        if k in (Kind.FWD, Kind.ENUM, Kind.ENUM64):
            ll, tl = essential_name_len(lt.name), essential_name_len(tt.name)
            return ll == 0 or tl == 0 or (ll == tl and lt.name[:ll] == tt.name[:tl])
        if k == Kind.INT:
            return lt.bit_offset == 0 and tt.bit_offset == 0  # type: ignore[attr-defined]
        if k == Kind.ARRAY:
            lid, tid = lt.type, tt.type  # type: ignore[attr-defined]
            continue
        return False
    raise BtfError("CO-RE: array nesting deeper than %d" % SPEC_MAX_LEN)


def types_are_compat(lb: Btf, lid: int, tb: Btf, tid: int, budget: _Budget | None = None, level: int = 32) -> bool:
    """``bpf_core_types_are_compat`` (TYPE_EXISTS, TYPE_SIZE, TYPE_ID_TARGET)."""
    budget = budget or _Budget()
    if not _kind_compat(lb[lid].KIND, tb[tid].KIND):
        return False
    for _ in range(32):
        budget.step()
        lid, tid = lb.resolve_id(lid), tb.resolve_id(tid)
        lt, tt = lb[lid], tb[tid]
        if not _kind_compat(lt.KIND, tt.KIND):
            return False
        k = lt.KIND
        if k in (Kind.UNKN, Kind.STRUCT, Kind.UNION, Kind.ENUM, Kind.FWD, Kind.ENUM64):
            return True
        if k == Kind.INT:
            return lt.bit_offset == 0 and tt.bit_offset == 0  # type: ignore[attr-defined]
        if k in (Kind.PTR, Kind.ARRAY):
            lid, tid = lt.type, tt.type  # type: ignore[attr-defined]
            continue
        if k == Kind.FUNC_PROTO:
            assert isinstance(lt, FuncProto) and isinstance(tt, FuncProto)
            if len(lt.params) != len(tt.params):
                return False
            for lp, tp in zip(lt.params, tt.params):
                if level <= 0:
                    raise BtfError("CO-RE: function prototypes nested too deeply")
                if not types_are_compat(lb, lb.resolve_id(lp.type), tb, tb.resolve_id(tp.type), budget, level - 1):
                    return False
            lid, tid = lt.ret, tt.ret
            continue
        return False
    raise BtfError("CO-RE: type chain deeper than 32")


def types_match(lb: Btf, lid: int, tb: Btf, tid: int, behind_ptr: bool = False, level: int = 32,
                budget: _Budget | None = None) -> bool:
    """``bpf_core_types_match`` (TYPE_MATCHES)."""
    budget = budget or _Budget()
    if level <= 0:
        raise BtfError("CO-RE: types nested too deeply for TYPE_MATCHES")
    for _ in range(32):
        budget.step()
        lid, tid = lb.resolve_id(lid), tb.resolve_id(tid)
        lt, tt = lb[lid], tb[tid]
        if not _names_match(lt.name, tt.name):
            return False
        lk, tk = lt.KIND, tt.KIND
        if lk == Kind.UNKN:
            return lk == tk
        if lk == Kind.FWD:
            assert isinstance(lt, Fwd)
            if behind_ptr:
                if lk == tk:
                    return lt.is_union == tt.is_union  # type: ignore[attr-defined]
                return (tk == Kind.STRUCT and not lt.is_union) or (tk == Kind.UNION and lt.is_union)
            return lk == tk and lt.is_union == tt.is_union  # type: ignore[attr-defined]
        if lk in (Kind.ENUM, Kind.ENUM64):
            if not isinstance(tt, AnyEnum):
                return False
            assert isinstance(lt, AnyEnum)
            if lt.size != tt.size or len(lt.values) > len(tt.values):
                return False
            return all(any(_names_match(lv.name, tv.name) for tv in tt.values) for lv in lt.values)
        if lk in (Kind.STRUCT, Kind.UNION):
            if behind_ptr:
                if lk == tk:
                    return True
                return tk == Kind.FWD and (lk == Kind.UNION) == tt.is_union  # type: ignore[attr-defined]
            if lk != tk:
                return False
            assert isinstance(lt, Composite) and isinstance(tt, Composite)
            if len(lt.members) > len(tt.members):
                return False
            for lm in lt.members:
                for tm in tt.members:
                    budget.step()
                    if _names_match(lm.name, tm.name) and types_match(lb, lm.type, tb, tm.type, behind_ptr,
                                                                       level - 1, budget):
                        break
                else:
                    return False
            return True
        if lk == Kind.INT:
            return (tk == Kind.INT and lt.size == tt.size  # type: ignore[attr-defined]
                    and (lt.encoding & INT_SIGNED) == (tt.encoding & INT_SIGNED))  # type: ignore[attr-defined]
        if lk == Kind.PTR:
            if tk != lk:
                return False
            behind_ptr = True
            lid, tid = lt.type, tt.type  # type: ignore[attr-defined]
            continue
        if lk == Kind.ARRAY:
            if tk != lk or lt.nelems != tt.nelems:  # type: ignore[attr-defined]
                return False
            lid, tid = lt.type, tt.type  # type: ignore[attr-defined]
            continue
        if lk == Kind.FUNC_PROTO:
            if tk != lk or len(lt.params) != len(tt.params):  # type: ignore[attr-defined]
                return False
            for lp, tp in zip(lt.params, tt.params):  # type: ignore[attr-defined]
                if not types_match(lb, lp.type, tb, tp.type, behind_ptr, level - 1, budget):
                    return False
            lid, tid = lt.ret, tt.ret  # type: ignore[attr-defined]
            continue
        return False
    raise BtfError("CO-RE: type chain deeper than 32")


def _match_member(lb: Btf, lacc: _Acc, tb: Btf, tid: int, spec: _Spec, budget: _Budget) -> int | None:
    """``bpf_core_match_member``: returns the member's type id in the target, or None."""
    tid = tb.resolve_id(tid)
    tt = tb[tid]
    if not isinstance(tt, Composite):
        return None
    lt = lb[lacc.type_id]
    assert isinstance(lt, Composite)
    lm = lt.members[lacc.idx]
    for i, m in enumerate(tt.members):
        budget.step()
        if len(spec.raw) == SPEC_MAX_LEN:
            raise BtfError("CO-RE: struct/union/array nesting deeper than %d" % SPEC_MAX_LEN)
        spec.bit_offset += m.bit_offset
        spec.raw.append(i)
        if not m.name:
            found = _match_member(lb, lacc, tb, m.type, spec, budget)
            if found is not None:
                return found
        elif m.name == lm.name:
            spec.acc.append(_Acc(tid, i, m.name))
            if _fields_compat(lb, lm.type, tb, m.type, budget):
                return m.type
            spec.acc.pop()
            spec.bit_offset -= m.bit_offset
            spec.raw.pop()
            return None  # a same-named but incompatible member ends the search (libbpf)
        spec.bit_offset -= m.bit_offset
        spec.raw.pop()
    return None


def spec_match(local: _Spec, tb: Btf, tid: int, budget: _Budget) -> _Spec | None:
    """``bpf_core_spec_match``: the target spec, or None when the candidate does not match."""
    targ = _Spec(tb, tid, local.kind)
    lb = local.btf
    if local.kind in TYPE_KINDS:
        if local.kind == CoreReloKind.TYPE_MATCHES:
            ok = types_match(lb, local.root_type_id, tb, tid, budget=budget)
        else:
            ok = types_are_compat(lb, local.root_type_id, tb, tid, budget)
        return targ if ok else None
    if local.kind in ENUMVAL_KINDS:
        tid = tb.resolve_id(tid)
        tt = tb[tid]
        if not isinstance(tt, AnyEnum):
            return None
        want = essential_name(local.acc[0].name or "")
        for i, v in enumerate(tt.values):
            if essential_name(v.name) == want:
                targ.acc.append(_Acc(tid, i, v.name))
                targ.raw.append(i)
                return targ
        return None
    for i, lacc in enumerate(local.acc):
        budget.step()
        tid = tb.resolve_id(tid)
        if lacc.name is not None:
            nxt = _match_member(lb, lacc, tb, tid, targ, budget)
            if nxt is None:
                return None
            tid = nxt
        else:
            if i > 0:
                tt = tb[tid]
                if not isinstance(tt, Array):
                    return None
                if not _is_flex(tb, targ.acc[-1], tt) and lacc.idx >= tt.nelems:
                    return None
                tid = tb.resolve_id(tt.type)
            if len(targ.raw) == SPEC_MAX_LEN:
                raise BtfError("CO-RE: struct/union/array nesting deeper than %d" % SPEC_MAX_LEN)
            targ.acc.append(_Acc(tid, lacc.idx))
            targ.raw.append(lacc.idx)
            targ.bit_offset += lacc.idx * tb.size_of(tid) * 8
    return targ


# --- computing the values ------------------------------------------------------------


def _field_value(relo: CoreRelo, spec: _Spec | None, validate: list[bool] | None):
    """``bpf_core_calc_field_relo``: (value, field size, field type id)."""
    kind = relo.kind
    if kind == CoreReloKind.FIELD_EXISTS:
        return (1 if spec is not None else 0), 0, 0
    if spec is None:
        raise _Poison("field not found in the target BTF")
    btf = spec.btf
    acc = spec.acc[-1]
    if acc.name is None:  # an array element
        if kind == CoreReloKind.FIELD_BYTE_OFFSET:
            if validate is not None:
                validate[0] = True
            return spec.bit_offset // 8, btf.size_of(acc.type_id), acc.type_id
        if kind == CoreReloKind.FIELD_BYTE_SIZE:
            if validate is not None:
                validate[0] = True
            return btf.size_of(acc.type_id), 0, 0
        raise BtfError("CO-RE relocation %s cannot be applied to an array element" % relo.kind_name)
    t = btf[acc.type_id]
    assert isinstance(t, Composite)
    m = t.members[acc.idx]
    field_tid = btf.resolve_id(m.type)
    mt = btf[field_tid]
    bit_off = spec.bit_offset
    bit_sz = m.bitfield_size
    bitfield = bit_sz > 0
    field_sz, type_id = 0, 0
    if bitfield:
        byte_sz = getattr(mt, "size", 0)
        if byte_sz <= 0:
            raise BtfError("CO-RE: bitfield %r has a type without size" % m.name)
        byte_off = bit_off // 8 // byte_sz * byte_sz
        while bit_off + bit_sz - byte_off * 8 > byte_sz * 8:
            if byte_sz >= 8:
                raise BtfError("CO-RE: bitfield %r cannot be read with a 64-bit load" % m.name)
            byte_sz *= 2
            byte_off = bit_off // 8 // byte_sz * byte_sz
    else:
        byte_sz = btf.size_of(field_tid)
        byte_off = bit_off // 8
        bit_sz = byte_sz * 8
    if validate is not None:
        validate[0] = not bitfield
    if kind == CoreReloKind.FIELD_BYTE_OFFSET:
        val = byte_off
        if not bitfield:
            field_sz, type_id = byte_sz, field_tid
    elif kind == CoreReloKind.FIELD_BYTE_SIZE:
        val = byte_sz
    elif kind == CoreReloKind.FIELD_SIGNED:
        val = int((isinstance(mt, AnyEnum) and mt.signed) or (isinstance(mt, Int) and mt.signed))
        if validate is not None:
            validate[0] = True
    elif kind == CoreReloKind.FIELD_LSHIFT_U64:
        val = 64 - (bit_off + bit_sz - byte_off * 8)
    elif kind == CoreReloKind.FIELD_RSHIFT_U64:
        val = 64 - bit_sz
        if validate is not None:
            validate[0] = True
    else:
        raise BtfError("CO-RE: unknown field relocation kind %d" % kind)
    return val, field_sz, type_id


def _type_value(relo: CoreRelo, spec: _Spec | None) -> int:
    if spec is None:
        return 0
    if relo.kind == CoreReloKind.TYPE_ID_TARGET:
        return spec.root_type_id
    if relo.kind in (CoreReloKind.TYPE_EXISTS, CoreReloKind.TYPE_MATCHES):
        return 1
    if relo.kind == CoreReloKind.TYPE_SIZE:
        return spec.btf.size_of(spec.root_type_id)
    raise BtfError("CO-RE: unknown type relocation kind %d" % relo.kind)


def _enum_value(relo: CoreRelo, spec: _Spec | None) -> int:
    if relo.kind == CoreReloKind.ENUMVAL_EXISTS:
        return 1 if spec is not None else 0
    if spec is None:
        raise _Poison("enum value not found in the target BTF")
    t = spec.btf[spec.acc[0].type_id]
    assert isinstance(t, AnyEnum)
    v = t.values[spec.acc[0].idx].value
    if isinstance(t, Enum):  # libbpf reads the __s32 and widens it
        v &= 0xFFFFFFFF
        v = v - (1 << 32) if v >> 31 else v
    return v & 0xFFFFFFFFFFFFFFFF


def calc_relo(relo: CoreRelo, local: _Spec, targ: _Spec | None) -> CoreResult:
    """``bpf_core_calc_relo`` for one target spec (None: no candidate matched)."""
    try:
        if relo.kind in FIELD_KINDS:
            validate = [True]
            orig, orig_sz, orig_tid = _field_value(relo, local, validate)
            new, new_sz, new_tid = _field_value(relo, targ, None)
            fail = False
            if orig_sz != new_sz:
                ot, nt = local.btf[orig_tid], targ.btf[new_tid]  # type: ignore[union-attr]
                ok = (isinstance(ot, Ptr) and isinstance(nt, Ptr)) or (
                    isinstance(ot, Int) and isinstance(nt, Int) and not ot.signed and not nt.signed)
                fail = not ok
            return CoreResult(orig, new, validate=validate[0], fail_memsz_adjust=fail, orig_sz=orig_sz,
                              new_sz=new_sz, orig_type_id=orig_tid, new_type_id=new_tid)
        if relo.kind in TYPE_KINDS:
            return CoreResult(_type_value(relo, local), _type_value(relo, targ),
                              validate=relo.kind != CoreReloKind.TYPE_ID_TARGET)
        if relo.kind in ENUMVAL_KINDS:
            return CoreResult(_enum_value(relo, local), _enum_value(relo, targ))
    except _Poison as p:
        return CoreResult(0, 0, poison=True, reason=str(p))
    raise BtfError("CO-RE: unknown relocation kind %d" % relo.kind)


class CoreResolver:
    """Resolves relocations of one object (local BTF) against one target BTF, caching candidates."""

    def __init__(self, local: Btf, target: Btf, target_name: str = "target BTF"):
        self.local = local
        self.target = target
        self.target_name = target_name
        # Resolving against the object's own BTF (no kernel BTF): the "kernel" types are the
        # unflavored ones (from vmlinux.h); flavors (task_struct___old) are the program's guesses.
        self.skip_flavors = target is local
        self._cands: dict[int, list[int]] = {}
        self._total = _Budget(None, MAX_TOTAL_STEPS)

    def candidates(self, local_id: int) -> list[int]:
        """``bpf_core_find_cands``: target types of a compatible kind with the same essential name."""
        got = self._cands.get(local_id)
        if got is None:
            lt = self.local[local_id]
            if not lt.name:
                raise BtfError("CO-RE: relocations against anonymous types are not supported (%s)"
                               % self.local.describe(local_id))
            ess = essential_name(lt.name)
            got = []
            for tid in self.target.ids_by_essential_name(lt.name):
                if not _kind_compat(self.target.kind_of(tid), lt.KIND):
                    continue
                name = self.target[tid].name
                if essential_name(name) == ess and not (self.skip_flavors and name != ess):
                    got.append(tid)
            self._cands[local_id] = got
        return got

    def resolve(self, relo: CoreRelo) -> CoreResult:
        """``bpf_core_calc_relo_insn``: BtfError for malformed records, a poison result for misses."""
        local = parse_spec(self.local, relo)
        if relo.kind == CoreReloKind.TYPE_ID_LOCAL:
            return CoreResult(relo.type_id, relo.type_id, validate=False)
        budget = _Budget(self._total)
        result: CoreResult | None = None
        best: _Spec | None = None
        for tid in self.candidates(relo.type_id):
            targ = spec_match(local, self.target, tid, budget)
            if targ is None:
                continue
            res = calc_relo(relo, local, targ)
            if result is None:
                result, best = res, targ
            elif targ.bit_offset != best.bit_offset:  # type: ignore[union-attr]
                raise _err(self.local, relo, "field offset ambiguity between candidates: %d != %d bits"
                           % (targ.bit_offset, best.bit_offset))  # type: ignore[union-attr]
            elif res.poison != result.poison or res.new_val != result.new_val:
                raise _err(self.local, relo, "relocation decision ambiguity between candidates: %d != %d"
                           % (res.new_val, result.new_val))
        if result is None:
            result = calc_relo(relo, local, None)
            if result.poison:
                result = CoreResult(0, 0, poison=True, reason="%s (no match among %d candidate%s in %s)" % (
                    result.reason, len(self.candidates(relo.type_id)),
                    "" if len(self.candidates(relo.type_id)) == 1 else "s", self.target_name))
        return result


# --- patching -------------------------------------------------------------------------


def _s32(v: int) -> int:
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >> 31 else v


def poison_slot(slot: list[int]) -> None:
    """Turn one raw slot ``[code, dst, src, off, imm]`` into ``call 0xbad2310``."""
    slot[:] = [_BPF_CALL, 0, 0, 0, POISON_HELPER_ID]


def patch_insn(slots: list[list[int]], idx: int, res: CoreResult) -> str | None:
    """``bpf_core_patch_insn`` on raw slots ``[code, dst, src, off, imm]``.

    Returns None, or the reason when the instruction was poisoned; raises
    BtfError when the instruction does not fit the relocation.
    """
    if not 0 <= idx < len(slots):
        raise BtfError("CO-RE relocation at insn #%d is outside the section (%d insns)" % (idx, len(slots)))
    insn = slots[idx]
    code = insn[0]
    cls = code & 0x07
    if res.poison:
        if code == _BPF_LDDW and idx + 1 < len(slots):
            poison_slot(slots[idx + 1])
        poison_slot(insn)
        return res.reason
    orig, new = res.orig_val & 0xFFFFFFFFFFFFFFFF, res.new_val & 0xFFFFFFFFFFFFFFFF
    if cls in (0x04, 0x07):  # ALU, ALU64
        if code & 0x08:
            raise BtfError("CO-RE relocation at insn #%d: ALU instruction with a register source" % idx)
        if res.validate and insn[4] & 0xFFFFFFFFFFFFFFFF != orig:
            raise BtfError("CO-RE relocation at insn #%d (ALU): unexpected value %d, expected %d"
                           % (idx, insn[4], res.orig_val))
        insn[4] = _s32(new)
        return None
    if cls in (0x01, 0x02, 0x03):  # LDX, ST, STX
        if res.validate and insn[3] & 0xFFFFFFFFFFFFFFFF != orig:
            raise BtfError("CO-RE relocation at insn #%d (LDX/ST/STX): unexpected offset %d, expected %d"
                           % (idx, insn[3], res.orig_val))
        if new > 0x7FFF:
            raise BtfError("CO-RE relocation at insn #%d (LDX/ST/STX): offset %d too big" % (idx, new))
        if res.fail_memsz_adjust:
            if code == _BPF_LDDW and idx + 1 < len(slots):
                poison_slot(slots[idx + 1])
            poison_slot(insn)
            return "the field's size changed (%d -> %d bytes) and it is not a pointer or unsigned integer" % (
                res.orig_sz, res.new_sz)
        insn[3] = new
        if res.new_sz != res.orig_sz:
            if _SIZE_BYTES[code & 0x18] != res.orig_sz:
                raise BtfError("CO-RE relocation at insn #%d: access size %d, expected %d"
                               % (idx, _SIZE_BYTES[code & 0x18], res.orig_sz))
            if res.new_sz not in _BYTES_SIZE:
                raise BtfError("CO-RE relocation at insn #%d: invalid new access size %d" % (idx, res.new_sz))
            insn[0] = (code & ~0x18) | _BYTES_SIZE[res.new_sz]
        return None
    if code == _BPF_LDDW:
        if (idx + 1 >= len(slots) or insn[2] != 0 or insn[3] != 0 or slots[idx + 1][0] != 0
                or slots[idx + 1][1] != 0 or slots[idx + 1][2] != 0 or slots[idx + 1][3] != 0):
            raise BtfError("CO-RE relocation at insn #%d (lddw) has an unexpected form" % idx)
        imm = (insn[4] & 0xFFFFFFFF) | ((slots[idx + 1][4] & 0xFFFFFFFF) << 32)
        if res.validate and imm != orig:
            raise BtfError("CO-RE relocation at insn #%d (lddw): unexpected value %d, expected %d"
                           % (idx, imm, orig))
        insn[4] = _s32(new)
        slots[idx + 1][4] = _s32(new >> 32)
        return None
    raise BtfError("CO-RE relocation at insn #%d: cannot relocate opcode %#04x" % (idx, code))


def apply_relos(slots: list[list[int]], section: str, relos, resolver: CoreResolver) -> list[CoreFailure]:
    """Resolve and patch every relocation of one section; returns the poisoned instructions."""
    failures = []
    for n, relo in enumerate(relos):
        if relo.insn_off % 8:
            raise BtfError("CO-RE relocation #%d of section %r: insn offset %d is not a multiple of 8"
                           % (n, section, relo.insn_off))
        idx = relo.insn_off // 8
        try:
            res = resolver.resolve(relo)
            reason = patch_insn(slots, idx, res)
        except BtfError as e:
            raise BtfError("section %r, insn #%d, CO-RE relocation #%d: %s" % (section, idx, n, e)) from None
        if reason is not None:
            failures.append(CoreFailure(
                section, idx, relo.kind_name,
                resolver.local.describe(relo.type_id), relo.access, format_spec(resolver.local, relo), reason))
    return failures
