"""Attaching loaded kernel programs: sections, links and perf events.

:func:`attach` picks the attach point from a program's ELF section the way
libbpf's auto-attach does (``tracepoint/CAT/NAME``, ``raw_tp/NAME``,
``uprobe/PATH:FUNC[+OFF]``, ``usdt/PATH:PROVIDER:NAME``, ``kprobe/FUNC``,
``fentry/FUNC``, ``perf_event``...); keyword arguments give or override the
target (a bare ``SEC("uprobe")`` needs ``binary`` and ``func``/``offset``).
Uprobes go through ``bpf_program__attach_uprobe_opts`` with
``ref_ctr_offset`` 0 unless told otherwise, so they coexist with other
uprobes (bcc's) on the same spot.  A kernel without the needed feature
raises :class:`~hybrid.errors.FeatureError` before anything is created.

A :class:`Link` holds the libbpf ``bpf_link``\\ s of one attachment (one per
CPU for ``perf_event``); :meth:`Link.close` detaches.
"""

from __future__ import annotations

import ctypes
import errno as E
import os
import platform
import struct
from dataclasses import dataclass
from typing import Callable

from hybrid.closable import Closable
from hybrid.errors import KernelError
from hybrid.kernel import features
from hybrid.kernel import libbpf as L

# section prefix -> kind
KINDS = {
    "tracepoint": "tracepoint", "tp": "tracepoint",
    "raw_tracepoint": "raw_tp", "raw_tp": "raw_tp", "raw_tracepoint.w": "raw_tp", "raw_tp.w": "raw_tp",
    "uprobe": "uprobe", "uprobe.s": "uprobe", "uretprobe": "uretprobe", "uretprobe.s": "uretprobe",
    "usdt": "usdt",
    "kprobe": "kprobe", "kretprobe": "kretprobe", "kprobe.multi": "kprobe", "kretprobe.multi": "kretprobe",
    "ksyscall": "ksyscall", "kretsyscall": "kretsyscall",
    "fentry": "fentry", "fentry.s": "fentry", "fexit": "fexit", "fexit.s": "fexit",
    "fmod_ret": "fmod_ret", "fmod_ret.s": "fmod_ret", "tp_btf": "tp_btf", "lsm": "lsm", "lsm.s": "lsm",
    "iter": "iter", "iter.s": "iter", "freplace": "freplace",
    "perf_event": "perf_event",
}
# kind -> the kernel feature it needs
FEATURES = {
    "tracepoint": "tracepoints", "raw_tp": "raw_tracepoints", "uprobe": "uprobes", "uretprobe": "uretprobes",
    "usdt": "uprobes", "kprobe": "kprobes", "kretprobe": "kretprobes", "ksyscall": "kprobes",
    "kretsyscall": "kretprobes", "fentry": "fentry", "fexit": "fexit", "fmod_ret": "fmod_ret", "tp_btf": "tp_btf",
    "lsm": "lsm", "perf_event": "perf_events",
}
# kinds libbpf attaches itself (bpf_program__attach) once the feature is there
_LIBBPF_AUTO = {"ksyscall", "kretsyscall", "fentry", "fexit", "fmod_ret", "tp_btf", "lsm", "iter", "freplace"}

PERF_TYPE_HARDWARE, PERF_TYPE_SOFTWARE = 0, 1
PERF_COUNT_SW_CPU_CLOCK = 0
_PERF_ATTR_SIZE = 112  # PERF_ATTR_SIZE_VER5
_FLAG_FREQ = 1 << 10
_NR_PERF_EVENT_OPEN = {"x86_64": 298, "aarch64": 241, "riscv64": 241, "s390x": 331, "ppc64le": 319}


@dataclass(frozen=True)
class Section:
    """A program's ELF section split into its kind and target: ``uprobe/x:f`` -> (uprobe, x:f)."""

    text: str
    prefix: str
    kind: str | None  # None: not something this module attaches
    target: str

    @classmethod
    def parse(cls, text: str) -> "Section":
        prefix, _, target = text.partition("/")
        return cls(text, prefix, KINDS.get(prefix), target)

    @property
    def feature(self) -> str | None:
        return FEATURES.get(self.kind or "")

    @property
    def auto_attachable(self) -> bool:
        """Whether the section names its attach point (libbpf's auto-attach)."""
        k, t = self.kind, self.target
        if k == "tracepoint":
            return "/" in t
        if k in ("uprobe", "uretprobe"):
            return ":" in t
        if k == "usdt":
            return t.count(":") >= 2
        if k in ("raw_tp", "kprobe", "kretprobe") or k in _LIBBPF_AUTO:
            return bool(t)
        return False


class Link(Closable):
    """One attachment: libbpf links (one per CPU for perf events); :meth:`close` detaches (idempotent)."""

    def __init__(self, program: str, section: str, target: str, links: list[int],
                 on_close: Callable[["Link"], None] | None = None):
        self.program = program
        self.section = section
        self.target = target
        self._links = list(links)
        self._on_close = on_close

    @property
    def fd(self) -> int:
        """The fd of the (first) link."""
        if not self._links:
            raise KernelError("program %r (%s): link to %s is closed" % (self.program, self.section, self.target),
                              E.EBADF)
        return L.lib().bpf_link__fd(self._links[0])

    @property
    def closed(self) -> bool:
        return not self._links

    def close(self) -> None:
        links, self._links = self._links, []
        for link in links:
            L.lib().bpf_link__destroy(link)
        cb, self._on_close = self._on_close, None
        if cb is not None and links:
            cb(self)

    def __repr__(self) -> str:
        return "<Link %s (%s) -> %s%s>" % (self.program, self.section, self.target, ", closed" if self.closed else "")


# --- perf events -------------------------------------------------------------------------------

_libc = None


def online_cpus() -> list[int]:
    try:
        with open("/sys/devices/system/cpu/online", encoding="ascii") as f:
            text = f.read().strip()
    except OSError:
        return list(range(os.cpu_count() or 1))
    cpus: list[int] = []
    for part in text.split(","):
        if part:
            lo, _, hi = part.partition("-")
            cpus.extend(range(int(lo), int(hi or lo) + 1))
    return cpus


def perf_event_open(type: int = PERF_TYPE_SOFTWARE, config: int = PERF_COUNT_SW_CPU_CLOCK, *,
                    frequency: int | None = None, period: int | None = None, pid: int = -1, cpu: int = -1) -> int:
    """``perf_event_open(2)`` of a sampling event (``frequency`` Hz or every ``period`` events); its fd."""
    global _libc
    nr = _NR_PERF_EVENT_OPEN.get(platform.machine())
    if nr is None:
        raise KernelError("perf_event_open: unknown syscall number on %s" % platform.machine(), E.ENOSYS)
    if _libc is None:
        c = ctypes.CDLL(None, use_errno=True)
        c.syscall.restype = ctypes.c_long
        _libc = c
    if frequency is None and period is None:
        frequency = 99
    attr = ctypes.create_string_buffer(_PERF_ATTR_SIZE)
    flags = _FLAG_FREQ if frequency is not None else 0
    struct.pack_into("<IIQQQQQ", attr, 0, type, _PERF_ATTR_SIZE, config,
                     frequency if frequency is not None else period, 0, 0, flags)
    fd = _libc.syscall(ctypes.c_long(nr), attr, ctypes.c_int(pid), ctypes.c_int(cpu), ctypes.c_int(-1),
                       ctypes.c_ulong(8))  # PERF_FLAG_FD_CLOEXEC
    if fd < 0:
        err = ctypes.get_errno()
        what = "perf_event_open(type %d, config %d, pid %d, cpu %d)" % (type, config, pid, cpu)
        detail = None
        if err in (E.EACCES, E.EPERM):
            detail = "%s (or a lower /proc/sys/kernel/perf_event_paranoid)" % features.NEEDS_ROOT
        elif err in (E.ENOENT, E.ENODEV, E.EOPNOTSUPP):
            detail = "this kernel or CPU has no such perf event"
        raise L.error(what, err, detail)
    return fd


# --- attaching -------------------------------------------------------------------------------------


def attach(prog: int, name: str, section: str, *, pid: int | None = None, binary: str | None = None,
           func: str | None = None, offset: int | None = None, retprobe: bool | None = None,
           ref_ctr_offset: int = 0, cookie: int = 0, tracepoint: str | None = None,
           provider: str | None = None, probe: str | None = None, frequency: int | None = None,
           period: int | None = None, perf_type: int = PERF_TYPE_SOFTWARE,
           perf_config: int = PERF_COUNT_SW_CPU_CLOCK, cpus: list[int] | None = None,
           on_close: Callable[[Link], None] | None = None) -> Link:
    """Attach the loaded libbpf program ``prog`` (named ``name``, from ``section``); see the module doc."""
    sec = Section.parse(section)
    what = "program %r (%s)" % (name, section)
    if sec.feature is not None:
        target = func or sec.target or None
        features.require(sec.feature, what, target, syscall=sec.kind in ("ksyscall", "kretsyscall"))
    kind = sec.kind
    lib = L.lib()
    kw = dict(name=name, section=section, on_close=on_close)

    if kind in ("uprobe", "uretprobe"):
        path, fn, off = _uprobe_target(sec, binary, func, offset, what)
        ret = kind == "uretprobe" if retprobe is None else retprobe
        opts = L.UprobeOpts(ref_ctr_offset=ref_ctr_offset, bpf_cookie=cookie, retprobe=ret,
                            func_name=fn.encode() if fn else None)
        target = "%s:%s+%#x" % (path, fn or "", off) + (" (pid %d)" % pid if pid is not None else "")
        return _one(lambda: lib.bpf_program__attach_uprobe_opts(prog, -1 if pid is None else pid,
                                                                 os.fsencode(path), off, ctypes.byref(opts)),
                    what, ("uretprobe " if ret else "uprobe ") + target, **kw)
    if kind == "usdt":
        path, prov, nm = _usdt_target(sec, binary, provider, probe, what)
        opts = L.UsdtOpts(usdt_cookie=cookie)
        target = "%s:%s:%s" % (path, prov, nm) + (" (pid %d)" % pid if pid is not None else "")
        return _one(lambda: lib.bpf_program__attach_usdt(prog, -1 if pid is None else pid, os.fsencode(path),
                                                          prov.encode(), nm.encode(), ctypes.byref(opts)),
                    what, "usdt " + target, **kw)
    if kind == "tracepoint":
        tp = tracepoint or sec.target
        cat, _, ev = tp.replace(":", "/").partition("/")
        if not cat or not ev:
            raise KernelError("%s: attach: no tracepoint: name one as SEC(\"tracepoint/<category>/<name>\") or "
                              "attach(tracepoint=\"<category>:<name>\")" % what, E.EINVAL)
        return _one(lambda: lib.bpf_program__attach_tracepoint(prog, cat.encode(), ev.encode()),
                    what, "tracepoint %s:%s" % (cat, ev), **kw)
    if kind == "raw_tp":
        tp = tracepoint or sec.target
        if not tp:
            raise KernelError("%s: attach: no raw tracepoint: name one as SEC(\"raw_tp/<name>\") or "
                              "attach(tracepoint=\"<name>\")" % what, E.EINVAL)
        return _one(lambda: lib.bpf_program__attach_raw_tracepoint(prog, tp.encode()), what,
                    "raw tracepoint %s" % tp, **kw)
    if kind in ("kprobe", "kretprobe") and not sec.prefix.endswith(".multi"):
        fn, plus, off = (func or sec.target).partition("+")
        off = offset if offset is not None else int(off, 0) if plus else 0
        if not fn:
            raise KernelError("%s: attach: no kernel function: name it as SEC(\"kprobe/<function>\") or "
                              "attach(func=...)" % what, E.EINVAL)
        opts = L.KprobeOpts(bpf_cookie=cookie, offset=off,
                            retprobe=kind == "kretprobe" if retprobe is None else retprobe)
        return _one(lambda: lib.bpf_program__attach_kprobe_opts(prog, fn.encode(), ctypes.byref(opts)),
                    what, "kprobe %s+%#x" % (fn, off), **kw)
    if kind == "perf_event":
        return _perf(prog, what, name, section, pid=pid, frequency=frequency, period=period, perf_type=perf_type,
                     perf_config=perf_config, cpus=cpus, cookie=cookie, on_close=on_close)
    if sec.auto_attachable or kind in ("kprobe", "kretprobe"):
        return _one(lambda: lib.bpf_program__attach(prog), what, sec.target or section, **kw)
    raise KernelError("%s: attach: hybrid does not know how to attach a %r section; attach it yourself with its "
                      "fd" % (what, sec.prefix), E.EOPNOTSUPP)


def _one(make, what: str, target: str, *, name: str, section: str, on_close) -> Link:
    with L.capture() as cap:
        link = make()
    if not link:
        err = ctypes.get_errno() or E.EINVAL
        raise L.error("%s: attach to %s" % (what, target), err, _attach_detail(err, cap))
    return Link(name, section, target, [link], on_close)


def _attach_detail(err: int, cap: "L.capture") -> str:
    why = L.strerror(err)
    if err in (E.EPERM, E.EACCES):
        why += ": " + features.NEEDS_ROOT
    said = cap.summary(2)
    return "%s (libbpf: %s)" % (why, said) if said else why


def _uprobe_target(sec: Section, binary, func, offset, what: str) -> tuple[str, str | None, int]:
    fn, off = func, offset
    if binary is None or (func is None and offset is None):
        path, _, spec = sec.target.rpartition(":")
        if binary is None:
            binary = path or None
        if func is None and offset is None and spec:
            name, plus, o = spec.partition("+")
            try:
                if plus:
                    off = int(o, 0)
                    fn = name or None
                elif name.startswith("0x"):
                    off = int(name, 16)
                else:
                    fn = name
            except ValueError:
                raise KernelError("%s: attach: bad offset in section target %r" % (what, sec.target),
                                  E.EINVAL) from None
    if binary is None or (fn is None and off is None):
        raise KernelError("%s: attach: no uprobe target: name it as SEC(\"uprobe/<binary>:<function>[+<offset>]\") "
                          "or attach(binary=..., func=... or offset=...)" % what, E.EINVAL)
    return _binary_path(binary), fn, off or 0


def _usdt_target(sec: Section, binary, provider, probe, what: str) -> tuple[str, str, str]:
    parts = sec.target.rsplit(":", 2) if sec.target.count(":") >= 2 else [None, None, None]
    binary = binary or parts[0]
    provider = provider or parts[1]
    probe = probe or parts[2]
    if not (binary and provider and probe):
        raise KernelError("%s: attach: no USDT target: name it as SEC(\"usdt/<binary>:<provider>:<name>\") or "
                          "attach(binary=..., provider=..., probe=...)" % what, E.EINVAL)
    return _binary_path(binary), provider, probe


def _binary_path(binary) -> str:
    binary = os.fspath(binary)
    if "/" in binary or os.path.exists(binary):
        return os.path.abspath(binary)
    return binary  # a library name: libbpf searches the usual directories


def _perf(prog: int, what: str, name: str, section: str, *, pid, frequency, period, perf_type, perf_config, cpus,
          cookie, on_close) -> Link:
    lib = L.lib()
    targets = [(pid, -1)] if pid is not None else [(-1, c) for c in (cpus if cpus is not None else online_cpus())]
    links: list[int] = []
    desc = "perf event type %d config %d %s" % (perf_type, perf_config,
                                                 "%d Hz" % frequency if frequency else
                                                 "period %d" % period if period else "99 Hz")
    try:
        for p, cpu in targets:
            try:
                pfd = perf_event_open(perf_type, perf_config, frequency=frequency, period=period, pid=p, cpu=cpu)
            except KernelError as e:
                raise KernelError("%s: attach: %s" % (what, e), e.errno) from None
            opts = L.PerfEventOpts(bpf_cookie=cookie)
            with L.capture() as cap:
                link = lib.bpf_program__attach_perf_event_opts(prog, pfd, ctypes.byref(opts))
            if not link:
                err = ctypes.get_errno() or E.EINVAL
                os.close(pfd)  # libbpf owns the perf event fd only once the link exists
                raise L.error("%s: attach to %s on %s" % (what, desc, "pid %d" % p if p != -1 else "cpu %d" % cpu),
                              err, _attach_detail(err, cap))
            links.append(link)
    except BaseException:
        for link in links:
            lib.bpf_link__destroy(link)
        raise
    where = "pid %d" % pid if pid is not None else "cpus %s" % ",".join(str(c) for _, c in targets)
    return Link(name, section, "%s on %s" % (desc, where), links, on_close)
