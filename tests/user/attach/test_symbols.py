"""Targets, libraries, symbols and addresses (hybrid.user.attach.symbols)."""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess

import pytest

from hybrid.errors import AttachError
from hybrid.user.attach import symbols as S
from hybrid.user.elf import UprobeTarget, UsdtTarget

LIBC = "/lib/x86_64-linux-gnu/libc.so.6"
needs_gcc = pytest.mark.skipif(not shutil.which("gcc"), reason="gcc not installed")
needs_libc = pytest.mark.skipif(not os.path.exists(LIBC), reason="no libc.so.6")


def _sh(*cmd: str) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, "%s failed:\n%s" % (" ".join(cmd), r.stderr)
    return r.stdout


def _readelf_syms(path) -> list[tuple[int, int, str, str, str]]:
    """(value, size, type, ndx, name) of every symbol, from readelf -sW."""
    out = []
    for line in _sh("readelf", "-sW", "--dyn-syms", str(path)).splitlines():
        m = re.match(r"\s*\d+: ([0-9a-f]+)\s+(\d+|0x[0-9a-f]+)\s+(\w+)\s+\w+\s+\w+\s+(\w+)\s+(\S+)", line)
        if m:
            out.append((int(m.group(1), 16), int(m.group(2), 0), m.group(3), m.group(4), m.group(5)))
    return out


# --- section names -----------------------------------------------------------------


def test_parse_target_forms():
    assert S.parse_target("uprobe//usr/lib/x86_64-linux-gnu/libc.so.6:malloc") == \
        UprobeTarget("/usr/lib/x86_64-linux-gnu/libc.so.6", "malloc", 0, False)
    assert S.parse_target("uprobe/libc.so.6:malloc") == UprobeTarget("libc.so.6", "malloc", 0, False)
    assert S.parse_target("uprobe/./prog:func+0x10") == UprobeTarget("./prog", "func", 0x10, False)
    assert S.parse_target("uretprobe/./prog:func") == UprobeTarget("./prog", "func", 0, True)
    t = S.parse_target("uprobe/prog:0x1234")
    assert S.raw_offset(t.func) == 0x1234 and S.raw_offset("malloc") is None
    assert S.parse_target("usdt/./prog:prov:name") == UsdtTarget("./prog", "prov", "name")
    with pytest.raises(AttachError, match="uretprobes do not support an offset"):
        S.parse_target("uretprobe/./prog:func+0x10")
    with pytest.raises(AttachError, match="expected uprobe/<binary>"):
        S.parse_target("uprobe/prog")
    with pytest.raises(AttachError, match="not a uprobe"):
        S.parse_target("kprobe/do_sys_open")
    with pytest.raises(AttachError, match="names no target"):
        S.parse_target("uprobe")


# --- libraries ---------------------------------------------------------------------


@needs_libc
def test_find_library(tmp_path, monkeypatch):
    libc_real = os.path.realpath(LIBC)
    assert os.path.realpath(S.find_library("libc.so.6")) == libc_real
    assert S.find_library(LIBC) == LIBC
    mapped = S.find_library("libc.so.6", pid=os.getpid())
    assert os.path.realpath(mapped) == libc_real and mapped in open("/proc/self/maps").read()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "prog").write_bytes(b"\x7fELF")
    assert S.find_library("./prog") == str(tmp_path / "prog")
    libdir = tmp_path / "lib"
    libdir.mkdir()
    (libdir / "libzz.so.1").write_bytes(b"")
    monkeypatch.setenv("LD_LIBRARY_PATH", str(libdir))
    assert S.find_library("libzz.so.1") == str(libdir / "libzz.so.1")
    assert S.find_library("ls") == shutil.which("ls")
    with pytest.raises(AttachError, match=r"cannot find 'libnope\.so\.9': searched LD_LIBRARY_PATH=.*ldconfig"):
        S.find_library("libnope.so.9")
    with pytest.raises(AttachError, match=r"/proc/%d/maps" % os.getpid()):
        S.find_library("libnope.so.9", pid=os.getpid())
    with pytest.raises(AttachError, match="no such file"):
        S.find_library("./missing")


# --- symbols -----------------------------------------------------------------------


@needs_libc
def test_resolve_symbol_libc_matches_readelf():
    syms = _readelf_syms(LIBC)
    for name in ("malloc", "free", "open"):
        want = [s for s in syms if s[4].split("@")[0] == name and s[2] == "FUNC" and s[3] != "UND"]
        got = S.resolve_symbol(LIBC, name)
        assert (got.vaddr, got.size, got.kind) == (want[0][0], want[0][1], "FUNC"), name
        assert got.file_offset == S.vaddr_to_offset(LIBC, got.vaddr)
    # memcpy has two versions: memcpy@GLIBC_2.2.5 (old FUNC) and memcpy@@GLIBC_2.14 (default IFUNC)
    default = [s for s in syms if s[4].startswith("memcpy@@")][0]
    m = S.resolve_symbol(LIBC, "memcpy")
    assert (m.vaddr, m.size, m.is_ifunc, m.kind) == (default[0], default[1], True, "IFUNC")


@needs_libc
def test_module_load_bias_and_process_memory():
    libc = ctypes.CDLL("libc.so.6")
    addr = ctypes.cast(libc.malloc, ctypes.c_void_p).value
    bias = S.module_load_bias(os.getpid(), LIBC)
    assert bias + S.resolve_symbol(LIBC, "malloc").vaddr == addr
    sym = S.resolve_symbol(LIBC, "malloc")
    assert S.read_process_memory(os.getpid(), addr, 32) == S.read_code(LIBC, sym.vaddr, 32)
    buf = ctypes.create_string_buffer(b"hello hybrid")
    assert S.read_process_memory(os.getpid(), ctypes.addressof(buf), 12) == b"hello hybrid"
    with pytest.raises(AttachError, match="cannot read 8 bytes at 0x8 of process"):
        S.read_process_memory(os.getpid(), 8, 8)


IFUNC_PROBE = r"""
#define _GNU_SOURCE
#include <link.h>
#include <stdio.h>
#include <string.h>
static unsigned long libc_bias;
static int cb(struct dl_phdr_info *info, size_t size, void *data) {
    if (strstr(info->dlpi_name, "libc.so.6")) libc_bias = info->dlpi_addr;
    return 0;
}
int main(void) {
    size_t (*volatile pstrlen)(const char *) = strlen;
    void *(*volatile pmemcpy)(void *, const void *, size_t) = memcpy;
    dl_iterate_phdr(cb, 0);
    printf("%lx %lx\n", (unsigned long)pstrlen - libc_bias, (unsigned long)pmemcpy - libc_bias);
    return 0;
}
"""


@needs_gcc
@needs_libc
def test_resolve_ifunc_matches_a_process(tmp_path):
    src = tmp_path / "ifunc.c"
    src.write_text(IFUNC_PROBE)
    exe = tmp_path / "ifunc"
    _sh("gcc", "-O1", "-fno-builtin", "-o", str(exe), str(src))
    strlen_v, memcpy_v = (int(x, 16) for x in _sh(str(exe)).split())
    s = S.resolve_ifunc(LIBC, "strlen")
    m = S.resolve_ifunc(LIBC, "memcpy")
    assert (s.vaddr, m.vaddr) == (strlen_v, memcpy_v)
    assert not s.is_ifunc and s.size > 0 and m.size > 0
    assert s.vaddr != S.resolve_symbol(LIBC, "strlen").vaddr  # not the resolver
    # the probe target of an IFUNC is its implementation
    loc = S.resolve_uprobe("uprobe/libc.so.6:strlen")
    assert loc.vaddr == strlen_v and loc.func_entry
    # the implementation's size is its .eh_frame FDE range (objdump shows the code up to the next FDE)
    code = S.function_bytes(LIBC, s)
    assert len(code) == s.size
    f = S.function_containing(LIBC, s.vaddr + 5)  # no .symtab: the .eh_frame FDE
    assert (f.vaddr, f.size) == (s.vaddr, s.size)
    # a non-IFUNC symbol is returned as is
    assert S.resolve_ifunc(LIBC, "malloc") == S.resolve_symbol(LIBC, "malloc")


@needs_libc
def test_function_size_from_eh_frame_matches_symbol():
    for name in ("malloc", "free", "qsort"):
        sym = S.resolve_symbol(LIBC, name)
        assert S._eh_frame_range(S.elf_image(LIBC), sym.vaddr) == (sym.vaddr, sym.size), name
        assert sym.vaddr in S.fde_starts(LIBC)


C_PROG = r"""
int helper(int x) { return x * 3; }
int main(int argc, char **argv) { return helper(argc); }
"""


@needs_gcc
def test_non_pie_offsets_match_objdump(tmp_path):
    src = tmp_path / "p.c"
    src.write_text(C_PROG)
    exe = tmp_path / "p"
    _sh("gcc", "-O1", "-no-pie", "-fno-inline", "-o", str(exe), str(src))
    dump = _sh("objdump", "-d", "-F", str(exe))
    m = re.search(r"^([0-9a-f]+) <helper> \(File Offset: 0x([0-9a-f]+)\):", dump, re.M)
    vaddr, off = int(m.group(1), 16), int(m.group(2), 16)
    assert vaddr != off  # non-PIE: 0x401xxx vs 0x1xxx
    sym = S.resolve_symbol(exe, "helper")
    assert (sym.vaddr, sym.file_offset) == (vaddr, off)
    assert S.vaddr_to_offset(exe, vaddr) == off and S.offset_to_vaddr(exe, off) == vaddr
    data = exe.read_bytes()
    assert S.read_code(exe, vaddr, 8) == data[off:off + 8]
    assert S.function_bytes(exe, sym) == data[off:off + sym.size]
    loc = S.resolve_uprobe(S.parse_target("uprobe/%s:helper+0x2" % exe))
    assert (loc.vaddr, loc.file_offset, loc.func_entry, loc.symbol.name) == (vaddr + 2, off + 2, False, "helper")
    loc = S.resolve_uprobe("uprobe/%s:%#x" % (exe, off))  # raw file offset, like libbpf's func_offset
    assert (loc.vaddr, loc.func_entry, loc.symbol.name) == (vaddr, True, "helper")
    f = S.function_containing(exe, vaddr + 3)
    assert (f.name, f.vaddr, f.size) == ("helper", vaddr, sym.size)
    assert S.function_containing(exe, 0x10) is None
    with pytest.raises(AttachError, match="past the end of 'helper'"):
        S.resolve_uprobe("uprobe/%s:helper+0x1000" % exe)
    with pytest.raises(AttachError, match="address 0x10 is in no PT_LOAD"):
        S.vaddr_to_offset(exe, 0x10)
    with pytest.raises(AttachError, match="file offset 0x7fffffff is in no PT_LOAD"):
        S.offset_to_vaddr(exe, 0x7FFFFFFF)
    # the process running it: bias 0 for a non-PIE executable
    p = subprocess.Popen(["sleep", "5"])
    try:
        assert S.module_load_bias(p.pid, shutil.which("sleep")) >= 0
        with pytest.raises(AttachError, match="is not mapped in process"):
            S.module_load_bias(p.pid, exe)
    finally:
        p.kill()
        p.wait()


def test_errors(tmp_path):
    with pytest.raises(AttachError, match="missing: no such file"):
        S.resolve_symbol(tmp_path / "missing", "f")
    txt = tmp_path / "text"
    txt.write_text("hello\n")
    with pytest.raises(AttachError, match="text: not an ELF file"):
        S.resolve_symbol(txt, "f")
    if os.path.exists(LIBC):
        with pytest.raises(AttachError, match=r"libc\.so\.6: symbol 'no_such_function_xyz' is not in \.symtab"):
            S.resolve_symbol(LIBC, "no_such_function_xyz")
    with pytest.raises(AttachError, match="symbol 'f' is not"):
        S.resolve_symbol(shutil.which("sh") or "/bin/sh", "f")


@needs_gcc
def test_undefined_symbol_is_named(tmp_path):
    src = tmp_path / "u.c"
    src.write_text("#include <stdio.h>\nint main(void){ puts(\"x\"); return 0; }\n")
    exe = tmp_path / "u"
    _sh("gcc", "-o", str(exe), str(src))
    with pytest.raises(AttachError, match="'puts' is not defined in this file"):
        S.resolve_symbol(exe, "puts")
