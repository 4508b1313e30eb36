"""What hybrid has loaded and attached, for every process to see (``hybrid prog list`` and co.).

State lives in a directory, ``/run/hybrid`` unless ``HYBRID_RUN_DIR`` names
another one (``HYBRID_RUN_DIR=off`` turns the registry off):

- ``obj.<pid>.<n>.json``: one record per loaded object, written atomically
  (a temporary file renamed over it) by the process that loaded it (its
  *controller*) when it loads, attaches and detaches, and removed when the
  object closes.  It names the object, the controller (pid and start time,
  so a reused pid is not mistaken for it), the shared region and where the
  programs' run counts are in it, the programs, the maps and the links,
  each with a small id unique across processes.
- ``ids``: the last id given out per kind (``prog``, ``map``, ``link``),
  taken under ``flock`` on ``.lock``.
- ``detached.<pid>.<attach id>``: a userspace link removed from outside its
  controller (``hybrid detach --link`` or ``detach -p``); listings skip it,
  the controller does not detach it again, and the marker goes when the
  controller's record no longer lists the link.
- ``stats``: ``1`` when run-time statistics are on for objects loaded
  from now on (``hybrid stats on``).

A record whose controller is gone (it exited without closing, or was
killed) is pruned by the next listing: the record, its markers and the
controller's region file go; probes it left in running processes keep
running until ``hybrid detach -p PID``, and the listing says so.

Nothing here may make a load, attach or detach fail: a registry that cannot
be written (not root, read-only file system) is skipped silently (logged at
DEBUG level on ``hybrid.registry``).
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

log = logging.getLogger("hybrid.registry")

DEFAULT_DIR = "/run/hybrid"
VERSION = 1

_seq = itertools.count(1)
_lock = threading.RLock()


def run_dir() -> Path | None:
    """The state directory, or None when the registry is off."""
    d = os.environ.get("HYBRID_RUN_DIR", DEFAULT_DIR)
    if not d or d.lower() in ("off", "none", "0"):
        return None
    return Path(d)


def _ensure_dir() -> Path | None:
    d = run_dir()
    if d is None:
        return None
    try:
        d.mkdir(mode=0o755, parents=True, exist_ok=True)
    except OSError as e:
        log.debug("registry %s: %s", d, e)
        return None
    return d if os.access(d, os.W_OK) else None


@contextlib.contextmanager
def _locked(d: Path) -> Iterator[None]:
    with _lock:
        fd = os.open(d / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(".%s.%d.tmp" % (path.name, os.getpid()))
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _allocate(d: Path, kind: str, n: int) -> list[int]:
    """``n`` new ids of ``kind`` (call with the lock held)."""
    path = d / "ids"
    try:
        last = json.loads(path.read_text())
    except (OSError, ValueError):
        last = {}
    first = int(last.get(kind, 0)) + 1
    last[kind] = first + n - 1
    _write_atomic(path, json.dumps(last))
    return list(range(first, first + n))


# --- processes ---------------------------------------------------------------------------


def start_time(pid: int) -> int | None:
    """The start time of process ``pid`` (clock ticks since boot), None if it is gone or a zombie."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def alive(pid: int | None, started: int | None = None) -> bool:
    if not pid:
        return False
    st = start_time(pid)
    return st is not None and (started is None or st == started)


# --- stats default ------------------------------------------------------------------------


def stats_default() -> bool:
    """Whether objects loaded now measure run time (``hybrid stats on``, or ``HYBRID_STATS=1``)."""
    env = os.environ.get("HYBRID_STATS")
    if env is not None:
        return env not in ("", "0", "off")
    d = run_dir()
    try:
        return d is not None and (d / "stats").read_text().strip() == "1"
    except OSError:
        return False


def set_stats_default(on: bool) -> None:
    d = _ensure_dir()
    if d is None:
        raise OSError("cannot write the registry directory %s" % (run_dir() or "(off)"))
    _write_atomic(d / "stats", "1\n" if on else "0\n")


# --- links detached from outside ------------------------------------------------------------


def _marker(d: Path, pid: int, aid: int) -> Path:
    return d / ("detached.%d.%d" % (pid, aid))


def mark_detached(pid: int, aid: int) -> None:
    d = _ensure_dir()
    if d is not None:
        _marker(d, pid, aid).write_text("")


def unmark_detached(pid: int, aid: int) -> None:
    d = run_dir()
    if d is not None:
        with contextlib.suppress(OSError):
            _marker(d, pid, aid).unlink()


def detached(pid: int, aid: int) -> bool:
    """True when userspace link ``aid`` in process ``pid`` was removed from outside its controller."""
    d = run_dir()
    return d is not None and _marker(d, pid, aid).exists()


# --- records ---------------------------------------------------------------------------------


@dataclass
class _State:
    """What one object's records need to remember between writes (kept on the object)."""

    name: str
    prog_ids: dict = field(default_factory=dict)  # program name -> id
    map_ids: dict = field(default_factory=dict)  # map name -> id
    link_ids: dict = field(default_factory=dict)  # link key -> id
    kernel_link_ids: dict = field(default_factory=dict)  # id(kernel Link) -> kernel link id


def _kernel_link_id(link) -> int:
    """The kernel's id of a libbpf link (0 if unknown)."""
    import ctypes

    from hybrid.kernel import libbpf as L

    try:
        fd = link.fd
        buf = ctypes.create_string_buffer(64)
        size = L.U32(64)
        if L.lib().bpf_obj_get_info_by_fd(fd, buf, ctypes.byref(size)):
            return 0
        return int.from_bytes(buf.raw[4:8], "little")
    except Exception:  # noqa: BLE001 - a closed link, no libbpf
        return 0


def _agent_library(pid: int | None) -> str | None:
    """The library whose agent holds the links in ``pid``: ``hybrid._native`` in this process (library
    mode), the standalone agent elsewhere."""
    from hybrid.native import agent_path, module_path

    try:
        return os.path.realpath(module_path() if pid == os.getpid() else agent_path())
    except Exception:  # noqa: BLE001 - not built
        return None


def _record(obj, st: _State, d: Path) -> dict:
    from hybrid.user.attach.agent import userspace_kind
    from hybrid.user.mapspec import map_type_name

    side = getattr(obj, "kernel_side", None)
    region = getattr(obj, "region", None)
    kobj = side.kernel if side is not None else None
    kprogs = dict(getattr(kobj, "programs", {}) or {}) if kobj is not None else {}
    # programs: the VM's, then the kernel's
    progs = []
    names = list(obj.programs) + [n for n in sorted(kprogs) if n not in obj.programs]
    new = [n for n in names if n not in st.prog_ids]
    if new:
        st.prog_ids.update(zip(new, _allocate(d, "prog", len(new))))
    for name in names:
        if name in obj.programs:
            lp = obj.programs[name]
            progs.append({"id": st.prog_ids[name], "name": name, "section": lp.section,
                          "kind": userspace_kind(lp) or str(lp.kind or "").split("/")[0] or "unknown",
                          "side": "user", "slot": getattr(lp, "stats_index", None),
                          "insns": len(lp.program.insns), "vm_id": lp.id})
        else:
            kp = kprogs[name]
            progs.append({"id": st.prog_ids[name], "name": name, "section": kp.section,
                          "kind": kp.section.split("/")[0], "side": "kernel", "kernel_id": kp.id})
    # maps: every map of the object, where its truth is
    maps = []
    specs = list(obj.spec.maps)
    new = [m.name for m in specs if m.name not in st.map_ids]
    if new:
        st.map_ids.update(zip(new, _allocate(d, "map", len(new))))
    for i, m in enumerate(specs):
        role = side.roles.get(m.name, "user") if side is not None else "user"
        placeholder = side is not None and m.name in side.placeholders
        entry = {"id": st.map_ids[m.name], "name": m.name, "type": map_type_name(m.type), "type_id": int(m.type),
                 "key_size": m.key_size, "value_size": m.value_size, "max_entries": m.max_entries,
                 "flags": m.flags, "index": i, "role": role, "bridge": m.bridge or "",
                 "kernel_id": int(m.kernel_id or 0)}
        if side is not None and (role == "mirror" or placeholder):
            try:  # the kernel map is the truth: describe it
                km = side.kernel_map(m)
                entry.update(type=map_type_name(km.type), type_id=int(km.type), key_size=km.key_size,
                             value_size=km.value_size, max_entries=km.max_entries, flags=km.flags,
                             kernel_id=km.id, index=None if placeholder else i)
            except Exception:  # noqa: BLE001
                pass
        maps.append(entry)
    # links: userspace probes per process, then kernel links
    links, keys = [], set()
    kernel_pid = {}
    for att in list(getattr(obj, "_attachments", ())):
        pid = getattr(att, "pid", None)
        for kl in getattr(att, "kernel_links", ()) or ():
            kernel_pid[id(kl)] = pid
        if not getattr(att, "attached", False):
            continue
        agent = _agent_library(pid)
        for pl in getattr(att, "placements", ()):
            key = ("user", pid, pl.id)
            keys.add(key)
            links.append({"key": key, "side": "user", "program": pl.program, "kind": pl.kind, "pid": pid,
                          "where": pl.where, "attach_id": pl.id, "engine": getattr(att, "engine", None),
                          "agent": agent, "detached": detached(pid, pl.id)})
    for kl in list(getattr(side, "links", ()) or ()):
        if getattr(kl, "closed", False):
            continue
        key = ("kernel", id(kl))
        keys.add(key)
        if id(kl) not in st.kernel_link_ids:
            st.kernel_link_ids[id(kl)] = _kernel_link_id(kl)
        kind = kl.section.split("/")[0]
        per_process = kind.startswith(("uprobe", "uretprobe", "usdt"))  # the others see every process
        links.append({"key": key, "side": "kernel", "program": kl.program, "kind": kind,
                      "pid": kernel_pid.get(id(kl)) if per_process else None, "where": kl.target,
                      "kernel_id": st.kernel_link_ids[id(kl)]})
    for k in [k for k in st.link_ids if k not in keys]:  # detached: forget it (and its marker, if any)
        del st.link_ids[k]
        if k[0] == "user":
            unmark_detached(k[1], k[2])
    new = [lk["key"] for lk in links if lk["key"] not in st.link_ids]
    if new:
        st.link_ids.update(zip(new, _allocate(d, "link", len(new))))
    by_name = {p["name"]: p["id"] for p in progs}
    for lk in links:
        lk["id"] = st.link_ids[lk["key"]]
        lk["prog_id"] = by_name.get(lk["program"])
        del lk["key"]
    pid = os.getpid()
    # the controller's scratch directories (AOT libraries, spec files): removed if it dies
    scratch = [obj.__dict__.get("_aot_dir")] + [getattr(a, "_workdir", None) for a in getattr(obj, "_attachments", ())]
    return {
        "version": VERSION,
        "object": obj.name,
        "path": getattr(obj, "path", None),
        "controller": {"pid": pid, "start_time": start_time(pid)},
        "region": None if region is None else {
            "path": region.path, "size": region.size, "keep": not getattr(region, "_unlink", True),
            "stats_offset": getattr(region, "stats_offset", 0), "stats_size": getattr(region, "stats_size", 0)},
        "programs": progs,
        "maps": maps,
        "links": links,
        "scratch": sorted({str(p) for p in scratch if p}),
    }


def publish(obj) -> None:
    """Write (or rewrite) the record of ``obj``; never raises."""
    try:
        d = _ensure_dir()
        if d is None:
            return
        with _locked(d):
            st = obj.__dict__.get("_registry")
            if st is None:
                st = obj._registry = _State("obj.%d.%d.json" % (os.getpid(), next(_seq)))
            rec = _record(obj, st, d)
            _write_atomic(d / st.name, json.dumps(rec, indent=1))
    except Exception as e:  # noqa: BLE001 - the registry must never break a load or an attach
        log.debug("registry: cannot publish %r: %s", getattr(obj, "name", obj), e)


def withdraw(obj) -> None:
    """Remove the record of ``obj`` (it closed); never raises."""
    st = obj.__dict__.get("_registry")
    d = run_dir()
    if st is None or d is None:
        return
    try:
        with _locked(d):
            rec_path = d / st.name
            with contextlib.suppress(OSError, ValueError):
                for lk in json.loads(rec_path.read_text()).get("links", ()):
                    if lk.get("side") == "user":
                        unmark_detached(lk["pid"], lk["attach_id"])
            with contextlib.suppress(FileNotFoundError):
                rec_path.unlink()
    except Exception as e:  # noqa: BLE001
        log.debug("registry: cannot withdraw %r: %s", getattr(obj, "name", obj), e)
    obj._registry = None


@dataclass
class Scan:
    records: list  # live records (dicts), oldest first
    notes: list  # what pruning did, one line each


def scan(prune: bool = True) -> Scan:
    """Every live record; records of controllers that are gone are pruned (see the module doc)."""
    d = run_dir()
    out = Scan([], [])
    if d is None or not d.is_dir():
        return out
    paths = sorted(d.glob("obj.*.json"), key=lambda p: tuple(int(x) if x.isdigit() else 0
                                                             for x in p.name.split(".")[1:3]))
    for path in paths:
        try:
            rec = json.loads(path.read_text())
        except FileNotFoundError:
            continue
        except (OSError, ValueError):
            continue
        ctl = rec.get("controller") or {}
        region = (rec.get("region") or {}).get("path")
        if region and not os.path.exists(region) and alive(ctl.get("pid"), ctl.get("start_time")):
            # the object was garbage-collected without close(): its region went, its record stays
            if prune:
                with contextlib.suppress(OSError):
                    path.unlink()
            continue
        if alive(ctl.get("pid"), ctl.get("start_time")):
            rec["_file"] = str(path)
            out.records.append(rec)
        elif prune:
            out.notes.extend(_prune(d, path, rec))
    if prune:
        _prune_markers(d, out.records)
    return out


def _prune(d: Path, path: Path, rec: dict) -> list[str]:
    notes = []
    ctl = (rec.get("controller") or {}).get("pid")
    left = sorted({lk["pid"] for lk in rec.get("links", ())
                   if lk.get("side") == "user" and lk.get("pid") != ctl and alive(lk.get("pid"))
                   and not detached(lk["pid"], lk["attach_id"])})
    for pid in left:
        notes.append("controller %s of object %r is gone; its probes in process %d run on until "
                     "`hybrid detach -p %d`" % (ctl, rec.get("object"), pid, pid))
    region = rec.get("region") or {}
    rpath = region.get("path") or ""
    if rpath.startswith("/dev/shm/hybrid.%s." % ctl) and not region.get("keep"):
        with contextlib.suppress(OSError):
            os.unlink(rpath)
    for p in rec.get("scratch", ()):
        if os.path.basename(p).startswith("hybrid-attach-"):
            import shutil

            shutil.rmtree(p, ignore_errors=True)
    with contextlib.suppress(OSError):
        path.unlink()
    for lk in rec.get("links", ()):
        if lk.get("side") == "user":
            unmark_detached(lk["pid"], lk["attach_id"])
    return notes


def _prune_markers(d: Path, live: list) -> None:
    wanted = {(lk["pid"], lk["attach_id"]) for rec in live for lk in rec.get("links", ()) if lk.get("side") == "user"}
    for m in d.glob("detached.*"):
        try:
            _, pid, aid = m.name.split(".")
            key = (int(pid), int(aid))
        except ValueError:
            continue
        if key not in wanted:  # its controller detached it (or is gone): the marker has done its work
            with contextlib.suppress(OSError):
                m.unlink()


# --- agent hosts and `hybrid load` sessions ----------------------------------------------------
#
# ``host.<pid>.json``: a process that runs hybrid's agent for whoever attaches (``hybrid run -- CMD``,
# ``hybrid attach -p PID`` without an object): `hybrid load` sessions attach their probes there.
# ``load.<pid>.json``: a `hybrid load` controller and its socket, told about hosts as they start.
# Both are pruned when their process is gone.  Without a registry (HYBRID_RUN_DIR=off) there are
# no hosts: `hybrid load` then attaches only in the processes its loader names (a uprobe's pid).


def _put(kind: str, pid: int, rec: dict) -> None:
    d = _ensure_dir()
    if d is None:
        return
    rec = dict(rec, pid=pid, start_time=start_time(pid))
    try:
        _write_atomic(d / ("%s.%d.json" % (kind, pid)), json.dumps(rec))
    except OSError as e:
        log.debug("registry %s: %s", d, e)


def _drop(kind: str, pid: int) -> None:
    d = run_dir()
    if d is not None:
        with contextlib.suppress(OSError):
            (d / ("%s.%d.json" % (kind, pid))).unlink()


def _live(kind: str) -> list[dict]:
    d = run_dir()
    out = []
    if d is None or not d.is_dir():
        return out
    for path in sorted(d.glob("%s.*.json" % kind)):
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if alive(rec.get("pid"), rec.get("start_time")):
            out.append(rec)
        else:
            with contextlib.suppress(OSError):
                path.unlink()
    return out


def add_host(pid: int, controller: int | None = None) -> None:
    """Process ``pid`` runs the agent and takes the probes of `hybrid load` sessions."""
    _put("host", pid, {"controller": controller or os.getpid()})


def remove_host(pid: int) -> None:
    _drop("host", pid)


def hosts() -> list[int]:
    """The live agent hosts' pids."""
    return [rec["pid"] for rec in _live("host")]


def add_session(sock: str) -> None:
    """This process is a `hybrid load` controller listening on ``sock``."""
    _put("load", os.getpid(), {"sock": sock})


def remove_session() -> None:
    _drop("load", os.getpid())


def sessions() -> list[dict]:
    """Live `hybrid load` controllers: ``{"pid", "sock", ...}``."""
    return _live("load")
