"""The reference interpreter: memory checks, calls, helpers, limits."""

from __future__ import annotations

import ctypes
import errno
import os
import threading
import time

import pytest

from hybrid.errors import VmError
from hybrid.user.asm import assemble
from hybrid.user.interp import Interpreter
from hybrid.user.program import Program


def interp(text: str, **kw) -> Interpreter:
    return Interpreter(Program.load(assemble(text)), **kw)


def test_bad_load_is_an_error_not_a_crash():
    with pytest.raises(VmError) as exc:
        interp("mov %r1, 16\nldxdw %r0, [%r1]\nexit").run()
    assert str(exc.value).startswith("insn #1 (ldxdw %r0, [%r1]): read of 8 bytes at 0x10 is outside")


def test_store_past_the_context_is_refused():
    eng = interp("stdw [%r1+4], 1\nmov %r0, 0\nexit")
    with pytest.raises(VmError, match="insn #0 .*write of 8 bytes"):
        eng.run(bytearray(8))
    ctx = bytearray(12)
    assert eng.run(ctx) == 0 and ctx[4] == 1


def test_context_writes_come_back():
    ctx = bytearray(b"\x01\x02\x03\x04")
    interp("ldxw %r2, [%r1]\nbe32 %r2\nstxw [%r1], %r2\nmov %r0, 0\nexit").run(ctx)
    assert ctx == bytearray(b"\x04\x03\x02\x01")


def test_local_calls_have_their_own_frames_and_keep_r6_to_r9():
    text = """
    mov %r6, 6
    stdw [%r10-8], 42
    call local f
    ldxdw %r0, [%r10-8]
    add %r0, %r6
    exit
    f:
    mov %r6, 100
    stdw [%r10-8], 7
    mov %r0, 0
    exit
    """
    assert interp(text).run() == 48


def test_helpers():
    eng = interp("call 14\nexit")
    assert eng.run() == (os.getpid() << 32) | threading.get_native_id()
    before = time.monotonic_ns()
    assert before <= interp("call 5\nexit").run() <= time.monotonic_ns()
    assert interp("call 15\nexit").run() == (os.getgid() << 32) | os.getuid()


def test_get_current_comm_writes_the_stack():
    text = """
    mov %r1, %r10
    add %r1, -16
    mov %r2, 16
    call 16
    ldxdw %r0, [%r10-16]
    exit
    """
    buf = ctypes.create_string_buffer(16)
    ctypes.CDLL(None).prctl(16, buf, 0, 0, 0)
    got = interp(text).run().to_bytes(8, "little")
    assert got.rstrip(b"\0") == buf.value[:8].rstrip(b"\0")


def test_callx_to_an_unknown_helper_is_skipped_with_enoent():
    # the same result as the native engines, which cannot raise
    assert interp("mov %r2, 999\ncall %r2\nexit").run() == -errno.ENOENT & (2**64 - 1)


def test_step_limit():
    with pytest.raises(VmError, match="step limit of 1000"):
        interp("mov %r0, 0\nja -1\nexit", max_steps=1000).run()
