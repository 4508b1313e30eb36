"""What the running kernel can do, detected once per process and cached.

``check(name)`` returns a :class:`Feature` (name, available, detail: how it
was detected); ``require(name, what)`` raises a
:class:`~hybrid.errors.FeatureError` naming ``what`` asked, the missing
feature, how that was detected and what to use instead (or a
:class:`~hybrid.errors.KernelError` saying root is needed when the bpf()
syscall itself is refused); :func:`summary` lists every feature for a
``hybrid features`` style listing.  Map and program types are probed with
libbpf (``libbpf_probe_bpf_map_type`` / ``libbpf_probe_bpf_prog_type``),
attach points from sysfs/tracefs, and fentry/fexit/tp_btf by loading a
trivial ``BPF_PROG_TYPE_TRACING`` program.

Feature names: ``bpf``, ``tracefs``, ``bpffs``, ``tracepoints``,
``raw_tracepoints``, ``kprobes``, ``kretprobes``, ``uprobes``,
``uretprobes``, ``fentry``, ``fexit``, ``fmod_ret``, ``tp_btf``, ``lsm``,
``perf_events``, ``ringbuf``, ``user_ringbuf``, ``mmapable_array``.
"""

from __future__ import annotations

import ctypes
import errno as E
import mmap
import os
import threading
from dataclasses import dataclass

from hybrid.errors import FeatureError, KernelError

NEEDS_ROOT = "needs root (or CAP_BPF and CAP_PERFMON)"

BPF_FS_MAGIC = 0xCAFE4A11
TRACEFS_MAGIC = 0x74726163
DEBUGFS_MAGIC = 0x64626720
EVENT_SOURCES = "/sys/bus/event_source/devices"
TRACEFS_PATHS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")
BPFFS_PATH = "/sys/fs/bpf"

# enum bpf_prog_type / bpf_map_type / bpf_attach_type values used here
PROG_KPROBE, PROG_TRACEPOINT, PROG_PERF_EVENT, PROG_RAW_TRACEPOINT, PROG_TRACING, PROG_LSM = 2, 5, 7, 17, 26, 29
MAP_ARRAY, MAP_RINGBUF, MAP_USER_RINGBUF = 2, 27, 31
BPF_TRACE_RAW_TP, BPF_TRACE_FENTRY, BPF_TRACE_FEXIT, BPF_MODIFY_RETURN = 23, 24, 25, 26
BPF_F_MMAPABLE = 1 << 10
BTF_KIND_TYPEDEF, BTF_KIND_FUNC = 8, 12


@dataclass(frozen=True)
class Feature:
    """One line of :func:`summary`: ``name, available, detail = feature`` works too."""

    name: str
    available: bool
    detail: str  # how it was detected (and why it is missing)

    def __iter__(self):
        return iter((self.name, self.available, self.detail))


DESCRIPTIONS = {
    "bpf": "usable bpf() syscall",
    "tracefs": "tracefs",
    "bpffs": "bpf filesystem at %s" % BPFFS_PATH,
    "tracepoints": "tracepoints",
    "raw_tracepoints": "raw tracepoints",
    "kprobes": "kprobes",
    "kretprobes": "kretprobes",
    "uprobes": "uprobes",
    "uretprobes": "uretprobes",
    "fentry": "fentry programs (BPF trampolines)",
    "fexit": "fexit programs (BPF trampolines)",
    "fmod_ret": "fmod_ret programs (BPF trampolines)",
    "tp_btf": "BTF-enabled raw tracepoints (tp_btf)",
    "lsm": "BPF LSM programs",
    "perf_events": "perf event programs",
    "ringbuf": "ring buffer maps (BPF_MAP_TYPE_RINGBUF)",
    "user_ringbuf": "user ring buffer maps (BPF_MAP_TYPE_USER_RINGBUF)",
    "mmapable_array": "mmap()able arrays (BPF_F_MMAPABLE)",
}
# features whose detection loads something through bpf(): unknowable without privileges
_NEEDS_BPF = {"tracepoints", "raw_tracepoints", "fentry", "fexit", "fmod_ret", "tp_btf", "lsm", "perf_events",
              "ringbuf", "user_ringbuf", "mmapable_array"}

_cache: dict[str, Feature] = {}
_lock = threading.RLock()


def reset() -> None:
    """Forget every cached result (after mounting a filesystem, changing privileges...)."""
    with _lock:
        _cache.clear()


def check(name: str) -> Feature:
    """The feature ``name`` (cached); KeyError for an unknown name."""
    if name not in DESCRIPTIONS:
        raise KeyError("unknown kernel feature %r (known: %s)" % (name, ", ".join(DESCRIPTIONS)))
    return _cached(name, lambda: _DETECTORS[name]())


def has(name: str) -> bool:
    return check(name).available


def summary() -> list[Feature]:
    """Every feature, in a fixed order: ``[(name, available, detail), ...]``."""
    return [check(name) for name in DESCRIPTIONS]


def _cached(key: str, detect) -> Feature:
    with _lock:
        f = _cache.get(key)
        if f is None:
            name = key
            if name in _NEEDS_BPF and not check("bpf").available:
                f = Feature(name, False, "unknown: %s" % check("bpf").detail)
            else:
                available, detail = detect()
                f = Feature(name, bool(available), detail)
            _cache[key] = f
        return f


# --- requiring --------------------------------------------------------------------


def require(name: str, what: str, target: str | None = None, syscall: bool = False) -> None:
    """Nothing when ``name`` is available; else FeatureError naming ``what`` (e.g. ``program 'x'
    (kprobe/do_sys_openat2)``), the feature, how it was detected and the alternative.  ``target``
    (a function or event; ``syscall``: it is a syscall name) makes the alternative concrete."""
    f = check(name)
    if f.available:
        return
    bpf = check("bpf")
    if name in _NEEDS_BPF and not bpf.available:
        raise KernelError("%s: %s" % (what, bpf.detail), E.EPERM)
    raise FeatureError("%s: this kernel has no %s (%s); %s" % (what, DESCRIPTIONS[name], f.detail,
                                                                 alternative(name, target, syscall)), E.EOPNOTSUPP)


_SYSCALL_PREFIXES = ("__x64_sys_", "__ia32_sys_", "__arm64_sys_", "__se_sys_", "__do_sys_", "__sys_", "ksys_",
                     "sys_")


def syscall_of(function: str | None) -> str | None:
    """``__x64_sys_openat`` -> ``openat``: the syscall a kernel function implements, if it is one."""
    if not function:
        return None
    fn = function.split("+")[0]
    for p in _SYSCALL_PREFIXES:
        if fn.startswith(p) and len(fn) > len(p):
            return fn[len(p):]
    return None


def alternative(name: str, target: str | None = None, syscall: bool = False) -> str:
    """What to use instead of the missing feature ``name`` (a sentence starting with ``use``)."""
    ret = name in ("kretprobes", "fexit")
    if name in ("kprobes", "kretprobes", "fentry", "fexit", "fmod_ret"):
        sc = target if syscall else syscall_of(target)
        if sc:
            tp = "tracepoint/syscalls/sys_%s_%s" % ("exit" if ret else "enter", sc)
            raw = "raw_tp/sys_%s" % ("exit" if ret else "enter")
            return "use a tracepoint (%s) or a raw tracepoint (%s) instead" % (tp, raw)
        text = ("use a tracepoint (tracepoint/<category>/<event>, listed in %s/events) or a raw tracepoint "
                "(raw_tp/<event>) instead" % (tracefs_path() or "/sys/kernel/tracing"))
        if name in ("kprobes", "kretprobes") and _safe_has("fentry"):
            text += "; fentry/fexit work too"
        elif name in ("fentry", "fexit", "fmod_ret") and _safe_has("tp_btf"):
            text += "; tp_btf/<event> works too"
        return text
    return {
        "tp_btf": "use a raw tracepoint (raw_tp/%s) instead" % (target or "<event>"),
        "raw_tracepoints": "use a tracepoint (tracepoint/<category>/%s) instead" % (target or "<event>"),
        "tracepoints": "use a raw tracepoint (raw_tp/<event>) instead",
        "uprobes": "use hybrid's userspace probes (hybrid.load(path).attach(pid)) instead",
        "uretprobes": "use hybrid's userspace probes (hybrid.load(path).attach(pid)) instead",
        "tracefs": "mount it: mount -t tracefs tracefs /sys/kernel/tracing",
        "bpffs": "mount it: mount -t bpf bpf %s" % BPFFS_PATH,
        "ringbuf": "use a perf event array (BPF_MAP_TYPE_PERF_EVENT_ARRAY) read with a perf buffer instead",
        "user_ringbuf": "pass data to programs through a map (an array, hash or queue) instead",
        "mmapable_array": "use lookup()/update() on the array instead",
        "lsm": "no alternative: BPF LSM needs CONFIG_BPF_LSM and 'bpf' in the lsm= boot parameter",
        "perf_events": "no alternative: perf event programs need CONFIG_PERF_EVENTS",
    }.get(name, "no alternative")


def _safe_has(name: str) -> bool:
    try:
        return has(name)
    except KernelError:
        return False


# --- filesystems ----------------------------------------------------------------------

_libc = None


def fs_magic(path: str) -> int | None:
    """``statfs(path).f_type``, or None when ``path`` cannot be reached."""
    global _libc
    if _libc is None:
        c = ctypes.CDLL(None, use_errno=True)
        c.statfs.restype, c.statfs.argtypes = ctypes.c_int, [ctypes.c_char_p, ctypes.c_void_p]
        _libc = c
    buf = ctypes.create_string_buffer(256)  # struct statfs: f_type (a long) first
    if _libc.statfs(os.fsencode(path), buf) != 0:
        return None
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF


def is_bpffs(path: str) -> bool:
    return fs_magic(path) == BPF_FS_MAGIC


def bpffs_problem(path: str) -> str | None:
    """None when ``path`` is a directory on a bpf filesystem, else why not (with how to fix it)."""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        return "%s does not exist or is not a directory (create it on a bpf filesystem)" % path
    magic = fs_magic(path)
    if magic == BPF_FS_MAGIC:
        return None
    where = "%#x" % magic if magic is not None else "unreadable"
    return ("%s is not on a bpf filesystem (statfs magic %s, not BPF_FS_MAGIC %#x): bpffs is not mounted there; "
            "mount it with `mount -t bpf bpf %s`" % (path, where, BPF_FS_MAGIC, path))


def bpffs_at(path: str) -> Feature:
    problem = bpffs_problem(path)
    return Feature("bpffs", problem is None, problem or "%s: statfs magic is BPF_FS_MAGIC %#x" % (path, BPF_FS_MAGIC))


def tracefs_path() -> str | None:
    """Where tracefs is mounted (``/sys/kernel/tracing`` first), or None."""
    for p in TRACEFS_PATHS:
        if fs_magic(p) == TRACEFS_MAGIC:
            return p
    return None


# --- detectors --------------------------------------------------------------------------


def _lib():
    from hybrid.kernel import libbpf as L

    return L, L.lib()


def _bpf() -> tuple[bool, str]:
    L, lib = _lib()
    fd = lib.bpf_map_create(MAP_ARRAY, b"hybrid_probe", 4, 4, 1, None)
    if fd >= 0:
        os.close(fd)
        return True, "bpf(BPF_MAP_CREATE) of an array succeeds"
    err = L.errno_of(fd)
    if err in (E.EPERM, E.EACCES):
        return False, "bpf(BPF_MAP_CREATE) fails with %s: %s" % (L.errname(err), NEEDS_ROOT)
    if err == E.ENOSYS:
        return False, "the bpf() syscall does not exist (CONFIG_BPF_SYSCALL is not set)"
    return False, "bpf(BPF_MAP_CREATE) of an array fails: [%s] %s" % (L.errname(err), L.strerror(err))


def _tracefs() -> tuple[bool, str]:
    p = tracefs_path()
    if p:
        return True, "mounted at %s" % p
    return False, "not mounted at %s" % " or ".join(TRACEFS_PATHS)


def _bpffs() -> tuple[bool, str]:
    f = bpffs_at(BPFFS_PATH)
    return f.available, f.detail


def _probe_events(kind: str, ret: bool) -> tuple[bool, str]:
    """kprobes/uprobes: the perf PMU in sysfs or ``<tracefs>/<kind>_events``."""
    pmu = os.path.join(EVENT_SOURCES, kind)
    tr = tracefs_path()
    events = os.path.join(tr, kind + "_events") if tr else None
    config = "CONFIG_KPROBES" if kind == "kprobe" else "CONFIG_UPROBE_EVENTS"
    if os.path.isdir(pmu):
        if not ret:
            return True, "%s exists" % pmu
        fmt = os.path.join(pmu, "format", "retprobe")
        if os.path.exists(fmt):
            return True, "%s exists" % fmt
    if events and os.path.exists(events):
        return True, "%s exists" % events
    where = "%s has no %s_events" % (tr, kind) if tr else "tracefs is not mounted"
    if os.path.isdir(pmu):
        return False, "%s/format/retprobe is missing and %s" % (pmu, where)
    return False, "%s is missing and %s: %s is not set" % (pmu, where, config)


def _prog_type(t: int, label: str) -> tuple[bool, str]:
    L, lib = _lib()
    rc = lib.libbpf_probe_bpf_prog_type(t, None)
    if rc == 1:
        return True, "libbpf_probe_bpf_prog_type(%s) succeeds" % label
    if rc == 0:
        return False, "libbpf_probe_bpf_prog_type(%s) says unsupported" % label
    return False, "libbpf_probe_bpf_prog_type(%s) fails: [%s] %s" % (label, L.errname(-rc), L.strerror(-rc))


def _map_type(t: int, label: str) -> tuple[bool, str]:
    L, lib = _lib()
    rc = lib.libbpf_probe_bpf_map_type(t, None)
    if rc == 1:
        return True, "libbpf_probe_bpf_map_type(%s) succeeds" % label
    if rc == 0:
        return False, "libbpf_probe_bpf_map_type(%s) says unsupported" % label
    if rc == -E.EOPNOTSUPP:
        return False, "libbpf %s does not know map type %s (libbpf_probe_bpf_map_type: EOPNOTSUPP)" % (
            L.version(), label)
    return False, "libbpf_probe_bpf_map_type(%s) fails: [%s] %s" % (label, L.errname(-rc), L.strerror(-rc))


def _tracepoints() -> tuple[bool, str]:
    tr = tracefs_path()
    if tr is None:
        return False, "tracefs is not mounted at %s (libbpf finds tracepoint ids there)" % " or ".join(TRACEFS_PATHS)
    if not os.path.isdir(os.path.join(tr, "events")):
        return False, "%s/events is missing (CONFIG_TRACEPOINTS/CONFIG_EVENT_TRACING)" % tr
    ok, detail = _prog_type(PROG_TRACEPOINT, "BPF_PROG_TYPE_TRACEPOINT")
    return ok, "%s/events exists; %s" % (tr, detail)


def _perf_events() -> tuple[bool, str]:
    if not os.path.exists("/proc/sys/kernel/perf_event_paranoid"):
        return False, "/proc/sys/kernel/perf_event_paranoid is missing: CONFIG_PERF_EVENTS is not set"
    return _prog_type(PROG_PERF_EVENT, "BPF_PROG_TYPE_PERF_EVENT")


_TRAMPOLINE_TARGETS = ("bpf_fentry_test1", "do_nanosleep", "vfs_read", "schedule")


def _tracing(attach_type: int, label: str) -> tuple[bool, str]:
    """Load ``r0 = 0; exit`` as a BPF_PROG_TYPE_TRACING program (``label``) on a vmlinux function/event."""
    L, lib = _lib()
    btf = lib.btf__load_vmlinux_btf()
    if not btf:
        return False, "no vmlinux BTF (/sys/kernel/btf/vmlinux): CONFIG_DEBUG_INFO_BTF is not set"
    try:
        if attach_type == BPF_TRACE_RAW_TP:
            targets, kind = ("btf_trace_sys_enter", "btf_trace_sched_switch"), BTF_KIND_TYPEDEF
        else:
            targets, kind = _TRAMPOLINE_TARGETS, BTF_KIND_FUNC
        target = btf_id = None
        for target in targets:
            btf_id = lib.btf__find_by_name_kind(btf, target.encode(), kind)
            if btf_id > 0:
                break
        if not btf_id or btf_id <= 0:
            return False, "none of %s is in vmlinux BTF: cannot probe" % ", ".join(targets)
    finally:
        lib.btf__free(btf)
    insns = bytes.fromhex("b700000000000000" "9500000000000000")  # r0 = 0; exit
    opts = L.ProgLoadOpts(expected_attach_type=attach_type, attach_btf_id=btf_id)
    fd = lib.bpf_prog_load(PROG_TRACING, b"hybrid_probe", b"GPL", insns, 2, ctypes.byref(opts))
    what = "loading a trivial BPF_PROG_TYPE_TRACING program (%s on %s)" % (label, target)
    if fd >= 0:
        os.close(fd)
        return True, what + " succeeds"
    err = L.errno_of(fd)
    return False, "%s fails: [%s] %s" % (what, L.errname(err), L.strerror(err))


def _fmod_ret() -> tuple[bool, str]:
    f = check("fentry")
    return f.available, "uses the same BPF trampolines as fentry: %s" % f.detail


def _mmapable_array() -> tuple[bool, str]:
    L, lib = _lib()
    opts = L.MapCreateOpts(map_flags=BPF_F_MMAPABLE)
    fd = lib.bpf_map_create(MAP_ARRAY, b"hybrid_probe", 4, 8, 512, ctypes.byref(opts))
    if fd < 0:
        err = L.errno_of(fd)
        return False, "creating an array with BPF_F_MMAPABLE fails: [%s] %s" % (L.errname(err), L.strerror(err))
    try:
        m = mmap.mmap(fd, 4096, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        m.close()
    except OSError as e:
        return False, "an array with BPF_F_MMAPABLE is created but mmap() fails: %s" % e.strerror
    finally:
        os.close(fd)
    return True, "an array with BPF_F_MMAPABLE is created and mmap()ed"


_DETECTORS = {
    "bpf": _bpf,
    "tracefs": _tracefs,
    "bpffs": _bpffs,
    "tracepoints": _tracepoints,
    "raw_tracepoints": lambda: _prog_type(PROG_RAW_TRACEPOINT, "BPF_PROG_TYPE_RAW_TRACEPOINT"),
    "kprobes": lambda: _probe_events("kprobe", False),
    "kretprobes": lambda: _probe_events("kprobe", True),
    "uprobes": lambda: _probe_events("uprobe", False),
    "uretprobes": lambda: _probe_events("uprobe", True),
    "fentry": lambda: _tracing(BPF_TRACE_FENTRY, "fentry"),
    "fexit": lambda: _tracing(BPF_TRACE_FEXIT, "fexit"),
    "fmod_ret": _fmod_ret,
    "tp_btf": lambda: _tracing(BPF_TRACE_RAW_TP, "tp_btf"),
    "lsm": lambda: _prog_type(PROG_LSM, "BPF_PROG_TYPE_LSM"),
    "perf_events": _perf_events,
    "ringbuf": lambda: _map_type(MAP_RINGBUF, "BPF_MAP_TYPE_RINGBUF"),
    "user_ringbuf": lambda: _map_type(MAP_USER_RINGBUF, "BPF_MAP_TYPE_USER_RINGBUF"),
    "mmapable_array": _mmapable_array,
}


# --- map and program types ------------------------------------------------------------------

from hybrid.user.mapspec import MAP_TYPE_NAMES, map_type_name  # noqa: E402,F401 - one table for both sides


def map_type(t: int) -> Feature:
    """Whether the kernel has map type ``t`` (``libbpf_probe_bpf_map_type``, cached)."""
    label = "BPF_MAP_TYPE_%s (%d)" % (MAP_TYPE_NAMES[t].upper(), t) if t in MAP_TYPE_NAMES else str(t)
    key = "map_type:%d" % t
    with _lock:
        f = _cache.get(key)
        if f is None:
            if not check("bpf").available:
                f = Feature(key, False, "unknown: %s" % check("bpf").detail)
            else:
                ok, detail = _map_type(t, label)
                f = Feature(key, ok, detail)
            _cache[key] = f
        return f


def prog_type(t: int) -> Feature:
    """Whether the kernel has program type ``t`` (``libbpf_probe_bpf_prog_type``, cached)."""
    key = "prog_type:%d" % t
    with _lock:
        f = _cache.get(key)
        if f is None:
            if not check("bpf").available:
                f = Feature(key, False, "unknown: %s" % check("bpf").detail)
            else:
                ok, detail = _prog_type(t, "type %d" % t)
                f = Feature(key, ok, detail)
            _cache[key] = f
        return f


def require_map_type(t: int, what: str) -> None:
    """Nothing when the kernel has map type ``t``; else FeatureError naming ``what`` and the type."""
    f = map_type(t)
    if f.available:
        return
    bpf = check("bpf")
    if not bpf.available:
        raise KernelError("%s: %s" % (what, bpf.detail), E.EPERM)
    raise FeatureError("%s: this kernel has no map type %s (%s); use another map type"
                       % (what, "%s (%d)" % (MAP_TYPE_NAMES[t], t) if t in MAP_TYPE_NAMES else t, f.detail),
                       E.EOPNOTSUPP)
