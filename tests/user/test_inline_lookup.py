"""bpf_map_lookup_elem on ARRAY and PERCPU_ARRAY maps, inlined by the lowering (JIT and AOT).

The inlined lookup must answer exactly what the helper answers - the
value's address, NULL for an index out of range or a NULL key - and the
optimized IR must no longer call the helper when the map is an array.
"""

from __future__ import annotations

import os

import pytest

from hybrid.user import isa
from hybrid.user.asm import assemble
from hybrid.user.engine import create_engine
from hybrid.user.helpers import BASE_HELPERS, MAP_HELPERS
from hybrid.user.jit import LlvmJit
from hybrid.user.lower import lower
from hybrid.user.maps import MapSpec, MapType, ffi, lib
from hybrid.user.program import ArrayLayout, Program
from tests.user.maps_util import k, regions  # noqa: F401 - fixture

NATIVE = ["jit", "aot"]
HELPERS = {**BASE_HELPERS, **MAP_HELPERS}
HELPER_CALL = "call i64 @hybrid_helper_map_lookup_elem("
M32 = (1 << 32) - 1

ARRAY = MapSpec("arr", MapType.ARRAY, 4, 12, 5)  # value_size 12: a 16-byte stride
PERCPU = MapSpec("pcpu", MapType.PERCPU_ARRAY, 4, 8, 7)
HASH = MapSpec("hash", MapType.HASH, 4, 8, 8)
INDICES = (0, 1, 4, 5, 6, 7, 1000, 1 << 31, M32)


def lddw_map(reg: int, index: int) -> list[isa.Insn]:
    return [isa.lddw(reg, index, src=isa.PSEUDO_MAP_IDX)]


def program(region, *parts) -> Program:
    """Instructions from assembler text and ("map", reg, name) tuples (lddw of a map of the region)."""
    names = [m.name for m in region]
    code = b""
    for p in parts:
        code += isa.encode(lddw_map(p[1], names.index(p[2]))) if isinstance(p, tuple) else assemble(p)
    return Program.load(code, helpers=HELPERS, maps=region.map_refs(), regions=region.mem_regions())


def key_on_stack(name: str) -> list:
    """r0 = lookup(map, &(u32)ctx[0]) with the key copied to the stack (what clang emits)."""
    return ["ldxw %r6, [%r1]\nstxw [%r10-4], %r6", ("map", 1, name), "mov %r2, %r10\nadd %r2, -4\ncall 1\nexit"]


def key_in_ctx(name: str) -> list:
    """r0 = lookup(map, ctx): the key pointer is not a stack address."""
    return ["mov %r2, %r1", ("map", 1, name), "call 1\nexit"]


def key_from_ctx_pointer(name: str) -> list:
    """r0 = lookup(map, (void *)(u64)ctx[0]): the key pointer is whatever the context holds (here NULL)."""
    return ["ldxdw %r2, [%r1]", ("map", 1, name), "call 1\nexit"]


def helper_answer(m, key: bytes) -> int:
    """What the C lookup (the helper's implementation) returns, as an integer address."""
    return int(ffi.cast("uintptr_t", lib.hybrid_map_lookup(m._p(), key)))


@pytest.fixture
def on_one_cpu():
    """Pin the test to one CPU (the last allowed), so per-CPU answers do not move between calls."""
    before = os.sched_getaffinity(0)
    cpu = max(before)
    os.sched_setaffinity(0, {cpu})
    yield cpu
    os.sched_setaffinity(0, before)


def engine(kind: str, prog: Program):
    try:
        return create_engine(kind, prog)
    except Exception as e:  # pragma: no cover - an engine missing on this machine
        pytest.skip("engine %s unavailable: %s" % (kind, e))


def test_array_refs_describe_the_values(regions):
    r = regions(ARRAY, PERCPU, HASH, nr_cpus=3)
    refs = r.map_refs()
    arr, pcpu, hsh = (refs[i] for i in range(3))
    assert hsh.inline_array is None
    assert arr.inline_array == ArrayLayout(r["arr"].value_address - r["arr"].address, 16, 5)
    lay = pcpu.inline_array
    assert (lay.stride, lay.max_entries, lay.nr_cpus) == (8, 7, 3) and lay.percpu and not arr.inline_array.percpu
    for cpu in range(3):
        for i in (0, 6):
            want = int(ffi.cast("uintptr_t", lib.hybrid_map_lookup_cpu(r["pcpu"]._p(), k(i), cpu)))
            assert r["pcpu"].address + lay.offset + cpu * lay.plane + i * lay.stride == want


@pytest.mark.parametrize("kind", NATIVE)
@pytest.mark.parametrize("shape", [key_on_stack, key_in_ctx])
@pytest.mark.parametrize("spec", [ARRAY, PERCPU, HASH], ids=lambda s: s.name)
def test_inlined_lookup_answers_as_the_helper(regions, on_one_cpu, kind, shape, spec):
    r = regions(spec)
    m = r[spec.name]
    if spec is ARRAY:
        for i in range(spec.max_entries):
            m.update(k(i), (100 + i).to_bytes(12, "little"))
    elif spec is HASH:
        for i in (0, 4, 7):
            m.update(k(i), (100 + i).to_bytes(8, "little"))
    prog = program(r, *shape(spec.name))
    with engine(kind, prog) as eng, engine("interp", prog) as interp:
        for i in INDICES:
            want = helper_answer(m, k(i))
            assert want == 0 or spec is HASH or i < spec.max_entries
            assert eng.run(k(i) + bytes(4)) == want, (kind, spec.name, i)
            assert interp.run(k(i) + bytes(4)) == want
    if kind == "jit":
        inlined = HELPER_CALL not in eng.ir_text
        assert inlined == (spec is not HASH), eng.ir_text


@pytest.mark.parametrize("kind", NATIVE)
@pytest.mark.parametrize("spec", [ARRAY, PERCPU, HASH], ids=lambda s: s.name)
def test_a_null_key_finds_nothing(regions, kind, spec):
    r = regions(spec)
    with engine(kind, program(r, *key_from_ctx_pointer(spec.name))) as eng:
        assert eng.run(bytes(8)) == 0


@pytest.mark.parametrize("kind", NATIVE)
def test_per_cpu_lookups_use_the_current_cpu(regions, on_one_cpu, kind):
    """Each CPU slot, including a region with fewer slots than this CPU's number (slot = cpu % nr_cpus)."""
    for nr_cpus in (1, 2, on_one_cpu + 1, on_one_cpu + 3):
        r = regions(PERCPU, nr_cpus=nr_cpus)
        m = r["pcpu"]
        prog = program(r, *key_on_stack("pcpu"))
        with engine(kind, prog) as eng:
            for i in (0, 6, 7):
                want = helper_answer(m, k(i))
                assert eng.run(k(i)) == want, (nr_cpus, i)
            expected_slot = on_one_cpu % nr_cpus
            lay = prog.maps[0].inline_array
            assert eng.run(k(3)) == m.address + lay.offset + expected_slot * lay.plane + 3 * lay.stride


@pytest.mark.parametrize("kind", NATIVE)
def test_a_map_chosen_at_run_time_is_still_looked_up_right(regions, kind):
    """r1 is the array or the hash depending on the context: the switch stays, both answers are right."""
    r = regions(ARRAY, HASH)
    r["hash"].update(k(2), bytes(8))
    code = (assemble("ldxw %r6, [%r1]\nldxw %r7, [%r1+4]\nstxw [%r10-4], %r6")
            + isa.encode(lddw_map(1, 0))
            + assemble("jeq %r7, 0, +2")
            + isa.encode(lddw_map(1, 1))
            + assemble("mov %r2, %r10\nadd %r2, -4\ncall 1\nexit"))
    prog = Program.load(code, helpers=HELPERS, maps=r.map_refs(), regions=r.mem_regions())
    with engine(kind, prog) as eng:
        for which, m in ((0, r["arr"]), (1, r["hash"])):
            for i in (0, 2, 3, 5, M32):
                assert eng.run(k(i) + k(which)) == helper_answer(m, k(i)), (m.name, i)
    if kind == "jit":
        with LlvmJit(prog) as jit:
            assert HELPER_CALL in jit.ir_text  # for the hash


def test_array_values_are_read_and_written_through_the_inlined_pointer(regions):
    """A counting program (lookup, then an atomic add through r0) on an array, as probes do."""
    r = regions(MapSpec("counts", MapType.ARRAY, 4, 8, 4))
    prog = program(r, *key_on_stack("counts")[:2], "mov %r2, %r10\nadd %r2, -4\ncall 1\n"
                   "jeq %r0, 0, +3\nmov %r1, 1\nlock add [%r0], %r1\nldxdw %r0, [%r0]\nexit")
    for kind in NATIVE:
        with engine(kind, prog) as eng:
            for n in range(1, 4):
                assert eng.run(k(2)) == (n if kind == "jit" else n + 3)
            assert eng.run(k(4)) == 0  # out of range: NULL, no write
    assert r["counts"].lookup(k(2)) == (6).to_bytes(8, "little")
    assert [r["counts"].lookup(k(i)) for i in (0, 1, 3)] == [bytes(8)] * 3


def test_no_inlining_when_lddw_values_come_from_a_resolver(regions):
    """A resolver may relocate the maps (another process): the lookup goes through the helper."""
    r = regions(ARRAY)
    prog = program(r, *key_on_stack("arr"))
    assert "switch" in str(lower(prog))  # the (unoptimized) inlined lookup
    resolved = str(lower(prog, resolve_lddw=lambda slot, insn: r["arr"].address))
    assert "switch" not in resolved and "hybrid_helper_map_lookup_elem" in resolved


@pytest.mark.parametrize("cpu, nr_cpus", [(5, 2), (5, 3), (1, 3), (0, 4)])
def test_per_cpu_slot_is_the_cpu_modulo_the_slots(regions, monkeypatch, cpu, nr_cpus):
    """CPU numbers past the region's slots wrap as in maps_impl.h's cpu_slot() (JIT with a fake CPU)."""
    import ctypes

    from hybrid import native
    from hybrid.user import jit

    fake = ctypes.CFUNCTYPE(ctypes.c_uint32)(lambda: cpu)
    real = native.symbol_address
    monkeypatch.setattr(jit.native, "symbol_address",
                        lambda s: ctypes.cast(fake, ctypes.c_void_p).value if s == "hybrid_current_cpu" else real(s))
    r = regions(PERCPU, nr_cpus=nr_cpus)
    prog = program(r, *key_on_stack("pcpu"))
    lay = prog.maps[0].inline_array
    try:
        with LlvmJit(prog) as eng:
            assert eng.run(k(3)) == r["pcpu"].address + lay.offset + (cpu % nr_cpus) * lay.plane + 3 * lay.stride
            assert eng.run(k(7)) == 0
    finally:
        monkeypatch.undo()
        jit.bind_helpers([])  # the real hybrid_current_cpu again for later JITs
