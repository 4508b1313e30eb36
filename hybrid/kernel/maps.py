"""Kernel eBPF maps by file descriptor, with the Python API of :class:`hybrid.user.maps.Map`.

A :class:`KernelMap` wraps one map fd: keys and values are ``bytes`` (any
bytes-like object is accepted) whose lengths are checked here; per-CPU maps
take and return one value per *possible* CPU (a list; ``update`` also takes
one value for every CPU); queues and stacks have ``push``/``pop``/``peek``.
Batch operations use ``BPF_MAP_*_BATCH`` and fall back to one syscall per
element where the map type has no batch support.  Every failure is a
:class:`~hybrid.errors.MapError` carrying the kernel's errno and naming the
map and the operation::

    with KernelMap.create(BPF_MAP_TYPE_HASH, 4, 8, 1024, name="counts") as m:
        m[b"\\1\\0\\0\\0"] = bytes(8)
"""

from __future__ import annotations

import ctypes
import errno as E
import mmap as _mmap
import os
from typing import Iterator, Sequence

from hybrid.closable import Closable
from hybrid.errors import MapError
from hybrid.kernel import libbpf as L
from hybrid.kernel.features import map_type_name
from hybrid.user.mapspec import MapAccess

# enum bpf_map_type
(BPF_MAP_TYPE_HASH, BPF_MAP_TYPE_ARRAY, BPF_MAP_TYPE_PROG_ARRAY, BPF_MAP_TYPE_PERF_EVENT_ARRAY,
 BPF_MAP_TYPE_PERCPU_HASH, BPF_MAP_TYPE_PERCPU_ARRAY, BPF_MAP_TYPE_STACK_TRACE, BPF_MAP_TYPE_CGROUP_ARRAY,
 BPF_MAP_TYPE_LRU_HASH, BPF_MAP_TYPE_LRU_PERCPU_HASH, BPF_MAP_TYPE_LPM_TRIE, BPF_MAP_TYPE_ARRAY_OF_MAPS,
 BPF_MAP_TYPE_HASH_OF_MAPS) = range(1, 14)
BPF_MAP_TYPE_PERCPU_CGROUP_STORAGE = 21
BPF_MAP_TYPE_QUEUE, BPF_MAP_TYPE_STACK = 22, 23
BPF_MAP_TYPE_RINGBUF = 27
BPF_MAP_TYPE_BLOOM_FILTER = 30
BPF_MAP_TYPE_USER_RINGBUF = 31

# update flags
BPF_ANY, BPF_NOEXIST, BPF_EXIST, BPF_F_LOCK = 0, 1, 2, 4
# map_flags
BPF_F_NO_PREALLOC = 1 << 0
BPF_F_NO_COMMON_LRU = 1 << 1
BPF_F_RDONLY = 1 << 3
BPF_F_WRONLY = 1 << 4
BPF_F_RDONLY_PROG = 1 << 7
BPF_F_WRONLY_PROG = 1 << 8
BPF_F_MMAPABLE = 1 << 10

PERCPU_TYPES = frozenset({BPF_MAP_TYPE_PERCPU_HASH, BPF_MAP_TYPE_PERCPU_ARRAY, BPF_MAP_TYPE_LRU_PERCPU_HASH,
                          BPF_MAP_TYPE_PERCPU_CGROUP_STORAGE})
ARRAY_TYPES = frozenset({BPF_MAP_TYPE_ARRAY, BPF_MAP_TYPE_PERCPU_ARRAY, BPF_MAP_TYPE_PROG_ARRAY,
                         BPF_MAP_TYPE_PERF_EVENT_ARRAY, BPF_MAP_TYPE_CGROUP_ARRAY, BPF_MAP_TYPE_ARRAY_OF_MAPS})
KEYLESS_TYPES = frozenset({BPF_MAP_TYPE_QUEUE, BPF_MAP_TYPE_STACK, BPF_MAP_TYPE_RINGBUF, BPF_MAP_TYPE_USER_RINGBUF,
                           BPF_MAP_TYPE_BLOOM_FILTER})
FD_VALUE_TYPES = frozenset({BPF_MAP_TYPE_PROG_ARRAY, BPF_MAP_TYPE_PERF_EVENT_ARRAY, BPF_MAP_TYPE_CGROUP_ARRAY,
                            BPF_MAP_TYPE_ARRAY_OF_MAPS, BPF_MAP_TYPE_HASH_OF_MAPS})
_NO_BATCH = (L.ENOTSUPP, E.EOPNOTSUPP)

PAGE = _mmap.PAGESIZE

_DETAIL = {
    ("update", E.E2BIG): "map is full (max_entries {max_entries})",
    ("update", E.ENOSPC): "map is full (max_entries {max_entries})",
    ("update", E.EEXIST): "key exists (BPF_NOEXIST)",
    ("update", E.ENOENT): "no such key (BPF_EXIST)",
    ("delete", E.ENOENT): "no such key",
    ("delete", E.EINVAL): "elements of arrays cannot be deleted",
    ("push", E.E2BIG): "map is full (max_entries {max_entries})",
    ("push", E.ENOSPC): "map is full (max_entries {max_entries})",
    ("lookup", E.EPERM): "the map is not readable from userspace (BPF_F_WRONLY?)",
}

_possible: int | None = None


def possible_cpus() -> int:
    """Per-CPU slots: ``libbpf_num_possible_cpus()`` (the highest possible CPU + 1)."""
    global _possible
    if _possible is None:
        n = L.lib().libbpf_num_possible_cpus()
        _possible = n if n > 0 else (os.cpu_count() or 1)
    return _possible


def _bytes(data, what: str) -> bytes:
    if isinstance(data, bytes):
        return data
    if isinstance(data, (bytearray, memoryview)):
        return bytes(data)
    raise TypeError("%s must be bytes, not %s" % (what, type(data).__name__))


def _is_bpf_map(fd: int) -> bool:
    try:
        return os.readlink("/proc/self/fd/%d" % fd) == "anon_inode:bpf-map"
    except OSError:
        return True  # no procfs: let BPF_OBJ_GET_INFO_BY_FD decide


def map_info(fd: int) -> L.MapInfo:
    """``BPF_OBJ_GET_INFO_BY_FD`` of a map fd; MapError when ``fd`` is not a map."""
    if not _is_bpf_map(fd):
        raise MapError(E.EINVAL, None, "open fd %d" % fd, "not a bpf map (%s)" % _fd_target(fd))
    info = L.MapInfo()
    size = L.U32(ctypes.sizeof(info))
    rc = L.lib().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size))
    if rc:
        err = L.errno_of(rc)
        raise MapError(err, None, "open fd %d" % fd, "BPF_OBJ_GET_INFO_BY_FD: %s" % L.strerror(err))
    return info


def _fd_target(fd: int) -> str:
    try:
        return os.readlink("/proc/self/fd/%d" % fd)
    except OSError as e:
        return e.strerror or "unknown"


def _root_detail(err: int) -> str | None:
    if err in (E.EPERM, E.EACCES):
        from hybrid.kernel.features import NEEDS_ROOT

        return "operation not permitted: %s" % NEEDS_ROOT
    return None


class KernelMap(MapAccess, Closable):
    """One kernel map.  ``fd, id, name, type, key_size, value_size, max_entries, flags`` come from
    ``BPF_OBJ_GET_INFO_BY_FD``; ``type_name`` is libbpf's name of the type.

    An owned map closes its fd on :meth:`close`; a map of a
    :class:`~hybrid.kernel.object.KernelObject` is not owned: the object owns
    the fd and the map becomes unusable (``MapError(EBADF)``) when it closes.
    """

    def __init__(self, fd: int, *, owned: bool = True, name: str | None = None):
        info = map_info(fd)
        self._fd = fd
        self._owned = owned
        self._mmaps: list[_mmap.mmap] = []
        self.id = info.id
        self.type = info.type
        self.key_size = info.key_size
        self.value_size = info.value_size
        self.max_entries = info.max_entries
        self.flags = info.map_flags
        self.map_extra = info.map_extra
        self.name = name or info.name.decode(errors="replace")
        self.percpu = self.type in PERCPU_TYPES
        self.nr_cpus = possible_cpus() if self.percpu else 1
        self._stride = (self.value_size + 7) // 8 * 8
        self._vsize = self._stride * self.nr_cpus if self.percpu else self.value_size

    # --- constructors ---------------------------------------------------------------

    @classmethod
    def from_fd(cls, fd: int, dup: bool = True, *, name: str | None = None) -> "KernelMap":
        """The map behind ``fd``: a duplicate of it (``dup``), or ``fd`` itself, which the map then owns
        (closes on :meth:`close`; a failure leaves it open, as it is the caller's)."""
        if dup:
            try:
                fd = os.dup(fd)
            except OSError as e:
                raise MapError(e.errno or E.EBADF, name, "open fd %d" % fd, e.strerror) from None
        return cls._adopt(fd, name, close_on_error=dup)

    @classmethod
    def _adopt(cls, fd: int, name: str | None = None, close_on_error: bool = True) -> "KernelMap":
        try:
            return cls(fd, owned=True, name=name)
        except BaseException:
            if close_on_error:
                os.close(fd)
            raise

    @classmethod
    def from_id(cls, map_id: int) -> "KernelMap":
        """The map with kernel id ``map_id`` (``BPF_MAP_GET_FD_BY_ID``: needs root)."""
        fd = L.lib().bpf_map_get_fd_by_id(map_id)
        if fd < 0:
            err = L.errno_of(fd)
            detail = "no map with id %d" % map_id if err == E.ENOENT else _root_detail(err)
            raise MapError(err, None, "open id %d" % map_id, detail)
        return cls._adopt(fd)

    @classmethod
    def from_pin(cls, path: str | os.PathLike) -> "KernelMap":
        """The map pinned at ``path`` on a bpf filesystem (``BPF_OBJ_GET``)."""
        path = os.fspath(path)
        fd = L.lib().bpf_obj_get(os.fsencode(path))
        if fd < 0:
            err = L.errno_of(fd)
            detail = {E.ENOENT: "nothing is pinned at %s" % path}.get(err) or _pin_detail(path, err)
            raise MapError(err, None, "open pin %s" % path, detail)
        return cls._adopt(fd)

    @classmethod
    def create(cls, type: int, key_size: int, value_size: int, max_entries: int, flags: int = 0,
               name: str = "", *, map_extra: int = 0, inner_map_fd: int | None = None) -> "KernelMap":
        """A new map (``BPF_MAP_CREATE``); a type the kernel lacks is a FeatureError naming it."""
        from hybrid.kernel import features

        opts = L.MapCreateOpts(map_flags=flags, map_extra=map_extra,
                               inner_map_fd=inner_map_fd if inner_map_fd is not None else 0)
        fd = L.lib().bpf_map_create(type, name.encode()[:15] if name else None, key_size, value_size,
                                    max_entries, ctypes.byref(opts))
        what = "(%s) create" % map_type_name(type)
        if fd < 0:
            err = L.errno_of(fd)
            if err in (E.EINVAL, E.EOPNOTSUPP, L.ENOTSUPP) and not features.map_type(type).available \
                    and features.check("bpf").available:
                features.require_map_type(type, "map %r" % (name or None))
            detail = _root_detail(err) or (
                "invalid attributes: key_size %d, value_size %d, max_entries %d, flags %#x"
                % (key_size, value_size, max_entries, flags) if err == E.EINVAL else None)
            raise MapError(err, name or None, what, detail)
        return cls._adopt(fd, name or None)

    # --- plumbing ---------------------------------------------------------------------

    @property
    def fd(self) -> int:
        if self._fd < 0:
            raise self._error(E.EBADF, "access", "the map is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    @property
    def type_name(self) -> str:
        return map_type_name(self.type)

    def _error(self, err: int, op: str, detail: str | None = None) -> MapError:
        if detail is None:
            tmpl = _DETAIL.get((op, err))
            detail = tmpl.format(max_entries=self.max_entries) if tmpl else _root_detail(err)
        if detail is None and err == L.ENOTSUPP:
            detail = "not supported for %s maps" % self.type_name
        return MapError(err, self.name, "(%s) %s" % (self.type_name, op), detail)

    def _key(self, key, op: str):
        if self.key_size == 0 and key is None:
            return None
        key = _bytes(key, "key")
        if len(key) != self.key_size:
            raise self._error(E.EINVAL, op, "key is %d bytes, key_size is %d" % (len(key), self.key_size))
        return key

    def _one_value(self, value, op: str) -> bytes:
        if isinstance(value, int) and self.type in FD_VALUE_TYPES:
            value = value.to_bytes(4, "little")
        value = _bytes(value, "value")
        if len(value) != self.value_size:
            raise self._error(E.EINVAL, op, "value is %d bytes, value_size is %d" % (len(value), self.value_size))
        return value

    def _value(self, value, op: str) -> bytes:
        """The kernel's value buffer: for per-CPU maps ``nr_cpus`` 8-byte aligned values."""
        if not self.percpu:
            return self._one_value(value, op)
        if isinstance(value, (list, tuple)):
            if len(value) != self.nr_cpus:
                raise self._error(E.EINVAL, op, "%d values for %d possible CPUs" % (len(value), self.nr_cpus))
            values = [self._one_value(v, op) for v in value]
        else:
            values = [self._one_value(value, op)] * self.nr_cpus
        return b"".join(v.ljust(self._stride, b"\0") for v in values)

    def _unpack(self, raw: bytes):
        if not self.percpu:
            return raw
        s, n = self._stride, self.value_size
        return [raw[i * s:i * s + n] for i in range(self.nr_cpus)]

    def _no_keys(self, op: str):
        if self.type in KEYLESS_TYPES:
            raise self._error(E.EINVAL, op, "%s maps have no keys" % self.type_name)

    # --- the syscall API -------------------------------------------------------------

    def lookup(self, key):
        """The value of ``key`` (per-CPU maps: a list of one value per possible CPU), or None."""
        key = self._key(key, "lookup")
        out = ctypes.create_string_buffer(max(self._vsize, 1))
        rc = L.lib().bpf_map_lookup_elem(self.fd, key, out)
        if rc:
            err = L.errno_of(rc)
            if err == E.ENOENT:
                return None
            raise self._error(err, "lookup")
        return self._unpack(out.raw[:self._vsize])

    def update(self, key, value, flags: int = BPF_ANY) -> None:
        """Set ``key`` to ``value``; ``flags`` BPF_ANY, BPF_NOEXIST (create only), BPF_EXIST (replace only).
        Per-CPU maps: a list of ``nr_cpus`` values, or one value for every CPU."""
        key = self._key(key, "update")
        value = self._value(value, "update")
        rc = L.lib().bpf_map_update_elem(self.fd, key, value, flags)
        if rc:
            raise self._error(L.errno_of(rc), "update")

    def delete(self, key) -> None:
        """Remove ``key``: MapError(ENOENT) when absent, (EINVAL) for arrays."""
        key = self._key(key, "delete")
        rc = L.lib().bpf_map_delete_elem(self.fd, key)
        if rc:
            raise self._error(L.errno_of(rc), "delete")

    def next_key(self, key=None) -> bytes | None:
        """``BPF_MAP_GET_NEXT_KEY``: the key after ``key`` (the first with None); None after the last."""
        self._no_keys("next_key")
        if key is not None:
            key = self._key(key, "next_key")
        out = ctypes.create_string_buffer(max(self.key_size, 1))
        rc = L.lib().bpf_map_get_next_key(self.fd, key, out)
        if rc:
            err = L.errno_of(rc)
            if err == E.ENOENT:
                return None
            raise self._error(err, "next_key")
        return out.raw[:self.key_size]

    def __iter__(self) -> Iterator[bytes]:
        """The keys, in the kernel's iteration order."""
        self._no_keys("iterate")
        return MapAccess.__iter__(self)


    def __len__(self) -> int:
        """max_entries for arrays; the number of keys (one syscall per key) for the others."""
        self._no_keys("len")
        if self.type in ARRAY_TYPES:
            return self.max_entries
        return sum(1 for _ in self)


    def sum(self, key) -> int | None:
        """Per-CPU maps: the CPUs' values read as little-endian unsigned integers, added up."""
        values = self.lookup(key)
        if values is None:
            return None
        if not self.percpu:
            values = [values]
        return sum(int.from_bytes(v, "little") for v in values)

    # --- queues and stacks ---------------------------------------------------------------

    def push(self, value, flags: int = BPF_ANY) -> None:
        """QUEUE/STACK/BLOOM_FILTER: add ``value``; with BPF_EXIST a full queue drops its oldest value."""
        value = self._one_value(value, "push")
        rc = L.lib().bpf_map_update_elem(self.fd, None, value, flags)
        if rc:
            raise self._error(L.errno_of(rc), "push")

    def pop(self) -> bytes | None:
        """QUEUE/STACK: remove and return the next value, None when empty."""
        return self._take(L.lib().bpf_map_lookup_and_delete_elem, "pop")

    def peek(self) -> bytes | None:
        """QUEUE/STACK: the next value without removing it, None when empty."""
        return self._take(L.lib().bpf_map_lookup_elem, "peek")

    def _take(self, fn, op: str) -> bytes | None:
        out = ctypes.create_string_buffer(max(self.value_size, 1))
        rc = fn(self.fd, None, out)
        if rc:
            err = L.errno_of(rc)
            if err == E.ENOENT:
                return None
            raise self._error(err, op)
        return out.raw[:self.value_size]

    # --- batches ---------------------------------------------------------------------------

    def lookup_batch(self, chunk: int = 256) -> list[tuple[bytes, object]]:
        """Every (key, value) pair with ``BPF_MAP_LOOKUP_BATCH`` (``chunk`` elements per syscall);
        per element (:meth:`items`) where the map type has no batch lookup."""
        self._no_keys("lookup_batch")
        lib = L.lib()
        ks, vs = self.key_size, self._vsize
        token = max(ks, 4)
        tok_in, tok_out = ctypes.create_string_buffer(token), ctypes.create_string_buffer(token)
        opts = L.MapBatchOpts()
        out: list[tuple[bytes, object]] = []
        first = True
        chunk = max(1, min(chunk, self.max_entries or chunk))
        while True:
            keys, vals = ctypes.create_string_buffer(ks * chunk), ctypes.create_string_buffer(vs * chunk)
            count = L.U32(chunk)
            rc = lib.bpf_map_lookup_batch(self.fd, None if first else tok_in, tok_out, keys, vals,
                                          ctypes.byref(count), ctypes.byref(opts))
            err = L.errno_of(rc) if rc else 0
            if err in _NO_BATCH and first:
                return list(self.items())
            if err == E.ENOSPC and count.value == 0:  # a hash bucket larger than the chunk
                chunk *= 2
                continue
            if err and err != E.ENOENT:
                raise self._error(err, "lookup_batch")
            kraw, vraw = keys.raw, vals.raw
            for i in range(count.value):
                out.append((kraw[i * ks:(i + 1) * ks], self._unpack(vraw[i * vs:(i + 1) * vs])))
            if err == E.ENOENT:
                return out
            first = False
            tok_in, tok_out = tok_out, tok_in

    def update_batch(self, keys: Sequence, values: Sequence, flags: int = BPF_ANY) -> None:
        """Set ``keys[i]`` to ``values[i]`` with ``BPF_MAP_UPDATE_BATCH`` (``flags`` per element);
        per element where the map type has no batch update."""
        if len(keys) != len(values):
            raise self._error(E.EINVAL, "update_batch", "%d keys but %d values" % (len(keys), len(values)))
        if not keys:
            return
        kbuf = b"".join(self._key(k, "update_batch") for k in keys)
        vbuf = b"".join(self._value(v, "update_batch") for v in values)
        count = L.U32(len(keys))
        rc = L.lib().bpf_map_update_batch(self.fd, kbuf, vbuf, ctypes.byref(count),
                                          ctypes.byref(L.MapBatchOpts(elem_flags=flags)))
        if rc:
            err = L.errno_of(rc)
            if err in _NO_BATCH:
                for k, v in zip(keys, values):
                    self.update(k, v, flags)
                return
            raise self._error(err, "update_batch", self._batch_detail(err, "update", count.value, keys))

    def delete_batch(self, keys: Sequence) -> None:
        """Remove ``keys`` with ``BPF_MAP_DELETE_BATCH``; per element where the type has no batch delete."""
        if not keys:
            return
        kbuf = b"".join(self._key(k, "delete_batch") for k in keys)
        count = L.U32(len(keys))
        rc = L.lib().bpf_map_delete_batch(self.fd, kbuf, ctypes.byref(count), ctypes.byref(L.MapBatchOpts()))
        if rc:
            err = L.errno_of(rc)
            if err in _NO_BATCH:
                for k in keys:
                    self.delete(k)
                return
            raise self._error(err, "delete_batch", self._batch_detail(err, "delete", count.value, keys))

    def _batch_detail(self, err: int, op: str, done: int, keys: Sequence) -> str:
        tmpl = _DETAIL.get((op, err))
        why = tmpl.format(max_entries=self.max_entries) if tmpl else L.strerror(err)
        at = " at key %s" % bytes(keys[done]).hex() if done < len(keys) else ""
        return "%s (%d of %d elements done%s)" % (why, done, len(keys), at)

    # --- pinning, mmap, lifetime --------------------------------------------------------------

    def pin(self, path: str | os.PathLike) -> None:
        """Pin the map at ``path`` on a bpf filesystem (``BPF_OBJ_PIN``)."""
        path = os.fspath(path)
        rc = L.lib().bpf_obj_pin(self.fd, os.fsencode(path))
        if rc:
            err = L.errno_of(rc)
            raise self._error(err, "pin %s" % path, _pin_detail(path, err))

    def mmap(self) -> memoryview:
        """The values of a BPF_F_MMAPABLE array as a writable memoryview (read-only for a frozen map):
        value i at ``i * round_up(value_size, 8)``.  Release the view before :meth:`close`: a mapping
        still exported stays (with its own fd) until it is garbage collected."""
        if self.type != BPF_MAP_TYPE_ARRAY or not self.flags & BPF_F_MMAPABLE:
            raise self._error(E.EINVAL, "mmap", "only arrays created with BPF_F_MMAPABLE can be mmap()ed "
                                                "(type %s, flags %#x)" % (self.type_name, self.flags))
        size = (self._stride * self.max_entries + PAGE - 1) // PAGE * PAGE
        try:
            m = _mmap.mmap(self.fd, size, _mmap.MAP_SHARED, _mmap.PROT_READ | _mmap.PROT_WRITE)
        except PermissionError:
            try:  # a frozen map (.rodata after load) maps read-only
                m = _mmap.mmap(self.fd, size, _mmap.MAP_SHARED, _mmap.PROT_READ)
            except OSError as e:
                raise self._error(e.errno or E.EINVAL, "mmap", e.strerror) from None
        except OSError as e:
            raise self._error(e.errno or E.EINVAL, "mmap", e.strerror) from None
        self._mmaps.append(m)
        return memoryview(m)[:self._stride * self.max_entries]

    def _release_mmaps(self) -> None:
        for m in self._mmaps:
            try:
                m.close()
            except BufferError:  # a memoryview is still exported: unmapped when collected
                pass
        self._mmaps = []

    def _invalidate(self) -> None:
        """The owner closed the fd (KernelObject.close): every later use is MapError(EBADF)."""
        self._release_mmaps()
        self._fd = -1

    def close(self) -> None:
        """Close the fd (when owned); idempotent."""
        fd, self._fd = self._fd, -1
        self._release_mmaps()
        if fd >= 0 and self._owned:
            try:
                os.close(fd)
            except OSError:
                pass

    def __del__(self):
        try:
            if self._owned and self._fd >= 0:
                self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def __repr__(self) -> str:
        state = "closed" if self._fd < 0 else "fd %d" % self._fd
        return "<KernelMap %r (%s) id %d: key %d, value %d, max_entries %d, %s>" % (
            self.name, self.type_name, self.id, self.key_size, self.value_size, self.max_entries, state)


def _pin_detail(path: str, err: int) -> str | None:
    from hybrid.kernel.features import bpffs_problem

    if err == E.EEXIST:
        return "%s already exists" % path
    if err in (E.EPERM, E.EACCES, E.EINVAL, E.ENOENT, E.ENOTDIR):
        problem = bpffs_problem(os.path.dirname(os.path.abspath(path)) or "/")
        if problem:
            return problem
    return _root_detail(err)
