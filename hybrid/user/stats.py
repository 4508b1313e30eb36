"""Run counts and run time of an object's programs, in its shared region.

The layout is ``hybrid/native/stats.h``'s: a 64-byte header (magic
``HYSTATS1``, nr_progs, nr_cpus, enabled, plane, tsc_hz), then one plane
per possible CPU of ``{runs, ticks}`` pairs, one per program.  The probe
dispatchers of the agent add to it in whichever process the programs run;
any process that can open the region file reads it (``read``), or turns
run-time measurement on and off (``set_enabled``), like the kernel's
``kernel.bpf_stats_enabled``.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass

MAGIC = b"HYSTATS1"
HEADER = 64
_HDR = struct.Struct("<8sIIII QQ")  # magic, nr_progs, nr_cpus, enabled, pad, plane, tsc_hz
ENABLED_OFFSET = 16
TSC_HZ_OFFSET = 32


def plane_size(nr_progs: int) -> int:
    return (nr_progs * 16 + 63) // 64 * 64


def size(nr_progs: int, nr_cpus: int) -> int:
    """Bytes of a stats area for ``nr_progs`` programs."""
    return HEADER + nr_cpus * plane_size(nr_progs)


def init(buf, nr_progs: int, nr_cpus: int, enabled: bool = False) -> None:
    """Write an empty stats area into ``buf`` (a writable buffer of ``size()`` bytes)."""
    buf[:HEADER] = b"\0" * HEADER
    buf[HEADER:size(nr_progs, nr_cpus)] = b"\0" * (size(nr_progs, nr_cpus) - HEADER)
    tsc = tsc_hz() if enabled else 0
    _HDR.pack_into(buf, 0, MAGIC, nr_progs, nr_cpus, 1 if enabled and tsc else 0, 0, plane_size(nr_progs), tsc)


def tsc_hz() -> int:
    """Ticks per second of the time counters (the TSC, measured once per process)."""
    from hybrid.native import _native

    return int(_native().lib.hybrid_tsc_hz())


@dataclass(frozen=True)
class ProgStats:
    runs: int
    run_time_ns: int | None  # None: never measured

    @property
    def avg_ns(self) -> float | None:
        if self.run_time_ns is None or not self.runs:
            return None
        return self.run_time_ns / self.runs


def parse(buf) -> tuple[bool, list[ProgStats]]:
    """``(enabled, [ProgStats per program])`` from the bytes of a stats area."""
    magic, nprogs, ncpus, enabled, _pad, plane, hz = _HDR.unpack_from(buf, 0)
    if magic != MAGIC or plane < nprogs * 16 or len(buf) < HEADER + ncpus * plane:
        raise ValueError("not a stats area")
    runs = [0] * nprogs
    ticks = [0] * nprogs
    for cpu in range(ncpus):
        base = HEADER + cpu * plane
        vals = struct.unpack_from("<%dQ" % (2 * nprogs), buf, base)
        for i in range(nprogs):
            runs[i] += vals[2 * i]
            ticks[i] += vals[2 * i + 1]
    out = []
    for i in range(nprogs):
        ns = None
        if hz:
            ns = ticks[i] * 1_000_000_000 // hz
        out.append(ProgStats(runs[i], ns))
    return bool(enabled), out


def _mapping(path: str, offset: int, length: int, write: bool) -> tuple[mmap.mmap, int]:
    fd = os.open(path, os.O_RDWR if write else os.O_RDONLY)
    try:
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        return mmap.mmap(fd, length + offset - start, mmap.MAP_SHARED,
                         mmap.PROT_READ | (mmap.PROT_WRITE if write else 0), offset=start), offset - start
    finally:
        os.close(fd)


def read(path: str, offset: int, length: int) -> tuple[bool, list[ProgStats]]:
    """Read the stats area at ``offset`` of region file ``path`` (read-only)."""
    m, skip = _mapping(path, offset, length, write=False)
    try:
        return parse(memoryview(m)[skip:skip + length].tobytes())
    finally:
        m.close()


def set_enabled(path: str, offset: int, on: bool) -> None:
    """Turn run-time measurement on or off in the stats area at ``offset`` of region file ``path``."""
    m, skip = _mapping(path, offset, HEADER, write=True)
    try:
        if bytes(m[skip:skip + 8]) != MAGIC:
            raise ValueError("not a stats area")
        if on and not struct.unpack_from("<Q", m, skip + TSC_HZ_OFFSET)[0]:
            struct.pack_into("<Q", m, skip + TSC_HZ_OFFSET, tsc_hz())
        struct.pack_into("<I", m, skip + ENABLED_OFFSET, 1 if on else 0)
    finally:
        m.close()
