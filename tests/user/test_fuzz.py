"""Fuzzing: whatever bytes come in, hybrid answers with a HybridError, never another exception."""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hybrid.errors import HybridError
from hybrid.user import isa
from hybrid.user.interp import Interpreter
from hybrid.user.program import Program

OPCODES = sorted(isa.OPS)

slot = st.builds(
    lambda op, dst, src, off, imm: struct.pack("<BBhi", op, (src << 4) | dst, off, imm),
    st.one_of(st.sampled_from(OPCODES), st.integers(0, 255)),
    st.integers(0, 15) | st.integers(0, 10),
    st.integers(0, 15) | st.integers(0, 2),
    st.integers(-8, 8) | st.integers(-32768, 32767),
    st.integers(-8, 70) | st.integers(-(2**31), 2**31 - 1),
)
EXIT = isa.encode([isa.Insn(0x95)])


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=96))
def test_random_bytes(code):
    try:
        Program.load(code)
    except HybridError:
        pass


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(slot, min_size=1, max_size=12), st.binary(min_size=0, max_size=32))
def test_random_programs_load_and_run_or_fail_cleanly(slots, ctx):
    code = b"".join(slots) + EXIT
    try:
        prog = Program.load(code)
    except HybridError:
        return
    try:
        Interpreter(prog, max_steps=10_000).run(bytearray(ctx))
    except HybridError:
        pass
