"""Everything hybrid has loaded and attached, in every process: ``hybrid prog list`` and co.

The data comes from the registry records (:mod:`hybrid.registry`), the
programs' run counts from the stats area of each object's shared region
(:mod:`hybrid.user.stats`, read-only), kernel programs' counts from the
kernel (``bpf_prog_info.run_cnt``/``run_time_ns``, counted while
``kernel.bpf_stats_enabled`` is 1), map contents from the region (mapped,
then made read-only) or, for maps whose truth is in the kernel, from the
kernel map.

Detaching one userspace link of another controller goes through the agent
in the traced process, as ``hybrid detach -p`` does: the link is first
marked detached in the registry (so its controller will not detach it
again, see ``Attachment.detach``), then ``detach ID`` is applied by a
ptrace'd call into the agent; on failure the mark is removed.  The
controller's own objects are untouched (its maps, its other links).
"""

from __future__ import annotations

import ctypes
import errno as E
import json
import os
from pathlib import Path

from hybrid import registry
from hybrid.errors import AttachError, HybridError

# --- programs ---------------------------------------------------------------------------


def _kernel_prog_stats(prog_id: int) -> tuple[int | None, int | None]:
    """``(run_cnt, run_time_ns)`` of kernel program ``prog_id`` (None, None when it cannot be read)."""
    from hybrid.kernel import libbpf as L

    try:
        get = L.function("bpf_prog_get_fd_by_id")
        get.argtypes, get.restype = [L.U32], L.I
        fd = get(prog_id)
        if fd < 0:
            return None, None
        try:
            buf = ctypes.create_string_buffer(232)  # struct bpf_prog_info (uapi, 6.x)
            size = L.U32(232)
            if L.lib().bpf_obj_get_info_by_fd(fd, buf, ctypes.byref(size)) or size.value < 208:
                return None, None
            raw = buf.raw
            return int.from_bytes(raw[200:208], "little"), int.from_bytes(raw[192:200], "little")
        finally:
            os.close(fd)
    except Exception:  # noqa: BLE001 - no libbpf, not root
        return None, None


def kernel_stats_enabled() -> bool | None:
    try:
        return Path("/proc/sys/kernel/bpf_stats_enabled").read_text().strip() != "0"
    except OSError:
        return None


def _region_stats(rec: dict):
    from hybrid.user import stats

    region = rec.get("region") or {}
    if not region.get("stats_size"):
        return None, []
    try:
        return stats.read(region["path"], region["stats_offset"], region["stats_size"])
    except (OSError, ValueError):
        return None, []


def _links_of(rec: dict) -> list[dict]:
    """The record's links that are still attached (not removed from outside)."""
    out = []
    for lk in rec.get("links", ()):
        if lk.get("side") == "user" and registry.detached(lk["pid"], lk["attach_id"]):
            continue
        out.append(lk)
    return out


def _owner(rec: dict) -> dict:
    return {"object": rec.get("object"), "path": rec.get("path"),
            "controller": (rec.get("controller") or {}).get("pid")}


def programs(scan: registry.Scan | None = None) -> list[dict]:
    """One row per program of every loaded object, with its run counts."""
    scan = scan or registry.scan()
    rows = []
    for rec in scan.records:
        enabled, counts = _region_stats(rec)
        links = _links_of(rec)
        for p in rec.get("programs", ()):
            mine = [lk for lk in links if lk.get("prog_id") == p["id"]]
            row = {"id": p["id"], "name": p["name"], "kind": p["kind"], "side": p["side"],
                   "section": p["section"], **_owner(rec),
                   "pids": sorted({lk["pid"] for lk in mine if lk.get("pid")}),
                   "links": sorted(lk["id"] for lk in mine)}
            if p["side"] == "user":
                slot = p.get("slot")
                st = counts[slot] if slot is not None and slot < len(counts) else None
                row.update(runs=st.runs if st else None, run_time_ns=st.run_time_ns if st else None,
                           stats_enabled=enabled, vm_id=p.get("vm_id"), insns=p.get("insns"))
            else:
                runs, ns = _kernel_prog_stats(p["kernel_id"])
                on = kernel_stats_enabled()
                # the kernel counts runs and run time only while kernel.bpf_stats_enabled is 1
                row.update(runs=runs if (runs or on) else None, run_time_ns=ns if (ns or on) else None,
                           stats_enabled=on, kernel_id=p["kernel_id"])
            row["avg_ns"] = round(row["run_time_ns"] / row["runs"], 1) \
                if row.get("run_time_ns") is not None and row.get("runs") else None
            rows.append(row)
    return rows


# --- maps -----------------------------------------------------------------------------------


def _where(m: dict) -> str:
    role, kid = m.get("role", "user"), m.get("kernel_id") or 0
    if m.get("index") is None:
        return "kernel id %d" % kid
    if role == "mirror":
        return "mirror of kernel id %d" % kid
    if m.get("bridge") == "mmap":
        return "kernel id %d (mmap)" % kid
    if m.get("bridge") == "syscall":
        return "kernel id %d (bpf())" % kid
    return "region"


def maps(scan: registry.Scan | None = None) -> list[dict]:
    scan = scan or registry.scan()
    rows = []
    for rec in scan.records:
        for m in rec.get("maps", ()):
            rows.append({"id": m["id"], "name": m["name"], "type": m["type"], "key_size": m["key_size"],
                         "value_size": m["value_size"], "max_entries": m["max_entries"], "flags": m["flags"],
                         "where": _where(m), "kernel_id": m.get("kernel_id") or None, **_owner(rec),
                         "region": (rec.get("region") or {}).get("path")})
    return rows


def find_map(what: str, scan: registry.Scan | None = None) -> tuple[dict, dict]:
    """``(record, map entry)`` of map ``what``: an id, or a name that only one object has."""
    scan = scan or registry.scan()
    found = []
    for rec in scan.records:
        for m in rec.get("maps", ()):
            if (what.isdigit() and m["id"] == int(what)) or m["name"] == what:
                found.append((rec, m))
    if what.isdigit():
        found = [f for f in found if f[1]["id"] == int(what)] or found
    if not found:
        raise HybridError("no map %s (hybrid map list shows them)" % (what if what.isdigit() else repr(what)))
    if len(found) > 1:
        raise HybridError("several maps are called %r: %s; give an id" % (what, ", ".join(
            "%d (object %s, process %s)" % (m["id"], r.get("object"), (r.get("controller") or {}).get("pid"))
            for r, m in found)))
    return found[0]


def _readonly(region) -> None:
    """Make a mapped region read-only in this process: a dump must never write."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    if libc.mprotect(region.base, region.size, 1):  # PROT_READ
        raise OSError(ctypes.get_errno(), "mprotect")


_NOT_DUMPED = {"ringbuf": "a ring buffer is consumed, not dumped",
               "perf_event_array": "a perf event array is consumed, not dumped",
               "queue": "a queue has no keys (its elements are popped)",
               "stack": "a stack has no keys (its elements are popped)",
               "bloom_filter": "a bloom filter has no keys"}


def dump_map(what: str, scan: registry.Scan | None = None) -> tuple[dict, list[dict]]:
    """``(map row, entries)``; each entry ``{"key": hex, "value": hex}`` or ``"values": [per CPU]``,
    with ``key_int``/``value_int`` for keys and values of 1, 2, 4 or 8 bytes."""
    from hybrid.kernel.maps import KernelMap
    from hybrid.user.maps import Region

    rec, m = find_map(what, scan)
    row = next(r for r in maps(registry.Scan([rec], [])) if r["id"] == m["id"])
    if m["type"] in _NOT_DUMPED:
        raise HybridError("map %d (%s): %s" % (m["id"], m["name"], _NOT_DUMPED[m["type"]]))
    if m.get("index") is None or m.get("role") == "mirror":  # the kernel map is the whole truth
        with KernelMap.from_id(m["kernel_id"]) as km:
            return row, [_entry(k, v) for k, v in km.items()]
    region_path = (rec.get("region") or {}).get("path")
    if not region_path:
        raise HybridError("map %d (%s): its object has no region" % (m["id"], m["name"]))
    region = Region.open(region_path)
    try:
        _readonly(region)
        return row, [_entry(k, v) for k, v in region[m["index"]].items()]
    finally:
        region.close()


def _int(b: bytes) -> int | None:
    return int.from_bytes(b, "little") if len(b) in (1, 2, 4, 8) else None


def _entry(key: bytes, value) -> dict:
    e = {"key": bytes(key).hex(), "key_int": _int(bytes(key))}
    if isinstance(value, list):
        e["values"] = [{"cpu": i, "value": bytes(v).hex(), "value_int": _int(bytes(v))} for i, v in enumerate(value)]
    elif isinstance(value, (bytes, bytearray)):
        e["value"] = bytes(value).hex()
        e["value_int"] = _int(bytes(value))
    else:  # an inner map of a map of maps
        e["value"] = None
        e["inner_map"] = getattr(value, "name", str(value))
    return e


# --- links ----------------------------------------------------------------------------------


def links(scan: registry.Scan | None = None) -> list[dict]:
    scan = scan or registry.scan()
    rows = []
    for rec in scan.records:
        for lk in _links_of(rec):
            pid = lk.get("pid")
            rows.append({"id": lk["id"], "prog_id": lk.get("prog_id"), "program": lk["program"],
                         "kind": lk["kind"], "side": lk["side"], "pid": pid,
                         "target_alive": registry.alive(pid) if pid else None, "where": lk["where"],
                         "attach_id": lk.get("attach_id"), "kernel_id": lk.get("kernel_id"), **_owner(rec)})
    return rows


def find_link(link_id: int, scan: registry.Scan | None = None) -> tuple[dict, dict]:
    scan = scan or registry.scan()
    for rec in scan.records:
        for lk in rec.get("links", ()):
            if lk["id"] == link_id:
                if lk.get("side") == "user" and registry.detached(lk["pid"], lk["attach_id"]):
                    raise HybridError("link %d is already detached" % link_id)
                return rec, lk
    raise HybridError("no link %d (hybrid link list shows them)" % link_id)


def _apply_remote(pid: int, library: str, text: str) -> None:
    """Apply agent spec ``text`` in process ``pid`` through the agent in ``library`` (a ptrace'd call)."""
    from hybrid.user.attach import agent, inject

    if pid == os.getpid():
        agent._SelfChannel().apply(text)
        return
    wd = agent._workdir()
    try:
        path = wd / "spec"
        path.write_text(text)
        agent._share_with(pid, wd, path)
        rc = inject.inject_and_call(pid, library, "hybrid_agent_apply_file", str(path),
                                    relocate="hybrid_agent_relocate_pc")
        try:
            err = Path(str(path) + ".err").read_text().strip()
        except OSError:
            err = ""
        if rc != 0:
            raise AttachError("process %d: %s" % (pid, err or os.strerror(-rc if rc < 0 else rc)))
    finally:
        import shutil

        shutil.rmtree(wd, ignore_errors=True)


def detach_link(link_id: int) -> dict:
    """Remove link ``link_id`` (any controller's); returns its row."""
    rec, lk = find_link(link_id)
    pid = lk.get("pid")
    if lk["side"] == "user":
        if not registry.alive(pid):
            raise HybridError("link %d: process %s is gone" % (link_id, pid))
        if not lk.get("agent"):
            raise HybridError("link %d: the agent library is unknown" % link_id)
        registry.mark_detached(pid, lk["attach_id"])
        try:
            _apply_remote(pid, lk["agent"], "detach %d\n" % lk["attach_id"])
        except BaseException:
            registry.unmark_detached(pid, lk["attach_id"])
            raise
        return lk
    _detach_kernel_link(lk, rec)
    return lk


def _detach_kernel_link(lk: dict, rec: dict) -> None:
    from hybrid.kernel import libbpf as L

    kid = lk.get("kernel_id") or 0
    ctl = (rec.get("controller") or {}).get("pid")
    get = L.function("bpf_link_get_fd_by_id")
    get.argtypes, get.restype = [L.U32], L.I
    det = L.function("bpf_link_detach")
    det.argtypes, det.restype = [L.I], L.I
    fd = get(kid) if kid else -E.ENOENT
    if fd < 0:
        raise HybridError("link %d: kernel link %d: %s" % (lk["id"], kid, L.strerror(L.errno_of(fd))))
    try:
        rc = det(fd)
    finally:
        os.close(fd)
    if rc < 0:
        err = L.errno_of(rc)
        raise HybridError("link %d: kernel link %d (%s) cannot be detached from outside process %s, which "
                          "holds it: BPF_LINK_DETACH says %s; close it there (or end that process)"
                          % (lk["id"], kid, lk["kind"], ctl, L.strerror(err)))


def detach_process(pid: int) -> int:
    """``hybrid detach -p``: every probe in ``pid``; the registry's links there are marked detached, and
    the process no longer takes the probes of `hybrid load` sessions (it is no agent host)."""
    from hybrid.user.attach.agent import detach_all

    registry.remove_host(pid)
    marked = [(lk["pid"], lk["attach_id"]) for rec in registry.scan().records for lk in rec.get("links", ())
              if lk.get("side") == "user" and lk.get("pid") == pid and not registry.detached(pid, lk["attach_id"])]
    for key in marked:
        registry.mark_detached(*key)
    try:
        return detach_all(pid)
    except BaseException:
        for key in marked:
            registry.unmark_detached(*key)
        raise


# --- run-time statistics -----------------------------------------------------------------------


def set_stats(on: bool) -> int:
    """Turn run-time measurement on or off in every loaded object and for objects loaded from now on;
    returns how many objects changed."""
    from hybrid.user import stats

    registry.set_stats_default(on)
    n = 0
    for rec in registry.scan().records:
        region = rec.get("region") or {}
        if region.get("stats_size"):
            try:
                stats.set_enabled(region["path"], region["stats_offset"], on)
                n += 1
            except (OSError, ValueError):
                pass
    return n


# --- text ---------------------------------------------------------------------------------------


def table(rows: list[list], header: list[str], right: set[int] = frozenset()) -> str:
    """Aligned columns (numbers in ``right`` aligned right)."""
    cells = [header] + [["-" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = []
    for r in cells:
        parts = [r[i].rjust(widths[i]) if i in right else r[i].ljust(widths[i]) for i in range(len(header))]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def _pids(pids: list) -> str:
    return ",".join(str(p) for p in pids) or "-"


def format_programs(rows: list[dict]) -> str:
    return table([[r["id"], r["name"], r["kind"], r["side"], r["object"], r["controller"], _pids(r["pids"]),
                   r["runs"], r["run_time_ns"], r["avg_ns"]] for r in rows],
                 ["ID", "NAME", "KIND", "SIDE", "OBJECT", "CONTROLLER", "PIDS", "RUNS", "RUN_TIME_NS", "AVG_NS"],
                 right={0, 5, 7, 8, 9})


def format_maps(rows: list[dict]) -> str:
    return table([[r["id"], r["name"], r["type"], r["key_size"], r["value_size"], r["max_entries"], r["where"],
                   r["object"], r["controller"]] for r in rows],
                 ["ID", "NAME", "TYPE", "KEY", "VALUE", "MAX_ENTRIES", "WHERE", "OBJECT", "CONTROLLER"],
                 right={0, 3, 4, 5, 8})


def format_links(rows: list[dict]) -> str:
    def pid(r):
        if r["pid"] is None:
            return "-"
        return str(r["pid"]) + ("" if r["target_alive"] else " (exited)")

    return table([[r["id"], r["prog_id"], r["program"], r["kind"], r["side"], pid(r), r["where"], r["object"],
                   r["controller"]] for r in rows],
                 ["ID", "PROG", "NAME", "KIND", "SIDE", "PID", "WHERE", "OBJECT", "CONTROLLER"], right={0, 1, 8})


def _hex(h: str) -> str:
    return " ".join(h[i:i + 2] for i in range(0, len(h), 2))


def format_dump(row: dict, entries: list[dict]) -> str:
    lines = []
    for e in entries:
        key = "key: %s" % _hex(e["key"]) + (" (%d)" % e["key_int"] if e["key_int"] is not None else "")
        if "values" in e:
            lines.append(key)
            for v in e["values"]:
                lines.append("  value (CPU %02d): %s%s" % (v["cpu"], _hex(v["value"]),
                                                           " (%d)" % v["value_int"] if v["value_int"] is not None
                                                           else ""))
        elif e.get("inner_map") is not None:
            lines.append("%s  value: map %s" % (key, e["inner_map"]))
        else:
            lines.append("%s  value: %s%s" % (key, _hex(e["value"]),
                                              " (%d)" % e["value_int"] if e["value_int"] is not None else ""))
    lines.append("Found %d element%s" % (len(entries), "" if len(entries) == 1 else "s"))
    return "\n".join(lines)


def to_json(data) -> str:
    return json.dumps(data, indent=1)
