"""The native engines (LLVM JIT and AOT) on programs that probe the lowering."""

from __future__ import annotations

import ctypes
import errno
import os
import subprocess
import sys
import textwrap

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hybrid.errors import EngineError
from hybrid.user import isa
from hybrid.user.aot import AotEngine, build_shared, load_shared
from hybrid.user.asm import assemble
from hybrid.user.interp import Interpreter
from hybrid.user.isa import OPS, Insn, Kind
from hybrid.user.jit import LlvmJit
from hybrid.user.lower import lower
from hybrid.user.program import Program

M64 = (1 << 64) - 1


def opcode(mnemonic: str, reg_src: bool = False) -> int:
    """The opcode of ``mnemonic`` from the table (the register form if ``reg_src``)."""
    return next(op for op, i in OPS.items() if i.mnemonic == mnemonic and i.reg_src == reg_src)


EXIT = Insn(opcode("exit"))
NATIVE = {"jit": LlvmJit, "aot": AotEngine}


def prog(src: str, name: str = "test") -> Program:
    return Program.load(assemble(textwrap.dedent(src)), name=name)


@pytest.fixture(params=sorted(NATIVE))
def engine(request):
    """A factory for the engine under test; every engine made is closed afterwards."""
    made = []

    def make(program: Program):
        e = NATIVE[request.param](program)
        made.append(e)
        return e

    yield make
    for e in made:
        e.close()


def run_all(program: Program, make, ctx: bytes = b"") -> int:
    """r0 from the engine under test, checked against the interpreter."""
    want_ctx, got_ctx = bytearray(ctx), bytearray(ctx)
    want = Interpreter(program).run(want_ctx)
    got = make(program).run(got_ctx)
    assert got == want, "native %#x, interpreter %#x" % (got, want)
    assert got_ctx == want_ctx
    return got


# --- ALU edge cases --------------------------------------------------------------

ALU_CASES = [
    # (program body leaving the result in r0, expected r0)
    ("mov %r0, 7\nmov %r1, 0\ndiv %r0, %r1", 0),
    ("mov %r0, 7\nmov %r1, 0\nmod %r0, %r1", 7),
    ("lddw %r0, 0x1234567800000007\nmov %r1, 0\nmod32 %r0, %r1", 7),  # 32-bit: truncated
    ("lddw %r0, 0x1234567800000007\nmov %r1, 0\ndiv32 %r0, %r1", 0),
    ("lddw %r0, 0x8000000000000000\nmov %r1, -1\nsdiv %r0, %r1", 0x8000000000000000),
    ("lddw %r0, 0x8000000000000000\nmov %r1, -1\nsmod %r0, %r1", 0),
    ("mov32 %r0, 0x80000000\nmov %r1, -1\nsdiv32 %r0, %r1", 0x80000000),
    ("mov32 %r0, 0x80000000\nmov %r1, -1\nsmod32 %r0, %r1", 0),
    ("mov %r0, -7\nsdiv %r0, 2", (-3) & M64),
    ("mov %r0, -7\nsmod %r0, 2", (-1) & M64),
    ("mov %r0, -7\nsmod %r0, 0", (-7) & M64),
    ("mov %r0, -7\nsdiv %r0, 0", 0),
    ("lddw %r1, 0x100000003\nmov %r0, 12\ndiv32 %r0, %r1", 4),  # divisor's low 32 bits only
    ("mov %r0, 1\nmov %r1, 65\nlsh %r0, %r1", 2),  # shift counts masked
    ("mov %r0, 1\nmov %r1, 33\nlsh32 %r0, %r1", 2),
    ("mov %r0, -1\nrsh %r0, 63", 1),
    ("mov32 %r0, -16\narsh32 %r0, 2", 0xFFFFFFFC),
    ("mov %r0, -16\nmov %r1, 66\narsh %r0, %r1", (-4) & M64),
    ("mov %r0, 0xff\nmovsx864 %r0, %r0", M64),
    ("mov %r0, 0x8000\nmovsx1632 %r0, %r0", 0xFFFF8000),
    ("mov32 %r0, 0x80000000\nmovsx3264 %r0, %r0", 0xFFFFFFFF80000000),
    ("lddw %r0, 0x1122334455667788\nbe16 %r0", 0x8877),
    ("lddw %r0, 0x1122334455667788\nbe32 %r0", 0x88776655),
    ("lddw %r0, 0x1122334455667788\nbswap64 %r0", 0x8877665544332211),
    ("lddw %r0, 0x1122334455667788\nle32 %r0", 0x55667788),
    ("mov %r0, 5\nneg32 %r0", 0xFFFFFFFB),
    ("mov32 %r0, -1\nadd32 %r0, 1", 0),
    ("mov %r0, -1\nmul32 %r0, -1", 1),
]


@pytest.mark.parametrize("body,want", ALU_CASES, ids=[c[0].splitlines()[-1] for c in ALU_CASES])
def test_alu_edge_cases(engine, body, want):
    assert run_all(prog(body + "\nexit"), engine) == want


# --- memory and atomics ----------------------------------------------------------


def test_writes_are_visible_in_the_context(engine):
    p = prog("""
        stb [%r1], 0x11
        sth [%r1+2], -2
        stw [%r1+4], 0x7fffffff
        stdw [%r1+8], -1
        lddw %r3, 0x0102030405060708
        stxdw [%r1+16], %r3
        ldxh %r0, [%r1+2]
        exit
    """)
    ctx = bytearray(24)
    got = engine(p).run(ctx)
    assert got == 0xFFFE
    assert ctx == bytes.fromhex("1100feff ffffff7f ffffffffffffffff 0807060504030201")


def test_sign_extending_loads(engine):
    p = prog("""
        ldxsb %r0, [%r1]
        ldxsh %r2, [%r1+1]
        ldxsw %r3, [%r1+3]
        add %r0, %r2
        add %r0, %r3
        exit
    """)
    assert run_all(p, engine, bytes([0xFF, 0xFE, 0xFF, 0xFD, 0xFF, 0xFF, 0xFF])) == (-1 - 2 - 3) & M64


def test_reading_an_unwritten_stack_slot_gives_some_value(engine):
    # the verifier does not track stack initialization; LLVM must not see undef here
    p = prog("""
        ldxdw %r1, [%r10-8]
        jeq %r1, 0x1234, +2
        mov %r0, 1
        exit
        mov %r0, 2
        exit
    """)
    assert engine(p).run() in (1, 2)


def test_cmpxchg(engine):
    p = prog("""
        mov %r0, 5
        mov %r2, 9
        lock cmpxchg [%r1], %r2
        mov %r6, %r0
        mov %r0, 7
        mov %r2, 11
        lock cmpxchg32 [%r1+8], %r2
        lsh %r6, 32
        or %r0, %r6
        exit
    """)
    ctx = bytearray((5).to_bytes(8, "little") + (8).to_bytes(8, "little"))
    e = engine(p)
    # first succeeds (5 == 5): stores 9, r0 = 5; second fails (8 != 7): r0 = 8
    assert e.run(ctx) == (5 << 32) | 8
    assert ctx == (9).to_bytes(8, "little") + (8).to_bytes(8, "little")


def test_fetch_atomics(engine):
    p = prog("""
        mov %r2, 3
        lock fetch add [%r1], %r2
        mov %r3, -1
        lock xchg32 [%r1+8], %r3
        mov %r0, %r2
        lsh %r0, 32
        or %r0, %r3
        exit
    """)
    ctx = bytearray((40).to_bytes(8, "little") + (0x12345678).to_bytes(8, "little"))
    assert run_all(p, engine, bytes(ctx)) == (40 << 32) | 0x12345678


# --- calls ---------------------------------------------------------------------------


def test_local_call_preserves_registers_and_has_its_own_stack(engine):
    p = prog("""
        mov %r6, 6
        mov %r7, 7
        mov %r8, 8
        mov %r9, 9
        stdw [%r10-8], 0x1111
        mov %r1, %r10
        add %r1, -16
        call local f
        jne %r6, 6, fail
        jne %r7, 7, fail
        jne %r8, 8, fail
        jne %r9, 9, fail
        ldxdw %r1, [%r10-8]
        jne %r1, 0x1111, fail
        ldxdw %r1, [%r10-16]
        jne %r1, 0x3333, fail
        exit
    fail:
        mov %r0, -1
        exit
    f:
        mov %r6, 0
        mov %r7, 0
        mov %r8, 0
        mov %r9, 0
        stdw [%r10-8], 0x2222
        stdw [%r1], 0x3333
        ldxdw %r0, [%r10-8]
        exit
    """)
    assert run_all(p, engine) == 0x2222


def test_nested_local_calls(engine):
    p = prog("""
        mov %r1, 1
        call local a
        exit
    a:
        mov %r6, %r1
        add %r1, 10
        call local b
        add %r0, %r6
        exit
    b:
        mov %r0, %r1
        mul %r0, 3
        exit
    """)
    assert run_all(p, engine) == 34


def test_helper_call(engine):
    p = prog("""
        call 5
        mov %r6, %r0
        call 5
        jlt %r0, %r6, fail
        jeq %r6, 0, fail
        exit
    fail:
        mov %r0, 0
        exit
    """)
    e = engine(p)
    first = e.run()
    second = e.run()
    assert 0 < first <= second


def test_callx(engine):
    p = prog("""
        mov %r8, 5
        call %r8
        jeq %r0, 0, fail
        mov %r8, 1000
        call %r8
        exit
    fail:
        mov %r0, 0
        exit
    """)
    # an id that is no helper: the call does not happen and r0 = -ENOENT
    assert engine(p).run() == -errno.ENOENT & M64


def test_helper_writing_memory(engine):
    p = prog("""
        mov %r6, %r1
        mov %r2, 16
        call 16
        ldxb %r0, [%r6]
        exit
    """)
    ctx = bytearray(16)
    assert run_all(p, engine, bytes(ctx)) != 0


# --- refusals and engine life cycle -------------------------------------------------


def test_lddw_of_a_missing_map_is_refused():
    p = Program((isa.lddw(0, 3, src=isa.PSEUDO_MAP_FD), EXIT), "maps")
    with pytest.raises(EngineError, match=r"insn #0 \(lddw %r0, map_fd\(3, 0\)\): no map 3"):
        lower(p)
    text = str(lower(p, resolve_lddw=lambda slot, insn: 0xDEAD0000 + insn.imm))
    assert str(0xDEAD0003) in text


def test_legacy_packet_access_is_refused():
    p = Program((Insn(opcode("ldabsw"), imm=4), EXIT), "legacy")
    with pytest.raises(EngineError, match=r"insn #0 \(ldabs"):
        lower(p)


def test_close_is_idempotent(engine):
    e = engine(prog("mov %r0, 1\nexit"))
    assert e.run() == 1
    assert e.compile_seconds > 0
    e.close()
    e.close()
    with pytest.raises(EngineError, match="closed"):
        e.run()


def test_jit_debug_text():
    with LlvmJit(prog("mov %r0, 42\nexit")) as e:
        assert "@bpf_entry(" in e.ir_text and "ret i64 42" in e.ir_text
        assert "bpf_entry" in e.asm_text
        assert e.address


def test_a_built_library_loads_without_llvm(tmp_path):
    p = prog("mov %r0, %r2\ncall 5\njeq %r0, 0, +1\nmov %r0, 77\nexit", name="built")
    so = build_shared(p, tmp_path / "built.so")
    script = textwrap.dedent("""
        import sys
        sys.modules["llvmlite"] = None  # importing llvmlite now fails
        from hybrid.user.aot import load_shared
        lib, fn = load_shared(sys.argv[1])
        print(fn(0, 0))
    """)
    out = subprocess.run([sys.executable, "-c", script, str(so)], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "77"
    assert load_shared(so, p)[1](0, 0) == 77


def test_linker_errors_name_the_program(tmp_path, monkeypatch):
    import hybrid.user.aot as aot

    monkeypatch.setattr(aot, "CC", str(tmp_path / "no-such-cc"))
    with pytest.raises(EngineError, match="'linkfail'.*linker"):
        build_shared(prog("mov %r0, 1\nexit", name="linkfail"), tmp_path / "x.so")


# --- differential: random loop-free programs, JIT against the interpreter --------------

ALU_INFOS = [i for i in OPS.values() if i.kind in (Kind.ALU, Kind.END)]
JCOND_INFOS = [i for i in OPS.values() if i.kind is Kind.JCOND]
INTERESTING_32 = [0, 1, -1, 2, 7, 31, 32, 33, 63, 64, 65, -(2**31), 2**31 - 1, 0xFF, 0x7FFF]
INTERESTING_64 = [0, 1, M64, 1 << 63, (1 << 63) - 1, 0x80000000, 0xFFFFFFFF, 0xFFFFFFFF80000000]
imm32 = st.sampled_from(INTERESTING_32) | st.integers(-(2**31), 2**31 - 1)
reg = st.integers(0, 9)
NSLOTS = 4  # 8-byte stack slots the programs use


@st.composite
def alu_insn(draw) -> Insn:
    info = draw(st.sampled_from(ALU_INFOS))
    pick = lambda allowed, default: draw(st.sampled_from(sorted(allowed))) if allowed is not None else default
    return Insn(info.opcode, draw(reg), draw(reg) if info.reg_src else 0,
                pick(info.off_ok, 0), pick(info.imm_ok, draw(imm32)))


@st.composite
def body_item(draw) -> tuple:
    """("alu", insn) | ("jump", info, dst, src, imm, distance) | ("store", reg, slot)
    | ("load", size, reg, slot) | ("atomic", mnemonic, imm, reg, slot)."""
    kind = draw(st.sampled_from(["alu"] * 6 + ["jump", "store", "load", "atomic"]))
    if kind == "alu":
        return ("alu", draw(alu_insn()))
    if kind == "jump":
        return ("jump", draw(st.sampled_from(JCOND_INFOS)), draw(reg), draw(reg), draw(imm32), draw(st.integers(0, 6)))
    if kind == "store":
        return ("store", draw(reg), draw(st.integers(1, NSLOTS)))
    if kind == "atomic":
        return ("atomic", draw(st.sampled_from(["lock", "lock32"])), draw(st.sampled_from(sorted(isa.ATOMIC_IMMS))),
                draw(reg), draw(st.integers(1, NSLOTS)))
    return ("load", draw(st.sampled_from([1, 2, 4, 8])), draw(reg), draw(st.integers(1, NSLOTS)))


def build_program(inits: list[int], items: list[tuple]) -> Program:
    """Registers from ``inits``, stack slots zeroed, the items, then r0 = xor of r0..r9."""
    head = [isa.lddw(r, v) for r, v in enumerate(inits)]
    head += [Insn(opcode("stdw"), 10, 0, -8 * s, 0) for s in range(1, NSLOTS + 1)]
    tail = [Insn(opcode("xor", reg_src=True), 0, r) for r in range(1, 10)] + [EXIT]
    ldx = {size: opcode("ldx" + sfx) for size, sfx in isa.SIZE_SUFFIX.items()}
    stxdw = opcode("stxdw")
    body: list[Insn] = []
    for n, item in enumerate(items):
        if item[0] == "alu":
            body.append(item[1])
        elif item[0] == "jump":
            info, dst, src, imm, dist = item[1:]
            dist = min(dist, len(items) - n - 1)  # forward, inside the body or onto the tail
            body.append(Insn(info.opcode, dst, src if info.reg_src else 0, dist, 0 if info.reg_src else imm))
        elif item[0] == "store":
            body.append(Insn(stxdw, 10, item[1], -8 * item[2]))
        elif item[0] == "atomic":
            name, imm, r, s = item[1:]
            body.append(Insn(opcode(name), 10, r, -8 * s, imm))
        else:
            size, r, s = item[1:]
            body.append(Insn(ldx[size], r, 10, -8 * s))
    return Program.load(isa.encode(head + body + tail), name="random")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(INTERESTING_64) | st.integers(0, M64), min_size=10, max_size=10),
       st.lists(body_item(), min_size=1, max_size=30))
def test_jit_agrees_with_the_interpreter(inits, items):
    p = build_program(inits, items)
    want = Interpreter(p).run()
    with LlvmJit(p) as e:
        assert e.run() == want, p.disasm()


# --- lddw of maps and map values ---------------------------------------------------


@pytest.mark.parametrize("engine", ["interp", "jit", "aot"])
def test_lddw_map_forms_on_every_engine(engine):
    from hybrid.user.asm import assemble
    from hybrid.user.engine import create_engine
    from hybrid.user.program import MapRef, MemRegion

    header = ctypes.create_string_buffer(64)
    value = ctypes.create_string_buffer(32)
    value[8:16] = (41).to_bytes(8, "little")
    ref = MapRef("counters", ctypes.addressof(header), 32, ctypes.addressof(value))
    code = (
        isa.encode([isa.Insn(0x18, 1, isa.PSEUDO_MAP_VALUE, 0, 7, 8)])  # &value + 8 of map 7
        + assemble("ldxdw %r0, [%r1]\nadd %r0, 1\nstxdw [%r1], %r0")
        + isa.encode([isa.lddw(2, 7, src=isa.PSEUDO_MAP_FD)])
        + assemble("ldxb %r3, [%r2]\nadd %r0, %r3\nexit")
    )
    header[0] = 100
    regions = (MemRegion(ctypes.addressof(header), 64, "map header", False),
               MemRegion(ctypes.addressof(value), 32, "map value"))
    prog = Program.load(code, maps={7: ref}, regions=regions)
    with create_engine(engine, prog) as eng:
        assert eng.run() == 142
        assert eng.run() == 143
    assert int.from_bytes(value[8:16], "little") == 43
