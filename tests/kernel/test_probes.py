"""Kernel uprobes, uretprobes, USDT and perf event programs on a real process."""

from __future__ import annotations

import time

import pytest

from hybrid.errors import KernelError
from hybrid.kernel import KernelObject, features

from .conftest import key, u64


def hits(obj, slot: int) -> int:
    return u64(obj.maps["hits"][key(slot)])


def tri(n: int) -> int:
    """sum(work_add(i, 1) for i < n)"""
    return n * (n + 1) // 2


def test_uprobe_and_uretprobe_exact_counts(probes_obj, workload, running):
    w, other = running(), running()
    with KernelObject(probes_obj, programs={"up_entry", "up_return"}) as obj:
        obj.attach("up_entry", binary=workload, func="work_add", pid=w.pid)
        obj.attach("up_return", binary=str(workload), func="work_add", pid=w.pid)
        assert w.run("add", 250) == tri(250)
        assert other.run("add", 30) == tri(30)  # filtered out by pid
        assert (hits(obj, 0), hits(obj, 1), hits(obj, 2)) == (250, 250, tri(250))


def test_uprobe_by_offset(probes_obj, workload, running):
    from hybrid.user.attach.symbols import resolve_symbol

    offset = resolve_symbol(str(workload), "work_add").file_offset
    w = running()
    with KernelObject(probes_obj, programs={"up_entry"}) as obj:
        link = obj.attach(binary=workload, offset=offset, pid=w.pid)
        assert "+%#x" % offset in link.target
        w.run("add", 10)
        link.close()
        w.run("add", 10)
        assert hits(obj, 0) == 10


def test_named_uprobe_section_and_attach_all(probes_obj, running):
    w = running()
    with KernelObject(probes_obj) as obj:
        links = obj.attach_all(pid=w.pid)  # only up_named names its target
        assert [link.program for link in links] == ["up_named"]
        w.run("add", 17)
        assert hits(obj, 6) == 17 and hits(obj, 0) == 0


def test_usdt_probe(probes_obj, workload, running):
    w = running()
    with KernelObject(probes_obj, programs={"usdt_tick"}) as obj:
        obj.attach("usdt_tick", binary=workload, provider="hybridk", probe="tick", pid=w.pid)
        assert w.run("tick", 20) == 20
        assert hits(obj, 3) == 20 and hits(obj, 4) == sum(range(20))


def test_perf_event_sampling(probes_obj):
    if not features.has("perf_events"):
        pytest.skip(features.check("perf_events").detail)
    with KernelObject(probes_obj, programs={"on_sample"}) as obj:
        link = obj.attach("on_sample", frequency=1000)
        assert "cpus" in link.target
        end = time.monotonic() + 0.3
        while time.monotonic() < end:
            pass
        link.close()
        n = hits(obj, 5)
        assert n > 0
        time.sleep(0.05)
        assert hits(obj, 5) == n  # detached on every CPU


def test_uprobe_without_target(probes_obj):
    with KernelObject(probes_obj, programs={"up_entry"}) as obj:
        with pytest.raises(KernelError, match=r"no uprobe target.*binary="):
            obj.attach("up_entry")
        with pytest.raises(KernelError, match=r"program 'up_entry' \(uprobe\): attach to uprobe .*no_such_fn"):
            obj.attach("up_entry", binary="/bin/true", func="no_such_fn")
