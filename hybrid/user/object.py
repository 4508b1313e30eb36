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

    def __init__(self, spec, *, region_name: str | None = None, keep_region: bool = False):
        from hybrid.user.maps import Region

        self.spec = spec
        self.name = spec.name
        self._attachments = set()
        try:
            self.region = Region(spec.maps, name=region_name, keep=keep_region) if spec.maps else None
        except MapError as e:  # say which object the map comes from
            raise MapError(e.errno, e.map, e.op, "%s, in object %r" % (e.detail or os.strerror(e.errno), spec.name)) \
                from None
        try:
            self.maps: Mapping[str, object] = {m.name: m for m in self.region.maps} if self.region else {}
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
            self._fill_prog_arrays()
        except BaseException:
            self.close()
            raise
        self._active: set[str] = set()
        self._lock = threading.Lock()

    # --- attaching (hybrid/user/attach/agent.py) ----------------------------------------

    def attach(self, pid: int | None = None, *, programs=None, engine: str = "jit"):
        """Attach the userspace programs (uprobe, uretprobe, usdt, syscall tracepoints).

        Without ``pid`` in this process (library mode, ``engine`` jit or
        aot); with ``pid`` in that running process (through ptrace, AOT code).
        Returns an :class:`~hybrid.user.attach.agent.Attachment`; its
        ``detach()`` restores every patched byte.  Raises
        :class:`~hybrid.errors.AttachError` with nothing changed.
        """
        from hybrid.user.attach.agent import attach

        return attach(self, pid, programs=programs, engine=engine)

    def launch(self, argv, *, programs=None, **popen_kw):
        """Start ``argv`` with the userspace programs attached before its ``main``; see ``agent.launch``."""
        from hybrid.user.attach.agent import launch

        return launch(self, argv, programs=programs, **popen_kw)

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
        errors = []
        for att in list(self._attachments):
            try:
                att.detach()
            except Exception as e:  # noqa: BLE001 - close everything, then report
                errors.append(e)
        self._unregister()
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
        return "<BpfObject %r: programs %s, maps %s>" % (self.name, sorted(self.programs), sorted(self.maps))


def load(path: str | os.PathLike | bytes, *, values: Mapping[str, int | bytes] | None = None,
         region_name: str | None = None, keep_region: bool = False) -> BpfObject:
    """Load a clang-compiled eBPF object into the userspace VM.

    ``values`` sets global variables before load, as a libbpf skeleton's
    ``skel->rodata->name = value`` does for ``const volatile`` values.
    Raises a :class:`~hybrid.errors.HybridError` naming what is wrong and where.
    """
    from hybrid.user.elf import load_object_spec

    try:
        spec = load_object_spec(path)
    except OSError as e:
        raise HybridError("%s: %s" % (os.fsdecode(path) if not isinstance(path, bytes) else "<bytes>",
                                      e.strerror)) from None
    if values:
        spec = spec.with_values(**values)
    return BpfObject(spec, region_name=region_name, keep_region=keep_region)
