"""x86-64 analysis of patch windows for userspace probes (capstone).

A *window* is the run of whole instructions at a probe site that the agent
overwrites with a 5-byte ``jmp rel32`` to a trampoline; the trampoline runs the
displaced instructions, relocated, then jumps back.  :func:`plan_window` decides
whether that is safe and describes every displaced instruction the way the agent
spec wants it (``site``/``insn`` lines, see the attach contract):

* ``copy`` -- position independent, copied as is;
* ``rip``  -- has a rip-relative disp32 at byte FIELD that refers to VADDR TARGET;
* ``jmp`` / ``jcc`` (FIELD = condition code) / ``call`` -- direct branches to TARGET.

:func:`find_syscall_sites` sweeps a whole ELF file for ``syscall`` instructions
and plans a window starting at each one (``syssite`` lines), with a JSON cache
because a linear sweep of libc takes seconds.

All addresses are VADDRs (as in the ELF file), never run-time addresses.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import capstone
from capstone import x86 as cs_x86

from hybrid.errors import AttachError

JMP_LEN = 5  # e9 rel32

_LEGACY_PREFIXES = frozenset((0x66, 0x67, 0xF2, 0xF3, 0x2E, 0x3E, 0x26, 0x36, 0x64, 0x65, 0xF0))

# Instructions that end the flow of control (nothing after them is reached by falling through).
_TERMINATORS = frozenset(("ret", "retf", "iret", "iretd", "iretq", "ud2", "ud1", "ud0", "int3", "hlt", "jmp",
                          "ljmp", "sysret", "sysexit"))
# rel8-only branches that cannot be turned into an absolute jump by the agent.
_REFUSED = frozenset(("loop", "loope", "loopne", "jrcxz", "jecxz", "jcxz", "xbegin", "xabort"))
_SYSCALLS = frozenset(("syscall", "sysenter", "int"))

_md_cache: dict[bool, capstone.Cs] = {}


def _md(detail: bool) -> capstone.Cs:
    md = _md_cache.get(detail)
    if md is None:
        md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
        md.detail = detail
        _md_cache[detail] = md
    return md


@dataclass(frozen=True)
class WindowInsn:
    """One displaced instruction of a window (an ``insn`` line)."""

    off: int  # offset in the window
    len: int
    kind: str  # copy | rip | jmp | jcc | call
    field: int  # rip: offset of the disp32 in the insn; jcc: condition code 0..15; else 0
    target: int  # VADDR referred to (rip/jmp/jcc/call), 0 for copy
    bytes: bytes
    text: str = ""  # "mnemonic op_str" for messages

    def spec_line(self) -> str:
        return "insn %d %d %s %d %#x %s" % (self.off, self.len, self.kind, self.field, self.target, self.bytes.hex())


@dataclass(frozen=True)
class Window:
    """A patch window: LEN bytes of whole instructions at VADDR."""

    vaddr: int
    length: int
    orig: bytes
    insns: tuple[WindowInsn, ...]
    mode: str = "jmp"  # "jmp" (5-byte jmp rel32) or "int3" (only byte 0 is patched)

    def spec_lines(self, module: str, head: str = "site") -> list[str]:
        """The contract's ``site``/``syssite`` line and its ``insn`` lines (the caller adds ``mode int3``
        for an int3 window, see :attr:`mode`)."""
        if head not in ("site", "syssite"):
            raise AttachError("spec head must be 'site' or 'syssite', not %r" % head)
        if not module or any(c.isspace() for c in module):
            raise AttachError("module path %r is empty or contains white space" % module)
        lines = ["%s %s %#x %d %s %d" % (head, module, self.vaddr, self.length, self.orig.hex(), len(self.insns))]
        lines.extend(i.spec_line() for i in self.insns)
        return lines

    def to_json(self) -> dict:
        return {"vaddr": self.vaddr, "length": self.length, "orig": self.orig.hex(), "mode": self.mode,
                "insns": [[i.off, i.len, i.kind, i.field, i.target, i.bytes.hex(), i.text] for i in self.insns]}

    @classmethod
    def from_json(cls, d: dict) -> "Window":
        insns = tuple(WindowInsn(o, n, k, f, t, bytes.fromhex(b), x) for o, n, k, f, t, b, x in d["insns"])
        return cls(d["vaddr"], d["length"], bytes.fromhex(d["orig"]), insns, d.get("mode", "jmp"))


def _opcode_bytes(code: bytes) -> bytes:
    """The instruction bytes after legacy and REX prefixes."""
    i = 0
    while i < len(code) and code[i] in _LEGACY_PREFIXES:
        i += 1
    if i < len(code) and 0x40 <= code[i] <= 0x4F:
        i += 1
    return code[i:]


def _condition_code(code: bytes) -> int | None:
    op = _opcode_bytes(code)
    if op and 0x70 <= op[0] <= 0x7F:
        return op[0] & 0xF
    if len(op) >= 2 and op[0] == 0x0F and 0x80 <= op[1] <= 0x8F:
        return op[1] & 0xF
    return None


def _describe(vaddr: int, insn) -> str:
    return "%#x: %s %s (%s)" % (vaddr, insn.mnemonic, insn.op_str, bytes(insn.bytes).hex())


def _imm_target(insn) -> int | None:
    ops = insn.operands
    if len(ops) == 1 and ops[0].type == cs_x86.X86_OP_IMM:
        return ops[0].imm & 0xFFFFFFFFFFFFFFFF
    return None


def _classify(insn) -> WindowInsn:
    """Kind, field and target of one decoded instruction (detail mode); raises for refused ones."""
    raw = bytes(insn.bytes)
    text = ("%s %s" % (insn.mnemonic, insn.op_str)).strip()
    m = insn.mnemonic
    if m in _REFUSED:
        raise AttachError("%s: %s cannot be relocated (rel8-only branch or transaction)"
                          % (_describe(insn.address, insn), m))
    groups = set(insn.groups)
    is_jump = capstone.CS_GRP_JUMP in groups
    is_call = capstone.CS_GRP_CALL in groups
    rel = capstone.CS_GRP_BRANCH_RELATIVE in groups
    if (is_jump or is_call) and rel:
        target = _imm_target(insn)
        if target is None:
            raise AttachError("%s: unexpected operand of a relative branch" % _describe(insn.address, insn))
        if is_call:
            return WindowInsn(0, insn.size, "call", 0, target, raw, text)
        if m == "jmp":
            return WindowInsn(0, insn.size, "jmp", 0, target, raw, text)
        cc = _condition_code(raw)
        if cc is None:
            raise AttachError("%s: relative branch with an unknown encoding" % _describe(insn.address, insn))
        return WindowInsn(0, insn.size, "jcc", cc, target, raw, text)
    if is_call:
        # call *reg / call *[mem]: the return address would be the trampoline's.
        raise AttachError("%s: an indirect call cannot be displaced (it would return into the trampoline)"
                          % _describe(insn.address, insn))
    for op in insn.operands:
        if op.type == cs_x86.X86_OP_MEM and op.mem.base == cs_x86.X86_REG_RIP:
            if insn.disp_size != 4 or not insn.disp_offset:
                raise AttachError("%s: rip-relative operand without a disp32" % _describe(insn.address, insn))
            target = (insn.address + insn.size + op.mem.disp) & 0xFFFFFFFFFFFFFFFF
            return WindowInsn(0, insn.size, "rip", insn.disp_offset, target, raw, text)
    return WindowInsn(0, insn.size, "copy", 0, 0, raw, text)


def _is_terminator(insn) -> bool:
    if insn.mnemonic in _TERMINATORS:
        return True
    return capstone.CS_GRP_RET in insn.groups or capstone.CS_GRP_IRET in insn.groups


def _is_syscall(mnemonic: str, op_str: str) -> bool:
    return mnemonic in ("syscall", "sysenter") or (mnemonic == "int" and op_str.strip() in ("0x80",))


def _direct_targets_lite(code: bytes, vaddr: int) -> list[int]:
    """Targets of every direct jmp/jcc/call in CODE (linear sweep, resyncing over bad bytes)."""
    out: list[int] = []
    md = _md(False)
    pos = 0
    n = len(code)
    while pos < n:
        last = pos
        for addr, size, mnem, op in md.disasm_lite(code[pos:], vaddr + pos):
            last = addr - vaddr + size
            if (mnem[0] == "j" or mnem == "call" or mnem.startswith(("loop", "xbegin"))) and op.startswith("0x"):
                try:
                    out.append(int(op, 16))
                except ValueError:
                    pass
        pos = last if last > pos else pos + 1
    return out


def plan_window(code: bytes, vaddr: int, *, min_len: int = JMP_LEN, func_start: int | None = None,
                func_code: bytes | None = None, syscall_site: bool = False) -> Window:
    """Plan a patch window of at least MIN_LEN bytes at VADDR; CODE are the bytes from VADDR on.

    With FUNC_CODE (the whole function's bytes starting at FUNC_START), any direct branch of the
    function whose target lies strictly inside the window is refused.  SYSCALL_SITE: the first
    instruction is the ``syscall`` being redirected (it is copied as is).
    """
    md = _md(True)
    insns: list[WindowInsn] = []
    off = 0
    decoded = list(md.disasm(code[: min_len + 15 * 2], vaddr))  # enough for min_len + one long insn
    it = iter(decoded)
    while off < min_len:
        insn = next(it, None)
        if insn is None or insn.address != vaddr + off:
            at = vaddr + off
            if off >= len(code):
                raise AttachError("%#x: only %d bytes of code available for a %d-byte window at %#x"
                                  % (at, len(code), min_len, vaddr))
            raise AttachError("%#x: cannot decode the instruction (bytes %s) in the window at %#x"
                              % (at, code[off:off + 8].hex(), vaddr))
        if insn.address + insn.size > vaddr + len(code):
            raise AttachError("%s: instruction runs past the end of the code" % _describe(insn.address, insn))
        if syscall_site and off == 0:
            if insn.mnemonic != "syscall":
                raise AttachError("%s: a syscall site must start with 'syscall'" % _describe(insn.address, insn))
            w = WindowInsn(0, insn.size, "copy", 0, 0, bytes(insn.bytes), "syscall")
        else:
            if _is_syscall(insn.mnemonic, insn.op_str):
                raise AttachError("%s: a system call inside the window at %#x" % (_describe(insn.address, insn), vaddr))
            w = _classify(insn)
        w = WindowInsn(off, w.len, w.kind, w.field, w.target, w.bytes, w.text)
        end = off + insn.size
        if end < min_len:
            if _is_terminator(insn):
                raise AttachError("%s: the code ends after %d of the %d bytes the window at %#x needs"
                                  % (_describe(insn.address, insn), end, min_len, vaddr))
            if w.kind == "call":
                raise AttachError("%s: the call would return into the middle of the window at %#x"
                                  % (_describe(insn.address, insn), vaddr))
        insns.append(w)
        off = end
    length = off
    inside = range(vaddr + 1, vaddr + length)
    for w in insns:
        if w.kind in ("jmp", "jcc", "call") and w.target in inside:
            raise AttachError("%#x: %s branches into the window [%#x, %#x)"
                              % (vaddr + w.off, w.text, vaddr, vaddr + length))
    if func_code is not None:
        start = vaddr if func_start is None else func_start
        for t in _direct_targets_lite(func_code, start):
            if t in inside:
                raise AttachError("a branch of the function at %#x targets %#x, inside the window [%#x, %#x)"
                                  % (start, t, vaddr, vaddr + length))
    return Window(vaddr, length, bytes(code[:length]), tuple(insns))


def plan_int3(code: bytes, vaddr: int) -> Window:
    """A window of just the first instruction, patched with an int3 (``mode int3``)."""
    md = _md(True)
    insn = next(md.disasm(code[:16], vaddr, 1), None)
    if insn is None or insn.size > len(code):
        raise AttachError("%#x: cannot decode the instruction (bytes %s)" % (vaddr, code[:8].hex()))
    if _is_syscall(insn.mnemonic, insn.op_str):
        raise AttachError("%s: cannot displace a system call with an int3 site" % _describe(vaddr, insn))
    w = _classify(insn)
    return Window(vaddr, insn.size, bytes(code[: insn.size]),
                  (WindowInsn(0, w.len, w.kind, w.field, w.target, w.bytes, w.text),), "int3")


# --- syscall sites ----------------------------------------------------------------

# Syscalls whose sites are never redirected: they change the stack or never return normally.
SKIP_SYSCALLS = {56: "clone", 435: "clone3", 58: "vfork", 15: "rt_sigreturn"}
_CACHE_VERSION = 3
_MOV_EAX_IMM = re.compile(r"^(?:eax|rax), (0x[0-9a-f]+|[0-9]+)$")
_WRITES_EAX = re.compile(r"^(?:eax|rax|ax|al|ah)\b")
_READS_ONLY = frozenset(("cmp", "test", "push", "bt"))


@dataclass(frozen=True)
class SyscallSite:
    vaddr: int
    window: Window
    nr: int | None  # the syscall number when a mov eax/rax, imm in the same basic block sets it


@dataclass(frozen=True)
class SkippedSite:
    vaddr: int
    reason: str
    nr: int | None = None


@dataclass(frozen=True)
class SyscallScan:
    path: str
    sites: tuple[SyscallSite, ...]
    skipped: tuple[SkippedSite, ...]
    cached: bool = False

    def site_at(self, vaddr: int) -> SyscallSite | None:
        for s in self.sites:
            if s.vaddr == vaddr:
                return s
        return None


def _exec_sections(path: str) -> list[tuple[str, int, bytes]]:
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile

    try:
        with open(path, "rb") as f:
            elf = ELFFile(f)
            if elf["e_machine"] != "EM_X86_64":
                raise AttachError("%s: not an x86-64 ELF file (%s)" % (path, elf["e_machine"]))
            out = []
            for sec in elf.iter_sections():
                if sec["sh_flags"] & 0x4 and sec["sh_type"] == "SHT_PROGBITS" and sec["sh_size"]:
                    out.append((sec.name, sec["sh_addr"], sec.data()))
            return out
    except FileNotFoundError:
        raise AttachError("%s: no such file" % path) from None
    except (ELFError, ValueError) as e:
        raise AttachError("%s: not an ELF file (%s)" % (path, e)) from None
    except OSError as e:
        raise AttachError("%s: cannot read: %s" % (path, e.strerror or e)) from None


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "hybrid"


def _cache_file(path: str, st: os.stat_result) -> tuple[Path, list]:
    key = [os.path.realpath(path), st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size, _CACHE_VERSION]
    h = hashlib.sha1(json.dumps(key).encode()).hexdigest()[:20]
    return _cache_dir() / ("syscall-sites-%s.json" % h), key


def _scan(path: str) -> tuple[list[SyscallSite], list[SkippedSite]]:
    sections = _exec_sections(path)
    md = _md(False)
    targets: list[int] = []
    # per syscall: (vaddr, section index, offset in section, known nr, address of the instruction setting it)
    found: list[tuple[int, int, int, int | None, int]] = []
    for si, (_name, base, data) in enumerate(sections):
        pos = 0
        n = len(data)
        nr: int | None = None
        nr_at = base
        while pos < n:
            last = pos
            for addr, size, mnem, op in md.disasm_lite(data[pos:], base + pos):
                last = addr - base + size
                c = mnem[0]
                if c == "j" or mnem == "call" or mnem.startswith("loop"):
                    if op.startswith("0x"):
                        try:
                            targets.append(int(op, 16))
                        except ValueError:
                            pass
                    nr = None
                elif mnem == "syscall":
                    found.append((addr, si, addr - base, nr, nr_at))
                    nr = None
                elif mnem == "mov" and (mm := _MOV_EAX_IMM.match(op)):
                    nr, nr_at = int(mm.group(1), 0), addr
                elif c == "r" and mnem.startswith("ret"):
                    nr = None
                elif nr is not None and _WRITES_EAX.match(op) and mnem not in _READS_ONLY:
                    nr = None
            if last == pos:  # undecodable byte: resync one byte further
                last = pos + 1
                nr = None
            pos = last
    # function starts (unwind info, symbols) are entered from elsewhere too
    from hybrid.user.attach.symbols import elf_image, fde_starts

    targets.extend(fde_starts(path))
    targets.extend(s.value for s in elf_image(path).symbols if s.shndx and s.type in ("STT_FUNC", "STT_GNU_IFUNC"))
    targets.sort()
    sites: list[SyscallSite] = []
    skipped: list[SkippedSite] = []
    for addr, si, off, nr, nr_at in found:
        if nr is not None:
            # the mov must be in the same basic block: no branch target in (mov, syscall]
            i = bisect.bisect_right(targets, nr_at)
            if i < len(targets) and targets[i] <= addr:
                nr = None
        if nr in SKIP_SYSCALLS:
            skipped.append(SkippedSite(addr, "syscall %d (%s) changes the stack or does not return"
                                       % (nr, SKIP_SYSCALLS[nr]), nr))
            continue
        base, data = sections[si][1], sections[si][2]
        try:
            w = plan_window(data[off:off + 40], addr, min_len=JMP_LEN, syscall_site=True)
            i = bisect.bisect_right(targets, addr)
            if i < len(targets) and targets[i] < addr + w.length:
                raise AttachError("a branch targets %#x, inside the window [%#x, %#x)"
                                  % (targets[i], addr, addr + w.length))
        except AttachError as e:
            # `mov $NR, %eax; syscall; ret` (getpid & co): start the window at the mov instead
            w = _window_from_mov(data, base, addr, nr, nr_at, targets)
            if w is None:
                skipped.append(SkippedSite(addr, str(e), nr))
                continue
        sites.append(SyscallSite(addr, w, nr))
    return sites, skipped


def _window_from_mov(data: bytes, base: int, addr: int, nr: int | None, nr_at: int,
                     targets: list[int]) -> Window | None:
    """A syscall window ``[mov $NR, %eax|%rax; syscall]`` when the mov is right before the syscall in the
    same basic block and nothing branches to the syscall (the only address strictly inside the window)."""
    if nr is None or not 0 < addr - nr_at <= 8:
        return None
    mov = data[nr_at - base:addr - base]
    if not (len(mov) == 5 and mov[0] == 0xB8 or len(mov) == 7 and mov[:3] == b"\x48\xc7\xc0"):
        return None
    i = bisect.bisect_right(targets, nr_at)
    if i < len(targets) and targets[i] <= addr:
        return None
    insns = (WindowInsn(0, len(mov), "copy", 0, 0, bytes(mov), "mov $%#x, %%eax" % nr),
             WindowInsn(len(mov), 2, "copy", 0, 0, b"\x0f\x05", "syscall"))
    return Window(nr_at, len(mov) + 2, bytes(mov) + b"\x0f\x05", insns)


def find_syscall_sites(path: str | os.PathLike, *, use_cache: bool = True) -> SyscallScan:
    """Every ``syscall`` instruction of an x86-64 ELF file with a planned ``syssite`` window.

    Sites with a branch target strictly inside their window, whose window reaches a ret/indirect
    jump/another syscall, or whose syscall number is known to be clone/clone3/vfork/rt_sigreturn are
    returned in ``skipped`` with the reason.  Results are cached per (path, dev, inode, mtime, size) in
    ``$XDG_CACHE_HOME/hybrid`` (or ``~/.cache/hybrid``).
    """
    path = os.fspath(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise AttachError("%s: no such file" % path) from None
    except OSError as e:
        raise AttachError("%s: cannot stat: %s" % (path, e.strerror or e)) from None
    cfile, key = _cache_file(path, st)
    if use_cache:
        try:
            d = json.loads(cfile.read_text())
            if d.get("key") == key:
                sites = tuple(SyscallSite(s["vaddr"], Window.from_json(s["window"]), s["nr"]) for s in d["sites"])
                skipped = tuple(SkippedSite(s["vaddr"], s["reason"], s["nr"]) for s in d["skipped"])
                return SyscallScan(path, sites, skipped, cached=True)
        except (OSError, ValueError, KeyError, TypeError):
            pass
    sites, skipped = _scan(path)
    if use_cache:
        d = {"key": key,
             "sites": [{"vaddr": s.vaddr, "nr": s.nr, "window": s.window.to_json()} for s in sites],
             "skipped": [{"vaddr": s.vaddr, "reason": s.reason, "nr": s.nr} for s in skipped]}
        try:
            cfile.parent.mkdir(parents=True, exist_ok=True)
            tmp = cfile.with_name(cfile.name + ".%d.tmp" % os.getpid())
            tmp.write_text(json.dumps(d))
            os.replace(tmp, cfile)
        except OSError:
            pass  # a cache that cannot be written only costs time
    return SyscallScan(path, tuple(sites), tuple(skipped))
