"""BPF ring buffers and perf event arrays: records, discard, lost counting, wake-ups, other processes."""

from __future__ import annotations

import ctypes
import errno
import os
import subprocess
import sys
import threading
import time

import pytest

from hybrid.errors import MapError
from hybrid.user import maps as M
from hybrid.user.maps import (BPF_F_CURRENT_CPU, BPF_RB_AVAIL_DATA, BPF_RB_CONS_POS, BPF_RB_FORCE_WAKEUP,
                              BPF_RB_NO_WAKEUP, BPF_RB_PROD_POS, BPF_RB_RING_SIZE, MapSpec, MapType,
                              PerfBufferConsumer, RingBufferConsumer, ffi, lib)
from tests.user.maps_util import k, regions  # noqa: F401 - fixture

NCPU = M.possible_cpus()
BUSY, DISCARD = 1 << 31, 1 << 30


def ringbuf(regions, size=4096):
    return regions.one(MapSpec("rb", MapType.RINGBUF, 0, 0, size))


def collect(rb):
    got = []
    return got, RingBufferConsumer(rb, got.append)


# --- ring buffer: records --------------------------------------------------------------


def test_ringbuf_records_in_order_and_query(regions):
    rb = ringbuf(regions)
    got, c = collect(rb)
    assert rb.ring_size == 4096 and rb.query(BPF_RB_RING_SIZE) == 4096
    assert c.consume() == 0 and c.poll(0) == 0
    recs = [bytes([i]) * (i + 1) for i in range(20)]
    for r in recs:
        rb.output(r)
    # 8-byte headers, records rounded up to 8
    used = sum((len(r) + 8 + 7) // 8 * 8 for r in recs)
    assert rb.avail_data == used == rb.query(BPF_RB_PROD_POS) - rb.query(BPF_RB_CONS_POS)
    assert c.consume() == 20 and got == recs
    assert rb.query(BPF_RB_AVAIL_DATA) == 0 and rb.query(BPF_RB_CONS_POS) == used
    assert rb.query(99) == 0
    assert c.lost == 0 and rb.lost == 0


def test_ringbuf_reserve_submit_discard_and_busy_records_hold_back_later_ones(regions):
    rb = ringbuf(regions)
    got, c = collect(rb)
    p = lib.hybrid_ringbuf_reserve(rb._p(), 5, 0)
    assert p != ffi.NULL and int(ffi.cast("uintptr_t", p)) % 8 == 0
    ffi.memmove(p, b"first", 5)
    rb.output(b"second")
    assert c.consume() == 0  # the reserved record is still BUSY: nothing after it is readable
    lib.hybrid_ringbuf_submit(p, 0)
    assert c.consume() == 2 and got == [b"first", b"second"]
    q = lib.hybrid_ringbuf_reserve(rb._p(), 16, 0)
    ffi.memmove(q, b"x" * 16, 16)
    lib.hybrid_ringbuf_discard(q, 0)
    lib.hybrid_ringbuf_discard(q, 0)  # a second commit of the same record is ignored
    rb.output(b"third")
    assert c.consume() == 1 and got[-1] == b"third"
    assert lib.hybrid_ringbuf_reserve(rb._p(), 8, 1) == ffi.NULL  # flags must be 0
    assert rb.lost == 0


def test_ringbuf_full_counts_lost_records(regions):
    rb = ringbuf(regions)
    got, c = collect(rb)
    ok = failed = 0
    for i in range(200):
        try:
            rb.output(k(i) * 8)  # 32 bytes + 8 header
            ok += 1
        except MapError as e:
            assert e.errno == errno.EAGAIN
            failed += 1
    assert ok == 4096 // 40 and failed == 200 - ok
    assert rb.lost == failed == c.lost
    assert 4096 - rb.avail_data == 16
    assert lib.hybrid_ringbuf_reserve(rb._p(), 9, 0) == ffi.NULL  # no room: NULL and counted
    assert rb.lost == failed + 1
    assert c.consume() == ok and got == [k(i) * 8 for i in range(ok)]
    rb.output(b"again")  # room again after consuming
    assert c.consume() == 1
    with pytest.raises(MapError) as e:
        rb.output(b"x" * 4096)  # can never fit: counted too
    assert e.value.errno == errno.EAGAIN and rb.lost == failed + 2
    assert lib.hybrid_map_lost(rb._p(), 1) == failed + 2 and rb.lost == 0  # reset


def test_ringbuf_wraps_around_many_times_with_any_sizes(regions):
    rb = ringbuf(regions, 8192)
    got, c = collect(rb)
    sent = []
    n = 0
    for lap in range(300):
        for _ in range(4):
            size = (n * 37) % 1500 + 1
            data = bytes((n + j) & 0xFF for j in range(size))
            rb.output(data)
            sent.append(data)
            n += 1
        c.consume()
    assert got == sent and rb.lost == 0
    assert rb.query(BPF_RB_CONS_POS) > 100 * 8192  # positions keep growing across laps
    # a record of more than half the ring fits in an empty ring wherever the positions are
    for _ in range(3):
        rb.output(b"z" * 4000)
        assert c.consume() == 1


def test_ringbuf_layout_is_readable_by_a_libbpf_style_consumer(regions):
    """Reads the ring as libbpf's ringbuf_process_ring does, from the three addresses."""
    rb = ringbuf(regions)
    cons_addr, prod_addr, data, size = rb.addresses()
    assert size == 4096 and data % 4096 == 0
    sent = [bytes([i]) * (i * 50 % 700 + 1) for i in range(60)]
    got = []
    cons = ctypes.c_uint64.from_address(cons_addr)
    prod = ctypes.c_uint64.from_address(prod_addr)
    for rec in sent:
        try:
            rb.output(rec)
        except MapError:  # full: read like libbpf and retry
            while cons.value < prod.value:
                hdr = ctypes.c_uint32.from_address(data + (cons.value & (size - 1))).value
                assert not hdr & BUSY
                n = hdr & ~(BUSY | DISCARD)
                if not hdr & DISCARD:
                    got.append(ctypes.string_at(data + (cons.value & (size - 1)) + 8, n))
                cons.value += (n + 8 + 7) // 8 * 8
            rb.output(rec)
    c_got, c = collect(rb)
    c.consume()
    assert got + c_got == sent


def test_consumer_callback_errors_and_stop_values(regions):
    rb = ringbuf(regions)
    for i in range(3):
        rb.output(k(i))
    seen = []

    def boom(data):
        seen.append(data)
        raise ValueError("bad record")

    with pytest.raises(ValueError, match="bad record"):
        RingBufferConsumer(rb, boom).consume()
    assert seen == [k(0)]  # the failing record is consumed, the others remain
    c = RingBufferConsumer(rb, lambda d: -5)
    assert c.consume() == -5
    assert RingBufferConsumer(rb, lambda d: None).consume() == 1
    with pytest.raises(MapError):
        RingBufferConsumer(regions.one(MapSpec("h", MapType.HASH, 4, 4, 4)), print)


# --- ring buffer: wake-ups ----------------------------------------------------------------


def poll_in_thread(c, timeout_ms):
    result = {}

    def body():
        t0 = time.monotonic()
        result["n"] = c.poll(timeout_ms)
        result["t"] = time.monotonic() - t0

    th = threading.Thread(target=body)
    th.start()
    return th, result


def test_idle_consumer_is_woken_at_once(regions):
    rb = ringbuf(regions)
    got, c = collect(rb)
    th, res = poll_in_thread(c, 10_000)
    time.sleep(0.1)  # the consumer is past its batching phase: the next record wakes it
    t0 = time.monotonic()
    rb.output(b"hello")
    th.join(5)
    assert not th.is_alive() and res["n"] == 1 and got == [b"hello"]
    assert time.monotonic() - t0 < 0.2


def test_batching_phase_wakes_by_threshold_force_or_time_bound(regions):
    rb = ringbuf(regions, 8192)
    rb.set_wakeup(1024, max_latency_ms=300)
    got, c = collect(rb)
    # a small record during the batching phase: no wake-up, the consumer wakes itself at the bound
    th, res = poll_in_thread(c, 10_000)
    time.sleep(0.05)
    rb.output(b"small")
    th.join(5)
    assert res["n"] == 1 and 0.2 < res["t"] < 1.5
    # BPF_RB_FORCE_WAKEUP wakes at once
    th, res = poll_in_thread(c, 10_000)
    time.sleep(0.05)
    rb.output(b"forced", BPF_RB_FORCE_WAKEUP)
    th.join(5)
    assert res["n"] == 1 and res["t"] < 0.2
    # crossing wakeup_bytes of unconsumed data wakes at once
    th, res = poll_in_thread(c, 10_000)
    time.sleep(0.05)
    for _ in range(10):
        rb.output(b"b" * 120)
    th.join(5)
    assert res["n"] == 10 and res["t"] < 0.2
    assert got[:2] == [b"small", b"forced"]


def test_no_wakeup_records_wait_for_the_poll_timeout_and_are_not_lost(regions):
    rb = ringbuf(regions)
    rb.set_wakeup(1, max_latency_ms=0)  # eager: any record would wake
    got, c = collect(rb)
    th, res = poll_in_thread(c, 400)
    time.sleep(0.05)
    rb.output(b"quiet", BPF_RB_NO_WAKEUP)
    th.join(5)
    assert res["n"] == 1 and res["t"] > 0.3 and got == [b"quiet"]
    with pytest.raises(MapError) as e:
        rb.output(b"x", 4)  # unknown flag
    assert e.value.errno == errno.EINVAL


def test_consumer_in_another_process_is_woken_through_the_shared_futex(regions):
    rb = ringbuf(regions, 1 << 16)
    code = f"""
import time
from hybrid.user.maps import Region, RingBufferConsumer
r = Region.open({rb.region.name!r})
got = []
c = RingBufferConsumer(r["rb"], got.append)
print("ready", flush=True)
first = None
deadline = time.monotonic() + 20
while len(got) < 1000 and time.monotonic() < deadline:
    c.poll(5000)
    if got and first is None:
        first = time.monotonic()
ok = all(g == i.to_bytes(4, "little") * 4 for i, g in enumerate(got))
print(len(got), ok, first, c.lost)
"""
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    time.sleep(0.3)  # the consumer is asleep in its eager phase by now
    sent_at = time.monotonic()
    rb.output(k(0) * 4)
    time.sleep(0.05)
    for i in range(1, 1000):
        rb.output(k(i) * 4)
    n, ok, first, lost = p.communicate(timeout=30)[0].split()
    assert (n, ok, lost) == ("1000", "True", "0")
    assert float(first) - sent_at < 0.25  # woken by the producer, not by its 5 s timeout


@pytest.mark.parametrize("ring,count,expect_loss", [(1 << 20, 5000, False), (1 << 16, 20000, True)],
                         ids=["roomy", "overrun"])
def test_ringbuf_consumer_with_producers_in_threads_and_processes(regions, ring, count, expect_loss):
    """Two producer threads and two producer processes against one consumer thread: every record
    arrives once, in each producer's order, intact; discarded ones never; lost ones are counted."""
    rb = ringbuf(regions, ring)
    size = 24
    seqs: dict[int, int] = {}
    bad = []

    def check(data: bytes):
        producer = int.from_bytes(data[0:4], "little")
        sz = int.from_bytes(data[4:8], "little")
        seq = int.from_bytes(data[8:16], "little")
        if producer == 0xFFFFFFFF or sz != len(data) or seq <= seqs.get(producer, -1) or \
                data[16:] != bytes((seq + j) & 0xFF for j in range(16, sz)):
            bad.append(data)
        seqs[producer] = seq

    c = RingBufferConsumer(rb, check)
    stop = threading.Event()
    received = [0]

    def consume():
        while not stop.is_set():
            received[0] += c.poll(100)
        received[0] += c.consume()

    consumer = threading.Thread(target=consume)
    consumer.start()
    code = f"""
from hybrid.user.maps import Region, lib
r = Region.open({rb.region.name!r})
print(lib.hybrid_test_ring_produce(r["rb"]._p(), {{p}}, {count}, {size}, 0))
"""
    procs = [subprocess.Popen([sys.executable, "-c", code.replace("{p}", str(p))], stdout=subprocess.PIPE, text=True)
             for p in (1, 2)]
    failed = [0, 0]

    def produce(i):
        failed[i] = lib.hybrid_test_ring_produce(rb._p(), 10 + i, count, size, 0)

    threads = [threading.Thread(target=produce, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    failed += [int(p.communicate(timeout=60)[0]) for p in procs]
    stop.set()
    consumer.join(30)
    assert all(f >= 0 for f in failed)
    discarded = sum(1 for s in range(count) if s % 10 == 9)
    assert not bad
    assert received[0] + sum(failed) == 4 * (count - discarded)
    # lost also counts the failed reservations of records that would have been discarded
    assert sum(failed) <= rb.lost <= sum(failed) + 4 * discarded, (failed, rb.lost, discarded)
    if expect_loss:
        assert received[0] > 0 and set(seqs) <= {1, 2, 10, 11}
    else:
        assert rb.lost == 0 and set(seqs) == {1, 2, 10, 11}
        last = max(s for s in range(count) if s % 10 != 9)
        assert all(seqs[p] == last for p in seqs)


# --- perf event array ------------------------------------------------------------------------


def perf(regions, entries=0, ring=0):
    return regions.one(MapSpec("events", MapType.PERF_EVENT_ARRAY, 4, 4, entries, map_extra=ring))


def test_perf_output_per_cpu_and_lost(regions):
    pa = perf(regions, ring=4096)
    assert pa.max_entries == NCPU and pa.ring_size == 4096
    with pytest.raises(MapError) as e:
        pa.output(b"nobody listens", 0)
    assert e.value.errno == errno.ENOENT  # no consumer: like a slot without a perf event
    got, lost = [], []
    with PerfBufferConsumer(pa, lambda cpu, d: got.append((cpu, d)), lambda cpu, n: lost.append((cpu, n))) as c:
        for cpu in range(NCPU):
            pa.output(b"on %d" % cpu, cpu)
        assert c.poll(100) == NCPU and sorted(got) == [(cpu, b"on %d" % cpu) for cpu in range(NCPU)]
        with pytest.raises(MapError) as e:
            pa.output(b"x", NCPU)
        assert e.value.errno == errno.E2BIG
        with pytest.raises(MapError) as e:
            pa.output(b"x", 1 << 32)  # bits above the index are refused
        assert e.value.errno == errno.EINVAL
        n = 0
        while True:
            try:
                pa.output(b"y" * 100, 0)
                n += 1
            except MapError as exc:
                assert exc.errno == errno.ENOSPC
                break
        for _ in range(4):
            with pytest.raises(MapError):
                pa.output(b"y" * 100, 0)
        assert pa.lost_on(0) == 5 and pa.lost == 5
        got.clear()
        assert c.poll(0) == n and len(got) == n
        assert lost == [(0, 5)] and c.lost == 5 and pa.lost_on(0) == 0
    with pytest.raises(MapError):  # closed consumer: entries disabled again
        pa.output(b"x", 0)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_perf_current_cpu(regions):
    pa = perf(regions)
    got = []
    with PerfBufferConsumer(pa, lambda cpu, d: got.append((cpu, d))) as c:
        for cpu in sorted(os.sched_getaffinity(0))[:2]:
            def body(cpu=cpu):
                os.sched_setaffinity(0, {cpu})
                pa.output(b"here", BPF_F_CURRENT_CPU)
            t = threading.Thread(target=body)
            t.start()
            t.join()
        c.poll(100)
    assert sorted(got) == [(cpu, b"here") for cpu in sorted(os.sched_getaffinity(0))[:2]]


def test_perf_consumer_wakes_and_counts_from_other_processes(regions):
    pa = perf(regions, ring=16384)
    count = 5000
    per_producer: dict[int, int] = {}
    bad = []

    def on_sample(cpu, data):
        producer = int.from_bytes(data[0:4], "little")
        seq = int.from_bytes(data[8:16], "little")
        if not 0 <= cpu < NCPU or int.from_bytes(data[4:8], "little") != len(data):
            bad.append(data)
        per_producer[producer] = per_producer.get(producer, 0) + 1
        return None

    c = PerfBufferConsumer(pa, on_sample)
    stop = threading.Event()
    received = [0]

    def consume():
        while not stop.is_set():
            received[0] += c.poll(50)
        received[0] += c.consume()

    th = threading.Thread(target=consume)
    th.start()
    code = f"""
from hybrid.user.maps import Region, lib
r = Region.open({pa.region.name!r})
print(lib.hybrid_test_ring_produce(r["events"]._p(), {{p}}, {count}, 32, 0))
"""
    procs = [subprocess.Popen([sys.executable, "-c", code.replace("{p}", str(p))], stdout=subprocess.PIPE, text=True)
             for p in (1, 2)]
    failed = [int(p.communicate(timeout=60)[0]) for p in procs]
    stop.set()
    th.join(30)
    c.close()
    assert not bad and min(failed) >= 0
    assert received[0] + sum(failed) == 2 * count
    assert c.lost == sum(failed)
    assert sum(per_producer.values()) == received[0]


def test_perf_wait_wakes_a_sleeping_consumer(regions):
    pa = perf(regions)
    got = []
    with PerfBufferConsumer(pa, lambda cpu, d: got.append(d)) as c:
        th, res = poll_in_thread(c, 10_000)
        time.sleep(0.1)
        pa.output(b"wake", NCPU - 1)
        th.join(5)
        assert res["n"] == 1 and res["t"] < 1 and got == [b"wake"]
