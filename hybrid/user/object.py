"""A loaded eBPF object: its maps in a shared region and its verified programs.

``hybrid.load(path)`` is the public entry point::

    with hybrid.load("prog.bpf.o", values={"target_pid": 42}) as obj:
        obj.programs["handle"].run(pt_regs_bytes, engine="jit")
        obj.maps["counts"].lookup(key)

Loading parses the ELF (``elf.load_object_spec``: sections, BTF, relocations,
CO-RE), creates every map in one shared region, and verifies every program
against those maps.  Engines are built on first use and kept until
``close()``; tail calls reach the programs of the same object on the same
engine.
"""

from __future__ import annotations

import itertools
import os
import threading
from typing import Mapping

from hybrid.closable import Closable
from hybrid.errors import HybridError, MapError, VerifierError
from hybrid.user.engine import Engine, create_engine
from hybrid.user.program import Program

PT_REGS_SIZE = 168  # the context of uprobe programs: x86-64 struct pt_regs

_ids = itertools.count(1)
_kept: list = []  # objects whose code must outlive close() (see BpfObject.close)
_ids_lock = threading.Lock()


def _next_id() -> int:
    with _ids_lock:
        return next(_ids)


class LoadedProgram:
    """One program of an object: its spec, its verified :class:`Program` and its engines."""

    def __init__(self, obj: "BpfObject", spec, program: Program):
        self.object = obj
        self.spec = spec
        self.program = program
        self.id = _next_id()
        self._engines: dict[str, Engine] = {}

    name = property(lambda self: self.spec.name)
    section = property(lambda self: self.spec.section)
    kind = property(lambda self: self.spec.kind)
    attach_target = property(lambda self: self.spec.attach)

    def engine(self, kind: str = "jit") -> Engine:
        """The engine ``kind`` for this program, built on first use (with the rest of the object's programs)."""
        eng = self._engines.get(kind)
        if eng is None:
            self.object._activate(kind)
            eng = self._engines[kind]
        return eng

    def run(self, ctx: bytes | bytearray | None = None, engine: str = "jit") -> int:
        """Run once in this process and return r0 as an unsigned 64-bit int.

        For uprobe-type programs ``ctx`` is the 168-byte x86-64 ``struct pt_regs``.
        A ``bytearray`` gets the program's writes back.
        """
        return self.engine(engine).run(ctx)

    def disasm(self) -> str:
        return self.program.disasm()

    def close(self) -> None:
        for eng in self._engines.values():
            eng.close()
        self._engines.clear()

    def __repr__(self) -> str:
        return "<LoadedProgram %r (%s, %d insns)>" % (self.name, self.section, len(self.program.insns))


class BpfObject(Closable):
    """Maps and programs of one ELF object; close it (or use ``with``) to free them."""

    def __init__(self, spec, *, region_name: str | None = None, keep_region: bool = False, kernel_side=None,
                 unavailable: Mapping[str, str] | None = None):
        from hybrid import registry
        from hybrid.user.maps import Region

        self.spec = spec
        self.name = spec.name
        self.path = None  # the ELF file (set by load())
        self._attachments = set()
        self.kernel_side = kernel_side
        self.unavailable = dict(unavailable or {})
        nprogs = sum(1 for p in spec.programs if p.autoload)
        try:
            # the region also holds the programs' run counts (hybrid/user/stats.py)
            self.region = Region(spec.maps, name=region_name, keep=keep_region, stats_progs=nprogs,
                                 stats_enabled=registry.stats_default()) if spec.maps or nprogs else None
        except MapError as e:  # say which object the map comes from
            raise MapError(e.errno, e.map, e.op, "%s, in object %r" % (e.detail or os.strerror(e.errno), spec.name)) \
                from None
        try:
            self.maps: Mapping[str, object] = {m.name: m for m in self.region.maps} if self.region else {}
            if kernel_side is not None:  # maps whose truth is in the kernel: the kernel map itself
                for name, role in kernel_side.roles.items():
                    if role == "mirror" or name in kernel_side.placeholders:
                        self.maps[name] = kernel_side.kernel_map(spec.map(name))
            refs = self.region.map_refs() if self.region else {}
            regions = self.region.mem_regions() if self.region else ()
            self.programs: dict[str, LoadedProgram] = {}
            for pspec in spec.programs:
                if not pspec.autoload:
                    continue
                try:
                    prog = Program.load(pspec.insns, name=pspec.name, maps=refs, regions=regions)
                except VerifierError as e:
                    failure = pspec.core_failure_at(e.pc) if e.pc is not None else None
                    detail = " (%s)" % failure.message if failure else ""
                    raise VerifierError("program %r (section %r): %s%s" % (pspec.name, pspec.section, e, detail),
                                        e.pc) from None
                self.programs[pspec.name] = LoadedProgram(self, pspec, prog)
                self.programs[pspec.name].stats_index = len(self.programs) - 1
            self._fill_prog_arrays()
        except BaseException:
            self.close()
            raise
        self._active: set[str] = set()
        self._lock = threading.Lock()

    # --- inspection (hybrid/registry.py, hybrid/inspection.py) ------------------------------

    def _publish(self) -> None:
        """Write this object's registry record (what ``hybrid prog list`` and co. show)."""
        from hybrid import registry

        if getattr(self, "region", None) is not None or getattr(self, "kernel_side", None) is not None:
            registry.publish(self)

    def stats(self) -> dict:
        """``{program name: ProgStats(runs, run_time_ns)}``: how often probes ran each program, in every
        process, and for how long while run-time statistics are on (``run_time_ns`` None until they
        were first turned on: ``set_stats(True)``, ``hybrid stats on``, or ``HYBRID_STATS=1`` at load)."""
        from hybrid.user import stats
        from hybrid.user.maps import ffi

        region = self.region
        if region is None or not region.stats_size:
            return {}
        buf = bytes(ffi.buffer(ffi.cast("char *", region.base + region.stats_offset), region.stats_size))
        _enabled, rows = stats.parse(buf)
        return {lp.name: rows[lp.stats_index] for lp in self.programs.values()}

    def set_stats(self, on: bool) -> None:
        """Measure the programs' run time (rdtsc around each run), or stop measuring it."""
        from hybrid.user import stats

        if self.region is not None and self.region.stats_size:
            stats.set_enabled(self.region.path, self.region.stats_offset, on)

    # --- attaching (hybrid/user/attach/agent.py) ----------------------------------------

    def attach(self, pid: int | None = None, *, programs=None, engine: str = "jit", targets=None):
        """Attach the userspace programs (uprobe, uretprobe, usdt, syscall tracepoints).

        Without ``pid`` in this process (library mode, ``engine`` jit or
        aot); with ``pid`` in that running process (through ptrace, AOT code).
        ``targets`` ({program: target}, a target like ``"uprobe//bin/prog:0x1139"``)
        attaches those programs there instead of where their sections say.
        Returns an :class:`~hybrid.user.attach.agent.Attachment`; its
        ``detach()`` restores every patched byte.  Raises
        :class:`~hybrid.errors.AttachError` with nothing changed.
        """
        from hybrid.user.attach.agent import attach

        self._check_available(programs)
        att = attach(self, pid, programs=programs, engine=engine, targets=targets) \
            if targets or self._has_user_probes(programs) else None
        if self.kernel_side is not None and programs is None:
            try:
                links = self.kernel_side.attach(pid)
            except BaseException:
                if att is not None:
                    att.detach()
                raise
            if att is None:
                att = KernelAttachment(self, pid, links)
                self._attachments.add(att)
                self._publish()
                return att
            att.kernel_links = links
        elif att is None:  # nothing on either side: the agent's planner says why
            return attach(self, pid, programs=programs, engine=engine, targets=targets)
        self._publish()
        return att

    def launch(self, argv, *, programs=None, **popen_kw):
        """Start ``argv`` with the userspace programs attached before its ``main``; see ``agent.launch``.

        Kernel programs of the object are attached too (uprobes in the kernel for the new process).
        """
        from hybrid.user.attach.agent import launch

        self._check_available(programs)
        if self._has_user_probes(programs):
            launched = launch(self, argv, programs=programs, **popen_kw)
        else:
            import subprocess

            launched = _PlainLaunch(subprocess.Popen(list(argv), **popen_kw))
        if self.kernel_side is not None and programs is None:
            try:
                links = self.kernel_side.attach(launched.pid)
            except BaseException:
                launched.close()
                raise
            if launched.attachment is not None:
                launched.attachment.kernel_links = links
        self._publish()
        return launched

    def attach_kernel(self, pid: int | None = None) -> list:
        """Attach the kernel programs only (tracepoints once; kernel uprobes for ``pid``, all processes if None)."""
        if self.kernel_side is None:
            return []
        links = self.kernel_side.attach(pid)
        self._publish()
        return links

    def _has_user_probes(self, programs) -> bool:
        from hybrid.user.attach.agent import userspace_kind

        if programs is not None:
            return True
        return any(userspace_kind(lp) is not None for lp in self.programs.values()
                   if lp.name not in self.unavailable)

    def _check_available(self, programs) -> None:
        from hybrid.errors import FeatureError

        for name in (programs if programs is not None else ()):
            if name in self.unavailable:
                raise FeatureError(self.unavailable[name])

    @property
    def kernel(self):
        """The :class:`~hybrid.kernel.object.KernelObject` of the kernel programs, or None."""
        return self.kernel_side.kernel if self.kernel_side is not None else None

    def sync(self) -> None:
        """Bring mirrored maps and forwarded rings up to date now (they also sync on their own, see mirror.py)."""
        if self.kernel_side is not None:
            self.kernel_side.sync()

    def ring_buffer(self, name: str, callback):
        """A consumer of ring buffer ``name`` with ``callback(bytes)``, reading both sides' rings if both write it."""
        return self._consumer(name, callback, None, perf=False)

    def perf_buffer(self, name: str, callback, lost_callback=None):
        """A consumer of perf event array ``name``: ``callback(cpu, bytes)``, both sides' rings if both write it."""
        return self._consumer(name, callback, lost_callback, perf=True)

    def _consumer(self, name, callback, lost_callback, perf: bool):
        from hybrid.user.maps import PerfBufferConsumer, RingBufferConsumer

        role = self.kernel_side.roles.get(name, "user") if self.kernel_side is not None else "user"
        if name not in self.maps:
            raise KeyError("object %r has no map %r" % (self.name, name))
        parts = []
        if role in ("kernel", "rings"):
            from hybrid.kernel import events

            km = self.kernel_side.kernel_map(self.spec.map(name))
            parts.append(events.PerfBuffer(km, callback, lost=lost_callback) if perf
                         else events.RingBuffer(km, callback))
        if role in ("user", "rings"):
            m = self.region[name]
            parts.append(PerfBufferConsumer(m, callback, lost_callback) if perf else RingBufferConsumer(m, callback))
        if len(parts) == 1:
            return parts[0]
        from hybrid.bridge.events import CombinedConsumer

        return CombinedConsumer(parts)

    _attachments: set = set()  # replaced per object in __init__ (class default for half-built objects)
    _keep_code = False  # a detach whose grace period did not complete: never free program code

    def _fill_prog_arrays(self) -> None:
        """``.values = { [0] = &prog }`` slots of PROG_ARRAY maps, by program id."""
        from hybrid.user.maps import MapType

        for mspec in self.spec.maps:
            if mspec.type != MapType.PROG_ARRAY:
                continue
            for slot, prog_name in enumerate(mspec.values or ()):
                if prog_name and prog_name in self.programs:
                    self.maps[mspec.name].update(slot.to_bytes(4, "little"), self.programs[prog_name].id)

    def _activate(self, kind: str) -> None:
        """Build engine ``kind`` for every program and make tail calls reach them."""
        from hybrid.user import interp
        from hybrid.user.maps import register_program

        with self._lock:
            if kind in self._active:
                return
            for lp in self.programs.values():
                if kind not in lp._engines:
                    lp._engines[kind] = create_engine(kind, lp.program)
            for lp in self.programs.values():
                if kind == "interp":
                    interp.TAIL_PROGRAMS[lp.id] = lp.program
                else:
                    register_program(lp.id, lp._engines[kind].address)
            self._active = {kind}  # one engine kind owns the tail-call targets at a time

    def program_id(self, name: str) -> int:
        """The id a PROG_ARRAY holds for program ``name`` (``obj.maps["jmp"].update(k, obj.program_id("p"))``)."""
        return self.programs[name].id

    def _unregister(self) -> None:
        """Make this object's program ids tail-call nowhere (before their code and maps go away).

        Ids are global: another object's PROG_ARRAY may hold one (set from
        Python, or by a program's map_update_elem), and a tail call through it
        must then fall through, not run freed code against unmapped maps.
        """
        from hybrid.user import interp
        from hybrid.user.maps import register_program

        for lp in getattr(self, "programs", {}).values():
            interp.TAIL_PROGRAMS.pop(lp.id, None)
            if getattr(self, "_active", None):
                register_program(lp.id, 0)

    def close(self) -> None:
        """Detach, free the engines and unmap the maps.  Idempotent.

        Attachments in other processes are detached; their copy of the maps
        stays mapped there until they exit.
        """
        from hybrid import registry

        errors = []
        for att in list(self._attachments):
            try:
                att.detach()
            except Exception as e:  # noqa: BLE001 - close everything, then report
                errors.append(e)
        registry.withdraw(self)
        self._unregister()
        side, self.kernel_side = getattr(self, "kernel_side", None), None
        if side is not None:  # final mirror syncs and forwards, then links and the kernel object
            try:
                side.close()
            except Exception as e:  # noqa: BLE001
                errors.append(e)
        if self._keep_code:  # a thread may still run a detached program here: leak its code and maps
            _kept.append(self)
            return
        for lp in getattr(self, "programs", {}).values():
            lp.close()
        region, self.region = getattr(self, "region", None), None
        if region is not None:
            region.close()
        if errors:
            raise errors[0]

    def __repr__(self) -> str:
        kernel = ", kernel programs %s" % sorted(self.kernel_side.placement.kernel) if self.kernel_side else ""
        return "<BpfObject %r: programs %s%s, maps %s>" % (self.name, sorted(self.programs), kernel, sorted(self.maps))


class KernelAttachment(Closable):
    """Kernel programs of an object attached (an object without userspace probes); ``detach()`` removes them."""

    def __init__(self, obj: BpfObject, pid: int | None, links: list):
        self.object = obj
        self.pid = pid
        self.placements = ()
        self.kernel_links = links
        self.attached = True

    def detach(self) -> None:
        if not self.attached:
            return
        self.attached = False
        side = self.object.kernel_side
        for link in self.kernel_links:
            link.close()
            if side is not None and link in side.links:
                side.links.remove(link)
        self.object._attachments.discard(self)
        self.object._publish()

    close = detach


class _PlainLaunch:
    """A command started without userspace probes (only kernel programs watch it)."""

    def __init__(self, popen):
        self.popen = popen
        self.pid = popen.pid
        self.attachment = None

    def wait(self, timeout=None):
        return self.popen.wait(timeout)

    @property
    def returncode(self):
        return self.popen.returncode

    def detach(self) -> None:
        pass

    def close(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getattr__(self, name):
        return getattr(self.popen, name)


def read_spec(path: str | os.PathLike | bytes, values: Mapping[str, int | bytes] | None = None):
    """The :class:`~hybrid.user.elf.ObjectSpec` of an object file (or its bytes), ``values`` set in its
    ``const volatile`` globals; a missing file is a :class:`~hybrid.errors.HybridError` naming it."""
    from hybrid.user.elf import load_object_spec

    try:
        spec = load_object_spec(path)
    except OSError as e:
        raise HybridError("%s: %s" % (os.fsdecode(path) if not isinstance(path, bytes) else "<bytes>",
                                      e.strerror)) from None
    return spec.with_values(**values) if values else spec


def load(path: str | os.PathLike | bytes, *, values: Mapping[str, int | bytes] | None = None,
         region_name: str | None = None, keep_region: bool = False, kernel=None,
         mirror: Mapping[str, object] | None = None, share: Mapping[str, object] | None = None,
         pin_root: str | None = None) -> BpfObject:
    """Load a clang-compiled eBPF object: userspace programs into the VM, kernel programs into the kernel.

    ``values`` sets global variables before load, as a libbpf skeleton's
    ``skel->rodata->name = value`` does for ``const volatile`` values (on both sides).
    ``kernel`` chooses where programs run (None: automatic, False: the VM
    only, True: the kernel wherever it can, or names of programs to put in
    the kernel; see :mod:`hybrid.bridge.plan`).  Maps that both sides use are
    shared: arrays by mmap, other maps through bpf(); ``mirror={name: seconds}``
    keeps a hot hash map in userspace, synced to the kernel in batches; ``share={name:
    kernel map or fd}`` uses an existing kernel map (a bcc table, say).
    ``pin_root`` is where maps with ``LIBBPF_PIN_BY_NAME`` are pinned (a bpffs directory).
    Raises a :class:`~hybrid.errors.HybridError` naming what is wrong and where,
    with nothing left loaded.
    """
    spec = read_spec(path, values)
    if isinstance(path, bytes):
        if kernel or share:
            raise HybridError("an object given as bytes can only be loaded into the VM (kernel=False)")
        kernel = False
    from hybrid.bridge.loader import load as load_both

    obj = load_both(spec, os.fspath(path) if not isinstance(path, bytes) else None, kernel=kernel,
                    mirror=mirror, share=share, pin_root=pin_root, region_name=region_name,
                    keep_region=keep_region)
    if not isinstance(path, bytes):
        obj.path = os.path.abspath(os.fspath(path))
    obj._publish()
    return obj
