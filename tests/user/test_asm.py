"""Assembler and disassembler: one table, inverse of each other."""

from __future__ import annotations

import re

import pytest

from hybrid.errors import AssemblerError
from hybrid.user import isa
from hybrid.user.asm import assemble
from hybrid.user.conformance import parse_case
from tests.conftest import conformance_files

VECTORS = [p for p in conformance_files("tests")]


def _relabel(listing: str) -> str:
    # the listing has "   3: op" lines; the assembler takes the op text
    return "\n".join(re.sub(r"^\s*\d+: ", "", line) for line in listing.splitlines())


@pytest.mark.parametrize("path", VECTORS, ids=[p.stem for p in VECTORS])
def test_disassembly_reassembles_to_the_same_bytes(path):
    code = parse_case(path).code
    text = _relabel(isa.disasm(isa.decode(code)))
    assert assemble(text) == code


def test_encodings_match_the_rfc():
    assert assemble("add %r1, 2") == bytes.fromhex("0701000002000000")
    assert assemble("sdiv32 %r1, %r2") == bytes.fromhex("3c21010000000000")
    assert assemble("movsx1664 %r3, %r4") == bytes.fromhex("bf43100000000000")
    assert assemble("lock fetch add [%r10-8], %r1") == bytes.fromhex("db1af8ff01000000")
    assert assemble("lock cmpxchg32 [%r1+4], %r2") == bytes.fromhex("c3210400f1000000")
    assert assemble("ja32 +1\nexit\nexit")[:8] == bytes.fromhex("0600000001000000")
    assert assemble("call %r2") == bytes.fromhex("8d02000000000000")
    assert assemble("lddw %r0, 0x1122334455667788") == bytes.fromhex("1800000088776655" "0000000044332211")
    assert assemble("ldxsh %r0, [%r1+2]") == bytes.fromhex("8910020000000000")
    assert assemble("bswap64 %r0") == assemble("swap64 %r0") == bytes.fromhex("d700000040000000")


@pytest.mark.parametrize("text,message", [
    ("mov32 %r0, 2147483648", "line 1 (mov32 %r0, 2147483648): immediate 2147483648 out of range"),
    ("mov32 %r0, 0x100000000", "out of range"),
    ("ja NOT_A_LABEL", "unknown label 'NOT_A_LABEL'"),
    ("lock or [%r10-8]", "invalid number of operands for lock"),
    ("ldxq %r0, %r1", "unknown mnemonic 'ldxq'"),
    ("ldxb %r0, %r1", "invalid memory operand '%r1'"),
    ("ldxb %r0, [%r1+0x10000]", "offset 65536 out of range"),
    ("lddw %r0", "invalid number of operands for lddw"),
    ("mov %r0\nexit", "line 1 (mov %r0)"),
    ("exit\nor %r0, %r50", "line 2 (or %r0, %r50): invalid register '%r50'"),
])
def test_assembler_errors_name_the_line(text, message):
    with pytest.raises(AssemblerError) as exc:
        assemble(text)
    assert message in str(exc.value)
