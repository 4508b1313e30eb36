"""Where each program of an object runs, and how each map is shared: pure functions over an ObjectSpec.

Placement (``hybrid.load(path, kernel=...)``):

* ``kernel=None`` (the default): programs of a kind that only the kernel can
  run (tracepoints other than ``syscalls``, raw tracepoints other than
  ``sys_enter``/``sys_exit``, ``perf_event``, kprobes, fentry/fexit,
  ``tp_btf``, ``lsm``, ``iter``, ``uprobe.multi``) go to the kernel; uprobes,
  uretprobes, USDT and syscall probes stay in the VM, where
  ``attach(pid)`` runs them inside the traced process.  Kernel kinds whose
  feature this kernel lacks (kprobes, fentry here) stay in the VM only, and
  attaching them raises :class:`~hybrid.errors.FeatureError`.  Program kinds
  with other attach points (tc, xdp, cgroup, ...) stay in the VM.
* ``kernel=False``: everything in the VM (no kernel side at all).
* ``kernel=True``: every program the kernel can attach goes to the kernel,
  uprobes included (kernel uprobes: the baseline of every comparison).
* ``kernel=["name", ...]``: the auto placement plus these programs in the
  kernel (e.g. a ``raw_tp/sys_enter`` program counting every process's
  syscalls, or one uprobe as a kernel uprobe for comparison).

Map roles, from which side's programs use each map (an ``lddw`` of it):

``user``      userspace programs only: a map of the shared region, as always;
``kernel``    kernel programs only: a kernel map, reachable from Python;
``mmap``      an ARRAY used by both: the kernel map, created ``BPF_F_MMAPABLE``,
              is mapped into the region (memory speed on both sides);
``syscall``   any other bridgeable type used by both: userspace programs reach
              the kernel map through ``bpf()`` (correct, about a µs per op);
``mirror``    a hash map named in ``mirror=``: a userspace map synced to the
              kernel map in batches (:mod:`hybrid.bridge.mirror`);
``rings``     a RINGBUF or PERF_EVENT_ARRAY used by both: one ring per side,
              consumed together (``obj.ring_buffer(name, cb)``);
``to_kernel`` a USER_RINGBUF drained by kernel programs and written by
              userspace programs: a userspace ring forwarded into it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping

from hybrid.errors import HybridError

# section kinds (hybrid.user.elf.SECTION_DEFS) that attach only in the kernel, and the feature each needs
KERNEL_KINDS: dict[str, str | None] = {
    "tracepoint": "tracepoints", "raw_tracepoint": "raw_tracepoints", "raw_tracepoint.w": "raw_tracepoints",
    "perf_event": "perf_events", "kprobe": "kprobes", "kretprobe": "kretprobes", "kprobe.multi": "kprobes",
    "kretprobe.multi": "kretprobes", "ksyscall": "kprobes", "kretsyscall": "kretprobes", "tp_btf": "tp_btf",
    "fentry": "fentry", "fexit": "fexit", "fmod_ret": "fmod_ret", "lsm": "lsm", "iter": "fentry",
    "uprobe.multi": "uprobes", "uretprobe.multi": "uprobes",
}
# kinds both sides can run: the VM by default
SHARED_KINDS: dict[str, str] = {"uprobe": "uprobes", "uretprobe": "uprobes", "usdt": "uprobes",
                                "tracepoint": "tracepoints", "raw_tracepoint": "raw_tracepoints"}

BPF_MAP_TYPE_HASH, BPF_MAP_TYPE_ARRAY, BPF_MAP_TYPE_PROG_ARRAY, BPF_MAP_TYPE_PERF_EVENT_ARRAY = 1, 2, 3, 4
BPF_MAP_TYPE_RINGBUF, BPF_MAP_TYPE_USER_RINGBUF = 27, 31
SYSCALL_BRIDGEABLE = {1, 2, 5, 6, 9, 10, 11, 22, 23, 30}  # hash, array, percpu, lru, lpm, queue, stack, bloom
MIRRORABLE = {1, 9, 11}  # hash, lru_hash, lpm_trie: keyed maps a sync can copy whole
RING_TYPES = {BPF_MAP_TYPE_RINGBUF, BPF_MAP_TYPE_PERF_EVENT_ARRAY}
LDDW_OPCODE = 0x18


def userspace_capable(pspec) -> bool:
    """Can ``pspec`` run inside a traced process (uprobe, uretprobe, usdt, syscall probes)?"""
    from hybrid.user.elf import RawTracepointTarget, TracepointTarget, UprobeTarget, UsdtTarget

    t = pspec.attach
    if isinstance(t, (UprobeTarget, UsdtTarget)):
        return True
    if isinstance(t, TracepointTarget):
        return t.category == "syscalls" and t.name.startswith(("sys_enter_", "sys_exit_"))
    if isinstance(t, RawTracepointTarget):
        return t.name in ("sys_enter", "sys_exit")
    return False


def kernel_feature(pspec) -> str | None:
    """The kernel feature ``pspec`` needs to attach in the kernel; None if the kernel cannot attach it."""
    if pspec.kind in KERNEL_KINDS:
        return KERNEL_KINDS[pspec.kind]
    return SHARED_KINDS.get(pspec.kind)


@dataclass(frozen=True)
class Placement:
    """Program names by side; ``unavailable`` maps a program to the FeatureError text of its missing feature."""

    kernel: frozenset[str]
    user: frozenset[str]
    unavailable: Mapping[str, str] = field(default_factory=dict)


def place(spec, kernel: bool | Iterable[str] | None, has_feature) -> Placement:
    """Decide each program's side.  ``has_feature(name, pspec) -> (bool, message)`` asks the running
    kernel; the message names the program, the missing feature and the alternative.

    Raises :class:`~hybrid.errors.FeatureError` for a program explicitly put in
    the kernel whose feature is missing, and :class:`HybridError` for an
    unknown program name or one the kernel cannot attach.
    """
    from hybrid.errors import FeatureError

    programs = [p for p in spec.programs if p.autoload]
    names = {p.name for p in programs}
    if kernel is False:
        return Placement(frozenset(), frozenset(names))
    explicit: set[str] = set()
    if kernel is not None and kernel is not True:
        explicit = set([kernel] if isinstance(kernel, str) else kernel)
        unknown = sorted(explicit - names)
        if unknown:
            raise HybridError("object %r has no program %s to load into the kernel (programs: %s)"
                              % (spec.name, ", ".join(map(repr, unknown)), ", ".join(sorted(names)) or "none"))
    to_kernel, to_user, unavailable = set(), set(), {}
    for p in programs:
        feature = kernel_feature(p)
        wanted = p.name in explicit or kernel is True
        if wanted and feature is None:
            if p.name in explicit:
                raise HybridError("program %r (section %r) cannot be attached in the kernel by hybrid: it is a %s "
                                  "program" % (p.name, p.section, p.kind))
            to_user.add(p.name)
            continue
        if not wanted and (p.kind not in KERNEL_KINDS or userspace_capable(p)):
            to_user.add(p.name)
            continue
        ok, message = has_feature(feature, p)
        if ok:
            to_kernel.add(p.name)
            continue
        if wanted:
            raise FeatureError(message)
        unavailable[p.name] = message  # auto placement: stays in the VM, attaching it says why
        to_user.add(p.name)
    return Placement(frozenset(to_kernel), frozenset(to_user), unavailable)


def map_users(spec) -> dict[str, set[str]]:
    """Map name -> names of the programs whose code references it (``lddw`` of the map or its value)."""
    from hybrid.user import isa

    users: dict[str, set[str]] = {m.name: set() for m in spec.maps}
    for p in spec.programs:
        for insn in p.insns:
            if insn.opcode == LDDW_OPCODE and insn.src in (isa.PSEUDO_MAP_IDX, isa.PSEUDO_MAP_IDX_VALUE) \
                    and 0 <= insn.imm < len(spec.maps):
                users[spec.maps[insn.imm].name].add(p.name)
    return users


def map_roles(spec, placement: Placement, mirror: Mapping[str, object] | None = None,
              shared: Iterable[str] = ()) -> dict[str, str]:
    """Map name -> role (see the module comment).  ``shared``: maps given an existing kernel map."""
    mirror = dict(mirror or {})
    shared = set(shared)
    unknown = sorted((set(mirror) | shared) - {m.name for m in spec.maps})
    if unknown:
        raise HybridError("object %r has no map %s (maps: %s)" % (
            spec.name, ", ".join(map(repr, unknown)), ", ".join(m.name for m in spec.maps) or "none"))
    users = map_users(spec)
    roles = {}
    for m in spec.maps:
        progs = users[m.name]
        in_kernel = bool(progs & placement.kernel) or m.name in shared
        in_user = bool(progs & placement.user) or not progs
        if m.name in mirror:
            if m.type not in MIRRORABLE:
                raise HybridError("map %r (%s): only hash, lru_hash and lpm_trie maps can be mirrored"
                                  % (m.name, m.type_name))
            roles[m.name] = "mirror"
        elif not in_kernel:
            roles[m.name] = "user"
        elif m.type == BPF_MAP_TYPE_USER_RINGBUF:
            roles[m.name] = "to_kernel" if in_user else "kernel"
        elif not in_user:
            roles[m.name] = "kernel"
        elif m.type in RING_TYPES:
            roles[m.name] = "rings"
        elif m.type == BPF_MAP_TYPE_ARRAY:
            roles[m.name] = "mmap"
        elif m.type in SYSCALL_BRIDGEABLE:
            roles[m.name] = "syscall"
        else:
            both = sorted(progs)
            raise HybridError("map %r (%s) is used by kernel and userspace programs (%s), and a %s map cannot be "
                              "shared between the two sides%s" % (
                                  m.name, m.type_name, ", ".join(both), m.type_name,
                                  ": a tail call cannot cross from userspace to the kernel"
                                  if m.type == BPF_MAP_TYPE_PROG_ARRAY else ""))
    return roles
