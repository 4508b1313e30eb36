"""What the hybrid.load() end-to-end tests share: contexts, encodings, CPU pinning."""

from __future__ import annotations

import contextlib
import ctypes
import os
import struct

ENGINES = ("interp", "jit", "aot")

U64 = (1 << 64) - 1
NONE = 0xDEAD0000BEEF  # the programs' "no such element" (NONE in the .bpf.c files)

# struct pt_regs (x86-64) field indexes, 21 u64s
REG_INDEX = {name: i for i, name in enumerate(
    "r15 r14 r13 r12 bp bx r11 r10 r9 r8 ax cx dx si di orig_ax ip cs flags sp ss".split())}
ARG_REGS = ("di", "si", "dx", "cx", "r8", "r9")


def pt_regs(*args: int, **regs: int) -> bytes:
    """A 168-byte x86-64 struct pt_regs: the arguments in di, si, dx, cx, r8, r9, other registers by name."""
    values = [0] * 21
    for value, name in zip(args, ARG_REGS):
        values[REG_INDEX[name]] = value & U64
    for name, value in regs.items():
        values[REG_INDEX[name]] = value & U64
    return struct.pack("<21Q", *values)


def reg(ctx: bytes | bytearray, name: str) -> int:
    return struct.unpack_from("<Q", ctx, 8 * REG_INDEX[name])[0]


def u32(v: int) -> bytes:
    return (v & 0xFFFFFFFF).to_bytes(4, "little")


def u64(v: int) -> bytes:
    return (v & U64).to_bytes(8, "little")


def as_u64(b: bytes) -> int:
    return int.from_bytes(b[:8], "little")


def neg(errno_: int) -> int:
    """-errno as the unsigned r0 a program returns it in."""
    return -errno_ & U64


@contextlib.contextmanager
def on_cpu(cpu: int):
    """Run the calling thread on CPU ``cpu`` only (restores the affinity afterwards)."""
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield cpu
    finally:
        os.sched_setaffinity(0, old)


def allowed_cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def caller(obj, prog: str, engine: str):
    """``f(*args, **regs)``: run program ``prog`` of ``obj`` on ``engine`` with ``pt_regs(*args, **regs)``."""
    p = obj.programs[prog]
    return lambda *args, **regs: p.run(pt_regs(*args, **regs), engine=engine)


def var(obj, name: str) -> bytes:
    """The bytes of global variable ``name``, read through its map in ``obj.maps``."""
    v = obj.spec.variable(name)
    return obj.maps[v.section].lookup(u32(0))[v.offset:v.offset + v.size]


def set_var(obj, name: str, data: bytes) -> None:
    """Write global variable ``name`` through its map in ``obj.maps``."""
    v = obj.spec.variable(name)
    m = obj.maps[v.section]
    whole = bytearray(m.lookup(u32(0)))
    whole[v.offset:v.offset + v.size] = data
    m.update(u32(0), bytes(whole))


def frame_chain(return_addresses: list[int]):
    """x86-64 frames ``{next fp, return address}`` in memory, the last one's next fp 0.

    Returns (the buffer, to keep alive; the address of the first frame, for ``bp``).
    """
    buf = (ctypes.c_uint64 * (2 * len(return_addresses)))()
    base = ctypes.addressof(buf)
    for i, ret in enumerate(return_addresses):
        buf[2 * i] = base + 16 * (i + 1) if i + 1 < len(return_addresses) else 0
        buf[2 * i + 1] = ret
    return buf, base
