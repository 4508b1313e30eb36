"""eBPF maps in shared memory, seen from Python.

A :class:`Region` is one shared memory file holding the maps of a loaded
object.  The owner creates it from a list of :class:`MapSpec`; another
process (e.g. an agent injected into a traced process) opens the same file
by name with :meth:`Region.open` and sees the same maps, mapped at another
address.  Programs refer to a map by :attr:`Map.address`, the address of the
map's header in this process (what ``lddw r1, map`` resolves to); the map
helpers (``hybrid/native/maps.c``, ``ring.c``) take that address in ``r1``.

Every map type has a class (``Map.for_type(t)``), all thin wrappers over
the C functions of ``hybrid._native``: keys and values are ``bytes`` (any
bytes-like object is accepted), their lengths are checked here, and every
failure is a :class:`~hybrid.errors.MapError` carrying the kernel's errno.

The semantics are the kernel's ``bpf(2)`` syscall commands: ``lookup`` copies
the value out (a consistent snapshot for hash maps), ``update`` takes
``BPF_ANY``/``BPF_NOEXIST``/``BPF_EXIST``, iteration follows
``BPF_MAP_GET_NEXT_KEY``.  Per-CPU maps take and return one value per
*possible* CPU.

A map can be backed by a kernel map (``MapSpec.bridge`` "mmap" or
"syscall", ``MapSpec.kernel_id``): the same classes and calls then show
and change the kernel map's contents (semantics in ``hybrid/native/maps.c``).
Every process that maps the region attaches the bridges (mmap overlays,
fds); :attr:`Map.bridge` and :attr:`Map.kernel_id` say which map is one.
"""

from __future__ import annotations

import errno as E
import itertools
import os
import sys
import threading
import time
import weakref
from enum import IntEnum
from typing import Callable, ClassVar, Iterator, Sequence

from hybrid.closable import Closable
from hybrid.errors import MapError
from hybrid.native import _native
from hybrid.user.mapspec import BRIDGE_MODES, BRIDGE_NAMES, MapAccess, MapSpec, map_type_name  # noqa: F401 - MapSpec is API

_mod = _native()
ffi, lib = _mod.ffi, _mod.lib


class MapType(IntEnum):
    """Kernel map type numbers (``enum bpf_map_type``) that hybrid implements."""

    HASH = 1
    ARRAY = 2
    PROG_ARRAY = 3
    PERF_EVENT_ARRAY = 4
    PERCPU_HASH = 5
    PERCPU_ARRAY = 6
    STACK_TRACE = 7
    LRU_HASH = 9
    LRU_PERCPU_HASH = 10
    LPM_TRIE = 11
    ARRAY_OF_MAPS = 12
    HASH_OF_MAPS = 13
    QUEUE = 22
    STACK = 23
    RINGBUF = 27
    BLOOM_FILTER = 30


# update flags
BPF_ANY, BPF_NOEXIST, BPF_EXIST = 0, 1, 2
# map_flags
BPF_F_NO_PREALLOC = 1 << 0
BPF_F_NO_COMMON_LRU = 1 << 1
BPF_F_NUMA_NODE = 1 << 2
BPF_F_RDONLY = 1 << 3
BPF_F_WRONLY = 1 << 4
BPF_F_ZERO_SEED = 1 << 6
BPF_F_RDONLY_PROG = 1 << 7
BPF_F_WRONLY_PROG = 1 << 8
BPF_F_MMAPABLE = 1 << 10
BPF_F_INNER_MAP = 1 << 12
# get_stackid flags
BPF_F_FAST_STACK_CMP = 1 << 9
BPF_F_REUSE_STACKID = 1 << 10
# perf_event_output
BPF_F_CURRENT_CPU = 0xFFFFFFFF
# ring buffer
BPF_RB_NO_WAKEUP = 1 << 0
BPF_RB_FORCE_WAKEUP = 1 << 1
BPF_RB_AVAIL_DATA, BPF_RB_RING_SIZE, BPF_RB_CONS_POS, BPF_RB_PROD_POS = 0, 1, 2, 3

SHM_DIR = "/dev/shm"
PAGE = 4096
_RING_TYPES = (MapType.RINGBUF, MapType.PERF_EVENT_ARRAY)


def _parse_cpu_list(text: str) -> int:
    """``"0-3,8-11"`` -> 12: one more than the highest CPU number."""
    top = -1
    for part in text.strip().split(","):
        if part:
            top = max(top, int(part.rpartition("-")[2]))
    return top + 1


_possible: int | None = None


def possible_cpus() -> int:
    """Number of per-CPU slots: the highest *possible* CPU number + 1.

    Read from ``/sys/devices/system/cpu/possible`` (as libbpf does), so
    CPUs that come online later have their slot.  Falls back to
    ``os.cpu_count()``.
    """
    global _possible
    if _possible is None:
        try:
            with open("/sys/devices/system/cpu/possible", encoding="ascii") as f:
                _possible = _parse_cpu_list(f.read())
        except (OSError, ValueError):
            _possible = os.cpu_count() or 1
    return _possible


def _type_name(t: int) -> str:
    return map_type_name(t)


def _bytes(data, what: str) -> bytes:
    if isinstance(data, bytes):
        return data
    if isinstance(data, (bytearray, memoryview)):
        return bytes(data)
    raise TypeError("%s must be bytes, not %s" % (what, type(data).__name__))


# ---------------------------------------------------------------------------
# regions

_counter = itertools.count()
_regions: dict[int, "Region"] = {}  # base address -> open region of this process
_maps_by_address: dict[int, "Map"] = {}
_registry_lock = threading.Lock()
_bridge_fd_users: dict[int, int] = {}  # kernel map id -> open regions of this process bridging it (syscall mode)


def _bridge_attach(maps: list) -> list[int]:
    """Attach the bridged maps of a region just mapped here; returns the syscall-mode kernel ids.

    On a failure the fds cached so far are released and MapError names the map; the caller
    unmaps the region (which removes the mmap overlays).
    """
    ids: list[int] = []
    err = ffi.new("char[512]")
    try:
        for spec, ptr in maps:
            if not spec.bridge:
                continue
            rc = lib.hybrid_map_attach_bridge(ptr, err, len(err))
            if rc < 0:
                op = "(%s) %s bridge to kernel map %d" % (_type_name(spec.type), spec.bridge, spec.kernel_id)
                raise MapError(-rc, spec.name, op, ffi.string(err).decode(errors="replace") or None)
            if spec.bridge == "syscall":
                ids.append(spec.kernel_id)
                with _registry_lock:
                    _bridge_fd_users[spec.kernel_id] = _bridge_fd_users.get(spec.kernel_id, 0) + 1
    except BaseException:
        _bridge_detach(ids)
        raise
    if ids:
        from hybrid.user import engine

        engine.enable_bridge_flush(lib.hybrid_bridge_flush)
    return ids


def _bridge_detach(ids: Sequence[int]) -> None:
    """A region is gone: close this process's fds of kernel maps no other open region bridges."""
    for kid in ids:
        with _registry_lock:
            n = _bridge_fd_users.get(kid, 0) - 1
            if n > 0:
                _bridge_fd_users[kid] = n
                continue
            _bridge_fd_users.pop(kid, None)
        lib.hybrid_bridge_release(kid)


def map_at(address: int) -> "Map | None":
    """The open map whose header is at ``address`` in this process, if any."""
    return _maps_by_address.get(address)


def region_containing(address: int, size: int = 1) -> "Region | None":
    """The open region of this process holding ``[address, address + size)``."""
    for base, region in list(_regions.items()):
        if base <= address and address + size <= base + region.size:
            return region
    return None


def _cleanup(fd: int, path: str | None, unlink: bool, pid: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
    if unlink and path and os.getpid() == pid:
        try:
            os.unlink(path)
        except OSError:
            pass


class Region(Closable):
    """A shared memory region holding maps.

    ``Region(specs)`` creates one (this process is the owner): a new file
    ``/dev/shm/hybrid.<pid>.<n>`` (mode 0600, created exclusively), or an
    anonymous memfd with ``memfd=True`` (others open it as
    ``/proc/<pid>/fd/<fd>``).  The owner unlinks the file on :meth:`close`
    unless ``keep=True``.  ``Region.open(name_or_path)`` maps an existing
    region.  Maps are reached by name (``region["counts"]``) or index.

    Closing unmaps the memory: map objects then raise ``MapError(EBADF)``,
    and native code must no longer use their addresses.
    """

    def __init__(self, specs: Sequence[MapSpec], *, name: str | None = None, memfd: bool = False,
                 keep: bool = False, nr_cpus: int | None = None, stats_progs: int = 0, stats_enabled: bool = False):
        from hybrid.user import stats

        self.nr_cpus = nr_cpus or possible_cpus()
        specs = [s.resolved(self.nr_cpus) for s in specs]
        names = [s.name for s in specs]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise MapError(E.EINVAL, sorted(dup)[0], "create", "two maps with the same name")
        offsets, total = self._layout(specs, self.nr_cpus)
        # the programs' run counts (hybrid/user/stats.py) after the maps, on pages of their own
        self.stats_offset = self.stats_size = 0
        if stats_progs:
            self.stats_offset = total
            self.stats_size = stats.size(stats_progs, self.nr_cpus)
            total += (self.stats_size + PAGE - 1) // PAGE * PAGE
        self.owner = True
        self._pid = os.getpid()
        self._bridge_ids: list[int] = []
        self.name, self.path, self._fd = self._create_file(name, memfd, total)
        unlink = not keep and not memfd
        try:
            # the pages under mmap overlays are never used: do not populate them in the file
            self._map(total, populate=not any(s.bridge == "mmap" for s in specs))
            lib.hybrid_region_init(self._base, total, len(specs), self.nr_cpus)
            maps = []
            for i, (spec, off) in enumerate(zip(specs, offsets)):
                ptr = ffi.cast("char *", self._base) + off
                rc = lib.hybrid_map_init(ptr, off, spec.type, spec.key_size, spec.value_size, spec.max_entries,
                                         spec.flags, spec.map_extra, self.nr_cpus, i + 1, spec.name.encode(),
                                         BRIDGE_MODES[spec.bridge], spec.kernel_id)
                if rc:
                    raise MapError(-rc, spec.name, "(%s) create" % _type_name(spec.type), _create_detail(spec, -rc))
                mp = ffi.cast("struct hybrid_map *", ptr)
                if spec.inner is not None:
                    inn = spec.inner
                    rc = lib.hybrid_map_set_inner(mp, inn.type, inn.key_size, inn.value_size, inn.max_entries,
                                                  inn.flags)
                    if rc:
                        raise MapError(-rc, spec.name, "(%s) create" % _type_name(spec.type),
                                       "invalid inner map template %s" % (inn,))
                elif spec.type in (MapType.ARRAY_OF_MAPS, MapType.HASH_OF_MAPS):
                    raise MapError(E.EINVAL, spec.name, "(%s) create" % _type_name(spec.type),
                                   "a map of maps needs an inner map template (MapSpec.inner)")
                lib.hybrid_region_set_map(self._base, i, off)
                maps.append((spec, mp))
            if stats_progs:
                stats.init(ffi.buffer(ffi.cast("char *", self._base) + self.stats_offset, self.stats_size),
                           stats_progs, self.nr_cpus, stats_enabled)
            lib.hybrid_region_publish(self._base)
            self._bridge_ids = _bridge_attach(maps)
        except BaseException:
            self._teardown(unlink=True)
            raise
        self._finalizer = weakref.finalize(self, _cleanup, self._fd, self.path, unlink, self._pid)
        self._unlink = unlink
        self._setup_maps(maps)
        try:
            self._initialise(specs)
        except BaseException:
            self.close()
            raise

    def _initialise(self, specs: Sequence[MapSpec]) -> None:
        """Initial contents from the object: global data values, map-in-map slots (``.values``)."""
        for spec, m in zip(specs, self._maps):
            initial = getattr(spec, "initial", None)
            if initial is not None and not spec.bridge:  # a kernel map has its contents already
                m.update(b"\0\0\0\0", initial)
            for i, inner in enumerate(getattr(spec, "values", ()) or ()):
                if isinstance(inner, MapSpec) and isinstance(m, MapOfMaps):
                    m.update(i.to_bytes(4, "little"), self[inner.name])

    @staticmethod
    def _layout(specs: Sequence[MapSpec], nr_cpus: int) -> tuple[list[int], int]:
        off = int(lib.hybrid_region_header_size(len(specs)))
        offsets = []
        for spec in specs:
            size = lib.hybrid_map_size(spec.type, spec.key_size, spec.value_size, spec.max_entries,
                                       spec.flags, spec.map_extra, nr_cpus, BRIDGE_MODES[spec.bridge])
            if size < 0:
                raise MapError(-size, spec.name, "(%s) create" % _type_name(spec.type), _create_detail(spec, -size))
            # rings, and mmap bridges (their storage, the next page, is the kernel map's pages)
            align = PAGE if spec.type in _RING_TYPES or spec.bridge == "mmap" else 64
            off = (off + align - 1) // align * align
            offsets.append(off)
            off += size
        return offsets, (off + PAGE - 1) // PAGE * PAGE

    @staticmethod
    def _create_file(name: str | None, memfd: bool, size: int) -> tuple[str, str, int]:
        pid = os.getpid()
        if memfd:
            fd = os.memfd_create(name or "hybrid.%d.%d" % (pid, next(_counter)), os.MFD_CLOEXEC)
            path = "/proc/%d/fd/%d" % (pid, fd)
            name = path
        else:
            while True:
                n = name or "hybrid.%d.%d" % (pid, next(_counter))
                path = os.path.join(SHM_DIR, n)
                try:
                    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                except FileExistsError:
                    if name is not None:
                        raise MapError(E.EEXIST, None, "create region %s" % path, "file exists") from None
                    continue
                except OSError as e:
                    raise MapError(e.errno or E.EIO, None, "create region %s" % path, e.strerror) from None
                name = n
                break
        try:
            os.ftruncate(fd, size)
        except OSError as e:
            os.close(fd)
            if not memfd:
                os.unlink(path)
            raise MapError(e.errno or E.EIO, None, "create region %s" % path, e.strerror) from None
        return name, path, fd

    @classmethod
    def open(cls, name_or_path: str, *, timeout: float = 1.0) -> "Region":
        """Map an existing region: a name in /dev/shm, or a path (e.g. /proc/<pid>/fd/<fd>).

        Waits up to ``timeout`` seconds for a region its owner is still
        initialising.
        """
        self = cls.__new__(cls)
        path = name_or_path if "/" in name_or_path else os.path.join(SHM_DIR, name_or_path)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise MapError(e.errno or E.EIO, None, "open region %s" % path, e.strerror) from None
        self.owner, self._pid, self._fd, self._unlink = False, os.getpid(), fd, False
        self.name, self.path = name_or_path, path
        self.stats_offset = self.stats_size = 0  # known from the registry record, not the file
        self._bridge_ids = []
        try:
            total = os.fstat(fd).st_size
            self._map(total)
            deadline = time.monotonic() + timeout
            while (n := lib.hybrid_region_check(self._base, total)) == -E.EAGAIN and time.monotonic() < deadline:
                time.sleep(0.005)
            if n < 0:
                raise MapError(-n, None, "open region %s" % path,
                               "not an initialised hybrid region" if n in (-E.EINVAL, -E.EAGAIN) else None)
            self.nr_cpus = int(lib.hybrid_region_nr_cpus(self._base))
            maps = []
            desc = ffi.new("struct hybrid_map_desc *")
            for i in range(n):
                mp = lib.hybrid_region_map(self._base, i)
                if lib.hybrid_map_describe(mp, desc):
                    raise MapError(E.EINVAL, None, "open region %s" % path, "map %d is corrupt" % i)
                maps.append((_spec_from_desc(desc), mp))
            self._bridge_ids = _bridge_attach(maps)
        except BaseException:
            self._teardown(unlink=False)
            raise
        self._finalizer = weakref.finalize(self, _cleanup, fd, None, False, self._pid)
        self._setup_maps(maps)
        return self

    def _map(self, total: int, populate: bool = True) -> None:
        self.size = total
        self._base = lib.hybrid_shm_map(self._fd, total, int(populate), _placement_hint(total))
        if self._base == ffi.NULL:
            err = ffi.errno or E.ENOMEM
            raise MapError(err, None, "map region %s" % self.path, os.strerror(err))
        self.base = int(ffi.cast("uintptr_t", self._base))

    def _teardown(self, unlink: bool) -> None:
        base = getattr(self, "_base", ffi.NULL)
        if base != ffi.NULL:
            lib.hybrid_shm_unmap(base, self.size)
            self._base = ffi.NULL
        _cleanup(self._fd, self.path if self.owner else None, unlink, self._pid)

    def _setup_maps(self, maps: list) -> None:
        self._maps: list[Map] = []
        self._by_name: dict[str, Map] = {}
        self._by_offset: dict[int, Map] = {}
        self.closed = False
        for i, (spec, ptr) in enumerate(maps):
            m = Map.for_type(spec.type)(self, i, spec, ptr)
            self._maps.append(m)
            self._by_name[spec.name] = m
            self._by_offset[m.address - self.base] = m
        with _registry_lock:
            _regions[self.base] = self
            for m in self._maps:
                _maps_by_address[m.address] = m

    # --- access ---------------------------------------------------------------

    @property
    def maps(self) -> tuple["Map", ...]:
        return tuple(self._maps)

    def __getitem__(self, key: str | int) -> "Map":
        try:
            return self._maps[key] if isinstance(key, int) else self._by_name[key]
        except (KeyError, IndexError):
            raise KeyError("region %s has no map %r" % (self.name, key)) from None

    def get(self, name: str) -> "Map | None":
        return self._by_name.get(name)

    def __iter__(self) -> Iterator["Map"]:
        return iter(self._maps)

    def __len__(self) -> int:
        return len(self._maps)

    def map_at_offset(self, off: int) -> "Map | None":
        return self._by_offset.get(off)

    def map_refs(self) -> dict:
        """``{index: MapRef}`` of every map, for ``Program.load(maps=...)`` (lddw map index/fd = index)."""
        return {i: m.ref() for i, m in enumerate(self._maps)}

    def mem_regions(self) -> tuple:
        """The region as a ``MemRegion``, for ``Program.load(regions=...)`` (the interpreter's checks)."""
        from hybrid.user.program import MemRegion

        return (MemRegion(self.base, self.size, "maps of region %s" % self.name),)

    def attach(self, memory) -> None:
        """Let an interpreter's :class:`~hybrid.user.interp.Memory` access the region."""
        memory.add(self.base, self.size, "maps of region %s" % self.name)

    # --- lifetime -------------------------------------------------------------

    def close(self) -> None:
        """Unmap the region (and, for the owner without ``keep``, unlink the file)."""
        if self.closed:
            return
        self.closed = True
        with _registry_lock:
            _regions.pop(self.base, None)
            for m in self._maps:
                _maps_by_address.pop(m.address, None)
                m._ptr = None
        lib.hybrid_shm_unmap(self._base, self.size)  # the mmap overlays of bridged maps with it
        self._base = ffi.NULL
        _bridge_detach(self._bridge_ids)
        self._bridge_ids = []
        self._finalizer()

    def __repr__(self) -> str:
        return "<Region %s: %d maps, %d bytes%s>" % (self.name, len(self._maps), self.size,
                                                    ", closed" if self.closed else "")


# Where regions are placed.  Compiled programs embed the addresses of their
# maps, so a traced process must map a region at the address it has here.
# Executables (PIE at 0x55..-0x56..) and the mmap area (0x7f..) stay clear
# of this range, so the same range is almost always free in the target too.
PLACEMENT_LOW = 0x5100_0000_0000
PLACEMENT_HIGH = 0x5400_0000_0000
_PLACEMENT_ALIGN = 1 << 21


def _placement_hint(size: int) -> int:
    import random

    slots = (PLACEMENT_HIGH - PLACEMENT_LOW - size) // _PLACEMENT_ALIGN
    return PLACEMENT_LOW + random.randrange(max(slots, 1)) * _PLACEMENT_ALIGN


def _spec_from_desc(d) -> MapSpec:
    inner = None
    if d.inner_type:
        inner = MapSpec("inner", d.inner_type, d.inner_key_size, d.inner_value_size, d.inner_max_entries,
                        d.inner_flags)
    return MapSpec(ffi.string(d.name).decode(errors="replace"), d.type, d.key_size, d.value_size,
                   d.max_entries, d.map_flags, d.map_extra, inner, kernel_id=d.kernel_id,
                   bridge=BRIDGE_NAMES.get(d.bridge, ""))


def _create_detail(spec: MapSpec, err: int) -> str:
    t = spec.type
    if t not in MapType.__members__.values():
        return "unknown map type %d" % t
    if err == E.E2BIG:
        return "too large: key_size %d, value_size %d, max_entries %d" % (spec.key_size, spec.value_size,
                                                                          spec.max_entries)
    hints = {
        MapType.ARRAY: "key_size must be 4, value_size and max_entries > 0",
        MapType.PERCPU_ARRAY: "key_size must be 4, value_size and max_entries > 0",
        MapType.PROG_ARRAY: "key_size and value_size must be 4",
        MapType.ARRAY_OF_MAPS: "key_size and value_size must be 4",
        MapType.HASH_OF_MAPS: "value_size must be 4",
        MapType.PERF_EVENT_ARRAY: "key_size and value_size must be 4; map_extra (ring size) a power of 2 "
                                  ">= 4096",
        MapType.LPM_TRIE: "key_size must be 4 + 1..256 data bytes and flags must include BPF_F_NO_PREALLOC",
        MapType.STACK_TRACE: "key_size must be 4, value_size a multiple of 8",
        MapType.QUEUE: "key_size must be 0", MapType.STACK: "key_size must be 0",
        MapType.BLOOM_FILTER: "key_size must be 0; map_extra (number of hashes) <= 15",
        MapType.RINGBUF: "key_size and value_size must be 0, max_entries a power-of-2 multiple of 4096",
    }
    return "invalid attributes (%s): %s" % (
        ", ".join("%s=%s" % (f, getattr(spec, f)) for f in ("key_size", "value_size", "max_entries", "flags",
                                                             "map_extra")),
        hints.get(t, "key_size and value_size must be > 0, flags valid for the type"))


# ---------------------------------------------------------------------------
# maps

_ERRNO_DETAIL = {
    ("update", E.E2BIG): "map is full (max_entries {max_entries})",
    ("update", E.EEXIST): "key exists (BPF_NOEXIST)",
    ("update", E.ENOENT): "no such key (BPF_EXIST)",
    ("update", E.ENOSPC): "map is full (max_entries {max_entries})",
    ("delete", E.ENOENT): "no such key",
    ("push", E.E2BIG): "map is full (max_entries {max_entries})",
}


class Map(MapAccess):
    """One map of a region.  Subclasses per family; ``Map.for_type(t)`` finds the class.

    ``address`` is the header's address in this process (what programs get
    for the map); ``spec`` the map's :class:`MapSpec`.
    """

    _classes: ClassVar[dict[int, type["Map"]]] = {}
    _c_value_size: int  # bytes the C update reads from `value`

    def __init__(self, region: Region, index: int, spec: MapSpec, ptr):
        self.region = region
        self.index = index
        self.spec = spec
        self.name = spec.name
        self.type = spec.type
        self.key_size = spec.key_size
        self.value_size = spec.value_size
        self.max_entries = spec.max_entries
        self.flags = spec.flags
        self.id = index + 1
        self._ptr = ptr
        self.address = int(ffi.cast("uintptr_t", ptr))
        self._c_value_size = spec.value_size
        self._out_size = spec.value_size

    @property
    def _out_size(self) -> int:
        return self.__out_size

    @_out_size.setter
    def _out_size(self, n: int) -> None:
        self.__out_size = n
        self._out_t = ffi.typeof("char[%d]" % max(n, 1))

    # --- registry ---------------------------------------------------------------

    @staticmethod
    def for_type(t: int) -> type["Map"]:
        try:
            return Map._classes[t]
        except KeyError:
            raise MapError(E.EINVAL, None, "open map", "unsupported map type %d" % t) from None

    # --- errors -----------------------------------------------------------------

    def _error(self, err: int, op: str, detail: str | None = None) -> MapError:
        if detail is None:
            tmpl = _ERRNO_DETAIL.get((op, err))
            detail = tmpl.format(max_entries=self.max_entries) if tmpl else None
        return MapError(err, self.name, "(%s) %s" % (_type_name(self.type), op), detail)

    def _p(self):
        p = self._ptr
        if p is None:
            raise self._error(E.EBADF, "access", "region %s is closed" % self.region.name)
        return p

    def _key(self, key, op: str) -> bytes:
        key = _bytes(key, "key")
        if len(key) != self.key_size:
            raise self._error(E.EINVAL, op, "key is %d bytes, key_size is %d" % (len(key), self.key_size))
        return key

    def _value(self, value, op: str, size: int | None = None) -> bytes:
        value = _bytes(value, "value")
        want = self.value_size if size is None else size
        if len(value) != want:
            raise self._error(E.EINVAL, op, "value is %d bytes, value_size is %d" % (len(value), want))
        return value

    # --- the syscall-like API --------------------------------------------------

    # The three calls below are the hot ones from Python: checks inlined, the output type cached.

    def lookup(self, key) -> bytes | None:
        """The value of ``key`` (a copy), or None when there is none."""
        if key.__class__ is not bytes or len(key) != self.key_size:
            key = self._key(key, "lookup")
        out = ffi.new(self._out_t)
        rc = lib.hybrid_map_lookup_copy(self._ptr or self._p(), key, out)
        if rc == 0:
            return ffi.unpack(out, len(out))
        if rc == -E.ENOENT:
            return None
        raise self._error(-rc, "lookup")

    def update(self, key, value, flags: int = BPF_ANY) -> None:
        """Set ``key`` to ``value``; ``flags`` BPF_ANY, BPF_NOEXIST (create only) or BPF_EXIST (replace only)."""
        if key.__class__ is not bytes or len(key) != self.key_size:
            key = self._key(key, "update")
        if value.__class__ is not bytes or len(value) != self.value_size:
            value = self._value(value, "update")
        rc = lib.hybrid_map_update(self._ptr or self._p(), key, value, flags)
        if rc:
            raise self._error(-rc, "update")

    def delete(self, key) -> None:
        """Remove ``key``; MapError(ENOENT) when absent, (EINVAL) for arrays."""
        if key.__class__ is not bytes or len(key) != self.key_size:
            key = self._key(key, "delete")
        rc = lib.hybrid_map_delete(self._ptr or self._p(), key)
        if rc:
            raise self._error(-rc, "delete")

    def next_key(self, key=None) -> bytes | None:
        """``BPF_MAP_GET_NEXT_KEY``: the key after ``key`` (the first with None or an absent key);
        None after the last."""
        if key is not None:
            key = self._key(key, "next_key")
        out = ffi.new("char[]", max(self.key_size, 1))
        rc = lib.hybrid_map_next_key(self._p(), ffi.NULL if key is None else key, out)
        if rc == 0:
            return ffi.buffer(out, self.key_size)[:]
        if rc == -E.ENOENT:
            return None
        raise self._error(-rc, "next_key")

    def __len__(self) -> int:
        return int(lib.hybrid_map_count(self._p()))

    @property
    def bridge(self) -> str:
        """``"mmap"`` or ``"syscall"`` for a map backed by a kernel map; ``""`` for one in the region's memory."""
        return self.spec.bridge

    @property
    def kernel_id(self) -> int:
        """The id of the kernel map backing this map (0: none)."""
        return self.spec.kernel_id

    def ref(self):
        """This map as a ``MapRef`` (what ``lddw`` of the map and of its value resolve to)."""
        from hybrid.user.program import MapRef

        return MapRef(self.name, self.address, self.value_size, self.value_address, self.array_layout())

    @property
    def value_address(self) -> int:
        """Address of the map's values for direct access (``lddw`` map value); 0 when not addressable."""
        return 0

    def array_layout(self):
        """Where the values of an ARRAY / PERCPU_ARRAY are (for inlined lookups); None for other maps."""
        return None

    @property
    def lost(self) -> int:
        """Records that did not fit (ring buffer, perf event array)."""
        return int(lib.hybrid_map_lost(self._p(), 0))

    def __repr__(self) -> str:
        return "<%s %r: key %d, value %d, max_entries %d at %#x>" % (
            type(self).__name__, self.name, self.key_size, self.value_size, self.max_entries, self.address)


def register(*types: int):
    """Class decorator: the class implements these map types."""

    def deco(cls):
        for t in types:
            Map._classes[int(t)] = cls
        return cls

    return deco


@register(MapType.HASH, MapType.LRU_HASH)
class HashMap(Map):
    """HASH and LRU_HASH (an LRU hash evicts instead of failing when full)."""


@register(MapType.ARRAY)
class ArrayMap(Map):
    """ARRAY: u32 index keys, every entry exists (zero at creation); delete is EINVAL."""

    @property
    def value_address(self) -> int:
        """Address of value 0; value i is at ``value_address + i * round_up(value_size, 8)``
        (what ``lddw rX, map_value + off`` resolves to).  0 for a syscall-mode bridge (no memory)."""
        if self.spec.bridge == "syscall":
            return 0
        return int(ffi.cast("uintptr_t", lib.hybrid_map_lookup(self._p(), b"\0\0\0\0")))

    def array_layout(self):
        from hybrid.user.program import ArrayLayout

        if self.spec.bridge == "syscall":
            return None  # lookups go through the helper (a bpf() call)
        return ArrayLayout(self.value_address - self.address, (self.value_size + 7) // 8 * 8, self.max_entries)


@register(MapType.LPM_TRIE)
class LpmTrie(Map):
    """LPM_TRIE: keys are u32 prefixlen (host order) + data; lookup is longest-prefix match."""

    @staticmethod
    def key(prefixlen: int, data: bytes) -> bytes:
        return prefixlen.to_bytes(4, sys.byteorder) + bytes(data)


class _PerCpu(Map):
    """Per-CPU maps: a value per possible CPU (``region.nr_cpus``)."""

    def __init__(self, *a):
        super().__init__(*a)
        self.nr_cpus = self.region.nr_cpus
        self._stride = (self.value_size + 7) // 8 * 8
        self._out_size = self._stride * self.nr_cpus

    def lookup(self, key) -> list[bytes] | None:  # type: ignore[override]
        """One value per possible CPU, or None."""
        key = self._key(key, "lookup")
        out = ffi.new("char[]", self._out_size)
        rc = lib.hybrid_map_lookup_copy(self._p(), key, out)
        if rc == -E.ENOENT:
            return None
        if rc:
            raise self._error(-rc, "lookup")
        raw = ffi.unpack(out, len(out))
        s, n = self._stride, self.value_size
        return [raw[i * s:i * s + n] for i in range(self.nr_cpus)]

    def update(self, key, value, flags: int = BPF_ANY) -> None:  # type: ignore[override]
        """Set every CPU's value: a list of ``nr_cpus`` values, or one value for all."""
        key = self._key(key, "update")
        if isinstance(value, (list, tuple)):
            if len(value) != self.nr_cpus:
                raise self._error(E.EINVAL, "update", "%d values for %d CPUs" % (len(value), self.nr_cpus))
            values = [self._value(v, "update") for v in value]
        else:
            values = [self._value(value, "update")] * self.nr_cpus
        buf = b"".join(v.ljust(self._stride, b"\0") for v in values)
        rc = lib.hybrid_map_update_all_cpus(self._p(), key, buf, flags)
        if rc:
            raise self._error(-rc, "update")

    def sum(self, key) -> int | None:
        """Sum of the CPUs' values read as little-endian unsigned integers (a common counter idiom)."""
        values = self.lookup(key)
        return None if values is None else sum(int.from_bytes(v, "little") for v in values)


@register(MapType.PERCPU_HASH, MapType.LRU_PERCPU_HASH)
class PerCpuHash(_PerCpu):
    """PERCPU_HASH, LRU_PERCPU_HASH."""


@register(MapType.PERCPU_ARRAY)
class PerCpuArray(_PerCpu):
    """PERCPU_ARRAY."""

    def array_layout(self):
        from hybrid.user.program import ArrayLayout

        if self.spec.bridge == "syscall":
            return None  # lookups go through the helper (a bpf() call)

        def value0(cpu: int) -> int:  # value 0 of ``cpu``
            return int(ffi.cast("uintptr_t", lib.hybrid_map_lookup_cpu(self._p(), b"\0\0\0\0", cpu)))

        plane = value0(1) - value0(0) if self.nr_cpus > 1 else 0
        return ArrayLayout(value0(0) - self.address, self._stride, self.max_entries, plane, self.nr_cpus)


@register(MapType.PROG_ARRAY)
class ProgArray(Map):
    """PROG_ARRAY: values are u32 program ids (see :func:`register_program`) for tail calls."""

    def update(self, key, value, flags: int = BPF_ANY) -> None:
        if isinstance(value, int):
            value = value.to_bytes(4, "little")
        super().update(key, value, flags)

    def __len__(self) -> int:
        return self.max_entries


@register(MapType.ARRAY_OF_MAPS, MapType.HASH_OF_MAPS)
class MapOfMaps(Map):
    """ARRAY_OF_MAPS, HASH_OF_MAPS: values are maps of the same region matching ``spec.inner``.

    ``update(key, inner_map)``; ``lookup(key)`` returns the inner :class:`Map`.
    (Programs' lookups return the inner map's address.)
    """

    def __init__(self, *a):
        super().__init__(*a)
        self._out_size = 8
        self._c_value_size = 8

    def lookup(self, key) -> Map | None:  # type: ignore[override]
        key = self._key(key, "lookup")
        out = ffi.new("uint64_t *")
        rc = lib.hybrid_map_lookup_copy(self._p(), key, out)
        if rc == -E.ENOENT:
            return None
        if rc:
            raise self._error(-rc, "lookup")
        return self.region.map_at_offset(out[0])

    def update(self, key, value: Map, flags: int = BPF_ANY) -> None:  # type: ignore[override]
        key = self._key(key, "update")
        if not isinstance(value, Map):
            raise self._error(E.EINVAL, "update", "the value must be a Map, not %s" % type(value).__name__)
        if value.region is not self.region:
            raise self._error(E.EINVAL, "update", "inner map %r is in another region" % value.name)
        off = ffi.new("uint64_t *", value.address - self.region.base)
        rc = lib.hybrid_map_update(self._p(), key, off, flags)
        if rc:
            detail = None
            if rc == -E.EINVAL and self.spec.inner is not None:
                detail = "inner map %r does not match the template %s" % (value.name, self.spec.inner)
            raise self._error(-rc, "update", detail)


@register(MapType.STACK_TRACE)
class StackTraceMap(Map):
    """STACK_TRACE: u32 stack id -> value_size / 8 u64 instruction pointers (zero-padded)."""

    def store(self, ips: Sequence[int], flags: int = 0) -> int:
        """Store a stack (as bpf_get_stackid does), returning its id."""
        arr = ffi.new("uint64_t[]", list(ips) or [0])
        rc = lib.hybrid_stackmap_store(self._p(), arr, len(ips), flags)
        if rc < 0:
            raise self._error(-rc, "store", "hash bucket taken by another stack (no BPF_F_REUSE_STACKID)"
                              if rc == -E.EEXIST else None)
        return int(rc)

    def __len__(self) -> int:
        """Stored stacks (a scan of every id)."""
        return sum(1 for _ in self)

    def stack(self, stack_id: int) -> list[int] | None:
        """The instruction pointers of ``stack_id`` without the zero padding."""
        raw = self.lookup(stack_id.to_bytes(4, "little"))
        if raw is None:
            return None
        ips = [int.from_bytes(raw[i:i + 8], "little") for i in range(0, len(raw), 8)]
        while ips and ips[-1] == 0:
            ips.pop()
        return ips


@register(MapType.QUEUE, MapType.STACK)
class QueueMap(Map):
    """QUEUE (FIFO) and STACK (LIFO): ``push``, ``pop``, ``peek``; no keys."""

    def push(self, value, flags: int = BPF_ANY) -> None:
        """Add ``value``; with BPF_EXIST a full map drops its oldest value instead of failing."""
        value = self._value(value, "push")
        rc = lib.hybrid_map_push(self._p(), value, flags)
        if rc:
            raise self._error(-rc, "push")

    def _take(self, fn, op: str) -> bytes | None:
        out = ffi.new("char[]", self.value_size)
        rc = fn(self._p(), out)
        if rc == -E.ENOENT:
            return None
        if rc:
            raise self._error(-rc, op)
        return ffi.unpack(out, len(out))

    def pop(self) -> bytes | None:
        return self._take(lib.hybrid_map_pop, "pop")

    def peek(self) -> bytes | None:
        return self._take(lib.hybrid_map_peek, "peek")

    def __iter__(self):
        raise self._error(E.EINVAL, "iterate", "queues and stacks have no keys")


@register(MapType.BLOOM_FILTER)
class BloomFilter(Map):
    """BLOOM_FILTER: ``push`` adds a value, ``contains`` tests (false positives possible, never false negatives)."""

    def push(self, value, flags: int = BPF_ANY) -> None:
        value = self._value(value, "push")
        rc = lib.hybrid_map_push(self._p(), value, flags)
        if rc:
            raise self._error(-rc, "push")

    def contains(self, value) -> bool:
        value = self._value(value, "peek")
        rc = lib.hybrid_map_peek(self._p(), value)
        if rc in (0, -E.ENOENT):
            return rc == 0
        raise self._error(-rc, "peek")

    __contains__ = contains

    def __iter__(self):
        raise self._error(E.EOPNOTSUPP, "iterate", "a bloom filter has no keys")

    def __len__(self) -> int:
        raise TypeError("a bloom filter has no length")


@register(MapType.RINGBUF)
class RingBuf(Map):
    """RINGBUF: records written by programs (``bpf_ringbuf_*``), read with :class:`RingBufferConsumer`."""

    def output(self, data, flags: int = 0) -> None:
        """Write one record from userspace (as bpf_ringbuf_output); MapError(EAGAIN) when full."""
        data = _bytes(data, "data")
        rc = lib.hybrid_ringbuf_output(self._p(), data, len(data), flags)
        if rc:
            raise self._error(-rc, "output", "ring buffer full" if rc == -E.EAGAIN else None)

    def query(self, what: int) -> int:
        """bpf_ringbuf_query: BPF_RB_AVAIL_DATA, BPF_RB_RING_SIZE, BPF_RB_CONS_POS, BPF_RB_PROD_POS."""
        return int(lib.hybrid_ringbuf_query(self._p(), what))

    @property
    def avail_data(self) -> int:
        return self.query(BPF_RB_AVAIL_DATA)

    @property
    def ring_size(self) -> int:
        return self.query(BPF_RB_RING_SIZE)

    def set_wakeup(self, bytes_: int, max_latency_ms: float) -> None:
        """Wake a waiting consumer once ``bytes_`` are unconsumed, or after ``max_latency_ms``."""
        lib.hybrid_ring_set_wakeup(self._p(), bytes_, int(max_latency_ms * 1000))

    def addresses(self) -> tuple[int, int, int, int]:
        """(&consumer_pos, &producer_pos, data, size) for a libbpf-style consumer in this process."""
        out = ffi.new("uint64_t[4]")
        lib.hybrid_ring_addresses(self._p(), 0, out)
        return tuple(out)  # type: ignore[return-value]

    def __iter__(self):
        raise self._error(E.EOPNOTSUPP, "iterate", "a ring buffer has no keys")

    def __len__(self) -> int:
        return self.avail_data


@register(MapType.PERF_EVENT_ARRAY)
class PerfEventArray(Map):
    """PERF_EVENT_ARRAY: one ring per entry (CPU), read with :class:`PerfBufferConsumer`.

    An entry receives records only while enabled (``update(key, 1)``, done
    by the consumer), as the kernel needs a perf event installed.
    """

    def __init__(self, *a):
        super().__init__(*a)
        self.ring_size = self.spec.map_extra or 64 * 1024

    def update(self, key, value, flags: int = BPF_ANY) -> None:
        if isinstance(value, int):
            value = value.to_bytes(4, "little")
        super().update(key, value, flags)

    def output(self, data, cpu: int = BPF_F_CURRENT_CPU) -> None:
        """Write one record from userspace (as bpf_perf_event_output with flags = ``cpu``)."""
        data = _bytes(data, "data")
        rc = lib.hybrid_perf_output(self._p(), cpu, data, len(data))
        if rc:
            raise self._error(-rc, "output", {E.ENOSPC: "ring of entry %d full" % cpu,
                                              E.ENOENT: "entry %d has no consumer" % cpu}.get(-rc))

    def lost_on(self, cpu: int, reset: bool = False) -> int:
        return int(lib.hybrid_perf_lost(self._p(), cpu, int(reset)))

    def set_wakeup(self, bytes_: int, max_latency_ms: float) -> None:
        lib.hybrid_ring_set_wakeup(self._p(), bytes_, int(max_latency_ms * 1000))

    def __len__(self) -> int:
        return self.max_entries


# ---------------------------------------------------------------------------
# program registry (tail calls)

def register_program(prog_id: int, entry_address: int) -> None:
    """Make ``prog_id`` (a PROG_ARRAY value) call the native function at ``entry_address`` in this process."""
    rc = lib.hybrid_prog_register(prog_id, ffi.cast("void *", entry_address))
    if rc:
        raise MapError(-rc, None, "register program %d" % prog_id)


def prog_array_entry(prog_array: ProgArray, index: int) -> int:
    """The entry address a tail call through ``prog_array[index]`` jumps to (0: none)."""
    return int(ffi.cast("uintptr_t", lib.hybrid_prog_array_get(prog_array._p(), index)))


# ---------------------------------------------------------------------------
# consumers

@ffi.def_extern()
def _hybrid_py_sample(ctx, data, size):
    consumer = ffi.from_handle(ctx)
    try:
        rc = consumer._sample(bytes(ffi.buffer(data, size)))
    except BaseException as e:  # noqa: BLE001 - re-raised by poll()/consume()
        consumer._exc = e
        return -1
    if isinstance(rc, int) and rc < 0:
        consumer._stopped = True
        return rc
    return 0


class _Consumer:
    _exc: BaseException | None = None
    _stopped = False

    def _finish(self, n: int, op: str) -> int:
        exc, self._exc = self._exc, None
        stopped, self._stopped = self._stopped, False
        if exc is not None:
            raise exc
        if n < 0 and not stopped and n != -E.EINTR:
            raise self.map._error(-n, op)
        return n


class RingBufferConsumer(_Consumer):
    """Reads a :class:`RingBuf`, like libbpf's ``ring_buffer``.

    ``callback(data: bytes)`` is called once per record in order; returning
    a negative int stops the current ``consume``/``poll`` (the record is
    consumed) and that value is returned; an exception stops it and is
    re-raised.  One consumer per ring buffer.
    """

    def __init__(self, map: RingBuf, callback: Callable[[bytes], int | None]):
        if not isinstance(map, RingBuf):
            raise MapError(E.EINVAL, getattr(map, "name", None), "consume", "not a ring buffer")
        self.map = map
        self.callback = callback
        self._handle = ffi.new_handle(self)

    def _sample(self, data: bytes):
        return self.callback(data)

    def consume(self) -> int:
        """Read every available record without waiting; returns how many."""
        n = lib.hybrid_ringbuf_consume(self.map._p(), lib._hybrid_py_sample, self._handle)
        return self._finish(n, "consume")

    def poll(self, timeout_ms: int = -1) -> int:
        """Wait up to ``timeout_ms`` (-1: no limit) for records, then read them; returns how many."""
        n = self.consume()
        if n:
            return n
        rc = lib.hybrid_ringbuf_wait(self.map._p(), timeout_ms)
        if rc < 0:
            return self._finish(rc, "poll")
        return self.consume()

    @property
    def lost(self) -> int:
        """Records producers could not write (the ring was full)."""
        return self.map.lost

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class PerfBufferConsumer(_Consumer):
    """Reads a :class:`PerfEventArray`, like libbpf's ``perf_buffer``.

    Enables the entries ``cpus`` (default: all) on creation and disables
    them on :meth:`close`.  ``callback(cpu, data)`` per record,
    ``lost_callback(cpu, count)`` when records were lost on an entry
    (counted in ``lost`` either way).
    """

    def __init__(self, map: PerfEventArray, callback: Callable[[int, bytes], int | None],
                 lost_callback: Callable[[int, int], None] | None = None, cpus: Sequence[int] | None = None):
        if not isinstance(map, PerfEventArray):
            raise MapError(E.EINVAL, getattr(map, "name", None), "consume", "not a perf event array")
        self.map = map
        self.callback = callback
        self.lost_callback = lost_callback
        self.cpus = list(range(map.max_entries)) if cpus is None else list(cpus)
        self.lost = 0
        self._cpu = 0
        self._handle = ffi.new_handle(self)
        for cpu in self.cpus:
            map.update(cpu.to_bytes(4, "little"), 1)
        self._open = True

    def _sample(self, data: bytes):
        return self.callback(self._cpu, data)

    def consume(self) -> int:
        """Read every available record of every entry without waiting; returns how many."""
        total = 0
        p = self.map._p()
        for cpu in self.cpus:
            lost = int(lib.hybrid_perf_lost(p, cpu, 1))
            if lost:
                self.lost += lost
                if self.lost_callback is not None:
                    self.lost_callback(cpu, lost)
            self._cpu = cpu
            n = self._finish(lib.hybrid_perf_consume(p, cpu, lib._hybrid_py_sample, self._handle), "consume")
            if n < 0:
                return n
            total += n
        return total

    def poll(self, timeout_ms: int = -1) -> int:
        """Wait up to ``timeout_ms`` (-1: no limit) for records, then read them; returns how many."""
        n = self.consume()
        if n:
            return n
        rc = lib.hybrid_perf_wait(self.map._p(), timeout_ms)
        if rc < 0:
            return self._finish(rc, "poll")
        return self.consume()

    def close(self) -> None:
        if getattr(self, "_open", False) and self.map._ptr is not None:
            for cpu in self.cpus:
                lib.hybrid_map_delete(self.map._ptr, cpu.to_bytes(4, "little"))
        self._open = False

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
