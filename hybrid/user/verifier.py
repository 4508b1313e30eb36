"""Load-time verifier: structural checks that every engine relies on.

It checks what can be checked without running the program: opcodes and
their fields (an unused field must be zero), registers, ``r10`` read-only,
constant stack offsets inside the 512-byte frame, jumps inside the
program and never into the second slot of an ``lddw`` nor across a
subprogram, helper ids, subprograms that end in ``exit`` or a jump, no
recursion, the call depth limit, and registers read before they are
written.  Every error names the instruction:
``insn #5 (call 63): unknown helper 63``.

It is not the kernel's verifier: it does not track pointer types or
value ranges, so memory safety of loads and stores through registers
other than ``r10`` is the program author's (as in bpftime and uBPF).
"""

from __future__ import annotations

from dataclasses import dataclass

from hybrid.errors import VerifierError
from hybrid.user import isa
from hybrid.user.helpers import TAIL_CALL
from hybrid.user.isa import OPS, Insn, Kind

NREGS = 11
FP = 10
MAX_INSNS = 1_000_000


def _fail(pc: int, insn: Insn | None, what: str) -> VerifierError:
    text = isa.disasm_insn(insn) if insn is not None else "?"
    return VerifierError("insn #%d (%s): %s" % (pc, text, what), pc)


@dataclass(frozen=True)
class Subprog:
    start: int  # slot
    end: int  # slot one past the last instruction


def _check_fields(pc: int, insn: Insn) -> None:
    info = OPS.get(insn.opcode)
    if info is None:
        raise _fail(pc, insn, "unknown opcode 0x%02x" % insn.opcode)
    for field, allowed in (("dst", info.dst_ok), ("src", info.src_ok), ("off", info.off_ok), ("imm", info.imm_ok)):
        value = getattr(insn, field)
        if allowed is not None and value not in allowed:
            if allowed == isa.ZERO:
                raise _fail(pc, insn, "%s field must be 0 for %s, is %d" % (field, info.mnemonic, value))
            raise _fail(pc, insn, "invalid %s %d for %s (allowed: %s)"
                        % (field, value, info.mnemonic, ", ".join(str(v) for v in sorted(allowed))))
    if insn.dst >= NREGS:
        raise _fail(pc, insn, "invalid register r%d" % insn.dst)
    if insn.src >= NREGS and info.src_ok is None:
        raise _fail(pc, insn, "invalid register r%d" % insn.src)
    if info.kind is Kind.LDDW:
        op2, regs2, off2, _ = insn.next_raw
        if op2 or regs2 or off2:
            raise _fail(pc, insn, "second slot of lddw must have opcode, registers and offset 0")
    if info.kind is Kind.LEGACY:
        raise _fail(pc, insn, "legacy packet access (ld abs/ind) is not supported")
    if info.kind is Kind.CALL and insn.src == isa.CALL_KFUNC:
        raise _fail(pc, insn, "kfunc calls are not supported in userspace")


def _check_stack(pc: int, insn: Insn) -> None:
    """A constant offset from r10 must stay inside the frame."""
    info = OPS[insn.opcode]
    if info.kind is Kind.LDX:
        base = insn.src
    elif info.kind in (Kind.ST, Kind.STX, Kind.ATOMIC):
        base = insn.dst
    else:
        return
    if base == FP and not (-isa.STACK_SIZE <= insn.off and insn.off + info.size <= 0):
        raise _fail(pc, insn, "stack access at r10%+d (size %d) outside the %d-byte frame"
                    % (insn.off, info.size, isa.STACK_SIZE))


def _writes(insn: Insn) -> tuple[int, ...]:
    info = OPS[insn.opcode]
    k = info.kind
    if k in (Kind.ALU, Kind.END, Kind.LDX, Kind.LDDW):
        return (insn.dst,)
    if k is Kind.ATOMIC and insn.imm & isa.FETCH:
        return (0,) if insn.imm == 0xF1 else (insn.src,)
    return ()


def _reads(insn: Insn) -> tuple[int, ...]:
    info = OPS[insn.opcode]
    k = info.kind
    regs: list[int] = []
    if k in (Kind.ALU, Kind.JCOND):
        if info.reads_dst:
            regs.append(insn.dst)
        if info.reg_src:
            regs.append(insn.src)
    elif k in (Kind.END, Kind.ST, Kind.CALLX):
        regs.append(insn.dst)
    elif k is Kind.LDX:
        regs.append(insn.src)
    elif k in (Kind.STX, Kind.ATOMIC):
        regs += [insn.dst, insn.src]
        if k is Kind.ATOMIC and insn.imm == 0xF1:
            regs.append(0)
    elif k is Kind.EXIT:
        regs.append(0)
    return tuple(regs)


class _Checker:
    def __init__(self, prog):
        self.prog = prog
        self.insns: tuple[Insn, ...] = prog.insns
        self.slots = isa.slot_index(self.insns)
        self.nslots = self.slots[-1] + self.insns[-1].slots if self.insns else 0
        self.at = {s: i for i, s in enumerate(self.slots)}  # slot -> index

    def run(self) -> None:
        if not self.insns:
            raise VerifierError("empty program: no instructions")
        if len(self.insns) > MAX_INSNS:
            raise VerifierError("program too large: %d instructions (limit %d)" % (len(self.insns), MAX_INSNS))
        for pc, insn in zip(self.slots, self.insns):
            _check_fields(pc, insn)
            self.check_regs(pc, insn)
            self.check_lddw(pc, insn)
            _check_stack(pc, insn)
            self.check_target(pc, insn)
            self.check_helper(pc, insn)
        subs = self.subprograms()
        self.check_ends(subs)
        self.check_calls(subs)
        for sub in subs:
            self.check_init(sub)

    def check_lddw(self, pc: int, insn: Insn) -> None:
        """An lddw with a map source must name a map of the program (and a value inside it)."""
        if OPS[insn.opcode].kind is not Kind.LDDW or insn.src == isa.PSEUDO_NONE:
            return
        if insn.src == isa.PSEUDO_FUNC:
            return  # a code address: checked with the jumps
        if insn.src not in (isa.PSEUDO_MAP_FD, isa.PSEUDO_MAP_VALUE, isa.PSEUDO_MAP_IDX, isa.PSEUDO_MAP_IDX_VALUE):
            raise _fail(pc, insn, "lddw with src %d (BTF object) is not supported in userspace" % insn.src)
        ref = self.prog.maps.get(insn.imm)
        if ref is None:
            known = ", ".join(str(k) for k in sorted(self.prog.maps)) or "none"
            raise _fail(pc, insn, "lddw refers to map %d, which this program does not have (maps: %s)"
                        % (insn.imm, known))
        if insn.src in (isa.PSEUDO_MAP_VALUE, isa.PSEUDO_MAP_IDX_VALUE):
            off = insn.imm_hi & 0xFFFFFFFF
            if not ref.value_address:
                raise _fail(pc, insn, "map %r has no directly addressable value" % ref.name)
            if off >= ref.value_size:
                raise _fail(pc, insn, "offset %d is outside the %d-byte value of map %r" % (off, ref.value_size, ref.name))

    def check_regs(self, pc: int, insn: Insn) -> None:
        if FP in _writes(insn):
            raise _fail(pc, insn, "r10 is read-only")

    def check_target(self, pc: int, insn: Insn) -> None:
        info = OPS[insn.opcode]
        if info.kind not in (Kind.JA, Kind.JCOND) and not isa.is_code_ref(insn):
            return
        target = isa.jump_target(insn, pc)
        what = {Kind.CALL: "call", Kind.LDDW: "function address"}.get(info.kind, "jump")
        if not 0 <= target < self.nslots:
            raise _fail(pc, insn, "%s target %d out of range (program has %d slots)" % (what, target, self.nslots))
        if target not in self.at:
            raise _fail(pc, insn, "%s target %d is the second slot of an lddw" % (what, target))

    def check_helper(self, pc: int, insn: Insn) -> None:
        info = OPS[insn.opcode]
        if isa.is_core_poison(insn):
            return  # a failed CO-RE relocation: legal where it is never reached (see successors)
        if info.kind is Kind.CALL and insn.src == isa.CALL_HELPER and insn.imm not in self.prog.helpers:
            raise _fail(pc, insn, "unknown helper %d" % insn.imm)

    def subprograms(self) -> list[Subprog]:
        starts = {0}
        for pc, insn in zip(self.slots, self.insns):
            if isa.is_code_ref(insn):
                starts.add(isa.jump_target(insn, pc))
        ordered = sorted(starts)
        return [Subprog(s, e) for s, e in zip(ordered, ordered[1:] + [self.nslots])]

    def check_ends(self, subs: list[Subprog]) -> None:
        for sub in subs:
            last_pc = max(s for s in self.slots if s < sub.end)
            last = self.insns[self.at[last_pc]]
            if OPS[last.opcode].kind not in (Kind.EXIT, Kind.JA) and not isa.is_core_poison(last):
                raise _fail(last_pc, last, "the last instruction of %s must be exit or a jump"
                            % ("the program" if sub.end == self.nslots else "subprogram at insn #%d" % sub.start))
            for pc in self.pcs(sub):
                insn = self.insns[self.at[pc]]
                if (sub.start != 0 and OPS[insn.opcode].kind is Kind.CALL and insn.src == isa.CALL_HELPER
                        and insn.imm == TAIL_CALL):
                    raise _fail(pc, insn, "bpf_tail_call in a subprogram is not supported; call it from the main program")
                if OPS[insn.opcode].kind in (Kind.JA, Kind.JCOND):
                    target = isa.jump_target(insn, pc)
                    if not sub.start <= target < sub.end:
                        raise _fail(pc, insn, "jump to insn #%d leaves the subprogram at insn #%d"
                                    % (target, sub.start))

    def pcs(self, sub: Subprog) -> list[int]:
        return [s for s in self.slots if sub.start <= s < sub.end]

    def check_calls(self, subs: list[Subprog]) -> None:
        by_start = {s.start: s for s in subs}
        callees: dict[int, list[tuple[int, int]]] = {s.start: [] for s in subs}
        for sub in subs:
            for pc in self.pcs(sub):
                insn = self.insns[self.at[pc]]
                if OPS[insn.opcode].kind is Kind.CALL and insn.src == isa.CALL_LOCAL:
                    callees[sub.start].append((pc, isa.jump_target(insn, pc)))

        def depth(start: int, stack: tuple[int, ...]) -> int:
            best = 1
            for pc, target in callees[start]:
                insn = self.insns[self.at[pc]]
                if target in stack:
                    raise _fail(pc, insn, "recursive call to the subprogram at insn #%d" % target)
                d = 1 + depth(target, stack + (target,))
                if d > isa.MAX_CALL_DEPTH:
                    raise _fail(pc, insn, "call depth %d exceeds the limit of %d frames" % (d, isa.MAX_CALL_DEPTH))
                best = max(best, d)
            return best

        assert 0 in by_start
        depth(0, (0,))

    def check_init(self, sub: Subprog) -> None:
        """Forward data flow: a register must be written on every path before it is read."""
        entry = frozenset({1, 2, FP}) if sub.start == 0 else frozenset({1, 2, 3, 4, 5, FP})
        state: dict[int, frozenset[int]] = {sub.start: entry}
        work = [sub.start]
        while work:
            pc = work.pop()
            insn = self.insns[self.at[pc]]
            have = state[pc]
            for r in _reads(insn):
                if r not in have:
                    raise _fail(pc, insn, "r%d is read before it is written" % r)
            out = have | frozenset(_writes(insn))
            info = OPS[insn.opcode]
            if info.kind in (Kind.CALL, Kind.CALLX):
                out = (out - {1, 2, 3, 4, 5}) | {0}
            for nxt in self.successors(pc, insn):
                if nxt not in state:
                    state[nxt] = out
                    work.append(nxt)
                else:
                    merged = state[nxt] & out
                    if merged != state[nxt]:
                        state[nxt] = merged
                        work.append(nxt)

    def successors(self, pc: int, insn: Insn) -> list[int]:
        kind = OPS[insn.opcode].kind
        if kind is Kind.EXIT or isa.is_core_poison(insn):
            return []  # a poisoned instruction traps: nothing runs after it
        if kind is Kind.JA:
            return [isa.jump_target(insn, pc)]
        nxt = pc + insn.slots
        if kind is Kind.JCOND:
            return [nxt, isa.jump_target(insn, pc)]
        return [nxt]


def verify(prog) -> None:
    """Raise :class:`VerifierError` naming the first bad instruction of ``prog``."""
    _Checker(prog).run()
