"""Bad input through hybrid.load(): every refusal is a HybridError naming what is wrong and where."""

from __future__ import annotations

import re
import struct
from io import BytesIO

import pytest
from elftools.elf.elffile import ELFFile

import hybrid
from hybrid.errors import BtfError, ElfError, HybridError, MapError, VerifierError
from hybrid.user import isa

HEADER = r"""
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
char LICENSE[] SEC("license") = "GPL";
"""


def load_error(path, kind: type[HybridError] = HybridError) -> str:
    with pytest.raises(HybridError) as e:
        hybrid.load(path)
    assert isinstance(e.value, kind), repr(e.value)
    return str(e.value)


def section(data: bytes, name: str) -> tuple[int, int]:
    """(file offset, size) of section ``name``."""
    s = ELFFile(BytesIO(data)).get_section_by_name(name)
    return s["sh_offset"], s["sh_size"]


def program_offset(data: bytes, prog: str) -> tuple[str, int]:
    """(section name, offset in it) of the function symbol ``prog``."""
    elf = ELFFile(BytesIO(data))
    sym = elf.get_section_by_name(".symtab").get_symbol_by_name(prog)[0]
    return elf.get_section(sym["st_shndx"]).name, sym["st_value"]


@pytest.fixture(scope="module")
def raw(bpf_build) -> bytes:
    return bpf_build.obj("helpers_mem").read_bytes()


def test_truncated_object(raw, tmp_path):
    path = tmp_path / "cut.bpf.o"
    for size in (0, 10, 63, 64, 1000, len(raw) // 2, len(raw) - 1):
        path.write_bytes(raw[:size])
        msg = load_error(path, ElfError)
        assert msg.startswith("cut: ") and "truncated" in msg, msg


def test_not_an_elf_file(tmp_path):
    path = tmp_path / "text.bpf.o"
    path.write_bytes(b"SEC(\"uprobe\") int p(void *ctx) { return 0; }\n" * 4)
    msg = load_error(path, ElfError)
    assert msg.startswith("text: ") and "not an ELF file" in msg, msg


def test_corrupted_btf(raw, tmp_path):
    off, _ = section(raw, ".BTF")
    bad = bytearray(raw)
    bad[off:off + 2] = b"\0\0"
    path = tmp_path / "btf.bpf.o"
    path.write_bytes(bad)
    msg = load_error(path, BtfError)
    assert re.search(r"^btf: \.BTF.*offset 0x0: bad magic", msg), msg


def test_corrupted_relocation(raw, tmp_path):
    off, _ = section(raw, ".reluprobe")
    bad = bytearray(raw)
    struct.pack_into("<Q", bad, off + 16 + 8, (0xABCDEF << 32) | 1)  # relocation #1: a symbol that does not exist
    path = tmp_path / "rel.bpf.o"
    path.write_bytes(bad)
    msg = load_error(path, ElfError)
    assert msg == "rel: relocation section '.reluprobe', entry #1: symbol #11259375 does not exist", msg


def test_corrupted_instruction_names_the_program_and_insn(raw, tmp_path):
    sec, start = program_offset(raw, "loop")
    off, _ = section(raw, sec)
    insns = isa.decode(raw[off + start:off + start + 8 * 8])
    k = next(i for i, insn in enumerate(insns) if insn.opcode != 0x18 and (i == 0 or insns[i - 1].opcode != 0x18))
    bad = bytearray(raw)
    bad[off + start + 8 * k] = 0xFF  # no such opcode
    path = tmp_path / "insn.bpf.o"
    path.write_bytes(bad)
    msg = load_error(path, VerifierError)
    assert msg.startswith("program 'loop' (section 'uprobe'): insn #%d " % k) and "unknown opcode 0xff" in msg, msg


def test_unknown_map_type(bpf_build):
    path = bpf_build.source("unknown_map_type", HEADER + r"""
        struct { __uint(type, 99); __uint(max_entries, 4); __type(key, u32); __type(value, u64); } odd SEC(".maps");
        SEC("uprobe") int p(void *ctx) { u32 k = 0; return bpf_map_lookup_elem(&odd, &k) != 0; }
    """)
    with pytest.raises(MapError) as e:
        hybrid.load(path)
    assert "map 'odd'" in str(e.value) and "unknown map type 99" in str(e.value), str(e.value)
    assert str(e.value).endswith("in object 'unknown_map_type'"), str(e.value)


def test_missing_extern_function(bpf_build):
    path = bpf_build.source("missing_function", HEADER + r"""
        extern int not_defined_anywhere(int x);
        SEC("uprobe") int first(void *ctx) { return 1; }
        SEC("uprobe") int calls_missing(void *ctx) { return not_defined_anywhere(3) + 1; }
    """)
    msg = load_error(path, ElfError)
    assert re.search(r"^missing_function: section 'uprobe', insn #\d+: call to undefined symbol "
                     r"'not_defined_anywhere'", msg), msg


def test_missing_extern_variable(bpf_build):
    path = bpf_build.source("missing_variable", HEADER + r"""
        extern int nowhere_var;
        SEC("uprobe") int reads_missing(void *ctx) { return nowhere_var; }
    """)
    msg = load_error(path, ElfError)
    assert re.search(r"^missing_variable: section 'uprobe', insn #\d+: reference to undefined symbol 'nowhere_var'",
                     msg), msg


def test_unknown_helper(bpf_build):
    path = bpf_build.source("unknown_helper", HEADER + r"""
        SEC("uprobe") int fine(void *ctx) { return 1; }
        SEC("uprobe/target") int calls_999(void *ctx) { return ((long (*)(void))999)() + 1; }
    """)
    msg = load_error(path, VerifierError)
    assert re.search(r"^program 'calls_999' \(section 'uprobe/target'\): insn #\d+ \(call 999\): unknown helper 999$",
                     msg), msg


def test_an_error_frees_what_was_made(bpf_build):
    """A refused object leaves no map region behind (the region is closed, its file unlinked)."""
    import os

    before = set(os.listdir("/dev/shm"))
    path = bpf_build.source("unknown_helper2", HEADER + r"""
        struct { __uint(type, BPF_MAP_TYPE_HASH); __uint(max_entries, 4); __type(key, u32); __type(value, u64); }
            m SEC(".maps");
        SEC("uprobe") int p(void *ctx) { u32 k = 0; bpf_map_lookup_elem(&m, &k); return ((long (*)(void))998)(); }
    """)
    load_error(path, VerifierError)
    assert {f for f in os.listdir("/dev/shm") if f.startswith("hybrid.%d." % os.getpid())} <= before
