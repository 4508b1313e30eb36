"""Syscall numbers and tracepoint formats (hybrid.user.attach.syscalls)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from hybrid.errors import AttachError
from hybrid.user.attach import syscalls as S

NAMES = ("read", "write", "openat", "close", "clone", "clone3", "vfork", "rt_sigreturn", "execve", "exit_group",
         "getpid", "io_uring_setup")


def _tracefs() -> str | None:
    try:
        return S.tracefs_root()
    except AttachError:
        return None


needs_tracefs = pytest.mark.skipif(_tracefs() is None or not os.path.isdir(
    os.path.join(_tracefs() or "/", "events", "syscalls")), reason="tracefs with syscall events not mounted")


@pytest.mark.skipif(not shutil.which("gcc"), reason="gcc not installed")
def test_numbers_match_libc_headers(tmp_path):
    src = tmp_path / "nr.c"
    src.write_text("#include <stdio.h>\n#include <sys/syscall.h>\nint main(void){\n%s\nreturn 0;}\n" % "\n".join(
        'printf("%%s %%d\\n", "%s", (int)SYS_%s);' % (n, n) for n in NAMES))
    exe = tmp_path / "nr"
    subprocess.run(["gcc", "-o", str(exe), str(src)], check=True, capture_output=True)
    want = {k: int(v) for k, v in (line.split() for line in subprocess.run(
        [str(exe)], capture_output=True, text=True, check=True).stdout.splitlines())}
    assert {n: S.syscall_number(n) for n in NAMES} == want
    assert all(S.syscall_name(nr) == n for n, nr in want.items())
    assert S.syscall_number("sys_openat") == want["openat"]


def test_unknown_syscalls():
    with pytest.raises(AttachError, match="unknown x86-64 syscall 'no_such_call'"):
        S.syscall_number("no_such_call")
    with pytest.raises(AttachError, match="no x86-64 syscall has number 100000"):
        S.syscall_name(100000)
    assert len(S.syscall_table()) > 300


FORMAT = """name: sys_enter_foo
ID: 1234
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:int __syscall_nr;\toffset:8;\tsize:4;\tsigned:1;
\tfield:const char * filename;\toffset:16;\tsize:8;\tsigned:0;
\tfield:unsigned long args[6];\toffset:24;\tsize:48;\tsigned:0;
\tfield:__data_loc char[] name;\toffset:72;\tsize:4;\tsigned:1;

print fmt: "x"
"""


def test_parse_format_text():
    f = S.parse_format(FORMAT, "cat", "sys_enter_foo")
    assert f.id == 1234
    assert [(x.name, x.type, x.offset, x.size, x.signed) for x in f.fields] == [
        ("common_type", "unsigned short", 0, 2, False), ("common_pid", "int", 4, 4, True),
        ("__syscall_nr", "int", 8, 4, True), ("filename", "const char *", 16, 8, False),
        ("args", "unsigned long[6]", 24, 48, False), ("name", "__data_loc char[]", 72, 4, True)]
    assert f.field("filename").offset == 16
    with pytest.raises(AttachError, match="has no field 'nope'"):
        f.field("nope")
    with pytest.raises(AttachError, match="no ID line"):
        S.parse_format("format:\n", "a", "b")


@needs_tracefs
def test_sys_events_match_tracefs():
    root = S.tracefs_root()
    nr, eid, fields = S.sys_enter_event("openat")
    assert nr == S.syscall_number("openat")
    with open(os.path.join(root, "events/syscalls/sys_enter_openat/id")) as f:
        assert eid == int(f.read())
    assert [(x.name, x.offset, x.size) for x in fields][-5:] == [
        ("__syscall_nr", 8, 4, ), ("dfd", 16, 8), ("filename", 24, 8), ("flags", 32, 8), ("mode", 40, 8)]
    ex = S.sys_exit_event("read")
    with open(os.path.join(root, "events/syscalls/sys_exit_read/id")) as f:
        assert ex.event_id == int(f.read())
    ret = [x for x in ex.fields if x.name == "ret"][0]
    assert (ret.offset, ret.size, ret.signed) == (16, 8, True)
    fmt = S.tracepoint_format("sched", "sched_switch")
    assert fmt.field("prev_comm").type == "char[16]" and fmt.id > 0


@needs_tracefs
def test_event_errors(monkeypatch):
    with pytest.raises(AttachError, match="unknown x86-64 syscall"):
        S.sys_enter_event("no_such_call")
    with pytest.raises(AttachError, match="no tracepoint nope/nope"):
        S.tracepoint_format("nope", "nope")
    with pytest.raises(AttachError, match="invalid tracepoint name"):
        S.tracepoint_format("../x", "y")
    monkeypatch.setattr(S, "TRACEFS", ("/nonexistent/tracing",))
    with pytest.raises(AttachError, match="tracefs is not mounted"):
        S.sys_enter_event("openat")


def test_table_falls_back_to_bcc_error(monkeypatch):
    monkeypatch.setattr(S, "UNISTD_64", ("/nonexistent/unistd_64.h",))
    S.syscall_table.cache_clear()
    try:
        try:
            import bcc  # noqa: F401
        except ImportError:
            with pytest.raises(AttachError, match="no x86-64 syscall table"):
                S.syscall_table()
        else:
            assert S.syscall_table()["openat"] == 257
    finally:
        S.syscall_table.cache_clear()
