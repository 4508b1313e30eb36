"""Symbols, libraries and addresses of userspace probe targets (pyelftools).

Addresses are VADDRs (``st_value``, ``p_vaddr``) unless a name says otherwise;
the run-time address of a VADDR is ``load_bias + VADDR``.  File offsets are what
the kernel's uprobes and libbpf's ``func_offset`` use.
"""

from __future__ import annotations

import ctypes
import functools
import os
import re
import shutil
import struct
import subprocess
from dataclasses import dataclass

from hybrid.errors import AttachError
from hybrid.user.elf import UprobeTarget, UsdtTarget, parse_section_name

PAGE = 4096
PF_X = 1
STANDARD_LIB_DIRS = ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64", "/lib", "/usr/lib",
                     "/usr/local/lib")
STANDARD_BIN_DIRS = ("/usr/bin", "/usr/sbin", "/bin", "/sbin", "/usr/local/bin")


# --- section names ----------------------------------------------------------------


def parse_target(section_target: str) -> UprobeTarget | UsdtTarget:
    """The target of a ``uprobe/``, ``uretprobe/`` (and ``.s``) or ``usdt/`` section name.

    ``uprobe//usr/lib/x86_64-linux-gnu/libc.so.6:malloc``, ``uprobe/libc.so.6:malloc``,
    ``uretprobe/./prog:func``, ``uprobe/prog:func+0x10``, ``uprobe/prog:0x1234`` (raw file offset:
    ``func`` is the number's text, see :func:`raw_offset`), ``usdt/PATH:PROVIDER:NAME``.
    Parsing is :func:`hybrid.user.elf.parse_section_name`'s (libbpf's rules).
    """
    info = parse_section_name(section_target)
    if info.kind not in ("uprobe", "uretprobe", "usdt"):
        raise AttachError("section %r is not a uprobe, uretprobe or usdt section" % section_target)
    if info.attach is None:
        raise AttachError(info.attach_error or "section %r names no target (attach it by hand)" % section_target)
    return info.attach


def raw_offset(func: str | None) -> int | None:
    """The number of a ``uprobe/prog:0x1234`` target (a file offset), None for a symbol name."""
    if func is None:
        return None
    m = re.fullmatch(r"0[xX][0-9a-fA-F]+|[0-9]+", func)
    return int(func, 0) if m else None


# --- finding files ----------------------------------------------------------------


def _is_library_name(name: str) -> bool:
    return name.endswith(".so") or ".so." in name


def _ldconfig_cache() -> dict[str, str]:
    return dict(_ldconfig_entries())


@functools.lru_cache(maxsize=1)
def _ldconfig_entries() -> tuple[tuple[str, str], ...]:
    exe = shutil.which("ldconfig") or shutil.which("ldconfig", path="/usr/sbin:/sbin")
    if not exe:
        return ()
    try:
        out = subprocess.run([exe, "-p"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    entries = []
    for line in out.splitlines():
        m = re.match(r"\s+(\S+) \(([^)]*)\) => (\S+)$", line)
        if m and ("x86-64" in m.group(2) or "64bit" in m.group(2)):
            entries.append((m.group(1), m.group(3)))
    seen: dict[str, str] = {}
    for k, v in entries:
        seen.setdefault(k, v)
    return tuple(seen.items())


def _maps_paths(pid: int) -> list[str]:
    try:
        with open("/proc/%d/maps" % pid) as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise AttachError("cannot read /proc/%d/maps: %s" % (pid, e.strerror or e)) from None
    out = []
    for line in lines:
        parts = line.split(None, 5)
        if len(parts) == 6 and parts[5].startswith("/") and parts[5] not in out:
            out.append(parts[5])
    return out


def find_library(name: str, pid: int | None = None) -> str:
    """The path of library or executable NAME, as libbpf resolves a uprobe's binary.

    An absolute path is used as is; a name with a '/' is relative to the working directory;
    otherwise, with PID, the object of that name mapped in /proc/PID/maps; else for a library
    (``*.so``, ``*.so.*``) LD_LIBRARY_PATH, the ldconfig cache and the standard directories, for
    an executable PATH and the standard bin directories.
    """
    if not name:
        raise AttachError("empty binary name")
    if "/" in name:
        path = os.path.abspath(name)
        if not os.path.isfile(path):
            raise AttachError("%s: no such file" % name)
        return path
    searched: list[str] = []
    if pid is not None:
        for p in _maps_paths(pid):
            base = os.path.basename(p)
            if base == name or (not _is_library_name(name) and base.startswith(name + ".so")) or \
                    (_is_library_name(name) and base.startswith(name + ".")):
                return p
        searched.append("/proc/%d/maps" % pid)
    if _is_library_name(name):
        dirs = [d for d in os.environ.get("LD_LIBRARY_PATH", "").split(":") if d]
        for d in dirs:
            if os.path.isfile(os.path.join(d, name)):
                return os.path.join(d, name)
        if dirs:
            searched.append("LD_LIBRARY_PATH=%s" % ":".join(dirs))
        hit = _ldconfig_cache().get(name)
        if hit and os.path.isfile(hit):
            return hit
        searched.append("the ldconfig cache")
        std = STANDARD_LIB_DIRS
    else:
        dirs = [d for d in os.environ.get("PATH", "").split(":") if d]
        for d in dirs:
            p = os.path.join(d, name)
            if os.path.isfile(p) and os.access(p, os.X_OK):
                return p
        searched.append("PATH")
        std = STANDARD_BIN_DIRS
    for d in std:
        if os.path.isfile(os.path.join(d, name)):
            return os.path.join(d, name)
    searched.append(":".join(std))
    raise AttachError("cannot find %r: searched %s" % (name, ", ".join(searched)))


# --- ELF files --------------------------------------------------------------------


@dataclass(frozen=True)
class Segment:
    vaddr: int
    offset: int
    filesz: int
    memsz: int
    flags: int


@dataclass(frozen=True)
class Symbol:
    name: str  # as found, possibly versioned in .symtab (malloc@@GLIBC_2.2.5)
    vaddr: int
    size: int
    kind: str  # FUNC, IFUNC, OBJECT, NOTYPE
    is_ifunc: bool
    file_offset: int


@dataclass(frozen=True)
class _Sym:
    name: str
    base: str  # without @version
    value: int
    size: int
    type: str
    shndx: int
    hidden_version: bool
    table: str


@dataclass(frozen=True)
class ElfImage:
    """What the probe code needs of one ELF file, read once (cached per file identity)."""

    path: str
    type: str  # ET_EXEC, ET_DYN
    machine: str
    segments: tuple[Segment, ...]
    symbols: tuple[_Sym, ...]
    sections: tuple[tuple[str, int, int, int], ...]  # (name, sh_addr, sh_offset, sh_size)

    def section(self, name: str) -> tuple[str, int, int, int] | None:
        for s in self.sections:
            if s[0] == name:
                return s
        return None


def _identity(path: str) -> tuple:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise AttachError("%s: no such file" % path) from None
    except OSError as e:
        raise AttachError("%s: cannot stat: %s" % (path, e.strerror or e)) from None
    return (os.path.realpath(path), st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


def elf_image(path: str | os.PathLike) -> ElfImage:
    path = os.fspath(path)
    return _load(path, *_identity(path))


@functools.lru_cache(maxsize=32)
def _load(path: str, real: str, dev: int, ino: int, mtime: int, size: int) -> ElfImage:
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile

    try:
        with open(path, "rb") as f:
            elf = ELFFile(f)
            segs = tuple(Segment(p["p_vaddr"], p["p_offset"], p["p_filesz"], p["p_memsz"], p["p_flags"])
                         for p in elf.iter_segments() if p["p_type"] == "PT_LOAD")
            sections = tuple((s.name, s["sh_addr"], s["sh_offset"], s["sh_size"]) for s in elf.iter_sections())
            syms: list[_Sym] = []
            for tab in (".symtab", ".dynsym"):
                sec = elf.get_section_by_name(tab)
                if sec is None or not hasattr(sec, "iter_symbols"):
                    continue
                hidden: bytes | None = None
                if tab == ".dynsym":
                    vs = elf.get_section_by_name(".gnu.version")
                    hidden = vs.data() if vs is not None else None
                for i, s in enumerate(sec.iter_symbols()):
                    name = s.name
                    if not name:
                        continue
                    shndx = s["st_shndx"]
                    shndx = 0 if shndx == "SHN_UNDEF" else (0xFFF1 if shndx == "SHN_ABS" else
                                                            (shndx if isinstance(shndx, int) else 0xFF00))
                    hid = False
                    if hidden is not None and 2 * i + 2 <= len(hidden):
                        hid = bool(struct.unpack_from("<H", hidden, 2 * i)[0] & 0x8000)
                    base = name.split("@", 1)[0]
                    hid = hid or ("@" in name and "@@" not in name)
                    stype = s["st_info"]["type"]
                    if stype in ("STT_LOOS", 10):  # pyelftools' name of STT_GNU_IFUNC
                        stype = "STT_GNU_IFUNC"
                    syms.append(_Sym(name, base, s["st_value"], s["st_size"], stype, shndx, hid, tab))
            return ElfImage(path, elf["e_type"], elf["e_machine"], segs, tuple(syms), sections)
    except (ELFError, ValueError, struct.error) as e:
        raise AttachError("%s: not an ELF file (%s)" % (path, e)) from None
    except OSError as e:
        raise AttachError("%s: cannot read: %s" % (path, e.strerror or e)) from None


def vaddr_to_offset(path: str | os.PathLike, vaddr: int) -> int:
    """The file offset of VADDR (which must lie in a PT_LOAD segment's file part)."""
    img = elf_image(path)
    for s in img.segments:
        if s.vaddr <= vaddr < s.vaddr + s.filesz:
            return vaddr - s.vaddr + s.offset
    raise AttachError("%s: address %#x is in no PT_LOAD segment's file contents" % (img.path, vaddr))


def offset_to_vaddr(path: str | os.PathLike, offset: int) -> int:
    """The VADDR of file offset OFFSET (which must lie in a PT_LOAD segment)."""
    img = elf_image(path)
    for s in img.segments:
        if s.offset <= offset < s.offset + s.filesz:
            return offset - s.offset + s.vaddr
    raise AttachError("%s: file offset %#x is in no PT_LOAD segment" % (img.path, offset))


def _rank(s: _Sym) -> tuple:
    return (s.type not in ("STT_FUNC", "STT_GNU_IFUNC"), s.hidden_version, s.table != ".symtab")


def _kind(t: str) -> str:
    return {"STT_FUNC": "FUNC", "STT_GNU_IFUNC": "IFUNC", "STT_OBJECT": "OBJECT", "STT_NOTYPE": "NOTYPE"}.get(
        t, t.replace("STT_", ""))


def resolve_symbol(path: str | os.PathLike, name: str) -> Symbol:
    """The defined symbol NAME of a file (.symtab and .dynsym); a defined FUNC/IFUNC is preferred,
    then the default version (``malloc@@GLIBC_2.2.5`` over ``memcpy@GLIBC_2.2.5``).  A name with '@'
    must match the versioned name exactly (.symtab spelling)."""
    img = elf_image(path)
    if not name:
        raise AttachError("%s: empty symbol name" % img.path)
    key = "base" if "@" not in name else "name"
    cands = [s for s in img.symbols if getattr(s, key) == name and s.shndx != 0
             and s.type in ("STT_FUNC", "STT_GNU_IFUNC", "STT_OBJECT", "STT_NOTYPE")]
    if not cands:
        undef = any(s.base == name for s in img.symbols)
        raise AttachError("%s: symbol %r is %s" % (img.path, name, "not defined in this file (undefined reference)"
                                                   if undef else "not in .symtab or .dynsym"))
    best = min(cands, key=_rank)
    off = vaddr_to_offset(img.path, best.value) if best.shndx != 0xFFF1 else best.value
    return Symbol(best.name, best.value, best.size, _kind(best.type), best.type == "STT_GNU_IFUNC", off)


def symbol_at(path: str | os.PathLike, vaddr: int) -> Symbol | None:
    """A defined function symbol whose value is exactly VADDR (e.g. an IFUNC implementation)."""
    img = elf_image(path)
    cands = [s for s in img.symbols if s.value == vaddr and s.shndx != 0 and s.type in ("STT_FUNC", "STT_GNU_IFUNC")]
    if not cands:
        return None
    best = min(cands, key=lambda s: (s.size == 0,) + _rank(s))
    return Symbol(best.name, best.value, best.size, _kind(best.type), best.type == "STT_GNU_IFUNC",
                  vaddr_to_offset(img.path, best.value))


# --- code bytes -------------------------------------------------------------------


def read_code(path: str | os.PathLike, vaddr: int, n: int) -> bytes:
    """Up to N bytes at VADDR from the file (fewer at the end of the segment's file contents)."""
    img = elf_image(path)
    for s in img.segments:
        if s.vaddr <= vaddr < s.vaddr + s.filesz:
            n = min(n, s.vaddr + s.filesz - vaddr)
            try:
                with open(img.path, "rb") as f:
                    f.seek(vaddr - s.vaddr + s.offset)
                    return f.read(n)
            except OSError as e:
                raise AttachError("%s: cannot read: %s" % (img.path, e.strerror or e)) from None
    raise AttachError("%s: address %#x is in no PT_LOAD segment's file contents" % (img.path, vaddr))


def read_process_memory(pid: int, address: int, n: int) -> bytes:
    """N bytes at ADDRESS of process PID (/proc/PID/mem; needs ptrace access)."""
    try:
        fd = os.open("/proc/%d/mem" % pid, os.O_RDONLY)
    except OSError as e:
        raise AttachError("cannot open /proc/%d/mem: %s" % (pid, e.strerror or e)) from None
    try:
        data = os.pread(fd, n, address)
    except OSError as e:
        raise AttachError("cannot read %d bytes at %#x of process %d: %s"
                          % (n, address, pid, e.strerror or e)) from None
    finally:
        os.close(fd)
    if len(data) != n:
        raise AttachError("short read at %#x of process %d: %d of %d bytes" % (address, pid, len(data), n))
    return data


def _eh_frame_table(img: ElfImage) -> tuple[bytes, int, int] | None:
    """(.eh_frame_hdr bytes, its address, FDE count) when it has a datarel|sdata4 search table."""
    hdr = img.section(".eh_frame_hdr")
    if hdr is None:
        return None
    data = read_code(img.path, hdr[1], hdr[3])
    if len(data) < 12 or data[0] != 1 or data[3] != 0x3B or data[1] != 0x1B or data[2] != 0x03:
        return None
    count = struct.unpack_from("<I", data, 8)[0]
    return data, hdr[1], min(count, (len(data) - 12) // 8)


def fde_starts(path: str | os.PathLike) -> tuple[int, ...]:
    """The start VADDR of every function with unwind info (.eh_frame_hdr's table), sorted."""
    try:
        t = _eh_frame_table(elf_image(path))
    except AttachError:
        return ()
    if t is None:
        return ()
    data, addr, count = t
    return tuple(sorted(struct.unpack_from("<i", data, 12 + 8 * i)[0] + addr for i in range(count)))


def _eh_frame_range(img: ElfImage, vaddr: int) -> tuple[int, int] | None:
    """(start, size) of the FDE covering VADDR, from .eh_frame_hdr's binary search table."""
    t = _eh_frame_table(img)
    if t is None:
        return None
    data, hdr_addr, count = t
    lo, hi = 0, count  # the table is sorted by initial location
    while lo < hi:
        mid = (lo + hi) // 2
        if struct.unpack_from("<i", data, 12 + 8 * mid)[0] + hdr_addr <= vaddr:
            lo = mid + 1
        else:
            hi = mid
    i = lo - 1
    if i < 0:
        return None
    fde = struct.unpack_from("<i", data, 12 + 8 * i + 4)[0] + hdr_addr
    head = read_code(img.path, fde, 24)
    length = struct.unpack_from("<I", head, 0)[0]
    if length in (0, 0xFFFFFFFF):
        return None
    cie = fde + 4 - struct.unpack_from("<I", head, 4)[0]
    if not _cie_is_pcrel_sdata4(img, cie):
        return None
    pc_begin = (struct.unpack_from("<i", head, 8)[0] + fde + 8) & 0xFFFFFFFFFFFFFFFF
    pc_range = struct.unpack_from("<I", head, 12)[0]
    if not pc_begin <= vaddr < pc_begin + pc_range:
        return None
    return pc_begin, pc_range


def _cie_is_pcrel_sdata4(img: ElfImage, cie: int) -> bool:
    """Whether the CIE's FDE pointer encoding ('R' augmentation) is pcrel|sdata4 (0x1b)."""
    d = read_code(img.path, cie, 64)
    if len(d) < 10 or struct.unpack_from("<I", d, 4)[0] != 0:
        return False
    aug_end = d.index(b"\0", 9)
    aug = d[9:aug_end].decode("latin-1")
    p = aug_end + 1

    def uleb(p):
        v = s = 0
        while True:
            b = d[p]
            p += 1
            v |= (b & 0x7F) << s
            s += 7
            if not b & 0x80:
                return v, p

    if not aug.startswith("z"):
        return False
    _, p = uleb(p)  # code alignment
    _, p = uleb(p)  # data alignment (sleb, same length)
    _, p = uleb(p)  # return address register (version 1: a byte; 16 < 0x80 so the same)
    _, p = uleb(p)  # augmentation data length
    for c in aug[1:]:
        if c == "R":
            return d[p] == 0x1B
        if c == "P":
            enc = d[p]
            p += 1 + {0x00: 8, 0x03: 4, 0x0B: 4, 0x1B: 4, 0x9B: 4, 0x04: 8, 0x0C: 8}.get(enc, 99)
            if p > len(d):
                return False
        elif c in ("L",):
            p += 1
        elif c in ("S", "B"):
            continue
        else:
            return False
    return False


def function_size(path: str | os.PathLike, vaddr: int) -> int:
    """The size of the function at VADDR: a symbol's st_size, else its .eh_frame FDE range, else 0."""
    img = elf_image(path)
    sym = symbol_at(path, vaddr)
    if sym is not None and sym.size:
        return sym.size
    r = _eh_frame_range(img, vaddr)
    if r is not None and r[0] == vaddr:
        return r[1]
    return 0


def function_containing(path: str | os.PathLike, vaddr: int) -> Symbol | None:
    """The function whose code contains VADDR: a sized FUNC symbol, else the .eh_frame FDE range
    (named ``?@0x...``); None when neither knows."""
    img = elf_image(path)
    best = None
    for s in img.symbols:
        if s.shndx and s.type == "STT_FUNC" and s.size and s.value <= vaddr < s.value + s.size:
            if best is None or _rank(s) < _rank(best):
                best = s
    if best is not None:
        return Symbol(best.name, best.value, best.size, "FUNC", False, vaddr_to_offset(img.path, best.value))
    r = _eh_frame_range(img, vaddr)
    if r is None:
        return None
    named = symbol_at(path, r[0])
    name = named.name if named is not None else "?@%#x" % r[0]
    return Symbol(name, r[0], r[1], "FUNC", False, vaddr_to_offset(img.path, r[0]))


def function_bytes(path: str | os.PathLike, sym: Symbol) -> bytes:
    """The bytes of a function (its VADDR .. + size; the FDE range when the symbol has no size)."""
    size = sym.size or function_size(path, sym.vaddr)
    if not size:
        raise AttachError("%s: the size of function %r at %#x is unknown" % (os.fspath(path), sym.name, sym.vaddr))
    return read_code(path, sym.vaddr, size)


# --- processes --------------------------------------------------------------------


@dataclass(frozen=True)
class Mapping:
    start: int
    end: int
    perms: str
    offset: int
    dev: tuple[int, int]
    inode: int
    path: str


def process_maps(pid: int) -> list[Mapping]:
    try:
        with open("/proc/%d/maps" % pid) as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise AttachError("cannot read /proc/%d/maps: %s" % (pid, e.strerror or e)) from None
    out = []
    for line in lines:
        parts = line.split(None, 5)
        if len(parts) < 5:
            continue
        a, b = parts[0].split("-")
        ma, mi = parts[3].split(":")
        out.append(Mapping(int(a, 16), int(b, 16), parts[1], int(parts[2], 16), (int(ma, 16), int(mi, 16)),
                           int(parts[4]), parts[5] if len(parts) == 6 else ""))
    return out


def module_load_bias(pid: int, path: str | os.PathLike) -> int:
    """The load bias of file PATH in process PID (run-time address − VADDR), matched by dev/inode."""
    path = os.fspath(path)
    img = elf_image(path)
    st = os.stat(path)
    dev = (os.major(st.st_dev), os.minor(st.st_dev))
    maps = [m for m in process_maps(pid) if m.inode == st.st_ino and m.dev == dev]
    if not maps:
        raise AttachError("%s is not mapped in process %d" % (path, pid))
    for m in maps:
        for s in img.segments:
            if s.offset & ~(PAGE - 1) == m.offset:
                return m.start - (s.vaddr & ~(PAGE - 1))
    raise AttachError("%s: no mapping in process %d matches a PT_LOAD segment" % (path, pid))


# --- IFUNC ------------------------------------------------------------------------

RTLD_LAZY = 0x1
RTLD_NOLOAD = 0x4


def resolve_ifunc(path: str | os.PathLike, name: str) -> Symbol:
    """The implementation this machine's processes run for IFUNC NAME of library PATH.

    The library is dlopen()ed in this process (RTLD_NOLOAD first: libc is always loaded), dlsym
    gives the address the resolver chose; minus this process's load bias it is the VADDR.  Its
    name/size come from .symtab when present, else the size from the .eh_frame FDE.
    """
    path = os.fspath(path)
    sym = resolve_symbol(path, name)
    if not sym.is_ifunc:
        return sym
    try:
        lib = ctypes.CDLL(path, mode=RTLD_LAZY | RTLD_NOLOAD)
    except OSError:
        try:
            lib = ctypes.CDLL(path, mode=RTLD_LAZY)
        except OSError as e:
            raise AttachError("%s: cannot dlopen to resolve IFUNC %r: %s" % (path, name, e)) from None
    base_name = name.split("@", 1)[0]
    try:
        addr = ctypes.cast(getattr(lib, base_name), ctypes.c_void_p).value
    except AttributeError:
        raise AttachError("%s: dlsym(%r) failed" % (path, base_name)) from None
    bias = module_load_bias(os.getpid(), path)
    vaddr = addr - bias
    impl = symbol_at(path, vaddr)
    if impl is not None:
        return impl
    size = function_size(path, vaddr)
    return Symbol("%s/impl@%#x" % (base_name, vaddr), vaddr, size, "FUNC", False, vaddr_to_offset(path, vaddr))


# --- whole targets ----------------------------------------------------------------


@dataclass(frozen=True)
class ProbeLocation:
    """Where a uprobe goes: file, VADDR, and the function it is in (None for a raw offset)."""

    path: str
    vaddr: int
    file_offset: int
    symbol: Symbol | None
    func_entry: bool  # the probe is at the first instruction of SYMBOL
    retprobe: bool


def resolve_uprobe(target: UprobeTarget | str, pid: int | None = None) -> ProbeLocation:
    """Resolve a ``uprobe/...`` target (or section name): library path, symbol (IFUNC to the
    implementation this machine runs), ``+offset``; a raw number is a file offset like libbpf's."""
    if isinstance(target, str):
        target = parse_target(target)
    if not isinstance(target, UprobeTarget):
        raise AttachError("%r is not a uprobe target" % (target,))
    path = find_library(target.binary, pid)
    raw = raw_offset(target.func)
    if target.func is None:
        raise AttachError("uprobe target %s names no function" % target.binary)
    if raw is not None:
        vaddr = offset_to_vaddr(path, raw + target.offset)
        return ProbeLocation(path, vaddr, raw + target.offset, symbol_at(path, vaddr), symbol_at(path, vaddr)
                             is not None, target.retprobe)
    sym = resolve_symbol(path, target.func)
    if sym.is_ifunc:
        sym = resolve_ifunc(path, target.func)
    if sym.kind not in ("FUNC", "IFUNC", "NOTYPE"):
        raise AttachError("%s: symbol %r is a %s, not a function" % (path, target.func, sym.kind))
    if sym.size and target.offset >= sym.size:
        raise AttachError("%s: offset %#x is past the end of %r (%d bytes)" % (path, target.offset, sym.name, sym.size))
    vaddr = sym.vaddr + target.offset
    return ProbeLocation(path, vaddr, vaddr_to_offset(path, vaddr), sym, target.offset == 0, target.retprobe)
