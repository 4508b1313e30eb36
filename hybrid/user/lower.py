"""eBPF -> LLVM IR, the one lowering shared by the JIT and the AOT engine.

The module :func:`lower` builds (with ``llvmlite.ir``, no LLVM library
needed) has this shape:

* ``i64 @bpf_entry(ptr %ctx, i64 %len)``, the only exported function: it
  calls subprogram 0 with ``r1 = ctx``, ``r2 = len`` and returns its ``r0``;
* one ``internal i64 @bpf_sub_<slot>(i64 r1, .., i64 r5)`` per bpf-to-bpf
  subprogram (slot 0 and every target of ``call local``), each with its own
  512-byte stack and its own registers, so ``r6``-``r9`` and ``r10`` are
  preserved across calls simply by being locals.  The verifier has refused
  recursion, so LLVM is free to inline every call;
* ``declare i64 @hybrid_helper_<name>(i64 x5)`` per helper the program can
  call, resolved by the JIT (``llvm.add_symbol``) or the dynamic linker (AOT).
  ``bpf_map_lookup_elem`` on an ARRAY or PERCPU_ARRAY map is inlined (see
  :func:`lower_map_lookup`), as the kernel's JIT does.

Registers are ``alloca i64`` slots that SROA/mem2reg turn into SSA values.
Stack accesses with ``r10`` as base become GEPs into the frame's ``alloca``;
``r10`` is only turned into an integer when the program reads it as a value
(e.g. to pass a stack pointer to a helper), so a frame whose address never
escapes is promoted to registers entirely.  Every other access is
``getelementptr i8, inttoptr(base), off`` with ``align 1``.

No eBPF behaviour maps to LLVM undefined behaviour: shift counts are masked,
divisors are guarded with ``select`` (``x/0 = 0``, ``x%0 = x``,
``INT_MIN/-1 = INT_MIN``, ``INT_MIN%-1 = 0``), every register starts at 0,
and stack loads are ``freeze``d (reading a stack slot never written gives
some value, as in the interpreter, not ``undef``).

The functions below are small and pure-ish: each lowers one instruction kind
into the :class:`Frame` of the subprogram being built.
"""

from __future__ import annotations

import errno
import sys
from dataclasses import dataclass, field
from typing import Callable

from llvmlite import ir

from hybrid.errors import EngineError
from hybrid.user import isa
from hybrid.user.helpers import TAIL_CALL, HelperSpec
from hybrid.user.isa import OPS, Insn, Kind
from hybrid.user.program import MapRef, Program

ENTRY = "bpf_entry"

I8, I16, I32, I64 = (ir.IntType(n) for n in (8, 16, 32, 64))
PTR = ir.PointerType()
INT = {8: I8, 16: I16, 32: I32, 64: I64}
SUB_TYPE = ir.FunctionType(I64, [I64] * 5)  # subprograms and helpers: r1..r5 -> r0
ENTRY_TYPE = ir.FunctionType(I64, [PTR, I64])

FP = 10  # the read-only frame pointer
NREGS = 10  # r0..r9 live in allocas; r10 is computed
MODE_MASK = 0xE0  # the mode bits of a load/store opcode (isa.MODE_*)

# ``call %rN`` with a value that is no helper id of the program: the call
# does not happen, r0 receives -ENOENT and the program goes on.  (The
# interpreter does the same.)
CALLX_UNKNOWN = -errno.ENOENT

MAP_LOOKUP = 1  # bpf_map_lookup_elem, inlined for array maps (lower_map_lookup)
CURRENT_CPU_TYPE = ir.FunctionType(I32, [])  # u32 hybrid_current_cpu(void), for per-CPU arrays

HOST_LITTLE = sys.byteorder == "little"

LddwResolver = Callable[[int, Insn], "int | ir.Value"]
"""``(slot, insn) -> value``: the 64-bit value of an ``lddw`` pseudo load (map
address, map value address, ...), an int or an i64 constant expression (an
address the linker relocates, for code linked into a standalone binary).
Raise :class:`EngineError` to refuse."""


# --- program structure -------------------------------------------------------


@dataclass(frozen=True)
class Subprog:
    """A bpf-to-bpf function: instructions ``insns[first:last]``, slots from ``start``."""

    start: int  # slot of the first instruction
    first: int  # index of the first instruction
    last: int  # index one past the last instruction

    @property
    def name(self) -> str:
        return "bpf_sub_%d" % self.start


def where(slot: int, insn: Insn) -> str:
    """``insn #N (disasm)``, the prefix of every error about an instruction."""
    return "insn #%d (%s)" % (slot, isa.disasm_insn(insn))


def subprograms(insns: tuple[Insn, ...], slots: list[int]) -> list[Subprog]:
    """Split the program at slot 0 and at every target of ``call local`` or ``lddw`` of a function."""
    starts = {0} | {isa.jump_target(i, s) for s, i in zip(slots, insns) if isa.is_code_ref(i)}
    index = {s: n for n, s in enumerate(slots)}
    firsts = sorted(index[s] for s in starts)
    lasts = firsts[1:] + [len(insns)]
    return [Subprog(slots[a], a, b) for a, b in zip(firsts, lasts)]


def leaders(insns: tuple[Insn, ...], slots: list[int], sub: Subprog) -> list[int]:
    """Slots that start a basic block of ``sub``: its start, jump targets, insns after a jump.

    A target that is no instruction of ``sub`` is left out (the verifier refuses
    those); :meth:`Frame.block` then reports it.
    """
    own = set(slots[sub.first:sub.last])
    out = {sub.start}
    for n in range(sub.first, sub.last):
        kind = OPS[insns[n].opcode].kind
        if kind in (Kind.JA, Kind.JCOND):
            out.add(isa.jump_target(insns[n], slots[n]))
        if (kind in (Kind.JA, Kind.JCOND, Kind.EXIT) or isa.is_core_poison(insns[n])) and n + 1 < sub.last:
            out.add(slots[n + 1])
    return sorted(out & own)


def helper_ids(program: Program) -> list[int]:
    """Helper ids the program can reach: its ``call N``, or every helper if it uses ``callx``."""
    kinds = [OPS[i.opcode].kind for i in program.insns]
    if Kind.CALLX in kinds:
        return sorted(program.helpers)
    ids = {i.imm for i, k in zip(program.insns, kinds) if k is Kind.CALL and i.src == isa.CALL_HELPER}
    return sorted(ids)


def used_helpers(program: Program) -> list[HelperSpec]:
    """The helper specs whose native symbols the lowered module refers to (tail calls are lowered inline)."""
    return [program.helpers[h] for h in helper_ids(program) if h in program.helpers and h != TAIL_CALL]


# --- per-subprogram state ----------------------------------------------------


@dataclass
class ModuleState:
    """What all subprograms of one module share."""

    module: ir.Module
    program: Program
    functions: dict[int, ir.Function]  # subprogram start slot -> function
    resolve_lddw: LddwResolver | None
    helpers: dict[int, ir.Function] = field(default_factory=dict)  # helper id -> declaration
    _inline_arrays: list[MapRef] | None = field(default=None, init=False, repr=False)

    def inline_arrays(self) -> list[MapRef]:
        """The array maps whose lookups are inlined: those the program loads with ``lddw rX, map``.

        Empty when the lddw values come from a resolver (the maps' addresses
        are then not the values the inlined lookups would compare r1 with),
        or when helper 1 is not the standard ``map_lookup_elem``.
        """
        if self._inline_arrays is None:
            refs: dict[int, MapRef] = {}
            spec = self.program.helpers.get(MAP_LOOKUP)
            if self.resolve_lddw is None and spec is not None and spec.name == "map_lookup_elem":
                for insn in self.program.insns:
                    if OPS[insn.opcode].kind is Kind.LDDW and insn.src in (isa.PSEUDO_MAP_FD, isa.PSEUDO_MAP_IDX):
                        ref = self.program.maps.get(insn.imm)
                        if ref is not None and ref.inline_array is not None:
                            refs.setdefault(ref.address, ref)
            self._inline_arrays = [refs[a] for a in sorted(refs)]
        return self._inline_arrays

    def helper(self, hid: int) -> ir.Function:
        """The declaration of helper ``hid``, added on first use."""
        fn = self.helpers.get(hid)
        if fn is None:
            spec = self.program.helpers[hid]
            fn = ir.Function(self.module, SUB_TYPE, spec.symbol)
            fn.attributes.add("nounwind")
            self.helpers[hid] = fn
        return fn


@dataclass
class Frame:
    """One subprogram being lowered: builder, register slots, stack, blocks."""

    builder: ir.IRBuilder
    regs: list[ir.AllocaInstr]
    stack: ir.Value  # the frame's lowest byte, a ptr
    blocks: dict[int, ir.Block]  # leader slot -> block
    mod: ModuleState
    fp: ir.Value | None = None  # r10 as an integer, made on first use (see :meth:`read`)
    fp_offsets: dict[int, int] = field(default_factory=dict)  # reg -> off: holds r10 + off (this block)
    slot: int = 0
    insn: Insn = Insn(0)

    def error(self, problem: str) -> EngineError:
        return EngineError("%s: %s" % (where(self.slot, self.insn), problem))

    def read(self, reg: int) -> ir.Value:
        """Register ``reg`` as an i64."""
        if reg == FP:
            if self.fp is None:  # the frame's address escapes only if r10 is used as a value
                self.fp = frame_pointer(self.stack)
            return self.fp
        return self.builder.load(self.regs[reg], typ=I64)

    def write(self, reg: int, value: ir.Value) -> None:
        """Set register ``reg`` to ``value`` (zero-extended to 64 bits if narrower)."""
        if reg == FP:
            raise self.error("r10 is read-only")
        if value.type != I64:
            value = self.builder.zext(value, I64)
        self.builder.store(value, self.regs[reg])

    def block(self, slot: int) -> ir.Block:
        try:
            return self.blocks[slot]
        except KeyError:
            raise self.error("jump to insn #%d leaves the subprogram" % slot) from None


def const(bits: int, value: int) -> ir.Constant:
    """An integer constant of ``bits`` bits holding ``value`` modulo 2**bits."""
    return ir.Constant(INT[bits], value & ((1 << bits) - 1))


def address(fr: Frame, base: int, off: int) -> ir.Value:
    """The pointer ``base + off``: a GEP into the frame for r10, else via inttoptr."""
    b = fr.builder
    if base == FP:  # the verifier keeps these inside the frame; inbounds only if so
        inside = -isa.STACK_SIZE <= off <= 0
        return b.gep(fr.stack, [const(64, isa.STACK_SIZE + off)], inbounds=inside, source_etype=I8)
    ptr = b.inttoptr(fr.read(base), PTR)
    if off == 0:
        return ptr
    return b.gep(ptr, [const(64, off)], source_etype=I8)


# --- ALU -----------------------------------------------------------------------


def _operands(fr: Frame, insn: Insn, bits: int) -> tuple[ir.Value, ir.Value]:
    """``dst`` and the second operand (``src`` or ``imm``), both ``bits`` wide."""
    info = OPS[insn.opcode]
    b = fr.builder
    dst = fr.read(insn.dst) if info.reads_dst else None
    src = fr.read(insn.src) if info.reg_src else const(64, insn.imm)  # imm sign-extended
    if bits == 32:
        dst = b.trunc(dst, I32) if dst is not None else None
        src = b.trunc(src, I32) if info.reg_src else const(32, insn.imm)
    return dst, src


def _shift(op: str) -> Callable:
    def emit(b: ir.IRBuilder, x: ir.Value, y: ir.Value, bits: int, off: int) -> ir.Value:
        return getattr(b, op)(x, b.and_(y, const(bits, bits - 1)))

    return emit


def _div(b: ir.IRBuilder, x: ir.Value, y: ir.Value, bits: int, off: int) -> ir.Value:
    """``x / y``: 0 when y is 0; signed (off 1) ``INT_MIN / -1 = INT_MIN``."""
    zero = b.icmp_unsigned("==", y, const(bits, 0))
    if off != 1:
        q = b.udiv(x, b.select(zero, const(bits, 1), y))
        return b.select(zero, const(bits, 0), q)
    minus1 = b.icmp_unsigned("==", y, const(bits, -1))
    safe = b.select(b.or_(zero, minus1), const(bits, 1), y)
    q = b.sdiv(x, safe)
    return b.select(zero, const(bits, 0), b.select(minus1, b.neg(x), q))


def _mod(b: ir.IRBuilder, x: ir.Value, y: ir.Value, bits: int, off: int) -> ir.Value:
    """``x % y``: x when y is 0; signed (off 1, sign of x) ``INT_MIN % -1 = 0``."""
    zero = b.icmp_unsigned("==", y, const(bits, 0))
    if off != 1:
        r = b.urem(x, b.select(zero, const(bits, 1), y))
        return b.select(zero, x, r)
    minus1 = b.icmp_unsigned("==", y, const(bits, -1))
    r = b.srem(x, b.select(b.or_(zero, minus1), const(bits, 1), y))  # x % 1 == 0 == x % -1
    return b.select(zero, x, r)


def _mov(b: ir.IRBuilder, x: ir.Value, y: ir.Value, bits: int, off: int) -> ir.Value:
    """``mov`` and ``movsx`` (off 8/16/32: sign-extend the low ``off`` bits of src)."""
    if off:
        return b.sext(b.trunc(y, INT[off]), INT[bits])
    return y


def _binop(name: str) -> Callable:
    def emit(b: ir.IRBuilder, x: ir.Value, y: ir.Value, bits: int, off: int) -> ir.Value:
        return getattr(b, name)(x, y)

    return emit


# isa.ALU_OPS name -> (builder, dst, src, bits, off) -> result
ALU_EMIT: dict[str, Callable] = {
    "add": _binop("add"),
    "sub": _binop("sub"),
    "mul": _binop("mul"),
    "div": _div,
    "or": _binop("or_"),
    "and": _binop("and_"),
    "lsh": _shift("shl"),
    "rsh": _shift("lshr"),
    "neg": lambda b, x, y, bits, off: b.neg(x),
    "mod": _mod,
    "xor": _binop("xor"),
    "mov": _mov,
    "arsh": _shift("ashr"),
}


def lower_alu(fr: Frame, insn: Insn) -> None:
    info = OPS[insn.opcode]
    dst, src = _operands(fr, insn, info.bits)
    emit = ALU_EMIT[isa.ALU_OPS[info.op]]
    # the verifier allows a nonzero off only for sdiv/smod (1) and movsx (8/16/32)
    fr.write(insn.dst, emit(fr.builder, dst, src, info.bits, insn.off))


def lower_end(fr: Frame, insn: Insn) -> None:
    """``le``/``be`` (to that byte order, then truncate) and ``bswap`` (always swap)."""
    info = OPS[insn.opcode]
    b = fr.builder
    bits = insn.imm
    value = fr.read(insn.dst)
    if bits < 64:
        value = b.trunc(value, INT[bits])
    swap = info.mnemonic == "bswap" or (info.mnemonic == "be") == HOST_LITTLE
    if swap:
        value = b.bswap(value)
    fr.write(insn.dst, value)


# --- memory --------------------------------------------------------------------


def lower_lddw(fr: Frame, insn: Insn) -> None:
    if insn.src == isa.PSEUDO_FUNC:  # the address of a subprogram (a bpf_loop callback, ...)
        fn = fr.mod.functions[isa.jump_target(insn, fr.slot)]
        fr.write(insn.dst, fr.builder.ptrtoint(fn, I64))
        return
    if insn.src == isa.PSEUDO_NONE:
        value = insn.imm64
    elif fr.mod.resolve_lddw is not None:
        value = fr.mod.resolve_lddw(fr.slot, insn)
        if isinstance(value, ir.Value):
            fr.write(insn.dst, value)
            return
    elif insn.imm in fr.mod.program.maps:
        value = fr.mod.program.lddw_value(insn)
    else:
        raise fr.error("no map %d in this program" % insn.imm)
    fr.write(insn.dst, const(64, value))


def freeze(b: ir.IRBuilder, value: ir.Value) -> ir.Value:
    """``freeze value``: an arbitrary but fixed value instead of undef (llvmlite has no builder method)."""
    instr = ir.Instruction(b.block, value.type, "freeze", [value])
    b._insert(instr)
    return instr


def lower_ldx(fr: Frame, insn: Insn) -> None:
    """Loads zero-extend (``ldxs*`` sign-extend).  A stack load is frozen: the verifier does
    not track stack initialization, and once SROA promotes the frame an uninitialized
    slot would be ``undef`` - a branch on it is UB in LLVM, not just an unknown value."""
    info = OPS[insn.opcode]
    b = fr.builder
    value = b.load(address(fr, insn.src, insn.off), typ=INT[info.size * 8])
    value.align = 1
    if insn.src == FP:
        value = freeze(b, value)
    if info.size < 8:
        signed = insn.opcode & MODE_MASK == isa.MODE_MEMSX
        value = (b.sext if signed else b.zext)(value, I64)
    fr.write(insn.dst, value)


def lower_store(fr: Frame, insn: Insn) -> None:
    """``st`` (the imm, truncated; sign-extended for stdw) and ``stx``."""
    info = OPS[insn.opcode]
    b = fr.builder
    bits = info.size * 8
    if info.kind is Kind.ST:
        value = const(bits, insn.imm)
    else:
        value = fr.read(insn.src)
        value = b.trunc(value, INT[bits]) if bits < 64 else value
    st = b.store(value, address(fr, insn.dst, insn.off))
    st.align = 1


def lower_atomic(fr: Frame, insn: Insn) -> None:
    """``lock`` add/or/and/xor (optionally fetching), xchg and cmpxchg, all seq_cst."""
    info = OPS[insn.opcode]
    b = fr.builder
    ty = INT[info.size * 8]
    ptr = address(fr, insn.dst, insn.off)
    src = fr.read(insn.src)
    src = b.trunc(src, ty) if ty != I64 else src
    op = isa.ATOMIC_OPS[insn.imm & ~isa.FETCH]
    if op == "cmpxchg":
        expected = fr.read(0)
        expected = b.trunc(expected, ty) if ty != I64 else expected
        pair = b.cmpxchg(ptr, expected, src, "seq_cst", "seq_cst")
        fr.write(0, b.extract_value(pair, 0))
        return
    old = b.atomic_rmw(op, ptr, src, "seq_cst")
    if insn.imm & isa.FETCH:
        fr.write(insn.src, old)


# --- control flow ----------------------------------------------------------------

# isa.JMP_OPS name (without the "32") -> (signed?, icmp predicate)
JCOND: dict[str, tuple[bool, str]] = {
    "jeq": (False, "=="),
    "jne": (False, "!="),
    "jgt": (False, ">"),
    "jge": (False, ">="),
    "jlt": (False, "<"),
    "jle": (False, "<="),
    "jsgt": (True, ">"),
    "jsge": (True, ">="),
    "jslt": (True, "<"),
    "jsle": (True, "<="),
}


def condition(b: ir.IRBuilder, name: str, x: ir.Value, y: ir.Value) -> ir.Value:
    """The i1 ``x <name> y`` for a conditional jump."""
    if name == "jset":
        return b.icmp_unsigned("!=", b.and_(x, y), ir.Constant(x.type, 0))
    signed, pred = JCOND[name]
    return (b.icmp_signed if signed else b.icmp_unsigned)(pred, x, y)


def lower_ja(fr: Frame, insn: Insn) -> None:
    fr.builder.branch(fr.block(isa.jump_target(insn, fr.slot)))


def lower_jcond(fr: Frame, insn: Insn) -> None:
    info = OPS[insn.opcode]
    b = fr.builder
    x = fr.read(insn.dst)
    y = fr.read(insn.src) if info.reg_src else const(64, insn.imm)
    if info.bits == 32:
        x = b.trunc(x, I32)
        y = b.trunc(y, I32) if info.reg_src else const(32, insn.imm)
    cond = condition(b, isa.JMP_OPS[info.op], x, y)
    taken = fr.block(isa.jump_target(insn, fr.slot))
    b.cbranch(cond, taken, fr.block(fr.slot + insn.slots))


def _call_with_args(fr: Frame, fn: ir.Function) -> ir.Value:
    """Call ``fn`` with r1..r5; r1-r5 keep their values (the verifier bars reading them)."""
    args = [fr.read(r) for r in range(1, 6)]
    return fr.builder.call(fn, args)


# A failed CO-RE relocation reached at run time (libbpf's poison call): the
# subprogram returns -EINVAL at once.  (The interpreter raises VmError.)
CORE_POISON_RESULT = -errno.EINVAL


def lower_call(fr: Frame, insn: Insn) -> None:
    if isa.is_core_poison(insn):
        fr.builder.ret(const(64, CORE_POISON_RESULT))
        return
    if insn.src == isa.CALL_LOCAL:
        fn = fr.mod.functions[isa.jump_target(insn, fr.slot)]
    elif insn.src == isa.CALL_HELPER and insn.imm == TAIL_CALL:
        lower_tail_call(fr)
        return
    elif insn.src == isa.CALL_HELPER and insn.imm == MAP_LOOKUP and fr.mod.inline_arrays():
        lower_map_lookup(fr)
        return
    elif insn.src == isa.CALL_HELPER:
        if insn.imm not in fr.mod.program.helpers:
            raise fr.error("unknown helper %d" % insn.imm)
        fn = fr.mod.helper(insn.imm)
    else:
        raise fr.error("kfunc calls are not supported")
    fr.write(0, _call_with_args(fr, fn))


def lower_map_lookup(fr: Frame) -> None:
    """``bpf_map_lookup_elem(map, key)`` with the array maps' lookups inlined.

    A ``switch`` on r1 over the addresses of the program's array maps
    (:meth:`ModuleState.inline_arrays`): for one of them, ``r0 = &value[*key]``
    computed in place (NULL for an index out of range or a NULL key, as the
    helper answers); for any other map, the helper.  ``r1`` is nearly always
    the constant of an ``lddw``, so LLVM folds the switch to one side and
    the helper call disappears for arrays.  Comparing the run-time value keeps
    this exact whatever r1 holds.
    """
    b = fr.builder
    fn = b.function
    m, key = fr.read(1), fr.read(2)
    join = fn.append_basic_block("lookup%d.join" % fr.slot)
    slow = fn.append_basic_block("lookup%d.helper" % fr.slot)
    switch = b.switch(m, slow)
    for n, ref in enumerate(fr.mod.inline_arrays()):
        case = fn.append_basic_block("lookup%d.%s" % (fr.slot, n))
        switch.add_case(const(64, ref.address), case)
        b.position_at_end(case)
        fr.write(0, const(64, 0))  # a NULL key finds nothing
        read = fn.append_basic_block("lookup%d.%s.key" % (fr.slot, n))
        b.cbranch(b.icmp_unsigned("!=", key, const(64, 0)), read, join)
        b.position_at_end(read)
        fr.write(0, _array_slot(fr, m, key, ref))
        b.branch(join)
    b.position_at_end(slow)
    fr.write(0, _call_with_args(fr, fr.mod.helper(MAP_LOOKUP)))
    b.branch(join)
    b.position_at_end(join)


def _array_slot(fr: Frame, m: ir.Value, key: ir.Value, ref: MapRef) -> ir.Value:
    """``&value[*key]`` of the array at ``m`` (of the current CPU's values if per-CPU), 0 if out of range."""
    b = fr.builder
    lay = ref.inline_array
    off = fr.fp_offsets.get(2)
    if off is not None and -isa.STACK_SIZE <= off <= -4:  # the usual key on the stack: a load LLVM can see
        idx = b.load(address(fr, FP, off), typ=I32)
        idx.align = 1
        idx = freeze(b, idx)
    else:
        idx = b.load(b.inttoptr(key, PTR), typ=I32)
        idx.align = 1
    addr = b.add(m, const(64, lay.offset))
    if lay.percpu and lay.nr_cpus > 1:
        cpu = b.call(_current_cpu(fr.mod), [])
        n = const(32, lay.nr_cpus)
        slot = b.select(b.icmp_unsigned("<", cpu, n), cpu, b.urem(cpu, n))  # as cpu_slot() in maps_impl.h
        addr = b.add(addr, b.mul(b.zext(slot, I64), const(64, lay.plane)))
    addr = b.add(addr, b.mul(b.zext(idx, I64), const(64, lay.stride)))
    return b.select(b.icmp_unsigned("<", idx, const(32, lay.max_entries)), addr, const(64, 0))


def track_fp_offsets(known: dict[int, int], insn: Insn) -> None:
    """Update ``known`` (register -> off, for registers holding ``r10 + off``) after ``insn``.

    Only ``mov rX, r10`` and ``add rX, imm`` (64-bit) are followed; any
    other write to a register, and every call (r0-r5), forgets it.
    """
    info = OPS[insn.opcode]
    kind = info.kind
    if kind is Kind.ALU and info.bits == 64 and insn.off == 0:
        op = isa.ALU_OPS[info.op]
        if op == "mov" and info.reg_src and insn.src == FP:
            known[insn.dst] = 0
            return
        if op == "add" and not info.reg_src and insn.dst in known:
            known[insn.dst] += insn.imm
            return
    if kind in (Kind.ALU, Kind.END, Kind.LDX, Kind.LDDW):
        known.pop(insn.dst, None)
    elif kind is Kind.ATOMIC:
        known.pop(insn.src, None)
        known.pop(0, None)
    elif kind in (Kind.CALL, Kind.CALLX):
        for r in range(6):
            known.pop(r, None)


def _current_cpu(mod: "ModuleState") -> ir.Function:
    """``u32 hybrid_current_cpu(void)``, declared ``readnone``: LLVM may read it once per run.

    The kernel runs a program with migration disabled, so one run sees one
    CPU; reading it once keeps a run on one CPU's values.
    """
    fn = mod.module.globals.get("hybrid_current_cpu")
    if fn is None:
        fn = _runtime_function(mod, "hybrid_current_cpu", CURRENT_CPU_TYPE)
        fn.attributes.add("readnone")
    return fn


TAIL_TARGET_TYPE = ir.FunctionType(PTR, [PTR, I32])
TAIL_RUN_TYPE = ir.FunctionType(I64, [PTR, PTR])


def _runtime_function(mod: "ModuleState", name: str, fnty: ir.FunctionType) -> ir.Function:
    fn = mod.module.globals.get(name)
    if fn is None:
        fn = ir.Function(mod.module, fnty, name)
        fn.attributes.add("nounwind")
    return fn


def lower_tail_call(fr: Frame) -> None:
    """``bpf_tail_call(ctx, prog_array, index)``: run the target and return its r0, or go on with -ENOENT.

    The runtime bounds the chain at 33 like the kernel; the verifier allows
    tail calls only in the main program, so returning here ends the program.
    """
    b = fr.builder
    target_fn = _runtime_function(fr.mod, "hybrid_tail_call_target", TAIL_TARGET_TYPE)
    run_fn = _runtime_function(fr.mod, "hybrid_tail_call_run", TAIL_RUN_TYPE)
    target = b.call(target_fn, [b.inttoptr(fr.read(2), PTR), b.trunc(fr.read(3), I32)])
    fn = b.function
    taken = fn.append_basic_block("tail%d.go" % fr.slot)
    missed = fn.append_basic_block("tail%d.miss" % fr.slot)
    b.cbranch(b.icmp_unsigned("==", target, ir.Constant(PTR, None)), missed, taken)
    b.position_at_end(taken)
    b.ret(b.call(run_fn, [target, b.inttoptr(fr.read(1), PTR)]))
    b.position_at_end(missed)
    fr.write(0, const(64, -errno.ENOENT))


def lower_callx(fr: Frame, insn: Insn) -> None:
    """``call %rN``: a switch over the program's helper ids; see :data:`CALLX_UNKNOWN`."""
    b = fr.builder
    fn = b.function
    target = fr.read(insn.dst)
    join = fn.append_basic_block("callx%d.join" % fr.slot)
    unknown = fn.append_basic_block("callx%d.unknown" % fr.slot)
    switch = b.switch(target, unknown)
    for hid in sorted(h for h in fr.mod.program.helpers if h != TAIL_CALL):
        case = fn.append_basic_block("callx%d.h%d" % (fr.slot, hid))
        switch.add_case(const(64, hid), case)
        b.position_at_end(case)
        fr.write(0, _call_with_args(fr, fr.mod.helper(hid)))
        b.branch(join)
    b.position_at_end(unknown)
    fr.write(0, const(64, CALLX_UNKNOWN))
    b.branch(join)
    b.position_at_end(join)


def lower_exit(fr: Frame, insn: Insn) -> None:
    fr.builder.ret(fr.read(0))


def lower_unsupported(fr: Frame, insn: Insn) -> None:
    raise fr.error("legacy packet access (ld abs/ind) is not supported")


LOWER: dict[Kind, Callable[[Frame, Insn], None]] = {
    Kind.ALU: lower_alu,
    Kind.END: lower_end,
    Kind.LDDW: lower_lddw,
    Kind.LDX: lower_ldx,
    Kind.ST: lower_store,
    Kind.STX: lower_store,
    Kind.ATOMIC: lower_atomic,
    Kind.LEGACY: lower_unsupported,
    Kind.JA: lower_ja,
    Kind.JCOND: lower_jcond,
    Kind.CALL: lower_call,
    Kind.CALLX: lower_callx,
    Kind.EXIT: lower_exit,
}


# --- functions and module ----------------------------------------------------------


def frame_pointer(stack: ir.AllocaInstr) -> ir.Value:
    """r10 = the address one past the frame, computed at the end of the entry block."""
    b = ir.IRBuilder()
    b.position_before(stack.parent.terminator)
    return b.add(b.ptrtoint(stack, I64), const(64, isa.STACK_SIZE), name="r10")


def new_frame(fn: ir.Function, mod: ModuleState, block_slots: list[int]) -> Frame:
    """Entry block of a subprogram: stack, register slots (r1-r5 from the arguments, the rest 0)."""
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    stack = b.alloca(ir.ArrayType(I8, isa.STACK_SIZE), name="stack")
    stack.align = 16
    stack.type = PTR  # llvmlite types its allocas; GEPs and stores want an opaque ptr
    regs = [b.alloca(I64, name="r%d" % r) for r in range(NREGS)]
    for r, slot in enumerate(regs):
        b.store(fn.args[r - 1] if 1 <= r <= 5 else const(64, 0), slot)
    blocks = {s: fn.append_basic_block("L%d" % s) for s in block_slots}
    b.branch(blocks[block_slots[0]])
    return Frame(b, regs, stack, blocks, mod)


def lower_subprog(mod: ModuleState, sub: Subprog, slots: list[int]) -> None:
    """Fill in the function of ``sub``, one basic block per leader."""
    insns = mod.program.insns
    fr = new_frame(mod.functions[sub.start], mod, leaders(insns, slots, sub))
    b = fr.builder
    for n in range(sub.first, sub.last):
        slot, insn = slots[n], insns[n]
        if slot in fr.blocks:
            if not b.block.is_terminated:
                b.branch(fr.blocks[slot])
            b.position_at_end(fr.blocks[slot])
            fr.fp_offsets.clear()
        fr.slot, fr.insn = slot, insn
        if b.block.is_terminated:
            continue  # unreachable code after exit/ja
        LOWER[OPS[insn.opcode].kind](fr, insn)
        track_fp_offsets(fr.fp_offsets, insn)
    if not b.block.is_terminated:
        raise fr.error("falls through the end of the subprogram")


def declare_subprog(module: ir.Module, sub: Subprog) -> ir.Function:
    fn = ir.Function(module, SUB_TYPE, sub.name)
    fn.linkage = "internal"
    fn.attributes.add("nounwind")
    for r, arg in enumerate(fn.args, 1):
        arg.name = "r%d" % r
    return fn


def define_entry(module: ir.Module, main: ir.Function, name: str) -> ir.Function:
    """``i64 name(ptr ctx, i64 len)``: calls subprogram 0 with r1 = ctx, r2 = len."""
    fn = ir.Function(module, ENTRY_TYPE, name)
    fn.attributes.add("nounwind")
    ctx, size = fn.args
    ctx.name, size.name = "ctx", "len"
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    zero = const(64, 0)
    b.ret(b.call(main, [b.ptrtoint(ctx, I64), size, zero, zero, zero]))
    return fn


def lower(program: Program, entry_name: str = ENTRY, resolve_lddw: LddwResolver | None = None) -> ir.Module:
    """The LLVM module of ``program`` (verified), with its entry point ``entry_name``.

    ``resolve_lddw`` supplies the values of ``lddw`` pseudo loads (maps);
    without it they are refused.  Raises :class:`EngineError` naming the
    instruction for anything the native engines cannot run.
    """
    if not program.insns:
        raise EngineError("program %r has no instructions" % program.name)
    module = ir.Module(name=program.name)
    slots = isa.slot_index(program.insns)
    subs = subprograms(program.insns, slots)
    functions = {s.start: declare_subprog(module, s) for s in subs}
    state = ModuleState(module, program, functions, resolve_lddw)
    for sub in subs:
        lower_subprog(state, sub, slots)
    define_entry(module, functions[0], entry_name)
    return module
