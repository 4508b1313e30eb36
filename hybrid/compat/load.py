"""``hybrid load -- LOADER ARGS``: an unmodified libbpf program with its uprobes, USDT probes and
syscall tracepoints running inside the traced processes.

The loader runs with ``hybrid/libhybrid_preload*.so`` preloaded (``hybrid/native/preload/preload.c``
says what it interposes).  It creates its maps and loads its programs in the kernel as always; the
interposer tells this controller about them over a ``SOCK_SEQPACKET`` socket, and when the loader
attaches a program to a uprobe (the uprobe PMU) or to a ``syscalls:sys_{enter,exit}_*`` tracepoint,
the controller attaches it in userspace instead:

- at the first such attach, every candidate program loaded so far (kernel program types
  ``kprobe``, which libbpf uses for uprobes, and ``tracepoint``) and the maps they use become one
  hybrid object: its maps a shared-memory region, filled with the kernel maps' contents (global
  data, configuration the loader wrote, USDT specs), and served to the loader from then on
  (the interposer reads the region for the loader's ``BPF_MAP_*`` commands);
- the program is attached where the loader asked: in process ``pid`` for a uprobe with a pid (the
  agent is injected if it is not there), else in every process running the agent (``hybrid run --
  CMD``, ``hybrid attach -p PID``), now and as they start;
- the loader's ring buffer and perf buffer reads are fed by the interposer from both sides: the
  userspace rings of the maps and the kernel's;
- a program that cannot run in userspace (it uses tail calls or map-in-map, shares a map with a
  program attached in the kernel, or hybrid's verifier refuses it)
  is attached in the kernel, as without hybrid, with one line saying why.  Nothing is dropped
  silently.

Several sessions at once are independent: each has its own objects, regions and links.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

from hybrid.errors import HybridError

# --- protocol (preload.c) -----------------------------------------------------------------------

OP_HELLO, OP_MAP, OP_PROG, OP_PERF, OP_ATTACH, OP_CLOSE, OP_FORGET, OP_RING, OP_KATTACH, OP_PERFBUF = range(1, 11)
OP_HOST = 100  # from `hybrid run` / `hybrid attach`: a new agent host (payload: pid as i32)

HDR = struct.Struct("<II")
REP = struct.Struct("<qII")
MSG_FD = struct.Struct("<iI")
MSG_PROG = struct.Struct("<iIII16s")
MSG_PERF = struct.Struct("<iiII128s")
MSG_ATTACH = struct.Struct("<QiIQ")
MSG_HANDLE = struct.Struct("<Q")
MSG_REGION = struct.Struct("<256sQII")
MSG_REGION_MAP = struct.Struct("<iI")

PERF_TYPE_TRACEPOINT = 2
PERF_FLAG_FD_CLOEXEC = 8
PROG_KPROBE, PROG_TRACEPOINT = 2, 5

# Map types whose userspace copy the loader can be served (element commands, ring and perf buffer reads).
SERVED_TYPES = {1: "hash", 2: "array", 4: "perf_event_array", 5: "percpu_hash", 6: "percpu_array",
                7: "stack_trace", 9: "lru_hash", 10: "lru_percpu_hash", 22: "queue", 23: "stack", 27: "ringbuf"}
MAP_TYPE_NAMES = {3: "prog_array", 12: "array_of_maps", 13: "hash_of_maps", 31: "user_ringbuf", **SERVED_TYPES}
PERF_EVENT_ARRAY = 4
BPF_F_MMAPABLE = 0x400
# Each CPU's userspace perf ring (the kernel's are the loader's perf_buffer pages): programs in the
# process write ~100x faster than kernel uprobes do, so a burst needs room until the forwarder moves it.
PERF_RING_BYTES = 1 << 20

_EXCLUDED_WHY = {
    3: "it uses tail calls (a prog array)",
    12: "it uses map-in-map", 13: "it uses map-in-map",
}


def preload_path() -> str:
    """The interposer, built with the native module (``hybrid/libhybrid_preload*.so``)."""
    import glob

    pkg = Path(__file__).resolve().parent.parent
    found = sorted(glob.glob(str(pkg / "libhybrid_preload*.so")))
    if not found:
        raise HybridError("the interposer %s/libhybrid_preload*.so is not built (run 'make setup')" % pkg)
    return found[0]


def uprobe_pmu_type() -> int | None:
    try:
        return int(Path("/sys/bus/event_source/devices/uprobe/type").read_text())
    except (OSError, ValueError):
        return None


_TRACEFS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")
_syscall_tps: dict[int, str] | None = None


def syscall_tracepoints() -> dict[int, str]:
    """Tracepoint id -> ``sys_enter_X`` / ``sys_exit_X`` for the syscalls tracepoints."""
    global _syscall_tps
    if _syscall_tps is None:
        out = {}
        for root in _TRACEFS:
            d = Path(root) / "events" / "syscalls"
            if d.is_dir():
                for ev in d.iterdir():
                    try:
                        out[int((ev / "id").read_text())] = ev.name
                    except (OSError, ValueError):
                        pass
                break
        _syscall_tps = out
    return _syscall_tps


# --- pidfd_getfd --------------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
SYS_PIDFD_GETFD = 438


def take_fd(pidfd: int, fd: int) -> int:
    """A duplicate, in this process, of file descriptor ``fd`` of the process ``pidfd`` refers to."""
    r = _libc.syscall(ctypes.c_long(SYS_PIDFD_GETFD), ctypes.c_int(pidfd), ctypes.c_int(fd), ctypes.c_uint(0))
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, "pidfd_getfd(%d): %s" % (fd, os.strerror(e)))
    return r


# --- session state ------------------------------------------------------------------------------


@dataclass
class KMap:
    fd: int  # the loader's
    kfd: int  # ours (pidfd_getfd)
    type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int
    name: str
    map_extra: int
    id: int


@dataclass
class KProg:
    fd: int
    type: int
    expected_attach_type: int
    name: str
    insns: bytes
    map_fds: frozenset  # the loader's map fds its lddw's name
    hybrid_name: str = ""  # its name in the hybrid object, once in one
    kernel_attached: bool = False


@dataclass
class Probe:
    handle: int
    kind: str  # "uprobe", "uretprobe", "syscall"
    pid: int  # -1: every agent host
    path: str = ""
    offset: int = 0
    ref_ctr_offset: int = 0
    tracepoint: str = ""
    prog: KProg | None = None
    cookie: int = 0
    attachments: dict = field(default_factory=dict)  # pid -> Attachment

    def describe(self) -> str:
        if self.kind == "syscall":
            return "syscalls:%s" % self.tracepoint
        return "%s %s:%#x" % (self.kind, self.path, self.offset)

    def target(self):
        from hybrid.user.elf import TracepointTarget, UprobeTarget

        if self.kind == "syscall":
            return TracepointTarget("syscalls", self.tracepoint)
        return UprobeTarget(self.path, "%#x" % self.offset, 0, self.kind == "uretprobe", cookie=self.cookie,
                            ref_ctr_offset=self.ref_ctr_offset)


class Reply(Exception):
    """A request's answer other than 0: ``rc`` and a message for the loader's stderr."""

    def __init__(self, rc: int, text: str = ""):
        super().__init__(text)
        self.rc = rc
        self.text = text


class Session:
    """One loader process's view: its maps, programs, probes and the hybrid object."""

    def __init__(self, controller: "Controller", pid: int):
        self.controller = controller
        self.pid = pid
        self.pidfd = os.pidfd_open(pid)
        self.maps: dict[int, KMap] = {}
        self.progs: dict[int, KProg] = {}
        self.probes: dict[int, Probe] = {}
        self.obj = None
        self.obj_maps: dict[int, int] = {}  # loader map fd -> index in the object's region
        self.obj_progs: dict[int, str] = {}  # loader prog fd -> program name in the object
        self.excluded: dict[int, str] = {}  # loader prog fd -> why it cannot run in userspace
        self.kernel_maps: set[int] = set()  # maps used by programs attached in the kernel
        self.traced: set[int] = set()  # pids the loader named (uprobes): they take system-wide probes too
        self.objects = []  # every object made (closed at the end)

    # -- requests

    def on_map(self, fd: int) -> None:
        from hybrid.kernel.maps import map_info

        kfd = take_fd(self.pidfd, fd)
        try:
            info = map_info(kfd)
        except HybridError:
            os.close(kfd)
            return
        self._forget(fd)
        self.maps[fd] = KMap(fd, kfd, info.type, info.key_size, info.value_size, info.max_entries, info.map_flags,
                             info.name.decode(errors="replace"), info.map_extra, info.id)

    def on_prog(self, fd: int, ptype: int, eat: int, name: bytes, insns: bytes) -> None:
        from hybrid.user import isa

        self._forget(fd)
        fds = set()
        for insn in isa.decode(insns):
            if insn.opcode == 0x18 and insn.src in (isa.PSEUDO_MAP_FD, isa.PSEUDO_MAP_VALUE):
                fds.add(insn.imm)
        self.progs[fd] = KProg(fd, ptype, eat, name.split(b"\0", 1)[0].decode(errors="replace") or "prog%d" % fd,
                               insns, frozenset(fds))

    def on_forget(self, fd: int) -> None:
        self._forget(fd)

    def _forget(self, fd: int) -> None:
        m = self.maps.pop(fd, None)
        if m is not None:
            os.close(m.kfd)
        self.progs.pop(fd, None)

    def on_perf(self, pid: int, cpu: int, flags: int, attr: bytes, path: str) -> int:
        """0: the kernel's (not ours to run); else the handle of the probe."""
        ptype, size = struct.unpack_from("<II", attr)
        config = struct.unpack_from("<Q", attr, 8)[0]
        if ptype == PERF_TYPE_TRACEPOINT:
            name = syscall_tracepoints().get(config)
            if name is None or not (name.startswith("sys_enter_") or name.startswith("sys_exit_")):
                return 0
            probe = Probe(0, "syscall", -1, tracepoint=name)
        elif ptype == uprobe_pmu_type():
            config1, config2 = struct.unpack_from("<QQ", attr, 56)
            if not path:
                return 0
            if pid > 0 and not os.path.exists("/proc/%d" % pid):
                return 0  # the kernel says ESRCH
            probe = Probe(0, "uretprobe" if config & 1 else "uprobe", pid if pid > 0 else -1, path=path,
                          offset=config2, ref_ctr_offset=config >> 32)
        else:
            return 0
        probe.handle = self.controller.new_handle()
        self.probes[probe.handle] = probe
        return probe.handle

    def on_attach(self, handle: int, prog_fd: int, cookie: int) -> bytes:
        probe = self.probes.get(handle)
        if probe is None:
            raise Reply(-9, "attach: unknown perf event (handle %d)" % handle)
        prog = self.progs.get(prog_fd)
        if prog is None:
            raise Reply(1)  # a program type hybrid does not run: the kernel's
        why = self._why_kernel(prog)
        if why:
            self.controller.say("program %r on %s runs in the kernel: %s" % (prog.name, probe.describe(), why))
            prog.kernel_attached = True
            self.kernel_maps |= prog.map_fds
            raise Reply(1)
        probe.prog, probe.cookie = prog, cookie
        name = self.obj_progs[prog_fd]
        pids = [probe.pid] if probe.pid > 0 else sorted(set(self.controller.host_pids()) | self.traced)
        if not pids:
            self.controller.say_once("no process runs hybrid's agent yet: %s reaches the processes this loader "
                                     "traces by pid and those started with 'hybrid run -- CMD' (or given to "
                                     "'hybrid attach -p PID') from now on" % probe.describe())
        for pid in pids:
            try:
                self._attach_in(probe, name, pid)
            except HybridError as e:
                self._detach(probe)
                raise Reply(-22, "%s: %s" % (probe.describe(), e)) from None
        if probe.pid > 0 and probe.pid not in self.traced:
            # a process the loader traces by pid takes its system-wide probes (syscall tracepoints) too,
            # as the kernel would run them there
            self.traced.add(probe.pid)
            self.on_host(probe.pid)
        return self._region_reply()

    def on_close(self, handle: int) -> None:
        probe = self.probes.pop(handle, None)
        if probe is not None:
            self._detach(probe)

    def on_ring(self, fd: int) -> int:
        """1: the loader reads this ring buffer through the interposer (userspace programs may write it)."""
        if fd in self.obj_maps:
            return 1
        for prog in self.progs.values():
            if fd in prog.map_fds and prog.type in (PROG_KPROBE, PROG_TRACEPOINT) and not prog.kernel_attached:
                return 1
        return 0

    def on_perfbuf(self) -> int:
        """1: the loader's perf buffers are fed through the interposer (userspace programs may write a perf
        event array; the kernel's records are forwarded with them)."""
        for prog in self.progs.values():
            if prog.type in (PROG_KPROBE, PROG_TRACEPOINT) and not prog.kernel_attached and any(
                    self.maps[fd].type == PERF_EVENT_ARRAY for fd in prog.map_fds if fd in self.maps):
                return 1
        return 0

    def on_kattach(self, prog_fd: int) -> None:
        prog = self.progs.get(prog_fd)
        if prog is None:
            return
        shared = sorted(self.maps[fd].name for fd in prog.map_fds & set(self.obj_maps) if fd in self.maps)
        if shared:
            raise Reply(-16, "program %r cannot be attached in the kernel: its map%s %s also serve%s programs "
                        "running in userspace (run the loader without hybrid, or with hybrid load --kernel)"
                        % (prog.name, "s" if len(shared) > 1 else "", ", ".join("%r" % n for n in shared),
                           "" if len(shared) > 1 else "s"))
        prog.kernel_attached = True
        self.kernel_maps |= prog.map_fds

    def on_host(self, pid: int) -> None:
        """A new agent host: every probe without a pid goes there too."""
        for probe in list(self.probes.values()):
            if probe.prog is not None and probe.pid == -1 and pid not in probe.attachments:
                try:
                    self._attach_in(probe, self.obj_progs[probe.prog.fd], pid)
                except HybridError as e:
                    self.controller.say("%s in process %d: %s" % (probe.describe(), pid, e))

    # -- the object

    def _why_kernel(self, prog: KProg) -> str:
        """Why ``prog`` must run in the kernel ('' if it runs in userspace); builds the object on first use."""
        if prog.fd in self.obj_progs:
            return ""
        if prog.fd in self.excluded:
            return self.excluded[prog.fd]
        if self.obj is not None:
            return "it was loaded after the first program attached in userspace (hybrid load builds one object " \
                   "of the programs loaded before)"
        self._build()
        return self.excluded.get(prog.fd, "")

    def _exclusions(self) -> dict[int, str]:
        """Candidate programs that cannot run in userspace, and why (the maps they touch then stay kernel)."""
        out = {}
        for fd, prog in self.progs.items():
            if prog.type not in (PROG_KPROBE, PROG_TRACEPOINT):
                continue
            if prog.kernel_attached:
                out[fd] = "it is attached in the kernel"
                continue
            for mfd in sorted(prog.map_fds):
                m = self.maps.get(mfd)
                if m is None:
                    out[fd] = "it uses map fd %d, which hybrid load did not see created" % mfd
                elif m.type not in SERVED_TYPES:
                    out[fd] = _EXCLUDED_WHY.get(m.type, "its map %r is a %s map" % (
                        m.name, MAP_TYPE_NAMES.get(m.type, "type %d" % m.type)))
                if fd in out:
                    break
        # maps of kernel programs stay in the kernel: programs sharing them too (to a fixpoint); global
        # data (mmapable arrays) is shared as it is, both sides using the kernel array's memory
        changed = True
        while changed:
            changed = False
            kernel = set(self.kernel_maps)
            for fd in out:
                kernel |= self.progs[fd].map_fds
            kernel = {fd for fd in kernel if not self._bridged(fd)}
            for fd, prog in self.progs.items():
                if fd in out or prog.type not in (PROG_KPROBE, PROG_TRACEPOINT):
                    continue
                shared = prog.map_fds & kernel
                if shared:
                    names = sorted(self.maps[m].name for m in shared if m in self.maps)
                    out[fd] = "it shares map%s %s with a program in the kernel" % (
                        "s" if len(names) > 1 else "", ", ".join("%r" % n for n in names))
                    changed = True
        return out

    def _bridged(self, fd: int) -> bool:
        """An mmapable array (global data): userspace programs use the kernel map's own memory."""
        m = self.maps.get(fd)
        return m is not None and m.type == 2 and bool(m.flags & BPF_F_MMAPABLE)

    def _build(self) -> None:
        """The hybrid object: every candidate program and its maps; the kernel maps' contents copied in."""
        from hybrid.errors import VerifierError
        from hybrid.user.object import BpfObject

        excluded = self._exclusions()
        while True:
            chosen = {fd: p for fd, p in self.progs.items()
                      if p.type in (PROG_KPROBE, PROG_TRACEPOINT) and fd not in excluded}
            if not chosen:
                self.excluded.update(excluded)
                return
            spec, names, index = self._spec(chosen)
            try:
                obj = BpfObject(spec)
            except VerifierError as e:
                bad = next((fd for fd, n in names.items() if "%r" % n in str(e)), None)
                if bad is None:
                    raise
                excluded[bad] = "hybrid's verifier refuses it: %s" % e
                continue
            break
        self.excluded.update(excluded)
        # the loader's commands on bridged maps go to the kernel map: the same memory
        self.obj, self.obj_progs = obj, names
        self.obj_maps = {fd: i for fd, i in index.items() if not spec.maps[i].bridge}
        self.objects.append(obj)
        obj.name = "load:%s" % self.controller.loader_name
        obj._publish()
        for fd, idx in index.items():
            if not spec.maps[idx].bridge:
                self._copy_in(self.maps[fd], obj.region.maps[idx])

    def _spec(self, chosen: dict[int, KProg]):
        from hybrid.user import isa
        from hybrid.user.elf import ObjectSpec, ProgramSpec
        from hybrid.user.mapspec import MapSpec

        map_fds = sorted(set().union(*(p.map_fds for p in chosen.values())))
        index = {fd: i for i, fd in enumerate(map_fds)}
        used: set[str] = set()

        def unique(name: str) -> str:
            base, n = name or "map", 1
            while name in used or not name:
                n += 1
                name = "%s_%d" % (base, n)
            used.add(name)
            return name

        maps = []
        for fd in map_fds:
            m = self.maps[fd]
            if self._bridged(fd):
                # global data (.data/.bss/.rodata): the loader reads and writes it through its skeleton's
                # mmap of the kernel array, so the programs use that very memory (an mmap bridge)
                maps.append(MapSpec(unique(m.name), m.type, m.key_size, m.value_size, m.max_entries, m.flags,
                                    m.map_extra, bridge="mmap", kernel_id=m.id))
            else:
                maps.append(MapSpec(unique(m.name), m.type, m.key_size, m.value_size, m.max_entries, m.flags,
                                    PERF_RING_BYTES if m.type == PERF_EVENT_ARRAY else m.map_extra))
        used.clear()
        programs, names = [], {}
        for fd, p in sorted(chosen.items()):
            insns = []
            for insn in isa.decode(p.insns):
                if insn.opcode == 0x18 and insn.src == isa.PSEUDO_MAP_FD:
                    insn = dataclasses.replace(insn, src=isa.PSEUDO_MAP_IDX, imm=index[insn.imm])
                elif insn.opcode == 0x18 and insn.src == isa.PSEUDO_MAP_VALUE:
                    insn = dataclasses.replace(insn, src=isa.PSEUDO_MAP_IDX_VALUE, imm=index[insn.imm])
                insns.append(insn)
            name = unique(p.name)
            names[fd] = name
            section, kind = ("uprobe", "uprobe") if p.type == PROG_KPROBE else ("tracepoint", "tracepoint")
            programs.append(ProgramSpec(name, section, kind, None, tuple(insns), "GPL", prog_type=p.type,
                                        expected_attach_type=p.expected_attach_type))
        spec = ObjectSpec("load", "GPL", 0, tuple(programs), tuple(maps))
        return spec, names, index

    @staticmethod
    def _copy_in(km: KMap, um) -> None:
        """What the kernel map holds now (global data, the loader's settings, USDT specs) into ``um``."""
        from hybrid.kernel.maps import KernelMap

        if km.type in (27, 22, 23, 7, PERF_EVENT_ARRAY):
            # rings, queues, stacks, stack traces: nothing to carry over; perf event array entries are set by
            # the interposer as the loader stores its perf events (preload.c)
            return
        kmap = KernelMap.from_fd(km.kfd, dup=True)
        try:
            for key in list(kmap):
                value = kmap.lookup(key)
                if value is not None:
                    um.update(key, value)
        finally:
            kmap.close()

    def _region_reply(self) -> bytes:
        region = self.obj.region
        size = os.stat(region.path).st_size
        out = [MSG_REGION.pack(os.fsencode(region.path), size, len(self.obj_maps), 0)]
        out += [MSG_REGION_MAP.pack(fd, idx) for fd, idx in sorted(self.obj_maps.items())]
        return b"".join(out)

    # -- attachments

    def _attach_in(self, probe: Probe, name: str, pid: int) -> None:
        att = self.obj.attach(pid, programs=[name], targets={name: probe.target()})
        probe.attachments[pid] = att
        if self.controller.verbose:
            for pl in att.placements:
                self.controller.say("%s %s at %s in process %d" % (pl.kind, pl.program, pl.where, pid))

    def _detach(self, probe: Probe) -> None:
        for pid, att in list(probe.attachments.items()):
            try:
                att.detach()
            except HybridError as e:
                if os.path.exists("/proc/%d" % pid):
                    self.controller.say("detach %s in process %d: %s" % (probe.describe(), pid, e))
        probe.attachments.clear()

    def close(self) -> list[str]:
        """Detach everything; what the rings could not take (lost records), one line per ring."""
        notes = []
        for probe in list(self.probes.values()):
            self._detach(probe)
        self.probes.clear()
        for obj in self.objects:
            for m in obj.region.maps if obj.region else ():
                lost = getattr(m, "lost", None)
                n = lost() if callable(lost) else 0
                if n:
                    notes.append("map %r: %d record%s could not be written (the loader did not read fast enough)"
                                 % (m.name, n, "" if n == 1 else "s"))
            obj.close()
        self.objects.clear()
        for m in self.maps.values():
            os.close(m.kfd)
        self.maps.clear()
        os.close(self.pidfd)
        return notes


class Controller:
    """The socket the interposers of one `hybrid load` reach, and the sessions behind it."""

    def __init__(self, loader_name: str = "loader", verbose: bool = False):
        self.loader_name = loader_name
        self.verbose = verbose
        self.dir = Path(tempfile.mkdtemp(prefix="hybrid-load-"))
        os.chmod(self.dir, 0o755)
        self.path = str(self.dir / "sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.bind(self.path)
        os.chmod(self.path, 0o777)
        self.sock.listen(16)
        self.lock = threading.RLock()
        self.sessions: list[Session] = []
        self._handles = 0
        self._said: set[str] = set()
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._accept = threading.Thread(target=self._serve, name="hybrid-load", daemon=True)
        self._accept.start()
        from hybrid import registry

        registry.add_session(self.path)

    def new_handle(self) -> int:
        with self.lock:
            self._handles += 1
            return self._handles

    def say(self, text: str) -> None:
        print("hybrid load: %s" % text, file=sys.stderr, flush=True)

    def say_once(self, text: str) -> None:
        if text not in self._said:
            self._said.add(text)
            self.say(text)

    def host_pids(self) -> list[int]:
        from hybrid import registry

        return registry.hosts()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            t = threading.Thread(target=self._conn, args=(conn,), name="hybrid-load-conn", daemon=True)
            self._threads.append(t)
            t.start()

    def _conn(self, conn: socket.socket) -> None:
        pid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]
        session = None
        with conn:
            while True:
                try:
                    msg = conn.recv(1 << 20)
                except OSError:
                    return
                if not msg:
                    return
                op, n = HDR.unpack_from(msg)
                body = msg[HDR.size:HDR.size + n]
                with self.lock:
                    if op == OP_HOST:
                        rc, out = self._host(struct.unpack_from("<i", body)[0])
                    else:
                        if session is None:
                            session = Session(self, pid)
                            self.sessions.append(session)
                        rc, out = self._handle(session, op, body)
                try:
                    conn.send(REP.pack(rc, len(out), 0) + out)
                except OSError:
                    return

    def _host(self, pid: int) -> tuple[int, bytes]:
        for s in self.sessions:
            s.on_host(pid)
        return 0, b""

    def _handle(self, s: Session, op: int, body: bytes) -> tuple[int, bytes]:
        try:
            if op == OP_MAP:
                s.on_map(MSG_FD.unpack_from(body)[0])
            elif op == OP_PROG:
                fd, ptype, eat, cnt, name = MSG_PROG.unpack_from(body)
                s.on_prog(fd, ptype, eat, name, body[MSG_PROG.size:MSG_PROG.size + cnt * 8])
            elif op == OP_PERF:
                pid, cpu, flags, size, attr = MSG_PERF.unpack_from(body)
                path = body[MSG_PERF.size:].split(b"\0", 1)[0].decode(errors="surrogateescape")
                return s.on_perf(pid, cpu, flags, attr[:size], path), b""
            elif op == OP_ATTACH:
                handle, prog_fd, _kind, cookie = MSG_ATTACH.unpack_from(body)
                return 0, s.on_attach(handle, prog_fd, cookie)
            elif op == OP_CLOSE:
                s.on_close(MSG_HANDLE.unpack_from(body)[0])
            elif op == OP_FORGET:
                s.on_forget(MSG_FD.unpack_from(body)[0])
            elif op == OP_RING:
                return s.on_ring(MSG_FD.unpack_from(body)[0]), b""
            elif op == OP_KATTACH:
                s.on_kattach(MSG_FD.unpack_from(body)[0])
            elif op == OP_PERFBUF:
                return s.on_perfbuf(), b""
            return 0, b""
        except Reply as r:
            return r.rc, r.text.encode()
        except HybridError as e:
            return -22, ("%s: %s" % (type(e).__name__, e)).encode()
        except OSError as e:
            return -(e.errno or 5), str(e).encode()
        except Exception as e:  # noqa: BLE001 - a bug here must not hang the loader: say it, fail the call
            import traceback

            traceback.print_exc()
            return -5, ("internal error in hybrid load: %r" % e).encode()

    def close(self) -> None:
        from hybrid import registry

        if self._closed:
            return
        self._closed = True
        registry.remove_session()
        with self.lock:
            for s in self.sessions:
                for note in s.close():
                    self.say(note)
            self.sessions.clear()
        try:
            self.sock.close()
        finally:
            import shutil

            shutil.rmtree(self.dir, ignore_errors=True)


# --- hosts --------------------------------------------------------------------------------------


def announce_host(pid: int) -> list[str]:
    """Tell every running `hybrid load` session that process ``pid`` runs the agent; waits until they
    have attached their probes there.  Returns the problems, one line per session that failed."""
    from hybrid import registry

    problems = []
    for rec in registry.sessions():
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
                s.settimeout(60)
                s.connect(rec["sock"])
                body = struct.pack("<i", pid)
                s.send(HDR.pack(OP_HOST, len(body)) + body)
                rep = s.recv(1 << 16)
                rc = REP.unpack_from(rep)[0] if len(rep) >= REP.size else -5
                if rc < 0:
                    problems.append("session %d: %s" % (rec["pid"], rep[REP.size:].decode(errors="replace")))
        except OSError as e:
            problems.append("session %d: %s" % (rec.get("pid", 0), e))
    return problems


def run_host(command: list[str], verbose: bool = False) -> int:
    """``hybrid run -- CMD``: start CMD with the agent, held before ``main`` until every `hybrid load`
    session has attached its probes, registered as a host while it runs.  Returns its exit status."""
    import shutil

    from hybrid import registry
    from hybrid.errors import AttachError
    from hybrid.native import agent_path

    if not command:
        raise AttachError("hybrid run: no command given (hybrid run -- CMD ARGS)")
    exe = shutil.which(command[0])
    if exe is None:
        raise AttachError("command not found: %s" % command[0])
    from hybrid.user.attach.agent import _is_static

    if _is_static(os.path.realpath(exe)):
        raise AttachError("%s is statically linked: the agent can only be preloaded into dynamically linked "
                          "programs" % exe)
    d = Path(tempfile.mkdtemp(prefix="hybrid-host-"))
    os.chmod(d, 0o755)
    fifo = d / "hold"
    os.mkfifo(fifo, 0o666)
    env = dict(os.environ)
    preload = env.get("LD_PRELOAD", "")
    env["LD_PRELOAD"] = agent_path() + (" " + preload if preload else "")
    env["HYBRID_AGENT_HOLD"] = str(fifo)
    try:
        proc = subprocess.Popen(command, env=env)
        # once the agent holds the command (its constructor waits on the fifo), sessions attach to it
        held = _held(proc, fifo)
        registry.add_host(proc.pid)
        for problem in announce_host(proc.pid):
            print("hybrid run: %s" % problem, file=sys.stderr)
        if held is not None:
            try:
                os.write(held, b"g")
            finally:
                os.close(held)
        if verbose:
            print("hybrid run: process %d runs the agent" % proc.pid, file=sys.stderr)
        with _forwarding_signals(proc):
            rc = proc.wait()
        return rc if rc >= 0 else 128 - rc
    finally:
        if "proc" in locals():
            registry.remove_host(proc.pid)
        shutil.rmtree(d, ignore_errors=True)


def _held(proc: subprocess.Popen, fifo: Path, timeout: float = 10.0) -> int | None:
    """The write end of the fifo the command's agent holds it on, once it does (None: it never came).

    A non-blocking open of a fifo's write end fails until the reader has opened it: retry while the
    command lives, and give up (saying so) if its agent never comes, e.g. a set-uid program, whose
    loader ignores LD_PRELOAD.  Writing one byte into it lets the command go on to ``main``."""
    import time

    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            if time.monotonic() > deadline:
                print("hybrid run: process %d did not load the agent in %g s (set-uid? statically linked?): "
                      "hybrid load sessions attach to it through ptrace instead" % (proc.pid, timeout),
                      file=sys.stderr)
                return None
            time.sleep(0.001)
    return None


# --- hybrid load --------------------------------------------------------------------------------


def run_loader(command: list[str], *, kernel: bool = False, verbose: bool = False) -> int:
    """``hybrid load -- LOADER ARGS``: run the loader with the interposer; its exit status."""
    import shutil

    from hybrid.errors import AttachError
    from hybrid.native import agent_path

    if not command:
        raise AttachError("hybrid load: no loader given (hybrid load -- LOADER ARGS)")
    exe = shutil.which(command[0])
    if exe is None:
        raise AttachError("loader not found: %s" % command[0])
    if kernel:
        os.execvp(command[0], command)
    if uprobe_pmu_type() is None:
        print("hybrid load: this kernel has no uprobe PMU (/sys/bus/event_source/devices/uprobe): "
              "libbpf attaches uprobes through tracefs, which hybrid load does not interpose; uprobes stay "
              "in the kernel", file=sys.stderr)
    ctl = Controller(os.path.basename(command[0]), verbose=verbose)
    env = dict(os.environ)
    preload = env.get("LD_PRELOAD", "")
    env["LD_PRELOAD"] = preload_path() + (" " + preload if preload else "")
    env["HYBRID_LOAD_SOCK"] = ctl.path
    env["HYBRID_AGENT_LIB"] = agent_path()
    try:
        proc = subprocess.Popen(command, env=env)
        with _forwarding_signals(proc):
            rc = proc.wait()
        return rc if rc >= 0 else 128 - rc
    finally:
        ctl.close()


class _forwarding_signals:
    """SIGINT and SIGTERM sent to ``hybrid load`` / ``hybrid run`` go to the child, which ends its own way
    (a loader prints its totals); we then clean up.  A terminal's Ctrl-C reaches both: the child gets it
    once from the terminal and once from us, which tools treat as one."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self.saved = {}

    def _forward(self, sig, _frame) -> None:
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, sig)
            except ProcessLookupError:
                pass

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self.saved[sig] = signal.signal(sig, self._forward)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)
