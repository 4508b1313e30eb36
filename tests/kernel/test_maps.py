"""KernelMap: the hybrid.user.maps.Map API on real kernel maps, batches, mmap, pins, ids."""

from __future__ import annotations

import errno
import os
import struct
import uuid

import pytest

from hybrid.errors import FeatureError, MapError
from hybrid.kernel import KernelMap
from hybrid.kernel import maps as M

from .conftest import key, open_fds


def q(i: int) -> bytes:
    return struct.pack("<Q", i)


@pytest.fixture
def hashmap():
    with KernelMap.create(M.BPF_MAP_TYPE_HASH, 4, 8, 64, name="h") as m:
        yield m


def test_attributes_from_the_kernel(hashmap):
    assert (hashmap.type, hashmap.key_size, hashmap.value_size, hashmap.max_entries) == (M.BPF_MAP_TYPE_HASH, 4, 8,
                                                                                        64)
    assert hashmap.name == "h" and hashmap.type_name == "hash" and hashmap.id > 0 and hashmap.fd >= 0
    assert "KernelMap 'h' (hash)" in repr(hashmap)


def test_hash_api(hashmap):
    m = hashmap
    assert m.lookup(key(1)) is None and key(1) not in m and len(m) == 0 and m.next_key() is None
    m.update(key(1), q(10))
    m[key(2)] = q(20)
    m.update(bytearray(key(3)), memoryview(q(30)))
    assert m[key(1)] == q(10) and key(2) in m and len(m) == 3
    assert sorted(m.keys()) == [key(1), key(2), key(3)]
    assert dict(m.items()) == {key(1): q(10), key(2): q(20), key(3): q(30)}
    assert sorted(m.values()) == [q(10), q(20), q(30)]
    assert m.next_key(m.next_key()) in {key(1), key(2), key(3)}
    with pytest.raises(MapError, match=r"key exists \(BPF_NOEXIST\)") as ei:
        m.update(key(1), q(0), M.BPF_NOEXIST)
    assert ei.value.errno == errno.EEXIST and ei.value.map == "h"
    with pytest.raises(MapError, match=r"no such key \(BPF_EXIST\)"):
        m.update(key(9), q(0), M.BPF_EXIST)
    del m[key(2)]
    with pytest.raises(MapError, match=r"map 'h' \(hash\) delete: \[ENOENT\] no such key"):
        m.delete(key(2))
    with pytest.raises(KeyError):
        m[key(2)]
    with pytest.raises(MapError, match="key is 3 bytes, key_size is 4"):
        m.lookup(b"abc")
    with pytest.raises(MapError, match="value is 4 bytes, value_size is 8"):
        m.update(key(1), b"abcd")
    with pytest.raises(TypeError):
        m.lookup("text")


def test_hash_full():
    with KernelMap.create(M.BPF_MAP_TYPE_HASH, 4, 8, 2, name="small") as m:
        m[key(0)] = m[key(1)] = q(0)
        with pytest.raises(MapError, match=r"map is full \(max_entries 2\)") as ei:
            m[key(2)] = q(0)
        assert ei.value.errno == errno.E2BIG


def test_array_api():
    with KernelMap.create(M.BPF_MAP_TYPE_ARRAY, 4, 4, 5, name="arr") as a:
        assert len(a) == 5 and list(a) == [key(i) for i in range(5)]
        assert a[key(4)] == bytes(4)
        a[key(4)] = b"abcd"
        assert a.lookup(key(4)) == b"abcd" and a.lookup(key(5)) is None
        with pytest.raises(MapError, match="elements of arrays cannot be deleted") as ei:
            del a[key(0)]
        assert ei.value.errno == errno.EINVAL


def test_percpu_values_per_possible_cpu():
    n = M.possible_cpus()
    with KernelMap.create(M.BPF_MAP_TYPE_PERCPU_HASH, 4, 4, 8, name="pc") as m:
        assert m.percpu and m.nr_cpus == n
        m[key(1)] = b"\x07\0\0\0"  # one value: every CPU
        assert m[key(1)] == [b"\x07\0\0\0"] * n and m.sum(key(1)) == 7 * n
        values = [struct.pack("<I", c + 1) for c in range(n)]
        m.update(key(2), values)
        assert m.lookup(key(2)) == values
        with pytest.raises(MapError, match="1 values for %d possible CPUs" % n):
            m.update(key(3), [b"\0\0\0\0"] * 1 if n != 1 else [])
        assert dict(m.lookup_batch()) == {key(1): [b"\x07\0\0\0"] * n, key(2): values}
    with KernelMap.create(M.BPF_MAP_TYPE_PERCPU_ARRAY, 4, 8, 3, name="pa") as a:
        a[key(2)] = [q(c) for c in range(n)]
        assert a[key(2)] == [q(c) for c in range(n)] and a[key(0)] == [q(0)] * n


def test_lru_hash_evicts():
    with KernelMap.create(M.BPF_MAP_TYPE_LRU_HASH, 4, 8, 64, name="lru") as m:
        for i in range(500):
            m[key(i)] = q(i)
        assert 0 < len(m) <= 64
        assert m[key(499)] == q(499)


def test_queue_and_stack():
    with KernelMap.create(M.BPF_MAP_TYPE_QUEUE, 0, 4, 3, name="fifo") as fq:
        assert fq.pop() is None and fq.peek() is None
        for v in (b"aaaa", b"bbbb", b"cccc"):
            fq.push(v)
        with pytest.raises(MapError, match=r"map is full \(max_entries 3\)"):
            fq.push(b"dddd")
        fq.push(b"dddd", M.BPF_EXIST)  # drops the oldest
        assert fq.peek() == b"bbbb"
        assert [fq.pop(), fq.pop(), fq.pop(), fq.pop()] == [b"bbbb", b"cccc", b"dddd", None]
        with pytest.raises(MapError, match="queue maps have no keys"):
            list(iter(fq))
    with KernelMap.create(M.BPF_MAP_TYPE_STACK, 0, 4, 3, name="lifo") as st:
        st.push(b"aaaa")
        st.push(b"bbbb")
        assert [st.pop(), st.pop(), st.pop()] == [b"bbbb", b"aaaa", None]


@pytest.mark.parametrize("t", [M.BPF_MAP_TYPE_HASH, M.BPF_MAP_TYPE_ARRAY, M.BPF_MAP_TYPE_LRU_HASH,
                               M.BPF_MAP_TYPE_PERCPU_HASH])
def test_batches(t):
    n = 300
    with KernelMap.create(t, 4, 8, 512, name="batch") as m:
        keys = [key(i) for i in range(n)]
        m.update_batch(keys, [q(i * 3) for i in range(n)])
        got = dict(m.lookup_batch(chunk=64))
        if t == M.BPF_MAP_TYPE_ARRAY:
            assert len(got) == 512 and got[key(511)] == bytes(8)
        else:
            assert len(got) == n
        want = q(9) if not m.percpu else [q(9)] * m.nr_cpus
        assert got[key(3)] == want
        if t != M.BPF_MAP_TYPE_ARRAY:
            m.delete_batch(keys[:100])
            assert len(m) == n - 100 and key(0) not in m and key(100) in m
            with pytest.raises(MapError, match="no such key.*0 of 1 elements done") as ei:
                m.delete_batch([key(0)])
            assert ei.value.errno == errno.ENOENT
        with pytest.raises(MapError, match="2 keys but 1 values"):
            m.update_batch(keys[:2], [q(0)])


def test_batch_falls_back_without_kernel_support():
    """Array-of-maps has no batch delete, stack traces no batch lookup (ENOTSUPP): one call per element."""
    with KernelMap.create(M.BPF_MAP_TYPE_ARRAY, 4, 4, 1, name="inner") as inner, \
            KernelMap.create(M.BPF_MAP_TYPE_ARRAY_OF_MAPS, 4, 4, 4, name="outer", inner_map_fd=inner.fd) as outer:
        outer.update_batch([key(0), key(2)], [inner.fd, inner.fd])  # fd-valued maps take fds as ints
        assert outer[key(2)] == struct.pack("<I", inner.id)  # ... and return ids
        outer.delete_batch([key(0), key(2)])
        assert outer.lookup(key(0)) is None and outer.lookup(key(2)) is None
    with KernelMap.create(M.BPF_MAP_TYPE_STACK_TRACE, 4, 8 * 4, 16, name="stacks") as st:
        assert st.lookup_batch() == []


def test_mmap_of_an_mmapable_array():
    with KernelMap.create(M.BPF_MAP_TYPE_ARRAY, 4, 8, 16, flags=M.BPF_F_MMAPABLE, name="shared") as a:
        view = a.mmap()
        assert len(view) == 16 * 8
        view[5 * 8:6 * 8] = q(0xDEADBEEF)
        assert a[key(5)] == q(0xDEADBEEF)
        a[key(6)] = q(42)
        assert bytes(view[6 * 8:7 * 8]) == q(42)
        view.release()
    with KernelMap.create(M.BPF_MAP_TYPE_ARRAY, 4, 8, 16, name="plain") as p:
        with pytest.raises(MapError, match="BPF_F_MMAPABLE"):
            p.mmap()


def test_from_fd_id_and_pin(hashmap, tmp_path):
    hashmap[key(1)] = q(1)
    with KernelMap.from_fd(hashmap.fd) as dup:
        assert dup.fd != hashmap.fd and dup.id == hashmap.id and dup[key(1)] == q(1)
    assert hashmap[key(1)] == q(1)  # the dup is closed, not the original
    with KernelMap.from_id(hashmap.id) as by_id:
        assert by_id[key(1)] == q(1) and by_id.name == "h"
    with pytest.raises(MapError, match="no map with id"):
        KernelMap.from_id(0x7FFFFFF0)
    with pytest.raises(MapError, match="not a bpf map"):
        KernelMap.from_fd(0)
    with pytest.raises(MapError, match="nothing is pinned at"):
        KernelMap.from_pin("/sys/fs/bpf/hybrid-does-not-exist")
    with pytest.raises(MapError, match="is not on a bpf filesystem"):
        hashmap.pin(tmp_path / "h")
    path = "/sys/fs/bpf/hybrid-test-%s" % uuid.uuid4().hex[:8]
    hashmap.pin(path)
    try:
        with KernelMap.from_pin(path) as pinned:
            assert pinned.id == hashmap.id
    finally:
        os.unlink(path)


def test_close_releases_the_fd():
    before = open_fds()
    m = KernelMap.create(M.BPF_MAP_TYPE_HASH, 4, 4, 4, name="gone")
    assert open_fds() != before
    m.close()
    m.close()
    assert open_fds() == before
    with pytest.raises(MapError, match=r"\[EBADF\] the map is closed"):
        m.lookup(key(0))


def test_create_errors():
    with pytest.raises(FeatureError, match="no map type 40"):
        KernelMap.create(40, 4, 4, 1, name="weird")
    with pytest.raises(MapError, match=r"\(array\) create: \[EINVAL\] invalid attributes: key_size 8") as ei:
        KernelMap.create(M.BPF_MAP_TYPE_ARRAY, 8, 4, 1, name="badarr")
    assert ei.value.map == "badarr"
