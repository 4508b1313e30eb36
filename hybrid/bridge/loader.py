"""One object, two sides: kernel programs into the kernel (libbpf), userspace programs into the VM,
the maps both use shared (see :mod:`hybrid.bridge.plan` for who goes where).

:func:`load` is what ``hybrid.load(path)`` does when an object has kernel
programs.  The order makes every error path clean: the kernel object is
loaded first (libbpf creates the maps and loads the kernel programs), then
the region is built with the shared maps bridged to the kernel's by id, then
the VM's programs are verified; any failure closes what exists so far, so
nothing is left loaded.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Iterable, Mapping

from hybrid.closable import Closable
from hybrid.errors import FeatureError, HybridError, KernelError

log = logging.getLogger("hybrid.bridge")

BPF_F_MMAPABLE = 1 << 10
BPF_MAP_TYPE_ARRAY, BPF_MAP_TYPE_RINGBUF = 2, 27


def has_feature(name: str, pspec) -> tuple[bool, str]:
    """``(available, FeatureError text)`` for the kernel feature ``name`` that program ``pspec`` needs.

    Raises :class:`~hybrid.errors.KernelError` when the kernel side cannot be used at all (not root).
    """
    from hybrid.kernel import features
    from hybrid.user.elf import BtfTarget, KprobeTarget, KsyscallTarget, RawTracepointTarget

    t = pspec.attach
    target = getattr(t, "func", None) if isinstance(t, KprobeTarget) else \
        getattr(t, "syscall", None) if isinstance(t, KsyscallTarget) else \
        getattr(t, "name", None) if isinstance(t, (BtfTarget, RawTracepointTarget)) else None
    try:
        features.require(name, "program %r (%s)" % (pspec.name, pspec.section), target=target,
                         syscall=isinstance(t, KsyscallTarget))
    except FeatureError as e:
        return False, str(e)
    return True, ""


class KernelSide(Closable):
    """The kernel half of a loaded object: the libbpf object, mirrors, forwarders and links.

    ``roles`` maps each map name to its role (:func:`hybrid.bridge.plan.map_roles`).
    """

    def __init__(self, kobj, roles: Mapping[str, str], placement, mirror: Mapping[str, object]):
        self.kernel = kobj
        self.roles = dict(roles)
        self.placement = placement
        self.mirror_options = dict(mirror)
        self.mirrors: dict = {}
        self.forwarders: dict = {}
        self.links: list = []
        self._global_attached = False
        self.placeholders: set[str] = set()
        self.closed = False

    def kernel_map(self, spec):
        """The kernel map of the object's map ``spec`` (by its name, or libbpf's name for global data)."""
        maps = self.kernel.maps
        for name in (spec.name, spec.libbpf_name, spec.section):
            if name and name in maps:
                return maps[name]
        raise KernelError("map %r has no kernel counterpart (kernel maps: %s)" % (spec.name, ", ".join(sorted(maps))))

    def start(self, region) -> None:
        """Start the mirrors and forwarders once the region exists."""
        from hybrid.bridge.events import Forwarder
        from hybrid.bridge.mirror import DEFAULT_INTERVAL, Mirror
        from hybrid.kernel.events import UserRingBuffer

        for name, role in self.roles.items():
            if role == "mirror":
                opt = self.mirror_options.get(name)
                direction, interval = "push", DEFAULT_INTERVAL
                if isinstance(opt, (int, float)) and not isinstance(opt, bool):
                    interval = float(opt)
                elif isinstance(opt, str):
                    direction = opt
                elif isinstance(opt, tuple):
                    direction, interval = opt
                spec = next(m for m in self.spec_maps if m.name == name)
                self.mirrors[name] = Mirror(region[name], self.kernel_map(spec), interval=interval,
                                            direction=direction, name=name)
            elif role == "to_kernel":
                spec = next(m for m in self.spec_maps if m.name == name)
                self.forwarders[name] = Forwarder(region[name], UserRingBuffer(self.kernel_map(spec)), name=name)

    spec_maps: tuple = ()

    def attach(self, pid: int | None = None) -> list:
        """Attach the kernel programs: tracepoint-like ones once for the object, uprobes for ``pid``."""
        new = []
        try:
            for name in sorted(self.placement.kernel):
                kind = self.kinds[name]
                per_process = kind in ("uprobe", "uretprobe", "usdt", "uprobe.multi", "uretprobe.multi")
                if not per_process and self._global_attached:
                    continue
                link = self.kernel.attach(name, **self._uprobe_target(name, pid)) if per_process \
                    else self.kernel.attach(name)
                new.append(link)
        except BaseException:
            for link in new:
                link.close()
            raise
        self._global_attached = True
        self.links.extend(new)
        return new

    kinds: Mapping[str, str] = {}
    targets: Mapping[str, object] = {}

    def _uprobe_target(self, name: str, pid: int | None) -> dict:
        """The binary of a kernel uprobe as the process ``pid`` sees it (its executable, by base name)."""
        import os

        target = self.targets.get(name)
        binary = getattr(target, "binary", None)
        if binary and pid is not None and "/" not in binary:
            try:
                exe = os.path.realpath("/proc/%d/exe" % pid)
            except OSError:
                exe = ""
            if os.path.basename(exe) == binary:
                return {"pid": pid, "binary": exe}
        return {"pid": pid}

    def sync(self) -> None:
        for m in self.mirrors.values():
            m.sync()
        for f in self.forwarders.values():
            f.flush()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        errors = []
        for part in [*self.mirrors.values(), *self.forwarders.values(), *reversed(self.links), self.kernel]:
            try:
                part.close()
            except Exception as e:  # noqa: BLE001 - close everything, then report the first error
                errors.append(e)
        if errors:
            raise errors[0]


def load(spec, path, *, kernel: bool | Iterable[str] | None = None, mirror: Mapping[str, object] | None = None,
         share: Mapping[str, object] | None = None, pin_root: str | None = None, region_name: str | None = None,
         keep_region: bool = False):
    """Load ``spec`` (parsed from ``path``) on both sides; see ``hybrid.load``."""
    from hybrid.bridge import plan
    from hybrid.user.object import BpfObject

    share = dict(share or {})
    mirror = dict(mirror or {})
    placement = plan.place(spec, kernel, has_feature) if kernel is not False else plan.place(spec, False, None)
    if not placement.kernel and not share:
        if mirror:
            raise HybridError("mirror=%s: no program of object %r runs in the kernel, so there is nothing to mirror"
                              % (sorted(mirror), spec.name))
        return BpfObject(spec, region_name=region_name, keep_region=keep_region, unavailable=placement.unavailable)
    roles = plan.map_roles(spec, placement, mirror, share)
    side = _load_kernel(spec, path, placement, roles, share, pin_root)
    try:
        user_spec = _user_spec(spec, placement, roles, side)
        obj = BpfObject(user_spec, region_name=region_name, keep_region=keep_region, kernel_side=side,
                        unavailable=placement.unavailable)
    except BaseException:
        side.close()
        raise
    try:
        side.start(obj.region)
    except BaseException:
        obj.close()
        raise
    return obj


def _load_kernel(spec, path, placement, roles, share, pin_root) -> KernelSide:
    from hybrid.kernel.object import KernelObject

    flags = {}
    for m in spec.maps:
        if roles[m.name] == "mmap" and not m.flags & BPF_F_MMAPABLE:
            flags[m.libbpf_name or m.name] = m.flags | BPF_F_MMAPABLE
    initial = {m.libbpf_name or m.name: m.initial for m in spec.maps if m.initial is not None and m.section != ".bss"}
    reuse = {}
    for name, km in share.items():
        fd = getattr(km, "fd", km)
        reuse[spec.map(name).libbpf_name or name] = fd
    create = {m.libbpf_name or m.name for m in spec.maps if roles[m.name] != "user"}
    kobj = KernelObject(path, programs=set(placement.kernel), map_flags=flags, initial=initial, reuse=reuse,
                        pin_root=pin_root, maps=create)
    side = KernelSide(kobj, roles, placement, {})
    side.spec_maps = spec.maps
    side.kinds = {p.name: p.kind for p in spec.programs}
    side.targets = {p.name: p.attach for p in spec.programs}
    return side


def _user_spec(spec, placement, roles, side: KernelSide):
    """The VM's view: kernel programs left out, shared maps bridged to their kernel maps."""
    maps = []
    for m in spec.maps:
        role = roles[m.name]
        if role in ("user", "mirror", "rings"):
            maps.append(m)
            continue
        if role == "to_kernel":  # userspace writes a ring of its own, forwarded to the kernel's user ring
            maps.append(dataclasses.replace(m, type=BPF_MAP_TYPE_RINGBUF, initial=None))
            continue
        km = side.kernel_map(m)
        # an array made elsewhere without BPF_F_MMAPABLE (a bcc table, say) is reached through bpf() instead
        if m.type == BPF_MAP_TYPE_ARRAY and km.flags & BPF_F_MMAPABLE and role in ("mmap", "kernel"):
            maps.append(dataclasses.replace(m, kernel_id=km.id, bridge="mmap", flags=km.flags))
        elif role in ("syscall", "mmap") or (role == "kernel" and m.type in _syscall_types()):
            maps.append(dataclasses.replace(m, kernel_id=km.id, bridge="syscall", flags=km.flags))
        else:  # a kernel-only map the region cannot bridge (rings, prog arrays...): a placeholder keeps the index
            maps.append(dataclasses.replace(m, type=BPF_MAP_TYPE_ARRAY, key_size=4, value_size=8, max_entries=1,
                                            flags=0, map_extra=0, inner=None, initial=None, values=()))
            side.placeholders.add(m.name)
    # The userspace maps must keep their indexes (programs' lddw refer to them), so every map is listed.
    by_name = {m.name: m for m in maps}
    values = tuple(
        tuple(by_name.get(v.name, v) if hasattr(v, "name") and not isinstance(v, str) else v for v in m.values)
        for m in maps)
    maps = [dataclasses.replace(m, values=vals) if m.values else m for m, vals in zip(maps, values)]
    programs = tuple(dataclasses.replace(p, autoload=False) if p.name in placement.kernel else p
                     for p in spec.programs)
    return dataclasses.replace(spec, maps=tuple(maps), programs=programs)


def _syscall_types():
    from hybrid.bridge.plan import SYSCALL_BRIDGEABLE

    return SYSCALL_BRIDGEABLE
