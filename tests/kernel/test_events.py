"""Ring buffer, perf buffer and user ring buffer between kernel programs and Python."""

from __future__ import annotations

import errno
import os
import struct

import pytest

from hybrid.errors import MapError
from hybrid.kernel import KernelMap, KernelObject
from hybrid.kernel import maps as M
from hybrid.kernel.events import PerfBuffer, RingBuffer, UserRingBuffer

from .conftest import key, rodata, u64

REC = struct.Struct("<IIQ")  # struct rec of events.bpf.c
MAGIC = 0x6879627269640000


def records(raw: list[bytes]) -> list[int]:
    out = []
    for r in raw:
        seq, tgid, magic = REC.unpack(r)
        assert tgid == os.getpid() and magic == MAGIC + seq
        out.append(seq)
    return out


def test_ring_buffer_receives_exact_records(events_obj):
    with KernelObject(events_obj, programs={"to_ringbuf"}, initial={".rodata": rodata()}) as obj:
        got: list[bytes] = []
        rb = obj.ring_buffer("rb", got.append)
        obj.attach()
        for _ in range(50):
            os.getppid()
        n = 0
        while n < 50:
            k = rb.poll(1000)
            assert k > 0, "no records after %d" % n
            n += k
        assert records(got) == list(range(50))
        assert rb.consume() == 0


def test_ring_buffer_callback_stops_and_raises(events_obj):
    with KernelObject(events_obj, programs={"to_ringbuf"}, initial={".rodata": rodata()}) as obj:
        seen: list[bytes] = []

        def stop_after_two(data):
            seen.append(data)
            return -7 if len(seen) == 2 else None

        obj.attach()
        for _ in range(5):
            os.getppid()
        rb = RingBuffer(obj.maps["rb"], stop_after_two)  # standalone: not owned by the object
        try:
            assert rb.consume() == -7 and len(seen) == 2
            assert rb.consume() == 3 and records(seen) == list(range(5))

            def boom(data):
                raise ValueError("from the callback")

            rb.callback = boom
            os.getppid()
            with pytest.raises(ValueError, match="from the callback"):
                rb.consume()
        finally:
            rb.close()
            rb.close()


def test_perf_buffer_receives_exact_records(events_obj):
    with KernelObject(events_obj, programs={"to_perfbuf"}, initial={".rodata": rodata()}) as obj:
        got: list[tuple[int, bytes]] = []
        lost: list[tuple[int, int]] = []
        pb = obj.perf_buffer("pb", lambda cpu, data: got.append((cpu, data[:REC.size])),
                             lost=lambda cpu, n: lost.append((cpu, n)), pages=4)
        obj.attach()
        for _ in range(40):
            os.getppid()
        for _ in range(20):
            if len(got) >= 40:
                break
            pb.poll(200)
        assert not lost
        assert sorted(records([d for _, d in got])) == list(range(40))
        assert all(0 <= cpu < os.cpu_count() for cpu, _ in got)


def test_user_ring_buffer_is_drained_by_a_program(events_obj):
    with KernelObject(events_obj, programs={"drain"}, initial={".rodata": rodata()}) as obj:
        urb = obj.user_ring_buffer("urb")
        values = [i * i + 1 for i in range(100)]
        for v in values:
            urb.send(struct.pack("<Q", v))
        sums = obj.maps["sums"]
        assert u64(sums[key(1)]) == 0  # nothing drains before the trigger
        obj.attach()
        os.getppid()  # one drain takes every record
        assert u64(sums[key(1)]) == 100
        assert u64(sums[key(0)]) == sum(values)
        urb.send(struct.pack("<Q", 5))
        os.getppid()
        assert u64(sums[key(0)]) == sum(values) + 5


def test_user_ring_buffer_full():
    with KernelMap.create(M.BPF_MAP_TYPE_USER_RINGBUF, 0, 0, 4096, name="tiny") as m, UserRingBuffer(m) as urb:
        with pytest.raises(MapError, match="ring buffer full") as ei:
            for _ in range(1000):
                urb.send(bytes(64))
        assert ei.value.errno == errno.ENOSPC


def test_consumers_check_the_map_type():
    with KernelMap.create(M.BPF_MAP_TYPE_HASH, 4, 4, 4, name="notring") as m:
        with pytest.raises(MapError, match=r"not a ring buffer \(BPF_MAP_TYPE_RINGBUF\) map"):
            RingBuffer(m, print)
        with pytest.raises(MapError, match="not a perf event array"):
            PerfBuffer(m, print)
        with pytest.raises(MapError, match="not a user ring buffer"):
            UserRingBuffer(m)
