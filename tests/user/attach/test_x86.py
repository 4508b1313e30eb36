"""Patch-window planning (hybrid.user.attach.x86) on hand-made code, gcc output and libc."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from hybrid.errors import AttachError
from hybrid.user.attach.x86 import SKIP_SYSCALLS, Window, find_syscall_sites, plan_int3, plan_window

LIBC = "/lib/x86_64-linux-gnu/libc.so.6"
needs_gcc = pytest.mark.skipif(not shutil.which("gcc"), reason="gcc not installed")


def _sh(*cmd: str) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, "%s failed:\n%s" % (" ".join(cmd), r.stderr)
    return r.stdout


# --- hand-made code ----------------------------------------------------------------


def test_copy_and_rip():
    # push rbp; mov rbp, rsp; lea rax, [rip+0x100]; ret
    code = bytes.fromhex("55" "4889e5" "488d0500010000" "c3")
    w = plan_window(code, 0x1000)
    assert (w.vaddr, w.length, w.orig) == (0x1000, 11, code[:11])
    assert [(i.off, i.len, i.kind, i.field, i.target) for i in w.insns] == [
        (0, 1, "copy", 0, 0), (1, 3, "copy", 0, 0), (4, 7, "rip", 3, 0x1000 + 11 + 0x100)]
    assert w.spec_lines("/lib/x.so") == [
        "site /lib/x.so 0x1000 11 554889e5488d0500010000 3",
        "insn 0 1 copy 0 0x0 55",
        "insn 1 3 copy 0 0x0 4889e5",
        "insn 4 7 rip 3 0x110b 488d0500010000"]


def test_rip_with_immediate_and_negative_disp():
    # cmp dword ptr [rip-0x10], 5 (83 3d disp32 imm8): disp at byte 2, imm after it
    code = bytes.fromhex("833df0ffffff05") + b"\x90" * 4
    w = plan_window(code, 0x2000)
    i = w.insns[0]
    assert (i.kind, i.field, i.target, i.len) == ("rip", 2, 0x2000 + 7 - 0x10, 7)


def test_branches_jcc_codes_and_call_last():
    # je +0x20 (rel8), jne rel32, call rel32 (last: returns after the window)
    code = bytes.fromhex("7420" "0f8500010000" "e8f0ffffff" "90")
    w = plan_window(code, 0x4000, min_len=13)
    assert [(i.kind, i.field, i.target) for i in w.insns] == [
        ("jcc", 4, 0x4022), ("jcc", 5, 0x4002 + 6 + 0x100), ("call", 0, 0x4008 + 5 - 0x10)]
    assert w.length == 13
    # jmp rel8 as the last instruction reaching 5 bytes
    w = plan_window(bytes.fromhex("31c0" "ffc0" "eb10"), 0x10, min_len=5)
    assert [(i.kind, i.target) for i in w.insns][-1] == ("jmp", 0x10 + 6 + 0x10)


def test_prefixed_jcc():
    # bnd jne rel32 (f2 0f 85) and a branch-hinted jb (3e 72)
    w = plan_window(bytes.fromhex("f20f8510000000"), 0)
    assert (w.insns[0].kind, w.insns[0].field) == ("jcc", 5)
    w = plan_window(bytes.fromhex("3e7203" "909090"), 0)
    assert (w.insns[0].kind, w.insns[0].field) == ("jcc", 2)


@pytest.mark.parametrize("hexcode, what", [
    ("31c0c3cccccc", "code ends after 3"),            # xor eax,eax; ret
    ("90ffe0cccccc", "code ends after 3"),            # nop; jmp rax
    ("900f0b909090", "code ends after 3"),            # nop; ud2
    ("90cc90909090", "code ends after 2"),            # nop; int3
    ("90f490909090", "code ends after 2"),            # nop; hlt
    ("900f0590909090", "system call inside"),          # nop; syscall
    ("90e2fd90909090", "cannot be relocated"),        # nop; loop
    ("e3fd9090909090", "cannot be relocated"),        # jrcxz
    ("c7f800000000", "cannot be relocated"),          # xbegin
    ("e800000000" "90", None),                          # call as the only insn: fine
    ("90ff15000000009090", "indirect call"),           # call [rip]
    ("90eb0390909090", "code ends after 3"),          # jmp rel8 before 5 bytes
    ("06909090909090", "cannot decode"),              # push es: invalid in 64-bit mode
    ("9090", "only 2 bytes"),
    ("7401909090909090", "branches into the window"), # je to 0x3 (inside [0,6))
])
def test_refusals(hexcode, what):
    code = bytes.fromhex(hexcode)
    if what is None:
        plan_window(code, 0x1234)
        return
    with pytest.raises(AttachError, match=what) as e:
        plan_window(code, 0x1234)
    assert "0x12" in str(e.value)  # the message names the address


def test_call_not_last_is_refused():
    with pytest.raises(AttachError, match="return into the middle of the window at 0x10"):
        plan_window(bytes.fromhex("e800000000" "4889e5"), 0x10, min_len=8)


def test_ret_as_last_instruction_is_fine():
    w = plan_window(bytes.fromhex("31c05b5dc3cc"), 0x50)  # xor; pop rbx; pop rbp; ret = 5 bytes
    assert w.length == 5 and w.insns[-1].kind == "copy" and w.insns[-1].bytes == b"\xc3"


def test_branch_into_window_from_function():
    # function: [0] push rbp; mov rbp,rsp; mov eax,1 (window 0..9) ... [9] jmp back to 0x3 (inside)
    func = bytes.fromhex("55" "4889e5" "b801000000" "ebf8" "c3")
    with pytest.raises(AttachError, match=r"targets 0x103, inside the window \[0x100, 0x109\)"):
        plan_window(func, 0x100, func_start=0x100, func_code=func)
    ok = bytes.fromhex("55" "4889e5" "b801000000" "ebf5" "c3")  # jmp to 0x100: the start is fine
    assert plan_window(ok, 0x100, func_start=0x100, func_code=ok).length == 9


def test_int3_window():
    w = plan_int3(bytes.fromhex("90" "4889e5"), 0x77)
    assert (w.length, w.mode, w.orig) == (1, "int3", b"\x90")
    assert w.spec_lines("m") == ["site m 0x77 1 90 1", "insn 0 1 copy 0 0x0 90"]
    w = plan_int3(bytes.fromhex("488d05f0ffffff"), 0x100)
    assert (w.length, w.insns[0].kind, w.insns[0].target) == (7, "rip", 0x107 - 0x10)
    with pytest.raises(AttachError, match="cannot decode"):
        plan_int3(b"\x06", 0)


def test_spec_lines_checks():
    w = plan_window(b"\x90" * 5, 0)
    assert w.spec_lines("lib", head="syssite")[0].startswith("syssite lib 0x0 5 ")
    with pytest.raises(AttachError):
        w.spec_lines("a b")
    with pytest.raises(AttachError):
        w.spec_lines("lib", head="nope")
    assert Window.from_json(w.to_json()) == w


# --- gcc output --------------------------------------------------------------------

C_SRC = r"""
int counter;
int get(void) { return counter + 1; }
"""


@needs_gcc
def test_rip_target_matches_objdump(tmp_path):
    src = tmp_path / "a.c"
    src.write_text(C_SRC)
    so = tmp_path / "a.so"
    _sh("gcc", "-O2", "-shared", "-fPIC", "-fcf-protection=none", "-o", str(so), str(src))
    from hybrid.user.attach.symbols import function_bytes, read_code, resolve_symbol

    sym = resolve_symbol(so, "get")
    w = plan_window(read_code(so, sym.vaddr, 32), sym.vaddr, func_start=sym.vaddr, func_code=function_bytes(so, sym))
    # objdump: "mov 0x2edd(%rip),%rax   # 3fd8 <counter@@Base-0x4c>" (via the GOT) or "# 4020 <counter>"
    dump = _sh("objdump", "-d", "--no-show-raw-insn", str(so))
    body = dump.split("<get>:")[1].split("\n\n")[0]
    m = re.search(r"#\s*([0-9a-f]+) <", body)
    assert m, body
    rips = [i for i in w.insns if i.kind == "rip"]
    assert rips and rips[0].target == int(m.group(1), 16)


# --- syscall sites -----------------------------------------------------------------

ASM = r"""
    .text
    .globl f_getpid, f_clone, f_short, f_target, f_tail
f_getpid:
    mov $39, %eax
    syscall
    cmp $-4095, %rax
    ret
f_clone:
    mov $56, %eax
    mov %rdi, %rsi
    syscall
    nop
    nop
    nop
    nop
    ret
f_short:
    mov $1, %eax
    syscall
    ret
    int3
    int3
    int3
f_target:
    test %edi, %edi
    mov $60, %eax
    jne 1f
    syscall
1:  nop
    nop
    nop
    nop
    ret
f_fall:
    mov $39, %eax
    syscall
    .globl f_next
    .type f_next, @function
f_next:
    nop
    nop
    nop
    nop
    ret
f_tail:
    mov $39, %eax
    call f_getpid
    syscall
    mov %rax, %rdx
    mov %rdx, %rax
    ret
"""


@needs_gcc
def test_find_syscall_sites_small(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    s = tmp_path / "s.S"
    s.write_text(ASM)
    so = tmp_path / "s.so"
    _sh("gcc", "-shared", "-nostdlib", "-o", str(so), str(s))
    dump = _sh("objdump", "-d", "--no-show-raw-insn", str(so))
    sys_addrs = [int(m.group(1), 16) for m in re.finditer(r"^\s*([0-9a-f]+):\s+syscall", dump, re.M)]
    func = {m.group(2): int(m.group(1), 16) for m in re.finditer(r"^([0-9a-f]+) <(\w+)>:", dump, re.M)}
    assert len(sys_addrs) == 6
    scan = find_syscall_sites(so)
    assert not scan.cached
    assert sorted([x.vaddr for x in scan.sites] + [x.vaddr for x in scan.skipped]) == sys_addrs
    by = {a: name for name, a in func.items()}

    def owner(a):
        return by[max(f for f in by if f <= a)]

    sites = {owner(x.vaddr): x for x in scan.sites}
    skipped = {owner(x.vaddr): x for x in scan.skipped}
    assert set(sites) == {"f_getpid", "f_tail", "f_short", "f_fall"}
    assert sites["f_getpid"].nr == 39 and sites["f_tail"].nr is None  # the call clobbers eax
    w = sites["f_getpid"].window
    assert (w.length, [i.kind for i in w.insns]) == (8, ["copy", "copy"])
    assert w.insns[0].bytes == b"\x0f\x05" and w.spec_lines("s.so", "syssite")[0].startswith(
        "syssite s.so %#x 8 0f05" % w.vaddr)
    assert skipped["f_clone"].nr == 56 and "clone" in skipped["f_clone"].reason
    # `mov $1, %eax; syscall; ret`: the window starts at the mov (the ret would end a forward one)
    w = sites["f_short"].window
    assert (w.vaddr, w.length, w.orig) == (func["f_short"], 7, b"\xb8\x01\x00\x00\x00\x0f\x05")
    assert sites["f_short"].vaddr == func["f_short"] + 5
    # f_fall: a function starts right after its syscall, so only the window from the mov fits
    assert sites["f_fall"].window.vaddr + sites["f_fall"].window.length == func["f_next"]
    assert set(skipped) == {"f_clone", "f_target"}
    assert "inside the window" in skipped["f_target"].reason
    again = find_syscall_sites(so)
    assert again.cached and again.sites == scan.sites and again.skipped == scan.skipped
    os.utime(so, ns=(1, 1))  # a changed file is analysed again
    assert not find_syscall_sites(so).cached


@pytest.mark.skipif(not os.path.exists(LIBC), reason="no libc.so.6")
def test_libc_syscall_sites():
    scan = find_syscall_sites(LIBC)  # the user's cache: seconds only the first time
    dump = subprocess.run(["objdump", "-d", "--no-show-raw-insn", LIBC], capture_output=True, text=True).stdout
    expected = sorted(int(m.group(1), 16) for m in re.finditer(r"^\s*([0-9a-f]+):\s+syscall\s*$", dump, re.M))
    assert sorted([s.vaddr for s in scan.sites] + [s.vaddr for s in scan.skipped]) == expected
    assert len(scan.sites) > 0.8 * len(expected)
    skipped_nrs = {s.nr for s in scan.skipped}
    assert {56, 58, 15} <= skipped_nrs  # clone, vfork, rt_sigreturn (__restore_rt)
    assert all(s.nr not in SKIP_SYSCALLS for s in scan.sites)
    with open(LIBC, "rb") as f:
        data = f.read()
    for s in scan.sites[:50]:  # libc: vaddr == file offset in its text segment
        w = s.window
        assert data[w.vaddr:w.vaddr + w.length] == w.orig
        assert w.length >= 5 and data[s.vaddr:s.vaddr + 2] == b"\x0f\x05"
        assert w.vaddr == s.vaddr or w.vaddr + w.length == s.vaddr + 2  # from the syscall, or mov; syscall


def test_syscall_sites_bad_files(tmp_path):
    with pytest.raises(AttachError, match="no such file"):
        find_syscall_sites(tmp_path / "missing")
    p = tmp_path / "text"
    p.write_text("not an elf\n")
    with pytest.raises(AttachError, match="not an ELF file"):
        find_syscall_sites(p, use_cache=False)
