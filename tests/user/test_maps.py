"""Map semantics, type by type, against the kernel's documented behaviour."""

from __future__ import annotations

import errno
import ipaddress
import os
import random
import stat
import subprocess
import sys
import threading

import pytest

from hybrid.errors import HybridError, MapError
from hybrid.user import maps as M
from hybrid.user.maps import (BPF_ANY, BPF_EXIST, BPF_F_FAST_STACK_CMP, BPF_F_INNER_MAP, BPF_F_NO_PREALLOC,
                              BPF_F_REUSE_STACKID, BPF_NOEXIST, MapSpec, MapType, Region, ffi, lib)
from tests.user.maps_util import as_int, k, regions, u64  # noqa: F401 - fixture

NCPU = M.possible_cpus()


def err(exc_info) -> int:
    return exc_info.value.errno


# --- regions -------------------------------------------------------------------


def test_region_file_is_private_exclusive_and_unlinked_on_close():
    r = Region([MapSpec("h", MapType.HASH, 4, 8, 4)])
    st = os.stat(r.path)
    assert r.path.startswith("/dev/shm/hybrid.%d." % os.getpid())
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_size == r.size
    with open(r.path, "rb") as f:
        head = f.read(8)
    assert head == b"HYBRIDRG"
    with pytest.raises(MapError) as e:
        Region([MapSpec("h", MapType.HASH, 4, 8, 4)], name=r.name)
    assert err(e) == errno.EEXIST
    r.close()
    assert not os.path.exists(r.path)
    r.close()  # idempotent


def test_region_keep_and_reopen_by_name():
    r = Region([MapSpec("a", MapType.ARRAY, 4, 8, 4)], keep=True)
    try:
        r["a"].update(k(1), u64(99))
        r.close()
        with Region.open(r.name) as r2:
            assert r2["a"].lookup(k(1)) == u64(99)
            assert not r2.owner
    finally:
        os.unlink(r.path)


def test_region_memfd_opened_through_proc(regions):
    r = regions(MapSpec("a", MapType.ARRAY, 4, 8, 4), memfd=True)
    assert r.path.startswith("/proc/%d/fd/" % os.getpid())
    r["a"].update(k(2), u64(5))
    with Region.open(r.path) as r2:
        assert r2["a"].lookup(k(2)) == u64(5)
        assert r2.base != r.base  # a second mapping of the same memory


def test_another_process_sees_the_same_maps_at_another_address(regions):
    r = regions(MapSpec("counts", MapType.HASH, 4, 8, 64), MapSpec("arr", MapType.ARRAY, 4, 8, 4))
    r["counts"].update(k(7), u64(70))
    code = f"""
from hybrid.user.maps import Region
r = Region.open({r.name!r})
h = r["counts"]
print(h.lookup((7).to_bytes(4, "little")).hex(), r["arr"].address - r.base == {r["arr"].address - r.base})
h.update((8).to_bytes(4, "little"), (80).to_bytes(8, "little"))
print(r.maps[0].spec)
r.close()
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == u64(70).hex() + " True"
    assert "name='counts', type=1, key_size=4, value_size=8, max_entries=64" in out[1]
    assert r["counts"].lookup(k(8)) == u64(80)


def test_region_open_errors(tmp_path):
    with pytest.raises(MapError) as e:
        Region.open("hybrid.does-not-exist")
    assert err(e) == errno.ENOENT and "open region" in str(e.value)
    junk = tmp_path / "junk"
    junk.write_bytes(b"x" * 4096)
    with pytest.raises(MapError) as e:
        Region.open(str(junk), timeout=0)
    assert err(e) == errno.EINVAL and "not an initialised hybrid region" in str(e.value)


def test_opening_a_region_with_a_corrupted_map_header_is_refused():
    r = Region([MapSpec("h", MapType.HASH, 4, 8, 4)], keep=True)
    try:
        off_a = ffi.cast("uint64_t *", r["h"].address + 8)  # struct hybrid_map.off_a (white box)
        off_a[0] += 64
        with pytest.raises(MapError) as e:
            Region.open(r.name, timeout=0)
        assert err(e) == errno.EINVAL
        off_a[0] -= 64
        Region.open(r.name).close()
    finally:
        r.close()
        os.unlink(r.path)


def test_closed_region_maps_raise_instead_of_crashing():
    r = Region([MapSpec("h", MapType.HASH, 4, 8, 4)])
    h = r["h"]
    r.close()
    with pytest.raises(MapError) as e:
        h.lookup(k(1))
    assert err(e) == errno.EBADF and "closed" in str(e.value)
    assert M.map_at(h.address) is None


def test_region_lookup_by_name_and_address(regions):
    r = regions(MapSpec("a", MapType.ARRAY, 4, 8, 4), MapSpec("b", MapType.HASH, 4, 4, 4))
    assert [m.name for m in r] == ["a", "b"] and len(r) == 2
    assert r[1] is r["b"] and r.get("zz") is None
    assert M.map_at(r["b"].address) is r["b"]
    assert M.region_containing(r["b"].address) is r
    assert r["a"].address % 64 == 0 and r["b"].address % 64 == 0
    with pytest.raises(KeyError):
        r["nope"]


def test_map_error_is_a_hybrid_error_and_names_the_map(regions):
    h = regions.one(MapSpec("counts", MapType.HASH, 4, 8, 2))
    with pytest.raises(HybridError) as e:
        h.update(b"abc", u64(1))
    assert str(e.value) == "map 'counts' (hash) update: [EINVAL] key is 3 bytes, key_size is 4"
    with pytest.raises(MapError) as e:
        h.update(k(1), b"short")
    assert "value is 5 bytes, value_size is 8" in str(e.value)


def test_initial_contents_and_map_in_map_slots_from_the_object(regions):
    data = MapSpec("obj.data", MapType.ARRAY, 4, 16, 1, M.BPF_F_MMAPABLE, initial=u64(42) + u64(7))
    ro = MapSpec("obj.rodata", MapType.ARRAY, 4, 8, 1, M.BPF_F_MMAPABLE | M.BPF_F_RDONLY_PROG, initial=u64(1),
                 readonly=True)
    inner = MapSpec("in", MapType.HASH, 4, 4, 4)
    outer = MapSpec("outer", MapType.ARRAY_OF_MAPS, 4, 4, 3, inner=inner, values=(None, inner))
    r = regions(data, ro, inner, outer)
    assert r["obj.data"].lookup(k(0)) == u64(42) + u64(7)
    assert r["obj.rodata"].lookup(k(0)) == u64(1)
    assert r["outer"].lookup(k(1)) is r["in"] and r["outer"].lookup(k(0)) is None
    assert r["obj.data"].ref().value_address == r["obj.data"].value_address != 0
    assert r["in"].ref().value_address == 0


# --- creation checks -------------------------------------------------------------

BAD_SPECS = [
    (MapSpec("x", MapType.ARRAY, 8, 4, 4), errno.EINVAL),  # array key must be u32
    (MapSpec("x", MapType.ARRAY, 4, 0, 4), errno.EINVAL),
    (MapSpec("x", MapType.ARRAY, 4, 4, 0), errno.EINVAL),
    (MapSpec("x", MapType.ARRAY, 4, 4, 4, BPF_F_NO_PREALLOC), errno.EINVAL),
    (MapSpec("x", MapType.HASH, 0, 4, 4), errno.EINVAL),
    (MapSpec("x", MapType.HASH, 4, 4, 4, 1 << 20), errno.EINVAL),  # unknown flag
    (MapSpec("x", MapType.HASH, 600, 4, 4), errno.E2BIG),  # key larger than the stack
    (MapSpec("x", MapType.LRU_HASH, 4, 4, 4, BPF_F_NO_PREALLOC), errno.EINVAL),
    (MapSpec("x", MapType.HASH, 4, 4, 4, M.BPF_F_NO_COMMON_LRU), errno.EINVAL),
    (MapSpec("x", MapType.PERCPU_HASH, 4, 40000, 4), errno.E2BIG),
    (MapSpec("x", MapType.QUEUE, 4, 4, 4), errno.EINVAL),  # queues have no key
    (MapSpec("x", MapType.STACK, 0, 0, 4), errno.EINVAL),
    (MapSpec("x", MapType.BLOOM_FILTER, 4, 4, 4), errno.EINVAL),
    (MapSpec("x", MapType.BLOOM_FILTER, 0, 4, 4, map_extra=16), errno.EINVAL),
    (MapSpec("x", MapType.LPM_TRIE, 8, 4, 4), errno.EINVAL),  # needs BPF_F_NO_PREALLOC, like the kernel
    (MapSpec("x", MapType.LPM_TRIE, 4, 4, 4, BPF_F_NO_PREALLOC), errno.EINVAL),  # no data byte
    (MapSpec("x", MapType.RINGBUF, 0, 0, 5000), errno.EINVAL),  # not a power of 2
    (MapSpec("x", MapType.RINGBUF, 0, 0, 2048), errno.EINVAL),  # not a page multiple
    (MapSpec("x", MapType.RINGBUF, 4, 0, 4096), errno.EINVAL),
    (MapSpec("x", MapType.PERF_EVENT_ARRAY, 4, 4, 2, map_extra=1000), errno.EINVAL),
    (MapSpec("x", MapType.PERF_EVENT_ARRAY, 4, 8, 2), errno.EINVAL),
    (MapSpec("x", MapType.STACK_TRACE, 4, 12, 4), errno.EINVAL),
    (MapSpec("x", MapType.PROG_ARRAY, 4, 8, 4), errno.EINVAL),
    (MapSpec("x", MapType.HASH, 4, 4, 4, map_extra=1), errno.EINVAL),
    (MapSpec("x", 99, 4, 4, 4), errno.EINVAL),
    (MapSpec("x", MapType.ARRAY_OF_MAPS, 4, 4, 4), errno.EINVAL),  # no inner template
]


@pytest.mark.parametrize("spec,code", BAD_SPECS, ids=[f"{s.type}-{i}" for i, (s, _) in enumerate(BAD_SPECS)])
def test_invalid_specs_are_refused(spec, code):
    before = set(os.listdir("/dev/shm"))
    with pytest.raises(MapError) as e:
        Region([spec])
    assert err(e) == code
    assert "map 'x'" in str(e.value) and "create" in str(e.value)
    assert set(os.listdir("/dev/shm")) == before  # nothing left behind


def test_spec_checks_in_python():
    with pytest.raises(MapError) as e:
        MapSpec("n" * 64, MapType.HASH, 4, 4, 4)
    assert err(e) == errno.ENAMETOOLONG
    with pytest.raises(MapError):
        MapSpec("x", MapType.HASH, -1, 4, 4)
    with pytest.raises(MapError):
        Region([MapSpec("a", MapType.HASH, 4, 4, 4), MapSpec("a", MapType.ARRAY, 4, 4, 4)])


def test_no_prealloc_hash_is_accepted_and_still_preallocated(regions):
    h = regions.one(MapSpec("h", MapType.HASH, 4, 4, 3, BPF_F_NO_PREALLOC))
    for i in range(3):
        h.update(k(i), k(i))
    with pytest.raises(MapError) as e:
        h.update(k(3), k(3))
    assert err(e) == errno.E2BIG


def test_possible_cpus_parser():
    assert M._parse_cpu_list("0") == 1
    assert M._parse_cpu_list("0-3\n") == 4
    assert M._parse_cpu_list("0-3,8-11") == 12
    assert NCPU >= os.cpu_count() or NCPU >= 1


# --- hash ------------------------------------------------------------------------


@pytest.mark.parametrize("ks", [4, 8, 13, 64])
def test_hash_update_flags_and_errors(regions, ks):
    h = regions.one(MapSpec("h", MapType.HASH, ks, 8, 4))
    key = bytes(range(1, ks + 1))
    assert h.lookup(key) is None
    with pytest.raises(MapError) as e:
        h.update(key, u64(1), BPF_EXIST)
    assert err(e) == errno.ENOENT
    h.update(key, u64(1), BPF_NOEXIST)
    with pytest.raises(MapError) as e:
        h.update(key, u64(2), BPF_NOEXIST)
    assert err(e) == errno.EEXIST and "key exists" in str(e.value)
    assert h.lookup(key) == u64(1)
    h.update(key, u64(3), BPF_EXIST)
    h.update(key, u64(4), BPF_ANY)
    assert h.lookup(key) == u64(4) and len(h) == 1
    for bad in (3, 4, 8):  # BPF_NOEXIST|BPF_EXIST, BPF_F_LOCK without a lock, unknown
        with pytest.raises(MapError) as e:
            h.update(key, u64(5), bad)
        assert err(e) == errno.EINVAL
    h.delete(key)
    with pytest.raises(MapError) as e:
        h.delete(key)
    assert err(e) == errno.ENOENT
    assert h.lookup(key) is None and len(h) == 0


def test_hash_full_is_e2big_exactly_at_max_entries(regions):
    h = regions.one(MapSpec("h", MapType.HASH, 4, 8, 100))
    for i in range(100):
        h.update(k(i), u64(i))
    with pytest.raises(MapError) as e:
        h.update(k(100), u64(0))
    assert err(e) == errno.E2BIG and "max_entries 100" in str(e.value)
    for i in range(100):  # replacing existing keys still works when full
        h.update(k(i), u64(i + 1000), BPF_EXIST)
    h.delete(k(5))
    h.update(k(100), u64(100), BPF_NOEXIST)
    assert len(h) == 100
    assert {as_int(key): as_int(v) for key, v in h.items()} == {
        **{i: i + 1000 for i in range(100) if i != 5}, 100: 100}


def test_hash_iteration_kernel_semantics(regions):
    h = regions.one(MapSpec("h", MapType.HASH, 4, 4, 1000))
    keys = {k(random.randrange(1 << 32)) for _ in range(700)}
    for key in keys:
        h.update(key, key)
    seen = list(h)
    assert len(seen) == len(keys) and set(seen) == keys
    first = h.next_key()
    assert first == seen[0]
    assert h.next_key(k(12345678) if k(12345678) not in keys else b"\xff" * 4) == first  # absent -> first
    assert h.next_key(seen[-1]) is None
    assert dict(h.items()) == {key: key for key in keys}
    assert sorted(h.values()) == sorted(keys)
    # deleting the current key while iterating, like `bpftool map delete` loops
    for key in list(h):
        h.delete(key)
    assert list(h) == [] and len(h) == 0 and h.next_key() is None


def test_hash_mapping_sugar(regions):
    h = regions.one(MapSpec("h", MapType.HASH, 4, 4, 8))
    h[k(1)] = k(10)
    assert h[k(1)] == k(10) and k(1) in h and k(2) not in h
    with pytest.raises(KeyError):
        h[k(2)]
    del h[k(1)]
    assert bool(h) and len(h) == 0
    h.update(bytearray(k(3)), memoryview(k(30)))
    assert h.lookup(bytearray(k(3))) == k(30)
    with pytest.raises(TypeError):
        h.update("abcd", k(1))


def test_hash_program_lookup_returns_a_pointer_into_the_value(regions):
    h = regions.one(MapSpec("h", MapType.HASH, 4, 16, 8))
    assert lib.hybrid_map_lookup(h._p(), k(1)) == ffi.NULL
    h.update(k(1), bytes(16))
    p = ffi.cast("uint64_t *", lib.hybrid_map_lookup(h._p(), k(1)))
    assert int(ffi.cast("uintptr_t", p)) % 8 == 0
    p[1] = 42
    assert h.lookup(k(1)) == bytes(8) + u64(42)
    assert r_contains(h, p)


def r_contains(m, p) -> bool:
    a = int(ffi.cast("uintptr_t", p))
    return m.region.base <= a < m.region.base + m.region.size


def test_hash_zero_seed_is_deterministic(regions):
    r = regions(MapSpec("a", MapType.HASH, 4, 4, 64, M.BPF_F_ZERO_SEED),
                MapSpec("b", MapType.HASH, 4, 4, 64, M.BPF_F_ZERO_SEED))
    keys = [k(random.randrange(1 << 32)) for _ in range(50)]
    for key in keys:
        r["a"].update(key, key)
        r["b"].update(key, key)
    assert list(r["a"]) == list(r["b"])  # same hash, same buckets, same order


# --- array ---------------------------------------------------------------------


def test_array_semantics(regions):
    a = regions.one(MapSpec("a", MapType.ARRAY, 4, 12, 5))
    assert a.lookup(k(0)) == bytes(12)  # every entry exists, zeroed
    assert a.lookup(k(5)) is None
    a.update(k(4), b"x" * 12)
    a.update(k(4), b"y" * 12, BPF_EXIST)
    with pytest.raises(MapError) as e:
        a.update(k(1), b"z" * 12, BPF_NOEXIST)
    assert err(e) == errno.EEXIST
    with pytest.raises(MapError) as e:
        a.update(k(5), b"z" * 12)
    assert err(e) == errno.E2BIG
    with pytest.raises(MapError) as e:
        a.delete(k(1))
    assert err(e) == errno.EINVAL
    assert list(a) == [k(i) for i in range(5)] and len(a) == 5
    assert a.next_key(k(4)) is None and a.next_key(k(77)) == k(0) and a.next_key() == k(0)
    assert a.lookup(k(4)) == b"y" * 12
    # values are 8-byte aligned at stride round_up(12, 8) = 16, from value_address
    p = lib.hybrid_map_lookup(a._p(), k(4))
    assert int(ffi.cast("uintptr_t", p)) == a.value_address + 4 * 16


# --- per-CPU -----------------------------------------------------------------------


def on_cpu(cpu: int, fn):
    """Run fn in a thread pinned to `cpu` (the kernel's "current CPU" for that thread)."""
    out = []

    def body():
        os.sched_setaffinity(0, {cpu})
        out.append(fn())

    t = threading.Thread(target=body)
    t.start()
    t.join()
    return out[0]


@pytest.mark.parametrize("t", [MapType.PERCPU_ARRAY, MapType.PERCPU_HASH, MapType.LRU_PERCPU_HASH])
def test_percpu_values(regions, t):
    m = regions.one(MapSpec("p", t, 4, 4, 8))
    assert m.nr_cpus == NCPU
    m.update(k(1), [k(10 + c) for c in range(NCPU)])
    assert m.lookup(k(1)) == [k(10 + c) for c in range(NCPU)]
    assert m.sum(k(1)) == sum(10 + c for c in range(NCPU))
    m.update(k(1), k(7))  # one value for every CPU
    assert m.lookup(k(1)) == [k(7)] * NCPU
    with pytest.raises(MapError) as e:
        m.update(k(1), [k(1)] * (NCPU + 1))
    assert err(e) == errno.EINVAL and "values for" in str(e.value)
    for cpu in range(NCPU):
        p = ffi.cast("uint32_t *", lib.hybrid_map_lookup_cpu(m._p(), k(1), cpu))
        assert p[0] == 7
        p[0] = 100 + cpu
    assert lib.hybrid_map_lookup_cpu(m._p(), k(1), NCPU) == ffi.NULL
    assert m.lookup(k(1)) == [k(100 + c) for c in range(NCPU)]


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
@pytest.mark.parametrize("t", [MapType.PERCPU_ARRAY, MapType.PERCPU_HASH])
def test_percpu_program_update_and_lookup_use_the_current_cpu(regions, t):
    m = regions.one(MapSpec("p", t, 4, 8, 8))
    cpus = sorted(os.sched_getaffinity(0))[:2]
    if t == MapType.PERCPU_HASH:
        m.update(k(3), [u64(5)] * NCPU)
        m.update(k(2), [u64(8)] * NCPU)  # leaves an element with non-zero values to be reused
        m.delete(k(2))
    # a program's update: a new element gets this CPU's value and zero elsewhere (kernel)
    assert on_cpu(cpus[1], lambda: lib.hybrid_map_update(m._p(), k(2), u64(9), BPF_ANY)) == 0
    vals = m.lookup(k(2))
    assert vals[cpus[1]] == u64(9) and all(v == u64(0) for i, v in enumerate(vals) if i != cpus[1])
    # an existing element: only this CPU's value changes
    if t == MapType.PERCPU_HASH:
        on_cpu(cpus[0], lambda: lib.hybrid_map_update(m._p(), k(3), u64(6), BPF_EXIST))
        vals = m.lookup(k(3))
        assert vals[cpus[0]] == u64(6) and all(v == u64(5) for i, v in enumerate(vals) if i != cpus[0])
    addr = on_cpu(cpus[1], lambda: int(ffi.cast("uintptr_t", lib.hybrid_map_lookup(m._p(), k(2)))))
    assert addr == int(ffi.cast("uintptr_t", lib.hybrid_map_lookup_cpu(m._p(), k(2), cpus[1])))
    assert lib.hybrid_current_cpu() in os.sched_getaffinity(0)


# --- LRU ---------------------------------------------------------------------------


@pytest.mark.parametrize("t", [MapType.LRU_HASH, MapType.LRU_PERCPU_HASH])
def test_lru_never_fails_and_keeps_recently_used(regions, t):
    n = 64
    m = regions.one(MapSpec("lru", t, 4, 8, n))
    for i in range(n):
        m.update(k(i), u64(i), BPF_NOEXIST)
    assert len(m) == n
    hot = range(0, n, 2)
    for i in hot:  # a program's lookup marks the element as used (the kernel's ref bit)
        assert lib.hybrid_map_lookup(m._p(), k(i)) != ffi.NULL
    for i in range(n, n + n // 2):  # full: evicts instead of E2BIG
        m.update(k(i), u64(i), BPF_NOEXIST)
    assert len(m) == n
    present = {as_int(key) for key in m}
    assert len(present) == n
    assert set(hot) <= present  # the used half survived
    assert set(range(n, n + n // 2)) <= present
    for i in range(10 * n):  # and it never fails
        m.update(k(1000 + i), u64(i))
    assert len(m) == n and len(list(m)) == n


@pytest.mark.parametrize("t", [MapType.LRU_HASH, MapType.LRU_PERCPU_HASH])
def test_lru_replacing_a_value_when_full_evicts_nothing(regions, t):
    m = regions.one(MapSpec("lru", t, 4, 8, 4))
    for i in range(4):
        m.update(k(i), u64(i))
    for n in range(20):
        m.update(k(n % 4), u64(100 + n), BPF_EXIST)
    assert sorted(as_int(x) for x in m) == [0, 1, 2, 3] and len(m) == 4
    with pytest.raises(MapError) as e:
        m.update(k(3), u64(0), BPF_NOEXIST)
    assert err(e) == errno.EEXIST
    with pytest.raises(MapError) as e:
        m.update(k(9), u64(0), BPF_EXIST)
    assert err(e) == errno.ENOENT
    assert len(m) == 4


# --- LPM trie ----------------------------------------------------------------------


def v4(prefix: str) -> bytes:
    net = ipaddress.ip_network(prefix, strict=False)
    return M.LpmTrie.key(net.prefixlen, ipaddress.ip_address(prefix.split("/")[0]).packed)


def test_lpm_longest_prefix_match(regions):
    t = regions.one(MapSpec("lpm", MapType.LPM_TRIE, 8, 4, 16, BPF_F_NO_PREALLOC))
    t.update(v4("192.168.0.0/16"), k(1))
    t.update(v4("192.168.1.0/24"), k(2))
    t.update(v4("10.0.0.0/8"), k(3))
    assert t.lookup(v4("192.168.1.5/32")) == k(2)
    assert t.lookup(v4("192.168.2.5/32")) == k(1)
    assert t.lookup(v4("10.200.0.1/32")) == k(3)
    assert t.lookup(v4("11.0.0.1/32")) is None
    assert t.lookup(v4("192.168.1.5/20")) == k(1)  # a /24 entry is longer than the key's /20
    t.update(v4("0.0.0.0/0"), k(9))  # default route
    assert t.lookup(v4("11.0.0.1/32")) == k(9)
    t.update(v4("192.168.1.77/24"), k(4), BPF_EXIST)  # bits after the prefix do not matter
    assert t.lookup(v4("192.168.1.5/32")) == k(4)
    with pytest.raises(MapError) as e:
        t.update(v4("192.168.1.0/24"), k(5), BPF_NOEXIST)
    assert err(e) == errno.EEXIST
    t.delete(v4("192.168.1.0/24"))
    assert t.lookup(v4("192.168.1.5/32")) == k(1)
    with pytest.raises(MapError) as e:
        t.delete(v4("192.168.1.0/24"))
    assert err(e) == errno.ENOENT
    with pytest.raises(MapError) as e:
        t.update(M.LpmTrie.key(33, bytes(4)), k(0))
    assert err(e) == errno.EINVAL
    keys = sorted(t)
    assert keys == sorted([v4("192.168.0.0/16"), v4("10.0.0.0/8"), v4("0.0.0.0/0")])
    assert len(t) == 3
    # a program's lookup gives a pointer to the value
    p = ffi.cast("uint32_t *", lib.hybrid_map_lookup(t._p(), v4("10.1.1.1/32")))
    assert p[0] == 3


def test_lpm_full_is_enospc_like_the_kernel(regions):
    t = regions.one(MapSpec("lpm", MapType.LPM_TRIE, 5, 1, 2, BPF_F_NO_PREALLOC))
    t.update(M.LpmTrie.key(8, b"\x01"), b"a")
    t.update(M.LpmTrie.key(7, b"\x01"), b"b")
    with pytest.raises(MapError) as e:
        t.update(M.LpmTrie.key(6, b"\x01"), b"c")
    assert err(e) == errno.ENOSPC


def test_lpm_matches_a_brute_force_reference_ipv6(regions):
    rnd = random.Random(7)
    t = regions.one(MapSpec("lpm6", MapType.LPM_TRIE, 20, 4, 300, BPF_F_NO_PREALLOC))
    ref: dict[tuple[int, int], int] = {}
    base = rnd.getrandbits(128)
    for i in range(250):
        plen = rnd.choice([0, 16, 32, 48, 56, 64, 96, 127, 128, rnd.randrange(129)])
        addr = base ^ (rnd.getrandbits(128) >> rnd.randrange(1, 128))
        net = addr >> (128 - plen) << (128 - plen) if plen else 0
        t.update(M.LpmTrie.key(plen, addr.to_bytes(16, "big")), k(i))
        ref[(plen, net)] = i
    for _ in range(2000):
        addr = base ^ (rnd.getrandbits(128) >> rnd.randrange(1, 129))
        qlen = rnd.choice([128, 128, rnd.randrange(129)])
        best = None
        for (plen, net), v in ref.items():
            if plen <= qlen and (plen == 0 or addr >> (128 - plen) == net >> (128 - plen)):
                if best is None or plen > best[0]:
                    best = (plen, v)
        got = t.lookup(M.LpmTrie.key(qlen, addr.to_bytes(16, "big")))
        assert (got and as_int(got)) == (best and best[1]), (hex(addr), qlen)


# --- map in map ---------------------------------------------------------------------


def test_array_of_maps(regions):
    inner = MapSpec("inner", MapType.ARRAY, 4, 8, 4)
    r = regions(MapSpec("outer", MapType.ARRAY_OF_MAPS, 4, 4, 2, inner=inner),
                MapSpec("i1", MapType.ARRAY, 4, 8, 4), MapSpec("i2", MapType.ARRAY, 4, 8, 4),
                MapSpec("small", MapType.ARRAY, 4, 8, 2), MapSpec("h", MapType.HASH, 4, 8, 4))
    outer, i1 = r["outer"], r["i1"]
    assert outer.lookup(k(0)) is None
    assert lib.hybrid_map_lookup(outer._p(), k(0)) == ffi.NULL
    outer.update(k(0), i1)
    assert outer.lookup(k(0)) is i1
    # a program's lookup yields the inner map's address, usable with the map helpers
    assert int(ffi.cast("uintptr_t", lib.hybrid_map_lookup(outer._p(), k(0)))) == i1.address
    i1.update(k(3), u64(33))
    assert i1.lookup(k(3)) == u64(33)
    for bad in (r["small"], r["h"]):  # max_entries / type differ from the template
        with pytest.raises(MapError) as e:
            outer.update(k(1), bad)
        assert err(e) == errno.EINVAL and "template" in str(e.value)
    with pytest.raises(MapError) as e:
        outer.update(k(1), r["i2"], BPF_NOEXIST)  # fd arrays take BPF_ANY only
    assert err(e) == errno.EINVAL
    with pytest.raises(MapError) as e:
        outer.update(k(2), r["i2"])
    assert err(e) == errno.E2BIG
    with pytest.raises(MapError):
        outer.update(k(1), b"\0\0\0\0")  # type: ignore[arg-type]
    outer.update(k(1), r["i2"])
    assert list(outer.items()) == [(k(0), i1), (k(1), r["i2"])]
    outer.delete(k(0))
    with pytest.raises(MapError) as e:
        outer.delete(k(0))
    assert err(e) == errno.ENOENT
    assert outer.lookup(k(0)) is None


def test_hash_of_maps_and_inner_map_flag(regions):
    inner = MapSpec("t", MapType.ARRAY, 4, 4, 1, BPF_F_INNER_MAP)
    r = regions(MapSpec("outer", MapType.HASH_OF_MAPS, 8, 4, 4, inner=inner),
                MapSpec("a", MapType.ARRAY, 4, 4, 10, BPF_F_INNER_MAP),
                MapSpec("b", MapType.ARRAY, 4, 4, 3, BPF_F_INNER_MAP))
    outer = r["outer"]
    outer.update(u64(1), r["a"])  # BPF_F_INNER_MAP: max_entries may differ
    outer.update(u64(2), r["b"], BPF_NOEXIST)
    with pytest.raises(MapError) as e:
        outer.update(u64(2), r["a"], BPF_NOEXIST)
    assert err(e) == errno.EEXIST
    assert outer.lookup(u64(2)) is r["b"] and len(outer) == 2
    assert int(ffi.cast("uintptr_t", lib.hybrid_map_lookup(outer._p(), u64(1)))) == r["a"].address
    with Region([MapSpec("c", MapType.ARRAY, 4, 4, 3, BPF_F_INNER_MAP)]) as other:
        with pytest.raises(MapError) as e:
            outer.update(u64(3), other["c"])
        assert "another region" in str(e.value)
    # the C side refuses an offset that is not a map of this region
    off = ffi.new("uint64_t *", 12345)
    assert lib.hybrid_map_update(outer._p(), u64(4), off, 0) == -errno.EBADF


def test_map_in_map_seen_from_another_process(regions):
    inner = MapSpec("t", MapType.HASH, 4, 4, 4)
    r = regions(MapSpec("outer", MapType.ARRAY_OF_MAPS, 4, 4, 1, inner=inner), MapSpec("in", MapType.HASH, 4, 4, 4))
    r["outer"].update(k(0), r["in"])
    r["in"].update(k(5), k(55))
    code = f"""
from hybrid.user.maps import Region
with Region.open({r.name!r}) as r:
    inner = r["outer"].lookup((0).to_bytes(4, "little"))
    print(r["outer"].spec.inner.type, inner.lookup((5).to_bytes(4, "little")).hex())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["1", k(55).hex()]


# --- prog array -----------------------------------------------------------------------


def test_prog_array_and_tail_call_registry(regions):
    pa = regions.one(MapSpec("jmp", MapType.PROG_ARRAY, 4, 4, 4))
    assert pa.lookup(k(0)) is None and M.prog_array_entry(pa, 0) == 0
    pa.update(k(1), 77)
    assert pa.lookup(k(1)) == k(77)
    assert M.prog_array_entry(pa, 1) == 0  # id 77 not registered in this process
    M.register_program(77, 0x1234560)
    assert M.prog_array_entry(pa, 1) == 0x1234560
    assert M.prog_array_entry(pa, 9) == 0
    with pytest.raises(MapError) as e:
        pa.update(k(4), 1)
    assert err(e) == errno.E2BIG
    with pytest.raises(MapError) as e:
        pa.update(k(0), 1, BPF_NOEXIST)
    assert err(e) == errno.EINVAL
    pa.delete(k(1))
    assert M.prog_array_entry(pa, 1) == 0
    with pytest.raises(MapError):
        M.register_program(1 << 30, 1)
    M.register_program(77, 0)


# --- stack traces -------------------------------------------------------------------------


def test_stack_trace_map(regions):
    # stack ids use a fixed seed (as the kernel's): these three stacks never share a bucket
    st = regions.one(MapSpec("stacks", MapType.STACK_TRACE, 4, 8 * 4, 1024))
    a = st.store([0x401000, 0x402000, 0x403000])
    assert st.store([0x401000, 0x402000, 0x403000]) == a  # same stack, same id
    b = st.store([0x501000])
    assert a != b and 0 <= a < 1024
    assert st.stack(a) == [0x401000, 0x402000, 0x403000]
    assert st.lookup(k(a)) == b"".join(u64(x) for x in (0x401000, 0x402000, 0x403000, 0))
    assert st.stack(st.store(list(range(1, 10)))) == [1, 2, 3, 4]  # truncated to value_size / 8
    assert sorted(as_int(x) for x in st) == sorted({a, b, st.store([1, 2, 3, 4])})
    with pytest.raises(MapError) as e:
        st.store([])
    assert err(e) == errno.EFAULT
    with pytest.raises(MapError) as e:
        st.update(k(a), bytes(32))
    assert err(e) == errno.EINVAL
    st.delete(k(a))
    assert st.lookup(k(a)) is None
    with pytest.raises(MapError) as e:
        st.delete(k(a))
    assert err(e) == errno.ENOENT
    assert lib.hybrid_map_lookup(st._p(), k(b)) == ffi.NULL  # programs cannot look stacks up


def test_stack_trace_collisions(regions):
    st = regions.one(MapSpec("stacks", MapType.STACK_TRACE, 4, 16, 1))  # one bucket: everything collides
    assert st.store([1, 2]) == 0
    with pytest.raises(MapError) as e:
        st.store([3, 4])
    assert err(e) == errno.EEXIST
    assert st.stack(0) == [1, 2]
    assert st.store([3, 4], BPF_F_REUSE_STACKID) == 0
    assert st.stack(0) == [3, 4]
    with pytest.raises(MapError):
        st.store([3, 4], 1 << 20)
    # FAST_STACK_CMP compares hashes only: an equal stack is found without memcmp
    assert st.store([3, 4], BPF_F_FAST_STACK_CMP) == 0


# --- queue, stack, bloom -------------------------------------------------------------------


def test_queue_fifo(regions):
    q = regions.one(MapSpec("q", MapType.QUEUE, 0, 4, 3))
    assert q.pop() is None and q.peek() is None
    for i in range(3):
        q.push(k(i))
    assert len(q) == 3
    with pytest.raises(MapError) as e:
        q.push(k(3))
    assert err(e) == errno.E2BIG
    q.push(k(3), BPF_EXIST)  # overwrites the oldest
    assert q.peek() == k(1) and len(q) == 3
    assert [q.pop() for _ in range(4)] == [k(1), k(2), k(3), None]
    with pytest.raises(MapError) as e:
        q.push(k(0), BPF_NOEXIST)
    assert err(e) == errno.EINVAL
    with pytest.raises(MapError) as e:
        list(q)
    assert err(e) == errno.EINVAL
    for i in range(10):  # wraps around the circular buffer
        q.push(k(i))
        assert q.pop() == k(i)
    q.update(b"", k(5))  # the syscall's update is a push, its lookup a peek
    assert q.lookup(b"") == k(5) and q.pop() == k(5)


def test_stack_lifo(regions):
    s = regions.one(MapSpec("s", MapType.STACK, 0, 8, 3))
    for i in range(3):
        s.push(u64(i))
    assert s.peek() == u64(2)
    s.push(u64(3), BPF_EXIST)  # drops the oldest (the bottom)
    assert [s.pop() for _ in range(4)] == [u64(3), u64(2), u64(1), None]
    s.push(u64(9))
    assert s.pop() == u64(9) and s.pop() is None


def test_bloom_filter(regions):
    n = 1000
    bf = regions.one(MapSpec("bf", MapType.BLOOM_FILTER, 0, 8, n))
    rnd = random.Random(1)
    members = [u64(rnd.getrandbits(64)) for _ in range(n)]
    for v in members:
        bf.push(v)
    assert all(bf.contains(v) for v in members)  # never a false negative
    fp = sum(bf.contains(u64(rnd.getrandbits(64))) for _ in range(10000))
    assert fp < 500  # k=5 and the kernel's sizing give ~1%
    with pytest.raises(MapError) as e:
        bf.push(u64(1), BPF_EXIST)
    assert err(e) == errno.EINVAL
    assert lib.hybrid_map_pop(bf._p(), ffi.new("char[8]")) == -errno.EOPNOTSUPP
    with pytest.raises(MapError):
        list(bf)


def test_bloom_filter_hash_count_from_map_extra(regions):
    rnd = random.Random(2)
    rates = []
    for nr_hashes in (1, 15):
        bf = regions.one(MapSpec("bf%d" % nr_hashes, MapType.BLOOM_FILTER, 0, 8, 64, map_extra=nr_hashes))
        members = [u64(rnd.getrandbits(64)) for _ in range(64)]
        for v in members:
            bf.push(v)
        assert all(bf.contains(v) for v in members)
        rates.append(sum(bf.contains(u64(rnd.getrandbits(64))) for _ in range(4000)))
    assert rates[1] < rates[0]  # more hash functions (and bits), fewer false positives


# --- helpers through the interpreter ---------------------------------------------------------


def test_map_helpers_table_matches_native_symbols():
    from hybrid.native import helper_address
    from hybrid.user.helpers import MAP_HELPERS

    assert sorted(MAP_HELPERS) == [1, 2, 3, 25, 87, 88, 89, 130, 131, 132, 133, 134, 195]
    for spec in MAP_HELPERS.values():
        assert helper_address(spec.name) != 0
