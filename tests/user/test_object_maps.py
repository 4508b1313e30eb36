"""Every map type through hybrid.load(): tests/user/progs/maps_all.bpf.c on every engine.

Each test drives one program of the object with arguments in a pt_regs
context, and checks both the program's results (r0) and the maps' contents
through ``obj.maps`` against a model computed from the same inputs.
"""

from __future__ import annotations

import errno as E
import ipaddress
import random
import struct

import pytest

import hybrid
from hybrid.user.maps import (BPF_ANY, BPF_EXIST, BPF_F_CURRENT_CPU, BPF_NOEXIST,
                              BPF_RB_AVAIL_DATA, BPF_RB_CONS_POS, BPF_RB_PROD_POS, BPF_RB_RING_SIZE,
                              PerfBufferConsumer, RingBufferConsumer, possible_cpus)
from tests.user.object_util import (ENGINES, NONE, U64, allowed_cpus, as_u64, caller, frame_chain, neg, on_cpu, u32,
                                    u64, var)

BPF_F_USER_STACK = 1 << 8


@pytest.fixture
def load(bpf_build):
    """``load(**values)``: maps_all.bpf.o loaded (closed at the end of the test)."""
    objs = []

    def _load(**values):
        obj = hybrid.load(bpf_build.obj("maps_all"), values=values or None)
        objs.append(obj)
        return obj

    yield _load
    for obj in objs:
        obj.close()


def as_dict(m) -> dict[int, int]:
    return {int.from_bytes(k, "little"): as_u64(v) for k, v in m.items()}


# --- hash, array, lru_hash -----------------------------------------------------------------------

KV_UPDATE, KV_LOOKUP, KV_DELETE, KV_ADD = range(4)
HASH, LRU, ARRAY = range(3)


@pytest.mark.parametrize("engine", ENGINES)
def test_hash(load, engine):
    obj = load()
    kv = caller(obj, "kv", engine)
    rng = random.Random(1)
    model: dict[int, int] = {}
    for _ in range(150):
        op, key, value = rng.randrange(4), rng.randrange(12), rng.getrandbits(64)
        flags = rng.choice([BPF_ANY, BPF_NOEXIST, BPF_EXIST, BPF_ANY, 4])
        if op == KV_UPDATE:
            if flags == 4:
                want = neg(E.EINVAL)
            elif flags == BPF_NOEXIST and key in model:
                want = neg(E.EEXIST)
            elif flags == BPF_EXIST and key not in model:
                want = neg(E.ENOENT)
            elif key not in model and len(model) == 8:
                want = neg(E.E2BIG)
            else:
                model[key], want = value, 0
        elif op == KV_LOOKUP:
            want = model.get(key, NONE)
        elif op == KV_DELETE:
            want = 0 if model.pop(key, None) is not None else neg(E.ENOENT)
        else:
            if key in model:
                model[key] = want = (model[key] + value) & U64
            else:
                want = NONE
        assert kv(HASH, op, key, value, flags) == want, (op, key, flags)
        assert as_dict(obj.maps["hash"]) == model
    assert len(obj.maps["hash"]) == len(model)
    # what Python writes, the program reads
    for key in list(model):
        obj.maps["hash"].delete(u32(key))
    obj.maps["hash"].update(u32(77), u64(123456789))
    assert kv(HASH, KV_LOOKUP, 77) == 123456789
    assert kv(HASH, KV_LOOKUP, 78) == NONE


@pytest.mark.parametrize("engine", ENGINES)
def test_array(load, engine):
    obj = load()
    kv = caller(obj, "kv", engine)
    rng = random.Random(2)
    model = [0] * 8
    for _ in range(200):
        op, key, value = rng.randrange(4), rng.randrange(10), rng.getrandbits(64)
        flags = rng.choice([BPF_ANY, BPF_NOEXIST, BPF_EXIST])
        if op == KV_UPDATE:
            if key >= 8:
                want = neg(E.E2BIG)
            elif flags == BPF_NOEXIST:
                want = neg(E.EEXIST)  # every element of an array exists
            else:
                model[key], want = value, 0
        elif op == KV_LOOKUP:
            want = model[key] if key < 8 else NONE
        elif op == KV_DELETE:
            want = neg(E.EINVAL)
        else:
            if key < 8:
                model[key] = want = (model[key] + value) & U64
            else:
                want = NONE
        assert kv(ARRAY, op, key, value, flags) == want, (op, key, flags)
    assert as_dict(obj.maps["array"]) == dict(enumerate(model))
    obj.maps["array"].update(u32(3), u64(0xABCDEF))
    assert kv(ARRAY, KV_LOOKUP, 3) == 0xABCDEF


@pytest.mark.parametrize("engine", ENGINES)
def test_lru_hash_evicts_instead_of_failing(load, engine):
    obj = load()
    kv = caller(obj, "kv", engine)
    lru = obj.maps["lru_hash"]
    inserted = {}
    for key in range(40):
        value = key * 1000 + 7
        assert kv(LRU, KV_UPDATE, key, value, BPF_ANY) == 0  # a plain hash says E2BIG after 8
        inserted[key] = value
        assert kv(LRU, KV_LOOKUP, key) == value  # the newest element is always there
        content = as_dict(lru)
        assert 0 < len(content) <= 8
        assert all(inserted[k] == v for k, v in content.items())
    content = as_dict(lru)
    for key in range(40):  # the program and Python agree on every key (lookups evict nothing)
        assert kv(LRU, KV_LOOKUP, key) == (inserted[key] if key in content else NONE)
    assert kv(LRU, KV_UPDATE, 1000, 1, BPF_EXIST) == neg(E.ENOENT)
    assert kv(LRU, KV_UPDATE, 39, 1, BPF_NOEXIST) == neg(E.EEXIST)
    assert kv(LRU, KV_DELETE, 39) == 0 and kv(LRU, KV_DELETE, 39) == neg(E.ENOENT)
    assert u32(39) not in lru


# --- per-CPU maps ----------------------------------------------------------------------------------

PERCPU = {"pc_hash": 0, "pc_array": 1, "pc_lru": 2}


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name", PERCPU)
def test_percpu_maps(load, engine, name):
    obj = load()
    percpu = caller(obj, "percpu", engine)
    m, which, n = obj.maps[name], PERCPU[name], possible_cpus()
    assert m.nr_cpus == n
    want = [0] * n
    key = 1
    for i, cpu in enumerate(allowed_cpus() * 2):
        add = 100 + i
        with on_cpu(cpu):
            # the program adds on the CPU it runs on, then reads CPU `cpu` with map_lookup_percpu_elem
            assert percpu(which, key, add, cpu) == want[cpu] + add
        want[cpu] += add
        assert [as_u64(v) for v in m.lookup(u32(key))] == want
    assert m.sum(u32(key)) == sum(want)
    # values written from Python per CPU are what map_lookup_percpu_elem reads for each CPU
    values = [(7 + c) * 11 for c in range(n)]
    m.update(u32(2), [u64(v) for v in values])
    for cpu in range(n):
        assert percpu(which, 2, 0, cpu) == values[cpu]
    assert percpu(which, 2, 0, n) == NONE  # no such CPU
    if name == "pc_array":
        assert percpu(which, 4, 5, 0) == NONE - 1  # index 4 of a 4-entry array: no element, update fails
    else:
        assert m.lookup(u32(3)) is None
        cpu = allowed_cpus()[-1]
        with on_cpu(cpu):
            assert percpu(which, 3, 9, cpu) == 9  # created with 9 on the current CPU, 0 on the others
        assert [as_u64(v) for v in m.lookup(u32(3))] == [9 if c == cpu else 0 for c in range(n)]


# --- queue, stack, bloom filter -----------------------------------------------------------------------

QS_PUSH, QS_POP, QS_PEEK = range(3)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name", ["queue", "stack"])
def test_queue_and_stack(load, engine, name):
    obj = load()
    qs = caller(obj, "qs", engine)
    which, m = ("queue", "stack").index(name), obj.maps[name]
    fifo = name == "queue"
    model: list[int] = []

    def take(peek: bool) -> int:
        if not model:
            return NONE
        return model[0 if fifo else -1] if peek else model.pop(0 if fifo else -1)

    rng = random.Random(3)
    for _ in range(120):
        op, value = rng.randrange(3), rng.getrandbits(63)
        flags = rng.choice([BPF_ANY, BPF_ANY, BPF_EXIST])
        if op == QS_PUSH:
            if len(model) == 4 and flags != BPF_EXIST:
                want = neg(E.E2BIG)
            else:
                if len(model) == 4:  # BPF_EXIST: the oldest value makes room
                    model.pop(0)
                model.append(value)
                want = 0
        else:
            want = take(op == QS_PEEK)
            want = neg(E.ENOENT) if want == NONE else want
        assert qs(which, op, value, flags) == want, (op, flags)
        assert m.peek() == (None if not model else u64(model[0 if fifo else -1]))
    # Python pushes, the program pops (and the other way round)
    while model:
        model.pop()
    while m.pop() is not None:
        pass
    for v in (11, 22, 33):
        m.push(u64(v))
    assert [qs(which, QS_POP) for _ in range(4)] == ([11, 22, 33] if fifo else [33, 22, 11]) + [neg(E.ENOENT)]
    for v in (44, 55):
        assert qs(which, QS_PUSH, v) == 0
    assert [m.pop(), m.pop(), m.pop()] == ([u64(44), u64(55)] if fifo else [u64(55), u64(44)]) + [None]


@pytest.mark.parametrize("engine", ENGINES)
def test_bloom_filter(load, engine):
    obj = load()
    qs = caller(obj, "qs", engine)
    bloom = obj.maps["bloom"]
    rng = random.Random(4)
    from_prog = [rng.getrandbits(64) for _ in range(40)]
    from_python = [rng.getrandbits(64) for _ in range(40)]
    for v in from_prog:
        assert qs(2, QS_PUSH, v) == 0
    for v in from_python:
        bloom.push(u64(v))
    for v in from_prog + from_python:  # no false negatives, whoever added the value
        assert qs(2, QS_PEEK, v) == v and u64(v) in bloom
    others = [rng.getrandbits(64) for _ in range(200)]
    misses = 0
    for v in others:  # the program and Python answer alike for values never added
        got = qs(2, QS_PEEK, v)
        assert got == (v if u64(v) in bloom else neg(E.ENOENT))
        misses += got != v
    assert misses > 150  # 80 values in 1024 slots with 5 hashes: false positives are rare
    assert qs(2, QS_POP) == neg(E.EOPNOTSUPP)  # a bloom filter cannot give values back


# --- LPM trie -----------------------------------------------------------------------------------------


def ip(addr: str) -> int:
    """The address as the program's u32 argument: network order bytes in the low 4 bytes."""
    return int.from_bytes(ipaddress.IPv4Address(addr).packed, "little")


@pytest.mark.parametrize("engine", ENGINES)
def test_lpm_trie(load, engine):
    obj = load()
    lpm = caller(obj, "lpm_prog", engine)
    trie = obj.maps["lpm"]
    prefixes = {"10.0.0.0/8": 1, "10.1.0.0/16": 2, "10.1.2.0/24": 3, "192.168.0.0/16": 4, "0.0.0.0/0": 5}
    for i, (net, value) in enumerate(prefixes.items()):
        n = ipaddress.IPv4Network(net)
        if i % 2:  # half from the program, half from Python
            assert lpm(KV_UPDATE, ip(str(n.network_address)), n.prefixlen, value) == 0
        else:
            trie.update(trie.key(n.prefixlen, n.network_address.packed), u64(value))

    def longest(addr: str, table: dict[str, int]) -> int:
        best = max((ipaddress.IPv4Network(net) for net in table if ipaddress.IPv4Address(addr) in
                    ipaddress.IPv4Network(net)), key=lambda n: n.prefixlen, default=None)
        return NONE if best is None else table[str(best)]

    addrs = ["10.1.2.3", "10.1.3.4", "10.2.0.1", "192.168.7.7", "8.8.8.8", "10.1.2.255", "11.0.0.0"]
    for a in addrs:
        assert lpm(KV_LOOKUP, ip(a), 32) == longest(a, prefixes), a
        assert as_u64(trie.lookup(trie.key(32, ipaddress.IPv4Address(a).packed)) or u64(NONE)) == \
            longest(a, prefixes)
    assert lpm(KV_DELETE, ip("10.1.0.0"), 16) == 0
    assert lpm(KV_DELETE, ip("10.1.0.0"), 16) == neg(E.ENOENT)
    del prefixes["10.1.0.0/16"]
    lpm(KV_DELETE, ip("0.0.0.0"), 0)
    del prefixes["0.0.0.0/0"]
    for a in addrs:
        assert lpm(KV_LOOKUP, ip(a), 32) == longest(a, prefixes), a
    assert len(trie) == len(prefixes)
    assert lpm(KV_UPDATE, ip("1.2.3.4"), 33, 1) == neg(E.EINVAL)  # prefixlen beyond the key's 32 bits


# --- maps of maps ----------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
def test_array_of_maps(load, engine):
    obj = load()
    mim = caller(obj, "mim", engine)
    outer = obj.maps["outer_array"]
    # slots 0 and 2 are set by the object's `.values`
    assert outer.lookup(u32(0)) is obj.maps["inner_a"] and outer.lookup(u32(2)) is obj.maps["inner_b"]
    assert outer.lookup(u32(1)) is None
    assert mim(0, 0, 1, 5) == 5 and mim(0, 0, 1, 6) == 11
    assert mim(0, 2, 3, 9) == 9
    assert mim(0, 1, 0, 1) == NONE  # no inner map in slot 1
    assert mim(0, 0, 4, 1) == NONE - 1  # inner index 4 of a 4-entry array: not created
    assert as_dict(obj.maps["inner_a"]) == {0: 0, 1: 11, 2: 0, 3: 0}
    assert as_dict(obj.maps["inner_b"]) == {0: 0, 1: 0, 2: 0, 3: 9}
    outer.update(u32(1), obj.maps["inner_c"])  # Python installs another inner map
    assert mim(0, 1, 2, 42) == 42
    assert as_dict(obj.maps["inner_c"]) == {0: 0, 1: 0, 2: 42, 3: 0}
    outer.delete(u32(0))
    assert mim(0, 0, 1, 1) == NONE
    assert as_u64(obj.maps["inner_a"].lookup(u32(1))) == 11


@pytest.mark.parametrize("engine", ENGINES)
def test_hash_of_maps(load, engine):
    obj = load()
    mim = caller(obj, "mim", engine)
    outer = obj.maps["outer_hash"]
    assert mim(1, 500, 0, 1) == NONE
    outer.update(u32(500), obj.maps["inner_h1"])
    outer.update(u32(7), obj.maps["inner_h2"])
    assert mim(1, 500, 10, 3) == 3 and mim(1, 500, 10, 4) == 7
    assert mim(1, 7, 10, 100) == 100
    for k in range(11, 14):
        assert mim(1, 7, k, k) == k
    assert mim(1, 7, 14, 1) == NONE - 1  # the inner hash holds 4 entries
    assert as_dict(obj.maps["inner_h1"]) == {10: 7}
    assert as_dict(obj.maps["inner_h2"]) == {10: 100, 11: 11, 12: 12, 13: 13}
    outer.delete(u32(500))
    assert mim(1, 500, 10, 1) == NONE


# --- ring buffer and perf event array -------------------------------------------------------------

RB_OUTPUT, RB_SUBMIT, RB_DISCARD, RB_QUERY, RB_RESERVE_SIZE = range(5)
RB_HDR = 8  # BPF_RINGBUF_HDR_SZ


@pytest.mark.parametrize("engine", ENGINES)
def test_ringbuf(load, engine):
    obj = load()
    rb = caller(obj, "rb", engine)
    ring = obj.maps["ring"]
    got: list[tuple[int, int]] = []
    consumer = RingBufferConsumer(ring, lambda data: got.append(struct.unpack("<QQ", data)))
    assert rb(RB_QUERY, 0, 0, BPF_RB_RING_SIZE) == 4096 == ring.ring_size
    sent = []
    for seq in range(1, 31):
        op = (RB_OUTPUT, RB_SUBMIT, RB_DISCARD)[seq % 3]
        value = seq * 0x1111
        assert rb(op, seq, value) == 0
        if op != RB_DISCARD:
            sent.append((seq, value))
        assert rb(RB_QUERY, 0, 0, BPF_RB_AVAIL_DATA) == ring.avail_data
    assert rb(RB_QUERY, 0, 0, BPF_RB_AVAIL_DATA) == 30 * (16 + RB_HDR)  # discarded records take room too
    assert rb(RB_QUERY, 0, 0, BPF_RB_PROD_POS) == 30 * (16 + RB_HDR)
    assert rb(RB_QUERY, 0, 0, BPF_RB_CONS_POS) == 0
    assert consumer.consume() == len(sent)  # discarded records are skipped
    assert got == sent
    assert rb(RB_QUERY, 0, 0, BPF_RB_AVAIL_DATA) == 0
    assert rb(RB_QUERY, 0, 0, BPF_RB_CONS_POS) == 30 * (16 + RB_HDR)
    # a reservation that does not fit fails (NULL) and writes nothing
    assert rb(RB_RESERVE_SIZE, 1) == 1
    assert rb(RB_RESERVE_SIZE, 2) == 0  # 2 * (2048 + 8) > 4096
    big = []
    consumer.callback = big.append
    assert consumer.consume() == 1 and len(big[0]) == 2048 and as_u64(big[0]) == 1
    assert rb(RB_QUERY, 0, 0, 99) == 0  # unknown query


@pytest.mark.parametrize("engine", ENGINES)
def test_perf_event_array(load, engine):
    obj = load()
    perf_out = caller(obj, "perf_out", engine)
    perf = obj.maps["perf"]
    assert perf.max_entries == possible_cpus()
    assert perf_out(BPF_F_CURRENT_CPU, 1, 1) == neg(E.ENOENT)  # no consumer yet: the entry has no event
    got: list[tuple[int, int, int]] = []
    with PerfBufferConsumer(perf, lambda cpu, data: got.append((cpu, *struct.unpack("<QQ", data)))) as pb:
        want = []
        for i, cpu in enumerate(allowed_cpus() * 3):
            with on_cpu(cpu):
                assert perf_out(BPF_F_CURRENT_CPU, i, i * 3) == 0
            want.append((cpu, i, i * 3))
        assert perf_out(0, 100, 1) == 0  # flags = an explicit entry index
        want.append((0, 100, 1))
        assert perf_out(possible_cpus(), 1, 1) == neg(E.E2BIG)  # no such entry
        assert pb.consume() == len(want)
        assert sorted(got) == sorted(want)
        for cpu in allowed_cpus():  # in order per CPU
            assert [g for g in got if g[0] == cpu] == [w for w in want if w[0] == cpu]
    assert perf_out(0, 1, 1) == neg(E.ENOENT)  # consumer closed


# --- prog array: tail calls -----------------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
def test_tail_calls(load, engine):
    obj = load()
    entry = caller(obj, "tail_entry", engine)
    jumps = obj.maps["jumps"]
    assert jumps.lookup(u32(0)) == u32(obj.program_id("tail_a"))  # from the object's `.values`
    assert entry(0, 5) == 1005
    assert entry(1, 5) == 0xFA11 + 1  # empty slot: the caller goes on
    assert entry(9, 5) == 0xFA11 + 9  # out of range
    jumps.update(u32(1), obj.program_id("tail_b"))
    assert entry(1, 6) == 2006
    jumps.update(u32(0), obj.program_id("tail_b"))
    assert entry(0, 7) == 2007
    jumps.delete(u32(0))
    assert entry(0, 7) == 0xFA11
    # a program that tail-calls itself: 33 tail calls at most (MAX_TAIL_CALL_CNT), the first from tail_entry
    jumps.update(u32(3), obj.program_id("tail_loop"))
    assert entry(3) == 0x1009
    assert var(obj, "tail_hops") == u64(33)
    assert entry(3) == 0x1009  # the count starts again with every run
    assert var(obj, "tail_hops") == u64(66)


@pytest.mark.parametrize("engine", ENGINES)
def test_tail_call_to_a_closed_objects_program_falls_through(load, engine):
    """Program ids are global: an id of a closed object must not run its freed code on unmapped maps."""
    old = load()
    caller(old, "tail_loop", engine)()  # builds the engines, registers the ids
    stale = old.program_id("tail_loop")
    old.close()
    obj = load()
    obj.maps["jumps"].update(u32(1), stale)
    assert caller(obj, "tail_entry", engine)(1) == 0xFA11 + 1
    assert var(obj, "tail_hops") == u64(0)


# --- global data, const volatile, subprograms -------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("values", [{}, {"scale": 3, "tag": b"Zed\0\0\0\0\0"}])
def test_globals_and_subprograms(load, engine, values):
    obj = load(**values)
    run = caller(obj, "globals", engine)
    scale = values.get("scale", 1)
    tag = values.get("tag", b"default\0")
    assert var(obj, "scale") == u64(scale) and var(obj, "tag") == tag  # const volatile values set before load
    acc, history = 5, [0] * 4
    for i, x in enumerate([3, 10, 0, 7, 1 << 20, 2]):
        acc = (acc + x * x * scale + x) & U64
        history[i % 4] = x
        assert run(x) == (acc + tag[0]) & U64
        assert var(obj, "acc") == u64(acc)
        assert var(obj, "runs") == u64(i + 1)
        assert var(obj, "history") == b"".join(u32(h) for h in history)
    # Python writes global data, the program sees it
    obj.maps[".data"].update(u32(0), u64(1000))
    assert run(1) == 1000 + scale + 1 + tag[0]


# --- stack traces --------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
def test_stack_trace_map(load, engine):
    obj = load()
    stackid = caller(obj, "stackid", engine)
    stacks = obj.maps["stacks"]
    rets = [0x401100 + 0x10 * i for i in range(5)]
    buf, fp = frame_chain(rets)
    ip = 0x400FFF
    sid = stackid(0, 0, 0, 0, BPF_F_USER_STACK, ip=ip, bp=fp)
    assert 0 <= sid < 64
    assert stacks.stack(sid) == [ip] + rets
    assert stacks.lookup(u32(sid)) == b"".join(u64(a) for a in [ip] + rets) + bytes(8 * 2)  # zero padded to 8
    assert stackid(0, 0, 0, 0, BPF_F_USER_STACK, ip=ip, bp=fp) == sid  # the same stack, the same id
    sid2 = stackid(0, 0, 0, 0, BPF_F_USER_STACK | 2, ip=ip, bp=fp)  # skip 2 frames
    assert stacks.stack(sid2) == rets[1:]
    deep, fp2 = frame_chain([0x500000 + i for i in range(20)])
    sid3 = stackid(0, 0, 0, 0, BPF_F_USER_STACK, ip=1, bp=fp2)
    assert stacks.stack(sid3) == [1] + [0x500000 + i for i in range(7)]  # cut at value_size / 8 frames
    assert sorted(int.from_bytes(k, "little") for k in stacks) == sorted({sid, sid2, sid3})
    assert stackid(0, 0, 0, 0, 0, ip=ip, bp=fp) == neg(E.EFAULT)  # a kernel stack: there is none
    assert stackid(0, 0, 0, 0, 1 << 20, ip=ip, bp=fp) == neg(E.EINVAL)  # unknown flag
    stacks.delete(u32(sid))
    assert stacks.stack(sid) is None
    del buf, deep
