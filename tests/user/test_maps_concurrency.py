"""Maps hammered by several threads and several processes at once; totals must be exact.

The work loops are C (``hybrid_test_*`` in maps.c) so the threads really run
in parallel (cffi releases the GIL); processes are forked children (same
address) and fresh interpreters opening the region by name (another address).
"""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
import threading

import pytest

from hybrid.user import maps as M
from hybrid.user.maps import MapSpec, MapType, Region, ffi, lib
from tests.user.maps_util import as_int, regions  # noqa: F401 - fixture

THREADS = 4
ITERS = 100_000


def run_threads(fn, n=THREADS):
    results = [None] * n

    def body(i):
        results[i] = fn(i)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def total(m) -> int:
    if isinstance(m, M._PerCpu):
        return sum(m.sum(key) for key in m)
    return sum(as_int(v[:8]) for _, v in m.items())


@pytest.mark.parametrize("t", [MapType.HASH, MapType.ARRAY, MapType.PERCPU_ARRAY, MapType.PERCPU_HASH,
                               MapType.LRU_HASH, MapType.LRU_PERCPU_HASH])
def test_threads_count_exactly(regions, t):
    m = regions.one(MapSpec("counts", t, 4, 8, 64))
    errors = run_threads(lambda i: lib.hybrid_test_count(m._p(), 50, ITERS, i + 1))
    assert errors == [0] * THREADS
    assert total(m) == THREADS * ITERS


def _child_count(name: str, nkeys: int, iters: int, seed: int, q) -> None:
    r = Region.open(name)
    q.put(lib.hybrid_test_count(r["counts"]._p(), nkeys, iters, seed))
    r.close()


def _forked_count(m, nkeys: int, iters: int, seed: int, q) -> None:
    q.put(lib.hybrid_test_count(m._p(), nkeys, iters, seed))


@pytest.mark.parametrize("t", [MapType.HASH, MapType.ARRAY, MapType.PERCPU_HASH])
def test_processes_and_threads_count_exactly(regions, t):
    r = regions(MapSpec("counts", t, 4, 8, 256))
    m = r["counts"]
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    forked = [ctx.Process(target=_forked_count, args=(m, 200, ITERS, 100 + i, q)) for i in range(2)]
    code = f"""
from hybrid.user.maps import Region, lib
r = Region.open({r.name!r})
print(lib.hybrid_test_count(r["counts"]._p(), 200, {ITERS}, {{seed}}))
"""
    spawned = [subprocess.Popen([sys.executable, "-c", code.replace("{seed}", str(200 + i))],
                                stdout=subprocess.PIPE, text=True) for i in range(2)]
    for p in forked:
        p.start()
    errors = run_threads(lambda i: lib.hybrid_test_count(m._p(), 200, ITERS, i + 1), 2)
    errors += [int(p.communicate(timeout=120)[0]) for p in spawned]
    for p in forked:
        p.join(120)
        assert p.exitcode == 0
    errors += [q.get(timeout=10) for _ in forked]
    assert errors == [0] * 6
    assert total(m) == 6 * ITERS


@pytest.mark.parametrize("t", [MapType.HASH, MapType.LRU_HASH])
def test_churn_on_disjoint_keys_gives_the_answers_of_a_sequential_map(regions, t):
    """Inserts, updates, deletes and lookups by several threads sharing buckets and the
    freelist; each owns its keys, so every answer is known (the LRU map is big enough
    never to evict)."""
    nkeys = 300
    workers = 4
    m = regions.one(MapSpec("churn", t, 4, 24, nkeys * workers))
    presents = [ffi.new("uint8_t[]", nkeys) for _ in range(workers)]
    bad = run_threads(lambda i: lib.hybrid_test_churn(m._p(), i * nkeys, nkeys, ITERS, i + 7, presents[i]), workers)
    assert bad == [0] * workers
    want = {i * nkeys + j for i in range(workers) for j in range(nkeys) if presents[i][j]}
    assert {as_int(key) for key in m} == want and len(m) == len(want)
    for key, v in m.items():
        assert as_int(v[:8]) == as_int(key)


def test_churn_across_processes(regions):
    nkeys = 200
    r = regions(MapSpec("churn", MapType.HASH, 4, 24, nkeys * 3))
    code = f"""
from hybrid.user.maps import Region, lib, ffi
r = Region.open({r.name!r})
present = ffi.new("uint8_t[]", {nkeys})
bad = lib.hybrid_test_churn(r["churn"]._p(), {{base}}, {nkeys}, {ITERS}, 5, present)
print(bad, "".join(str(present[i]) for i in range({nkeys})))
"""
    procs = [subprocess.Popen([sys.executable, "-c", code.replace("{base}", str(i * nkeys))],
                              stdout=subprocess.PIPE, text=True) for i in (1, 2)]
    present0 = ffi.new("uint8_t[]", nkeys)
    assert lib.hybrid_test_churn(r["churn"]._p(), 0, nkeys, ITERS, 9, present0) == 0
    want = {j for j in range(nkeys) if present0[j]}
    for i, p in zip((1, 2), procs):
        bad, bits = p.communicate(timeout=120)[0].split()
        assert bad == "0"
        want |= {i * nkeys + j for j, b in enumerate(bits) if b == "1"}
    assert {as_int(key) for key in r["churn"]} == want


def test_concurrent_overwrites_never_show_a_torn_or_foreign_value(regions):
    m = regions.one(MapSpec("h", MapType.HASH, 4, 24, 16))
    assert run_threads(lambda i: lib.hybrid_test_replace(m._p(), 16, ITERS, i + 3)) == [0] * THREADS
    assert len(m) == 16


def test_lru_under_contention_never_fails_and_stays_bounded(regions):
    m = regions.one(MapSpec("lru", MapType.LRU_HASH, 4, 8, 32))
    errors = run_threads(lambda i: lib.hybrid_test_count(m._p(), 1000, ITERS, i + 1))
    assert errors == [0] * THREADS  # no update ever failed (no E2BIG from an LRU map)
    keys = list(m)
    assert 0 < len(keys) <= 32 and len(set(keys)) == len(keys) and len(m) == len(keys)


def test_queue_from_several_threads_loses_and_duplicates_nothing(regions):
    q = regions.one(MapSpec("q", MapType.QUEUE, 0, 8, 100_000))
    n = 20_000

    def push(i):
        for j in range(n):
            q.push((i * n + j).to_bytes(8, "little"))

    run_threads(push)
    popped = set()
    while (v := q.pop()) is not None:
        popped.add(as_int(v))
    assert popped == set(range(THREADS * n))


def test_bloom_filter_from_several_threads_has_no_false_negatives(regions):
    bf = regions.one(MapSpec("bf", MapType.BLOOM_FILTER, 0, 8, 40_000))
    n = 5000

    def push(i):
        for j in range(n):
            bf.push((i * n + j).to_bytes(8, "little"))

    run_threads(push)
    assert all(bf.contains(v.to_bytes(8, "little")) for v in range(THREADS * n))


def test_stack_map_from_several_threads(regions):
    st = regions.one(MapSpec("st", MapType.STACK_TRACE, 4, 32, 4096))
    stacks = [[0x1000 + i, 0x2000 + i, 0x3000] for i in range(200)]

    def store(i):
        return [st.store(s, M.BPF_F_REUSE_STACKID) for s in stacks]

    ids = run_threads(store)
    assert all(x == ids[0] for x in ids)
    for s, sid in zip(stacks, ids[0]):
        got = st.stack(sid)
        assert got is None or len(got) == 3  # a later stack may have reused a colliding id
    # without reuse every stack keeps the id it got first, and the stored ips are that stack's
    st2 = regions.one(MapSpec("st2", MapType.STACK_TRACE, 4, 32, 4096))
    got_ids = run_threads(lambda i: [_store_or_none(st2, s) for s in stacks])
    for s_index, s in enumerate(stacks):
        sids = {g[s_index] for g in got_ids}
        assert len(sids) == 1
        sid = sids.pop()
        if sid is not None:
            assert st2.stack(sid) == s


def _store_or_none(st, s):
    try:
        return st.store(s)
    except M.MapError:
        return None
