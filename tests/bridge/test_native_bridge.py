"""Bridged maps: maps of the userspace VM backed by real kernel maps (hybrid/native/maps.c).

mmap mode (an ARRAY whose storage is the kernel map's mmap()ed memory) and
syscall mode (every operation a bpf() command; a program's lookup gets a
per-thread copy written back at the end of the run), seen from Python, from
clang-compiled programs on every engine, from C threads, from another process
(Region.open) and from the agent in a traced process.  The kernel side is a
tiny raw bpf() wrapper defined here (no libbpf), plus a kernel program run
with BPF_PROG_TEST_RUN for concurrent atomic adds from inside the kernel.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno as E
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from hybrid.errors import MapError, VerifierError
from hybrid.native import _native
from hybrid.user.maps import BPF_EXIST, BPF_NOEXIST, MapSpec, MapType, Region, possible_cpus

_mod = _native()
ffi, lib = _mod.ffi, _mod.lib
NCPU = possible_cpus()
ROOT = Path(__file__).resolve().parents[2]
ENGINES = ("interp", "jit", "aot")

# --- the kernel side: raw bpf() -------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
NR_BPF = 321
(BPF_MAP_CREATE, BPF_MAP_LOOKUP_ELEM, BPF_MAP_UPDATE_ELEM, BPF_MAP_DELETE_ELEM, BPF_MAP_GET_NEXT_KEY,
 BPF_PROG_LOAD) = 0, 1, 2, 3, 4, 5
BPF_PROG_TEST_RUN, BPF_OBJ_GET_INFO_BY_FD, BPF_MAP_LOOKUP_AND_DELETE_ELEM = 10, 15, 21
BPF_F_NO_PREALLOC, BPF_F_MMAPABLE = 1, 1 << 10
PERCPU_TYPES = (MapType.PERCPU_HASH, MapType.PERCPU_ARRAY, MapType.LRU_PERCPU_HASH)
u32, u64 = ctypes.c_uint32, ctypes.c_uint64


class _CreateAttr(ctypes.Structure):
    _fields_ = [("map_type", u32), ("key_size", u32), ("value_size", u32), ("max_entries", u32),
                ("map_flags", u32), ("inner_map_fd", u32), ("numa_node", u32), ("map_name", ctypes.c_char * 16),
                ("map_ifindex", u32), ("btf_fd", u32), ("btf_key_type_id", u32), ("btf_value_type_id", u32),
                ("btf_vmlinux_value_type_id", u32), ("map_extra", u64)]


class _ElemAttr(ctypes.Structure):
    _fields_ = [("map_fd", u32), ("pad", u32), ("key", u64), ("value", u64), ("flags", u64)]


class _InfoAttr(ctypes.Structure):
    _fields_ = [("bpf_fd", u32), ("info_len", u32), ("info", u64)]


class _MapInfo(ctypes.Structure):
    _fields_ = [("type", u32), ("id", u32), ("key_size", u32), ("value_size", u32), ("max_entries", u32),
                ("map_flags", u32), ("name", ctypes.c_char * 16), ("rest", ctypes.c_char * 64)]


class _ProgLoadAttr(ctypes.Structure):
    _fields_ = [("prog_type", u32), ("insn_cnt", u32), ("insns", u64), ("license", u64), ("log_level", u32),
                ("log_size", u32), ("log_buf", u64), ("kern_version", u32), ("prog_flags", u32)]


class _TestRunAttr(ctypes.Structure):
    _fields_ = [("prog_fd", u32), ("retval", u32), ("data_size_in", u32), ("data_size_out", u32),
                ("data_in", u64), ("data_out", u64), ("repeat", u32), ("duration", u32)]


def _bpf(cmd: int, attr) -> int:
    r = _libc.syscall(NR_BPF, cmd, ctypes.byref(attr), ctypes.sizeof(attr))
    if r < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return r


def _buf(data: bytes | None, size: int):
    b = ctypes.create_string_buffer(max(size, 1))
    if data:
        ctypes.memmove(b, data, len(data))
    return b


class KMap:
    """A kernel map, created and driven with bpf() directly."""

    def __init__(self, type_: int, key_size: int, value_size: int, max_entries: int, flags: int = 0,
                 extra: int = 0):
        self.fd = _bpf(BPF_MAP_CREATE, _CreateAttr(type_, key_size, value_size, max_entries, flags, 0, 0, b"hyb_test",
                                                   0, 0, 0, 0, 0, extra))
        info = _MapInfo()
        _bpf(BPF_OBJ_GET_INFO_BY_FD, _InfoAttr(self.fd, ctypes.sizeof(info), ctypes.addressof(info)))
        self.id, self.type, self.key_size, self.value_size = info.id, type_, key_size, value_size
        self.max_entries, self.flags = max_entries, flags
        self.stride = (value_size + 7) // 8 * 8
        self.percpu = type_ in PERCPU_TYPES
        self.vbuf = self.stride * NCPU if self.percpu else value_size

    def spec(self, name: str, bridge: str = "syscall") -> MapSpec:
        return MapSpec(name, self.type, self.key_size, self.value_size, self.max_entries, self.flags,
                       kernel_id=self.id, bridge=bridge)

    def _cmd(self, cmd: int, key: bytes | None, value=None, flags: int = 0) -> int:
        k = _buf(key, self.key_size) if key is not None else None
        r = _libc.syscall(NR_BPF, cmd, ctypes.byref(_ElemAttr(self.fd, 0, ctypes.addressof(k) if k is not None else 0,
                                                              ctypes.addressof(value) if value is not None else 0,
                                                              flags)), ctypes.sizeof(_ElemAttr))
        return 0 if r == 0 else -ctypes.get_errno()

    def lookup(self, key: bytes | None):
        out = _buf(None, self.vbuf)
        rc = self._cmd(BPF_MAP_LOOKUP_ELEM, key, out)
        if rc == -E.ENOENT:
            return None
        assert rc == 0, os.strerror(-rc)
        raw = out.raw[:self.vbuf]
        if self.percpu:
            return [raw[i * self.stride:i * self.stride + self.value_size] for i in range(NCPU)]
        return raw

    def update(self, key: bytes | None, value, flags: int = 0) -> int:
        if self.percpu:
            if isinstance(value, bytes):
                value = [value] * NCPU
            value = b"".join(v.ljust(self.stride, b"\0") for v in value)
        return self._cmd(BPF_MAP_UPDATE_ELEM, key, _buf(value, self.vbuf), flags)

    def delete(self, key: bytes | None) -> int:
        return self._cmd(BPF_MAP_DELETE_ELEM, key)

    def keys(self) -> list[bytes]:
        out, key = [], None
        while True:
            nxt = _buf(None, self.key_size)
            if self._cmd(BPF_MAP_GET_NEXT_KEY, key, nxt) != 0:
                return out
            key = nxt.raw[:self.key_size]
            out.append(key)

    def pop(self):
        out = _buf(None, self.value_size)
        rc = self._cmd(BPF_MAP_LOOKUP_AND_DELETE_ELEM, None, out)
        return None if rc == -E.ENOENT else out.raw[:self.value_size]

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def k4(i: int) -> bytes:
    return i.to_bytes(4, "little")


def q8(i: int) -> bytes:
    return i.to_bytes(8, "little")


def n8(b) -> int:
    return int.from_bytes(b, "little")


def _bpf_usable() -> str | None:
    try:
        KMap(MapType.ARRAY, 4, 8, 1, BPF_F_MMAPABLE).close()
    except OSError as e:
        return "bpf(BPF_MAP_CREATE) is not usable here: %s" % e
    return None


_why = _bpf_usable()
pytestmark = pytest.mark.skipif(_why is not None, reason=_why or "")


@pytest.fixture
def kmap():
    made: list[KMap] = []

    def make(*a, **kw) -> KMap:
        m = KMap(*a, **kw)
        made.append(m)
        return m

    yield make
    for m in made:
        m.close()


@pytest.fixture
def regions():
    made: list[Region] = []

    def make(*specs, **kw) -> Region:
        r = Region(list(specs), **kw)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


def _mappings() -> list[str]:
    with open("/proc/self/maps") as f:
        return [line.strip() for line in f]


def _in_region(region: Region) -> list[str]:
    return [line for line in _mappings() if region.base <= int(line.split("-")[0], 16) < region.base + region.size]


def _fds_of(kernel_id: int) -> int:
    n = 0
    for fd in os.listdir("/proc/self/fdinfo"):
        try:
            text = Path("/proc/self/fdinfo", fd).read_text()
        except OSError:
            continue
        n += "map_id:\t%d\n" % kernel_id in text
    return n


# --- mmap mode -----------------------------------------------------------------------------


def test_mmap_array_is_the_kernel_memory(kmap, regions):
    km = kmap(MapType.ARRAY, 4, 12, 1000, BPF_F_MMAPABLE)
    r = regions(MapSpec("before", MapType.HASH, 8, 8, 10), km.spec("arr", "mmap"),
                MapSpec("after", MapType.ARRAY, 4, 8, 4))
    m = r["arr"]
    assert (m.bridge, m.kernel_id) == ("mmap", km.id)
    assert (r["before"].bridge, r["before"].kernel_id) == ("", 0)
    # the storage is an overlay of the kernel map, page aligned, inside the region
    lay = m.array_layout()
    assert lay.stride == 16 and (m.address + lay.offset) % 4096 == 0 and m.value_address == m.address + lay.offset
    overlay = [line for line in _in_region(r) if line.endswith("anon_inode:bpf-map")]
    assert len(overlay) == 1 and int(overlay[0].split("-")[0], 16) == m.value_address
    # kernel -> Python
    assert km.update(k4(5), b"kernel side!") == 0
    assert m.lookup(k4(5)) == b"kernel side!"
    # Python -> kernel
    m.update(k4(999), b"python side.")
    assert km.lookup(k4(999)) == b"python side."
    # direct memory writes (what a program's store does) -> kernel
    ffi.cast("uint64_t *", m.value_address + 7 * 16)[0] = 0x1122334455
    assert n8(km.lookup(k4(7))[:8]) == 0x1122334455
    # the other maps of the region are unaffected
    r["after"].update(k4(1), q8(3))
    assert r["after"].lookup(k4(1)) == q8(3)
    assert len(m) == 1000 and km.lookup(k4(0)) == b"\0" * 12


def test_mmap_initial_value_is_not_applied(kmap, regions):
    """A bridged global data map keeps the kernel's contents (the kernel side loaded them)."""
    km = kmap(MapType.ARRAY, 4, 8, 1, BPF_F_MMAPABLE)
    km.update(k4(0), q8(42))
    spec = dataclasses.replace(km.spec(".data", "mmap"), initial=q8(7))
    r = regions(spec)
    assert r[".data"].lookup(k4(0)) == q8(42)


# --- syscall mode from Python --------------------------------------------------------------


def test_syscall_hash_both_ways(kmap, regions):
    km = kmap(MapType.HASH, 4, 8, 64)
    r = regions(km.spec("h"))
    m = r["h"]
    assert m.bridge == "syscall" and m.value_address == 0 and m.array_layout() is None
    km.update(k4(1), q8(10))
    assert m.lookup(k4(1)) == q8(10) and k4(1) in m
    m.update(k4(2), q8(20))
    assert km.lookup(k4(2)) == q8(20)
    with pytest.raises(MapError) as ei:
        m.update(k4(2), q8(21), BPF_NOEXIST)
    assert ei.value.errno == E.EEXIST
    with pytest.raises(MapError) as ei:
        m.update(k4(3), q8(21), BPF_EXIST)
    assert ei.value.errno == E.ENOENT
    assert sorted(m.keys()) == sorted(km.keys()) == [k4(1), k4(2)]
    assert dict(m.items()) == {k4(1): q8(10), k4(2): q8(20)}
    assert len(m) == 2
    m.delete(k4(1))
    assert km.lookup(k4(1)) is None and len(m) == 1
    with pytest.raises(MapError) as ei:
        m.delete(k4(1))
    assert ei.value.errno == E.ENOENT


@pytest.mark.parametrize("t", [MapType.ARRAY, MapType.LRU_HASH])
def test_syscall_array_and_lru(kmap, regions, t):
    km = kmap(t, 4, 16, 8)
    m = regions(km.spec("m"))["m"]
    m.update(k4(3), b"x" * 16)
    assert km.lookup(k4(3)) == b"x" * 16
    km.update(k4(4), b"y" * 16)
    assert m.lookup(k4(4)) == b"y" * 16
    if t == MapType.ARRAY:
        assert len(m) == 8 and list(m.keys()) == [k4(i) for i in range(8)]
        assert m.lookup(k4(8)) is None
        with pytest.raises(MapError) as ei:
            m.delete(k4(3))
        assert ei.value.errno == E.EINVAL
        assert m.ref().inline_array is None  # never inlined by the JIT
    else:
        assert len(m) == 2


@pytest.mark.parametrize("t", PERCPU_TYPES)
def test_syscall_percpu(kmap, regions, t):
    km = kmap(t, 4, 8, 8)
    m = regions(km.spec("p"))["p"]
    m.update(k4(1), [q8(100 + c) for c in range(NCPU)])
    assert km.lookup(k4(1)) == [q8(100 + c) for c in range(NCPU)]
    km.update(k4(2), [q8(7 * (c + 1)) for c in range(NCPU)])
    assert m.lookup(k4(2)) == [q8(7 * (c + 1)) for c in range(NCPU)]
    assert m.sum(k4(2)) == 7 * NCPU * (NCPU + 1) // 2
    assert m.array_layout() is None


def test_syscall_percpu_needs_the_kernel_cpu_count(kmap):
    km = kmap(MapType.PERCPU_HASH, 4, 8, 8)
    before = _mappings()
    with pytest.raises(MapError, match="CPU slots") as ei:
        Region([km.spec("p")], nr_cpus=NCPU + 1)
    assert ei.value.map == "p"
    assert _mappings() == before


def test_syscall_lpm_trie(kmap, regions):
    km = kmap(MapType.LPM_TRIE, 8, 8, 16, BPF_F_NO_PREALLOC)
    m = regions(km.spec("lpm"))["lpm"]

    def key(plen, ip):
        return plen.to_bytes(4, "little") + bytes(ip)

    km.update(key(8, [10, 0, 0, 0]), q8(8))
    m.update(key(24, [10, 1, 2, 0]), q8(24))
    assert m.lookup(key(32, [10, 1, 2, 3])) == q8(24)
    assert m.lookup(key(32, [10, 9, 9, 9])) == q8(8)
    assert m.lookup(key(32, [11, 0, 0, 0])) is None
    assert km.lookup(key(32, [10, 1, 2, 99])) == q8(24)
    assert sorted(m.keys()) == sorted(km.keys())


@pytest.mark.parametrize("t", [MapType.QUEUE, MapType.STACK])
def test_syscall_queue_and_stack(kmap, regions, t):
    km = kmap(t, 0, 8, 4)
    m = regions(km.spec("q"))["q"]
    m.push(q8(1))
    km.update(None, q8(2))
    m.push(q8(3))
    assert m.peek() == (q8(1) if t == MapType.QUEUE else q8(3))
    assert len(m) == 0  # documented: the kernel does not say how many values a queue holds
    order = [q8(1), q8(2), q8(3)] if t == MapType.QUEUE else [q8(3), q8(2), q8(1)]
    assert [m.pop(), km.pop(), m.pop()] == order
    assert m.pop() is None and m.peek() is None
    for i in range(4):
        m.push(q8(i))
    with pytest.raises(MapError) as ei:
        m.push(q8(9))
    assert ei.value.errno == E.E2BIG


def test_syscall_bloom_filter(kmap, regions):
    km = kmap(MapType.BLOOM_FILTER, 0, 8, 100)
    m = regions(km.spec("bloom"))["bloom"]
    m.push(q8(5))
    assert km._cmd(BPF_MAP_LOOKUP_ELEM, None, _buf(q8(5), 8)) == 0  # the kernel's "maybe present"
    km.update(None, q8(6))
    assert q8(6) in m and q8(5) in m


def test_fds_are_released_on_close(kmap):
    km = kmap(MapType.HASH, 4, 8, 4)
    r1 = Region([km.spec("a")])
    r2 = Region([km.spec("b")])
    assert _fds_of(km.id) == 2  # the test's and this process's cached one
    r1.close()
    assert _fds_of(km.id) == 2  # r2 still bridges it
    r2["b"].update(k4(1), q8(1))
    r2.close()
    assert _fds_of(km.id) == 1


# --- errors ----------------------------------------------------------------------------------


def _no_leftovers(before: list[str]) -> None:
    after = _mappings()
    assert [line for line in after if "bpf-map" in line] == [line for line in before if "bpf-map" in line]
    assert [line for line in after if "/dev/shm/hybrid." in line] == \
        [line for line in before if "/dev/shm/hybrid." in line]


def test_missing_kernel_map(kmap):
    ok = kmap(MapType.ARRAY, 4, 8, 4, BPF_F_MMAPABLE)
    before = _mappings()
    for bridge, t in (("syscall", MapType.HASH), ("mmap", MapType.ARRAY)):
        with pytest.raises(MapError, match="kernel map id 2147483000 does not exist") as ei:
            Region([ok.spec("fine", "mmap"), MapSpec("ghost", t, 4, 8, 4, kernel_id=2147483000, bridge=bridge)])
        assert ei.value.map == "ghost" and ei.value.errno == E.ENOENT
    _no_leftovers(before)


def test_type_mismatch(kmap):
    km = kmap(MapType.HASH, 4, 8, 4)
    before = _mappings()
    with pytest.raises(MapError, match="is of type hash, this map is of type array") as ei:
        Region([MapSpec("arr", MapType.ARRAY, 4, 8, 4, kernel_id=km.id, bridge="syscall")])
    assert ei.value.map == "arr"
    with pytest.raises(MapError, match="key_size 4, value_size 8, max_entries 4; this map has 4, 16, 4"):
        Region([MapSpec("h", MapType.HASH, 4, 16, 4, kernel_id=km.id, bridge="syscall")])
    _no_leftovers(before)


def test_mmap_needs_mmapable(kmap):
    km = kmap(MapType.ARRAY, 4, 8, 4)
    before = _mappings()
    with pytest.raises(MapError, match="not BPF_F_MMAPABLE") as ei:
        Region([km.spec("arr", "mmap")])
    assert ei.value.map == "arr"
    _no_leftovers(before)
    with Region([km.spec("arr", "syscall")]) as r:  # the syscall mode takes it
        r["arr"].update(k4(1), q8(5))
    assert km.lookup(k4(1)) == q8(5)


def test_unsupported_modes():
    with pytest.raises(MapError, match="syscall bridge supports .* not ringbuf") as ei:
        MapSpec("rb", MapType.RINGBUF, 0, 0, 4096, kernel_id=5, bridge="syscall")
    assert ei.value.errno == E.EOPNOTSUPP
    with pytest.raises(MapError, match="not prog_array"):
        MapSpec("pa", MapType.PROG_ARRAY, 4, 4, 4, kernel_id=5, bridge="syscall")
    with pytest.raises(MapError, match="mmap bridge needs an array map, not hash"):
        MapSpec("h", MapType.HASH, 4, 8, 4, kernel_id=5, bridge="mmap")
    with pytest.raises(MapError, match="bridge must be one of"):
        MapSpec("h", MapType.HASH, 4, 8, 4, kernel_id=5, bridge="rdma")
    with pytest.raises(MapError, match="needs the kernel map's id"):
        MapSpec("h", MapType.HASH, 4, 8, 4, bridge="syscall")
    with pytest.raises(MapError, match="without a bridge mode"):
        MapSpec("h", MapType.HASH, 4, 8, 4, kernel_id=5)


# --- the write-back of a run (C API, as a program's helpers see it) -------------------------


def test_flush_writes_back_at_the_end_of_the_run(kmap, regions):
    km = kmap(MapType.HASH, 4, 8, 64)
    m = regions(km.spec("h"))["h"]
    ptr = m._p()
    km.update(k4(1), q8(10))
    p = ffi.cast("uint64_t *", lib.hybrid_map_lookup(ptr, k4(1)))
    assert p != ffi.NULL and p[0] == 10
    p[0] += 5
    assert km.lookup(k4(1)) == q8(10)  # not yet: a per-thread copy
    assert ffi.cast("uint64_t *", lib.hybrid_map_lookup(ptr, k4(1))) == p  # same element, same pointer
    lib.hybrid_bridge_flush()
    assert km.lookup(k4(1)) == q8(15)

    # unchanged copy: no write-back, the kernel's concurrent write stays
    p = ffi.cast("uint64_t *", lib.hybrid_map_lookup(ptr, k4(1)))
    km.update(k4(1), q8(99))
    lib.hybrid_bridge_flush()
    assert km.lookup(k4(1)) == q8(99)

    # changed copy: last writer wins (not atomic against the other side; documented)
    p = ffi.cast("uint64_t *", lib.hybrid_map_lookup(ptr, k4(1)))
    p[0] = 1000
    km.update(k4(1), q8(7))
    lib.hybrid_bridge_flush()
    assert km.lookup(k4(1)) == q8(1000)

    # deleted meanwhile by the kernel side: the write is dropped
    p = ffi.cast("uint64_t *", lib.hybrid_map_lookup(ptr, k4(1)))
    p[0] = 1
    assert km.delete(k4(1)) == 0
    lib.hybrid_bridge_flush()
    assert km.lookup(k4(1)) is None and m.lost == 0

    # deleted by this thread in the same run: dropped too; an update replaces the element (hash)
    km.update(k4(2), q8(2))
    p = ffi.cast("uint64_t *", lib.hybrid_map_lookup(ptr, k4(2)))
    p[0] = 3
    assert lib.hybrid_map_delete(ptr, k4(2)) == 0
    lib.hybrid_bridge_flush()
    assert km.lookup(k4(2)) is None
    km.update(k4(2), q8(2))
    p = ffi.cast("uint64_t *", lib.hybrid_map_lookup(ptr, k4(2)))
    p[0] = 3
    assert lib.hybrid_map_update(ptr, k4(2), q8(50), 0) == 0
    lib.hybrid_bridge_flush()
    assert km.lookup(k4(2)) == q8(50)
    assert m.lost == 0


def test_flush_array_update_in_place(kmap, regions):
    """Arrays are updated in place by the kernel: a copy sees this thread's update."""
    km = kmap(MapType.ARRAY, 4, 8, 4)
    ptr = regions(km.spec("a"))["a"]._p()
    p = ffi.cast("uint64_t *", lib.hybrid_map_lookup(ptr, k4(1)))
    assert lib.hybrid_map_update(ptr, k4(1), q8(40), 0) == 0
    assert p[0] == 40
    p[0] += 2
    lib.hybrid_bridge_flush()
    assert km.lookup(k4(1)) == q8(42)


def test_flush_percpu_slot(kmap, regions):
    km = kmap(MapType.PERCPU_ARRAY, 4, 8, 4)
    km.update(k4(2), [q8(c + 1) for c in range(NCPU)])
    ptr = regions(km.spec("p"))["p"]._p()
    cpu = NCPU - 1
    p = ffi.cast("uint64_t *", lib.hybrid_map_lookup_cpu(ptr, k4(2), cpu))
    assert p[0] == cpu + 1
    p[0] = 500
    km.update(k4(2), [q8(10 * (c + 1)) for c in range(NCPU)])  # the kernel side writes meanwhile
    lib.hybrid_bridge_flush()
    want = [q8(10 * (c + 1)) for c in range(NCPU)]
    want[cpu] = q8(500)  # only this slot is written back
    assert km.lookup(k4(2)) == want


def test_pending_list_and_arena_limits(kmap, regions):
    km = kmap(MapType.HASH, 4, 8, 64)
    r = regions(km.spec("h"))
    m, ptr = r["h"], r["h"]._p()
    for i in range(20):
        km.update(k4(i), q8(i))
    got = [lib.hybrid_map_lookup(ptr, k4(i)) for i in range(17)]
    assert all(p != ffi.NULL for p in got[:16]) and got[16] == ffi.NULL
    assert m.lost == 1
    assert lib.hybrid_map_lookup(ptr, k4(3)) == got[3]  # an element already copied: still fine
    assert lib.hybrid_map_lookup(ptr, k4(18)) == ffi.NULL
    for i, p in enumerate(got[:16]):
        ffi.cast("uint64_t *", p)[0] = 100 + i
    lib.hybrid_bridge_flush()
    assert [n8(km.lookup(k4(i))) for i in range(18)] == [100 + i for i in range(16)] + [16, 17]
    assert lib.hybrid_map_lookup(ptr, k4(18)) != ffi.NULL  # a new run
    lib.hybrid_bridge_flush()
    assert m.lost == 2

    big = kmap(MapType.ARRAY, 4, 60000, 4)
    b = regions(big.spec("big"))["big"]
    ptrs = [lib.hybrid_map_lookup(b._p(), k4(i)) for i in range(4)]
    assert [p != ffi.NULL for p in ptrs] == [True, True, False, False]  # 256 KiB arena: two copies + snapshots
    assert b.lost == 2
    lib.hybrid_bridge_flush()
    for _ in range(1000):  # nothing pending: cheap
        lib.hybrid_bridge_flush()


# --- programs on every engine ----------------------------------------------------------------

PROGS = r"""
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

char LICENSE[] SEC("license") = "GPL";

#define MAP(n, t, m) \
    struct { __uint(type, t); __uint(max_entries, m); __type(key, u32); __type(value, u64); } n SEC(".maps")
MAP(hash, BPF_MAP_TYPE_HASH, 64);
MAP(arr, BPF_MAP_TYPE_ARRAY, 16);
MAP(marr, BPF_MAP_TYPE_ARRAY, 16);
MAP(parr, BPF_MAP_TYPE_PERCPU_ARRAY, 8);
MAP(phash, BPF_MAP_TYPE_PERCPU_HASH, 64);
MAP(lru, BPF_MAP_TYPE_LRU_HASH, 64);

struct {
    __uint(type, BPF_MAP_TYPE_QUEUE);
    __uint(max_entries, 16);
    __type(value, u64);
} queue SEC(".maps");

u64 hits;    /* .bss */

#define ADD(map)                                                    \
    u32 k = PT_REGS_PARM1(ctx);                                     \
    u64 v = PT_REGS_PARM2(ctx), *p;                                 \
    __sync_fetch_and_add(&hits, 1);                                 \
    p = bpf_map_lookup_elem(&map, &k);                              \
    if (!p) {                                                       \
        if (bpf_map_update_elem(&map, &k, &v, BPF_NOEXIST))         \
            return -1;                                              \
        return v;                                                   \
    }                                                               \
    __sync_fetch_and_add(p, v);                                     \
    return *p;

SEC("uprobe") int inc_hash(struct pt_regs *ctx) { ADD(hash) }
SEC("uprobe") int inc_arr(struct pt_regs *ctx) { ADD(arr) }
SEC("uprobe") int inc_marr(struct pt_regs *ctx) { ADD(marr) }
SEC("uprobe") int inc_parr(struct pt_regs *ctx) { ADD(parr) }
SEC("uprobe") int inc_phash(struct pt_regs *ctx) { ADD(phash) }
SEC("uprobe") int inc_lru(struct pt_regs *ctx) { ADD(lru) }

SEC("uprobe") int del_hash(struct pt_regs *ctx)
{
    u32 k = PT_REGS_PARM1(ctx);

    return bpf_map_delete_elem(&hash, &k);
}

SEC("uprobe") int upd_hash(struct pt_regs *ctx)
{
    u32 k = PT_REGS_PARM1(ctx);
    u64 v = PT_REGS_PARM2(ctx);

    return bpf_map_update_elem(&hash, &k, &v, BPF_ANY);
}

SEC("uprobe") int upd_phash(struct pt_regs *ctx)
{
    u32 k = PT_REGS_PARM1(ctx);
    u64 v = PT_REGS_PARM2(ctx);

    return bpf_map_update_elem(&phash, &k, &v, BPF_ANY);
}

SEC("uprobe") int push_q(struct pt_regs *ctx)
{
    u64 v = PT_REGS_PARM2(ctx);

    return bpf_map_push_elem(&queue, &v, 0);
}

SEC("uprobe") int pop_q(struct pt_regs *ctx)
{
    u64 v = 0;

    if (bpf_map_pop_elem(&queue, &v))
        return -1;
    return v;
}

/* write through the pointer, then delete the element: the write must not come back */
SEC("uprobe") int write_then_delete(struct pt_regs *ctx)
{
    u32 k = PT_REGS_PARM1(ctx);
    u64 *p = bpf_map_lookup_elem(&hash, &k);

    if (!p)
        return -1;
    *p = 12345;
    return bpf_map_delete_elem(&hash, &k);
}

/* the same element twice in one run: the same pointer, the run's own write visible */
SEC("uprobe") int same_pointer(struct pt_regs *ctx)
{
    u32 k = PT_REGS_PARM1(ctx);
    u64 *a = bpf_map_lookup_elem(&hash, &k), *b;

    if (!a)
        return -1;
    *a = PT_REGS_PARM2(ctx);
    b = bpf_map_lookup_elem(&hash, &k);
    if (!b)
        return -2;
    return (a == b) * 1000 + *b;
}

SEC("uprobe") int inc_percpu_slot(struct pt_regs *ctx)
{
    u32 k = PT_REGS_PARM1(ctx);
    u64 *p = bpf_map_lookup_percpu_elem(&parr, &k, PT_REGS_PARM3(ctx));

    if (!p)
        return -1;
    *p += PT_REGS_PARM2(ctx);
    return *p;
}
"""

MODES = {"hash": "syscall", "arr": "syscall", "marr": "mmap", "parr": "syscall", "phash": "syscall",
         "lru": "syscall", "queue": "syscall", ".bss": "mmap"}


def pt_regs(di: int = 0, si: int = 0, dx: int = 0) -> bytes:
    regs = [0] * 21
    regs[14], regs[13], regs[12] = di, si, dx
    return b"".join(q8(r) for r in regs)


def bridged_object(path, kmaps: dict[str, KMap], modes: dict[str, str]):
    """The object at ``path`` with its maps named in ``kmaps`` backed by those kernel maps."""
    from hybrid.user.elf import load_object_spec
    from hybrid.user.object import BpfObject

    spec = load_object_spec(path)
    maps = tuple(dataclasses.replace(m, kernel_id=kmaps[m.name].id, bridge=modes[m.name])
                 if m.name in kmaps else m for m in spec.maps)
    return BpfObject(dataclasses.replace(spec, maps=maps))


def kernel_maps_for(path, kmap, modes: dict[str, str]) -> dict[str, KMap]:
    from hybrid.user.elf import load_object_spec

    out = {}
    for m in load_object_spec(path).maps:
        if m.name in modes:
            flags = m.flags | (BPF_F_MMAPABLE if modes[m.name] == "mmap" else 0)
            out[m.name] = kmap(m.type, m.key_size, m.value_size, m.max_entries, flags & ~(1 << 7))
    return out


@pytest.fixture(scope="module")
def progs_obj(bpf_build):
    return bpf_build.source("native_bridge", PROGS)


@pytest.fixture
def on_cpu0():
    """Runs on CPU 0 only, so that "the current CPU's slot" is known."""
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {0})
    yield 0
    os.sched_setaffinity(0, old)


@pytest.mark.parametrize("engine", ENGINES)
def test_programs_on_bridged_maps(progs_obj, kmap, engine, on_cpu0):
    km = kernel_maps_for(progs_obj, kmap, MODES)
    with bridged_object(progs_obj, km, MODES) as obj:
        assert {n: obj.maps[n].bridge for n in MODES} == MODES

        def run(name, *args):
            r = obj.programs[name].run(pt_regs(*args), engine=engine) & 0xFFFFFFFF  # int programs
            return r - (1 << 32) if r >= 1 << 31 else r

        # lookup + atomic add through the pointer; insert when missing
        for name in ("hash", "arr", "marr", "parr", "phash", "lru"):
            total = 0
            for i in range(1, 6):
                total += i
                assert run("inc_" + name, 3, i) == total, name
            assert run("inc_" + name, 4, 100) == 100
            kv = km[name].lookup(k4(3))
            assert (sum(n8(v) for v in kv) if km[name].percpu else n8(kv)) == 15, name
            if km[name].percpu:
                assert n8(kv[0]) == 15  # CPU 0's slot, the current CPU
            # the other side adds; the next run's lookup sees it
            if km[name].percpu:
                km[name].update(k4(3), [q8(15 + 1000 * (c == 0)) for c in range(NCPU)])
            else:
                km[name].update(k4(3), q8(1015))
            assert run("inc_" + name, 3, 1) == 1016, name
        # hits is in .bss, bridged by mmap: direct value access, atomic
        assert n8(km[".bss"].lookup(k4(0))) == 6 * 7
        assert n8(obj.maps[".bss"].lookup(k4(0))) == 6 * 7

        # update, delete
        assert run("upd_hash", 9, 90) == 0
        assert km["hash"].lookup(k4(9)) == q8(90)
        assert run("del_hash", 9) == 0
        assert km["hash"].lookup(k4(9)) is None
        assert run("del_hash", 9) == -E.ENOENT
        km["hash"].update(k4(10), q8(1))
        assert run("write_then_delete", 10) == 0
        assert km["hash"].lookup(k4(10)) is None
        km["hash"].update(k4(11), q8(1))
        assert run("same_pointer", 11, 77) == 1077
        assert km["hash"].lookup(k4(11)) == q8(77)

        # a program's update of a per-CPU map sets the current CPU's value only
        km["phash"].update(k4(20), [q8(5)] * NCPU)
        assert run("upd_phash", 20, 9) == 0
        assert km["phash"].lookup(k4(20)) == [q8(9)] + [q8(5)] * (NCPU - 1)
        assert run("upd_phash", 21, 4) == 0
        assert km["phash"].lookup(k4(21)) == [q8(4)] + [q8(0)] * (NCPU - 1)
        # bpf_map_lookup_percpu_elem: any CPU's slot, written back to that slot
        cpu = NCPU - 1
        assert run("inc_percpu_slot", 5, 3, cpu) == 3
        assert run("inc_percpu_slot", 5, 3, cpu) == 6
        assert n8(km["parr"].lookup(k4(5))[cpu]) == 6
        assert run("inc_percpu_slot", 5, 3, NCPU) == -1

        # queue: push and pop from either side
        assert run("push_q", 0, 11) == 0
        km["queue"].update(None, q8(22))
        assert km["queue"].pop() == q8(11)
        assert run("pop_q") == 22
        assert run("pop_q") == -1
        assert sum(obj.maps[n].lost for n in MODES) == 0


def test_syscall_bridged_global_data_is_not_directly_addressable(progs_obj, kmap):
    """Direct value access needs memory: the verifier refuses a syscall-mode .bss with its message."""
    modes = dict(MODES, **{".bss": "syscall"})
    km = kernel_maps_for(progs_obj, kmap, modes)
    with pytest.raises(VerifierError, match="has no directly addressable value"):
        bridged_object(progs_obj, km, modes)


# --- concurrency -------------------------------------------------------------------------------


def _kernel_adder(map_fd: int, slot: int):
    """A kernel program adding 1 to ``slot`` of an array map with an atomic add, run by BPF_PROG_TEST_RUN."""
    from hybrid.user import isa
    from hybrid.user.asm import assemble

    code = isa.encode([isa.lddw(1, map_fd, src=isa.PSEUDO_MAP_FD)]) + assemble("""
        stw [%%r10-4], %d
        mov %%r2, %%r10
        add %%r2, -4
        call 1
        jeq %%r0, 0, out
        mov %%r1, 1
        lock add [%%r0], %%r1
        out:
        mov %%r0, 0
        exit
    """ % slot)
    insns, lic = ctypes.create_string_buffer(code), ctypes.create_string_buffer(b"GPL")
    log = ctypes.create_string_buffer(1 << 16)
    try:
        fd = _bpf(BPF_PROG_LOAD, _ProgLoadAttr(1, len(code) // 8, ctypes.addressof(insns), ctypes.addressof(lic), 1,
                                               len(log), ctypes.addressof(log)))  # SOCKET_FILTER
    except OSError as e:
        pytest.skip("cannot load a kernel program here: %s %s" % (e, log.value.decode()[-300:]))
    data = ctypes.create_string_buffer(64)

    def run(repeat: int) -> None:
        _bpf(BPF_PROG_TEST_RUN, _TestRunAttr(fd, 0, 64, 0, ctypes.addressof(data), 0, repeat, 0))

    return fd, run


def test_mmap_array_atomic_adds_from_both_sides(kmap, regions):
    """Two C threads (hybrid_test_count: lookup + atomic add), two Python threads running a JIT
    program, a kernel program (BPF_PROG_TEST_RUN) adding to the same slots, and a bpf() writer on
    a key of its own: every add counted."""
    from hybrid.user import isa
    from hybrid.user.asm import assemble
    from hybrid.user.engine import create_engine
    from hybrid.user.helpers import BASE_HELPERS, MAP_HELPERS
    from hybrid.user.program import Program

    km = kmap(MapType.ARRAY, 4, 8, 8, BPF_F_MMAPABLE)
    r = regions(km.spec("counts", "mmap"))
    m = r["counts"]
    code = isa.encode([isa.lddw(1, 0, src=isa.PSEUDO_MAP_IDX)]) + assemble("""
        stw [%r10-4], 0
        mov %r2, %r10
        add %r2, -4
        call 1
        jeq %r0, 0, out
        mov %r1, 1
        lock add [%r0], %r1
        out:
        mov %r0, 0
        exit
    """)
    prog = Program.load(code, helpers={**BASE_HELPERS, **MAP_HELPERS}, maps=r.map_refs(), regions=r.mem_regions())
    assert prog.maps[0].inline_array is not None  # the JIT inlines it: plain memory
    kfd, krun = _kernel_adder(km.fd, 0)
    iters, runs, jit_runs = 300_000, 20, 20_000
    errors = []
    stop = threading.Event()
    last = [0]

    def c_thread(seed):
        errors.append(lib.hybrid_test_count(m._p(), 4, iters, seed))

    def jit_thread(eng):
        for _ in range(jit_runs):
            eng.run_ptr(0, 0)

    def kernel_thread():
        for _ in range(runs):
            krun(10_000)

    def writer():
        i = 0
        while not stop.is_set():
            i += 1
            assert km.update(k4(7), q8(i)) == 0
            last[0] = i

    try:
        with create_engine("jit", prog) as e1, create_engine("jit", prog) as e2:
            threads = [threading.Thread(target=c_thread, args=(s,)) for s in (1, 2)]
            threads += [threading.Thread(target=jit_thread, args=(e,)) for e in (e1, e2)]
            threads += [threading.Thread(target=kernel_thread)]
            w = threading.Thread(target=writer)
            w.start()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            stop.set()
            w.join()
    finally:
        os.close(kfd)
    assert errors == [0, 0]
    values = [n8(km.lookup(k4(i))) for i in range(8)]
    assert sum(values[:4]) == 2 * iters + 2 * jit_runs + runs * 10_000
    assert values[7] == last[0] > 0 and values[4:7] == [0, 0, 0]
    assert [n8(m.lookup(k4(i))) for i in range(8)] == values


def test_syscall_hash_distinct_keys_per_side(kmap, regions):
    """Syscall mode is exact when each side has its keys: C loops here, bpf() writes there."""
    km = kmap(MapType.HASH, 4, 8, 64)
    m = regions(km.spec("h"))["h"]
    stop = threading.Event()
    written = [0]

    def kernel_side():
        i = 0
        while not stop.is_set():
            i += 1
            km.update(k4(50), q8(i))
            written[0] = i

    t = threading.Thread(target=kernel_side)
    t.start()
    try:
        assert lib.hybrid_test_count(m._p(), 4, 20_000, 7) == 0
    finally:
        stop.set()
        t.join()
    values = {n8(k): n8(v) for k, v in m.items()}
    assert sum(v for k, v in values.items() if k < 4) == 20_000
    assert values[50] == written[0]
    assert m.lost == 0


# --- another process --------------------------------------------------------------------------

CHILD = r"""
import sys
from hybrid.native import _native
from hybrid.user.maps import Region

lib, ffi = _native().lib, _native().ffi
r = Region.open(sys.argv[1])
a, h = r["arr"], r["h"]
print(a.bridge, h.bridge, a.kernel_id, h.kernel_id)
print(int.from_bytes(a.lookup((3).to_bytes(4, "little")), "little"),
      int.from_bytes(h.lookup((1).to_bytes(4, "little")), "little"))
a.update((4).to_bytes(4, "little"), (444).to_bytes(8, "little"))
h.update((2).to_bytes(4, "little"), (222).to_bytes(8, "little"))
p = ffi.cast("uint64_t *", lib.hybrid_map_lookup(h._p(), (1).to_bytes(4, "little")))
p[0] += 1
lib.hybrid_bridge_flush()
ffi.cast("uint64_t *", lib.hybrid_map_lookup(a._p(), (3).to_bytes(4, "little")))[0] += 1
r.close()
"""


def test_region_open_in_another_process(kmap, regions):
    ka = kmap(MapType.ARRAY, 4, 8, 8, BPF_F_MMAPABLE)
    kh = kmap(MapType.HASH, 4, 8, 8)
    r = regions(ka.spec("arr", "mmap"), MapSpec("own", MapType.HASH, 4, 8, 4), kh.spec("h"))
    ka.update(k4(3), q8(33))
    kh.update(k4(1), q8(11))
    out = subprocess.run([sys.executable, "-c", CHILD, r.name], capture_output=True, text=True, cwd=ROOT,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["mmap", "syscall", str(ka.id), str(kh.id), "33", "11"]
    assert ka.lookup(k4(4)) == q8(444) and ka.lookup(k4(3)) == q8(34)
    assert kh.lookup(k4(2)) == q8(222) and kh.lookup(k4(1)) == q8(12)
    assert r["arr"].lookup(k4(4)) == q8(444) and r["h"].lookup(k4(2)) == q8(222)


# --- the agent: programs attached in a traced process, and in this process ------------------

AGENT_PROG = r"""
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

char LICENSE[] SEC("license") = "GPL";

struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 4);
    __type(key, u32);
    __type(value, u64);
} calls SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 64);
    __type(key, u32);
    __type(value, u64);
} per_thread SEC(".maps");

SEC("uprobe/%(target)s")
int BPF_KPROBE(on_add, long a, long b)
{
    u32 zero = 0, k = b;
    u64 one = 1, *p;

    p = bpf_map_lookup_elem(&calls, &zero);       /* mmap: kernel memory, atomic */
    if (p)
        __sync_fetch_and_add(p, 1);
    p = bpf_map_lookup_elem(&per_thread, &k);     /* syscall: this thread's key only */
    if (p)
        *p += 1;
    else
        bpf_map_update_elem(&per_thread, &k, &one, BPF_NOEXIST);
    return 0;
}
"""

AGENT_MODES = {"calls": "mmap", "per_thread": "syscall"}


@pytest.fixture(scope="module")
def workload(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("workload") / "workload"
    subprocess.run(["gcc", "-O2", "-g", "-pthread", "-o", str(out),
                    str(ROOT / "tests" / "user" / "attach" / "workload.c")], check=True)
    return str(out)


@pytest.mark.skipif(os.geteuid() != 0, reason="attaching to other processes needs root (ptrace)")
def test_agent_in_launched_process(bpf_build, kmap, workload):
    path = bpf_build.source("native_bridge_agent", AGENT_PROG % {"target": workload + ":add"})
    km = kernel_maps_for(path, kmap, AGENT_MODES)
    threads, calls = 4, 20_000
    with bridged_object(path, km, AGENT_MODES) as obj:
        with obj.launch([workload, "add", str(threads), str(calls)], stdout=subprocess.PIPE, text=True) as p:
            out, _ = p.popen.communicate(timeout=120)
            assert p.returncode == 0, out
        assert obj.maps["per_thread"].lost == 0
    assert n8(km["calls"].lookup(k4(0))) == threads * calls
    assert {n8(k): n8(km["per_thread"].lookup(k)) for k in km["per_thread"].keys()} == \
        {t: calls for t in range(threads)}


LIB_C = r"""
__attribute__((noinline, optimize("O0"))) long lib_add(long a, long b) { return a + b; }
long lib_loop(long n, long b) { long s = 0; for (long i = 0; i < n; i++) s += lib_add(i, b); return s; }
"""


@pytest.mark.parametrize("engine", ["jit", "aot"])
def test_agent_in_this_process(bpf_build, kmap, tmp_path, engine):
    """Library mode: the region is mapped here already, with its overlay; the agent takes it as ours."""
    src, so = tmp_path / "lib.c", tmp_path / "libbridge.so"
    src.write_text(LIB_C)
    subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", str(so), str(src)], check=True)
    h = ctypes.CDLL(str(so))
    h.lib_loop.restype = ctypes.c_long
    h.lib_loop.argtypes = [ctypes.c_long, ctypes.c_long]
    path = bpf_build.source("native_bridge_lib_" + engine, AGENT_PROG % {"target": "%s:lib_add" % so})
    km = kernel_maps_for(path, kmap, AGENT_MODES)
    with bridged_object(path, km, AGENT_MODES) as obj:
        att = obj.attach(engine=engine)
        try:
            h.lib_loop(1000, 3)
            h.lib_loop(500, 5)
        finally:
            att.detach()
    assert n8(km["calls"].lookup(k4(0))) == 1500
    assert {n8(k): n8(km["per_thread"].lookup(k)) for k in km["per_thread"].keys()} == {3: 1000, 5: 500}


def test_agent_region_command_attaches_and_fails_clearly(kmap, tmp_path):
    """The agent's `region` command in a process that has not mapped the region: overlays
    applied (a program's view is the kernel's), and a missing kernel map fails the spec."""
    km = kmap(MapType.ARRAY, 4, 8, 4, BPF_F_MMAPABLE)
    script = textwrap.dedent(r"""
        import ctypes, sys
        from hybrid.native import _native
        lib, ffi = _native().lib, _native().ffi
        addr, size, path = int(sys.argv[1], 0), int(sys.argv[2]), sys.argv[3]
        err = ffi.new("char[1024]")
        rc = lib.hybrid_agent_apply(("region %#x %d %s\n" % (addr, size, path)).encode(), err, len(err))
        print(rc, ffi.string(err).decode())
        if rc == 0:
            for line in open("/proc/self/maps"):
                if "bpf-map" in line and addr <= int(line.split("-")[0], 16) < addr + size:
                    v = ctypes.c_uint64.from_address(int(line.split("-")[0], 16) + 8).value
                    print("overlay", v)
    """)
    with Region([km.spec("arr", "mmap")]) as r:
        km.update(k4(1), q8(4242))
        out = subprocess.run([sys.executable, "-c", script, hex(r.base), str(r.size), r.path], capture_output=True,
                             text=True, cwd=ROOT, timeout=60)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split("\n")[:2] == ["0 ", "overlay 4242"]
    # a region file whose kernel map is gone (nothing holds it: no fd, no mapping)
    with Region([km.spec("arr", "mmap")], keep=True) as bad:
        base, size, path = bad.base, bad.size, bad.path
    km.close()
    try:
        out = subprocess.run([sys.executable, "-c", script, hex(base), str(size), path], capture_output=True,
                             text=True, cwd=ROOT, timeout=60)
    finally:
        os.unlink(path)
    assert out.returncode == 0, out.stderr
    assert "map 'arr': kernel map id %d does not exist" % km.id in out.stdout
    assert out.stdout.startswith("-%d " % E.ENOENT)
