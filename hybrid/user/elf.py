"""Loading clang-compiled eBPF objects (``clang -O2 -g -target bpf``) into specs.

:func:`load_object_spec` reads an ELF object the way libbpf's
``bpf_object__open`` + relocation does and returns an :class:`ObjectSpec`:
plain frozen data that the runtime turns into shared-memory maps and
running programs.  Nothing is created or attached here.

What it does, in libbpf's order and with libbpf's conventions:

* programs: every global function symbol of an executable section is a
  program; its section name gives its kind, program type and attach target
  (:func:`parse_section_name`, libbpf's ``section_defs``);
* maps: the legacy ``maps`` section (``struct bpf_map_def``), BTF-defined
  maps in ``.maps`` (``__uint``/``__type``/``__array``, inner map templates
  and ``.values`` initial slots), one ARRAY map per global data section
  (``.data*``, ``.rodata*``, ``.bss*``) and a ``.kconfig`` map for
  ``__kconfig`` externs, in that order;
* CO-RE: ``.BTF.ext`` relocations resolved against the running kernel's BTF
  (:mod:`hybrid.user.core`); unsatisfiable ones poison their instruction;
* relocations: ``lddw`` of a map -> ``src=PSEUDO_MAP_IDX, imm=map index``;
  of global data -> ``src=PSEUDO_MAP_IDX_VALUE, imm=map index,
  imm_hi=offset``; of a function -> ``src=PSEUDO_FUNC`` with ``imm`` the
  slot offset of the function (like a local call); calls into ``.text``
  append the callee (transitively, each once, depth first, exactly like
  libbpf's ``bpf_object__reloc_code``) and fix the call's ``imm``.

Every problem raises :class:`~hybrid.errors.ElfError` (or
:class:`~hybrid.errors.BtfError` for BTF) naming the section, symbol,
instruction or offset; errors of pyelftools and of ``struct`` are
translated once, in :func:`load_object_spec`.
"""

from __future__ import annotations

import bisect
import gzip
import io
import logging
import os
import re
import struct
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from hybrid.errors import BtfError, DecodeError, ElfError, HybridError, MapError
from hybrid.user import isa
from hybrid.user.btf import (
    Array,
    Btf,
    BtfExt,
    Datasec,
    FuncInfo,
    FuncProto,
    Int,
    INT_BOOL,
    INT_SIGNED,
    Kind,
    LineInfo,
    Ptr,
    Struct,
    Var,
    VAR_GLOBAL_ALLOCATED,
    VAR_STATIC,
    AnyEnum,
    kernel_btf,
    parse_btf,
    parse_btf_ext,
)
from hybrid.user.core import CoreFailure, CoreResolver, apply_relos
from hybrid.user.mapspec import (
    BPF_F_MMAPABLE,
    BPF_F_RDONLY_PROG,
    BPF_MAP_TYPE_ARRAY,
    BPF_MAP_TYPE_ARRAY_OF_MAPS,
    BPF_MAP_TYPE_HASH_OF_MAPS,
    BPF_MAP_TYPE_PROG_ARRAY,
    PIN_BY_NAME,
    PIN_NONE,
    MapSpec,
)

log = logging.getLogger(__name__)

EM_BPF = 247
INSN = 8
BPF_OBJ_NAME_LEN = 16

# ELF constants
SHT_PROGBITS, SHT_SYMTAB, SHT_STRTAB, SHT_NOBITS, SHT_REL = 1, 2, 3, 8, 9
SHF_EXECINSTR = 0x4
STB_LOCAL, STB_GLOBAL, STB_WEAK = 0, 1, 2
STT_NOTYPE, STT_OBJECT, STT_FUNC, STT_SECTION = 0, 1, 2, 3
STV_HIDDEN, STV_INTERNAL = 2, 1
SHN_UNDEF, SHN_LORESERVE = 0, 0xFF00
R_BPF_64_64, R_BPF_64_ABS64, R_BPF_64_ABS32, R_BPF_64_NODYLD32, R_BPF_64_32 = 1, 2, 3, 4, 10

_SYM = struct.Struct("<IBBHQQ")
_REL = struct.Struct("<QQ")
_SLOT = struct.Struct("<BBhi")

MAX_DATA_SIZE = 4 << 20  # a global data map's value (the kernel's KMALLOC_MAX_SIZE on x86-64)
MAPS_SEC = ".maps"
LEGACY_MAPS_SEC = "maps"
KCONFIG_SEC = ".kconfig"
KSYMS_SEC = ".ksyms"


# --- attach targets ---------------------------------------------------------------


@dataclass(frozen=True)
class UprobeTarget:
    """``uprobe/<binary>:<func>[+<offset>]`` (also uretprobe, .s variants)."""

    binary: str
    func: str | None
    offset: int = 0
    retprobe: bool = False
    cookie: int = 0  # bpf_get_attach_cookie() (a libbpf attach's bpf_cookie; never from a section name)
    ref_ctr_offset: int = 0  # file offset of a USDT semaphore to count while attached (0: none)


@dataclass(frozen=True)
class UprobeMultiTarget:
    """``uprobe.multi/<binary>:<pattern>``."""

    binary: str
    pattern: str
    retprobe: bool = False


@dataclass(frozen=True)
class UsdtTarget:
    """``usdt/<binary>:<provider>:<name>``."""

    binary: str
    provider: str
    name: str


@dataclass(frozen=True)
class KprobeTarget:
    """``kprobe/<func>[+<offset>]``, ``kretprobe/<func>``."""

    func: str
    offset: int = 0
    retprobe: bool = False


@dataclass(frozen=True)
class KprobeMultiTarget:
    pattern: str
    retprobe: bool = False


@dataclass(frozen=True)
class KsyscallTarget:
    """``ksyscall/<syscall>``, ``kretsyscall/<syscall>``."""

    syscall: str
    retprobe: bool = False


@dataclass(frozen=True)
class TracepointTarget:
    """``tracepoint/<category>/<name>`` or ``tp/...``."""

    category: str
    name: str


@dataclass(frozen=True)
class RawTracepointTarget:
    """``raw_tp/<name>``, ``raw_tracepoint/<name>`` (and the ``.w`` writable forms)."""

    name: str


@dataclass(frozen=True)
class BtfTarget:
    """fentry/fexit/fmod_ret/tp_btf/lsm/iter/freplace: a function or hook named in BTF."""

    name: str


AttachTarget = (UprobeTarget | UprobeMultiTarget | UsdtTarget | KprobeTarget | KprobeMultiTarget | KsyscallTarget
                | TracepointTarget | RawTracepointTarget | BtfTarget)


# --- section names ---------------------------------------------------------------

SEC_SLEEPABLE = 1
SEC_ATTACH_BTF = 2
SEC_XDP_FRAGS = 4
SEC_USDT = 8

# libbpf's section_defs (libbpf.c), in order; first match wins.
# (pattern, kind, prog_type, expected_attach_type, flags, attach parser)
SECTION_DEFS: tuple[tuple[str, str, int, int, int, str | None], ...] = (
    ("socket", "socket", 1, 0, 0, None),
    ("sk_reuseport/migrate", "sk_reuseport/migrate", 21, 40, 0, None),
    ("sk_reuseport", "sk_reuseport", 21, 39, 0, None),
    ("kprobe+", "kprobe", 2, 0, 0, "kprobe"),
    ("uprobe+", "uprobe", 2, 0, 0, "uprobe"),
    ("uprobe.s+", "uprobe", 2, 0, SEC_SLEEPABLE, "uprobe"),
    ("kretprobe+", "kretprobe", 2, 0, 0, "kprobe"),
    ("uretprobe+", "uretprobe", 2, 0, 0, "uprobe"),
    ("uretprobe.s+", "uretprobe", 2, 0, SEC_SLEEPABLE, "uprobe"),
    ("kprobe.multi+", "kprobe.multi", 2, 42, 0, "kprobe_multi"),
    ("kretprobe.multi+", "kretprobe.multi", 2, 42, 0, "kprobe_multi"),
    ("uprobe.multi+", "uprobe.multi", 2, 48, 0, "uprobe_multi"),
    ("uretprobe.multi+", "uretprobe.multi", 2, 48, 0, "uprobe_multi"),
    ("uprobe.multi.s+", "uprobe.multi", 2, 48, SEC_SLEEPABLE, "uprobe_multi"),
    ("uretprobe.multi.s+", "uretprobe.multi", 2, 48, SEC_SLEEPABLE, "uprobe_multi"),
    ("ksyscall+", "ksyscall", 2, 0, 0, "ksyscall"),
    ("kretsyscall+", "kretsyscall", 2, 0, 0, "ksyscall"),
    ("usdt+", "usdt", 2, 0, SEC_USDT, "usdt"),
    ("usdt.s+", "usdt", 2, 0, SEC_USDT | SEC_SLEEPABLE, "usdt"),
    ("tc/ingress", "tc/ingress", 3, 46, 0, None),
    ("tc/egress", "tc/egress", 3, 47, 0, None),
    ("tcx/ingress", "tcx/ingress", 3, 46, 0, None),
    ("tcx/egress", "tcx/egress", 3, 47, 0, None),
    ("tc", "tc", 3, 0, 0, None),
    ("classifier", "classifier", 3, 0, 0, None),
    ("action", "action", 4, 0, 0, None),
    ("netkit/primary", "netkit/primary", 3, 54, 0, None),
    ("netkit/peer", "netkit/peer", 3, 55, 0, None),
    ("tracepoint+", "tracepoint", 5, 0, 0, "tp"),
    ("tp+", "tracepoint", 5, 0, 0, "tp"),
    ("raw_tracepoint+", "raw_tracepoint", 17, 0, 0, "raw_tp"),
    ("raw_tp+", "raw_tracepoint", 17, 0, 0, "raw_tp"),
    ("raw_tracepoint.w+", "raw_tracepoint.w", 24, 0, 0, "raw_tp"),
    ("raw_tp.w+", "raw_tracepoint.w", 24, 0, 0, "raw_tp"),
    ("tp_btf+", "tp_btf", 26, 23, SEC_ATTACH_BTF, "btf"),
    ("fentry+", "fentry", 26, 24, SEC_ATTACH_BTF, "btf"),
    ("fmod_ret+", "fmod_ret", 26, 26, SEC_ATTACH_BTF, "btf"),
    ("fexit+", "fexit", 26, 25, SEC_ATTACH_BTF, "btf"),
    ("fentry.s+", "fentry", 26, 24, SEC_ATTACH_BTF | SEC_SLEEPABLE, "btf"),
    ("fmod_ret.s+", "fmod_ret", 26, 26, SEC_ATTACH_BTF | SEC_SLEEPABLE, "btf"),
    ("fexit.s+", "fexit", 26, 25, SEC_ATTACH_BTF | SEC_SLEEPABLE, "btf"),
    ("freplace+", "freplace", 28, 0, SEC_ATTACH_BTF, "btf"),
    ("lsm+", "lsm", 29, 27, SEC_ATTACH_BTF, "btf"),
    ("lsm.s+", "lsm", 29, 27, SEC_ATTACH_BTF | SEC_SLEEPABLE, "btf"),
    ("lsm_cgroup+", "lsm_cgroup", 29, 43, SEC_ATTACH_BTF, "btf"),
    ("iter+", "iter", 26, 28, SEC_ATTACH_BTF, "btf"),
    ("iter.s+", "iter", 26, 28, SEC_ATTACH_BTF | SEC_SLEEPABLE, "btf"),
    ("syscall", "syscall", 31, 0, SEC_SLEEPABLE, None),
    ("xdp.frags/devmap", "xdp/devmap", 6, 33, SEC_XDP_FRAGS, None),
    ("xdp/devmap", "xdp/devmap", 6, 33, 0, None),
    ("xdp.frags/cpumap", "xdp/cpumap", 6, 35, SEC_XDP_FRAGS, None),
    ("xdp/cpumap", "xdp/cpumap", 6, 35, 0, None),
    ("xdp.frags", "xdp", 6, 37, SEC_XDP_FRAGS, None),
    ("xdp", "xdp", 6, 37, 0, None),
    ("perf_event", "perf_event", 7, 0, 0, None),
    ("lwt_in", "lwt_in", 10, 0, 0, None),
    ("lwt_out", "lwt_out", 11, 0, 0, None),
    ("lwt_xmit", "lwt_xmit", 12, 0, 0, None),
    ("lwt_seg6local", "lwt_seg6local", 19, 0, 0, None),
    ("sockops", "sockops", 13, 3, 0, None),
    ("sk_skb/stream_parser", "sk_skb/stream_parser", 14, 4, 0, None),
    ("sk_skb/stream_verdict", "sk_skb/stream_verdict", 14, 5, 0, None),
    ("sk_skb", "sk_skb", 14, 0, 0, None),
    ("sk_msg", "sk_msg", 16, 7, 0, None),
    ("lirc_mode2", "lirc_mode2", 20, 16, 0, None),
    ("flow_dissector", "flow_dissector", 22, 17, 0, None),
    ("cgroup_skb/ingress", "cgroup_skb/ingress", 8, 0, 0, None),
    ("cgroup_skb/egress", "cgroup_skb/egress", 8, 1, 0, None),
    ("cgroup/skb", "cgroup/skb", 8, 0, 0, None),
    ("cgroup/sock_create", "cgroup/sock_create", 9, 2, 0, None),
    ("cgroup/sock_release", "cgroup/sock_release", 9, 34, 0, None),
    ("cgroup/sock", "cgroup/sock", 9, 2, 0, None),
    ("cgroup/post_bind4", "cgroup/post_bind4", 9, 12, 0, None),
    ("cgroup/post_bind6", "cgroup/post_bind6", 9, 13, 0, None),
    ("cgroup/bind4", "cgroup/bind4", 18, 8, 0, None),
    ("cgroup/bind6", "cgroup/bind6", 18, 9, 0, None),
    ("cgroup/connect4", "cgroup/connect4", 18, 10, 0, None),
    ("cgroup/connect6", "cgroup/connect6", 18, 11, 0, None),
    ("cgroup/connect_unix", "cgroup/connect_unix", 18, 49, 0, None),
    ("cgroup/sendmsg4", "cgroup/sendmsg4", 18, 14, 0, None),
    ("cgroup/sendmsg6", "cgroup/sendmsg6", 18, 15, 0, None),
    ("cgroup/sendmsg_unix", "cgroup/sendmsg_unix", 18, 50, 0, None),
    ("cgroup/recvmsg4", "cgroup/recvmsg4", 18, 19, 0, None),
    ("cgroup/recvmsg6", "cgroup/recvmsg6", 18, 20, 0, None),
    ("cgroup/recvmsg_unix", "cgroup/recvmsg_unix", 18, 51, 0, None),
    ("cgroup/getpeername4", "cgroup/getpeername4", 18, 29, 0, None),
    ("cgroup/getpeername6", "cgroup/getpeername6", 18, 30, 0, None),
    ("cgroup/getpeername_unix", "cgroup/getpeername_unix", 18, 52, 0, None),
    ("cgroup/getsockname4", "cgroup/getsockname4", 18, 31, 0, None),
    ("cgroup/getsockname6", "cgroup/getsockname6", 18, 32, 0, None),
    ("cgroup/getsockname_unix", "cgroup/getsockname_unix", 18, 53, 0, None),
    ("cgroup/sysctl", "cgroup/sysctl", 23, 18, 0, None),
    ("cgroup/getsockopt", "cgroup/getsockopt", 25, 21, 0, None),
    ("cgroup/setsockopt", "cgroup/setsockopt", 25, 22, 0, None),
    ("cgroup/dev", "cgroup/dev", 15, 6, 0, None),
    ("struct_ops+", "struct_ops", 27, 0, 0, None),
    ("struct_ops.s+", "struct_ops", 27, 0, SEC_SLEEPABLE, None),
    ("sk_lookup", "sk_lookup", 30, 36, 0, None),
    ("netfilter", "netfilter", 32, 45, 0, None),
)


@dataclass(frozen=True)
class SectionInfo:
    """What a program's ELF section name says (``SEC("...")``)."""

    section: str  # without a leading '?'
    kind: str  # "uprobe", "tracepoint", ..., "unknown"
    prog_type: int = 0  # enum bpf_prog_type; 0 (unspec) for unknown sections
    expected_attach_type: int = 0
    sleepable: bool = False
    autoload: bool = True  # False for SEC("?...")
    attach: AttachTarget | None = None  # None: no target in the name (attach manually), or invalid
    attach_error: str = ""  # why the name's target is invalid (libbpf fails auto-attach with it)


def _sec_def_matches(pattern: str, name: str) -> bool:
    if pattern.endswith("/"):
        return name.startswith(pattern)
    if pattern.endswith("+"):
        p = pattern[:-1]
        return name == p or name.startswith(p + "/")
    return name == pattern


def _c_long(text: str) -> int:
    """``%li`` / ``strtol(s, 0)``: decimal, 0x hex, 0 octal, optional sign."""
    m = re.fullmatch(r"([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)", text)
    if not m:
        raise ValueError(text)
    digits = m.group(2)
    if digits[:2].lower() == "0x":
        v = int(digits, 16)
    elif digits.startswith("0"):
        v = int(digits, 8)
    else:
        v = int(digits)
    return -v if m.group(1) == "-" else v


def _attach(handler: str, kind: str, sec: str) -> tuple[AttachTarget | None, str]:
    """The attach target of a section name, libbpf's ``attach_*`` parsers; (None, "") for manual."""
    head, slash, rest = sec.partition("/")
    if not slash:
        if handler == "btf":
            return None, "section %r names no attach target (%s/<function>)" % (sec, kind)
        return None, ""  # bare SEC("uprobe"), SEC("tp"), ...: attach by hand
    retprobe = kind.startswith(("kret", "uret"))
    if handler == "kprobe":
        m = re.fullmatch(r"([a-zA-Z0-9_.]+)(?:\+(.+))?", rest)
        if not m:
            return None, "kprobe target %r is invalid" % rest
        try:
            off = _c_long(m.group(2)) if m.group(2) else 0
        except ValueError:
            return None, "kprobe target %r has an invalid offset" % rest
        if retprobe and off:
            return None, "kretprobes do not support an offset (%r)" % rest
        return KprobeTarget(m.group(1), off, retprobe), ""
    if handler == "uprobe":
        binary, colon, func = rest.partition(":")
        if not binary or not colon or not func:
            return None, "invalid uprobe section %r: expected %s/<binary>:<function>[+<offset>]" % (sec, head)
        func = func.split("\n", 1)[0]
        off = 0
        plus = func.rfind("+")
        if plus >= 0:
            try:
                off = _c_long(func[plus + 1:])
            except ValueError:
                return None, "uprobe section %r has an invalid offset %r" % (sec, func[plus:])
            func = func[:plus]
        if retprobe and off:
            return None, "uretprobes do not support an offset (%r)" % sec
        return UprobeTarget(binary, func or None, off, retprobe), ""
    if handler == "uprobe_multi":
        binary, colon, pattern = rest.partition(":")
        if not binary or not colon or not pattern:
            return None, "invalid section %r: expected %s/<binary>:<pattern>" % (sec, head)
        return UprobeMultiTarget(binary, pattern, retprobe), ""
    if handler == "kprobe_multi":
        return KprobeMultiTarget(rest, retprobe), ""
    if handler == "ksyscall":
        return (KsyscallTarget(rest, retprobe), "") if rest else (None, "empty syscall name in %r" % sec)
    if handler == "usdt":
        parts = rest.split(":")
        if len(parts) != 3 or not all(parts):
            return None, "invalid USDT section %r: expected usdt/<binary>:<provider>:<name>" % sec
        return UsdtTarget(*parts), ""
    if handler == "tp":
        cat, slash2, name = rest.partition("/")
        if not slash2 or not cat or not name:
            return None, "invalid tracepoint section %r: expected %s/<category>/<name>" % (sec, head)
        return TracepointTarget(cat, name), ""
    if handler == "raw_tp":
        return (RawTracepointTarget(rest), "") if rest else (None, "empty raw tracepoint name in %r" % sec)
    if handler == "btf":
        return (BtfTarget(rest), "") if rest else (None, "empty attach target in %r" % sec)
    return None, ""


def parse_section_name(sec: str) -> SectionInfo:
    """Kind, program type and attach target of a program section (libbpf ``find_sec_def``)."""
    autoload = True
    if sec.startswith("?"):
        autoload, sec = False, sec[1:]
    for pattern, kind, ptype, atype, flags, handler in SECTION_DEFS:
        if _sec_def_matches(pattern, sec):
            target, error = _attach(handler, kind, sec) if handler else (None, "")
            return SectionInfo(sec, kind, ptype, atype, bool(flags & SEC_SLEEPABLE), autoload, target, error)
    return SectionInfo(sec, "unknown", autoload=autoload,
                       attach_error="unrecognized section name %r: no program type" % sec)


# --- specs -----------------------------------------------------------------------


@dataclass(frozen=True)
class ProgramSpec:
    """One program: its instructions with every called ``.text`` subprogram appended.

    ``insns`` are relocated (maps: ``PSEUDO_MAP_IDX`` / ``PSEUDO_MAP_IDX_VALUE``
    with ``imm`` an index into ``ObjectSpec.maps``; functions:
    ``PSEUDO_FUNC``; calls fixed) and CO-RE-patched.  ``core_failures``
    lists the poisoned instructions (``call 0xbad2310``) with their slot in
    this program and the message to report if one is reached.
    ``func_info``/``line_info`` are BTF.ext records moved to this program
    (``insn_off`` = slot * 8).  ``subprograms`` names the appended ``.text``
    functions and the slot each starts at.
    """

    name: str
    section: str
    kind: str
    attach: AttachTarget | None
    insns: tuple[isa.Insn, ...]
    license: str
    prog_type: int = 0
    expected_attach_type: int = 0
    sleepable: bool = False
    autoload: bool = True
    attach_error: str = ""
    core_failures: tuple[CoreFailure, ...] = ()
    func_info: tuple[FuncInfo, ...] = ()
    line_info: tuple[LineInfo, ...] = ()
    subprograms: tuple[tuple[str, int], ...] = ()
    btf_func_type_id: int = 0

    @property
    def code(self) -> bytes:
        return isa.encode(self.insns)

    def disasm(self) -> str:
        return isa.disasm(self.insns)

    def core_failure_at(self, slot: int) -> CoreFailure | None:
        for f in self.core_failures:
            if f.insn == slot:
                return f
        return None


@dataclass(frozen=True)
class GlobalVar:
    """A global (or static) variable of a global data section: where it lives in which map."""

    name: str
    section: str  # ".data", ".rodata", ".bss", ".data.custom", ...
    map_index: int  # index in ObjectSpec.maps
    offset: int
    size: int
    type_id: int = 0  # BTF type of the variable (0: no BTF)
    linkage: str = "global"  # "global", "static"
    readonly: bool = False  # in .rodata: a `const volatile` set before load


@dataclass(frozen=True)
class ExternSpec:
    """A ``__kconfig`` extern and the value the loader gave it."""

    name: str
    kind: str  # "bool", "tristate", "char", "int", "char_array"
    type_id: int
    offset: int  # in the .kconfig map
    size: int
    weak: bool
    value: Any  # the Python value (int, bool or str); None if unresolved weak (zero)
    map_index: int = -1


@dataclass(frozen=True)
class ObjectSpec:
    name: str
    license: str
    kern_version: int
    programs: tuple[ProgramSpec, ...]
    maps: tuple[MapSpec, ...]
    btf: Btf | None = field(default=None, compare=False, repr=False)
    variables: tuple[GlobalVar, ...] = ()
    externs: tuple[ExternSpec, ...] = ()
    btf_ext: BtfExt | None = field(default=None, compare=False, repr=False)
    core_target: str = ""  # what CO-RE relocations were resolved against ("" if none)

    def program(self, name: str) -> ProgramSpec:
        for p in self.programs:
            if p.name == name:
                return p
        raise KeyError("object %r has no program %r (programs: %s)"
                       % (self.name, name, ", ".join(p.name for p in self.programs) or "none"))

    def map_index(self, name: str) -> int:
        for i, m in enumerate(self.maps):
            if m.name == name:
                return i
        raise KeyError("object %r has no map %r (maps: %s)"
                       % (self.name, name, ", ".join(m.name for m in self.maps) or "none"))

    def map(self, name: str) -> MapSpec:
        return self.maps[self.map_index(name)]

    def variable(self, name: str) -> GlobalVar:
        found = [v for v in self.variables if v.name == name]
        if not found:
            raise KeyError("object %r has no global variable %r" % (self.name, name))
        return found[0]

    def with_values(self, **values: int | bytes) -> "ObjectSpec":
        """A copy with global variables set before load, like a libbpf skeleton's
        ``skel->rodata->x = v``: ``spec.with_values(target_pid=42)``.

        An int is stored little-endian in the variable's size (negative
        values in two's complement); bytes must have exactly that size.
        """
        maps = list(self.maps)
        for name, value in values.items():
            try:
                var = self.variable(name)
            except KeyError as e:
                raise ElfError(str(e.args[0])) from None
            if isinstance(value, bool):
                value = int(value)
            if isinstance(value, int):
                if not -(1 << (8 * var.size - 1)) <= value < 1 << (8 * var.size):
                    raise ElfError("value %d does not fit variable %r (%d bytes)" % (value, name, var.size))
                data = (value & ((1 << (8 * var.size)) - 1)).to_bytes(var.size, "little")
            elif isinstance(value, (bytes, bytearray, memoryview)):
                data = bytes(value)
                if len(data) != var.size:
                    raise ElfError("variable %r has %d bytes, value has %d" % (name, var.size, len(data)))
            else:
                raise ElfError("value of %r must be int or bytes, not %s" % (name, type(value).__name__))
            m = maps[var.map_index]
            init = bytearray(m.initial or bytes(m.value_size))
            init[var.offset:var.offset + var.size] = data
            maps[var.map_index] = replace(m, initial=bytes(init))
        return replace(self, maps=tuple(maps))


# --- kernel config (for __kconfig externs) --------------------------------------------

_kconfig_cache: dict[str, dict[str, str]] = {}


def read_kernel_config(path: str | None = None) -> dict[str, str]:
    """``CONFIG_*`` values of the running kernel: ``/boot/config-$(uname -r)``, else ``/proc/config.gz``.

    Values are the raw right-hand sides ("y", "m", "\\"str\\"", "100");
    ``# CONFIG_X is not set`` gives "n".  Empty dict if neither file exists.
    """
    paths = [path] if path else ["/boot/config-%s" % os.uname().release, "/proc/config.gz"]
    for p in paths:
        if p in _kconfig_cache:
            return _kconfig_cache[p]
        try:
            with open(p, "rb") as f:
                raw = f.read()
        except OSError:
            continue
        if p.endswith(".gz"):
            try:
                raw = gzip.decompress(raw)
            except (OSError, EOFError):
                continue
        out: dict[str, str] = {}
        for line in raw.decode("utf-8", "replace").splitlines():
            line = line.strip()
            m = re.fullmatch(r"# (CONFIG_\w+) is not set", line)
            if m:
                out[m.group(1)] = "n"
            elif line.startswith("CONFIG_") and "=" in line:
                k, _, v = line.partition("=")
                out[k] = v
        _kconfig_cache[p] = out
        return out
    return {}


def kernel_version() -> int:
    """``LINUX_KERNEL_VERSION`` as libbpf computes it (Ubuntu's version_signature, else uname)."""

    def kv(a: int, b: int, c: int) -> int:
        return (a << 16) + (b << 8) + min(c, 255)

    try:
        with open("/proc/version_signature") as f:
            m = re.match(r"\S+ \S+ (\d+)\.(\d+)\.(\d+)", f.read())
            if m:
                return kv(*map(int, m.groups()))
    except OSError:
        pass
    m = re.match(r"(\d+)\.(\d+)\.(\d+)", os.uname().release)
    return kv(*map(int, m.groups())) if m else 0


# --- the loader ----------------------------------------------------------------------


@dataclass
class _Sec:
    idx: int
    name: str
    type: int
    flags: int
    offset: int
    size: int
    link: int
    info: int
    entsize: int


@dataclass
class _Sym:
    idx: int
    name: str
    value: int
    size: int
    bind: int
    type: int
    shndx: int
    visibility: int


@dataclass
class _Func:
    name: str
    sec: int
    start: int  # slot in the section
    count: int  # slots
    sym: _Sym


@dataclass
class _Relo:
    type: str  # "call", "subprog", "map", "data", "extern"
    insn: int  # slot in the section
    sym: _Sym
    map_idx: int = -1
    sym_off: int = 0
    ext: "_Extern | None" = None


@dataclass
class _Extern:
    name: str
    sym: _Sym
    type_id: int
    kind: str
    size: int
    align: int
    weak: bool
    signed: bool = False
    offset: int = 0
    value: Any = None


@dataclass
class _MapDef:
    """A map under construction (MapSpec is frozen)."""

    name: str
    sec: int
    offset: int  # in its section
    size: int
    kwargs: dict
    btf_var: int = 0  # VAR type id for .maps entries
    libbpf_type: str = ""  # "", "data", "rodata", "bss", "kconfig"
    values: dict = field(default_factory=dict)


_KCFG_KINDS = ("bool", "tristate", "char", "int", "char_array")


class _Loader:
    def __init__(self, data: bytes, name: str, target_btf, kconfig: Mapping[str, Any] | None):
        self.data = data
        self.name = name
        self.target_arg = target_btf
        self.kconfig_override = dict(kconfig or {})
        self.where = "ELF header"
        self._record_index: dict = {}

    def err(self, what: str) -> ElfError:
        return ElfError("%s: %s" % (self.name, what))

    # ..... ELF structure .......................................................

    def read_elf(self) -> None:
        from elftools.elf.elffile import ELFFile

        d = self.data
        if len(d) < 64:
            raise self.err("truncated ELF header: %d bytes, need 64" % len(d))
        if d[:4] != b"\x7fELF":
            raise self.err("not an ELF file (magic %r)" % d[:4])
        if d[4] != 2:
            raise self.err("not a 64-bit ELF object (EI_CLASS %d); eBPF objects are ELF64" % d[4])
        if d[5] != 1:
            raise self.err("big-endian ELF objects are not supported (EI_DATA %d)" % d[5])
        elf = ELFFile(io.BytesIO(d))
        h = elf.header
        if h["e_type"] != "ET_REL":
            raise self.err("not a relocatable object (e_type %s); expected the output of clang -c" % h["e_type"])
        machine = h["e_machine"]
        if machine not in ("EM_BPF", "EM_NONE", EM_BPF, 0):
            raise self.err("not an eBPF object (e_machine %s)" % machine)
        shoff, shnum, shentsize = h["e_shoff"], h["e_shnum"], h["e_shentsize"]
        if shnum == 0:
            raise self.err("no section headers")
        if shentsize != 64:
            raise self.err("section header size %d, expected 64" % shentsize)
        if shoff + shnum * 64 > len(d):
            raise self.err("section header table (offset %#x, %d entries) extends past the end of the file "
                           "(%d bytes): truncated?" % (shoff, shnum, len(d)))
        shstrndx = h["e_shstrndx"]
        if not 0 < shstrndx < shnum:
            raise self.err("section name table index %d out of range" % shstrndx)
        raw = []
        for i in range(shnum):
            name_off, typ, flags, _addr, off, size, link, info, _align, entsize = struct.unpack_from(
                "<IIQQQQIIQQ", d, shoff + 64 * i)
            raw.append((name_off, typ, flags, off, size, link, info, entsize))
        strtab = raw[shstrndx]
        if strtab[1] != SHT_STRTAB or strtab[3] + strtab[4] > len(d):
            raise self.err("section name table (section #%d) is not a valid string table" % shstrndx)
        names = d[strtab[3]:strtab[3] + strtab[4]]
        self.secs: list[_Sec] = []
        for i, (name_off, typ, flags, off, size, link, info, entsize) in enumerate(raw):
            if name_off >= len(names) and i:
                raise self.err("section #%d: name offset %d outside the section name table" % (i, name_off))
            end = names.find(b"\0", name_off)
            nm = names[name_off:end if end >= 0 else len(names)].decode("utf-8", "replace") if i else ""
            if i and typ != SHT_NOBITS and off + size > len(d):
                raise self.err("section %r (#%d): contents (offset %#x, %d bytes) extend past the end of the "
                               "file (%d bytes): truncated?" % (nm, i, off, size, len(d)))
            self.secs.append(_Sec(i, nm, typ, flags, off, size, link, info, entsize))
        self.by_name = {}
        for s in self.secs[1:]:
            self.by_name.setdefault(s.name, s)

    def sec_data(self, sec: _Sec) -> bytes:
        if sec.type == SHT_NOBITS:
            return bytes(sec.size)
        return self.data[sec.offset:sec.offset + sec.size]

    def sec_name(self, idx: int) -> str:
        if 0 < idx < len(self.secs):
            return self.secs[idx].name
        return {0: "UND", 0xFFF1: "ABS", 0xFFF2: "COMMON"}.get(idx, "#%d" % idx)

    def read_symbols(self) -> None:
        tabs = [s for s in self.secs if s.type == SHT_SYMTAB]
        if not tabs:
            raise self.err("no symbol table (stripped object?)")
        if len(tabs) > 1:
            raise self.err("more than one symbol table")
        tab = tabs[0]
        self.where = "section %r (symbol table)" % tab.name
        if tab.entsize != _SYM.size or tab.size % _SYM.size:
            raise self.err("symbol table: entry size %d, size %d (expected %d-byte entries)"
                           % (tab.entsize, tab.size, _SYM.size))
        if not 0 < tab.link < len(self.secs) or self.secs[tab.link].type != SHT_STRTAB:
            raise self.err("symbol table: string table section #%d is not a string table" % tab.link)
        self.symtab_idx = tab.idx
        strs = self.sec_data(self.secs[tab.link])
        raw = self.sec_data(tab)
        self.syms: list[_Sym] = []
        for i in range(len(raw) // _SYM.size):
            name_off, info, other, shndx, value, size = _SYM.unpack_from(raw, i * _SYM.size)
            if name_off >= max(len(strs), 1) and name_off:
                raise self.err("symbol #%d: name offset %d outside the string table" % (i, name_off))
            end = strs.find(b"\0", name_off)
            name = strs[name_off:end if end >= 0 else len(strs)].decode("utf-8", "replace")
            if info & 0xF == STT_SECTION and not name and 0 < shndx < len(self.secs):
                name = self.secs[shndx].name
            self.syms.append(_Sym(i, name, value, size, info >> 4, info & 0xF, shndx, other & 0x3))
        self.syms_by_sec: dict[int, list[_Sym]] = {}
        self.sym_by_name: dict[tuple[int, str], _Sym] = {}
        for sym in self.syms:
            self.syms_by_sec.setdefault(sym.shndx, []).append(sym)
            if sym.type != STT_SECTION:
                self.sym_by_name.setdefault((sym.shndx, sym.name), sym)

    def read_license_version(self) -> None:
        self.license = ""
        self.kern_version = 0
        sec = self.by_name.get("license")
        if sec is not None:
            raw = self.sec_data(sec)
            self.license = raw.split(b"\0", 1)[0][:63].decode("utf-8", "replace")
        sec = self.by_name.get("version")
        if sec is not None:
            raw = self.sec_data(sec)
            if len(raw) != 4:
                raise self.err("section 'version' has %d bytes, expected 4" % len(raw))
            self.kern_version = struct.unpack("<I", raw)[0]

    def read_btf(self) -> None:
        self.btf: Btf | None = None
        self.btf_ext: BtfExt | None = None
        sec = self.by_name.get(".BTF")
        if sec is not None:
            self.where = "section '.BTF'"
            self.btf = parse_btf(self.sec_data(sec), name="%s: .BTF" % self.name)
        sec = self.by_name.get(".BTF.ext")
        if sec is not None and self.btf is not None:
            self.where = "section '.BTF.ext'"
            self.btf_ext = parse_btf_ext(self.sec_data(sec), self.btf, name="%s: .BTF.ext" % self.name)

    # ..... programs ..............................................................

    def collect_code(self) -> None:
        text = self.by_name.get(".text")
        self.text_idx = text.idx if text is not None and text.flags & SHF_EXECINSTR else -1
        self.slots: dict[int, list[list[int]]] = {}  # exec section -> raw slots [code, dst, src, off, imm]
        self.funcs: dict[int, list[_Func]] = {}
        for sec in self.secs:
            if sec.type != SHT_PROGBITS or not sec.flags & SHF_EXECINSTR or sec.size == 0:
                continue
            self.where = "section %r" % sec.name
            raw = self.sec_data(sec)
            if len(raw) % INSN:
                raise self.err("section %r: size %d is not a multiple of %d" % (sec.name, len(raw), INSN))
            slots = []
            for i in range(len(raw) // INSN):
                code, regs, off, imm = _SLOT.unpack_from(raw, i * INSN)
                slots.append([code, regs & 0xF, regs >> 4, off, imm])
            self.slots[sec.idx] = slots
            self.funcs[sec.idx] = []
        for sym in self.syms:
            if sym.type != STT_FUNC or sym.shndx not in self.slots:
                continue
            sec = self.secs[sym.shndx]
            self.where = "section %r, function %r" % (sec.name, sym.name)
            if not sym.name:
                raise self.err("section %r: function symbol #%d has no name" % (sec.name, sym.idx))
            if sym.value % INSN or sym.size % INSN or sym.value + sym.size > sec.size:
                raise self.err("section %r: function %r at offset %d, size %d crosses the section boundary "
                               "(%d bytes) or is misaligned" % (sec.name, sym.name, sym.value, sym.size, sec.size))
            if sym.size == 0:
                raise self.err("section %r: function %r has size 0" % (sec.name, sym.name))
            if sec.idx != self.text_idx and sym.bind == STB_LOCAL:
                raise self.err("section %r: program %r is static, which libbpf does not support "
                               "(remove 'static' or put it in .text)" % (sec.name, sym.name))
            self.funcs[sec.idx].append(_Func(sym.name, sec.idx, sym.value // INSN, sym.size // INSN, sym))
        self.func_starts: dict[int, list[int]] = {}
        self.text_funcs: dict[int, _Func] = {}
        for sec_idx, fl in self.funcs.items():
            fl.sort(key=lambda f: f.start)
            self.func_starts[sec_idx] = [f.start for f in fl]
        for f in self.funcs.get(self.text_idx, ()):
            self.text_funcs.setdefault(f.start, f)

    def func_at(self, sec: int, slot: int) -> _Func | None:
        """The function whose code holds ``slot`` (the last one starting at or before it)."""
        starts = self.func_starts.get(sec)
        if not starts:
            return None
        i = bisect.bisect_right(starts, slot) - 1
        if i < 0:
            return None
        f = self.funcs[sec][i]  # functions do not overlap (libbpf's find_prog_by_sec_insn assumes it too)
        return f if slot < f.start + f.count else None

    # ..... externs ...............................................................

    def collect_externs(self) -> None:
        """``__kconfig`` externs (``.kconfig`` DATASEC), laid out like libbpf's ``bpf_object__collect_externs``."""
        self.externs: dict[int, _Extern] = {}  # symbol index -> extern
        self.kcfg: list[_Extern] = []
        btf = self.btf
        for sym in self.syms:
            if not (sym.shndx == SHN_UNDEF and sym.bind in (STB_GLOBAL, STB_WEAK) and sym.type == STT_NOTYPE
                    and sym.name):
                continue
            self.where = "extern %r" % sym.name
            if btf is None:
                continue  # reported if a relocation uses it
            var, sec = self.find_extern_btf(sym.name)
            if var is None:
                continue
            if sec == KSYMS_SEC:
                if sym.bind == STB_WEAK:
                    continue  # reported if used
                raise self.err("extern %r is a __ksym (kernel symbol or kfunc), which userspace programs "
                               "cannot use" % sym.name)
            if sec != KCONFIG_SEC:
                continue
            if not isinstance(var, Var):
                raise self.err("extern (kcfg) %r is not a variable" % sym.name)
            kind, signed = self.kcfg_kind(var.type)
            if kind is None:
                raise self.err("extern (kcfg) %r: type %s is unsupported (use bool, char, an integer, "
                               "enum libbpf_tristate or a char array)" % (sym.name, btf.describe(var.type)))
            size, align = btf.size_of(var.type), btf.align_of(var.type)
            ext = _Extern(sym.name, sym, var.type, kind, size, align, sym.bind == STB_WEAK, signed)
            self.externs[sym.idx] = ext
            self.kcfg.append(ext)
        self.kcfg.sort(key=lambda e: (-e.align, e.size, e.name))
        off = 0
        for e in self.kcfg:
            e.offset = (off + e.align - 1) // e.align * e.align
            off = e.offset + e.size
        self.kcfg_size = off
        if off > MAX_DATA_SIZE:
            raise self.err("__kconfig externs need %d bytes, more than the %d a map value may have"
                           % (off, MAX_DATA_SIZE))
        if self.kcfg:
            self.resolve_kconfig()

    def find_extern_btf(self, name: str):
        btf = self.btf
        assert btf is not None
        if not hasattr(self, "_datasec_of"):
            self._datasec_of: dict[int, str] = {}
            for ds in btf:
                if isinstance(ds, Datasec):
                    for v in ds.vars:
                        self._datasec_of.setdefault(v.type, ds.name)
        for tid in btf.ids_by_name(name):
            t = btf[tid]
            if t.KIND in (Kind.VAR, Kind.FUNC):
                return t, self._datasec_of.get(tid, "")
        return None, ""

    def kcfg_kind(self, tid: int, depth: int = 0) -> tuple[str | None, bool]:
        btf = self.btf
        assert btf is not None
        t = btf.resolve(tid)
        if isinstance(t, Int):
            if t.encoding & INT_BOOL:
                return ("bool" if t.size == 1 else None), False
            signed = bool(t.encoding & INT_SIGNED)
            if t.size == 1:
                return "char", signed
            if t.size not in (2, 4, 8):
                return None, False
            return "int", signed
        if isinstance(t, AnyEnum):
            return ("tristate" if t.name == "libbpf_tristate" and t.size == 4 else None), False
        if isinstance(t, Array) and depth == 0:
            if t.nelems == 0 or self.kcfg_kind(t.type, 1)[0] != "char":
                return None, False
            return "char_array", False
        return None, False

    def resolve_kconfig(self) -> None:
        """Values of the kconfig externs (libbpf ``bpf_object__resolve_externs``)."""
        config = None
        for e in self.kcfg:
            self.where = "extern (kcfg) %r" % e.name
            if e.name in self.kconfig_override:
                e.value = self.kcfg_value(e, self.kconfig_override[e.name])
                continue
            if e.name.startswith("CONFIG_"):
                if config is None:
                    config = read_kernel_config()
                raw = config.get(e.name)
                if raw is None:
                    if not e.weak:
                        raise self.err("extern (kcfg) %r: not set in the kernel config (strong extern; "
                                       "declare it __weak to default to 0)" % e.name)
                    continue
                e.value = self.kcfg_value(e, raw)
            elif e.name == "LINUX_KERNEL_VERSION":
                e.value = self.kcfg_value(e, kernel_version())
            elif e.name == "LINUX_HAS_BPF_COOKIE":
                e.value = self.kcfg_value(e, 1)
            elif e.name == "LINUX_HAS_SYSCALL_WRAPPER":
                e.value = self.kcfg_value(e, 1 if os.uname().machine in ("x86_64", "aarch64", "s390x") else 0)
            elif e.name.startswith("LINUX_") and e.weak:
                e.value = self.kcfg_value(e, 0)
            else:
                raise self.err("extern (kcfg) %r: unrecognized virtual extern (only CONFIG_* and "
                               "LINUX_KERNEL_VERSION, LINUX_HAS_BPF_COOKIE, LINUX_HAS_SYSCALL_WRAPPER)" % e.name)

    def kcfg_value(self, e: _Extern, raw: Any) -> Any:
        """Check and convert a value (a kernel config string or a Python value) for an extern."""
        if isinstance(raw, bool):
            raw = int(raw)
        if isinstance(raw, str) and raw in ("y", "n", "m"):
            if e.kind == "bool":
                if raw == "m":
                    raise self.err("extern (kcfg) %r: value 'm' implies a tristate or char type" % e.name)
                return raw == "y"
            if e.kind == "tristate":
                return {"n": 0, "y": 1, "m": 2}[raw]
            if e.kind == "char":
                return ord(raw)
            raise self.err("extern (kcfg) %r: value %r implies a bool, tristate or char type" % (e.name, raw))
        if isinstance(raw, str) and raw.startswith('"'):
            if e.kind != "char_array":
                raise self.err("extern (kcfg) %r: string value implies a char array" % e.name)
            if len(raw) < 2 or not raw.endswith('"'):
                raise self.err("extern (kcfg) %r: invalid string value %r" % (e.name, raw))
            return raw[1:-1][: e.size - 1]
        if isinstance(raw, str) and e.kind == "char_array":
            return raw[: e.size - 1]
        try:
            value = _c_long(raw) if isinstance(raw, str) else int(raw)
        except (ValueError, TypeError):
            raise self.err("extern (kcfg) %r: invalid value %r" % (e.name, raw)) from None
        if e.kind not in ("int", "char", "bool", "tristate"):
            raise self.err("extern (kcfg) %r: value %r implies an integer, char or bool type" % (e.name, raw))
        if e.kind == "bool":
            if value not in (0, 1):
                raise self.err("extern (kcfg) %r: value %d is not a bool" % (e.name, value))
            return bool(value)
        bits = 8 * e.size  # libbpf is_kcfg_value_in_range: lossless in the extern's type (any u64 for 8 bytes)
        lo, hi = (-(1 << (bits - 1)), 1 << (bits - 1)) if e.signed else (0, 1 << bits)
        if e.size == 8:
            lo, hi = -(1 << 63), 1 << 64
        if not lo <= value < hi:
            raise self.err("extern (kcfg) %r: value %d does not fit in %d bytes" % (e.name, value, e.size))
        return value

    def kcfg_bytes(self) -> bytes:
        buf = bytearray(self.kcfg_size)
        for e in self.kcfg:
            v = e.value
            if v is None:
                continue
            if isinstance(v, str):
                raw = v.encode()[: e.size - 1]
                buf[e.offset:e.offset + len(raw)] = raw
            else:
                buf[e.offset:e.offset + e.size] = (int(v) & ((1 << (8 * e.size)) - 1)).to_bytes(e.size, "little")
        return bytes(buf)

    # ..... maps ..................................................................

    def collect_maps(self) -> None:
        self.mapdefs: list[_MapDef] = []
        self.legacy_maps()
        self.btf_maps()
        self.data_maps()
        if self.kcfg:
            self.where = "section '.kconfig'"
            self.mapdefs.append(_MapDef(KCONFIG_SEC, -1, 0, self.kcfg_size, dict(
                type=BPF_MAP_TYPE_ARRAY, key_size=4, value_size=self.kcfg_size, max_entries=1,
                flags=BPF_F_RDONLY_PROG | BPF_F_MMAPABLE, initial=self.kcfg_bytes(), readonly=True,
                section=KCONFIG_SEC, btf_value_type_id=self.datasec_id(KCONFIG_SEC),
                libbpf_name=self.internal_map_name(KCONFIG_SEC)), libbpf_type="kconfig"))
        self.kconfig_map = next((i for i, m in enumerate(self.mapdefs) if m.libbpf_type == "kconfig"), -1)

    def legacy_maps(self) -> None:
        sec = self.by_name.get(LEGACY_MAPS_SEC)
        if sec is None:
            return
        self.where = "section 'maps'"
        self.legacy_idx = sec.idx
        syms = [s for s in self.syms_by_sec.get(sec.idx, ()) if s.type != STT_SECTION]
        if not syms:
            return
        data = self.sec_data(sec)
        if not data or len(data) % len(syms):
            raise self.err("section 'maps': %d bytes for %d map symbols: map definitions must be of equal size"
                           % (len(data), len(syms)))
        def_sz = len(data) // len(syms)
        if def_sz < 20:
            raise self.err("section 'maps': map definitions of %d bytes, struct bpf_map_def needs 20" % def_sz)
        for s in syms:
            if s.value + def_sz > len(data):
                raise self.err("section 'maps': map %r at offset %d extends past the section" % (s.name, s.value))
            raw = data[s.value:s.value + def_sz]
            typ, ksz, vsz, maxe, flags = struct.unpack_from("<IIIII", raw)
            if any(raw[20:]):
                raise self.err("section 'maps': map %r has unrecognized, non-zero fields after the first 20 "
                               "bytes of struct bpf_map_def" % s.name)
            self.mapdefs.append(_MapDef(s.name, sec.idx, s.value, def_sz, dict(
                type=typ, key_size=ksz, value_size=vsz, max_entries=maxe, flags=flags, section=LEGACY_MAPS_SEC,
                libbpf_name=s.name[:BPF_OBJ_NAME_LEN - 1])))

    def symbol_in(self, sec_idx: int, name: str) -> _Sym | None:
        return self.sym_by_name.get((sec_idx, name))

    def btf_maps(self) -> None:
        sec = self.by_name.get(MAPS_SEC)
        if sec is None:
            return
        self.where = "section '.maps'"
        self.maps_idx = sec.idx
        btf = self.btf
        if btf is None:
            raise self.err("section '.maps' needs BTF (compile with -g)")
        ds = btf.datasec(MAPS_SEC)
        if ds is None:
            raise self.err("section '.maps' has no DATASEC '.maps' in the BTF")
        data = self.sec_data(sec)
        entries = []
        for vi in ds.vars:
            var = btf[vi.type]
            sym = self.symbol_in(sec.idx, var.name) if var.name else None
            entries.append((sym.value if sym is not None else vi.offset, vi, var, sym))
        entries.sort(key=lambda e: e[0])  # libbpf sorts DATASEC entries by their (fixed-up) offset
        for offset, vi, var, sym in entries:
            name = var.name
            self.where = "section '.maps', map %r" % name
            if not name:
                raise self.err("section '.maps': map with an empty name")
            if not isinstance(var, Var):
                raise self.err("map %r: unexpected %s in DATASEC '.maps'" % (name, var.KIND.name))
            if var.linkage != VAR_GLOBAL_ALLOCATED:
                raise self.err("map %r: unsupported linkage (maps must be global variables)" % name)
            size = vi.size or (sym.size if sym is not None else 0)
            if offset + size > len(data):
                raise self.err("map %r: definition at offset %d, size %d extends past section '.maps'"
                               % (name, offset, size))
            d = btf.resolve(var.type)
            if not isinstance(d, Struct):
                raise self.err("map %r: definition is a %s, expected a struct" % (name, d.KIND.name))
            if d.size > size:
                raise self.err("map %r: definition struct (%d bytes) larger than the variable (%d)"
                               % (name, d.size, size))
            kw, inner, _ = self.parse_map_def(name, d, outer=True)
            if inner is not None:
                kw["inner"] = self.make_spec(name + ".inner", inner)
            kw.update(section=MAPS_SEC, libbpf_name=name[:BPF_OBJ_NAME_LEN - 1])
            self.mapdefs.append(_MapDef(name, sec.idx, offset, size, kw, btf_var=vi.type))

    def map_field_int(self, map_name: str, m) -> int:
        btf = self.btf
        assert btf is not None
        t = btf.resolve(m.type)
        if not isinstance(t, Ptr):
            raise self.err("map %r: attribute %r: expected a pointer (__uint), got %s"
                           % (map_name, m.name, t.KIND.name))
        a = btf[t.type]
        if not isinstance(a, Array):
            raise self.err("map %r: attribute %r: expected a pointer to an array (__uint), got %s"
                           % (map_name, m.name, a.KIND.name))
        return a.nelems

    def parse_map_def(self, map_name: str, d: Struct, outer: bool) -> tuple[dict, dict | None, bool]:
        """libbpf ``parse_btf_map_def``: (MapSpec kwargs, inner kwargs, is_prog_array_values)."""
        btf = self.btf
        assert btf is not None
        kw: dict[str, Any] = dict(type=0, key_size=0, value_size=0, max_entries=0, flags=0, map_extra=0)
        inner = None
        for i, m in enumerate(d.members):
            n = m.name
            if n == "type":
                kw["type"] = self.map_field_int(map_name, m)
            elif n == "max_entries":
                kw["max_entries"] = self.map_field_int(map_name, m)
            elif n == "map_flags":
                kw["flags"] = self.map_field_int(map_name, m)
            elif n == "numa_node":
                kw["numa_node"] = self.map_field_int(map_name, m)
            elif n == "map_extra":
                kw["map_extra"] = self.map_field_int(map_name, m)
            elif n in ("key_size", "value_size"):
                sz = self.map_field_int(map_name, m)
                if kw[n] and kw[n] != sz:
                    raise self.err("map %r: conflicting %s %d != %d" % (map_name, n, kw[n], sz))
                kw[n] = sz
            elif n in ("key", "value"):
                t = btf[m.type]
                if not isinstance(t, Ptr):
                    raise self.err("map %r: %s spec is not a pointer (__type): %s" % (map_name, n, t.KIND.name))
                try:
                    sz = btf.size_of(t.type)
                except BtfError as e:
                    raise self.err("map %r: cannot determine the %s size: %s" % (map_name, n, e)) from None
                if kw[n + "_size"] and kw[n + "_size"] != sz:
                    raise self.err("map %r: conflicting %s size %d != %d" % (map_name, n, kw[n + "_size"], sz))
                kw[n + "_size"] = sz
                kw["btf_%s_type_id" % n] = t.type
            elif n == "values":
                if not outer:
                    raise self.err("map %r: multi-level inner maps are not supported" % map_name)
                if i != len(d.members) - 1:
                    raise self.err("map %r: 'values' must be the last member" % map_name)
                mim = kw["type"] in (BPF_MAP_TYPE_ARRAY_OF_MAPS, BPF_MAP_TYPE_HASH_OF_MAPS)
                prog_array = kw["type"] == BPF_MAP_TYPE_PROG_ARRAY
                if not mim and not prog_array:
                    raise self.err("map %r: 'values' needs a map-in-map or a prog array" % map_name)
                if kw["value_size"] and kw["value_size"] != 4:
                    raise self.err("map %r: conflicting value size %d != 4" % (map_name, kw["value_size"]))
                kw["value_size"] = 4
                t = btf[m.type]
                if not isinstance(t, Array) or t.nelems:
                    raise self.err("map %r: 'values' is not a zero-sized array" % map_name)
                t = btf.resolve(t.type)
                if not isinstance(t, Ptr):
                    raise self.err("map %r: 'values' element is a %s, expected a pointer" % (map_name, t.KIND.name))
                t = btf.resolve(t.type)
                if prog_array:
                    if not isinstance(t, FuncProto):
                        raise self.err("map %r: prog-array 'values' must point to functions" % map_name)
                    continue
                if not isinstance(t, Struct):
                    raise self.err("map %r: inner map definition is a %s, expected a struct"
                                   % (map_name, t.KIND.name))
                inner, _, _ = self.parse_map_def(map_name + ".inner", t, outer=False)
            elif n == "pinning":
                if not outer:
                    raise self.err("map %r: an inner map definition cannot be pinned" % map_name)
                v = self.map_field_int(map_name, m)
                if v not in (PIN_NONE, PIN_BY_NAME):
                    raise self.err("map %r: invalid pinning value %d" % (map_name, v))
                kw["pinning"] = v
            else:
                raise self.err("map %r: unknown field %r" % (map_name, n))
        if kw["type"] == 0:
            raise self.err("map %r: map type is not specified" % map_name)
        return kw, inner, False

    def make_spec(self, name: str, kw: dict) -> MapSpec:
        try:
            return MapSpec(name, **kw)
        except MapError as e:
            raise self.err("map %r (section %r): %s" % (name, kw.get("section") or MAPS_SEC, e.detail or e)) from None

    def datasec_id(self, name: str) -> int:
        if self.btf is None:
            return 0
        ds = self.btf.datasec(name)
        return ds.id if ds is not None else 0

    def internal_map_name(self, real: str) -> str:
        """libbpf's ``internal_map_name``: ``<obj prefix><section>``, 15 characters at most."""
        sfx = min(max(7, len(real)), BPF_OBJ_NAME_LEN - 1)
        pfx = 0 if "." in real[1:] else min(BPF_OBJ_NAME_LEN - sfx - 1, len(self.name))
        out = (self.name[:pfx] + real[:sfx])[:BPF_OBJ_NAME_LEN - 1]
        return "".join(c if c.isalnum() or c in "_." else "_" for c in out)

    @staticmethod
    def data_kind(sec: _Sec) -> str:
        n = sec.name
        if sec.type == SHT_PROGBITS and not sec.flags & SHF_EXECINSTR:
            if n == ".data" or n.startswith(".data."):
                return "data"
            if n == ".rodata" or n.startswith(".rodata."):
                return "rodata"
        if sec.type == SHT_NOBITS and (n == ".bss" or n.startswith(".bss.")):
            return "bss"
        return ""

    def data_maps(self) -> None:
        self.data_secs: dict[int, int] = {}  # section index -> map index (filled after all maps)
        for sec in self.secs:
            kind = self.data_kind(sec)
            if not kind or sec.size == 0:
                continue
            self.where = "section %r" % sec.name
            if sec.size > MAX_DATA_SIZE:
                raise self.err("section %r is %d bytes; global data may be at most %d bytes (the kernel's limit "
                               "on an array map value)" % (sec.name, sec.size, MAX_DATA_SIZE))
            readonly = kind == "rodata"
            flags = BPF_F_RDONLY_PROG if readonly else 0
            if self.mmapable(sec.name):
                flags |= BPF_F_MMAPABLE
            self.mapdefs.append(_MapDef(sec.name, sec.idx, 0, sec.size, dict(
                type=BPF_MAP_TYPE_ARRAY, key_size=4, value_size=sec.size, max_entries=1, flags=flags,
                initial=self.sec_data(sec), readonly=readonly, section=sec.name,
                btf_value_type_id=self.datasec_id(sec.name), libbpf_name=self.internal_map_name(sec.name)),
                libbpf_type=kind))

    def mmapable(self, secname: str) -> bool:
        """libbpf ``map_is_mmapable``: the DATASEC has a variable visible to userspace."""
        if self.btf is None:
            return False
        ds = self.btf.datasec(secname)
        if ds is None:
            return False
        for vi in ds.vars:
            v = self.btf.get(vi.type)
            if isinstance(v, Var) and v.linkage != VAR_STATIC:
                sym = self.symbol_in(self.by_name[secname].idx, v.name)
                if sym is None or sym.visibility not in (STV_HIDDEN, STV_INTERNAL):
                    return True
        return False

    def map_relos(self) -> None:
        """``.rel.maps``: initial slots of map-in-map and prog-array ``values`` (libbpf ``collect_map_relos``)."""
        maps_idx = getattr(self, "maps_idx", None)
        if maps_idx is None:
            return
        btf = self.btf
        assert btf is not None
        btf_maps = sorted((m.offset, i) for i, m in enumerate(self.mapdefs) if m.sec == maps_idx)
        btf_offsets = [o for o, _ in btf_maps]
        by_name = {}
        for i, m in enumerate(self.mapdefs):
            by_name.setdefault(m.name, i)
        for rsec in self.secs:
            if rsec.type != SHT_REL or rsec.info != maps_idx:
                continue
            self.where = "section %r" % rsec.name
            for n, (r_off, sym) in enumerate(self.rels(rsec)):
                k = bisect.bisect_right(btf_offsets, r_off) - 1
                outer = self.mapdefs[btf_maps[k][1]] if k >= 0 else None
                if outer is not None and not r_off + 8 <= outer.offset + outer.size:
                    outer = None
                if outer is None:
                    raise self.err(".maps relocation #%d against %r at offset %d: no map there"
                                   % (n, sym.name, r_off))
                typ = outer.kwargs["type"]
                if typ in (BPF_MAP_TYPE_ARRAY_OF_MAPS, BPF_MAP_TYPE_HASH_OF_MAPS):
                    if sym.shndx != maps_idx:
                        raise self.err(".maps relocation #%d: %r is not a BTF-defined map" % (n, sym.name))
                    if typ == BPF_MAP_TYPE_HASH_OF_MAPS and outer.kwargs["key_size"] != 4:
                        raise self.err("hash-of-maps %r must have key size 4" % outer.name)
                    target = by_name.get(sym.name)
                    if target is None:
                        raise self.err(".maps relocation #%d: %r is not a valid map reference" % (n, sym.name))
                elif typ == BPF_MAP_TYPE_PROG_ARRAY:
                    f = self.func_at(sym.shndx, sym.value // INSN) if sym.shndx in self.funcs else None
                    if f is None or sym.shndx == self.text_idx or f.start * INSN != sym.value:
                        raise self.err(".maps relocation #%d: %r is not an entry-point program" % (n, sym.name))
                    target = f.name
                else:
                    raise self.err(".maps relocation #%d in map %r, which is neither map-in-map nor prog array"
                                   % (n, outer.name))
                d = btf.resolve(btf[outer.btf_var].type)
                assert isinstance(d, Struct)
                if not d.members or d.members[-1].name != "values":
                    raise self.err("map %r: relocation without a 'values' member" % outer.name)
                moff = d.members[-1].bit_offset // 8
                if r_off - outer.offset < moff or (r_off - outer.offset - moff) % 8:
                    raise self.err("map %r: relocation at offset %d is not a 'values' slot" % (outer.name, r_off))
                outer.values[(r_off - outer.offset - moff) // 8] = target

    def rels(self, rsec: _Sec):
        """(r_offset, symbol) of a REL section (only R_BPF types that name a symbol)."""
        if rsec.link != self.symtab_idx:
            raise self.err("relocation section %r does not use the symbol table" % rsec.name)
        if rsec.entsize not in (0, _REL.size) or rsec.size % _REL.size:
            raise self.err("relocation section %r: size %d is not a multiple of %d" % (rsec.name, rsec.size,
                                                                                      _REL.size))
        raw = self.sec_data(rsec)
        for i in range(len(raw) // _REL.size):
            r_off, info = _REL.unpack_from(raw, i * _REL.size)
            sidx = info >> 32
            if not 0 <= sidx < len(self.syms):
                raise self.err("relocation section %r, entry #%d: symbol #%d does not exist"
                               % (rsec.name, i, sidx))
            yield r_off, self.syms[sidx]

    # ..... program relocations ....................................................

    def is_extern(self, sym: _Sym) -> bool:
        return sym.shndx == SHN_UNDEF and sym.bind in (STB_GLOBAL, STB_WEAK) and sym.type == STT_NOTYPE

    def collect_prog_relos(self) -> None:
        """libbpf ``bpf_object__collect_prog_relos`` + ``bpf_program__record_reloc``."""
        self.relos: dict[int, dict[int, _Relo]] = {i: {} for i in self.slots}
        map_by_loc = {(m.sec, m.offset): i for i, m in enumerate(self.mapdefs) if m.libbpf_type == ""}
        data_map = {m.sec: i for i, m in enumerate(self.mapdefs) if m.libbpf_type in ("data", "rodata", "bss")}
        map_secs = {getattr(self, "maps_idx", -2), getattr(self, "legacy_idx", -2)}
        for rsec in self.secs:
            if rsec.type != SHT_REL or rsec.info not in self.slots:
                continue
            sec = self.secs[rsec.info]
            slots = self.slots[sec.idx]
            for n, (r_off, sym) in enumerate(self.rels(rsec)):
                self.where = "section %r, relocation #%d" % (sec.name, n)
                if r_off % INSN or r_off >= sec.size:
                    raise self.err("section %r, relocation #%d: invalid offset %#x" % (sec.name, n, r_off))
                idx = r_off // INSN
                if self.func_at(sec.idx, idx) is None:
                    continue  # code of no function (an eliminated weak function): libbpf skips it
                where = "section %r, insn #%d" % (sec.name, idx)
                code = slots[idx][0]
                if idx in self.relos[sec.idx]:
                    raise self.err("%s: two relocations for one instruction" % where)
                if sym.shndx == SHN_UNDEF and not self.is_extern(sym):
                    raise self.err("%s: relocation against undefined symbol %r" % (where, sym.name or "#%d"
                                                                                    % sym.idx))
                if self.is_extern(sym):
                    ext = self.externs.get(sym.idx)
                    if ext is None:
                        what = "call to" if code == 0x85 else "reference to"
                        raise self.err("%s: %s undefined symbol %r (an extern that is not a __kconfig "
                                       "variable; kfuncs and __ksym variables are not available in userspace)"
                                       % (where, what, sym.name))
                    if code != 0x18:
                        raise self.err("%s: extern %r used by a non-lddw instruction (opcode %#04x)"
                                       % (where, sym.name, code))
                    self.relos[sec.idx][idx] = _Relo("extern", idx, sym, ext=ext)
                    continue
                if code == 0x85:  # call
                    if slots[idx][2] != isa.CALL_LOCAL:
                        raise self.err("%s: relocation against %r on a call that is not a local call (src %d)"
                                       % (where, sym.name, slots[idx][2]))
                    if sym.shndx != self.text_idx:
                        raise self.err("%s: call to %r in section %r; called functions must be in .text "
                                       "(static or global functions without SEC())"
                                       % (where, sym.name, self.sec_name(sym.shndx)))
                    if sym.value % INSN:
                        raise self.err("%s: call to %r at misaligned offset %d" % (where, sym.name, sym.value))
                    self.relos[sec.idx][idx] = _Relo("call", idx, sym, sym_off=sym.value)
                    continue
                if code != 0x18:
                    raise self.err("%s: relocation against %r on an instruction that is neither lddw nor call "
                                   "(opcode %#04x)" % (where, sym.name, code))
                if idx + 1 >= len(slots):
                    raise self.err("%s: lddw without its second slot" % where)
                if sym.shndx == self.text_idx and ((sym.bind == STB_LOCAL and sym.type == STT_SECTION)
                                                   or (sym.bind == STB_GLOBAL and sym.type == STT_FUNC)):
                    if sym.value % INSN:
                        raise self.err("%s: address of %r at misaligned offset %d" % (where, sym.name, sym.value))
                    self.relos[sec.idx][idx] = _Relo("subprog", idx, sym, sym_off=sym.value)
                    continue
                if sym.shndx in map_secs:
                    mi = map_by_loc.get((sym.shndx, sym.value))
                    if mi is None:
                        raise self.err("%s: relocation against %r: no map at offset %d of section %r"
                                       % (where, sym.name, sym.value, self.sec_name(sym.shndx)))
                    self.relos[sec.idx][idx] = _Relo("map", idx, sym, map_idx=mi)
                    continue
                if sym.shndx in data_map:
                    self.relos[sec.idx][idx] = _Relo("data", idx, sym, map_idx=data_map[sym.shndx],
                                                     sym_off=sym.value)
                    continue
                raise self.err("%s: relocation against %r in section %r, which is neither a map, global data "
                               "(.data*, .rodata*, .bss*) nor .text" % (where, sym.name, self.sec_name(sym.shndx)))

    def apply_data_relos(self) -> None:
        """libbpf ``bpf_object__relocate_data``, with map indices instead of fds."""
        for sec_idx, relos in self.relos.items():
            slots = self.slots[sec_idx]
            for idx, r in relos.items():
                insn, nxt = slots[idx], slots[idx + 1] if idx + 1 < len(slots) else None
                if r.type == "map":
                    insn[2], insn[4] = isa.PSEUDO_MAP_IDX, r.map_idx
                elif r.type == "data":
                    assert nxt is not None
                    off = insn[4] + r.sym_off
                    size = self.mapdefs[r.map_idx].kwargs["value_size"]
                    if not 0 <= off < size:
                        raise self.err("section %r, insn #%d: reference to %r at offset %d, outside section %r "
                                       "(%d bytes)" % (self.secs[sec_idx].name, idx, r.sym.name, off,
                                                       self.mapdefs[r.map_idx].name, size))
                    insn[2], insn[4], nxt[4] = isa.PSEUDO_MAP_IDX_VALUE, r.map_idx, off
                elif r.type == "extern":
                    assert nxt is not None and r.ext is not None
                    insn[2], insn[4], nxt[4] = isa.PSEUDO_MAP_IDX_VALUE, self.kconfig_map, r.ext.offset
                elif r.type == "subprog":
                    insn[2] = isa.PSEUDO_FUNC

    # ..... CO-RE ...................................................................

    def target(self) -> tuple[Btf, str]:
        t = self.target_arg
        if isinstance(t, Btf):
            return t, t.name
        if isinstance(t, (str, os.PathLike)):
            path = os.fspath(t)
            try:
                with open(path, "rb") as f:
                    return Btf(f.read(), name=path, validate=False), path
            except OSError as e:
                raise self.err("cannot read target BTF %s: %s" % (path, e)) from None
        k = kernel_btf()
        if k is not None:
            return k, k.name
        assert self.btf is not None
        log.warning("%s: /sys/kernel/btf/vmlinux not found; CO-RE relocations are resolved against the "
                    "object's own BTF (struct layouts as compiled)", self.name)
        return self.btf, "the object's own BTF (kernel BTF /sys/kernel/btf/vmlinux not found)"

    def apply_core(self) -> None:
        self.core_failures: dict[int, list[CoreFailure]] = {}
        self.core_target = ""
        ext = self.btf_ext
        if ext is None or not any(ext.core_relos.values()):
            return
        assert self.btf is not None
        target, desc = self.target()
        self.core_target = desc
        resolver = CoreResolver(self.btf, target, desc)
        secs_by_name = {self.secs[i].name: i for i in self.slots}
        for secname, relos in ext.core_relos.items():
            sec_idx = secs_by_name.get(secname)
            if sec_idx is None:
                log.debug("%s: CO-RE relocations for unknown section %r skipped", self.name, secname)
                continue
            self.where = "section %r (CO-RE)" % secname
            live = [r for r in relos if r.insn_off % INSN or self.func_at(sec_idx, r.insn_off // INSN)]
            try:
                failures = apply_relos(self.slots[sec_idx], secname, live, resolver)
            except BtfError as e:
                raise self.err(str(e)) from None
            self.core_failures[sec_idx] = failures

    # ..... linking ....................................................................

    def link(self, main: _Func) -> tuple[list[list[int]], list[tuple[_Func, int]]]:
        """libbpf ``bpf_object__reloc_code``: the main program with its subprograms appended, depth first."""
        out: list[list[int]] = []
        placed: dict[int, int] = {}  # id(func) -> slot in out
        pieces: list[tuple[_Func, int]] = []

        def place(f: _Func) -> int:
            base = len(out)
            placed[id(f)] = base
            pieces.append((f, base))
            out.extend([list(s) for s in self.slots[f.sec][f.start:f.start + f.count]])
            return base

        stack = [(main, place(main), 0)]  # (function, base, next slot to look at)
        while stack:
            f, base, i = stack.pop()
            while i < f.count:
                insn = out[base + i]
                code, src = insn[0], insn[2]
                is_call = code == 0x85 and src == isa.CALL_LOCAL
                is_func = code == 0x18 and src == isa.PSEUDO_FUNC
                step = 2 if code == 0x18 else 1
                if not (is_call or is_func):
                    i += step
                    continue
                where = "program %r, section %r, insn #%d" % (main.name, self.secs[f.sec].name, f.start + i)
                r = self.relos[f.sec].get(f.start + i)
                if r is not None and r.type == "call":
                    target = r.sym_off // INSN + insn[4] + 1
                elif r is not None and r.type == "subprog":
                    if (r.sym_off + insn[4]) % INSN:
                        raise self.err("%s: function address at misaligned offset %d" % (where, r.sym_off + insn[4]))
                    target = (r.sym_off + insn[4]) // INSN
                elif r is not None:
                    raise self.err("%s: unexpected %s relocation on a call" % (where, r.type))
                elif is_func:
                    raise self.err("%s: function address (lddw src=4) without a relocation" % where)
                else:
                    if f.sec != self.text_idx:
                        raise self.err("%s: local call without a relocation outside .text" % where)
                    target = f.start + i + insn[4] + 1
                callee = self.text_funcs.get(target)
                if callee is None:
                    inside = self.func_at(self.text_idx, target) if self.text_idx >= 0 else None
                    raise self.err("%s: %s target .text insn #%d is %s" % (
                        where, "call" if is_call else "function address", target,
                        "inside function %r, not its start" % inside.name if inside else "not a function"))
                if id(callee) not in placed:
                    stack.append((f, base, i))  # resume here after the callee is appended
                    stack.append((callee, place(callee), 0))
                    break
                insn[4] = placed[id(callee)] - (base + i) - 1
                i += step
        return out, pieces

    def records(self, what: str, sec: int, items, lo: int, hi: int) -> list:
        """The items (with an ``insn`` slot) of one section that fall in [lo, hi), via a sorted index."""
        key = (what, sec)
        index = self._record_index.get(key)
        if index is None:
            ordered = sorted(items, key=lambda r: r.insn)
            index = self._record_index[key] = ([r.insn for r in ordered], ordered)
        keys, ordered = index
        return ordered[bisect.bisect_left(keys, lo):bisect.bisect_left(keys, hi)]

    def build_program(self, main: _Func) -> ProgramSpec:
        sec = self.secs[main.sec]
        self.where = "program %r (section %r)" % (main.name, sec.name)
        info = parse_section_name(sec.name)
        slots, pieces = self.link(main)
        code = b"".join(_SLOT.pack(s[0], (s[2] << 4) | s[1], s[3], s[4]) for s in slots)
        try:
            insns = tuple(isa.decode(code))
        except DecodeError as e:
            raise self.err("program %r (section %r): %s" % (main.name, sec.name, e)) from None
        failures, finfo, linfo, subs = [], [], [], []
        ext = self.btf_ext
        for f, base in pieces:
            fsec = self.secs[f.sec].name
            lo, hi = f.start, f.start + f.count
            if f is not main:
                subs.append((f.name, base))
            for cf in self.records("core", f.sec, self.core_failures.get(f.sec, ()), lo, hi):
                failures.append(replace(cf, insn=cf.insn - lo + base))
            if ext is not None:
                for r in self.records("func", f.sec, ext.func_info.get(fsec, ()), lo, hi):
                    finfo.append(replace(r, insn_off=(r.insn - lo + base) * INSN))
                for r in self.records("line", f.sec, ext.line_info.get(fsec, ()), lo, hi):
                    linfo.append(replace(r, insn_off=(r.insn - lo + base) * INSN))
        func_tid = next((r.type_id for r in finfo if r.insn_off == 0), 0)
        return ProgramSpec(
            name=main.name, section=info.section, kind=info.kind, attach=info.attach, insns=insns,
            license=self.license, prog_type=info.prog_type, expected_attach_type=info.expected_attach_type,
            sleepable=info.sleepable, autoload=info.autoload, attach_error=info.attach_error,
            core_failures=tuple(failures), func_info=tuple(finfo), line_info=tuple(linfo),
            subprograms=tuple(subs), btf_func_type_id=func_tid)

    # ..... variables ....................................................................

    def collect_variables(self, maps_index: dict[int, int]) -> list[GlobalVar]:
        out: list[GlobalVar] = []
        for i, m in enumerate(self.mapdefs):
            if m.libbpf_type not in ("data", "rodata", "bss"):
                continue
            sec = self.secs[m.sec]
            self.where = "section %r (variables)" % sec.name
            ds = self.btf.datasec(sec.name) if self.btf is not None else None
            seen = set()
            if ds is not None:
                for vi in ds.vars:
                    v = self.btf[vi.type]  # type: ignore[index]
                    if not isinstance(v, Var):
                        continue
                    sym = self.symbol_in(sec.idx, v.name)
                    off = sym.value if sym is not None else vi.offset
                    size = vi.size or (sym.size if sym is not None else 0)
                    if off + size > sec.size:
                        raise self.err("variable %r at offset %d, size %d extends past section %r (%d bytes)"
                                       % (v.name, off, size, sec.name, sec.size))
                    hidden = sym is not None and sym.visibility in (STV_HIDDEN, STV_INTERNAL)
                    linkage = "static" if v.linkage == VAR_STATIC or hidden else "global"
                    out.append(GlobalVar(v.name, sec.name, maps_index[i], off, size, v.type, linkage,
                                         m.libbpf_type == "rodata"))
                    seen.add(v.name)
            for sym in self.syms_by_sec.get(sec.idx, ()):
                if sym.type == STT_OBJECT and sym.name not in seen:
                    if sym.value + sym.size > sec.size:
                        raise self.err("variable %r extends past section %r" % (sym.name, sec.name))
                    out.append(GlobalVar(sym.name, sec.name, maps_index[i], sym.value, sym.size, 0,
                                         "static" if sym.bind == STB_LOCAL else "global",
                                         m.libbpf_type == "rodata"))
        out.sort(key=lambda v: (v.map_index, v.offset))
        return out

    # ..... all together ....................................................................

    def load(self) -> ObjectSpec:
        self.read_elf()
        self.read_symbols()
        self.where = "sections 'license'/'version'"
        self.read_license_version()
        self.read_btf()
        self.collect_code()
        self.collect_externs()
        self.collect_maps()
        self.map_relos()
        self.collect_prog_relos()
        self.apply_core()
        self.apply_data_relos()
        # MapSpecs (inner map references in `values` point at the specs of this tuple)
        self.where = "maps"
        specs: list[MapSpec] = []
        for m in self.mapdefs:
            self.where = "map %r" % m.name
            specs.append(self.make_spec(m.name, m.kwargs))
        for i, m in enumerate(self.mapdefs):
            if m.values:
                slots: list[Any] = [None] * (max(m.values) + 1)
                for k, v in m.values.items():
                    slots[k] = specs[v] if isinstance(v, int) else v
                specs[i] = replace(specs[i], values=tuple(slots))
        programs = []
        for sec_idx, funcs in self.funcs.items():
            if sec_idx == self.text_idx:
                continue
            for f in funcs:
                programs.append(self.build_program(f))
        variables = self.collect_variables({i: i for i in range(len(self.mapdefs))})
        externs = tuple(ExternSpec(e.name, e.kind, e.type_id, e.offset, e.size, e.weak, e.value, self.kconfig_map)
                        for e in self.kcfg)
        return ObjectSpec(self.name, self.license, self.kern_version, tuple(programs), tuple(specs), self.btf,
                          tuple(variables), externs, self.btf_ext, self.core_target)


def object_name(path: str | os.PathLike) -> str:
    """libbpf's object name: the file name up to its first '.' (``foo.bpf.o`` -> ``foo``)."""
    return os.path.basename(os.fspath(path)).split(".", 1)[0] or "obj"


def load_object_spec(path_or_bytes: str | os.PathLike | bytes | bytearray | memoryview, name: str | None = None, *,
                     target_btf: Btf | str | os.PathLike | None = None,
                     kconfig: Mapping[str, Any] | None = None) -> ObjectSpec:
    """Read an eBPF ELF object into an :class:`ObjectSpec`.

    ``target_btf`` is what CO-RE relocations are resolved against: the
    running kernel's BTF by default (falling back, with a warning, to the
    object's own BTF when ``/sys/kernel/btf/vmlinux`` is missing), a
    :class:`~hybrid.user.btf.Btf` or a path to a raw BTF file.
    ``kconfig`` overrides values of ``__kconfig`` externs
    (``{"CONFIG_HZ": 1000, "LINUX_KERNEL_VERSION": 0x060100}``).
    """
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        data = bytes(path_or_bytes)
        name = name or "obj"
    else:
        p = Path(path_or_bytes)
        try:
            data = p.read_bytes()
        except OSError as e:
            raise ElfError("%s: cannot read: %s" % (p, e.strerror or e)) from e
        name = name or object_name(p)
    loader = _Loader(data, name, target_btf, kconfig)
    try:
        return loader.load()
    except HybridError:
        raise
    except RecursionError:
        raise ElfError("%s: %s: structure nested too deeply" % (name, loader.where)) from None
    except Exception as e:  # pyelftools' ELFError, struct.error, ...: translated once, here
        raise ElfError("%s: %s: malformed object (%s: %s)" % (name, loader.where, type(e).__name__, e)) from e
