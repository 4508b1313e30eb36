"""The ELF loader on clang-compiled objects, checked against the C sources and the reference tools
(bpftool's BTF dump, llvm-readelf, llvm-objdump)."""

from __future__ import annotations

import logging
import os
import re
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hybrid.errors import BtfError, ElfError, HybridError
from hybrid.user import btf as B
from hybrid.user import core as C
from hybrid.user import elf as E
from hybrid.user import isa
from hybrid.user.elf import load_object_spec, parse_section_name
from hybrid.user.helpers import HelperSpec
from hybrid.user.mapspec import BPF_F_MMAPABLE, BPF_F_RDONLY_PROG, MapSpec
from hybrid.user.program import MapRef, Program
from hybrid.user.verifier import verify
from tests.conftest import KERNEL_BTF
from tests.user.bpftool_util import (
    RawType,
    btf_raw,
    code_relocations,
    elf_symbols,
    raw_int,
    raw_member_offset,
    raw_struct,
)

ALL = ("maps", "legacy", "globals", "subprogs", "core", "sections", "kconfig")
_specs: dict[str, E.ObjectSpec] = {}


@pytest.fixture
def spec(bpf_build):
    def load(name: str) -> E.ObjectSpec:
        if name not in _specs:
            _specs[name] = load_object_spec(bpf_build.obj(name))
        return _specs[name]

    return load


def section_bytes(path, name: str) -> tuple[int, bytes]:
    from elftools.elf.elffile import ELFFile

    with open(path, "rb") as f:
        s = ELFFile(f).get_section_by_name(name)
        return s["sh_offset"], s.data()


def structural_program(obj: E.ObjectSpec, prog: E.ProgramSpec) -> Program:
    """A Program for the verifier: fake map addresses, a helper table with every helper id used."""
    maps = {i: MapRef(m.name, 0x100000 * (i + 1), m.value_size, 0x100000 * (i + 1) + 0x1000 if m.type == 2 else 0)
            for i, m in enumerate(obj.maps)}
    ids = {i.imm for i in prog.insns if i.opcode == 0x85 and i.src == isa.CALL_HELPER}
    helpers = {h: HelperSpec(h, "helper_%d" % h, lambda *a: 0) for h in ids}
    return Program(prog.insns, prog.name, helpers, maps)


# --- maps -----------------------------------------------------------------------------


def _raw_size(raw: dict[int, RawType], tid: int) -> int:
    n = 1
    while True:
        t = raw[tid]
        if t.kind in ("TYPEDEF", "CONST", "VOLATILE", "RESTRICT", "TYPE_TAG", "VAR"):
            tid = int(t.attrs["type_id"])
        elif t.kind == "ARRAY":
            n *= int(t.attrs["nr_elems"])
            tid = int(t.attrs["type_id"])
        elif t.kind == "PTR":
            return 8 * n
        else:
            return int(t.attrs["size"]) * n


def raw_map_defs(raw: dict[int, RawType]) -> dict[str, dict[str, int]]:
    """Map definitions of the '.maps' DATASEC, decoded from bpftool's dump alone."""
    out = {}
    ds = next(t for t in raw.values() if t.kind == "DATASEC" and t.name == ".maps")
    for _, entry in ds.items:
        var = raw[int(entry["type_id"])]
        d = raw[int(var.attrs["type_id"])]
        while d.kind != "STRUCT":
            d = raw[int(d.attrs["type_id"])]
        fields = {}
        for name, m in d.items:
            t = raw[int(m["type_id"])]
            if name in ("key", "value"):
                fields[name + "_size"] = _raw_size(raw, int(t.attrs["type_id"]))
            elif name == "values":
                fields["value_size"] = 4
            else:
                fields[name] = int(raw[int(t.attrs["type_id"])].attrs["nr_elems"])
        out[var.name] = fields
    return out


MAPS_FROM_SOURCE = {
    # name: (type, key_size, value_size, max_entries, flags, map_extra, pinning)
    "hash_map": (1, 4, 16, 1024, 0, 0, 0),
    "array_map": (2, 4, 8, 16, 0, 0, 0),
    "percpu_array": (6, 4, 24, 4, 0, 0, 0),
    "percpu_hash": (5, 8, 4, 64, 1, 0, 0),
    "lru": (9, 16, 8, 100, 0, 0, 1),
    "events": (27, 0, 0, 256 * 1024, 0, 0, 0),
    "queue": (22, 0, 4, 32, 0, 0, 0),
    "stack": (23, 0, 8, 8, 0, 0, 0),
    "bloom": (30, 0, 4, 1000, 0, 3, 0),
    "inner_a": (2, 4, 4, 8, 0, 0, 0),
    "inner_b": (2, 4, 4, 8, 0, 0, 0),
    "outer": (12, 4, 4, 4, 0, 0, 0),
    "outer_hash": (13, 4, 4, 10, 0, 0, 0),
    "perf": (4, 4, 4, 0, 0, 0, 0),
    "jmp_table": (3, 4, 4, 2, 0, 0, 0),
}


def test_btf_maps_match_source_and_bpftool(spec, bpf_build):
    obj = spec("maps")
    path = str(bpf_build.obj("maps"))
    got = {m.name: (m.type, m.key_size, m.value_size, m.max_entries, m.flags, m.map_extra, m.pinning)
           for m in obj.maps}
    assert got == MAPS_FROM_SOURCE
    # bpftool's view of the same BTF agrees field by field
    for name, fields in raw_map_defs(btf_raw(path)).items():
        m = obj.map(name)
        for f, v in fields.items():
            attr = {"map_flags": "flags", "type": "type"}.get(f, f)
            assert getattr(m, attr) == v, (name, f)
    # maps come in the order of their definitions in '.maps' (libbpf sorts DATASEC entries by offset)
    syms = sorted((s.value, s.name) for s in elf_symbols(path) if s.section == ".maps" and s.type == "OBJECT")
    assert [m.name for m in obj.maps] == [n for _, n in syms]
    assert all(m.section == ".maps" and m.libbpf_name == m.name[:15] and m.initial is None for m in obj.maps)
    # BTF types of key and value
    h = obj.map("hash_map")
    assert obj.btf.describe(h.btf_key_type_id) == "u32"
    assert obj.btf.describe(h.btf_value_type_id) == "struct value"


def test_map_in_map_and_prog_array(spec):
    obj = spec("maps")
    outer = obj.map("outer")
    assert outer.inner == MapSpec("outer.inner", 2, 4, 4, 8, btf_key_type_id=outer.inner.btf_key_type_id,
                                  btf_value_type_id=outer.inner.btf_value_type_id)
    assert len(outer.values) == 4 and outer.values[1] is None and outer.values[2] is None
    assert outer.values[0] is obj.map("inner_a") and outer.values[3] is obj.map("inner_b")
    oh = obj.map("outer_hash")
    assert (oh.inner.name, oh.inner.type, oh.inner.key_size, oh.inner.value_size, oh.inner.max_entries) == (
        "outer_hash.inner", 1, 8, 8, 2)
    assert oh.values == ()
    assert obj.map("jmp_table").values == (None, "tail")


def test_legacy_maps(spec, bpf_build):
    obj = spec("legacy")
    assert [(m.name, m.type, m.key_size, m.value_size, m.max_entries, m.section) for m in obj.maps] == [
        ("legacy_hash", 1, 4, 8, 64, "maps"), ("legacy_array", 2, 4, 16, 4, "maps")]
    assert obj.license == "GPL" and obj.kern_version == 0x050A00
    prog = obj.program("count")
    lddws = [i for i in prog.insns if i.opcode == 0x18]
    assert [(i.src, i.imm) for i in lddws] == [(isa.PSEUDO_MAP_IDX, 0), (isa.PSEUDO_MAP_IDX, 1)]


# --- relocations against llvm-objdump -r ---------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_relocations_match_objdump(spec, bpf_build, name):
    """Every relocation llvm-objdump lists in a program section is applied the libbpf way."""
    obj = spec(name)
    path = str(bpf_build.obj(name))
    syms = {s.name: s for s in elf_symbols(path)}
    data_maps = {m.section: i for i, m in enumerate(obj.maps) if m.initial is not None}
    checked = 0
    for r in code_relocations(path):
        progs = [p for p in obj.programs if p.section.lstrip("?") == r.section]
        if not progs or r.type not in ("R_BPF_64_64", "R_BPF_64_32"):
            continue
        _, raw = section_bytes(path, r.section)
        orig_imm = struct.unpack_from("<i", raw, r.offset + 4)[0]
        func = next(f for f in syms.values() if f.type == "FUNC" and f.section == r.section
                    and f.value <= r.offset < f.value + f.size)
        prog = obj.program(func.name)
        slot = (r.offset - func.value) // 8
        insn = dict(zip(isa.slot_index(prog.insns), prog.insns))[slot]
        sym = syms[r.symbol]
        if r.type == "R_BPF_64_32":  # call into .text: the callee is appended, imm points at it
            assert insn.src == isa.CALL_LOCAL
            target = isa.jump_target(insn, slot)
            assert target in dict((s, n) for n, s in prog.subprograms)
        elif sym.section in (".maps", "maps"):
            assert (insn.src, insn.imm) == (isa.PSEUDO_MAP_IDX, obj.map_index(r.symbol))
        elif sym.section in data_maps:
            assert (insn.src, insn.imm, insn.imm_hi) == (
                isa.PSEUDO_MAP_IDX_VALUE, data_maps[sym.section], sym.value + orig_imm)
        elif sym.section == ".text":
            assert insn.src == isa.PSEUDO_FUNC
            assert isa.jump_target(insn, slot) in {s for _, s in prog.subprograms}
        else:  # an extern: the .kconfig map at the extern's offset
            ext = next(e for e in obj.externs if e.name == r.symbol)
            assert (insn.src, insn.imm, insn.imm_hi) == (isa.PSEUDO_MAP_IDX_VALUE, ext.map_index, ext.offset)
        checked += 1
    assert checked > 0


# --- global data ------------------------------------------------------------------------------


def test_global_data_maps(spec, bpf_build):
    obj = spec("globals")
    path = bpf_build.obj("globals")
    assert [m.name for m in obj.maps] == [".rodata", ".data", ".data.custom", ".bss"]
    for m in obj.maps:
        assert (m.type, m.key_size, m.max_entries) == (2, 4, 1)
        if m.name == ".bss":
            assert m.initial == bytes(m.value_size) and m.value_size == 40
        else:
            assert m.initial == section_bytes(path, m.name)[1]
        assert m.readonly == (m.name == ".rodata")
        assert m.flags == (BPF_F_RDONLY_PROG if m.readonly else 0) | BPF_F_MMAPABLE
        assert obj.btf[m.btf_value_type_id].name == m.name  # the DATASEC
    assert [m.libbpf_name for m in obj.maps] == ["globals.rodata", "globals.data", ".data.custom", "globals.bss"]


def test_global_variables_match_symbols(spec, bpf_build):
    obj = spec("globals")
    syms = [s for s in elf_symbols(str(bpf_build.obj("globals"))) if s.type == "OBJECT" and s.section != "license"]
    got = {(v.name, v.section, v.offset, v.size) for v in obj.variables}
    assert got == {(s.name, s.section, s.value, s.size) for s in syms}
    ro = obj.map(".rodata").initial
    tp = obj.variable("target_pid")
    assert tp.readonly and tp.linkage == "global" and obj.btf.describe(obj.btf.resolve_id(tp.type_id)) == "unsigned int"
    assert int.from_bytes(ro[tp.offset:tp.offset + 4], "little") == 1234
    th = obj.variable("threshold")
    assert int.from_bytes(ro[th.offset:th.offset + 8], "little") == 0x1122334455667788
    cf = obj.variable("comm_filter")
    assert ro[cf.offset:cf.offset + cf.size] == b"bash" + bytes(12)
    assert obj.variable("local_counter").linkage == "static"
    data = obj.map(".data").initial
    c = obj.variable("counter")
    assert int.from_bytes(data[c.offset:c.offset + 8], "little") == 5
    assert obj.map(obj.variable("custom_a").section).initial == (77).to_bytes(8, "little")


def test_setting_const_volatile_before_load(spec):
    obj = spec("globals")
    new = obj.with_values(target_pid=42, comm_filter=b"zsh".ljust(16, b"\0"), hits=-1)
    ro, old_ro = new.map(".rodata").initial, obj.map(".rodata").initial
    tp, cf = obj.variable("target_pid"), obj.variable("comm_filter")
    assert ro[tp.offset:tp.offset + 4] == (42).to_bytes(4, "little")
    assert ro[cf.offset:cf.offset + 16] == b"zsh" + bytes(13)
    changed = [i for i in range(len(ro)) if ro[i] != old_ro[i]]
    assert all(tp.offset <= i < tp.offset + 4 or cf.offset <= i < cf.offset + 16 for i in changed)
    assert new.map(".bss").initial[:8] == b"\xff" * 8
    assert obj.map(".rodata").initial == old_ro  # the original is untouched
    with pytest.raises(ElfError, match="no global variable 'nope'"):
        obj.with_values(nope=1)
    with pytest.raises(ElfError, match="does not fit"):
        obj.with_values(target_pid=1 << 32)
    with pytest.raises(ElfError, match="has 16 bytes, value has 3"):
        obj.with_values(comm_filter=b"abc")


# --- subprograms -----------------------------------------------------------------------------


def test_subprograms_appended_like_libbpf(spec, bpf_build):
    obj = spec("subprogs")
    path = str(bpf_build.obj("subprogs"))
    funcs = {s.name: s for s in elf_symbols(path) if s.type == "FUNC"}
    _, text = section_bytes(path, ".text")
    a, b, c = obj.program("prog_a"), obj.program("prog_b"), obj.program("prog_c")
    # depth-first, in the order of first use (libbpf bpf_object__reloc_code)
    assert [n for n, _ in a.subprograms] == ["middle", "leaf", "other", "loop_cb"]
    assert [n for n, _ in b.subprograms] == ["other", "global_fn", "middle", "leaf"]
    assert c.subprograms == ()
    for prog in (a, b):
        slots = isa.slot_index(prog.insns)
        at = dict(zip(slots, prog.insns))
        starts = {s: n for n, s in prog.subprograms}
        code = prog.code
        main_size = funcs[prog.name].size
        assert prog.subprograms[0][1] == main_size // 8  # appended right after the main program
        for name, start in prog.subprograms:
            f = funcs[name]
            orig = text[f.value:f.value + f.size]
            mine = code[start * 8:start * 8 + f.size]
            for k in range(0, f.size, 8):  # same instructions; only relocated src/imm differ
                assert (mine[k], mine[k + 1] & 0xF, mine[k + 2:k + 4]) == (orig[k], orig[k + 1] & 0xF,
                                                                         orig[k + 2:k + 4]), (prog.name, name, k)
        for slot, insn in at.items():
            if isa.is_code_ref(insn):
                assert isa.jump_target(insn, slot) in starts  # every call/func address hits a function start
        verify(structural_program(obj, prog))
    cb = next(i for i in a.insns if i.opcode == 0x18 and i.src == isa.PSEUDO_FUNC)
    slot = isa.slot_index(a.insns)[a.insns.index(cb)]
    assert isa.jump_target(cb, slot) == dict(a.subprograms)["loop_cb"]


# --- CO-RE ---------------------------------------------------------------------------------

needs_kernel_btf = pytest.mark.skipif(not KERNEL_BTF.exists(), reason="no /sys/kernel/btf/vmlinux")


@needs_kernel_btf
def test_core_pt_regs_offsets_are_the_kernels(spec):
    obj = spec("core")
    raw = btf_raw(str(KERNEL_BTF))
    p = obj.program("on_malloc")
    ctx_loads = {i.off for i in p.insns if i.opcode == 0x79 and i.src == 1}  # ldxdw rX, [r1+off]
    assert ctx_loads == {raw_member_offset(raw, "pt_regs", r) for r in ("di", "si", "ax", "sp")}
    assert obj.core_target == str(KERNEL_BTF)
    assert p.core_failures == ()


def _patched_value(prog: E.ProgramSpec, slot: int) -> int:
    insn = dict(zip(isa.slot_index(prog.insns), prog.insns))[slot]
    if insn.opcode == 0x18:
        return insn.imm64
    if insn.opcode & 0x07 in (0x01, 0x02, 0x03):
        return insn.off
    return insn.imm & 0xFFFFFFFF


@needs_kernel_btf
def test_core_kernel_struct_relocations(spec):
    obj = spec("core")
    raw = btf_raw(str(KERNEL_BTF))
    prog = obj.program("read_task")
    relos = obj.btf_ext.core_relos["kprobe/do_nanosleep"]
    ts = raw_struct(raw, "task_struct")
    checked = set()
    for r in relos:
        what = C.format_spec(obj.btf, r)
        if prog.core_failure_at(r.insn):
            continue
        v = _patched_value(prog, r.insn)
        if r.kind == B.CoreReloKind.FIELD_BYTE_OFFSET and not what.startswith("task_struct.in_execve"):
            struct_, _, path = what.partition(".")
            assert v == raw_member_offset(raw, B.essential_name(struct_), path), what
        elif r.kind == B.CoreReloKind.FIELD_BYTE_SIZE and what == "task_struct.comm":
            assert v == 16
        elif r.kind == B.CoreReloKind.TYPE_SIZE:
            assert v == int(ts.attrs["size"])
        elif r.kind == B.CoreReloKind.TYPE_ID_TARGET:
            assert v == ts.id
        elif r.kind == B.CoreReloKind.ENUMVAL_VALUE:
            enum = next(t for t in raw.values() if t.kind == "ENUM" and t.name == "bpf_func_id")
            assert v == dict((n, raw_int(a["val"])) for n, a in enum.items)["BPF_FUNC_ringbuf_output"]
        elif r.kind in (B.CoreReloKind.TYPE_EXISTS, B.CoreReloKind.ENUMVAL_EXISTS):
            assert v == 1
        elif r.kind == B.CoreReloKind.FIELD_EXISTS:
            assert v == 0 and "this_field_does_not_exist" in what
        checked.add(r.kind)
    assert len(checked) >= 9
    # the in_execve bitfield: byte offset / shifts from the kernel's bit offset
    bits = next(int(a["bits_offset"]) for n, a in ts.items if n == "in_execve")
    lshift = next(r for r in relos if r.kind == B.CoreReloKind.FIELD_LSHIFT_U64)
    byte_off = bits // 8 // 4 * 4
    assert _patched_value(prog, lshift.insn) == 64 - (bits + 1 - byte_off * 8)


@needs_kernel_btf
def test_core_missing_field_is_poisoned_not_refused(spec):
    obj = spec("core")
    prog = obj.program("read_task")
    assert len(prog.core_failures) == 1
    f = prog.core_failures[0]
    assert f.access == "0:0" and f.type_name == "struct task_struct___old" and f.kind == "field_byte_offset"
    assert f.message.startswith("CO-RE relocation failed for 0:0 (task_struct___old.this_field_does_not_exist")
    assert "in struct task_struct___old" in f.message
    insn = dict(zip(isa.slot_index(prog.insns), prog.insns))[f.insn]
    assert (insn.opcode, insn.src, insn.imm) == (0x85, 0, C.POISON_HELPER_ID)
    # guarded: the bpf_core_field_exists() result right before is the constant 0, tested by a jump over it
    before = [i for s, i in zip(isa.slot_index(prog.insns), prog.insns) if f.insn - 3 <= s < f.insn]
    assert any(i.opcode == 0x15 and i.imm == 0 for i in before)  # jeq rX, 0, +n


def test_core_against_another_target_layout(spec, bpf_build):
    """Resolve against a different BTF: new offsets are patched in, missing types poison."""
    target_obj = bpf_build.source("core_target", r"""
        struct task_struct {
            long pad[3];
            int pid;
            int tgid;
            struct task_struct *real_parent;
            char comm[8];
            unsigned int other : 3, in_execve : 1;
        };
        enum bpf_func_id { BPF_FUNC_unspec, BPF_FUNC_ringbuf_output = 99 };
        struct task_struct g_task;
        enum bpf_func_id g_id;
        char LICENSE[] __attribute__((section("license"))) = "GPL";
    """)
    from elftools.elf.elffile import ELFFile

    with open(target_obj, "rb") as fobj:
        target = B.Btf(ELFFile(fobj).get_section_by_name(".BTF").data(), name="core_target")
    obj = load_object_spec(bpf_build.obj("core"), target_btf=target)
    assert obj.core_target == "core_target"
    prog = obj.program("read_task")
    vals = {}
    for r in obj.btf_ext.core_relos["kprobe/do_nanosleep"]:
        if not prog.core_failure_at(r.insn):
            vals.setdefault((r.kind_name, C.format_spec(obj.btf, r)), _patched_value(prog, r.insn))
    assert vals[("field_byte_offset", "task_struct.pid")] == 24
    assert vals[("field_byte_offset", "task_struct.tgid")] == 28
    assert vals[("field_byte_offset", "task_struct.real_parent")] == 32
    assert vals[("field_byte_size", "task_struct.comm")] == 8
    assert vals[("type_size", "task_struct")] == target.size_of(target.find("task_struct").id)
    assert vals[("enumval_value", "bpf_func_id::BPF_FUNC_ringbuf_output")] == 99
    assert vals[("type_id_target", "task_struct")] == target.find("task_struct").id
    assert vals[("field_byte_offset", "task_struct___old.pid")] == 24
    assert vals[("field_lshift_u64", "task_struct.in_execve")] == 64 - (48 * 8 + 4 - 48 * 8)
    # struct pt_regs does not exist in this target: every PT_REGS access of on_malloc is poisoned
    pr = obj.program("on_malloc")
    assert len(pr.core_failures) == 4
    assert all("pt_regs" in f.message and "no match among 0 candidates" in f.message for f in pr.core_failures)


def test_core_falls_back_to_local_btf(bpf_build, monkeypatch, caplog):
    monkeypatch.setattr(E, "kernel_btf", lambda *a: None)
    with caplog.at_level(logging.WARNING, logger="hybrid.user.elf"):
        obj = load_object_spec(bpf_build.obj("core"))
    assert "own BTF" in obj.core_target and "not found" in obj.core_target
    assert any("vmlinux not found" in r.message for r in caplog.records)
    local = obj.btf
    prog = obj.program("read_task")
    pid = next(r for r in obj.btf_ext.core_relos["kprobe/do_nanosleep"] if C.format_spec(local, r) == "task_struct.pid")
    assert _patched_value(prog, pid.insn) == local.offsetof("task_struct", "pid")
    assert len(prog.core_failures) == 1  # the ___old field is missing from the local BTF too


def test_core_patch_insn_rules():
    slots = [[0x61, 1, 2, 8, 0]]  # ldxw r1, [r2+8]
    with pytest.raises(BtfError, match="unexpected offset 8, expected 4"):
        C.patch_insn([list(s) for s in slots], 0, C.CoreResult(4, 12, orig_sz=4, new_sz=4))
    s = [list(x) for x in slots]
    C.patch_insn(s, 0, C.CoreResult(8, 16, orig_sz=4, new_sz=8, orig_type_id=1, new_type_id=1))
    assert s[0][:4] == [0x79, 1, 2, 16]  # size adjusted: ldxw -> ldxdw
    s = [list(x) for x in slots]
    reason = C.patch_insn(s, 0, C.CoreResult(8, 16, orig_sz=4, new_sz=8, fail_memsz_adjust=True))
    assert reason and s[0] == [0x85, 0, 0, 0, C.POISON_HELPER_ID]
    s = [[0x18, 1, 0, 0, 5], [0, 0, 0, 0, 0]]
    C.patch_insn(s, 0, C.CoreResult(5, 0x1_0000_0002))
    assert (s[0][4], s[1][4]) == (2, 1)
    C.patch_insn(s, 0, C.CoreResult(0, 0, poison=True, reason="x"))
    assert s[0][0] == s[1][0] == 0x85
    with pytest.raises(BtfError, match="cannot relocate opcode"):
        C.patch_insn([[0x95, 0, 0, 0, 0]], 0, C.CoreResult(0, 1))


# --- section names -------------------------------------------------------------------------

SECTIONS = {
    "up_abs": ("uprobe", E.UprobeTarget("/usr/lib/x86_64-linux-gnu/libc.so.6", "malloc")),
    "up_lib_off": ("uprobe", E.UprobeTarget("libc.so.6", "malloc", 0x10)),
    "uret": ("uretprobe", E.UprobeTarget("/bin/bash", "readline", 0, True)),
    "up_bare": ("uprobe", None),
    "uret_bare": ("uretprobe", None),
    "up_sleepable": ("uprobe", E.UprobeTarget("/usr/bin/true", "main")),
    "up_offset_only": ("uprobe", E.UprobeTarget("/bin/true", None, 0x20)),
    "usdt_bare": ("usdt", None),
    "usdt_full": ("usdt", E.UsdtTarget("/usr/lib/libpython3.so", "python", "function__entry")),
    "tp_long": ("tracepoint", E.TracepointTarget("syscalls", "sys_enter_openat")),
    "tp_short": ("tracepoint", E.TracepointTarget("sched", "sched_switch")),
    "tp_bare": ("tracepoint", None),
    "raw_short": ("raw_tracepoint", E.RawTracepointTarget("sys_enter")),
    "raw_long": ("raw_tracepoint", E.RawTracepointTarget("sched_switch")),
    "kp_off": ("kprobe", E.KprobeTarget("do_sys_openat2", 8)),
    "kretp": ("kretprobe", E.KprobeTarget("do_sys_openat2", 0, True)),
    "kp_bare": ("kprobe", None),
    "ksys": ("ksyscall", E.KsyscallTarget("openat")),
    "kretsys": ("kretsyscall", E.KsyscallTarget("openat", True)),
    "fent": ("fentry", E.BtfTarget("do_unlinkat")),
    "fex": ("fexit", E.BtfTarget("do_unlinkat")),
    "sock": ("socket", None),
    "xdp_prog": ("xdp", None),
    "perf": ("perf_event", None),
    "tc_prog": ("tc", None),
    "not_autoloaded": ("tracepoint", E.TracepointTarget("syscalls", "sys_exit_read")),
    "unknown_sec": ("unknown", None),
    "kmulti": ("kprobe.multi", E.KprobeMultiTarget("do_sys_*")),
    "umulti": ("uprobe.multi", E.UprobeMultiTarget("/usr/bin/true", "ma*")),
}
PROG_TYPES = {"uprobe": 2, "uretprobe": 2, "usdt": 2, "kprobe": 2, "kretprobe": 2, "ksyscall": 2, "kretsyscall": 2,
              "tracepoint": 5, "raw_tracepoint": 17, "fentry": 26, "fexit": 26, "socket": 1, "xdp": 6,
              "perf_event": 7, "tc": 3, "unknown": 0, "kprobe.multi": 2, "uprobe.multi": 2}


def test_section_names_of_every_kind(spec):
    obj = spec("sections")
    assert {p.name: (p.kind, p.attach) for p in obj.programs} == SECTIONS
    for p in obj.programs:
        assert p.prog_type == PROG_TYPES[p.kind], p.name
        assert p.autoload == (p.name != "not_autoloaded")
        assert p.sleepable == (p.name == "up_sleepable")
        assert bool(p.attach_error) == (p.name == "unknown_sec")
        assert p.license == "GPL"
    assert obj.program("fent").expected_attach_type == 24
    # BPF_USDT: the USDT maps, the LINUX_HAS_BPF_COOKIE extern and the weak bpf_usdt_arg() subprogram
    assert {"__bpf_usdt_specs", "__bpf_usdt_ip_to_spec_id", ".kconfig"} <= {m.name for m in obj.maps}
    assert [n for n, _ in obj.program("usdt_full").subprograms] == ["bpf_usdt_arg"]
    assert {e.name for e in obj.externs} == {"LINUX_HAS_BPF_COOKIE", "LINUX_HAS_SYSCALL_WRAPPER"}


@pytest.mark.parametrize("sec,kind,attach,error", [
    ("uprobe/noColonHere", "uprobe", None, "expected uprobe/<binary>:<function>"),
    ("uretprobe//bin/x:f+4", "uretprobe", None, "do not support an offset"),
    ("uprobe//bin/x:f+zz", "uprobe", None, "invalid offset"),
    ("kprobe/f+010", "kprobe", E.KprobeTarget("f", 8), ""),
    ("kprobe/f+0x1f", "kprobe", E.KprobeTarget("f", 31), ""),
    ("kretprobe/f+4", "kretprobe", None, "do not support an offset"),
    ("usdt/a:b", "usdt", None, "usdt/<binary>:<provider>:<name>"),
    ("tp/onlycategory", "tracepoint", None, "<category>/<name>"),
    ("fentry", "fentry", None, "names no attach target"),
    ("raw_tp.w/sys_enter", "raw_tracepoint.w", E.RawTracepointTarget("sys_enter"), ""),
    ("xdp.frags", "xdp", None, ""),
    ("uprobe.multi.s//bin/x:f*", "uprobe.multi", E.UprobeMultiTarget("/bin/x", "f*"), ""),
    ("lsm.s/file_open", "lsm", E.BtfTarget("file_open"), ""),
    ("kprobe_not_really", "unknown", None, "unrecognized section name"),
    ("tracepointx/a/b", "unknown", None, "unrecognized"),
])
def test_parse_section_name(sec, kind, attach, error):
    info = parse_section_name(sec)
    assert (info.kind, info.attach) == (kind, attach)
    assert (error in info.attach_error) if error else info.attach_error == ""


def test_section_flags():
    assert parse_section_name("?xdp").autoload is False and parse_section_name("?xdp").section == "xdp"
    assert parse_section_name("uprobe.s//bin/x:f").sleepable
    assert parse_section_name("raw_tp.w/x").prog_type == 24
    assert parse_section_name("cgroup/connect4").expected_attach_type == 10


# --- kconfig externs -------------------------------------------------------------------------


def test_kconfig_externs(spec):
    obj = spec("kconfig")
    config = E.read_kernel_config()
    ext = {e.name: e for e in obj.externs}
    rel = os.uname().release
    m = re.match(r"(\d+)\.(\d+)\.(\d+)", rel)
    assert ext["LINUX_KERNEL_VERSION"].value == (int(m[1]) << 16) + (int(m[2]) << 8) + min(int(m[3]), 255)
    assert ext["CONFIG_BPF_SYSCALL"].value is (config.get("CONFIG_BPF_SYSCALL") == "y")
    assert ext["CONFIG_HYBRID_DOES_NOT_EXIST"].value is None and ext["CONFIG_HYBRID_DOES_NOT_EXIST"].weak
    if "CONFIG_HZ" in config:
        assert ext["CONFIG_HZ"].value == int(config["CONFIG_HZ"])
    # libbpf's layout: by alignment (descending), size, name
    order = [e.name for e in obj.externs]
    assert order == ["CONFIG_HYBRID_DOES_NOT_EXIST", "CONFIG_HZ", "LINUX_KERNEL_VERSION", "CONFIG_BPF_SYSCALL",
                     "CONFIG_LOCALVERSION"]
    kc = obj.map(".kconfig")
    assert kc.readonly and kc.flags & BPF_F_RDONLY_PROG and kc.value_size == 13 + 32
    lkv = ext["LINUX_KERNEL_VERSION"]
    assert int.from_bytes(kc.initial[lkv.offset:lkv.offset + 4], "little") == lkv.value
    over = load_object_spec(_raw_objs["kconfig"], "kconfig", kconfig={"CONFIG_HZ": 300,
                                                                     "CONFIG_LOCALVERSION": '"-x"'})
    e2 = {e.name: e for e in over.externs}
    assert e2["CONFIG_HZ"].value == 300 and e2["CONFIG_LOCALVERSION"].value == "-x"


_raw_objs: dict[str, bytes] = {}


@pytest.fixture(autouse=True)
def _remember_objects(bpf_build):
    for name in ALL:
        if name not in _raw_objs:
            _raw_objs[name] = bpf_build.obj(name).read_bytes()


def test_kconfig_errors(bpf_build):
    strong = bpf_build.source("kcfg_strong", r"""
        #include "vmlinux.h"
        #include <bpf/bpf_helpers.h>
        extern int CONFIG_HYBRID_NOPE __kconfig;
        SEC("uprobe") int p(void *ctx) { return CONFIG_HYBRID_NOPE; }
        char LICENSE[] SEC("license") = "GPL";
    """)
    with pytest.raises(ElfError, match="CONFIG_HYBRID_NOPE.*not set in the kernel config"):
        load_object_spec(strong)
    assert load_object_spec(strong, kconfig={"CONFIG_HYBRID_NOPE": 7}).externs[0].value == 7
    virt = bpf_build.source("kcfg_virtual", r"""
        #include "vmlinux.h"
        #include <bpf/bpf_helpers.h>
        extern int LINUX_SOMETHING_ELSE __kconfig;
        SEC("uprobe") int p(void *ctx) { return LINUX_SOMETHING_ELSE; }
        char LICENSE[] SEC("license") = "GPL";
    """)
    with pytest.raises(ElfError, match="LINUX_SOMETHING_ELSE.*unrecognized virtual extern"):
        load_object_spec(virt)


# --- the verifier's structural checks on every program ------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_every_program_passes_the_verifier(spec, name):
    obj = spec(name)
    for prog in obj.programs:
        if prog.core_failures:
            # a poisoned instruction in a dead branch: the kernel's verifier prunes the branch;
            # hybrid's verifier must treat `call 0xbad2310` as a trap (see the loader's report)
            continue
        verify(structural_program(obj, prog))


# --- bad input ---------------------------------------------------------------------------------


def test_missing_symbol_is_named(bpf_build):
    with pytest.raises(ElfError) as e:
        load_object_spec(bpf_build.obj("bad_extern"))
    msg = str(e.value)
    assert "not_defined_anywhere" in msg and "section 'uprobe'" in msg and "insn #" in msg


def test_undefined_variable_is_named(bpf_build):
    path = bpf_build.source("bad_var", r"""
        #include "vmlinux.h"
        #include <bpf/bpf_helpers.h>
        extern int nowhere_var;
        SEC("uprobe") int p(void *ctx) { return nowhere_var; }
        char LICENSE[] SEC("license") = "GPL";
    """)
    with pytest.raises(ElfError, match=r"section 'uprobe', insn #\d+: reference to undefined symbol 'nowhere_var'"):
        load_object_spec(path)


def test_ksym_extern_is_refused(bpf_build):
    path = bpf_build.source("bad_ksym", r"""
        #include "vmlinux.h"
        #include <bpf/bpf_helpers.h>
        extern const int bpf_prog_active __ksym;
        SEC("uprobe") int p(void *ctx) { return *(int *)&bpf_prog_active; }
        char LICENSE[] SEC("license") = "GPL";
    """)
    with pytest.raises(ElfError, match="bpf_prog_active.*__ksym"):
        load_object_spec(path)


def test_unknown_data_section_is_refused(bpf_build):
    with pytest.raises(ElfError, match=r"'odd_var' in section '.mydata'"):
        load_object_spec(bpf_build.obj("bad_datasec"))


def test_unknown_program_section_is_carried(spec):
    p = spec("sections").program("unknown_sec")
    assert (p.kind, p.prog_type, p.attach) == ("unknown", 0, None)
    assert "unrecognized section name 'foo/bar'" in p.attach_error


@pytest.mark.parametrize("body,message", [
    ("__uint(type, BPF_MAP_TYPE_HASH); __uint(max_entries, 4); __type(key, int); __type(value, int); "
     "int (*bogus)[3];", "unknown field 'bogus'"),
    ("__uint(max_entries, 4); __type(key, int); __type(value, int);", "map type is not specified"),
    ("__uint(type, BPF_MAP_TYPE_HASH); __type(key, int); __uint(key_size, 8); __type(value, int);",
     "conflicting key_size 4 != 8"),
    ("__uint(type, BPF_MAP_TYPE_HASH); int max_entries;", "expected a pointer"),
])
def test_bad_map_definitions(bpf_build, body, message):
    path = bpf_build.source("bad_map", r"""
        #include "vmlinux.h"
        #include <bpf/bpf_helpers.h>
        struct { %s } the_map SEC(".maps");
        SEC("uprobe") int p(void *ctx) { return bpf_map_lookup_elem(&the_map, &ctx) != 0; }
        char LICENSE[] SEC("license") = "GPL";
    """ % body)
    with pytest.raises(ElfError, match=message):
        load_object_spec(path)


def test_long_map_name_is_refused(bpf_build):
    name = "m" * 70
    path = bpf_build.source("long_map", r"""
        #include "vmlinux.h"
        #include <bpf/bpf_helpers.h>
        struct { __uint(type, BPF_MAP_TYPE_ARRAY); __uint(max_entries, 1); __type(key, u32); __type(value, u32); }
            %s SEC(".maps");
        SEC("uprobe") int p(void *ctx) { u32 k = 0; return bpf_map_lookup_elem(&%s, &k) != 0; }
        char LICENSE[] SEC("license") = "GPL";
    """ % (name, name))
    with pytest.raises(ElfError, match="name longer than 63 bytes"):
        load_object_spec(path)


def test_not_an_ebpf_object(tmp_path, bpf_build):
    with pytest.raises(ElfError, match="not an ELF file"):
        load_object_spec(b"hello world" * 10)
    with pytest.raises(ElfError, match="truncated ELF header"):
        load_object_spec(b"\x7fELF")
    with pytest.raises(ElfError, match="cannot read"):
        load_object_spec(tmp_path / "nonexistent.o")
    with pytest.raises(ElfError, match="not a relocatable object"):
        load_object_spec("/bin/true")
    host = tmp_path / "host.o"
    src = tmp_path / "host.c"
    src.write_text("int f(void) { return 1; }\n")
    import subprocess

    subprocess.run([bpf_build.clang, "-c", str(src), "-o", str(host)], check=True)
    with pytest.raises(ElfError, match="not an eBPF object"):
        load_object_spec(host)
    big = bytearray(_raw_objs["globals"])
    big[5] = 2
    with pytest.raises(ElfError, match="big-endian"):
        load_object_spec(bytes(big))


@pytest.mark.parametrize("name", ["globals", "maps", "core"])
def test_truncated_objects(name):
    data = _raw_objs[name]
    for cut in (0, 16, 63, 64, 65, 200, len(data) // 3, len(data) // 2, len(data) - 200, len(data) - 1):
        with pytest.raises((ElfError, BtfError)) as e:
            load_object_spec(data[:cut], name)
        assert name in str(e.value)
        if cut < 64:
            assert "truncated" in str(e.value) or "not an ELF" in str(e.value)


def test_corrupted_btf_is_reported_with_offset_and_type_id(bpf_build):
    path = bpf_build.obj("globals")
    data = bytearray(_raw_objs["globals"])
    off, btf = section_bytes(path, ".BTF")
    bad = bytearray(data)
    bad[off:off + 2] = b"\x00\x00"
    with pytest.raises(BtfError, match=r"globals: \.BTF.*offset 0x0: bad magic"):
        load_object_spec(bytes(bad), "globals")
    hdr_len, type_off = struct.unpack_from("<II", btf, 4)
    first = off + hdr_len + type_off
    bad = bytearray(data)
    bad[first + 7] = 0x1F  # kind 31 for type id 1
    with pytest.raises(BtfError, match=r"type id 1, offset 0x%x: unknown kind 31" % (hdr_len + type_off)):
        load_object_spec(bytes(bad), "globals")
    bad = bytearray(data)
    struct.pack_into("<I", bad, first + 8, 0x7FFFFFFF)  # the first type refers to a nonexistent type
    with pytest.raises(BtfError, match=r"type id 1"):
        load_object_spec(bytes(bad), "globals")


def test_relocation_out_of_range(bpf_build):
    path = bpf_build.obj("subprogs")
    data = bytearray(_raw_objs["subprogs"])
    off, rel = section_bytes(path, ".reluprobe")
    struct.pack_into("<Q", data, off, 0x7FFFFFF8)  # r_offset far past the section
    with pytest.raises(ElfError, match=r"section 'uprobe', relocation #0: invalid offset"):
        load_object_spec(bytes(data), "subprogs")
    data = bytearray(_raw_objs["subprogs"])
    struct.pack_into("<Q", data, off + 8, (0xFFFFFF << 32) | 10)  # symbol index that does not exist
    with pytest.raises(ElfError, match="symbol #16777215 does not exist"):
        load_object_spec(bytes(data), "subprogs")


# --- fuzzing ----------------------------------------------------------------------------------


def _ranges(name: str) -> list[tuple[int, int]]:
    """File ranges worth mutating: the sections the loader parses."""
    from io import BytesIO

    from elftools.elf.elffile import ELFFile

    elf = ELFFile(BytesIO(_raw_objs[name]))
    out = [(0, 64), (elf.header["e_shoff"], elf.header["e_shnum"] * 64)]
    for s in elf.iter_sections():
        if s.name in (".BTF", ".BTF.ext", ".symtab", ".maps", ".strtab") or s.name.startswith(".rel") \
                and "debug" not in s.name or s["sh_flags"] & 4:
            if s["sh_type"] != "SHT_NOBITS" and s["sh_size"]:
                out.append((s["sh_offset"], s["sh_size"]))
    return out


@pytest.mark.timeout(600)
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(st.sampled_from(["globals", "subprogs", "core", "maps", "kconfig", "legacy"]), st.data())
def test_fuzz_mutated_objects_raise_only_hybrid_errors(name, data):
    raw = bytearray(_raw_objs[name])
    ranges = _ranges(name)
    for _ in range(data.draw(st.integers(1, 8))):
        start, size = data.draw(st.sampled_from(ranges))
        pos = start + data.draw(st.integers(0, size - 1))
        raw[pos] = data.draw(st.integers(0, 255) | st.sampled_from([0, 0xFF, 0x7F, 0x80]))
    if data.draw(st.booleans()):
        raw = raw[:data.draw(st.integers(0, len(raw)))]
    try:
        obj = load_object_spec(bytes(raw), name)
    except HybridError:
        return
    for p in obj.programs:  # whatever loads re-encodes, and the verifier accepts or refuses it cleanly
        assert isa.decode(p.code) == list(p.insns)
        try:
            verify(structural_program(obj, p))
        except HybridError:
            pass


# --- objects without BTF (clang without -g) ----------------------------------------------------


def test_objects_without_btf(bpf_build):
    from tests.conftest import PROGS

    legacy = load_object_spec(bpf_build.compile(PROGS / "legacy.bpf.c", "legacy_nobtf", ("-g0",)))
    assert legacy.btf is None and [m.name for m in legacy.maps] == ["legacy_hash", "legacy_array"]
    verify(structural_program(legacy, legacy.program("count")))
    glob = load_object_spec(bpf_build.compile(PROGS / "globals.bpf.c", "globals_nobtf", ("-g0",)))
    assert glob.btf is None and [m.name for m in glob.maps] == [".rodata", ".data", ".data.custom", ".bss"]
    tp = glob.variable("target_pid")
    assert (tp.type_id, tp.size) == (0, 4)
    assert int.from_bytes(glob.map(".rodata").initial[tp.offset:tp.offset + 4], "little") == 1234
    assert all(m.flags == (BPF_F_RDONLY_PROG if m.readonly else 0) for m in glob.maps)  # not mmapable without BTF
    with pytest.raises(ElfError, match="section '.maps' needs BTF"):
        load_object_spec(bpf_build.compile(PROGS / "maps.bpf.c", "maps_nobtf", ("-g0",)))


# --- CO-RE relocation kinds clang 14 cannot emit, on records written by hand ----------------------


@needs_kernel_btf
def test_core_type_matches_and_type_id_local(spec):
    obj = spec("core")
    local, kern = obj.btf, B.kernel_btf()
    res = C.CoreResolver(local, kern, "vmlinux")
    ts_local = local.find("task_struct", B.Kind.STRUCT).id
    old_local = local.find("task_struct___old", B.Kind.STRUCT).id
    lh_local = local.find("list_head", B.Kind.STRUCT).id
    TM, TL, TE = B.CoreReloKind.TYPE_MATCHES, B.CoreReloKind.TYPE_ID_LOCAL, B.CoreReloKind.TYPE_EXISTS
    # list_head is the kernel's; the ___old flavor has a member the kernel lacks.  (Like libbpf, integer
    # names are compared too, so vmlinux.h's "unsigned long" does not match the kernel's "long unsigned int"
    # and a whole task_struct does not match.)
    assert res.resolve(B.CoreRelo(0, lh_local, "0", TM)).new_val == 1
    assert res.resolve(B.CoreRelo(0, old_local, "0", TM)).new_val == 0
    assert res.resolve(B.CoreRelo(0, ts_local, "0", TM)).new_val == 0
    assert res.resolve(B.CoreRelo(0, old_local, "0", TE)).new_val == 1  # exists: compatible kind and name
    r = res.resolve(B.CoreRelo(0, old_local, "0", TL))
    assert (r.orig_val, r.new_val, r.validate) == (old_local, old_local, False)
    with pytest.raises(BtfError, match="access string"):
        res.resolve(B.CoreRelo(0, ts_local, "0:1", TE))
    with pytest.raises(BtfError, match="has no member #9999"):
        res.resolve(B.CoreRelo(0, ts_local, "0:9999", B.CoreReloKind.FIELD_BYTE_OFFSET))
    with pytest.raises(BtfError, match="unknown relocation kind 77"):
        res.resolve(B.CoreRelo(0, ts_local, "0:1", 77))


@needs_kernel_btf
def test_core_enum_value_missing_is_poisoned(bpf_build):
    path = bpf_build.source("core_enum", r"""
        #include "vmlinux.h"
        #include <bpf/bpf_helpers.h>
        #include <bpf/bpf_core_read.h>
        enum bpf_func_id___mine { BPF_FUNC_hybrid_does_not_exist___mine = 4242 };
        u64 out[2];
        SEC("uprobe") int p(void *ctx) {
            if (bpf_core_enum_value_exists(enum bpf_func_id___mine, BPF_FUNC_hybrid_does_not_exist___mine))
                out[0] = bpf_core_enum_value(enum bpf_func_id___mine, BPF_FUNC_hybrid_does_not_exist___mine);
            out[1] = bpf_core_type_id_local(struct task_struct);
            return 0;
        }
        char LICENSE[] SEC("license") = "GPL";
    """)
    obj = load_object_spec(path)
    prog = obj.program("p")
    (f,) = prog.core_failures
    assert f.kind == "enumval_value" and "enum value not found" in f.message
    assert "bpf_func_id___mine::BPF_FUNC_hybrid_does_not_exist___mine" in f.message
    poisoned = dict(zip(isa.slot_index(prog.insns), prog.insns))[f.insn]
    assert poisoned.opcode == 0x85 and poisoned.imm == C.POISON_HELPER_ID  # the lddw's first slot
    assert poisoned.slots == 1  # both slots of the lddw became calls
    nxt = dict(zip(isa.slot_index(prog.insns), prog.insns))[f.insn + 1]
    assert nxt.opcode == 0x85 and nxt.imm == C.POISON_HELPER_ID


def test_btf_ext_records_follow_appended_subprograms(spec):
    obj = spec("subprogs")
    for prog in (obj.program("prog_a"), obj.program("prog_b")):
        funcs = [(r.insn, obj.btf[r.type_id].name) for r in prog.func_info]
        assert funcs == [(0, prog.name)] + [(start, name) for name, start in prog.subprograms]
        assert prog.btf_func_type_id == prog.func_info[0].type_id
        assert all(0 <= r.insn < len(prog.code) // 8 for r in prog.line_info)
        for name, start in prog.subprograms:  # each appended function starts with its own source line
            first = min((r for r in prog.line_info if r.insn >= start), key=lambda r: r.insn)
            assert first.insn == start and first.file_name.endswith("subprogs.bpf.c")


@needs_kernel_btf
def test_poison_in_a_shared_subprogram_is_reported_per_program(bpf_build):
    path = bpf_build.source("core_sub", r"""
        #include "vmlinux.h"
        #include <bpf/bpf_helpers.h>
        #include <bpf/bpf_core_read.h>
        struct task_struct___x { int no_such_field_here; } __attribute__((preserve_access_index));
        static __noinline int probe_field(struct task_struct___x *t)
        {
            if (bpf_core_field_exists(t->no_such_field_here))
                return t->no_such_field_here;
            return -1;
        }
        SEC("uprobe") int first(void *ctx) { return 1; }
        SEC("uprobe") int one(void *ctx) { return probe_field((void *)bpf_get_current_task()); }
        SEC("uprobe") int two(void *ctx) { int x = 5; return x + probe_field((void *)bpf_get_current_task()); }
        char LICENSE[] SEC("license") = "GPL";
    """)
    obj = load_object_spec(path)
    assert obj.program("first").core_failures == ()
    for name in ("one", "two"):
        prog = obj.program(name)
        (f,) = prog.core_failures
        start = dict(prog.subprograms)["probe_field"]
        assert f.section == ".text" and start <= f.insn < len(prog.code) // 8
        insn = dict(zip(isa.slot_index(prog.insns), prog.insns))[f.insn]
        assert insn.imm == C.POISON_HELPER_ID and "no_such_field_here" in f.message
