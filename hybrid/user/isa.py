"""The eBPF instruction set (RFC 9669, cpu v1-v4) as data.

One table, :data:`OPS`, maps every valid opcode byte to an :class:`OpInfo`.
It is generated from the small tables below and read by everyone: the
decoder, the verifier (which fields must be zero, which values are allowed),
the disassembler, the assembler, the interpreter and the LLVM lowering.
Nothing else in hybrid spells out opcode numbers.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import Enum

from hybrid.errors import DecodeError

# --- encoding constants ----------------------------------------------------

# instruction classes (low 3 bits)
LD, LDX, ST, STX, ALU, JMP, JMP32, ALU64 = range(8)
CLASS_NAMES = ("ld", "ldx", "st", "stx", "alu", "jmp", "jmp32", "alu64")

# source bit of ALU/JMP opcodes
K, X = 0x00, 0x08

# size field of load/store opcodes -> bytes
SIZES = {0x00: 4, 0x08: 2, 0x10: 1, 0x18: 8}
SIZE_SUFFIX = {1: "b", 2: "h", 4: "w", 8: "dw"}

# mode field of load/store opcodes
MODE_IMM, MODE_ABS, MODE_IND, MODE_MEM, MODE_MEMSX, MODE_ATOMIC = 0x00, 0x20, 0x40, 0x60, 0x80, 0xC0

# src field of lddw (RFC 9669 section 5.4): what the 64-bit immediate means
PSEUDO_NONE = 0  # imm64 is the value
PSEUDO_MAP_FD = 1  # imm is a map fd -> address of the map
PSEUDO_MAP_VALUE = 2  # imm is a map fd, next imm an offset -> address in the value
PSEUDO_BTF_ID = 3  # variable address
PSEUDO_FUNC = 4  # code address
PSEUDO_MAP_IDX = 5
PSEUDO_MAP_IDX_VALUE = 6

# src field of call
CALL_HELPER, CALL_LOCAL, CALL_KFUNC = 0, 1, 2

# ``call 0xbad2310``: what libbpf writes over an instruction whose CO-RE
# relocation failed.  Loading is fine (clang guards such code with
# bpf_core_field_exists and the like); reaching it at run time is not.
CORE_POISON_HELPER = 0xBAD2310

# atomic operations (imm field of 0xc3/0xdb)
FETCH = 0x01
ATOMIC_OPS = {
    0x00: "add",
    0x40: "or",
    0x50: "and",
    0xA0: "xor",
    0xE0: "xchg",  # always with FETCH
    0xF0: "cmpxchg",  # always with FETCH
}
ATOMIC_IMMS = frozenset({0x00, 0x01, 0x40, 0x41, 0x50, 0x51, 0xA0, 0xA1, 0xE1, 0xF1})

STACK_SIZE = 512  # bytes per frame
MAX_CALL_DEPTH = 8  # frames, as the kernel
INSN_SIZE = 8


class Kind(Enum):
    ALU = "alu"  # binary/unary arithmetic: add, sub, ..., neg, mov
    END = "end"  # le/be/bswap
    LDDW = "lddw"
    LDX = "ldx"
    ST = "st"
    STX = "stx"
    ATOMIC = "atomic"
    LEGACY = "legacy"  # ld abs/ind (packet access group)
    JA = "ja"
    JCOND = "jcond"
    CALL = "call"
    CALLX = "callx"
    EXIT = "exit"


@dataclass(frozen=True)
class OpInfo:
    """What one opcode byte means and which field values are legal with it."""

    opcode: int
    mnemonic: str  # base mnemonic, e.g. "add", "ldxw", "jeq32", "lock"
    kind: Kind
    cls: int
    op: int = 0  # the operation bits (opcode & 0xf0) for ALU/JMP classes
    bits: int = 64  # operand width for ALU/JMP: 32 or 64
    size: int = 0  # access size in bytes for loads/stores/atomics
    reg_src: bool = False  # ALU/JMP with X: the second operand is src
    cpu: int = 1  # lowest cpu version that has this opcode
    group: str = "base"
    # field constraints: None = field is used (any value), otherwise the set
    # of allowed values (usually {0}: an unused field must be zero)
    dst_ok: frozenset[int] | None = None
    src_ok: frozenset[int] | None = None
    off_ok: frozenset[int] | None = None
    imm_ok: frozenset[int] | None = None
    writes_dst: bool = True
    reads_dst: bool = True


ZERO = frozenset({0})

ALU_OPS = {
    0x00: "add",
    0x10: "sub",
    0x20: "mul",
    0x30: "div",
    0x40: "or",
    0x50: "and",
    0x60: "lsh",
    0x70: "rsh",
    0x80: "neg",
    0x90: "mod",
    0xA0: "xor",
    0xB0: "mov",
    0xC0: "arsh",
}
ALU_END = 0xD0

JMP_OPS = {
    0x10: "jeq",
    0x20: "jgt",
    0x30: "jge",
    0x40: "jset",
    0x50: "jne",
    0x60: "jsgt",
    0x70: "jsge",
    0xA0: "jlt",
    0xB0: "jle",
    0xC0: "jslt",
    0xD0: "jsle",
}
JA_OP, CALL_OP, EXIT_OP = 0x00, 0x80, 0x90

# cpu v2 added the "less than" jumps
_V2_JUMPS = frozenset({0xA0, 0xB0, 0xC0, 0xD0})


def _alu_table() -> list[OpInfo]:
    out = []
    for cls, bits in ((ALU, 32), (ALU64, 64)):
        sfx = "" if bits == 64 else "32"
        group = "base%d" % bits
        for op, name in ALU_OPS.items():
            for src in (K, X):
                if op == 0x80 and src == X:
                    continue  # neg has no register form
                group_ = "divmul%d" % bits if op in (0x20, 0x30, 0x90) else group
                off_ok = ZERO
                if op in (0x30, 0x90):
                    off_ok = frozenset({0, 1})  # 1: sdiv/smod (cpu v4)
                if op == 0xB0 and src == X:
                    off_ok = frozenset({0, 8, 16, 32} if bits == 64 else {0, 8, 16})  # movsx
                out.append(
                    OpInfo(
                        opcode=cls | op | src,
                        mnemonic=name + sfx,
                        kind=Kind.ALU,
                        cls=cls,
                        op=op,
                        bits=bits,
                        reg_src=src == X,
                        group=group_,
                        src_ok=None if src == X else ZERO,
                        imm_ok=ZERO if (src == X or op == 0x80) else None,
                        off_ok=off_ok,
                        reads_dst=op != 0xB0,
                    )
                )
        # endianness: le/be in ALU, unconditional bswap in ALU64 (cpu v4)
    widths = frozenset({16, 32, 64})
    out.append(OpInfo(ALU | ALU_END | K, "le", Kind.END, ALU, ALU_END, 64, group="base32",
                      src_ok=ZERO, off_ok=ZERO, imm_ok=widths))
    out.append(OpInfo(ALU | ALU_END | X, "be", Kind.END, ALU, ALU_END, 64, group="base32",
                      src_ok=ZERO, off_ok=ZERO, imm_ok=widths))
    out.append(OpInfo(ALU64 | ALU_END | K, "bswap", Kind.END, ALU64, ALU_END, 64, cpu=4,
                      group="base64", src_ok=ZERO, off_ok=ZERO, imm_ok=widths))
    return out


def _jmp_table() -> list[OpInfo]:
    out = []
    for cls, bits in ((JMP, 64), (JMP32, 32)):
        sfx = "" if bits == 64 else "32"
        for op, name in JMP_OPS.items():
            for src in (K, X):
                cpu = 3 if cls == JMP32 else (2 if op in _V2_JUMPS else 1)
                out.append(
                    OpInfo(
                        opcode=cls | op | src,
                        mnemonic=name + sfx,
                        kind=Kind.JCOND,
                        cls=cls,
                        op=op,
                        bits=bits,
                        reg_src=src == X,
                        cpu=cpu,
                        group="base%d" % bits,
                        src_ok=None if src == X else ZERO,
                        imm_ok=ZERO if src == X else None,
                        writes_dst=False,
                    )
                )
    out += [
        OpInfo(JMP | JA_OP, "ja", Kind.JA, JMP, JA_OP, group="base32",
               dst_ok=ZERO, src_ok=ZERO, imm_ok=ZERO, writes_dst=False, reads_dst=False),
        OpInfo(JMP32 | JA_OP, "ja32", Kind.JA, JMP32, JA_OP, cpu=4, group="base32",
               dst_ok=ZERO, src_ok=ZERO, off_ok=ZERO, writes_dst=False, reads_dst=False),
        OpInfo(JMP | CALL_OP, "call", Kind.CALL, JMP, CALL_OP, group="base32",
               dst_ok=ZERO, src_ok=frozenset({CALL_HELPER, CALL_LOCAL, CALL_KFUNC}), off_ok=ZERO,
               writes_dst=False, reads_dst=False),
        OpInfo(JMP | CALL_OP | X, "callx", Kind.CALLX, JMP, CALL_OP, group="callx",
               src_ok=ZERO, off_ok=ZERO, imm_ok=ZERO, writes_dst=False),
        OpInfo(JMP | EXIT_OP, "exit", Kind.EXIT, JMP, EXIT_OP, group="base32",
               dst_ok=ZERO, src_ok=ZERO, off_ok=ZERO, imm_ok=ZERO, writes_dst=False, reads_dst=False),
    ]
    return out


def _mem_table() -> list[OpInfo]:
    out = [
        OpInfo(LD | 0x18 | MODE_IMM, "lddw", Kind.LDDW, LD, size=8, group="base64",
               src_ok=frozenset(range(7)), off_ok=ZERO, reads_dst=False),
    ]
    for szbits, size in SIZES.items():
        sfx = SIZE_SUFFIX[size]
        out.append(OpInfo(LDX | MODE_MEM | szbits, "ldx" + sfx, Kind.LDX, LDX, size=size,
                          group="base32" if size < 8 else "base64", imm_ok=ZERO, reads_dst=False))
        if size < 8:
            out.append(OpInfo(LDX | MODE_MEMSX | szbits, "ldxs" + sfx, Kind.LDX, LDX, size=size,
                              cpu=4, group="base32", imm_ok=ZERO, reads_dst=False))
        out.append(OpInfo(ST | MODE_MEM | szbits, "st" + sfx, Kind.ST, ST, size=size,
                          group="base32" if size < 8 else "base64", src_ok=ZERO, writes_dst=False))
        out.append(OpInfo(STX | MODE_MEM | szbits, "stx" + sfx, Kind.STX, STX, size=size,
                          group="base32" if size < 8 else "base64", imm_ok=ZERO, writes_dst=False))
        if size in (4, 8):
            out.append(OpInfo(STX | MODE_ATOMIC | szbits, "lock" if size == 8 else "lock32",
                              Kind.ATOMIC, STX, size=size, cpu=3,
                              group="atomic32" if size == 4 else "atomic64",
                              imm_ok=ATOMIC_IMMS, writes_dst=False))
        if size < 8:  # legacy packet access (group "packet"), kept for decoding
            for mode in (MODE_ABS, MODE_IND):
                out.append(OpInfo(LD | mode | szbits, ("ldabs" if mode == MODE_ABS else "ldind") + sfx,
                                  Kind.LEGACY, LD, size=size, group="packet", writes_dst=False,
                                  reads_dst=False, off_ok=ZERO))
    return out


def _build_ops() -> dict[int, OpInfo]:
    ops: dict[int, OpInfo] = {}
    for info in _alu_table() + _jmp_table() + _mem_table():
        assert info.opcode not in ops, hex(info.opcode)
        ops[info.opcode] = info
    return ops


OPS: dict[int, OpInfo] = _build_ops()


# --- instructions ------------------------------------------------------------

_SLOT = struct.Struct("<BBhi")


@dataclass(frozen=True)
class Insn:
    """One decoded instruction; an ``lddw`` is one Insn holding both slots."""

    opcode: int
    dst: int = 0
    src: int = 0
    off: int = 0
    imm: int = 0  # signed 32-bit
    imm_hi: int = 0  # lddw only: the second slot's imm (signed 32-bit)
    next_raw: tuple[int, int, int, int] = (0, 0, 0, 0)  # lddw second slot: opcode, regs, off, unused

    @property
    def info(self) -> OpInfo | None:
        return OPS.get(self.opcode)

    @property
    def slots(self) -> int:
        return 2 if self.opcode == 0x18 else 1

    @property
    def imm64(self) -> int:
        """The unsigned 64-bit constant of an lddw."""
        return ((self.imm_hi & 0xFFFFFFFF) << 32) | (self.imm & 0xFFFFFFFF)

    def encode(self) -> bytes:
        first = _SLOT.pack(self.opcode, (self.src << 4) | self.dst, self.off, self.imm)
        if self.opcode != 0x18:
            return first
        op2, regs2, off2, _ = self.next_raw
        return first + _SLOT.pack(op2, regs2, off2, self.imm_hi)


def _s32(v: int) -> int:
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v & 0x80000000 else v


def lddw(dst: int, value: int, src: int = PSEUDO_NONE) -> Insn:
    value &= (1 << 64) - 1
    return Insn(0x18, dst, src, 0, _s32(value), _s32(value >> 32))


def decode(code: bytes | bytearray | memoryview) -> list[Insn]:
    """Split bytecode into instructions; every ``lddw`` becomes one Insn.

    Raises :class:`DecodeError` for a length that is not a multiple of 8 or
    an ``lddw`` whose second slot is missing.  Opcode validity is the
    verifier's business, not the decoder's.
    """
    code = bytes(code)
    if len(code) % INSN_SIZE:
        raise DecodeError(
            "bytecode length %d is not a multiple of %d (truncated after insn #%d)"
            % (len(code), INSN_SIZE, len(code) // INSN_SIZE)
        )
    out: list[Insn] = []
    pc = 0
    n = len(code) // INSN_SIZE
    while pc < n:
        op, regs, off, imm = _SLOT.unpack_from(code, pc * INSN_SIZE)
        if op == 0x18:
            if pc + 1 >= n:
                raise DecodeError("insn #%d (lddw): second slot missing at end of program" % pc)
            op2, regs2, off2, imm2 = _SLOT.unpack_from(code, (pc + 1) * INSN_SIZE)
            out.append(Insn(op, regs & 0xF, regs >> 4, off, imm, imm2, (op2, regs2, off2, 0)))
            pc += 2
        else:
            out.append(Insn(op, regs & 0xF, regs >> 4, off, imm))
            pc += 1
    return out


def encode(insns: list[Insn] | tuple[Insn, ...]) -> bytes:
    return b"".join(i.encode() for i in insns)


def slot_index(insns: list[Insn] | tuple[Insn, ...]) -> list[int]:
    """The slot number of each instruction (lddw takes two slots)."""
    out, pc = [], 0
    for insn in insns:
        out.append(pc)
        pc += insn.slots
    return out


def jump_target(insn: Insn, slot: int) -> int:
    """The slot a jump or local call at ``slot`` goes to."""
    info = OPS[insn.opcode]
    if info.kind is Kind.JA and info.cls == JMP32:
        return slot + 1 + insn.imm
    if info.kind in (Kind.CALL, Kind.LDDW):  # local call, or lddw of a code address (PSEUDO_FUNC)
        return slot + 1 + insn.imm
    return slot + 1 + insn.off


def is_core_poison(insn: Insn) -> bool:
    """The call libbpf leaves where a CO-RE relocation failed."""
    info = OPS.get(insn.opcode)
    return info is not None and info.kind is Kind.CALL and insn.src == CALL_HELPER and insn.imm == CORE_POISON_HELPER


def is_code_ref(insn: Insn) -> bool:
    """A local call or an lddw of a code address: both name a subprogram by slot offset."""
    info = OPS.get(insn.opcode)
    if info is None:
        return False
    return (info.kind is Kind.CALL and insn.src == CALL_LOCAL) or (info.kind is Kind.LDDW and insn.src == PSEUDO_FUNC)


# --- disassembler ------------------------------------------------------------


def _reg(n: int) -> str:
    return "%%r%d" % n


def _mem(reg: int, off: int) -> str:
    if off == 0:
        return "[%s]" % _reg(reg)
    return "[%s%+d]" % (_reg(reg), off)


def _target(off: int) -> str:
    return "%+d" % off


def disasm_insn(insn: Insn) -> str:
    """One instruction in the assembler syntax of the conformance suite."""
    info = OPS.get(insn.opcode)
    if info is None:
        return "invalid opcode 0x%02x" % insn.opcode
    k = info.kind
    if k is Kind.ALU:
        name = info.mnemonic
        if info.op in (0x30, 0x90) and insn.off == 1:
            name = "s" + name
        if info.op == 0xB0 and info.reg_src and insn.off:
            name = "movsx%d%d" % (insn.off, info.bits)
        if info.op == 0x80:
            return "%s %s" % (name, _reg(insn.dst))
        rhs = _reg(insn.src) if info.reg_src else "%d" % insn.imm
        return "%s %s, %s" % (name, _reg(insn.dst), rhs)
    if k is Kind.END:
        return "%s%d %s" % (info.mnemonic, insn.imm, _reg(insn.dst))
    if k is Kind.LDDW:
        if insn.src == PSEUDO_NONE:
            return "lddw %s, 0x%x" % (_reg(insn.dst), insn.imm64)
        pseudo = {1: "map_fd", 2: "map_value", 3: "btf_id", 4: "func", 5: "map_idx", 6: "map_idx_value"}
        kind = pseudo.get(insn.src, "src%d" % insn.src)
        return "lddw %s, %s(%d, %d)" % (_reg(insn.dst), kind, insn.imm, insn.imm_hi)
    if k is Kind.LDX:
        return "%s %s, %s" % (info.mnemonic, _reg(insn.dst), _mem(insn.src, insn.off))
    if k is Kind.ST:
        return "%s %s, %d" % (info.mnemonic, _mem(insn.dst, insn.off), insn.imm)
    if k is Kind.STX:
        return "%s %s, %s" % (info.mnemonic, _mem(insn.dst, insn.off), _reg(insn.src))
    if k is Kind.ATOMIC:
        sfx = "32" if info.size == 4 else ""
        op = ATOMIC_OPS.get(insn.imm & ~FETCH, "?%#x" % insn.imm)
        fetch = "fetch " if insn.imm & FETCH and op not in ("xchg", "cmpxchg") else ""
        return "lock %s%s%s %s, %s" % (fetch, op, sfx, _mem(insn.dst, insn.off), _reg(insn.src))
    if k is Kind.LEGACY:
        return "%s %s" % (info.mnemonic, ("%d" % insn.imm) if "abs" in info.mnemonic else _mem(insn.src, insn.imm))
    if k is Kind.JA:
        return "ja32 %s" % _target(insn.imm) if info.cls == JMP32 else "ja %s" % _target(insn.off)
    if k is Kind.JCOND:
        rhs = _reg(insn.src) if info.reg_src else "%d" % insn.imm
        return "%s %s, %s, %s" % (info.mnemonic, _reg(insn.dst), rhs, _target(insn.off))
    if k is Kind.CALL:
        if insn.src == CALL_LOCAL:
            return "call local %s" % _target(insn.imm)
        if insn.src == CALL_KFUNC:
            return "call runtime %d" % insn.imm
        return "call %d" % insn.imm
    if k is Kind.CALLX:
        return "call %s" % _reg(insn.dst)
    return "exit"


def disasm(insns: list[Insn] | tuple[Insn, ...]) -> str:
    """A listing with slot numbers, one instruction per line."""
    lines = []
    for slot, insn in zip(slot_index(insns), insns):
        lines.append("%4d: %s" % (slot, disasm_insn(insn)))
    return "\n".join(lines)
