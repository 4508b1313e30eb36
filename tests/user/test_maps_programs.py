"""Programs using maps through the helpers, on every engine (the interpreter calls the same C)."""

from __future__ import annotations

import threading

import pytest

from hybrid.errors import VmError
from hybrid.user import isa
from hybrid.user.asm import assemble
from hybrid.user.engine import create_engine
from hybrid.user.helpers import BASE_HELPERS, MAP_HELPERS
from hybrid.user.maps import (BPF_F_NO_PREALLOC, MapSpec, MapType, PerfBufferConsumer, RingBufferConsumer)
from hybrid.user.program import Program
from tests.user.maps_util import as_int, k, regions, u64  # noqa: F401 - fixture

ENGINES = ["interp", "jit", "aot"]
HELPERS = {**BASE_HELPERS, **MAP_HELPERS}


def lddw_map(reg: int, index: int) -> bytes:
    return isa.encode([isa.lddw(reg, index, src=isa.PSEUDO_MAP_IDX)])


def build(region, *parts) -> Program:
    """Assemble text parts, with ("map", reg, name) tuples as lddw of a map of the region."""
    names = [m.name for m in region]
    code = b""
    for p in parts:
        code += lddw_map(p[1], names.index(p[2])) if isinstance(p, tuple) else assemble(p)
    return Program.load(code, helpers=HELPERS, maps=region.map_refs(), regions=region.mem_regions())


def engine(kind, prog):
    try:
        return create_engine(kind, prog)
    except Exception as e:  # pragma: no cover - an engine missing on this machine
        pytest.skip("engine %s unavailable: %s" % (kind, e))


# count[ctx[0]] += 1, the classic probe: lookup, insert zero when missing, atomic add
COUNT = [("map", 9, "counts"), """
    ldxw %r6, [%r1]
    stxw [%r10-4], %r6
    stdw [%r10-16], 0
    mov %r1, %r9
    mov %r2, %r10
    add %r2, -4
    call 1
    jne %r0, 0, found
    mov %r1, %r9
    mov %r2, %r10
    add %r2, -4
    mov %r3, %r10
    add %r3, -16
    mov %r4, 1
    call 2
    mov %r1, %r9
    mov %r2, %r10
    add %r2, -4
    call 1
    jeq %r0, 0, exit
    found:
    mov %r1, 1
    lock add [%r0], %r1
    ldxdw %r0, [%r0]
    exit
"""]


@pytest.mark.parametrize("kind", ENGINES)
@pytest.mark.parametrize("t", [MapType.HASH, MapType.LRU_HASH, MapType.ARRAY])
def test_counting_program(regions, kind, t):
    r = regions(MapSpec("counts", t, 4, 8, 16))
    with engine(kind, build(r, *COUNT)) as eng:
        for i in range(5):
            assert eng.run(k(3)) == i + 1
        assert eng.run(k(7)) == 1
    assert r["counts"].lookup(k(3)) == u64(5)


@pytest.mark.parametrize("kind", ["jit", "aot"])
def test_native_program_in_many_threads_counts_exactly(regions, kind):
    r = regions(MapSpec("counts", MapType.HASH, 4, 8, 64))
    n_threads, n_runs, n_keys = 4, 3000, 8
    with engine(kind, build(r, *COUNT)) as eng:
        def body(t):
            for i in range(n_runs):
                eng.run(k((i * 7 + t) % n_keys))  # ctypes releases the GIL: the runs overlap

        threads = [threading.Thread(target=body, args=(t,)) for t in range(n_threads)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    counts = {as_int(key): as_int(v) for key, v in r["counts"].items()}
    assert sum(counts.values()) == n_threads * n_runs and len(counts) == n_keys


@pytest.mark.parametrize("kind", ENGINES)
def test_array_value_by_lddw_and_percpu_lookup(regions, kind):
    r = regions(MapSpec("cfg", MapType.ARRAY, 4, 16, 1), MapSpec("pc", MapType.PERCPU_ARRAY, 4, 8, 2))
    r["cfg"].update(k(0), u64(40) + u64(2))
    r["pc"].update(k(1), [u64(100 + c) for c in range(r.nr_cpus)])
    code = (isa.encode([isa.Insn(0x18, 6, isa.PSEUDO_MAP_IDX_VALUE, 0, 0, 8)])  # &cfg[0] + 8
            + assemble("ldxdw %r7, [%r6]\nstw [%r10-4], 1")
            + lddw_map(1, 1)
            + assemble(f"mov %r2, %r10\nadd %r2, -4\nmov %r3, {r.nr_cpus - 1}\ncall 195\njeq %r0, 0, +2\n"
                       "ldxdw %r0, [%r0]\nadd %r0, %r7\nexit"))
    prog = Program.load(code, helpers=HELPERS, maps=r.map_refs(), regions=r.mem_regions())
    with engine(kind, prog) as eng:
        assert eng.run() == 100 + r.nr_cpus - 1 + 2


@pytest.mark.parametrize("kind", ENGINES)
def test_ringbuf_program_reserve_submit_discard_output_query(regions, kind):
    r = regions(MapSpec("rb", MapType.RINGBUF, 0, 0, 4096))
    # reserve 8 bytes, copy ctx[0..8] in, submit (discard when the first byte is 0);
    # then output 8 bytes from the stack; return BPF_RB_AVAIL_DATA
    prog = build(r, ("map", 9, "rb"), """
        mov %r6, %r1
        mov %r1, %r9
        mov %r2, 8
        mov %r3, 0
        call 131
        jeq %r0, 0, out
        ldxdw %r2, [%r6]
        stxdw [%r0], %r2
        mov %r1, %r0
        mov %r2, 0
        ldxb %r3, [%r0]
        jeq %r3, 0, drop
        call 132
        ja out
        drop:
        call 133
        out:
        stdw [%r10-8], 7
        mov %r1, %r9
        mov %r2, %r10
        add %r2, -8
        mov %r3, 8
        mov %r4, 0
        call 130
        mov %r1, %r9
        mov %r2, 0
        call 134
        exit
    """)
    got = []
    c = RingBufferConsumer(r["rb"], got.append)
    with engine(kind, prog) as eng:
        assert eng.run(u64(5)) == 2 * 16
        assert eng.run(u64(0)) == 2 * 16 + 16 + 16  # the discarded record still takes room until consumed
    assert c.consume() == 3
    assert got == [u64(5), u64(7), u64(7)]


@pytest.mark.parametrize("kind", ENGINES)
def test_perf_event_output_program(regions, kind):
    r = regions(MapSpec("events", MapType.PERF_EVENT_ARRAY, 4, 4, 0))
    got = []
    prog = build(r, "mov %r6, %r1\nstdw [%r10-8], 0x55", ("map", 2, "events"),
                 "mov %r1, %r6\nlddw %r3, 0xffffffff\nmov %r4, %r10\nadd %r4, -8\nmov %r5, 8\ncall 25\nexit")
    with engine(kind, prog) as eng:
        assert eng.run() == (-2) & (2**64 - 1)  # -ENOENT: nobody consumes yet
        with PerfBufferConsumer(r["events"], lambda cpu, d: got.append(d)) as c:
            assert eng.run() == 0
            assert c.poll(100) == 1
    assert got == [u64(0x55)]


@pytest.mark.parametrize("kind", ENGINES)
def test_queue_and_bloom_programs(regions, kind):
    r = regions(MapSpec("q", MapType.QUEUE, 0, 8, 4), MapSpec("bf", MapType.BLOOM_FILTER, 0, 8, 16))
    # push ctx[0] twice to the queue and once to the bloom filter, pop one, peek the bloom filter
    prog = build(
        r,
        "mov %r6, %r1",
        ("map", 1, "q"), "mov %r2, %r6\nmov %r3, 0\ncall 87",
        ("map", 1, "q"), "mov %r2, %r6\nmov %r3, 0\ncall 87",
        ("map", 1, "bf"), "mov %r2, %r6\nmov %r3, 0\ncall 87",
        ("map", 1, "q"), "mov %r2, %r10\nadd %r2, -8\ncall 88\nldxdw %r7, [%r10-8]",
        ("map", 1, "bf"), "mov %r2, %r10\nadd %r2, -8\ncall 89",   # peek: 0 = maybe present
        "lsh %r0, 32\nadd %r0, %r7\nexit",
    )
    with engine(kind, prog) as eng:
        assert eng.run(u64(9)) == 9
    assert r["q"].pop() == u64(9) and r["q"].pop() is None
    assert r["bf"].contains(u64(9))


@pytest.mark.parametrize("kind", ENGINES)
def test_map_in_map_program(regions, kind):
    inner = MapSpec("t", MapType.HASH, 4, 8, 4)
    r = regions(MapSpec("outer", MapType.ARRAY_OF_MAPS, 4, 4, 2, inner=inner), MapSpec("in", MapType.HASH, 4, 8, 4))
    r["outer"].update(k(1), r["in"])
    r["in"].update(k(5), u64(1234))
    prog = build(
        r,
        "stw [%r10-4], 1", ("map", 1, "outer"), "mov %r2, %r10\nadd %r2, -4\ncall 1\njeq %r0, 0, +7",
        "stw [%r10-8], 5\nmov %r1, %r0\nmov %r2, %r10\nadd %r2, -8\ncall 1\njeq %r0, 0, +1\nldxdw %r0, [%r0]",
        "exit",
    )
    with engine(kind, prog) as eng:
        assert eng.run() == 1234


def test_lpm_and_delete_programs_on_the_interpreter(regions):
    r = regions(MapSpec("lpm", MapType.LPM_TRIE, 8, 8, 4, BPF_F_NO_PREALLOC))
    r["lpm"].update(k(8) + bytes([10, 0, 0, 0]), u64(8))
    prog = build(r, ("map", 9, "lpm"), """
        stw [%r10-8], 32
        stw [%r10-4], 0x0403020a
        mov %r1, %r9
        mov %r2, %r10
        add %r2, -8
        call 1
        jeq %r0, 0, exit
        ldxdw %r6, [%r0]
        mov %r1, %r9
        mov %r2, %r10
        add %r2, -8
        call 3
        add %r0, %r6
        exit
    """)
    with create_engine("interp", prog) as eng:
        assert eng.run() == (8 - 2) & (2**64 - 1)  # found /8; deleting the /32 key: -ENOENT


def test_interpreter_refuses_bad_map_pointers(regions):
    r = regions(MapSpec("h", MapType.HASH, 4, 8, 4))
    prog = Program.load(assemble("lddw %r1, 0x1000\nmov %r2, %r10\nadd %r2, -8\nstdw [%r10-8], 0\ncall 1\nexit"),
                        helpers=HELPERS)
    with create_engine("interp", prog) as eng:
        with pytest.raises(VmError, match="not the address of a map"):
            eng.run()
    # a key outside the program's memory is an error, not a crash
    prog = build(r, ("map", 1, "h"), "mov %r2, 16\ncall 1\nexit")
    with create_engine("interp", prog) as eng:
        with pytest.raises(VmError, match="outside every region"):
            eng.run()
    prog = Program.load(assemble("mov %r1, 64\nmov %r2, 0\ncall 132\nexit"), helpers=HELPERS)
    with create_engine("interp", prog) as eng:
        with pytest.raises(VmError, match="not a record of a ring buffer"):
            eng.run()
