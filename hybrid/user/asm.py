"""Assembler for the text syntax of the bpf_conformance suite.

``assemble(text) -> bytes``.  Mnemonics are looked up in tables derived
from :data:`hybrid.user.isa.OPS`, so the assembler, the disassembler and
the engines agree on every encoding.  The syntax (one instruction or
``label:`` per line, ``%rN`` registers, ``[%rN+off]`` memory operands,
``+N``/``-N``/label jump targets, the predefined label ``exit``) is the
suite's; see ``disasm_insn`` for the inverse.
"""

from __future__ import annotations

import re

from hybrid.errors import AssemblerError
from hybrid.user import isa
from hybrid.user.isa import OPS, Insn, Kind

_REG = re.compile(r"^%r(\d+)$")
_MEM = re.compile(r"^\[%r(\d+)\s*(?:([+-])\s*(\w+))?\]$")
_LABEL = re.compile(r"^([A-Za-z_.][\w.]*):$")

# mnemonic -> opcode without the source bit, from the one table
_ALU = {i.mnemonic: i.opcode & ~isa.X for i in OPS.values() if i.kind is Kind.ALU}
_JCOND = {i.mnemonic: i.opcode & ~isa.X for i in OPS.values() if i.kind is Kind.JCOND}
_LOADSTORE = {i.mnemonic: i for i in OPS.values() if i.kind in (Kind.LDX, Kind.ST, Kind.STX)}
_END = {i.mnemonic: i.opcode for i in OPS.values() if i.kind is Kind.END}
_ATOMIC_BY_NAME = {name: imm for imm, name in isa.ATOMIC_OPS.items()}


class _Line:
    def __init__(self, lineno: int, text: str):
        self.lineno = lineno
        self.text = text

    def error(self, what: str) -> AssemblerError:
        return AssemblerError("line %d (%s): %s" % (self.lineno, self.text, what))


def _split(text: str) -> tuple[str, list[str]]:
    head, _, rest = text.partition(" ")
    ops = [o.strip().rstrip(",").strip() for o in rest.split(",")] if rest.strip() else []
    return head, [o for o in ops if o != ""]


def _reg(line: _Line, tok: str) -> int:
    m = _REG.match(tok)
    if not m:
        raise line.error("invalid register %r" % tok)
    n = int(m.group(1))
    if n > 15:
        raise line.error("invalid register %r" % tok)
    return n


def _int(line: _Line, tok: str, bits: int = 32) -> int:
    """A 32-bit immediate: hex is raw bits, decimal must fit a signed int32."""
    try:
        neg = tok.startswith("-")
        body = tok[1:] if neg or tok.startswith("+") else tok
        if body.lower().startswith("0x"):
            v = int(body, 16)
            if v >= 1 << bits:
                raise line.error("immediate %s out of range" % tok)
            v = -v if neg else v
            if v >= 1 << (bits - 1):
                v -= 1 << bits
            return v
        v = int(body, 10)
        v = -v if neg else v
    except ValueError:
        raise line.error("invalid immediate %r" % tok) from None
    if not -(1 << (bits - 1)) <= v < (1 << (bits - 1)):
        raise line.error("immediate %s out of range" % tok)
    return v


def _imm64(line: _Line, tok: str) -> int:
    try:
        v = int(tok, 0)
    except ValueError:
        raise line.error("invalid 64-bit immediate %r" % tok) from None
    if not -(1 << 63) <= v < (1 << 64):
        raise line.error("64-bit immediate %s out of range" % tok)
    return v & ((1 << 64) - 1)


def _mem(line: _Line, tok: str) -> tuple[int, int]:
    m = _MEM.match(tok.replace(" ", ""))
    if not m:
        raise line.error("invalid memory operand %r" % tok)
    reg = _reg(line, "%r" + m.group(1))
    off = 0
    if m.group(3):
        off = _int(line, m.group(3), 32)
        if m.group(2) == "-":
            off = -off
        if not -(1 << 15) <= off < (1 << 15):
            raise line.error("offset %d out of range" % off)
    return reg, off


def _nops(line: _Line, name: str, ops: list[str], n: int) -> None:
    if len(ops) != n:
        raise line.error("invalid number of operands for %s: %d, expected %d" % (name, len(ops), n))


class _Assembler:
    def __init__(self, text: str):
        self.lines: list[tuple[_Line, str, list[str]]] = []
        self.labels: dict[str, int] = {}
        slot = 0
        for lineno, raw in enumerate(text.splitlines(), 1):
            t = raw.split("#", 1)[0].strip()
            if not t:
                continue
            line = _Line(lineno, t)
            m = _LABEL.match(t)
            if m:
                self.labels[m.group(1)] = slot
                continue
            name, ops = _split(t)
            if name == "exit" and "exit" not in self.labels:
                self.labels["exit"] = slot
            self.lines.append((line, name, ops))
            slot += 2 if name == "lddw" else 1

    def target(self, line: _Line, tok: str, slot: int) -> int:
        if re.fullmatch(r"[+-]\d+", tok):
            return int(tok)
        if tok not in self.labels:
            raise line.error("unknown label %r" % tok)
        return self.labels[tok] - (slot + 1)

    def run(self) -> list[Insn]:
        out, slot = [], 0
        for line, name, ops in self.lines:
            insn = self.one(line, name, ops, slot)
            out.append(insn)
            slot += insn.slots
        return out

    def one(self, line: _Line, name: str, ops: list[str], slot: int) -> Insn:
        if name == "exit":
            _nops(line, name, ops, 0)
            return Insn(OPS_BY_NAME["exit"])
        if name in ("neg", "neg32"):
            _nops(line, name, ops, 1)
            return Insn(_ALU[name], _reg(line, ops[0]))
        if name in _END or re.fullmatch(r"(le|be|bswap|swap)(16|32|64)", name):
            m = re.fullmatch(r"(le|be|bswap|swap)(16|32|64)", name)
            if not m:
                raise line.error("unknown mnemonic %r" % name)
            _nops(line, name, ops, 1)
            base = "bswap" if m.group(1) == "swap" else m.group(1)
            return Insn(_END[base], _reg(line, ops[0]), imm=int(m.group(2)))
        alu = self.alu(line, name, ops)
        if alu is not None:
            return alu
        if name == "lddw":
            _nops(line, name, ops, 2)
            return isa.lddw(_reg(line, ops[0]), _imm64(line, ops[1]))
        if name in _LOADSTORE:
            info = _LOADSTORE[name]
            _nops(line, name, ops, 2)
            if info.kind is Kind.LDX:
                src, off = _mem(line, ops[1])
                return Insn(info.opcode, _reg(line, ops[0]), src, off)
            dst, off = _mem(line, ops[0])
            if info.kind is Kind.ST:
                return Insn(info.opcode, dst, 0, off, _int(line, ops[1]))
            return Insn(info.opcode, dst, _reg(line, ops[1]), off)
        if name == "lock":
            return self.lock(line, ops)
        if name == "ja":
            _nops(line, name, ops, 1)
            return Insn(OPS_BY_NAME["ja"], off=self.offset16(line, ops[0], slot))
        if name == "ja32":
            _nops(line, name, ops, 1)
            return Insn(OPS_BY_NAME["ja32"], imm=self.target(line, ops[0], slot))
        if name in _JCOND:
            _nops(line, name, ops, 3)
            off = self.offset16(line, ops[2], slot)
            if ops[1].startswith("%"):
                return Insn(_JCOND[name] | isa.X, _reg(line, ops[0]), _reg(line, ops[1]), off)
            return Insn(_JCOND[name], _reg(line, ops[0]), 0, off, _int(line, ops[1]))
        if name == "call":
            return self.call(line, ops, slot)
        raise line.error("unknown mnemonic %r" % name)

    def offset16(self, line: _Line, tok: str, slot: int) -> int:
        off = self.target(line, tok, slot)
        if not -(1 << 15) <= off < (1 << 15):
            raise line.error("jump offset %d does not fit 16 bits" % off)
        return off

    def alu(self, line: _Line, name: str, ops: list[str]) -> Insn | None:
        off = 0
        m = re.fullmatch(r"movsx(8|16|32)(32|64)", name)
        if m:
            off, name = int(m.group(1)), "mov" if m.group(2) == "64" else "mov32"
        elif re.fullmatch(r"s(div|mod)(32)?", name):
            off, name = 1, name[1:]
        if name not in _ALU:
            return None
        _nops(line, name, ops, 2)
        dst = _reg(line, ops[0])
        if ops[1].startswith("%"):
            return Insn(_ALU[name] | isa.X, dst, _reg(line, ops[1]), off)
        if m:
            raise line.error("movsx takes a register source")
        return Insn(_ALU[name], dst, 0, off, _int(line, ops[1]))

    def lock(self, line: _Line, ops: list[str]) -> Insn:
        # "lock [fetch] OP[32] [%rD+off], %rS": _split put "[fetch] OP[32] [mem]" in ops[0]
        if len(ops) != 2:
            raise line.error("invalid number of operands for lock")
        words = ops[0].split(None)
        fetch = words[0] == "fetch"
        if fetch:
            words = words[1:]
        if len(words) < 2:
            raise line.error("invalid number of operands for lock")
        op, mem = words[0], " ".join(words[1:])
        bits32 = op.endswith("32")
        op = op[:-2] if bits32 else op
        if op not in _ATOMIC_BY_NAME:
            raise line.error("unknown atomic operation %r" % op)
        imm = _ATOMIC_BY_NAME[op]
        if fetch or op in ("xchg", "cmpxchg"):
            imm |= isa.FETCH
        dst, off = _mem(line, mem)
        opcode = OPS_BY_NAME["lock32" if bits32 else "lock"]
        return Insn(opcode, dst, _reg(line, ops[1]), off, imm)

    def call(self, line: _Line, ops: list[str], slot: int) -> Insn:
        if len(ops) == 1 and ops[0].startswith("%"):
            return Insn(OPS_BY_NAME["callx"], _reg(line, ops[0]))
        if len(ops) == 1:
            words = ops[0].split()
            if len(words) == 2 and words[0] == "local":
                return Insn(OPS_BY_NAME["call"], src=isa.CALL_LOCAL, imm=self.target(line, words[1], slot))
            if len(words) == 2 and words[0] == "runtime":
                return Insn(OPS_BY_NAME["call"], src=isa.CALL_KFUNC, imm=_int(line, words[1]))
            if len(words) == 1:
                return Insn(OPS_BY_NAME["call"], imm=_int(line, words[0]))
        raise line.error("invalid operands for call")


OPS_BY_NAME = {i.mnemonic: i.opcode for i in OPS.values() if i.kind in (Kind.JA, Kind.CALL, Kind.CALLX, Kind.EXIT, Kind.ATOMIC)}


def assemble_insns(text: str) -> list[Insn]:
    """Assemble text into instructions; raises :class:`AssemblerError` naming the line."""
    return _Assembler(text).run()


def assemble(text: str) -> bytes:
    """Assemble text into bytecode."""
    return isa.encode(assemble_insns(text))
