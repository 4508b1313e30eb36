"""MapSpec: what a map is, before it exists.

Plain data shared by the ELF loader (:mod:`hybrid.user.elf`, which reads
them from ``.maps``, the legacy ``maps`` section and the global data
sections) and the map layer (:mod:`hybrid.user.maps`, which creates them
in shared memory).  Unknown map types are carried through; the map layer
refuses them when it creates the map.
"""

from __future__ import annotations

import errno as E
from dataclasses import dataclass, replace
from typing import Iterator

from hybrid.errors import MapError

MAX_NAME = 63  # bytes of a map name (the shared-memory header keeps 64 with the NUL)

# enum bpf_map_type, for messages (libbpf's map_type_name)
MAP_TYPE_NAMES = {
    0: "unspec", 1: "hash", 2: "array", 3: "prog_array", 4: "perf_event_array", 5: "percpu_hash",
    6: "percpu_array", 7: "stack_trace", 8: "cgroup_array", 9: "lru_hash", 10: "lru_percpu_hash",
    11: "lpm_trie", 12: "array_of_maps", 13: "hash_of_maps", 14: "devmap", 15: "sockmap", 16: "cpumap",
    17: "xskmap", 18: "sockhash", 19: "cgroup_storage", 20: "reuseport_sockarray",
    21: "percpu_cgroup_storage", 22: "queue", 23: "stack", 24: "sk_storage", 25: "devmap_hash",
    26: "struct_ops", 27: "ringbuf", 28: "inode_storage", 29: "task_storage", 30: "bloom_filter",
    31: "user_ringbuf", 32: "cgrp_storage", 33: "arena",
}
BPF_MAP_TYPE_PERF_EVENT_ARRAY = 4
BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_PROG_ARRAY = 3
BPF_MAP_TYPE_ARRAY_OF_MAPS = 12
BPF_MAP_TYPE_HASH_OF_MAPS = 13

# map_flags the loader sets on global data maps (as libbpf does)
BPF_F_RDONLY_PROG = 1 << 7
BPF_F_MMAPABLE = 1 << 10

# pinning (LIBBPF_PIN_*)
PIN_NONE, PIN_BY_NAME = 0, 1

# Bridges: maps backed by a kernel map (hybrid/native/maps.c).  The codes are the header's.
BRIDGE_MODES = {"": 0, "mmap": 1, "syscall": 2}
BRIDGE_NAMES = {v: k for k, v in BRIDGE_MODES.items()}
# types a syscall-mode bridge supports: HASH, ARRAY, PERCPU_HASH, PERCPU_ARRAY, LRU_HASH,
# LRU_PERCPU_HASH, LPM_TRIE, QUEUE, STACK, BLOOM_FILTER
BRIDGE_SYSCALL_TYPES = (1, 2, 5, 6, 9, 10, 11, 22, 23, 30)


def map_type_name(t: int) -> str:
    return MAP_TYPE_NAMES.get(t, "type %d" % t)


@dataclass(frozen=True)
class MapSpec:
    """A map definition.

    The first eight fields are ``bpf(BPF_MAP_CREATE)``'s.  ``inner`` is the
    template of the inner maps of an ``ARRAY_OF_MAPS`` / ``HASH_OF_MAPS``.
    For ``PERF_EVENT_ARRAY``, ``max_entries`` 0 means one entry per possible
    CPU and ``map_extra`` is the ring size of each entry in bytes (0: 64 KiB).

    The rest comes from the ELF object:

    * ``initial``: the initial contents of a global data map (``.data``,
      ``.rodata``: the section's bytes; ``.bss``: zeros; ``.kconfig``: the
      values of the ``__kconfig`` externs), ``value_size`` bytes; None for
      other maps;
    * ``readonly``: ``.rodata*`` and ``.kconfig`` (``BPF_F_RDONLY_PROG``:
      programs may not write it, userspace may until the object is loaded);
    * ``section``: the ELF section the map was defined in (``.maps``,
      ``maps``, ``.rodata``, ...);
    * ``btf_key_type_id`` / ``btf_value_type_id``: type ids in the object's
      BTF (0: none); for global data the value type is the section's DATASEC;
    * ``pinning``: ``LIBBPF_PIN_BY_NAME`` (1) or 0 -- accepted, ignored;
    * ``values``: the initial slots of a map-in-map (``.values = {[i] = &m}``):
      ``values[i]`` is the :class:`MapSpec` of the map in slot ``i`` (the
      very object that is in ``ObjectSpec.maps``; match it by name) or None;
      for a ``PROG_ARRAY``, the name of the program in slot ``i``;
    * ``libbpf_name``: the name libbpf would give the map in the kernel
      (``<obj>.rodata`` truncated to 15 characters for global data);
    * ``numa_node``: carried through, ignored.

    A map can be backed by a *kernel* map (created elsewhere with
    ``bpf(BPF_MAP_CREATE)``) whose id is ``kernel_id``, in one of two
    ``bridge`` modes (semantics in ``hybrid/native/maps.c``):

    * ``"mmap"``: an ARRAY whose kernel map has ``BPF_F_MMAPABLE``; its
      values are the kernel map's memory, mapped into every process that
      maps the region (memory speed, atomics work across both sides);
    * ``"syscall"``: HASH, ARRAY, PERCPU_HASH, PERCPU_ARRAY, LRU_HASH,
      LRU_PERCPU_HASH, LPM_TRIE, QUEUE, STACK, BLOOM_FILTER: every operation
      is a ``bpf()`` map command; a program's lookup gets a per-thread copy
      written back at the end of the run.

    The attributes must be the kernel map's.  ``initial`` is not applied to
    a bridged map (the kernel map has its contents already).
    """

    name: str
    type: int
    key_size: int = 0
    value_size: int = 0
    max_entries: int = 0
    flags: int = 0
    map_extra: int = 0
    inner: "MapSpec | None" = None
    initial: bytes | None = None
    readonly: bool = False
    section: str = ""
    btf_key_type_id: int = 0
    btf_value_type_id: int = 0
    pinning: int = 0
    values: tuple = ()
    libbpf_name: str = ""
    numa_node: int = 0
    kernel_id: int = 0
    bridge: str = ""

    def __post_init__(self) -> None:
        if len(self.name.encode()) > MAX_NAME:
            raise MapError(E.ENAMETOOLONG, self.name, "create", "name longer than %d bytes" % MAX_NAME)
        for field in ("type", "key_size", "value_size", "max_entries", "flags"):
            v = getattr(self, field)
            if not isinstance(v, int) or not 0 <= v < 1 << 32:
                raise MapError(E.EINVAL, self.name, "create", "%s must be a u32, is %r" % (field, v))
        if not isinstance(self.map_extra, int) or not 0 <= self.map_extra < 1 << 64:
            raise MapError(E.EINVAL, self.name, "create", "map_extra must be a u64, is %r" % (self.map_extra,))
        if self.bridge not in BRIDGE_MODES:
            raise MapError(E.EINVAL, self.name, "create", "bridge must be one of %s, is %r"
                           % (", ".join(repr(b) for b in BRIDGE_MODES), self.bridge))
        if not isinstance(self.kernel_id, int) or not 0 <= self.kernel_id < 1 << 32:
            raise MapError(E.EINVAL, self.name, "create", "kernel_id must be a u32, is %r" % (self.kernel_id,))
        if self.bridge and self.kernel_id == 0:
            raise MapError(E.EINVAL, self.name, "create", "a %s bridge needs the kernel map's id (kernel_id)"
                           % self.bridge)
        if not self.bridge and self.kernel_id:
            raise MapError(E.EINVAL, self.name, "create", "kernel_id %d without a bridge mode (bridge='mmap' or "
                           "'syscall')" % self.kernel_id)
        if self.bridge == "mmap" and self.type != BPF_MAP_TYPE_ARRAY:
            raise MapError(E.EOPNOTSUPP, self.name, "create", "an mmap bridge needs an array map, not %s "
                           "(use bridge='syscall')" % map_type_name(self.type))
        if self.bridge == "syscall" and self.type not in BRIDGE_SYSCALL_TYPES:
            raise MapError(E.EOPNOTSUPP, self.name, "create", "a syscall bridge supports %s maps, not %s"
                           % (", ".join(map_type_name(t) for t in BRIDGE_SYSCALL_TYPES), map_type_name(self.type)))
        if self.initial is not None and len(self.initial) != self.value_size:
            raise MapError(E.EINVAL, self.name, "create", "initial value has %d bytes, value_size is %d"
                           % (len(self.initial), self.value_size))

    @property
    def type_name(self) -> str:
        return map_type_name(self.type)

    def resolved(self, nr_cpus: int) -> "MapSpec":
        """The spec with defaults filled in (perf event array: one entry per CPU)."""
        if self.type == BPF_MAP_TYPE_PERF_EVENT_ARRAY and self.max_entries == 0:
            return replace(self, max_entries=nr_cpus)
        return self


class MapAccess:
    """The Python protocol every map class shares (userspace maps, bridged maps, kernel maps by fd),
    built on the four syscall-like calls each class implements: ``lookup``, ``update``, ``delete``
    and ``next_key``."""

    def __iter__(self) -> Iterator[bytes]:
        """The keys, in the map's iteration order."""
        key = None
        while (key := self.next_key(key)) is not None:
            yield key

    def keys(self) -> Iterator[bytes]:
        return iter(self)

    def items(self) -> Iterator[tuple[bytes, object]]:
        """(key, value) pairs; keys deleted during the iteration are skipped."""
        for key in self:
            value = self.lookup(key)
            if value is not None:
                yield key, value

    def values(self) -> Iterator[object]:
        for _, value in self.items():
            yield value

    def __bool__(self) -> bool:
        return True

    def __contains__(self, key) -> bool:
        return self.lookup(key) is not None

    def __getitem__(self, key):
        value = self.lookup(key)
        if value is None:
            raise KeyError(key)
        return value

    def __setitem__(self, key, value) -> None:
        self.update(key, value)

    def __delitem__(self, key) -> None:
        self.delete(key)
