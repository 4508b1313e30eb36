"""Attaching an object's userspace programs to a process: plan, place, detach.

Three places, one mechanism (the agent spec, see ``hybrid/native/agent.h``):

- this process (library mode, ``obj.attach()``): the agent code is part of
  ``hybrid._native`` and the programs are the JIT's code;
- a running process (``obj.attach(pid=N)``): the agent library is loaded
  into it through ptrace (``inject.py``) and each program is an AOT-built
  shared library;
- a command at launch (``obj.launch(argv)``): the agent is ``LD_PRELOAD``ed
  and applies the spec in its constructor, before ``main``.

Everything that can fail is done here, in Python, before the target is
touched: symbols, libraries and USDT notes are resolved, every patch window
is decoded and checked (``x86.py``), programs are compiled.  The agent then
only checks that the bytes are what the plan expects and patches; an apply
is all-or-nothing.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

from hybrid.closable import Closable
from hybrid.errors import AttachError, HybridError

if TYPE_CHECKING:  # pragma: no cover
    from hybrid.user.object import BpfObject, LoadedProgram

# FLAGS of an ``uprobe`` spec line.
RETURN = 1
ENTRY = 2

_ids_lock = threading.Lock()
_next_attach = [int.from_bytes(os.urandom(3), "little") << 4 | 1]


def _attach_id() -> int:
    """An attachment id, unique in this controller and unlikely to meet another controller's in a target."""
    with _ids_lock:
        n = _next_attach[0]
        _next_attach[0] = (n + 1) & 0x7FFF_FFFF or 1
        return n


# --- where probes go ----------------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    """One program attached at one place: what ``Attachment.placements`` lists."""

    id: int
    program: str
    kind: str  # uprobe, uretprobe, usdt, syscall
    where: str  # "libc.so.6:malloc+0 (0x9d0f0)", "syscalls:sys_enter_openat", ...


@dataclass
class _Plan:
    """The spec lines of one attach operation, in order, and what they place."""

    setup: list[str] = field(default_factory=list)  # region, prog
    sites: list[str] = field(default_factory=list)  # site/syssite blocks (idempotent)
    attach: list[str] = field(default_factory=list)  # uprobe, sema, syscall
    placements: list[Placement] = field(default_factory=list)
    seen_sites: set = field(default_factory=set)

    def text(self) -> str:
        return "\n".join(["# hybrid attach spec"] + self.setup + self.sites + self.attach) + "\n"


class _Resolver:
    """Finds files the way the target will see them: libraries, the main executable."""

    def __init__(self, pid: int | None, exe: str | None):
        self.pid = pid
        self.exe = exe

    def binary(self, name: str) -> str:
        from hybrid.user.attach import symbols

        if self.exe and name and os.path.basename(name) == os.path.basename(self.exe) and "/" not in name:
            return self.exe
        try:
            return os.path.realpath(symbols.find_library(name, pid=self.pid))
        except HybridError as e:
            raise AttachError(str(e)) from None

    def libc(self) -> str:
        return self.binary("libc.so.6")


def _program_label(lp: "LoadedProgram") -> str:
    return "program %r (%s)" % (lp.name, lp.section)


def _fail(lp: "LoadedProgram", what: str) -> AttachError:
    return AttachError("%s: %s" % (_program_label(lp), what))


def _site_block(plan: _Plan, window, module: str, head: str = "site", int3: bool = False) -> None:
    key = (head, module, window.vaddr)
    if key in plan.seen_sites:
        return
    plan.seen_sites.add(key)
    plan.sites.extend(window.spec_lines(module, head=head))
    if int3:
        plan.sites.append("mode int3")


def _plan_function_window(lp, module: str, vaddr: int, func_start: int, func_size: int):
    """Decode and check the patch window at ``vaddr`` inside the function at ``func_start``."""
    from hybrid.user.attach import symbols, x86

    try:
        func_code = symbols.read_code(module, func_start, func_size) if func_size else None
        code = symbols.read_code(module, vaddr, 32)
        return x86.plan_window(code, vaddr, func_start=func_start if func_code else None, func_code=func_code)
    except AttachError as e:
        raise _fail(lp, "%s+%#x: %s" % (os.path.basename(module), vaddr, e)) from None
    except HybridError as e:
        raise _fail(lp, str(e)) from None


def _plan_uprobe(plan: _Plan, res: _Resolver, lp, prog_id: int, target=None) -> None:
    import dataclasses

    from hybrid.user.attach import symbols

    t = target or lp.attach_target
    module = res.binary(t.binary)
    try:
        loc = symbols.resolve_uprobe(dataclasses.replace(t, binary=module), res.pid)
    except HybridError as e:
        raise _fail(lp, str(e)) from None
    sym = loc.symbol
    label = "%s+%#x" % (sym.name, loc.vaddr - sym.vaddr) if sym is not None else "%#x" % loc.file_offset
    if t.retprobe and not loc.func_entry:
        raise _fail(lp, "a uretprobe must be at a function's entry, not at %s" % label)
    func_start, func_size = (sym.vaddr, sym.size) if sym is not None else (loc.vaddr, 0)
    window = _plan_function_window(lp, module, loc.vaddr, func_start, func_size)
    _site_block(plan, window, module)
    aid = _attach_id()
    flags = (RETURN if t.retprobe else 0) | (ENTRY if loc.func_entry else 0)
    plan.attach.append("uprobe %d %d %s %#x %d %d" % (aid, prog_id, module, loc.vaddr, t.cookie, flags))
    if t.ref_ctr_offset:
        try:
            sema = symbols.offset_to_vaddr(module, t.ref_ctr_offset)
        except HybridError as e:
            raise _fail(lp, "semaphore at file offset %#x: %s" % (t.ref_ctr_offset, e)) from None
        plan.attach.append("sema %d %s %#x" % (aid, module, sema))
    plan.placements.append(Placement(aid, lp.name, "uretprobe" if t.retprobe else "uprobe",
                                     "%s:%s (%#x)" % (os.path.basename(module), label, loc.vaddr)))


def _plan_usdt(plan: _Plan, res: _Resolver, lp, prog_id: int, usdt_slots: dict, target=None) -> None:
    from hybrid.user.attach import symbols, usdt, x86

    t = target or lp.attach_target
    module = res.binary(t.binary)
    try:
        notes = [n for n in usdt.read_notes(module) if n.provider == t.provider and n.name == t.name]
    except HybridError as e:
        raise _fail(lp, str(e)) from None
    if not notes:
        raise _fail(lp, "%s has no USDT probe %s:%s" % (module, t.provider, t.name))
    obj = lp.object
    specs_map = obj.maps.get("__bpf_usdt_specs")
    for note in notes:
        spec_id = usdt_slots.setdefault("next", 0)
        usdt_slots["next"] = spec_id + 1
        if specs_map is not None:
            if spec_id >= specs_map.max_entries:
                raise _fail(lp, "more USDT sites than __bpf_usdt_specs holds (%d)" % specs_map.max_entries)
            try:
                specs_map.update(spec_id.to_bytes(4, "little"), usdt.encode_spec(note.args, 0))
            except HybridError as e:
                raise _fail(lp, "USDT %s:%s at %#x: %s" % (t.provider, t.name, note.pc, e)) from None
        func = symbols.function_containing(module, note.pc)
        try:
            code = symbols.read_code(module, note.pc, 32)
            window = None
            if func is not None:
                fcode = symbols.read_code(module, func.vaddr, func.size)
                try:
                    window = x86.plan_window(code, note.pc, func_start=func.vaddr, func_code=fcode)
                except AttachError:
                    window = None  # not safe for a jump: trap instead
            int3 = window is None
            if int3:
                window = x86.plan_int3(code, note.pc)
        except HybridError as e:
            raise _fail(lp, "USDT %s:%s at %#x: %s" % (t.provider, t.name, note.pc, e)) from None
        _site_block(plan, window, module, int3=int3)
        aid = _attach_id()
        plan.attach.append("uprobe %d %d %s %#x %d 0" % (aid, prog_id, module, note.pc, spec_id))
        if note.semaphore:
            plan.attach.append("sema %d %s %#x" % (aid, module, note.semaphore))
        plan.placements.append(Placement(aid, lp.name, "usdt", "%s:%s:%s (%#x%s)" % (
            os.path.basename(module), t.provider, t.name, note.pc, ", int3" if int3 else "")))


def _syscall_modules(res: _Resolver) -> list[str]:
    mods = [res.libc()]
    if res.exe and os.path.realpath(res.exe) not in mods and os.path.getsize(res.exe) < (8 << 20):
        mods.append(os.path.realpath(res.exe))
    return mods


def _plan_syscall_sites(plan: _Plan, res: _Resolver) -> None:
    from hybrid.user.attach import x86

    for module in _syscall_modules(res):
        try:
            found = x86.find_syscall_sites(module)
        except HybridError as e:
            raise AttachError("cannot place syscall probes in %s: %s" % (module, e)) from None
        for site in found.sites:
            _site_block(plan, site.window, module, head="syssite")


def _plan_syscall(plan: _Plan, lp, prog_id: int, target=None) -> None:
    from hybrid.user.attach import syscalls
    from hybrid.user.elf import RawTracepointTarget, TracepointTarget

    t = target or lp.attach_target
    aid = _attach_id()
    if isinstance(t, TracepointTarget):
        direction, name = ("enter", t.name[len("sys_enter_"):]) if t.name.startswith("sys_enter_") else \
            ("exit", t.name[len("sys_exit_"):])
        try:
            ev = syscalls.sys_enter_event(name) if direction == "enter" else syscalls.sys_exit_event(name)
        except HybridError as e:
            raise _fail(lp, str(e)) from None
        bad = _record_layout_problem(ev.fields, direction)
        if bad:
            raise _fail(lp, "the kernel's %s record is not laid out as the agent builds it: %s" % (t.name, bad))
        plan.attach.append("syscall %d %d %s %d %d tp" % (aid, prog_id, direction, ev.nr, ev.event_id))
        where = "syscalls:%s" % t.name
    else:
        assert isinstance(t, RawTracepointTarget)
        direction = "enter" if t.name == "sys_enter" else "exit"
        plan.attach.append("syscall %d %d %s -1 0 raw" % (aid, prog_id, direction))
        where = "raw_tp:%s" % t.name
    plan.placements.append(Placement(aid, lp.name, "syscall", where))


# The records the agent builds (agent.c: struct tp_enter, struct tp_exit): the common fields,
# __syscall_nr at 8, then the arguments as 8-byte slots from 16, or ret at 16.
_COMMON = {"common_type": (0, 2), "common_flags": (2, 1), "common_preempt_count": (3, 1), "common_pid": (4, 4),
           "__syscall_nr": (8, 4)}


def _record_layout_problem(fields, direction: str) -> str | None:
    """Why the tracefs format of a syscall event differs from the agent's record (None: it does not)."""
    args = 0
    for f in fields:
        if f.name in _COMMON:
            if (f.offset, f.size) != _COMMON[f.name]:
                return "%s at offset %d size %d" % (f.name, f.offset, f.size)
        elif direction == "exit":
            if (f.name, f.offset, f.size) != ("ret", 16, 8):
                return "%s at offset %d size %d" % (f.name, f.offset, f.size)
        else:
            if (f.offset, f.size) != (16 + 8 * args, 8) or args >= 6:
                return "argument %s at offset %d size %d" % (f.name, f.offset, f.size)
            args += 1
    return None


def userspace_kind(lp: "LoadedProgram", target=None) -> str | None:
    """How ``lp`` runs in a traced process (at ``target`` if given): uprobe, usdt, syscall; None if it cannot."""
    from hybrid.user.elf import RawTracepointTarget, TracepointTarget, UprobeTarget, UsdtTarget

    t = target or lp.attach_target
    if isinstance(t, UprobeTarget):
        return "uprobe"
    if isinstance(t, UsdtTarget):
        return "usdt"
    if isinstance(t, TracepointTarget) and t.category == "syscalls" and (
            t.name.startswith("sys_enter_") or t.name.startswith("sys_exit_")):
        return "syscall"
    if isinstance(t, RawTracepointTarget) and t.name in ("sys_enter", "sys_exit"):
        return "syscall"
    return None


def _targets(obj: "BpfObject", targets) -> dict:
    """``targets`` (program name -> an attach target or a section name such as
    ``"uretprobe//bin/prog:0x1139"``) checked and parsed: name -> target."""
    from hybrid.user.elf import parse_section_name

    out = {}
    for name, t in (targets or {}).items():
        if name not in obj.programs:
            raise AttachError("targets: object %r has no program %r (programs: %s)"
                              % (obj.name, name, ", ".join(sorted(obj.programs)) or "none"))
        if isinstance(t, str):
            info = parse_section_name(t)
            if info.attach is None:
                raise AttachError("targets: %r for program %r: %s" % (t, name, info.attach_error
                                                                       or "names no attach point"))
            t = info.attach
        out[name] = t
    return out


def _select(obj: "BpfObject", programs: Iterable[str] | None, targets: dict | None = None) -> list["LoadedProgram"]:
    targets = targets or {}
    if programs is not None:
        chosen = []
        for name in programs:
            if name not in obj.programs:
                raise AttachError("object %r has no program %r (programs: %s)"
                                  % (obj.name, name, ", ".join(sorted(obj.programs)) or "none"))
            lp = obj.programs[name]
            if (targets.get(name) or lp.attach_target) is None and lp.kind in ("uprobe", "uretprobe", "usdt"):
                raise AttachError("%s has no attach target in its section name (give one with targets=)"
                                  % _program_label(lp))
            if userspace_kind(lp, targets.get(name)) is None:
                raise AttachError("%s cannot run in a traced process: userspace runs uprobe, uretprobe, usdt, "
                                  "tracepoint/syscalls/sys_{enter,exit}_* and raw_tp/sys_{enter,exit} programs"
                                  % _program_label(lp))
            chosen.append(lp)
        return chosen
    chosen = [lp for lp in obj.programs.values() if userspace_kind(lp, targets.get(lp.name)) is not None
              and (targets.get(lp.name) or lp.attach_target) is not None]
    if not chosen:
        missing = "".join("; %s" % why for why in getattr(obj, "unavailable", {}).values())
        raise AttachError("object %r has no program that runs in a traced process (sections: %s)%s"
                          % (obj.name, ", ".join(sorted(lp.section for lp in obj.programs.values())) or "none",
                             missing))
    return chosen


def plan(obj: "BpfObject", progs: Sequence["LoadedProgram"], res: _Resolver, prog_lines: dict[int, str],
         targets: dict | None = None) -> _Plan:
    """Every spec line for attaching ``progs`` (at ``targets[name]`` where given, else where their sections
    say); raises AttachError before anything is touched."""
    targets = targets or {}
    p = _Plan()
    if obj.region is not None:
        p.setup.append("region %#x %#x %s" % (obj.region.base, obj.region.size, obj.region.path))
    p.setup.extend(prog_lines[lp.id] for lp in progs)
    if obj.region is not None and getattr(obj.region, "stats_size", 0):  # run counts (hybrid/user/stats.py)
        p.setup.extend("stats %d %#x %d" % (lp.id, obj.region.base + obj.region.stats_offset, lp.stats_index)
                       for lp in progs)
    usdt_slots: dict = {}
    wants_syscalls = False
    for lp in progs:
        t = targets.get(lp.name)
        kind = userspace_kind(lp, t)
        if kind == "uprobe":
            _plan_uprobe(p, res, lp, lp.id, t)
        elif kind == "usdt":
            _plan_usdt(p, res, lp, lp.id, usdt_slots, t)
        else:
            _plan_syscall(p, lp, lp.id, t)
            wants_syscalls = True
    if wants_syscalls:
        _plan_syscall_sites(p, res)
    return p


# --- talking to the agent ---------------------------------------------------------------


class _Channel:
    """Sends spec text to the agent of one process."""

    pid: int

    def apply(self, text: str) -> None:
        raise NotImplementedError

    def stats(self, aid: int) -> tuple[int, int] | None:
        return None

    def quiescent(self) -> bool:
        return True


class _SelfChannel(_Channel):
    def __init__(self):
        self.pid = os.getpid()

    def apply(self, text: str) -> None:
        from hybrid._native import ffi, lib

        err = ffi.new("char[]", 1024)
        rc = lib.hybrid_agent_apply(text.encode(), err, 1024)
        if rc:
            raise AttachError("attach in this process: %s" % (ffi.string(err).decode(errors="replace")
                                                            or os.strerror(-rc)))

    def stats(self, aid: int) -> tuple[int, int]:
        from hybrid._native import lib

        return int(lib.hybrid_agent_hits(aid)), int(lib.hybrid_agent_missed(aid))

    def quiescent(self) -> bool:
        from hybrid._native import lib

        return bool(lib.hybrid_agent_quiescent())


class _ProcessChannel(_Channel):
    """A running process: spec files in ``workdir``, applied by a ptrace'd call into the agent."""

    def __init__(self, pid: int, workdir: Path):
        self.pid = pid
        self.workdir = workdir
        self._n = 0

    def apply(self, text: str) -> None:
        from hybrid.native import agent_path
        from hybrid.user.attach import inject

        self._n += 1
        path = self.workdir / ("spec.%d" % self._n)
        path.write_text(text)
        _share_with(self.pid, path)
        rc = inject.inject_and_call(self.pid, str(agent_path()), "hybrid_agent_apply_file", str(path),
                                    relocate="hybrid_agent_relocate_pc")
        err = ""
        try:
            err = Path(str(path) + ".err").read_text().strip()
        except OSError:
            pass
        if rc != 0:
            raise AttachError("attach in process %d: %s" % (self.pid, err or os.strerror(-rc if rc < 0 else rc)))


def _share_with(pid: int, *paths: Path | str) -> None:
    """Let the target's user read our files (we are root; the target may not be)."""
    try:
        import psutil

        uid, gid = psutil.Process(pid).uids().effective, psutil.Process(pid).gids().effective
    except Exception:  # noqa: BLE001 - best effort; the apply reports a real failure
        return
    if uid == os.geteuid():
        return
    for p in paths:
        try:
            os.chown(p, uid, gid)
        except OSError:
            pass


# --- the attachment ---------------------------------------------------------------------


class Attachment(Closable):
    """Programs of one object attached in one process.  ``detach()`` (or ``close()``) removes them."""

    def __init__(self, obj: "BpfObject", channel: _Channel, placements: list[Placement], workdir: Path | None,
                 engine_kind: str):
        self.object = obj
        self.pid = channel.pid
        self.placements = tuple(placements)
        self.engine = engine_kind
        self._channel = channel
        self._workdir = workdir
        self.attached = True
        self.kernel_links: list = []  # kernel programs attached with these (BpfObject.attach)

    def hits(self, program: str | None = None) -> int:
        """Times the programs ran (all, or ``program``'s); in this process only (library mode)."""
        total = 0
        for p in self.placements:
            if program is None or p.program == program:
                st = self._channel.stats(p.id)
                if st is None:
                    raise AttachError("hit counts are only available for attachments in this process")
                total += st[0]
        return total

    def missed(self, program: str | None = None) -> int:
        total = 0
        for p in self.placements:
            if program is None or p.program == program:
                st = self._channel.stats(p.id)
                if st is None:
                    raise AttachError("missed counts are only available for attachments in this process")
                total += st[1]
        return total

    def detach(self) -> None:
        """Restore every patched byte; programs stop running.  Idempotent."""
        if not self.attached:
            return
        self.attached = False
        try:
            from hybrid import registry

            # links already removed from outside (hybrid detach --link / -p) are gone from the agent
            text = "".join("detach %d\n" % p.id for p in self.placements if not registry.detached(self.pid, p.id))
            if text and _alive(self.pid):
                self._channel.apply(text)
        finally:
            side = getattr(self.object, "kernel_side", None)
            for link in self.kernel_links:
                link.close()
                if side is not None and link in side.links:
                    side.links.remove(link)
            self.object._attachments.discard(self)
            if not self._channel.quiescent():
                # A thread may still be inside a program: keep the code alive.
                self.object._keep_code = True
            self._cleanup()
            getattr(self.object, "_publish", lambda: None)()  # the registry record (hybrid/registry.py)

    def _cleanup(self) -> None:
        wd, self._workdir = self._workdir, None
        if wd is not None:
            shutil.rmtree(wd, ignore_errors=True)

    def close(self) -> None:
        self.detach()

    def __repr__(self) -> str:
        return "<Attachment of %r in process %d: %d placements%s>" % (
            self.object.name, self.pid, len(self.placements), "" if self.attached else ", detached")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie cannot be patched any more
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _aot_library(lp: "LoadedProgram") -> Path:
    """``lp`` compiled to a shared library, once per loaded object (attaching again reuses it)."""
    import weakref

    from hybrid.user import aot

    obj = lp.object
    d = obj.__dict__.get("_aot_dir")
    if d is None:
        d = obj._aot_dir = _workdir()
        weakref.finalize(obj, shutil.rmtree, d, True)
    so = d / ("prog-%d.so" % lp.id)
    if not so.exists():
        tmp = d / ("prog-%d.so.tmp" % lp.id)
        aot.build_shared(lp.program, tmp)
        os.chmod(tmp, 0o755)
        os.replace(tmp, so)
    return so


def _aot_prog_lines(progs: Sequence["LoadedProgram"], workdir: Path) -> dict[int, str]:
    return {lp.id: "prog %d %s bpf_entry" % (lp.id, _aot_library(lp)) for lp in progs}


def _self_prog_lines(progs: Sequence["LoadedProgram"], engine: str) -> dict[int, str]:
    from hybrid.user import aot

    if engine == "aot":
        aot.export_helpers()  # the agent dlopens the .so files; they need _native's helpers
    lines = {}
    for lp in progs:
        lines[lp.id] = "prog %d @%#x" % (lp.id, lp.engine(engine).address)
    return lines


def _workdir() -> Path:
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    d = Path(tempfile.mkdtemp(prefix="hybrid-attach-", dir=base))
    os.chmod(d, 0o711)
    return d


def attach(obj: "BpfObject", pid: int | None = None, *, programs: Iterable[str] | None = None,
           engine: str = "jit", targets: dict | None = None) -> Attachment:
    """Attach ``obj``'s userspace programs in this process (``pid`` None) or in process ``pid``.

    ``targets`` (program name -> attach target, or a section name such as ``"uprobe//bin/prog:0x1139"``)
    attaches those programs there instead of where their sections say (a bare ``SEC("uprobe")`` program
    at several places, one attach each)."""
    targets = _targets(obj, targets)
    progs = _select(obj, programs, targets)
    if pid is None or pid == os.getpid():
        if engine not in ("jit", "aot"):
            raise AttachError("engine %r cannot run attached programs: use jit or aot" % engine)
        exe = os.path.realpath("/proc/self/exe")
        res = _Resolver(None, exe)
        p = plan(obj, progs, res, _self_prog_lines(progs, engine), targets)
        ch = _SelfChannel()
        ch.apply(p.text())
        att = Attachment(obj, ch, p.placements, None, engine)
        obj._attachments.add(att)
        return att
    _check_pid(pid)
    exe = _exe_of(pid)
    res = _Resolver(pid, exe)
    wd = _workdir()
    try:
        p = plan(obj, progs, res, _aot_prog_lines(progs, wd), targets)
        if obj.region is not None:
            _share_with(pid, obj.region.path)
        _share_with(pid, wd, *wd.iterdir())
        aot_dir = obj.__dict__.get("_aot_dir")
        if aot_dir is not None:
            _share_with(pid, aot_dir, *aot_dir.iterdir())
        ch = _ProcessChannel(pid, wd)
        ch.apply(p.text())
    except BaseException:
        shutil.rmtree(wd, ignore_errors=True)
        raise
    att = Attachment(obj, ch, p.placements, wd, "aot")
    obj._attachments.add(att)
    return att


def _check_pid(pid: int) -> None:
    if not isinstance(pid, int) or pid <= 0:
        raise AttachError("invalid pid %r" % (pid,))
    if not os.path.exists("/proc/%d" % pid):
        raise AttachError("no process %d" % pid)
    if not _alive(pid):
        raise AttachError("process %d is a zombie" % pid)


def _exe_of(pid: int) -> str | None:
    try:
        return os.path.realpath(os.readlink("/proc/%d/exe" % pid))
    except OSError as e:
        raise AttachError("process %d: cannot read /proc/%d/exe: %s" % (pid, pid, e.strerror)) from None


# --- launch ---------------------------------------------------------------------------


class Launched(Closable):
    """A command started with the programs attached from its first instruction.

    ``wait()`` for it like a ``subprocess.Popen``; ``attachment`` detaches
    (through ptrace) while it runs.
    """

    def __init__(self, popen: subprocess.Popen, attachment: Attachment):
        self.popen = popen
        self.pid = popen.pid
        self.attachment = attachment

    def wait(self, timeout: float | None = None) -> int:
        return self.popen.wait(timeout)

    @property
    def returncode(self) -> int | None:
        return self.popen.returncode

    def detach(self) -> None:
        self.attachment.detach()

    def close(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()
        self.attachment.detach()

    def __enter__(self) -> "Launched":
        return self


def launch(obj: "BpfObject", argv: Sequence[str], *, programs: Iterable[str] | None = None,
           env: dict | None = None, targets: dict | None = None, **popen_kw) -> Launched:
    """Start ``argv`` with ``obj``'s userspace programs attached before ``main`` runs (``targets``: see
    :func:`attach`)."""
    from hybrid.native import agent_path

    if not argv:
        raise AttachError("no command to launch")
    exe = shutil.which(argv[0])
    if exe is None:
        raise AttachError("command not found: %s" % argv[0])
    exe = os.path.realpath(exe)
    if _is_static(exe):
        raise AttachError("%s is statically linked: the agent can only be preloaded into dynamically linked "
                          "programs" % exe)
    targets = _targets(obj, targets)
    progs = _select(obj, programs, targets)
    res = _Resolver(None, exe)
    wd = _workdir()
    try:
        p = plan(obj, progs, res, _aot_prog_lines(progs, wd), targets)
        spec = wd / "spec.0"
        spec.write_text(p.text())
        environ = dict(os.environ if env is None else env)
        preload = environ.get("LD_PRELOAD", "")
        environ["LD_PRELOAD"] = str(agent_path()) + (" " + preload if preload else "")
        environ["HYBRID_AGENT_SPEC"] = str(spec)
        environ["HYBRID_AGENT_STRICT"] = "1"
        errfile = Path(str(spec) + ".err")
        popen = subprocess.Popen(list(argv), env=environ, **popen_kw)
    except BaseException:
        shutil.rmtree(wd, ignore_errors=True)
        raise
    ch = _ProcessChannel(popen.pid, wd)
    att = Attachment(obj, ch, p.placements, wd, "aot")
    obj._attachments.add(att)
    # The agent reports before main; a failure ends the command with 126.
    deadline = time.monotonic() + 30
    while not errfile.exists() and popen.poll() is None and time.monotonic() < deadline:
        time.sleep(0.001)
    err = errfile.read_text().strip() if errfile.exists() else ""
    if err or (popen.poll() is not None and not errfile.exists()):
        if popen.poll() is None:
            popen.send_signal(signal.SIGKILL)
        popen.wait()
        att.attached = False
        att._cleanup()
        obj._attachments.discard(att)
        raise AttachError("launch %s: %s" % (argv[0], err or "the command exited (status %s) before the agent "
                                              "reported; is it dynamically linked?" % popen.returncode))
    return Launched(popen, att)


def detach_all(pid: int) -> int:
    """Remove every probe any controller placed in process ``pid`` (e.g. after a controller died)."""
    from hybrid.native import agent_path
    from hybrid.user.attach import inject, symbols

    _check_pid(pid)
    agent = os.path.realpath(agent_path())
    try:
        loaded = symbols.module_load_bias(pid, agent)
    except HybridError:
        loaded = None
    if loaded is None:
        raise AttachError("process %d has no hybrid agent loaded: nothing to detach" % pid)
    return inject.inject_and_call(pid, agent, "hybrid_agent_detach_all", "")


def _is_static(path: str) -> bool:
    """True for an ELF executable without an interpreter (the agent cannot be preloaded into it)."""
    from elftools.elf.elffile import ELFFile

    try:
        with open(path, "rb") as f:
            if f.read(4) != b"\x7fELF":
                return False  # a script: its interpreter gets the agent
            f.seek(0)
            elf = ELFFile(f)
            return not any(seg["p_type"] == "PT_INTERP" for seg in elf.iter_segments())
    except Exception:  # noqa: BLE001 - unreadable: let exec report it
        return False
