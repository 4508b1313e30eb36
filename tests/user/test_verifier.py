"""Bad programs are refused at load time with an error naming the instruction."""

from __future__ import annotations

import pytest

from hybrid.errors import DecodeError, HybridError, VerifierError
from hybrid.user import isa
from hybrid.user.asm import assemble
from hybrid.user.program import Program


def refused(text_or_code) -> str:
    code = assemble(text_or_code) if isinstance(text_or_code, str) else text_or_code
    with pytest.raises(VerifierError) as exc:
        Program.load(code)
    return str(exc.value)


def test_accepts_a_good_program():
    prog = Program.load(assemble("mov %r0, 1\nexit"))
    assert len(prog.insns) == 2


@pytest.mark.parametrize(
    "text,message",
    [
        ("mov %r0, 0\njeq %r0, 0, +5\nexit", "insn #1 (jeq %r0, 0, +5): jump target 7 out of range (program has 3 slots)"),
        ("mov %r0, 0\nja -3\nexit", "insn #1 (ja -3): jump target -1 out of range"),
        ("ja +1\nlddw %r0, 1\nexit", "insn #0 (ja +1): jump target 2 is the second slot of an lddw"),
        ("call 63\nexit", "insn #0 (call 63): unknown helper 63"),
        ("mov %r10, 1\nmov %r0, 0\nexit", "insn #0 (mov %r10, 1): r10 is read-only"),
        ("mov %r0, %r3\nexit", "insn #0 (mov %r0, %r3): r3 is read before it is written"),
        ("exit", "insn #0 (exit): r0 is read before it is written"),
        ("stdw [%r10-520], 1\nmov %r0, 0\nexit", "insn #0 (stdw [%r10-520], 1): stack access at r10-520 (size 8) outside the 512-byte frame"),
        ("ldxw %r0, [%r10-2]\nexit", "insn #0 (ldxw %r0, [%r10-2]): stack access at r10-2 (size 4) outside the 512-byte frame"),
        ("mov %r0, 0", "insn #0 (mov %r0, 0): the last instruction of the program must be exit or a jump"),
        ("mov %r0, 0\nmov %r1, 1\njeq %r1, 0, +0\nmov %r0, 2", "insn #3 (mov %r0, 2): the last instruction of the program must be exit or a jump"),
        ("call local f\nexit\nf:\ncall local f\nmov %r0, 0\nexit", "insn #2 (call local -1): recursive call to the subprogram at insn #2"),
        ("mov %r0, 0\nja +2\nexit\nf:\nmov %r0, 1\nexit\ncall local f", "leaves the subprogram"),
        ("lock cmpxchg [%r10-8], %r1\nexit", "r0 is read before it is written"),
    ],
)
def test_refusals_name_the_instruction(text, message):
    assert message in refused(text)


def test_r0_undefined_on_one_path_is_refused():
    text = "jeq %r1, 0, +1\nmov %r0, 1\nexit"
    assert "insn #2 (exit): r0 is read before it is written" in refused(text)


def test_call_depth_limit():
    # 9 frames: main -> f1 -> ... -> f8
    lines = ["call local f1", "exit"]
    for i in range(1, 9):
        lines += ["f%d:" % i] + (["call local f%d" % (i + 1)] if i < 8 else ["mov %r0, 0"]) + ["exit"]
    assert "exceeds the limit of 8 frames" in refused("\n".join(lines))
    lines = ["call local f1", "exit"]
    for i in range(1, 8):
        lines += ["f%d:" % i] + (["call local f%d" % (i + 1)] if i < 7 else ["mov %r0, 0"]) + ["exit"]
    Program.load(assemble("\n".join(lines)))  # 8 frames is fine


@pytest.mark.parametrize("opcode", [0x00, 0x8E, 0x96, 0xD7 | 0x08, 0x19, 0x99, 0xE3, 0xFF])
def test_unknown_opcode(opcode):
    msg = refused(bytes([opcode, 0, 0, 0, 0, 0, 0, 0]) + assemble("exit"))
    assert msg.startswith("insn #0 (invalid opcode 0x%02x): unknown opcode 0x%02x" % (opcode, opcode))


def test_invalid_register_field():
    code = bytes([0xB7, 0x0B, 0, 0, 1, 0, 0, 0]) + assemble("exit")  # mov r11, 1
    assert "invalid register r11" in refused(code)


def test_bad_atomic_and_endian_immediates():
    assert "invalid imm 2 for lock" in refused(isa.encode([isa.Insn(0xDB, 10, 1, -8, 2)]) + assemble("exit"))
    assert "invalid imm 8 for le" in refused(isa.encode([isa.Insn(0xD4, 0, 0, 0, 8)]) + assemble("exit"))


def test_lddw_map_forms_need_maps():
    code = isa.encode([isa.lddw(1, 3, src=isa.PSEUDO_MAP_FD)]) + assemble("mov %r0, 0\nexit")
    assert ("insn #0 (lddw %r1, map_fd(3, 0)): lddw refers to map 3, which this program does not have (maps: none)"
            in refused(code))


def test_lddw_map_value_must_stay_inside_the_value():
    from hybrid.user.program import MapRef

    code = isa.encode([isa.Insn(0x18, 1, isa.PSEUDO_MAP_VALUE, 0, 3, 16)]) + assemble("mov %r0, 0\nexit")
    with pytest.raises(VerifierError, match="offset 16 is outside the 16-byte value of map 'm'"):
        Program.load(code, maps={3: MapRef("m", 0x1000, 16, 0x2000)})
    with pytest.raises(VerifierError, match="map 'h' has no directly addressable value"):
        Program.load(code, maps={3: MapRef("h", 0x1000, 64)})
    Program.load(code, maps={3: MapRef("m", 0x1000, 32, 0x2000)})


def test_lddw_btf_object_is_refused():
    code = isa.encode([isa.lddw(1, 3, src=isa.PSEUDO_BTF_ID)]) + assemble("mov %r0, 0\nexit")
    assert "lddw with src 3 (BTF object) is not supported in userspace" in refused(code)


def test_lddw_second_slot_must_be_clean():
    code = bytearray(assemble("lddw %r0, 5\nexit"))
    code[9] = 0x01  # registers of the second slot
    assert "second slot of lddw" in refused(bytes(code))


def test_legacy_packet_access_is_refused_clearly():
    code = isa.encode([isa.Insn(0x20, 0, 0, 0, 12)]) + assemble("mov %r0, 0\nexit")
    assert "legacy packet access" in refused(code)


@pytest.mark.parametrize("code,message", [
    (b"", "empty program"),
    (b"\x95\x00\x00\x00\x00\x00\x00", "bytecode length 7 is not a multiple of 8"),
    (b"\x18\x00\x00\x00\x01\x00\x00\x00", "insn #0 (lddw): second slot missing"),
])
def test_truncated_bytecode(code, message):
    with pytest.raises(HybridError) as exc:
        Program.load(code)
    assert message in str(exc.value)
    assert isinstance(exc.value, (DecodeError, VerifierError))
