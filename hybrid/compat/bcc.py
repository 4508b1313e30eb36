"""``hybrid bcc -- TOOL ARGS``: an unmodified bcc tool whose uprobes run inside the traced process.

The tool (a Python script such as Debian's ``/usr/sbin/funclatency-bpfcc``)
runs in a fresh interpreter (ours, with Debian's ``bcc`` module) after
:func:`install` has patched a few methods of ``bcc.BPF`` and of bcc's table
classes.  bcc still compiles the tool's C text and creates every map in the
kernel, and the tool reads those maps as always; what changes is where the
uprobe and uretprobe programs run:

* **Attaching.**  ``BPF.attach_uprobe``/``attach_uretprobe`` for a process
  (``pid`` > 0) take the function's bytecode from the bcc module
  (``bpf_function_start``/``bpf_function_size``; its map references are
  ``lddw`` of kernel map fds), turn it into a hybrid program and attach it in
  the process through hybrid's agent (inline hook, AOT code), at the file
  offset bcc resolved (``BPF._check_path_symbol``).  With ``sym_re`` bcc
  calls ``attach_uprobe(addr=...)`` once per match, so each match is one
  attach.  bcc's ``uprobe_fds`` gets an entry per probe (``num_open_uprobes``
  counts them; ``detach_uprobe*`` and ``cleanup`` remove them).
* **One region per ``BPF``.**  The first userspace attach builds one hybrid
  object holding every function of the module that hybrid can run, with
  one userspace map per kernel map those functions use; every program is
  then attached from that object at an explicit target
  (``obj.attach(pid, programs=[fn], targets={fn: target})``), so all of them
  share the same maps.  Building once (not per attach) keeps counts in one
  place and compiles each program once.
* **Maps.**  A map that only userspace programs write is *mirrored*
  (:class:`hybrid.bridge.mirror.Mirror`; hash, array, per-CPU and LPM
  types): the kernel map's contents are pulled into the userspace map when
  it is created (the tool may have written configuration), and the
  userspace map is pushed to the kernel map every ``--sync`` seconds (0.1 by
  default), on detach and at the end.  The userspace map is the truth: the
  tool's reads through bcc's table classes (``[]``, iteration, ``items``,
  ``len``, ``print_log2_hist``, batch lookups...) read it directly (exact,
  with no system call), and its writes (``[k] = v``, ``del``, ``clear``,
  ``zero``, batch updates and deletes) go to it and, at once, to the kernel
  map, under the mirror's lock.  A map that a program in the kernel also
  uses (a tracepoint of the same tool, or a probe that had to stay in the
  kernel) is shared through ``bpf()`` instead (exact, about a microsecond
  per operation; the traced process needs CAP_SYS_ADMIN to open it); queue,
  stack and bloom filter maps too.  When a kernel program starts using a
  mirrored map, the object is rebuilt with that map shared through
  ``bpf()`` and the probes placed again (stderr says so; calls made during
  the switch are not seen).
* **Fallback.**  A probe stays a kernel uprobe (attached with
  ``ref_ctr_offset`` 0: bcc 0.26's Python passes garbage there), with one
  line on stderr saying why, when: ``--mode kernel``; no process
  (``pid`` -1, every process); the function writes a perf buffer or a ring
  buffer (userspace cannot write into the kernel's), uses a stack trace map,
  a program array or another map type hybrid cannot share; it calls a
  helper whose effect a process cannot have (``bpf_trace_printk`` to the
  kernel's trace_pipe, ``bpf_get_current_task``) or one hybrid does not
  have (the verifier's message); or hybrid's agent refuses the site (a
  function too short for a jump, a site inside a function that a branch
  targets...).
* **End.**  ``BPF.cleanup`` (bcc registers it with ``atexit``) first
  detaches the userspace probes (the target's code is restored), pushes the
  mirrors a last time and frees the object, then does bcc's own cleanup.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import os
import re
import shutil
import signal
import sys

from hybrid.errors import HybridError, VerifierError

# enum bpf_map_type
HASH, ARRAY, PROG_ARRAY, PERF_EVENT_ARRAY, PERCPU_HASH, PERCPU_ARRAY, STACK_TRACE = 1, 2, 3, 4, 5, 6, 7
LRU_HASH, LRU_PERCPU_HASH, LPM_TRIE, QUEUE, STACK, RINGBUF, BLOOM_FILTER = 9, 10, 11, 22, 23, 27, 30
MIRRORED_TYPES = {HASH, ARRAY, PERCPU_HASH, PERCPU_ARRAY, LRU_HASH, LRU_PERCPU_HASH, LPM_TRIE}
BRIDGED_TYPES = {QUEUE, STACK, BLOOM_FILTER}  # no mirror semantics: every operation through bpf()
PERCPU_TYPES = {PERCPU_HASH, PERCPU_ARRAY, LRU_PERCPU_HASH}
# helpers that would run in the process but not do what the tool expects of them
REFUSED_HELPERS = {
    6: "bpf_trace_printk writes the kernel's trace_pipe (which the tool reads); a program in the process "
       "cannot write there",
    177: "bpf_trace_vprintk writes the kernel's trace_pipe (which the tool reads); a program in the process "
         "cannot write there",
    35: "bpf_get_current_task gives the kernel's task_struct, which a program in the process cannot read",
    158: "bpf_get_current_task_btf gives the kernel's task_struct, which a program in the process cannot read",
}
PSEUDO_MAP_FD, PSEUDO_MAP_VALUE = 1, 2
LDDW, CALL = 0x18, 0x85
USER_FD = -1  # bcc's uprobe_fds value for a probe in the process

MODES = ("user", "kernel")


@dataclasses.dataclass
class Config:
    mode: str = "user"
    interval: float = 0.1  # mirror push interval, seconds (0: only on detach and at the end)
    verbose: bool = False


config = Config()
_ORIG: dict[str, object] = {}
_MIRRORS: dict[int, "_Mirror"] = {}  # bcc map fd -> its mirror
_noted: set = set()


def _bcc():
    from hybrid.kernel.bcc import _import_bcc

    return _import_bcc()


def _say(text: str) -> None:
    print("hybrid bcc: %s" % text, file=sys.stderr, flush=True)


def _s(b) -> str:
    return b.decode(errors="replace") if isinstance(b, bytes) else str(b)


# --- the module's functions and maps ------------------------------------------------------


@dataclasses.dataclass
class _MapInfo:
    fd: int
    name: str
    km: object  # hybrid.kernel.maps.KernelMap on a duplicate of the fd

    @property
    def type(self) -> int:
        return self.km.type


@dataclasses.dataclass
class _Fn:
    name: bytes
    insns: tuple = ()
    fds: tuple = ()
    problem: str | None = None  # why it cannot run in the process (None: it can)


_tables_lib = None


def _table_names(module) -> dict[int, str]:
    """fd -> table name of a bcc module (libbcc's ``bpf_num_tables``/``bpf_table_name``/``bpf_table_fd_id``,
    through a handle of our own: bcc's Python does not declare them)."""
    global _tables_lib
    if _tables_lib is None:
        so = ctypes.CDLL(_bcc().libbcc.lib._name)
        so.bpf_num_tables.restype = ctypes.c_size_t
        so.bpf_num_tables.argtypes = [ctypes.c_void_p]
        so.bpf_table_name.restype = ctypes.c_char_p
        so.bpf_table_name.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        so.bpf_table_fd_id.restype = ctypes.c_int
        so.bpf_table_fd_id.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        _tables_lib = so
    out = {}
    for i in range(_tables_lib.bpf_num_tables(module)):
        name = _tables_lib.bpf_table_name(module, i)
        out[_tables_lib.bpf_table_fd_id(module, i)] = _s(name or b"map%d" % i)
    return out


def _map_problem(m: _MapInfo) -> str | None:
    from hybrid.user.mapspec import map_type_name

    t = m.type
    if t == PERF_EVENT_ARRAY:
        return ("it writes perf buffer %r (BPF_PERF_OUTPUT): a program in the traced process cannot write into "
                "a kernel perf buffer" % m.name)
    if t == RINGBUF:
        return ("it writes ring buffer %r (BPF_RINGBUF_OUTPUT): a program in the traced process cannot write "
                "into a kernel ring buffer" % m.name)
    if t == STACK_TRACE:
        return ("it uses stack trace map %r: stack ids taken in the process would not be in the kernel's map "
                "the tool reads" % m.name)
    if t == PROG_ARRAY:
        return "it tail-calls through %r: a tail call cannot go from the process to the kernel's programs" % m.name
    if t not in MIRRORED_TYPES and t not in BRIDGED_TYPES:
        return "map %r is a %s map, which hybrid cannot share with the kernel" % (m.name, map_type_name(t))
    return None


def _relocate(insns, index: dict[int, int]) -> tuple:
    """bcc's ``lddw`` of map fds as hybrid's map indexes (``PSEUDO_MAP_IDX[_VALUE]``)."""
    from hybrid.user import isa

    out = []
    for insn in insns:
        if insn.opcode == LDDW and insn.src in (PSEUDO_MAP_FD, PSEUDO_MAP_VALUE):
            src = isa.PSEUDO_MAP_IDX if insn.src == PSEUDO_MAP_FD else isa.PSEUDO_MAP_IDX_VALUE
            insn = dataclasses.replace(insn, src=src, imm=index[insn.imm])
        out.append(insn)
    return tuple(out)


def _verify(fn: _Fn, maps: dict[int, _MapInfo]) -> str | None:
    """Run hybrid's verifier over ``fn`` against stand-ins of its maps: None, or why it refuses it."""
    from hybrid.user.program import MapRef, Program

    index = {fd: i for i, fd in enumerate(fn.fds)}
    refs = {}
    for fd, i in index.items():
        m = maps[fd]
        addr = 0x10000 * (i + 1)
        refs[i] = MapRef(m.name, addr, m.km.value_size, addr + 0x1000 if m.type == ARRAY else 0)
    try:
        Program.load(_relocate(fn.insns, index), name=_s(fn.name), maps=refs)
    except VerifierError as e:
        return "hybrid cannot run it: %s" % e
    return None


def analyze(bpf) -> tuple[dict[bytes, _Fn], dict[int, _MapInfo]]:
    """Every function of ``bpf``'s module with the maps it uses, and whether it can run in a process."""
    from hybrid.errors import DecodeError
    from hybrid.kernel.maps import KernelMap
    from hybrid.user import isa

    lib = _bcc().libbcc.lib
    names = _table_names(bpf.module)
    fns: dict[bytes, _Fn] = {}
    maps: dict[int, _MapInfo] = {}
    for i in range(lib.bpf_num_functions(bpf.module)):
        name = lib.bpf_function_name(bpf.module, i)
        fn = _Fn(name)
        fns[name] = fn
        start, size = lib.bpf_function_start(bpf.module, name), lib.bpf_function_size(bpf.module, name)
        try:
            fn.insns = tuple(isa.decode(ctypes.string_at(start, size)))
        except DecodeError as e:
            fn.problem = "hybrid cannot decode it: %s" % e
            continue
        fds = []
        for insn in fn.insns:
            if insn.opcode == LDDW and insn.src in (PSEUDO_MAP_FD, PSEUDO_MAP_VALUE) and insn.imm not in fds:
                fds.append(insn.imm)
        fn.fds = tuple(fds)
        for fd in fds:
            if fd not in maps:
                try:
                    maps[fd] = _MapInfo(fd, names.get(fd, "map_fd%d" % fd),
                                        KernelMap.from_fd(fd, dup=True, name=names.get(fd)))
                except HybridError as e:
                    fn.problem = "its map fd %d: %s" % (fd, e)
                    break
        if fn.problem:
            continue
        for fd in fds:
            fn.problem = _map_problem(maps[fd])
            if fn.problem:
                break
        if fn.problem:
            continue
        for insn in fn.insns:
            if insn.opcode == CALL and insn.src == 0 and insn.imm in REFUSED_HELPERS:
                fn.problem = "it calls %s" % REFUSED_HELPERS[insn.imm]
                break
        if fn.problem is None:
            fn.problem = _verify(fn, maps)
    return fns, maps


# --- mirrors, and the tool's reads and writes ------------------------------------------------


def _pull(local, kernel) -> set[bytes]:
    """Copy the kernel map's entries into the (new, empty) userspace map; the keys copied."""
    keys = set()
    for k, v in kernel.lookup_batch():
        local.update(k, v)
        keys.add(bytes(k))
    return keys


def _ignore_errors(op) -> None:
    """bcc's own write to the kernel map: best effort (the mirror's next push brings the kernel map in line)."""
    try:
        op()
    except Exception:  # noqa: BLE001 - bcc raises bare Exception / KeyError
        pass


class _Mirror:
    """One bcc table kept in userspace: a :class:`hybrid.bridge.mirror.Mirror` pushes it to the kernel map,
    and the tool's reads and writes through bcc's table classes go to the userspace map, the truth (writes
    also to the kernel map at once), under the mirror's lock."""

    def __init__(self, local, kernel, interval: float, name: str):
        from hybrid.bridge.mirror import Mirror

        pulled = _pull(local, kernel)
        self.m = Mirror(local, kernel, interval=interval, name=name)
        with self.m._lock:
            self.m._pushed |= pulled  # deleted by a program: deleted from the kernel map at the next push
        self.local, self.kernel, self.name = local, kernel, name
        self.percpu = kernel.type in PERCPU_TYPES
        self.ncpu = kernel.nr_cpus

    def sync(self) -> None:
        self.m.sync()

    # bcc's ctypes values <-> the userspace map's

    def value(self, raw: bytes):
        """A bcc leaf (a per-CPU table's: one 8-byte aligned value per CPU) as the userspace map takes it."""
        n = self.local.value_size
        if not self.percpu:
            return raw[:n]
        stride = len(raw) // self.ncpu
        return [raw[i * stride:i * stride + n] for i in range(self.ncpu)]

    def leaf(self, table, value):
        """The userspace map's ``value`` as the table's ctypes ``Leaf``."""
        size = ctypes.sizeof(table.Leaf)
        if self.percpu:
            stride = size // self.ncpu
            raw = b"".join(bytes(v)[:stride].ljust(stride, b"\0") for v in value)
        else:
            raw = bytes(value)
        return table.Leaf.from_buffer_copy(raw[:size].ljust(size, b"\0"))

    @staticmethod
    def key(table, raw: bytes):
        size = ctypes.sizeof(table.Key)
        return table.Key.from_buffer_copy(bytes(raw)[:size].ljust(size, b"\0"))

    # reads: the userspace map

    def lookup(self, table, key):
        value = self.local.lookup(bytes(key))
        if value is None:
            raise KeyError
        return self.leaf(table, value)

    def next(self, table, key):
        nk = self.local.next_key(None if key is None else bytes(key))
        if nk is None:
            raise StopIteration()
        return self.key(table, nk)

    def items(self, table) -> list:
        return [(self.key(table, k), self.leaf(table, v)) for k, v in self.local.items()]

    # writes: the userspace map, then bcc's own write to the kernel map

    def update(self, pairs, kernel_op) -> None:
        from hybrid.errors import MapError

        with self.m._lock:
            for k, v in pairs:
                try:
                    self.local.update(k, v)
                except MapError as e:  # as bcc says it
                    raise Exception("Could not update table: %s" % os.strerror(e.errno)) from None
                self.m._pushed.add(k)
            _ignore_errors(kernel_op)

    def delete(self, keys, kernel_op) -> None:
        """Raises KeyError (as bcc does) for a key the userspace map does not have; deletes none then."""
        with self.m._lock:
            if any(self.local.lookup(k) is None for k in keys):
                raise KeyError
            for k in keys:
                self.local.delete(k)
                self.m._pushed.discard(k)
            _ignore_errors(kernel_op)

    def take_all(self, table) -> list:
        """Every entry, deleted from both maps (``items_lookup_and_delete_batch``)."""
        from hybrid.errors import MapError

        with self.m._lock:
            items = list(self.local.items())
            for k, _ in items:
                try:
                    self.local.delete(k)
                except MapError:
                    pass
                try:
                    self.kernel.delete(k)
                except MapError:
                    pass
                self.m._pushed.discard(bytes(k))
        return [(self.key(table, k), self.leaf(table, v)) for k, v in items]

    def stop(self) -> None:
        """Stop the thread without pushing (no userspace program writes the map any more)."""
        m = self.m
        if not m.closed:
            m.closed = True
            m._stop.set()
            if m._thread is not None:
                m._thread.join()

    def close(self) -> None:
        self.m.close()


def _mirror_of(table) -> _Mirror | None:
    return _MIRRORS.get(getattr(table, "map_fd", None))


# bcc's table classes, patched: a mirrored table reads its userspace map; writes reach both maps


def _t_getitem(self, key):
    m = _mirror_of(self)
    if m is None:
        return _ORIG["TableBase.__getitem__"](self, key)
    return m.lookup(self, key)


def _t_next(self, key):
    m = _mirror_of(self)
    if m is None:
        return _ORIG["TableBase.next"](self, key)
    return m.next(self, key)


def _t_setitem(self, key, leaf):
    m = _mirror_of(self)
    if m is None:
        return _ORIG["TableBase.__setitem__"](self, key, leaf)
    m.update([(bytes(key), m.value(bytes(leaf)))], lambda: _ORIG["TableBase.__setitem__"](self, key, leaf))


def _t_delitem(self, key):
    m = _mirror_of(self)
    if m is None:
        return _ORIG["TableBase.__delitem__"](self, key)
    m.delete([bytes(key)], lambda: _ORIG["TableBase.__delitem__"](self, key))


def _t_clearitem(self, key):
    m = _mirror_of(self)
    if m is None:
        return _ORIG["ArrayBase.clearitem"](self, key)
    k = self._normalize_key(key)
    m.update([(bytes(k), m.value(bytes(self.Leaf())))], lambda: _ORIG["ArrayBase.clearitem"](self, key))


def _t_update_batch(self, ct_keys, ct_values):
    m = _mirror_of(self)
    if m is None:
        return _ORIG["TableBase.items_update_batch"](self, ct_keys, ct_values)
    self._sanity_check_keys_values(keys=ct_keys, values=ct_values)
    m.update([(bytes(ct_keys[i]), m.value(bytes(ct_values[i]))) for i in range(len(ct_keys))],
             lambda: _ORIG["TableBase.items_update_batch"](self, ct_keys, ct_values))


def _t_delete_batch(self, ct_keys=None):
    m = _mirror_of(self)
    if m is None or ct_keys is None:  # every key: items_lookup_and_delete_batch (patched below)
        return _ORIG["TableBase.items_delete_batch"](self, ct_keys)
    self._sanity_check_keys_values(keys=ct_keys)
    try:
        m.delete([bytes(ct_keys[i]) for i in range(len(ct_keys))],
                 lambda: _ORIG["TableBase.items_delete_batch"](self, ct_keys))
    except KeyError:
        raise Exception("BPF_MAP_DELETE_BATCH has failed: %s" % os.strerror(2)) from None


def _t_batch(self, delete=True):
    m = _mirror_of(self)
    if m is None:
        yield from _ORIG["TableBase._items_lookup_and_optionally_delete_batch"](self, delete)
        return
    yield from (m.take_all(self) if delete else m.items(self))


_TABLE_PATCHES = (
    ("TableBase", "__getitem__", _t_getitem),
    ("TableBase", "next", _t_next),
    ("TableBase", "__setitem__", _t_setitem),
    ("TableBase", "__delitem__", _t_delitem),
    ("ArrayBase", "clearitem", _t_clearitem),
    ("TableBase", "items_update_batch", _t_update_batch),
    ("TableBase", "items_delete_batch", _t_delete_batch),
    ("TableBase", "_items_lookup_and_optionally_delete_batch", _t_batch),
)


# --- one bcc.BPF: its hybrid object ---------------------------------------------------------


@dataclasses.dataclass
class _Att:
    fn: bytes
    target: object  # UprobeTarget
    pid: int
    att: object = None  # hybrid Attachment


class Instance:
    """The userspace side of one ``bcc.BPF``: its functions, one hybrid object and the probes placed."""

    def __init__(self, bpf):
        self.bpf = bpf
        self.fns: dict[bytes, _Fn] | None = None
        self.maps: dict[int, _MapInfo] = {}
        self.user: set[bytes] = set()  # functions attached in a process (ever)
        self.both: set[bytes] = set()  # functions also run as kernel uprobes (where a site had to fall back)
        self.obj = None
        self.roles: dict[int, str] = {}
        self.mirrors: dict[int, _Mirror] = {}
        self.atts: dict[bytes, _Att] = {}  # bcc event name -> probe
        self.broken: str | None = None
        self.closed = False

    # --- what runs where ---

    def problem(self, fn: bytes) -> str | None:
        if self.fns is None:
            self.fns, self.maps = analyze(self.bpf)
        if self.broken:
            return self.broken
        f = self.fns.get(fn)
        if f is None:
            return "no function %r in the module" % _s(fn)
        return f.problem

    def _included(self) -> list[_Fn]:
        return [f for _, f in sorted(self.fns.items()) if f.problem is None]

    def _roles(self, kernel: set[bytes], user: set[bytes]) -> dict[int, str]:
        roles = {}
        for f in self._included():
            for fd in f.fds:
                roles.setdefault(fd, None)
        for fd in roles:
            users = {f.name for f in self._included() if fd in f.fds}
            k, u = users & kernel, users & user
            if self.maps[fd].type in BRIDGED_TYPES or (k and u):
                roles[fd] = "bridge"
            elif k:
                roles[fd] = "local"  # only kernel programs use it: the userspace copy is never run
            else:
                roles[fd] = "mirror"
        return roles

    def _kernel_fns(self, extra: bytes | None = None) -> set[bytes]:
        k = set(self.bpf.funcs)
        if extra is not None:
            k.add(extra)
        return k

    def ensure(self, *, user: bytes | None = None, kernel: bytes | None = None) -> None:
        """Build the object, or adapt it to a function about to run in the process (``user``) or loaded
        into the kernel (``kernel``).  A function run as a kernel uprobe where one site could not take a
        probe in the process (``both``) counts as running on both sides: its other sites are likely in
        the process."""
        roles = self._roles(self._kernel_fns(kernel), self.user | self.both | ({user} if user else set()))
        if self.obj is None:
            if user is not None:
                self._build(roles)
            return
        if roles == self.roles:
            return
        rebuild = [fd for fd, r in roles.items() if self.roles.get(fd) != r
                   and not (self.roles.get(fd) == "mirror" and r == "local")]
        if not rebuild:
            for fd, r in roles.items():
                if self.roles.get(fd) == "mirror" and r == "local":
                    self._drop_mirror(fd, push=False)
                    self.roles[fd] = "local"
            return
        names = ", ".join(repr(self.maps[fd].name) for fd in rebuild)
        why = "%s now %s too, and maps %s are used on both sides" % (
            _s(kernel or user), "runs in the kernel" if kernel else "runs in the process", names)
        self._rebuild(roles, why)

    # --- the object ---

    def _build(self, roles: dict[int, str]) -> None:
        from hybrid.user.elf import ObjectSpec, ProgramSpec
        from hybrid.user.mapspec import MapSpec
        from hybrid.user.object import BpfObject

        lic = _s(_bcc().libbcc.lib.bpf_module_license(self.bpf.module) or b"GPL")
        while True:
            included = self._included()
            fds = sorted({fd for f in included for fd in f.fds})
            index = {fd: i for i, fd in enumerate(fds)}
            specs = []
            for fd in fds:
                m, role = self.maps[fd], roles[fd]
                km = m.km
                kw = dict(kernel_id=km.id, bridge="syscall") if role == "bridge" else {}
                specs.append(MapSpec(m.name[:63], km.type, km.key_size, km.value_size, km.max_entries, km.flags,
                                     km.map_extra, **kw))
            progs = tuple(ProgramSpec(name=_s(f.name), section="uprobe", kind="uprobe", attach=None,
                                      insns=_relocate(f.insns, index), license=lic, prog_type=2) for f in included)
            spec = ObjectSpec("bcc", lic, 0, progs, tuple(specs))
            try:
                obj = BpfObject(spec)
            except VerifierError as e:
                m = re.match(r"program '([^']+)'", str(e))
                bad = self.fns.get(m.group(1).encode()) if m else None
                if bad is None or bad.problem:
                    self.broken = "hybrid cannot load the module's programs: %s" % e
                    raise
                bad.problem = "hybrid cannot run it: %s" % e
                continue
            except HybridError as e:
                self.broken = "hybrid cannot build the module's maps: %s" % e
                raise
            break
        self.obj = obj
        self.roles = {fd: roles[fd] for fd in fds}
        try:
            for fd in fds:
                if self.roles[fd] == "mirror":
                    m = self.maps[fd]
                    mirror = _Mirror(obj.region[m.name[:63]], m.km, config.interval, m.name)
                    self.mirrors[fd] = mirror
                    _MIRRORS[fd] = mirror
        except BaseException:
            self._close_object()
            raise
        if config.verbose:
            _say("one object for the module: programs %s; maps %s" % (
                ", ".join(_s(f.name) for f in included),
                ", ".join("%s (%s)" % (self.maps[fd].name, {"mirror": "mirrored", "bridge": "through bpf()",
                                                             "local": "kernel programs only"}[r])
                          for fd, r in self.roles.items()) or "none"))

    def _drop_mirror(self, fd: int, push: bool = True) -> None:
        mirror = self.mirrors.pop(fd, None)
        if _MIRRORS.get(fd) is mirror:
            _MIRRORS.pop(fd, None)
        if mirror is not None:
            mirror.close() if push else mirror.stop()

    def _close_object(self) -> None:
        errors = []
        for fd in list(self.mirrors):
            try:
                self._drop_mirror(fd)
            except Exception as e:  # noqa: BLE001 - close everything, then report the first
                errors.append(e)
        obj, self.obj = self.obj, None
        self.roles = {}
        if obj is not None:
            try:
                obj.close()
            except Exception as e:  # noqa: BLE001
                errors.append(e)
        if errors:
            raise errors[0]

    def _rebuild(self, roles: dict[int, str], why: str) -> None:
        _say("%s: placing the userspace probes again with those maps shared through bpf() (calls made "
             "meanwhile are not seen)" % why)
        placed = list(self.atts.items())
        for _, a in placed:
            if a.att is not None:
                a.att.detach()
                a.att = None
        self._close_object()
        self._build(roles)
        for ev, a in placed:
            try:
                a.att = self.obj.attach(a.pid, programs=[_s(a.fn)], targets={_s(a.fn): a.target})
            except HybridError as e:
                _say("%s: could not be placed again, it is detached: %s" % (_s(ev), e))
                del self.atts[ev]
                self.bpf._del_uprobe_fd(ev)

    # --- probes ---

    def attach_user(self, fn: bytes, target, pid: int, ev_name: bytes) -> None:
        self.ensure(user=fn)
        if self.fns[fn].problem:  # found out while building the object
            raise HybridError(self.fns[fn].problem)
        att = self.obj.attach(pid, programs=[_s(fn)], targets={_s(fn): target})
        self.user.add(fn)
        self.atts[ev_name] = _Att(fn, target, pid, att)
        if config.verbose:
            for pl in att.placements:
                _say("%s %s at %s in process %d, in the process" % (pl.kind, pl.program, pl.where, pid))

    def detach(self, ev_name: bytes) -> None:
        a = self.atts.pop(ev_name)
        if a.att is not None:
            a.att.detach()
        for mirror in self.mirrors.values():  # what it counted, in the kernel maps now
            mirror.sync()

    def kernel_loaded(self, fn: bytes) -> None:
        if self.obj is not None and self.fns is not None:
            self.ensure(kernel=fn)

    def sync(self) -> None:
        for mirror in self.mirrors.values():
            mirror.sync()

    def close(self) -> None:
        """Detach every userspace probe (restoring the target's code), push the mirrors, free the object."""
        if self.closed:
            return
        self.closed = True
        errors = []
        for ev, a in list(self.atts.items()):
            try:
                if a.att is not None:
                    a.att.detach()
            except Exception as e:  # noqa: BLE001
                errors.append(e)
            self.atts.pop(ev, None)
            if ev in self.bpf.uprobe_fds:
                self.bpf._del_uprobe_fd(ev)
        try:
            self._close_object()
        except Exception as e:  # noqa: BLE001
            errors.append(e)
        for m in self.maps.values():
            try:
                m.km.close()
            except Exception:  # noqa: BLE001
                pass
        if errors:
            _say("while detaching: %s" % errors[0])


def instance(bpf) -> Instance:
    inst = bpf.__dict__.get("_hybrid")
    if inst is None:
        inst = bpf.__dict__["_hybrid"] = Instance(bpf)
    return inst


# --- bcc.BPF, patched -----------------------------------------------------------------------


def _where(path: bytes, offset: int, sym: bytes) -> str:
    """``path:symbol`` for a message (bcc names a traced process's files /proc/PID/root/PATH: PATH here)."""
    p = _s(path)
    m = re.fullmatch(r"/proc/\d+/root(/.+)", p)
    if m:
        try:
            if os.path.samefile(p, m.group(1)):
                p = m.group(1)
        except OSError:
            pass
    if sym:
        return "%s:%s" % (p, _s(sym))
    try:
        from hybrid.user.attach import symbols

        s = symbols.symbol_at(_s(path), symbols.offset_to_vaddr(_s(path), offset))
        if s is not None:
            return "%s:%s" % (p, s.name.split("@")[0])
    except Exception:  # noqa: BLE001 - a name for a message only
        pass
    return "%s:%#x" % (p, offset)


def _site_problem(path: str, offset: int) -> str | None:
    """A probe inside a function (not at a symbol): can its site take a jump?  (The agent checks branch
    targets only within the function it is given; here it is the function containing the site.)"""
    from hybrid.user.attach import symbols, x86

    try:
        vaddr = symbols.offset_to_vaddr(path, offset)
        if symbols.symbol_at(path, vaddr) is not None:
            return None
        func = symbols.function_containing(path, vaddr)
        if func is None:
            return "no function known around %#x to check the probe site against" % vaddr
        x86.plan_window(symbols.read_code(path, vaddr, 32), vaddr, func_start=func.vaddr,
                        func_code=symbols.read_code(path, func.vaddr, func.size))
    except HybridError as e:
        return "the probe site cannot take a jump: %s" % e
    return None


def _kernel_uprobe(bpf, fn_name: bytes, ev_name: bytes, path: bytes, offset: int, pid: int, retprobe: bool):
    """bcc's attach, with ``ref_ctr_offset`` 0 (bcc 0.26's Python passes garbage there)."""
    from hybrid.kernel.bcc import _attach_uprobe_fn

    bcc = _bcc()
    inst = bpf.__dict__.get("_hybrid")
    if pid > 0 and inst is not None and inst.fns is not None and inst.fns.get(fn_name) is not None \
            and inst.fns[fn_name].problem is None:
        # one site of a function that runs in the process could not take the probe: its other sites
        # probably can (before load_func, so that the object is adapted once, for both sides)
        inst.both.add(fn_name)
    fn = bpf.load_func(fn_name, bcc.BPF.KPROBE)
    fd = _attach_uprobe_fn()(fn.fd, 1 if retprobe else 0, ev_name, path, offset, pid, 0)
    if fd < 0:
        raise Exception("Failed to attach BPF to %s" % ("uretprobe" if retprobe else "uprobe"))
    bpf._add_uprobe_fd(ev_name, fd)


def _attach(bpf, retprobe: bool, name, sym, addr, fn_name, pid, sym_off):
    from hybrid.user.elf import UprobeTarget

    bcc = _bcc()
    name, sym, fn_name = (bcc._assert_is_bytes(x) for x in (name, sym, fn_name))
    path, offset = bcc.BPF._check_path_symbol(name, sym, addr, pid, sym_off)
    bpf._check_probe_quota(1)
    ev_name = bpf._get_uprobe_evname(b"r" if retprobe else b"p", path, offset, pid)
    kind = "uretprobe" if retprobe else "uprobe"
    if config.mode == "kernel":
        reason = "--mode kernel"
    elif pid is None or pid <= 0:
        reason = "no process given: a probe in every process needs the kernel"
    elif ev_name in bpf.uprobe_fds:
        raise Exception("Failed to attach BPF to %s" % kind)
    else:
        inst = instance(bpf)
        reason = inst.problem(fn_name) or _site_problem(_s(path), offset)
        if reason is None:
            target = UprobeTarget(_s(path), "%#x" % offset, 0, retprobe)
            try:
                inst.attach_user(fn_name, target, pid, ev_name)
            except HybridError as e:
                reason = str(e)
            else:
                bpf._add_uprobe_fd(ev_name, USER_FD)
                return bpf
    key = (fn_name, kind, reason)
    if key not in _noted:
        _noted.add(key)
        _say("%s %s at %s: a kernel %s: %s" % (kind, _s(fn_name), _where(path, offset, sym), kind, reason))
    _kernel_uprobe(bpf, fn_name, ev_name, path, offset, pid, retprobe)
    return bpf


def _attach_uprobe(self, name=b"", sym=b"", sym_re=b"", addr=None, fn_name=b"", pid=-1, sym_off=0):
    if sym_re:  # bcc resolves the matches and calls attach_uprobe(addr=...) for each: back here
        return _ORIG["attach_uprobe"](self, name=name, sym=sym, sym_re=sym_re, addr=addr, fn_name=fn_name,
                                      pid=pid, sym_off=sym_off)
    assert sym_off >= 0
    if addr is not None:
        assert sym_off == 0, "offset with addr is not supported"
    return _attach(self, False, name, sym, addr, fn_name, pid, sym_off)


def _attach_uretprobe(self, name=b"", sym=b"", sym_re=b"", addr=None, fn_name=b"", pid=-1):
    if sym_re:
        return _ORIG["attach_uretprobe"](self, name=name, sym=sym, sym_re=sym_re, addr=addr, fn_name=fn_name,
                                         pid=pid)
    return _attach(self, True, name, sym, addr, fn_name, pid, 0)


def _detach_uprobe_event(self, ev_name):
    inst = self.__dict__.get("_hybrid")
    if inst is not None and ev_name in inst.atts:
        inst.detach(ev_name)
        self._del_uprobe_fd(ev_name)
        return
    return _ORIG["detach_uprobe_event"](self, ev_name)


def _load_func(self, func_name, prog_type, device=None, attach_type=-1):
    func_name = _bcc()._assert_is_bytes(func_name)
    new = func_name not in self.funcs
    fn = _ORIG["load_func"](self, func_name, prog_type, device, attach_type)
    inst = self.__dict__.get("_hybrid")
    if new and inst is not None:
        inst.kernel_loaded(func_name)
    return fn


def _cleanup(self):
    inst = self.__dict__.pop("_hybrid", None)
    if inst is not None:
        inst.close()
    orig = _ORIG.get("cleanup") or _bcc().BPF.cleanup  # (atexit may call it after uninstall())
    return orig(self)


_BPF_PATCHES = (("attach_uprobe", _attach_uprobe), ("attach_uretprobe", _attach_uretprobe),
                ("detach_uprobe_event", _detach_uprobe_event), ("load_func", _load_func), ("cleanup", _cleanup))


def install(mode: str = "user", interval: float = 0.1, verbose: bool = False) -> None:
    """Patch bcc (once per process): see the module doc.  ``mode`` "kernel" keeps every probe in the kernel."""
    if mode not in MODES:
        raise HybridError("mode must be one of %s, not %r" % (", ".join(MODES), mode))
    if interval < 0:
        raise HybridError("the sync interval must be >= 0 seconds, not %r" % interval)
    config.mode, config.interval, config.verbose = mode, float(interval), verbose
    if _ORIG:
        return
    bcc = _bcc()
    from bcc import table

    for attr, fn in _BPF_PATCHES:
        _ORIG[attr] = getattr(bcc.BPF, attr)
        setattr(bcc.BPF, attr, fn)
    for cls, attr, fn in _TABLE_PATCHES:
        _ORIG["%s.%s" % (cls, attr)] = getattr(table, cls).__dict__[attr]
        setattr(getattr(table, cls), attr, fn)


def uninstall() -> None:
    """Undo :func:`install` (BPF objects made meanwhile keep their userspace probes until cleanup)."""
    if not _ORIG:
        return
    bcc = _bcc()
    from bcc import table

    for attr, _ in _BPF_PATCHES:
        setattr(bcc.BPF, attr, _ORIG.pop(attr))
    for cls, attr, _ in _TABLE_PATCHES:
        setattr(getattr(table, cls), attr, _ORIG.pop("%s.%s" % (cls, attr)))


# --- running a tool -------------------------------------------------------------------------

DIST_PACKAGES = "/usr/lib/python3/dist-packages"


def find_tool(tool: str) -> str:
    """The tool's path (searched in PATH without a '/'); a HybridError unless it is a Python script."""
    path = tool if "/" in tool else shutil.which(tool)
    if path is None or not os.path.isfile(path):
        raise HybridError("bcc tool %s: %s" % (tool, "no such file" if "/" in tool else "not found in PATH"))
    try:
        with open(path, "rb") as f:
            head = f.read(256)
    except OSError as e:
        raise HybridError("bcc tool %s: %s" % (path, e.strerror)) from None
    first = head.split(b"\n", 1)[0]
    if not (path.endswith(".py") or (first.startswith(b"#!") and b"python" in first)):
        raise HybridError("%s is not a Python script: hybrid bcc runs bcc's Python tools (its first line is %r)"
                          % (path, first[:80].decode(errors="replace")))
    return os.path.abspath(path)


_BOOT = "import sys; from hybrid.compat.bcc import main; sys.exit(main(sys.argv[1:]))"


def exec_tool(argv: list[str], *, mode: str = "user", interval: float = 0.1, verbose: bool = False):
    """Replace this process by a fresh interpreter running the tool ``argv`` under :func:`main`."""
    if not argv:
        raise HybridError("no tool given: hybrid bcc [--mode user|kernel] [--sync SECONDS] -- TOOL ARGS")
    if mode not in MODES:
        raise HybridError("--mode must be one of %s, not %r" % (", ".join(MODES), mode))
    if interval < 0:
        raise HybridError("--sync must be >= 0 seconds, not %r" % interval)
    tool = find_tool(argv[0])
    args = ["--mode", mode, "--sync", repr(float(interval))] + (["-v"] if verbose else [])
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-c", _BOOT, *args, "--", tool, *argv[1:]])


def _exit_on(signum, frame):  # SIGTERM/SIGHUP: a normal exit, so that cleanup restores the target
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    """Run a bcc tool in this interpreter with bcc patched (what ``hybrid bcc`` execs)."""
    import runpy

    ap = argparse.ArgumentParser(prog="hybrid bcc", usage="hybrid bcc [--mode user|kernel] [--sync SECONDS] [-v] "
                                 "-- TOOL [ARGS...]", description="run a bcc Python tool with its uprobes in the "
                                 "traced process")
    ap.add_argument("--mode", choices=MODES, default="user")
    ap.add_argument("--sync", type=float, default=0.1)
    ap.add_argument("-v", "--verbose", action="store_true")
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" in argv:  # options, then the tool and its own arguments untouched
        i = argv.index("--")
        args, command = ap.parse_args(argv[:i]), argv[i + 1:]
    else:
        ap.add_argument("command", nargs=argparse.REMAINDER)
        args = ap.parse_args(argv)
        command = args.command
    if not command:
        ap.error("no tool given")
    try:
        tool = find_tool(command[0])
        install(args.mode, args.sync, args.verbose)
    except HybridError as e:
        print("hybrid bcc: %s" % e, file=sys.stderr)
        return 2
    sys.path[:] = [os.path.dirname(tool)] + [p for p in sys.path if p not in ("", ".")]
    if os.path.isdir(DIST_PACKAGES) and DIST_PACKAGES not in sys.path:
        sys.path.append(DIST_PACKAGES)  # what else a tool imports from Debian's Python, after our own
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) == signal.SIG_DFL:
            signal.signal(sig, _exit_on)
    sys.argv = [tool] + list(command[1:])
    runpy.run_path(tool, run_name="__main__")
    return 0


if __name__ == "__main__":  # pragma: no cover - python -m hybrid.compat.bcc
    sys.exit(main())
