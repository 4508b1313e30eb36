"""A clang-compiled eBPF object loaded into the kernel through libbpf.

::

    with KernelObject("count.bpf.o", initial={".rodata": struct.pack("<I", os.getpid())}) as obj:
        obj.attach("count")                     # by section: tracepoint/..., raw_tp/..., uprobe/...
        ...
        print(obj.maps["counts"].lookup(b"\\0\\0\\0\\0"))

Opening applies the options before ``bpf_object__load``: ``programs`` (a
set of names: only those load, the others get ``autoload`` off),
``map_flags`` (extra ``map_flags`` by map name, e.g. ``BPF_F_MMAPABLE``),
``initial`` (initial values of global data maps, by libbpf's internal name
``demo_bpf.rodata`` or by section name ``.rodata``/``.data``/``.bss``; a
shorter value replaces the start), ``reuse`` (a map name -> a
:class:`~hybrid.kernel.maps.KernelMap` or fd the object uses instead of
creating the map: ``bpf_map__reuse_fd``), ``pin_root`` (where
``LIBBPF_PIN_BY_NAME`` maps are pinned; it must be on a bpf filesystem) and
``maps`` (a set of map names: only those are created, the others get
``autocreate`` off; None = every map).

Before loading, every program that would load is checked against the
kernel's features (a ``kprobe/`` program on a kernel without kprobes is a
:class:`~hybrid.errors.FeatureError` naming the program, its section, the
missing feature and the alternative) and every map type is probed.  Any
failure releases everything created so far: no fd is left open.
"""

from __future__ import annotations

import ctypes
import errno as E
import os
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

from hybrid.closable import Closable
from hybrid.errors import KernelError
from hybrid.kernel import features
from hybrid.kernel import libbpf as L
from hybrid.kernel.attach import Link, Section
from hybrid.kernel.attach import attach as _attach
from hybrid.kernel.maps import KernelMap


@dataclass(frozen=True)
class KernelProgram:
    """A loaded program of a :class:`KernelObject` (its fd is the object's: valid until it closes)."""

    name: str
    section: str
    fd: int
    id: int
    type: int  # enum bpf_prog_type

    @property
    def type_name(self) -> str:
        s = L.lib().libbpf_bpf_prog_type_str(self.type)
        return s.decode() if s else "type %d" % self.type


def _bpf_unusable(detail: str) -> str:
    if features.NEEDS_ROOT in detail:
        return "loading eBPF programs and maps into the kernel %s" % features.NEEDS_ROOT
    return detail


def _prog_id(fd: int) -> int:
    info = L.ProgInfo()
    size = L.U32(ctypes.sizeof(info))
    if L.lib().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)):
        return 0
    return info.id


class KernelObject(Closable):
    """An ELF object loaded into the kernel by libbpf; see the module doc.

    ``maps``: name -> :class:`KernelMap` (owned by the object, valid until :meth:`close`);
    ``programs``: name -> :class:`KernelProgram` of the loaded programs.
    """

    def __init__(self, path: str | os.PathLike, *, programs: Iterable[str] | None = None,
                 map_flags: Mapping[str, int] | None = None, initial: Mapping[str, bytes] | None = None,
                 reuse: Mapping[str, KernelMap | int] | None = None, pin_root: str | os.PathLike | None = None,
                 maps: Iterable[str] | None = None):
        self.path = os.fspath(path)
        self.name = os.path.basename(self.path)
        self._obj = None
        self._links: list[Link] = []
        self._consumers: list[Closable] = []
        self._prog_ptrs: dict[str, int] = {}
        self._map_ptrs: dict[str, int] = {}
        self.maps: dict[str, KernelMap] = {}
        self.programs: dict[str, KernelProgram] = {}
        try:
            self._open(pin_root)
            self._configure(programs, map_flags or {}, initial or {}, reuse or {}, maps)
            self._check(pin_root is not None)
            self._load()
            self._collect()
        except BaseException:
            self.close()
            raise

    # --- opening and loading -------------------------------------------------------------

    def _open(self, pin_root) -> None:
        try:
            os.stat(self.path)
        except FileNotFoundError:
            raise KernelError("%s: no such file" % self.path, E.ENOENT) from None
        except OSError as e:
            raise L.error("%s: open" % self.path, e.errno or E.EIO) from None
        pin = None
        if pin_root is not None:
            pin_root = os.fspath(pin_root)
            problem = features.bpffs_problem(pin_root)
            if problem:
                raise KernelError("%s: pin_root: %s" % (self.path, problem), E.EINVAL)
            pin = os.fsencode(os.path.abspath(pin_root))
        opts = L.ObjectOpenOpts(pin_root_path=pin)
        with L.capture() as cap:
            obj = L.lib().bpf_object__open_file(os.fsencode(self.path), ctypes.byref(opts))
        if not obj:
            err = ctypes.get_errno() or E.EINVAL
            said = cap.summary(2)
            why = "not a valid eBPF object file" if err in (E.EINVAL, E.ENOEXEC, E.EPROTO, E.ENOTSUP) else None
            detail = "; ".join(x for x in (why or L.strerror(err), "libbpf: " + said if said else "") if x)
            raise L.error("%s: open" % self.path, err, detail)
        self._obj = obj
        lib = L.lib()
        p = lib.bpf_object__next_program(obj, None)
        while p:
            self._prog_ptrs[lib.bpf_program__name(p).decode()] = p
            p = lib.bpf_object__next_program(obj, p)
        m = lib.bpf_object__next_map(obj, None)
        while m:
            self._map_ptrs[lib.bpf_map__name(m).decode()] = m
            m = lib.bpf_object__next_map(obj, m)

    def _section(self, name: str) -> str:
        s = L.lib().bpf_program__section_name(self._prog_ptrs[name])
        return s.decode() if s else "?"

    def _what(self, name: str) -> str:
        return "program %r (%s)" % (name, self._section(name))

    def _find_map(self, name: str) -> tuple[str, int]:
        """A map by libbpf's name, or a global data map by its section name (``.rodata``)."""
        if name in self._map_ptrs:
            return name, self._map_ptrs[name]
        if name.startswith("."):
            lib = L.lib()
            hits = [(n, p) for n, p in self._map_ptrs.items() if lib.bpf_map__is_internal(p) and n.endswith(name)]
            if len(hits) == 1:
                return hits[0]
        raise KernelError("%s: no map %r (maps: %s)" % (self.name, name, ", ".join(self._map_ptrs) or "none"),
                          E.ENOENT)

    def _configure(self, programs, map_flags, initial, reuse, maps) -> None:
        lib = L.lib()
        if maps is not None:
            create = {self._find_map(n)[0] for n in ({maps} if isinstance(maps, str) else maps)}
            for name, m in self._map_ptrs.items():
                if name not in create:
                    L.check(L.function("bpf_map__set_autocreate")(m, False),
                            "%s: map %r: set autocreate off" % (self.name, name))
        if programs is not None:
            wanted = {programs} if isinstance(programs, str) else set(programs)
            unknown = wanted - set(self._prog_ptrs)
            if unknown:
                raise KernelError("%s: no program %s (programs: %s)"
                                  % (self.name, ", ".join(map(repr, sorted(unknown))),
                                     ", ".join(self._prog_ptrs) or "none"), E.ENOENT)
            for name, p in self._prog_ptrs.items():
                lib.bpf_program__set_autoload(p, name in wanted)
        for name, flags in map_flags.items():
            real, m = self._find_map(name)
            L.check(lib.bpf_map__set_map_flags(m, lib.bpf_map__map_flags(m) | flags),
                    "%s: map %r: set map_flags %#x" % (self.name, real, flags))
        for name, value in initial.items():
            real, m = self._find_map(name)
            self._set_initial(real, m, bytes(value))
        for name, target in reuse.items():
            real, m = self._find_map(name)
            fd = target.fd if isinstance(target, KernelMap) else int(target)
            L.check(lib.bpf_map__reuse_fd(m, fd), "%s: map %r: reuse fd %d" % (self.name, real, fd),
                    lambda err: "not a bpf map fd" if err in (E.EBADF, E.EINVAL) else None)

    def _set_initial(self, name: str, m: int, value: bytes) -> None:
        lib = L.lib()
        size = L.SZ(0)
        cur = lib.bpf_map__initial_value(m, ctypes.byref(size))
        what = "%s: map %r: initial value" % (self.name, name)
        if not cur:
            raise KernelError("%s: not a global data map (.data, .rodata, .bss)" % what, E.EINVAL)
        if len(value) > size.value:
            raise KernelError("%s: %d bytes, the map's value is %d bytes" % (what, len(value), size.value), E.EINVAL)
        full = value + ctypes.string_at(cur, size.value)[len(value):]
        L.check(lib.bpf_map__set_initial_value(m, full, len(full)), what)

    def _check(self, pin_root_checked: bool) -> None:
        """Refuse, before anything is created, what this kernel cannot do (or this process may not)."""
        lib = L.lib()
        bpf = features.check("bpf")
        if not bpf.available:
            raise L.error("%s: load" % self.name, E.EPERM if features.NEEDS_ROOT in bpf.detail else E.ENOSYS,
                          _bpf_unusable(bpf.detail))
        for name, p in self._prog_ptrs.items():
            if not lib.bpf_program__autoload(p):
                continue
            sec = Section.parse(self._section(name))
            if sec.feature is not None:
                features.require(sec.feature, self._what(name), sec.target or None,
                                 syscall=sec.kind in ("ksyscall", "kretsyscall"))
        for name, m in self._map_ptrs.items():
            if lib.bpf_map__is_internal(m) or not lib.bpf_map__autocreate(m):
                continue
            t = lib.bpf_map__type(m)
            if not features.map_type(t).available:
                features.require_map_type(t, "%s: map %r" % (self.name, name))
            pin = lib.bpf_map__pin_path(m)
            if pin and not pin_root_checked:
                d = os.path.dirname(pin.decode())
                problem = features.bpffs_problem(d)
                if problem:
                    raise KernelError("%s: map %r is pinned at %s (LIBBPF_PIN_BY_NAME): %s"
                                      % (self.name, name, pin.decode(), problem), E.EINVAL)

    def _load(self) -> None:
        with L.capture() as cap:
            rc = L.lib().bpf_object__load(self._obj)
        if rc:
            raise self._load_error(L.errno_of(rc), cap)

    def _load_error(self, err: int, cap: L.capture) -> KernelError:
        prog = cap.failed_program()
        if prog is not None and prog in self._prog_ptrs:
            what = "%s: load" % self._what(prog)
            log = cap.verifier_log(prog)
            if log:
                lines = L.verifier_reason(log)
                return L.error(what, err, "the verifier refused it: %s\n  verifier log (last lines):\n    %s"
                               % (lines[-1] if lines else "?", "\n    ".join(lines)))
        else:
            what = "%s: load" % self.name
        bpf = features.check("bpf")
        if not bpf.available:
            return L.error(what, err, _bpf_unusable(bpf.detail))
        said = cap.summary(3)
        return L.error(what, err, "%s (libbpf: %s)" % (L.strerror(err), said) if said else None)

    def _collect(self) -> None:
        lib = L.lib()
        for name, p in self._prog_ptrs.items():
            fd = lib.bpf_program__fd(p)
            if fd >= 0:
                self.programs[name] = KernelProgram(name, self._section(name), fd, _prog_id(fd),
                                                    lib.bpf_program__type(p))
        for name, m in self._map_ptrs.items():
            fd = lib.bpf_map__fd(m)
            if fd >= 0:
                self.maps[name] = KernelMap(fd, owned=False, name=name)

    # --- access ----------------------------------------------------------------------------

    def _live(self):
        if not self._obj:
            raise KernelError("%s: the object is closed" % self.name, E.EBADF)
        return self._obj

    def map(self, name: str) -> KernelMap:
        """A map by name; global data maps also by section name (``.rodata``, ``.bss``, ``.data``)."""
        self._live()
        real, _ = self._find_map(name)
        m = self.maps.get(real)
        if m is None:
            raise KernelError("%s: map %r was not created" % (self.name, real), E.ENOENT)
        return m

    def _map_arg(self, m: str | KernelMap) -> KernelMap:
        return self.map(m) if isinstance(m, str) else m

    def _program(self, name: str | None) -> tuple[str, int]:
        self._live()
        if name is None:
            if len(self.programs) != 1:
                raise KernelError("%s: attach: name the program (loaded: %s)" % (
                    self.name, ", ".join(self.programs) or "none"), E.EINVAL)
            name = next(iter(self.programs))
        if name not in self.programs:
            why = "was not loaded" if name in self._prog_ptrs else "does not exist"
            raise KernelError("%s: program %r %s (loaded: %s)" % (self.name, name, why,
                                                                  ", ".join(self.programs) or "none"), E.ENOENT)
        return name, self._prog_ptrs[name]

    # --- attaching -----------------------------------------------------------------------------

    def attach(self, name: str | None = None, *, pid: int | None = None, binary: str | None = None,
               func: str | None = None, offset: int | None = None, **options) -> Link:
        """Attach program ``name`` (the only one when None) by its section; see :func:`hybrid.kernel.attach.attach`
        for ``retprobe``, ``ref_ctr_offset``, ``cookie``, ``tracepoint``, ``provider``/``probe`` (USDT),
        ``frequency``/``period``/``perf_type``/``perf_config``/``cpus`` (perf_event).  The link is
        detached by ``link.close()`` or by :meth:`close`."""
        name, p = self._program(name)
        link = _attach(p, name, self.programs[name].section, pid=pid, binary=binary, func=func, offset=offset,
                       on_close=self._forget_link, **options)
        self._links.append(link)
        return link

    def attach_all(self, pid: int | None = None) -> list[Link]:
        """Attach every loaded program whose section names its attach point (uprobes and USDT probes
        filtered to ``pid``); all or nothing."""
        self._live()
        links: list[Link] = []
        try:
            for name, prog in self.programs.items():
                sec = Section.parse(prog.section)
                if sec.auto_attachable:
                    links.append(self.attach(name, pid=pid if sec.kind in ("uprobe", "uretprobe", "usdt") else None))
        except BaseException:
            for link in links:
                link.close()
            raise
        return links

    def _forget_link(self, link: Link) -> None:
        try:
            self._links.remove(link)
        except ValueError:
            pass

    @property
    def links(self) -> list[Link]:
        return list(self._links)

    # --- event channels ------------------------------------------------------------------------

    def ring_buffer(self, map: str | KernelMap, callback: Callable[[bytes], int | None]):
        """A :class:`~hybrid.kernel.events.RingBuffer` on a ring buffer map (closed with the object)."""
        from hybrid.kernel.events import RingBuffer

        self._live()
        return self._keep(RingBuffer(self._map_arg(map), callback))

    def perf_buffer(self, map: str | KernelMap, callback: Callable[[int, bytes], object],
                    lost: Callable[[int, int], object] | None = None, pages: int = 8):
        """A :class:`~hybrid.kernel.events.PerfBuffer` on a perf event array (closed with the object)."""
        from hybrid.kernel.events import PerfBuffer

        self._live()
        return self._keep(PerfBuffer(self._map_arg(map), callback, lost, pages))

    def user_ring_buffer(self, map: str | KernelMap):
        """A :class:`~hybrid.kernel.events.UserRingBuffer` on a user ring buffer map (closed with the object)."""
        from hybrid.kernel.events import UserRingBuffer

        self._live()
        return self._keep(UserRingBuffer(self._map_arg(map)))

    def _keep(self, consumer):
        self._consumers.append(consumer)
        return consumer

    # --- lifetime --------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return not self._obj

    def close(self) -> None:
        """Close consumers, detach links, destroy the bpf_object (its maps' and programs' fds); idempotent."""
        consumers, self._consumers = getattr(self, "_consumers", []), []
        for c in consumers:
            c.close()
        links, self._links = getattr(self, "_links", []), []
        for link in links:
            link.close()
        for m in getattr(self, "maps", {}).values():
            m._invalidate()
        obj, self._obj = getattr(self, "_obj", None), None
        if obj:
            L.lib().bpf_object__close(obj)

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def __repr__(self) -> str:
        return "<KernelObject %s: programs %s, maps %s%s>" % (self.name, ", ".join(self.programs),
                                                             ", ".join(self.maps), ", closed" if self.closed else "")
