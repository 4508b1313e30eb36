"""Hash maps: the helpers' fast paths, the element pools and the short-key hash.

The program helpers (``hybrid_helper_map_*_elem``) go straight to the hash
operations for the hash maps of a region, with inlined copies for 4- and
8-byte keys; the C API goes the generic way.  Both must give the same
answers.  Free elements are in two pools (inserts, replacements) whose
depth is the live count: -E2BIG must stay exact, a full map must still
take replacements, and the count must follow every insert and delete, from
several threads and processes at once.
"""

from __future__ import annotations

import errno
import os
import random
import subprocess
import sys

import pytest

from hybrid.user.maps import BPF_ANY, BPF_EXIST, BPF_NOEXIST, MapError, MapSpec, MapType, ffi, lib
from tests.user.maps_util import as_int, k, regions, u64  # noqa: F401 - fixture
from tests.user.test_maps_concurrency import ITERS, run_threads

HASHES = [MapType.HASH, MapType.LRU_HASH, MapType.PERCPU_HASH, MapType.LRU_PERCPU_HASH]
KEY_SIZES = [4, 8, 5, 16]  # the inlined sizes and the generic path


def signed(x: int) -> int:
    return x - (1 << 64) if x >= 1 << 63 else x


def helper_update(m, key: bytes, value: bytes, flags: int) -> int:
    return signed(lib.hybrid_helper_map_update_elem(int(ffi.cast("uintptr_t", m._p())),
                                                    int(ffi.cast("uintptr_t", ffi.from_buffer(key))),
                                                    int(ffi.cast("uintptr_t", ffi.from_buffer(value))), flags, 0))


def helper_delete(m, key: bytes) -> int:
    return signed(lib.hybrid_helper_map_delete_elem(int(ffi.cast("uintptr_t", m._p())),
                                                    int(ffi.cast("uintptr_t", ffi.from_buffer(key))), 0, 0, 0))


def helper_lookup(m, key: bytes) -> bytes | None:
    p = lib.hybrid_helper_map_lookup_elem(int(ffi.cast("uintptr_t", m._p())),
                                          int(ffi.cast("uintptr_t", ffi.from_buffer(key))), 0, 0, 0)
    return None if p == 0 else ffi.unpack(ffi.cast("char *", p), m.value_size)


def api_lookup(m, key: bytes) -> bytes | None:
    p = lib.hybrid_map_lookup(m._p(), key)
    return None if p == ffi.NULL else ffi.unpack(ffi.cast("char *", p), m.value_size)


@pytest.fixture
def one_cpu():
    """Per-CPU values go to the current CPU's slot: keep the test on one CPU."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(before)})
    yield
    os.sched_setaffinity(0, before)


@pytest.mark.parametrize("ks", KEY_SIZES)
@pytest.mark.parametrize("t", HASHES)
def test_helpers_answer_as_the_c_api(regions, one_cpu, t, ks):
    r = regions(MapSpec("a", t, ks, 8, 48), MapSpec("b", t, ks, 8, 48))
    a, b = r["a"], r["b"]
    rnd = random.Random(ks * 100 + int(t))
    keys = [rnd.getrandbits(8 * ks).to_bytes(ks, "little") for _ in range(60)] + [k(j, ks) for j in range(20)]
    lru = t in (MapType.LRU_HASH, MapType.LRU_PERCPU_HASH)
    for n in range(4000):
        key = rnd.choice(keys)
        op = rnd.randrange(4)
        if op == 0:
            flags = rnd.choice([BPF_ANY, BPF_NOEXIST, BPF_EXIST])
            value = u64(n)
            assert helper_update(a, key, value, flags) == lib.hybrid_map_update(b._p(), key, value, flags)
        elif op == 1:
            assert helper_delete(a, key) == lib.hybrid_map_delete(b._p(), key)
        else:
            assert helper_lookup(a, key) == api_lookup(b, key)
        if lru:
            # the two maps' CLOCK hands see different reference bits: compare what is left, then realign
            assert len(a) <= 48 and len(b) <= 48
            if {bytes(x) for x in a} != {bytes(x) for x in b}:
                for x in list(a):
                    a.delete(x)
                for x in list(b):
                    b.delete(x)
        assert len(a) == len(b)
    assert contents(a) == contents(b)


def contents(m) -> list:
    """(key, value) pairs, sorted; a per-CPU value is the tuple of the CPUs' values."""
    return sorted((bytes(x), tuple(bytes(v) for v in y) if isinstance(y, list) else bytes(y)) for x, y in m.items())


def test_helper_update_reports_zero_for_an_insert_and_the_kernels_errors(regions):
    m = regions.one(MapSpec("h", MapType.HASH, 4, 8, 2))
    assert helper_update(m, k(1), u64(1), BPF_ANY) == 0
    assert helper_update(m, k(1), u64(2), BPF_NOEXIST) == -errno.EEXIST
    assert helper_update(m, k(2), u64(2), BPF_EXIST) == -errno.ENOENT
    assert helper_update(m, k(2), u64(2), BPF_NOEXIST) == 0
    assert helper_update(m, k(3), u64(3), BPF_ANY) == -errno.E2BIG
    assert helper_update(m, k(3), u64(3), 4) == -errno.EINVAL
    assert helper_delete(m, k(3)) == -errno.ENOENT
    assert helper_delete(m, k(1)) == 0
    assert helper_lookup(m, k(1)) is None and as_int(helper_lookup(m, k(2))) == 2


@pytest.mark.parametrize("ks", [4, 8, 12])
@pytest.mark.parametrize("t", [MapType.HASH, MapType.PERCPU_HASH])
def test_e2big_is_exact_and_a_full_map_still_takes_replacements(regions, t, ks):
    n = 100
    m = regions.one(MapSpec("h", t, ks, 8, n))
    for i in range(n):
        assert helper_update(m, k(i, ks), u64(i), BPF_NOEXIST) == 0
        assert len(m) == i + 1
    for via in (helper_update, lambda m_, key, v, f: lib.hybrid_map_update(m_._p(), key, v, f)):
        assert via(m, k(n, ks), u64(n), BPF_ANY) == -errno.E2BIG
    # many more replacements than spare elements: each gives its element back
    for rep in range(5 * n):
        assert helper_update(m, k(rep % n, ks), u64(1000 + rep), BPF_ANY) == 0
    assert len(m) == n
    with pytest.raises(MapError) as e:
        m.update(k(n, ks), [u64(n)] * m.nr_cpus if t == MapType.PERCPU_HASH else u64(n), BPF_NOEXIST)
    assert e.value.errno == errno.E2BIG
    for i in range(0, n, 2):
        assert helper_delete(m, k(i, ks)) == 0
    assert len(m) == n // 2
    for i in range(n, n + n // 2):
        assert helper_update(m, k(i, ks), u64(i), BPF_ANY) == 0
    assert len(m) == n
    assert helper_update(m, k(3 * n, ks), u64(0), BPF_ANY) == -errno.E2BIG
    assert {as_int(x) for x in m} == set(range(1, n, 2)) | set(range(n, n + n // 2))


@pytest.mark.parametrize("t", [MapType.LRU_HASH, MapType.LRU_PERCPU_HASH])
def test_a_full_lru_map_replaces_without_evicting(regions, t):
    n = 64
    m = regions.one(MapSpec("lru", t, 8, 8, n))
    for i in range(n):
        assert helper_update(m, k(i, 8), u64(i), BPF_ANY) == 0
    for rep in range(10 * n):
        assert helper_update(m, k(rep % n, 8), u64(rep), BPF_ANY) == 0
    assert {as_int(x) for x in m} == set(range(n)) and len(m) == n
    assert helper_update(m, k(n, 8), u64(n), BPF_ANY) == 0  # an insert evicts one
    assert len(m) == n and helper_lookup(m, k(n, 8)) is not None


@pytest.mark.parametrize("ks", [4, 8])
def test_sequential_short_keys_are_all_found(regions, ks):
    n = 5000
    m = regions.one(MapSpec("h", MapType.HASH, ks, 8, n))
    for i in range(n):
        assert helper_update(m, k(i * 4096, ks), u64(i), BPF_NOEXIST) == 0
    assert all(as_int(helper_lookup(m, k(i * 4096, ks))) == i for i in range(n))
    assert helper_lookup(m, k(1, ks)) is None
    assert sorted(as_int(x) for x in m) == [i * 4096 for i in range(n)] and len(m) == n


@pytest.mark.parametrize("ks", [4, 8])
@pytest.mark.parametrize("t", [MapType.HASH, MapType.LRU_HASH])
def test_churn_with_exactly_enough_room_across_threads(regions, t, ks):
    """max_entries is exactly the keys of all workers: an insert of a worker's absent key
    must never see -E2BIG, whatever the others do (half the operations through the helpers)."""
    nkeys, workers = 200, 4
    m = regions.one(MapSpec("churn", t, ks, 24, nkeys * workers))
    presents = [ffi.new("uint8_t[]", nkeys) for _ in range(workers)]
    bad = run_threads(lambda i: lib.hybrid_test_churn(m._p(), i * nkeys, nkeys, ITERS, i + 11, presents[i]), workers)
    assert bad == [0] * workers
    want = {i * nkeys + j for i in range(workers) for j in range(nkeys) if presents[i][j]}
    assert {as_int(x) for x in m} == want and len(m) == len(want)


def test_churn_with_exactly_enough_room_across_processes_and_threads(regions):
    nkeys = 150
    r = regions(MapSpec("churn", MapType.HASH, 8, 24, nkeys * 4))
    code = f"""
from hybrid.user.maps import Region, lib, ffi
r = Region.open({r.name!r})
present = ffi.new("uint8_t[]", {nkeys})
bad = lib.hybrid_test_churn(r["churn"]._p(), {{base}}, {nkeys}, {ITERS}, {{base}} + 3, present)
print(bad, "".join(str(present[i]) for i in range({nkeys})))
"""
    procs = [subprocess.Popen([sys.executable, "-c", code.replace("{base}", str(i * nkeys))],
                              stdout=subprocess.PIPE, text=True) for i in (2, 3)]
    presents = [ffi.new("uint8_t[]", nkeys) for _ in range(2)]
    m = r["churn"]
    assert run_threads(lambda i: lib.hybrid_test_churn(m._p(), i * nkeys, nkeys, ITERS, i + 21, presents[i]),
                       2) == [0, 0]
    want = {i * nkeys + j for i in range(2) for j in range(nkeys) if presents[i][j]}
    for i, p in zip((2, 3), procs):
        bad, bits = p.communicate(timeout=120)[0].split()
        assert bad == "0"
        want |= {i * nkeys + j for j, b in enumerate(bits) if b == "1"}
    assert {as_int(x) for x in m} == want and len(m) == len(want)
