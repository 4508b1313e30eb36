"""USDT probes: ``.note.stapsdt`` notes and libbpf's argument specs (x86-64).

A note gives a probe's pc (a nop), the address of ``.stapsdt.base`` at link time
(prelink adjustment), its semaphore and the argument string (``-4@%edi 8@-16(%rbp)
4@$5``).  The argument string becomes libbpf's ``struct __bpf_usdt_spec``
(``bpf/usdt.bpf.h``) so programs using ``bpf_usdt_arg()`` read their arguments.
Parsing matches libbpf 1.1 (``usdt.c``: CONST, REG, REG_DEREF only).
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass

from hybrid.errors import AttachError

# enum __bpf_usdt_arg_type
USDT_ARG_CONST = 0
USDT_ARG_REG = 1
USDT_ARG_REG_DEREF = 2
USDT_MAX_ARG_CNT = 12  # BPF_USDT_MAX_ARG_CNT

# struct __bpf_usdt_arg_spec { u64 val_off; enum arg_type (u32); short reg_off; bool arg_signed; char arg_bitshift; }
ARG_SPEC = struct.Struct("<QIh?b")
# struct __bpf_usdt_spec { arg_spec args[12]; u64 usdt_cookie; short arg_cnt; } (+6 bytes tail padding)
SPEC_SIZE = 208
_SPEC_TAIL = struct.Struct("<Qh6x")
assert ARG_SPEC.size == 16 and ARG_SPEC.size * USDT_MAX_ARG_CNT + _SPEC_TAIL.size == SPEC_SIZE

# offsetof(struct pt_regs, reg) in the kernel's x86-64 layout
PT_REGS_OFF = {"r15": 0, "r14": 8, "r13": 16, "r12": 24, "bp": 32, "bx": 40, "r11": 48, "r10": 56, "r9": 64,
               "r8": 72, "ax": 80, "cx": 88, "dx": 96, "si": 104, "di": 112, "orig_ax": 120, "ip": 128, "cs": 136,
               "flags": 144, "sp": 152, "ss": 160}

# libbpf 1.1 calc_pt_regs_off(): every name of a register and its 32/16/8-bit parts
_REG_NAMES: dict[str, str] = {}
for _slot, _names in (("ip", ("rip", "eip")), ("ax", ("rax", "eax", "ax", "al")), ("bx", ("rbx", "ebx", "bx", "bl")),
                      ("cx", ("rcx", "ecx", "cx", "cl")), ("dx", ("rdx", "edx", "dx", "dl")),
                      ("si", ("rsi", "esi", "si", "sil")), ("di", ("rdi", "edi", "di", "dil")),
                      ("bp", ("rbp", "ebp", "bp", "bpl")), ("sp", ("rsp", "esp", "sp", "spl"))):
    for _n in _names:
        _REG_NAMES[_n] = _slot
for _i in range(8, 16):
    for _n in ("r%d" % _i, "r%dd" % _i, "r%dw" % _i, "r%db" % _i):
        _REG_NAMES[_n] = "r%d" % _i


def pt_regs_offset(reg: str) -> int:
    """offsetof(struct pt_regs, ...) of an x86-64 register name as written in an argument (no '%')."""
    slot = _REG_NAMES.get(reg)
    if slot is None:
        raise AttachError("usdt: unsupported register '%%%s'" % reg)
    return PT_REGS_OFF[slot]


# --- notes ------------------------------------------------------------------------


@dataclass(frozen=True)
class UsdtNote:
    """One ``stapsdt`` note: a probe site."""

    provider: str
    name: str
    pc: int  # VADDR of the probe's nop, prelink-adjusted (pc + actual .stapsdt.base - note base)
    base: int  # .stapsdt.base address recorded in the note (0: none)
    semaphore: int  # VADDR of the u16 semaphore, 0 when the probe has none
    args: str  # the argument string, e.g. "-4@%edi 8@-16(%rbp)"
    note_pc: int  # pc as written in the note
    semaphore_offset: int = 0  # file offset of the semaphore (the kernel's ref_ctr_offset), 0 if none


_NOTE = struct.Struct("<III")


def _exec_and_base(path: str):
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile

    try:
        with open(path, "rb") as f:
            elf = ELFFile(f)
            if elf["e_machine"] != "EM_X86_64":
                raise AttachError("%s: USDT notes are supported on x86-64 only (%s)" % (path, elf["e_machine"]))
            sec = elf.get_section_by_name(".note.stapsdt")
            data = sec.data() if sec is not None else b""
            b = elf.get_section_by_name(".stapsdt.base")
            base = b["sh_addr"] if b is not None else 0
            segs = [(p["p_vaddr"], p["p_offset"], p["p_filesz"], p["p_memsz"]) for p in elf.iter_segments()
                    if p["p_type"] == "PT_LOAD"]
            return data, base, segs
    except FileNotFoundError:
        raise AttachError("%s: no such file" % path) from None
    except (ELFError, ValueError, struct.error) as e:
        raise AttachError("%s: not an ELF file (%s)" % (path, e)) from None
    except OSError as e:
        raise AttachError("%s: cannot read: %s" % (path, e.strerror or e)) from None


def read_usdt_notes(path: str | os.PathLike) -> tuple[UsdtNote, ...]:
    """Every ``stapsdt`` note (type 3) of an ELF file, in file order."""
    path = os.fspath(path)
    data, base_addr, segs = _exec_and_base(path)
    out: list[UsdtNote] = []
    pos = 0
    while pos + 12 <= len(data):
        namesz, descsz, ntype = _NOTE.unpack_from(data, pos)
        pos += 12
        name = data[pos:pos + namesz].rstrip(b"\0")
        pos += (namesz + 3) & ~3
        desc = data[pos:pos + descsz]
        pos += (descsz + 3) & ~3
        if name != b"stapsdt" or ntype != 3:
            continue
        if len(desc) < 24:
            raise AttachError("%s: .note.stapsdt: truncated note (%d bytes)" % (path, len(desc)))
        pc, base, sema = struct.unpack_from("<QQQ", desc)
        strs = desc[24:].split(b"\0")
        if len(strs) < 3:
            raise AttachError("%s: .note.stapsdt: malformed note at pc %#x" % (path, pc))
        provider, pname, args = (s.decode("utf-8", "replace") for s in strs[:3])
        adj = pc + (base_addr - base) if base_addr and base else pc
        sema_off = 0
        if sema:
            for v, o, fs, ms in segs:
                if v <= sema < v + ms:
                    sema_off = sema - v + o
                    break
            else:
                raise AttachError("%s: USDT %s:%s semaphore %#x is in no PT_LOAD segment"
                                  % (path, provider, pname, sema))
        out.append(UsdtNote(provider, pname, adj, base, sema, args, pc, sema_off))
    return tuple(out)


read_notes = read_usdt_notes  # the name agent.py uses


def find_usdt(path: str | os.PathLike, provider: str, name: str) -> tuple[UsdtNote, ...]:
    """Every site of probe PROVIDER:NAME (one per inlined copy); an error naming the file if none."""
    notes = read_usdt_notes(path)
    hits = tuple(n for n in notes if n.provider == provider and n.name == name)
    if not hits:
        known = sorted({"%s:%s" % (n.provider, n.name) for n in notes})
        raise AttachError("%s: no USDT probe %s:%s (%s)" % (os.fspath(path), provider, name,
                                                             "has " + ", ".join(known[:20]) if known
                                                             else "the file has no .note.stapsdt notes"))
    return hits


# --- arguments --------------------------------------------------------------------


@dataclass(frozen=True)
class UsdtArg:
    """``struct __bpf_usdt_arg_spec``."""

    arg_type: int  # USDT_ARG_CONST / _REG / _REG_DEREF
    val_off: int  # constant, or offset added to the register for REG_DEREF
    reg_off: int  # offsetof(struct pt_regs, reg); 0 for CONST
    arg_signed: bool
    arg_bitshift: int  # 64 - 8 * size
    size: int  # 1, 2, 4 or 8
    text: str = ""

    def pack(self) -> bytes:
        return ARG_SPEC.pack(self.val_off & 0xFFFFFFFFFFFFFFFF, self.arg_type, self.reg_off, self.arg_signed,
                             self.arg_bitshift)


_INT = r"[+-]?[0-9]+"
_DEREF = re.compile(r"\s*(%s)\s*@\s*(%s)\s*\(\s*%%([^)\s]{1,15})\s*\)\s*" % (_INT, _INT))
_DEREF0 = re.compile(r"\s*(%s)\s*@\s*\(\s*%%([^)\s]{1,15})\s*\)\s*" % _INT)
_REG = re.compile(r"\s*(%s)\s*@\s*%%(\S{1,15})\s*" % _INT)
_CONST = re.compile(r"\s*(%s)\s*@\s*\$(%s)\s*" % (_INT, _INT))


def _parse_arg(text: str, pos: int, num: int) -> tuple[UsdtArg, int]:
    if m := _DEREF.match(text, pos):
        size, t, val, reg = int(m.group(1)), USDT_ARG_REG_DEREF, int(m.group(2)), m.group(3)
    elif m := _DEREF0.match(text, pos):
        size, t, val, reg = int(m.group(1)), USDT_ARG_REG_DEREF, 0, m.group(2)
    elif m := _REG.match(text, pos):
        size, t, val, reg = int(m.group(1)), USDT_ARG_REG, 0, m.group(2)
    elif m := _CONST.match(text, pos):
        size, t, val, reg = int(m.group(1)), USDT_ARG_CONST, int(m.group(2)), None
    else:
        rest = text[pos:].split(None, 1)[0] if text[pos:].strip() else text[pos:]
        raise AttachError("usdt: unrecognized arg #%d spec %r" % (num, rest))
    spec = m.group(0).strip()
    try:
        reg_off = pt_regs_offset(reg) if reg is not None else 0
    except AttachError:
        raise AttachError("usdt: arg #%d spec %r: unsupported register '%%%s'" % (num, spec, reg)) from None
    if abs(size) not in (1, 2, 4, 8):
        raise AttachError("usdt: unsupported arg #%d (spec %r) size: %d" % (num, spec, abs(size)))
    if not -(1 << 63) <= val < (1 << 64):
        raise AttachError("usdt: arg #%d spec %r: value out of range" % (num, spec))
    return UsdtArg(t, val, reg_off, size < 0, 64 - 8 * abs(size), abs(size), spec), m.end()


def parse_usdt_args(text: str) -> tuple[UsdtArg, ...]:
    """libbpf's parse_usdt_spec(): ``-4@%edi 8@-16(%rbp) 4@$5`` -> one UsdtArg each (at most 12)."""
    args: list[UsdtArg] = []
    pos = 0
    while pos < len(text) and text[pos:].strip():
        if len(args) >= USDT_MAX_ARG_CNT:
            raise AttachError("usdt: too many USDT arguments (> %d) in %r" % (USDT_MAX_ARG_CNT, text))
        arg, pos = _parse_arg(text, pos, len(args))
        args.append(arg)
    return tuple(args)


def encode_spec(args: tuple[UsdtArg, ...] | list[UsdtArg] | str, cookie: int = 0) -> bytes:
    """``struct __bpf_usdt_spec`` (208 bytes) for ARGS (or an argument string) and the user's COOKIE."""
    if isinstance(args, str):
        args = parse_usdt_args(args)
    if len(args) > USDT_MAX_ARG_CNT:
        raise AttachError("usdt: too many USDT arguments (%d > %d)" % (len(args), USDT_MAX_ARG_CNT))
    out = b"".join(a.pack() for a in args) + bytes(ARG_SPEC.size * (USDT_MAX_ARG_CNT - len(args)))
    return out + _SPEC_TAIL.pack(cookie & 0xFFFFFFFFFFFFFFFF, len(args))
