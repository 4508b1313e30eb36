"""The xdp_md context rewrite: what the kernel's verifier does to XDP programs' context loads.

An XDP program reads ``ctx->data``, ``ctx->data_end`` and ``ctx->data_meta``
as 32-bit fields of ``struct xdp_md`` and uses them as pointers.  The kernel
rewrites each such load (``convert_ctx_access``, ``xdp_convert_ctx_access``)
into a 64-bit load of the matching pointer of its ``struct xdp_buff``.  This
module does the same for the VM: every ``ldxw rD, [rC + 0/4/8]`` where ``rC``
holds the context on every path becomes ``ldxdw rD, [rC + 24/32/40]``, the
64-bit pointers of :c:struct:`hybrid_xdp_md` (``hybrid/native/xdp.h``).
One instruction replaces one, so no jump moves.

Which registers hold the context is a forward data-flow analysis, like the
kernel's register types (only the one type that matters here): ``r1`` at
entry; copies (``mov rX, rY``); 8-byte spills to the stack and their fills;
bpf-to-bpf calls (the callee's ``r1``-``r5`` from every call site); a
helper call clobbers ``r0``-``r5``.  (A store into the stack through a
register other than ``r10`` is not followed; clang spills and fills
through ``r10``.)  A load the analysis cannot prove is
left alone: the packet memory hybrid uses is below 4 GiB where the system
allows it, and the 32-bit fields hold the pointers' low halves, so such a
load still reads the right pointer there.
"""

from __future__ import annotations

from dataclasses import replace

from hybrid.user import isa
from hybrid.user.isa import OPS, Insn, Kind

XDP_MD_SIZE = 24  # struct xdp_md (uapi)
# xdp_md field offset -> offset of the 64-bit pointer in struct hybrid_xdp_md
POINTER_FIELDS = {0: 24, 4: 32, 8: 40}  # data, data_end, data_meta

LDXW = 0x61  # BPF_LDX | BPF_MEM | BPF_W
LDXDW = 0x79  # BPF_LDX | BPF_MEM | BPF_DW
STXDW = 0x7B  # BPF_STX | BPF_MEM | BPF_DW
FP = 10

_CTX = "ctx"


class _State:
    """Registers (and 8-byte stack slots, by offset from r10) known to hold the context."""

    __slots__ = ("regs", "stack")

    def __init__(self, regs=frozenset(), stack=frozenset()):
        self.regs = frozenset(regs)
        self.stack = frozenset(stack)

    def meet(self, other: "_State") -> "_State":
        return _State(self.regs & other.regs, self.stack & other.stack)

    def __eq__(self, other) -> bool:
        return isinstance(other, _State) and self.regs == other.regs and self.stack == other.stack

    def __hash__(self) -> int:  # pragma: no cover - not used as a key
        return hash((self.regs, self.stack))


def _step(state: _State, insn: Insn) -> _State:
    """The state after ``insn`` (not for calls and jumps' targets, see :func:`analyze`)."""
    info = OPS[insn.opcode]
    kind = info.kind
    regs, stack = set(state.regs), set(state.stack)
    if kind is Kind.ALU:
        op = isa.ALU_OPS[info.op]
        if op == "mov" and info.bits == 64 and info.reg_src and insn.off == 0:
            if insn.src in regs:
                regs.add(insn.dst)
            else:
                regs.discard(insn.dst)
        else:
            regs.discard(insn.dst)
    elif kind in (Kind.END, Kind.LDDW):
        regs.discard(insn.dst)
    elif kind is Kind.LDX:
        if insn.opcode == LDXDW and insn.src == FP and insn.off in stack:
            regs.add(insn.dst)
        else:
            regs.discard(insn.dst)
    elif kind in (Kind.ST, Kind.STX):
        if insn.dst == FP:
            size = info.size
            hit = {o for o in stack if o < insn.off + size and insn.off < o + 8}
            stack -= hit
            if insn.opcode == STXDW and insn.src in regs:
                stack.add(insn.off)
    elif kind is Kind.ATOMIC:
        if insn.dst == FP:
            stack = {o for o in stack if not (o < insn.off + info.size and insn.off < o + 8)}
        regs.discard(insn.src)
        regs.discard(0)
    elif kind in (Kind.CALL, Kind.CALLX):
        regs -= {0, 1, 2, 3, 4, 5}
    return _State(regs, stack)


def analyze(insns: tuple[Insn, ...]) -> dict[int, _State]:
    """``{slot: state before the instruction}`` for every reachable slot (r1 is the context at slot 0)."""
    slots = isa.slot_index(insns)
    at = {s: n for n, s in enumerate(slots)}
    states: dict[int, _State] = {}
    work = [(0, _State({1}))]
    while work:
        slot, incoming = work.pop()
        old = states.get(slot)
        new = incoming if old is None else old.meet(incoming)
        if old is not None and new == old:
            continue
        states[slot] = new
        n = at.get(slot)
        if n is None:
            continue
        insn = insns[n]
        kind = OPS[insn.opcode].kind
        nxt = slot + insn.slots
        if kind is Kind.EXIT or isa.is_core_poison(insn):
            continue
        if kind is Kind.CALL and insn.src == isa.CALL_LOCAL:
            callee = isa.jump_target(insn, slot)
            work.append((callee, _State(new.regs & {1, 2, 3, 4, 5})))  # a new frame: no stack slots
            work.append((nxt, _State(new.regs - {0, 1, 2, 3, 4, 5}, new.stack)))
            continue
        after = _step(new, insn)
        if kind is Kind.JA:
            work.append((isa.jump_target(insn, slot), after))
            continue
        if kind is Kind.JCOND:
            work.append((isa.jump_target(insn, slot), after))
        work.append((nxt, after))
    return states


def rewrite(insns: tuple[Insn, ...]) -> tuple[tuple[Insn, ...], int]:
    """``(insns with the context's pointer loads rewritten, how many were rewritten)``."""
    states = analyze(insns)
    out = list(insns)
    count = 0
    for n, slot in enumerate(isa.slot_index(insns)):
        insn = insns[n]
        if insn.opcode != LDXW or insn.off not in POINTER_FIELDS:
            continue
        st = states.get(slot)
        if st is not None and insn.src in st.regs:
            out[n] = replace(insn, opcode=LDXDW, off=POINTER_FIELDS[insn.off])
            count += 1
    return tuple(out), count
