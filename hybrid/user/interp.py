"""The reference interpreter: plain Python, the oracle the other engines are tested against.

Semantics follow RFC 9669 as summarised in ``isa.py``; everything is done
on Python integers masked to 32 or 64 bits.  Memory is the real memory of
the process, but every load and store is checked against the regions the
program may touch (its stack, the context, and regions registered with
:meth:`Memory.add`), so a bad pointer is a :class:`VmError` naming the
instruction, never a crash.
"""

from __future__ import annotations

import ctypes
import errno
from typing import Callable

from hybrid.errors import VmError
from hybrid.user import isa
from hybrid.user import engine as _engine
from hybrid.user.engine import EngineBase
from hybrid.user.helpers import TAIL_CALL
from hybrid.user.isa import OPS, Insn, Kind
from hybrid.user.program import Program

M64 = (1 << 64) - 1
M32 = (1 << 32) - 1


def _mask(bits: int) -> int:
    return (1 << bits) - 1


def sx(value: int, bits: int) -> int:
    """``value``'s low ``bits`` bits as a signed integer."""
    value &= _mask(bits)
    return value - (1 << bits) if value >> (bits - 1) else value


def _tdiv(a: int, b: int) -> int:
    """Division truncated toward zero, as C does."""
    q = abs(a) // abs(b)
    return -q if (a < 0) != (b < 0) else q


def _div(a: int, b: int, n: int, signed: bool) -> int:
    if b == 0:
        return 0
    return _tdiv(sx(a, n), sx(b, n)) if signed else a // b


def _mod(a: int, b: int, n: int, signed: bool) -> int:
    if b == 0:
        return a
    if signed:
        sa, sb = sx(a, n), sx(b, n)
        return sa - sb * _tdiv(sa, sb)
    return a % b


# ALU operations: (dst, src, bits, offset field) -> result (masked by the caller)
ALU: dict[int, Callable[[int, int, int, int], int]] = {
    0x00: lambda a, b, n, o: a + b,
    0x10: lambda a, b, n, o: a - b,
    0x20: lambda a, b, n, o: a * b,
    0x30: lambda a, b, n, o: _div(a, b, n, o == 1),
    0x40: lambda a, b, n, o: a | b,
    0x50: lambda a, b, n, o: a & b,
    0x60: lambda a, b, n, o: a << (b & (n - 1)),
    0x70: lambda a, b, n, o: a >> (b & (n - 1)),
    0x80: lambda a, b, n, o: -a,
    0x90: lambda a, b, n, o: _mod(a, b, n, o == 1),
    0xA0: lambda a, b, n, o: a ^ b,
    0xB0: lambda a, b, n, o: sx(b, o) if o else b,
    0xC0: lambda a, b, n, o: sx(a, n) >> (b & (n - 1)),
}

# conditional jumps: (dst, src, bits) -> taken
JUMPS: dict[int, Callable[[int, int, int], bool]] = {
    0x10: lambda a, b, n: a == b,
    0x20: lambda a, b, n: a > b,
    0x30: lambda a, b, n: a >= b,
    0x40: lambda a, b, n: bool(a & b),
    0x50: lambda a, b, n: a != b,
    0x60: lambda a, b, n: sx(a, n) > sx(b, n),
    0x70: lambda a, b, n: sx(a, n) >= sx(b, n),
    0xA0: lambda a, b, n: a < b,
    0xB0: lambda a, b, n: a <= b,
    0xC0: lambda a, b, n: sx(a, n) < sx(b, n),
    0xD0: lambda a, b, n: sx(a, n) <= sx(b, n),
}

# atomic read-modify-write: (old, src) -> new
ATOMICS: dict[int, Callable[[int, int], int]] = {
    0x00: lambda old, v: old + v,
    0x40: lambda old, v: old | v,
    0x50: lambda old, v: old & v,
    0xA0: lambda old, v: old ^ v,
    0xE0: lambda old, v: v,
}


def bswap(value: int, bits: int) -> int:
    return int.from_bytes((value & _mask(bits)).to_bytes(bits // 8, "little"), "big")


# Code addresses (``lddw`` of a function) in the interpreter: a tag and the slot.
# No real pointer has these top bits on x86-64, so a callback is never confused with memory.
CODE_TAG = 0xC0DE << 48
CODE_MASK = (1 << 48) - 1


class Memory:
    """The regions a program may touch, checked on every access."""

    def __init__(self) -> None:
        self._regions: list[tuple[int, int, bool, str]] = []

    def add(self, start: int, size: int, name: str, writable: bool = True) -> None:
        if size:
            self._regions.append((start, start + size, writable, name))

    def remove(self, start: int) -> None:
        self._regions = [r for r in self._regions if r[0] != start]

    def check(self, addr: int, size: int, write: bool) -> None:
        for start, end, writable, name in self._regions:
            if start <= addr and addr + size <= end:
                if write and not writable:
                    raise VmError("write of %d bytes at %#x into read-only %s" % (size, addr, name))
                return
        raise VmError("%s of %d bytes at %#x is outside every region the program may access"
                      % ("write" if write else "read", size, addr))

    def read(self, addr: int, size: int) -> bytes:
        self.check(addr, size, False)
        return ctypes.string_at(addr, size)

    def write(self, addr: int, data: bytes) -> None:
        self.check(addr, len(data), True)
        ctypes.memmove(addr, data, len(data))


# Programs that tail calls can reach in the interpreter, by the id a PROG_ARRAY holds
# (the native engines use hybrid.user.maps.register_program for the same ids).
TAIL_PROGRAMS: dict[int, Program] = {}
MAX_TAIL_CALLS = 33


class _TailCallDone(Exception):
    """A tail call ran the target to its end: the whole program returns ``value``."""

    def __init__(self, value: int):
        self.value = value


class Interpreter(EngineBase):
    """Runs a program instruction by instruction in Python."""

    name = "interp"

    def __init__(self, program: Program, *, max_steps: int | None = None):
        self.program = program
        self.max_steps = max_steps  # None: run until exit (the verifier does not prove termination)
        self.memory = Memory()
        self._slots = isa.slot_index(program.insns)
        self._index = {s: i for i, s in enumerate(self._slots)}
        self._stack = ctypes.create_string_buffer(isa.STACK_SIZE * isa.MAX_CALL_DEPTH)
        self.memory.add(ctypes.addressof(self._stack), len(self._stack), "stack")
        self.memory.call_function = self.call_function  # helpers such as bpf_loop call back through it
        for region in program.regions:
            self.memory.add(region.start, region.size, region.name, region.writable)
        self._depth = 0
        self._budget = max_steps
        self.tail_calls = 0  # how many tail calls led here

    def run_ptr(self, addr: int, size: int) -> int:
        self.memory.add(addr, size, "context")
        try:
            self._depth = 0
            self._budget = self.max_steps
            self._ctx = (addr, size)
            try:
                return self._execute(0, (addr & M64, size, 0, 0, 0))
            except _TailCallDone as done:
                return done.value
        finally:
            self.memory.remove(addr) if size else None
            if _engine._bridge_flush is not None:  # writes through lookups of syscall-mode bridged maps
                _engine._bridge_flush()

    def call_function(self, address: int, *args: int) -> int:
        """Call the subprogram whose code address (from ``lddw`` of a function) is ``address``.

        This is how helpers such as ``bpf_loop`` call back into the program.
        """
        if address & ~CODE_MASK != CODE_TAG or (address & CODE_MASK) not in self._index:
            raise VmError("%#x is not the address of a function of this program" % address)
        return self._execute(address & CODE_MASK, (tuple(args) + (0,) * 5)[:5])

    def _execute(self, pc: int, args: tuple[int, ...]) -> int:
        """Runs from slot ``pc`` with r1-r5 = ``args`` in a new frame until its exit."""
        insns, index, mem = self.program.insns, self._index, self.memory
        if self._depth >= isa.MAX_CALL_DEPTH:
            raise VmError("call depth exceeds %d frames" % isa.MAX_CALL_DEPTH)
        regs = [0] * 11
        regs[1:6] = args
        regs[10] = ctypes.addressof(self._stack) + len(self._stack) - self._depth * isa.STACK_SIZE
        self._depth += 1
        frames: list[tuple[int, list[int]]] = []  # (return slot, saved r6-r10)
        try:
            return self._loop(pc, regs, frames, insns, index, mem)
        finally:
            self._depth -= 1 + len(frames)

    def _loop(self, pc, regs, frames, insns, index, mem) -> int:
        while True:
            if self._budget is not None:
                if self._budget == 0:
                    raise VmError("insn #%d: step limit of %d instructions reached" % (pc, self.max_steps), pc)
                self._budget -= 1
            insn = insns[index[pc]]
            try:
                nxt = self._step(insn, pc, regs, mem, frames)
            except VmError as e:
                raise VmError("insn #%d (%s): %s" % (pc, isa.disasm_insn(insn), e), pc) from None
            if nxt is None:
                if not frames:
                    return regs[0] & M64
                pc, saved = frames.pop()
                self._depth -= 1
                regs[6:11] = saved
                continue
            pc = nxt

    def _step(self, insn: Insn, pc: int, regs: list[int], mem: Memory, frames) -> int | None:
        """Executes one instruction; returns the next slot, or None for exit."""
        info = OPS[insn.opcode]
        k = info.kind
        nxt = pc + insn.slots
        if k is Kind.ALU:
            n = info.bits
            src = regs[insn.src] if info.reg_src else insn.imm
            a, b = regs[insn.dst] & _mask(n), src & _mask(n)
            if info.op == 0xB0 and not info.reg_src and n == 64:
                b = insn.imm & M64
            regs[insn.dst] = ALU[info.op](a, b, n, insn.off) & _mask(n)
        elif k is Kind.END:
            v = regs[insn.dst]
            swap = info.mnemonic != "le"
            regs[insn.dst] = bswap(v, insn.imm) if swap else v & _mask(insn.imm)
        elif k is Kind.LDDW:
            if insn.src == isa.PSEUDO_FUNC:
                regs[insn.dst] = CODE_TAG | isa.jump_target(insn, pc)
            else:
                regs[insn.dst] = self.program.lddw_value(insn)
        elif k is Kind.LDX:
            data = mem.read((regs[insn.src] + insn.off) & M64, info.size)
            value = int.from_bytes(data, "little")
            regs[insn.dst] = sx(value, info.size * 8) & M64 if insn.opcode & 0xE0 == isa.MODE_MEMSX else value
        elif k in (Kind.ST, Kind.STX):
            value = insn.imm if k is Kind.ST else regs[insn.src]
            addr = (regs[insn.dst] + insn.off) & M64
            mem.write(addr, (value & _mask(info.size * 8)).to_bytes(info.size, "little"))
        elif k is Kind.ATOMIC:
            self._atomic(insn, info, regs, mem)
        elif k is Kind.JA:
            return isa.jump_target(insn, pc)
        elif k is Kind.JCOND:
            n = info.bits
            b = regs[insn.src] if info.reg_src else insn.imm & M64
            if JUMPS[info.op](regs[insn.dst] & _mask(n), b & _mask(n), n):
                return isa.jump_target(insn, pc)
        elif k is Kind.CALL and insn.src == isa.CALL_LOCAL:
            if self._depth >= isa.MAX_CALL_DEPTH:
                raise VmError("call depth exceeds %d frames" % isa.MAX_CALL_DEPTH)
            frames.append((nxt, regs[6:11]))
            self._depth += 1
            regs[10] = (regs[10] - isa.STACK_SIZE) & M64
            return isa.jump_target(insn, pc)
        elif k is Kind.CALL and insn.src == isa.CALL_HELPER and insn.imm == TAIL_CALL:
            target = self._tail_target(regs[2], regs[3])
            if target is None:
                regs[0] = -errno.ENOENT & M64
            else:
                raise _TailCallDone(target.run_ptr(*self._ctx))
        elif isa.is_core_poison(insn):
            raise VmError("reached an instruction whose CO-RE relocation failed (libbpf's poison call)")
        elif k in (Kind.CALL, Kind.CALLX):
            hid = insn.imm if k is Kind.CALL else regs[insn.dst]
            helper = self.program.helpers.get(hid)
            if helper is None:  # only callx gets here: as in native code, no call and r0 = -ENOENT
                regs[0] = -errno.ENOENT & M64
            else:
                regs[0] = helper.py(mem, *regs[1:6]) & M64
        elif k is Kind.EXIT:
            return None
        else:  # the verifier refuses everything else
            raise VmError("instruction not supported by the interpreter")
        return nxt

    def _tail_target(self, map_address: int, index: int) -> "Interpreter | None":
        from hybrid.user.maps import map_at

        if self.tail_calls >= MAX_TAIL_CALLS:
            return None
        prog_array = map_at(map_address)
        if prog_array is None:
            raise VmError("bpf_tail_call: %#x is not a map" % map_address)
        value = prog_array.lookup((index & M32).to_bytes(4, "little")) if index & M32 < prog_array.max_entries else None
        program = TAIL_PROGRAMS.get(int.from_bytes(value, "little")) if value else None
        if program is None:
            return None
        target = Interpreter(program, max_steps=self._budget)
        target.tail_calls = self.tail_calls + 1
        return target

    @staticmethod
    def _atomic(insn: Insn, info, regs: list[int], mem: Memory) -> None:
        size, bits = info.size, info.size * 8
        addr = (regs[insn.dst] + insn.off) & M64
        old = int.from_bytes(mem.read(addr, size), "little")
        src = regs[insn.src] & _mask(bits)
        op = insn.imm & ~isa.FETCH
        if op == 0xF0:  # cmpxchg: r0 always gets the old value
            if old == regs[0] & _mask(bits):
                mem.write(addr, src.to_bytes(size, "little"))
            regs[0] = old
            return
        mem.write(addr, (ATOMICS[op](old, src) & _mask(bits)).to_bytes(size, "little"))
        if insn.imm & isa.FETCH:
            regs[insn.src] = old
