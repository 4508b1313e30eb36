"""USDT notes and argument specs (hybrid.user.attach.usdt) against readelf and libbpf's C structs."""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess

import pytest

from hybrid.errors import AttachError
from hybrid.user.attach import usdt as U
from hybrid.user.attach.symbols import read_code

SDT_H = "/usr/include/x86_64-linux-gnu/sys/sdt.h"
USDT_BPF_H = "/usr/include/bpf/usdt.bpf.h"
needs_sdt = pytest.mark.skipif(not shutil.which("gcc") or not (os.path.exists(SDT_H) or os.path.exists(
    "/usr/include/sys/sdt.h")), reason="gcc or sys/sdt.h (systemtap-sdt-dev) missing")

PLAIN_C = r"""
#include <sys/sdt.h>
volatile long g = 5;
int sema_work(int a, short c);
int work(int a, long b) {
    DTRACE_PROBE2(prov, two, a, b);
    STAP_PROBE(prov, zero);
    STAP_PROBE1(prov, konst, 42);
    return a + (int)b + sema_work(a, -3);
}
int main(int argc, char **argv) { return work(argc, 7); }
"""

SEMA_C = r"""
#define _SDT_HAS_SEMAPHORES 1
#include <sys/sdt.h>
unsigned short prov_withsema_semaphore __attribute__((unused)) __attribute__((section(".probes")));
extern volatile long g;
int sema_work(int a, short c) {
    if (prov_withsema_semaphore) STAP_PROBE3(prov, withsema, a, g, c);
    return a;
}
"""


def _sh(*cmd: str) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, "%s failed:\n%s" % (" ".join(cmd), r.stderr)
    return r.stdout


@pytest.fixture(scope="module")
def usdt_prog(tmp_path_factory):
    if not shutil.which("gcc") or not os.path.exists(SDT_H):
        pytest.skip("gcc or sys/sdt.h missing")
    d = tmp_path_factory.mktemp("usdt")
    (d / "plain.c").write_text(PLAIN_C)
    (d / "sema.c").write_text(SEMA_C)
    exe = d / "u"
    _sh("gcc", "-O2", "-o", str(exe), str(d / "plain.c"), str(d / "sema.c"))
    return exe


def _readelf_notes(path) -> list[dict]:
    text = _sh("readelf", "-n", str(path))
    out = []
    for m in re.finditer(r"Provider: (\S+)\s+Name: (\S+)\s+Location: (0x[0-9a-f]+), Base: (0x[0-9a-f]+), "
                         r"Semaphore: (0x[0-9a-f]+)\s+Arguments: ?([^\n]*)", text):
        out.append({"provider": m.group(1), "name": m.group(2), "pc": int(m.group(3), 16),
                    "base": int(m.group(4), 16), "sema": int(m.group(5), 16), "args": m.group(6).strip()})
    return out


def _section(path, name) -> tuple[int, int]:
    for line in _sh("readelf", "-SW", str(path)).splitlines():
        m = re.search(r"\] %s\s+\w+\s+([0-9a-f]+) ([0-9a-f]+)" % re.escape(name), line)
        if m:
            return int(m.group(1), 16), int(m.group(2), 16)
    raise AssertionError(name)


def test_notes_match_readelf(usdt_prog):
    want = _readelf_notes(usdt_prog)
    got = U.read_usdt_notes(usdt_prog)
    assert len(want) == 4
    assert [(n.provider, n.name, n.pc, n.note_pc, n.base, n.semaphore, n.args) for n in got] == \
        [(w["provider"], w["name"], w["pc"], w["pc"], w["base"], w["sema"], w["args"]) for w in want]
    sema = [n for n in got if n.name == "withsema"][0]
    addr, off = _section(usdt_prog, ".probes")
    assert sema.semaphore == addr and sema.semaphore_offset == off
    assert all(n.semaphore_offset == 0 for n in got if n.name != "withsema")
    for n in got:  # every probe site is a nop
        assert read_code(usdt_prog, n.pc, 1) == b"\x90"
    assert [n.name for n in U.find_usdt(usdt_prog, "prov", "konst")] == ["konst"]
    assert U.parse_usdt_args([n for n in got if n.name == "two"][0].args) == (
        U.UsdtArg(U.USDT_ARG_REG, 0, 112, True, 32, 4, "-4@%edi"),
        U.UsdtArg(U.USDT_ARG_REG, 0, 104, True, 0, 8, "-8@%rsi"))
    # gcc writes a global as "-8@g(%rip)": libbpf 1.1 refuses it, so do we
    with pytest.raises(AttachError, match=r"unrecognized arg #1 spec '-8@g\(%rip\)'"):
        U.parse_usdt_args(sema.args)


def test_find_usdt_errors(usdt_prog, tmp_path):
    with pytest.raises(AttachError, match=r"no USDT probe prov:nope \(has prov:konst, prov:two"):
        U.find_usdt(usdt_prog, "prov", "nope")
    with pytest.raises(AttachError, match="no .note.stapsdt notes"):
        U.find_usdt(shutil.which("sh") or "/bin/sh", "prov", "two")
    with pytest.raises(AttachError, match="no such file"):
        U.read_usdt_notes(tmp_path / "missing")
    (tmp_path / "t").write_text("text")
    with pytest.raises(AttachError, match="not an ELF file"):
        U.read_usdt_notes(tmp_path / "t")


def test_prelink_adjustment(usdt_prog, tmp_path):
    """A note whose recorded .stapsdt.base differs from the section's address moves pc by the difference."""
    data = bytearray(usdt_prog.read_bytes())
    base_addr, _ = _section(usdt_prog, ".stapsdt.base")
    _, note_off = _section(usdt_prog, ".note.stapsdt")
    # first note: 12-byte header, "stapsdt\0", then pc, base, sema
    desc = note_off + 12 + 8
    pc, base = struct.unpack_from("<QQ", data, desc)
    assert base == base_addr
    struct.pack_into("<QQ", data, desc, pc - 0x100, base - 0x100)  # "prelinked" 0x100 lower
    patched = tmp_path / "prelinked"
    patched.write_bytes(bytes(data))
    n = U.read_usdt_notes(patched)[0]
    assert (n.note_pc, n.base, n.pc) == (pc - 0x100, base - 0x100, pc)


@pytest.mark.parametrize("text, want", [
    ("-4@%edi", [(1, 0, 112, True, 32)]),
    ("8@-16(%rbp)", [(2, -16, 32, False, 0)]),
    ("-4@$5", [(0, 5, 0, True, 32)]),
    ("8@%rax", [(1, 0, 80, False, 0)]),
    ("2@(%rsp)", [(2, 0, 152, False, 48)]),
    ("1@%r9b -1@%sil 4@%r10d 2@%r15w", [(1, 0, 64, False, 56), (1, 0, 104, True, 56), (1, 0, 56, False, 32),
                                        (1, 0, 0, False, 48)]),
    ("  -8@$-1   4@8(%rip) ", [(0, -1, 0, True, 0), (2, 8, 128, False, 32)]),
    ("", []),
])
def test_parse_args(text, want):
    got = U.parse_usdt_args(text)
    assert [(a.arg_type, a.val_off, a.reg_off, a.arg_signed, a.arg_bitshift) for a in got] == want


@pytest.mark.parametrize("text, msg", [
    ("4@symbol(%rip)", "unrecognized arg #0"),
    ("3@%eax", "size: 3"),
    ("4@%ah", "unsupported register '%ah'"),
    ("4@%xmm0", "unsupported register"),
    ("4@0x10(%rax)", "unrecognized"),
    (" ".join(["8@%rax"] * 13), "too many"),
])
def test_parse_args_errors(text, msg):
    with pytest.raises(AttachError, match=re.escape(msg)):
        U.parse_usdt_args(text)


def _c_structs() -> str:
    """enum __bpf_usdt_arg_type and the two spec structs, as written in libbpf's usdt.bpf.h."""
    text = open(USDT_BPF_H).read()
    parts = [re.search(r"enum __bpf_usdt_arg_type \{.*?\};", text, re.S).group(0),
             re.search(r"struct __bpf_usdt_arg_spec \{.*?\};", text, re.S).group(0),
             "#define BPF_USDT_MAX_ARG_CNT %s" % re.search(r"#define BPF_USDT_MAX_ARG_CNT (\d+)", text).group(1),
             re.search(r"struct __bpf_usdt_spec \{.*?\};", text, re.S).group(0)]
    return "\n".join(parts)


@pytest.mark.skipif(not shutil.which("gcc") or not os.path.exists(USDT_BPF_H), reason="gcc or bpf/usdt.bpf.h missing")
def test_encode_spec_matches_c_layout(tmp_path):
    args = U.parse_usdt_args("-4@%edi 8@-16(%rbp) -2@$-7 1@%r9b")
    src = tmp_path / "spec.c"
    src.write_text("""
#include <stdio.h>
#include <string.h>
#include <stdbool.h>
#include <stddef.h>
#include <linux/types.h>
%s
int main(void) {
    struct __bpf_usdt_spec s;
    memset(&s, 0, sizeof(s));
    s.args[0] = (struct __bpf_usdt_arg_spec){0, BPF_USDT_ARG_REG, 112, true, 32};
    s.args[1] = (struct __bpf_usdt_arg_spec){(__u64)-16, BPF_USDT_ARG_REG_DEREF, 32, false, 0};
    s.args[2] = (struct __bpf_usdt_arg_spec){(__u64)-7, BPF_USDT_ARG_CONST, 0, true, 48};
    s.args[3] = (struct __bpf_usdt_arg_spec){0, BPF_USDT_ARG_REG, 64, false, 56};
    s.usdt_cookie = 0x1122334455667788ULL;
    s.arg_cnt = 4;
    printf("%%zu %%zu %%zu ", sizeof(s), offsetof(struct __bpf_usdt_spec, usdt_cookie), sizeof(s.args[0]));
    for (size_t i = 0; i < sizeof(s); i++) printf("%%02x", ((unsigned char *)&s)[i]);
    printf("\\n");
    return 0;
}
""" % _c_structs())
    exe = tmp_path / "spec"
    _sh("gcc", "-o", str(exe), str(src))
    size, cookie_off, arg_size, hexdata = _sh(str(exe)).split()
    assert (int(size), int(cookie_off), int(arg_size)) == (U.SPEC_SIZE, 192, U.ARG_SPEC.size)
    assert U.encode_spec(args, 0x1122334455667788).hex() == hexdata
    assert U.encode_spec("-4@%edi 8@-16(%rbp) -2@$-7 1@%r9b", 0x1122334455667788).hex() == hexdata
    assert U.encode_spec((), 0) == bytes(U.SPEC_SIZE)


def test_pt_regs_offsets():
    assert [U.pt_regs_offset(r) for r in ("rdi", "esi", "dx", "cl", "r8d", "r9", "rax", "rbp", "rsp", "rip")] == \
        [112, 104, 96, 88, 72, 64, 80, 32, 152, 128]
