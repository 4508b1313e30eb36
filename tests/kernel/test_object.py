"""KernelObject: loading, global data, attaching by section, sharing and pinning maps."""

from __future__ import annotations

import errno
import os
import uuid

import pytest

from hybrid.errors import KernelError, MapError
from hybrid.kernel import KernelMap, KernelObject
from hybrid.kernel.maps import BPF_MAP_TYPE_ARRAY

from .conftest import key, rodata, u64


def count(obj, slot: int) -> int:
    return u64(obj.maps["counts"][key(slot)])


def test_tracepoint_counts_exact_getppid_calls(counters_obj):
    with KernelObject(counters_obj, programs={"tp_getppid"}, initial={".rodata": rodata()}) as obj:
        assert set(obj.programs) == {"tp_getppid"}
        prog = obj.programs["tp_getppid"]
        assert prog.section == "tracepoint/syscalls/sys_enter_getppid"
        assert prog.fd >= 0 and prog.id > 0 and prog.type_name == "tracepoint"
        link = obj.attach("tp_getppid")
        assert "syscalls:sys_enter_getppid" in link.target
        for _ in range(37):
            os.getppid()
        assert count(obj, 0) == 37
        link.close()
        link.close()  # idempotent
        os.getppid()
        assert count(obj, 0) == 37
        assert obj.links == []


def test_raw_tracepoint_counts_exact_syscalls(counters_obj):
    with KernelObject(counters_obj, programs={"raw_enter"}, initial={".rodata": rodata()}) as obj:
        obj.attach()  # the only loaded program
        for _ in range(100):
            os.getppid()
        assert count(obj, 1) == 100


def test_rodata_by_libbpf_name_filters_by_pid(counters_obj):
    with KernelObject(counters_obj) as probe:
        internal = [n for n in probe.maps if n.endswith(".rodata")]
    assert internal == ["counters.rodata"]
    other = rodata(pid=1)  # init: never ours
    with KernelObject(counters_obj, initial={"counters.rodata": other}) as obj:
        assert obj.map(".rodata").lookup(key(0)) == other
        obj.attach_all()
        for _ in range(10):
            os.getppid()
        assert count(obj, 0) == count(obj, 1) == 0


def test_shorter_initial_value_keeps_the_rest(counters_obj):
    with KernelObject(counters_obj, programs={"raw_enter"}, initial={".rodata": rodata()[:4]}) as obj:
        assert obj.map(".rodata").lookup(key(0)) == rodata()[:4] + bytes(4)  # nr stays 0


def test_attach_all_and_close_detaches(counters_obj):
    obj = KernelObject(counters_obj, initial={".rodata": rodata()})
    links = obj.attach_all()
    assert sorted(link.program for link in links) == ["raw_enter", "tp_getppid"]
    for _ in range(5):
        os.getppid()
    counts = obj.maps["counts"]
    assert [count(obj, 0), count(obj, 1)] == [5, 5]
    obj.close()
    obj.close()  # idempotent
    assert all(link.closed for link in links)
    with pytest.raises(MapError, match="closed"):
        counts.lookup(key(0))
    with pytest.raises(KernelError, match="closed"):
        obj.attach("raw_enter")


def test_reuse_fd_shares_a_map_between_objects(counters_obj):
    with KernelMap.create(BPF_MAP_TYPE_ARRAY, 4, 8, 4, name="shared") as shared:
        with KernelObject(counters_obj, programs={"tp_getppid"}, initial={".rodata": rodata()},
                          reuse={"counts": shared}) as a, \
                KernelObject(counters_obj, programs={"raw_enter"}, initial={".rodata": rodata()},
                             reuse={"counts": shared.fd}) as b:
            assert a.maps["counts"].id == b.maps["counts"].id == shared.id
            a.attach()
            b.attach()
            for _ in range(12):
                os.getppid()
        assert [u64(shared[key(0)]), u64(shared[key(1)])] == [12, 12]


def test_map_flags_make_an_array_mmapable(counters_obj):
    with KernelObject(counters_obj, programs={"raw_enter"}, map_flags={"counts": 1 << 10},
                      initial={".rodata": rodata()}) as obj:
        counts = obj.maps["counts"]
        assert counts.flags & (1 << 10)
        view = counts.mmap()
        obj.attach()
        for _ in range(3):
            os.getppid()
        assert u64(view[8:16]) == 3  # value 1, written by the program, read through the mapping
        view.release()


def test_unknown_program_or_map_names(counters_obj):
    with pytest.raises(KernelError, match=r"no program 'nope' \(programs: tp_getppid, raw_enter\)"):
        KernelObject(counters_obj, programs={"nope"})
    with pytest.raises(KernelError, match="no map 'nope'"):
        KernelObject(counters_obj, initial={"nope": b""})
    with pytest.raises(KernelError, match="9 bytes, the map's value is 8 bytes"):
        KernelObject(counters_obj, initial={".rodata": bytes(9)})
    with KernelObject(counters_obj, programs={"raw_enter"}) as obj:
        with pytest.raises(KernelError, match="'tp_getppid' was not loaded"):
            obj.attach("tp_getppid")


PINNED = r"""
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 8);
    __type(key, __u32);
    __type(value, __u64);
    __uint(pinning, LIBBPF_PIN_BY_NAME);
} pinned_counts SEC(".maps");
SEC("raw_tp/sys_enter")
int touch(void *ctx)
{
    __u32 k = 1;
    __u64 one = 1;
    bpf_map_update_elem(&pinned_counts, &k, &one, BPF_NOEXIST);
    return 0;
}
char LICENSE[] SEC("license") = "GPL";
"""


def test_pin_root_on_bpffs(bpf_build):
    from hybrid.kernel import features

    if not features.has("bpffs"):
        pytest.skip("no bpffs at /sys/fs/bpf: %s" % features.check("bpffs").detail)
    obj_path = bpf_build.source("pinned", PINNED)
    root = "/sys/fs/bpf/hybrid-test-%s" % uuid.uuid4().hex[:8]
    os.mkdir(root)
    try:
        with KernelObject(obj_path, pin_root=root) as obj:
            obj.maps["pinned_counts"][key(7)] = (7).to_bytes(8, "little")
            assert os.path.exists(root + "/pinned_counts")
            with KernelMap.from_pin(root + "/pinned_counts") as m:
                assert m.id == obj.maps["pinned_counts"].id
                assert u64(m[key(7)]) == 7
        with KernelObject(obj_path, pin_root=root) as again:  # reuses the pinned map
            assert u64(again.maps["pinned_counts"][key(7)]) == 7
    finally:
        for f in os.listdir(root):
            os.unlink(os.path.join(root, f))
        os.rmdir(root)


def test_pinned_map_on_a_non_bpffs_pin_root(bpf_build, tmp_path):
    from .conftest import open_fds

    obj_path = bpf_build.source("pinned", PINNED)
    before = open_fds()
    with pytest.raises(KernelError) as ei:
        KernelObject(obj_path, pin_root=tmp_path)
    msg = str(ei.value)
    assert "is not on a bpf filesystem" in msg and "bpffs is not mounted there" in msg
    assert "mount -t bpf bpf %s" % tmp_path in msg
    assert ei.value.errno == errno.EINVAL
    assert open_fds() == before


def test_a_whole_lifecycle_leaves_no_fd(counters_obj, events_obj):
    from .conftest import open_fds

    with KernelObject(counters_obj, programs={"raw_enter"}):  # warm libbpf's one-time probes
        pass
    before = open_fds()
    with KernelObject(events_obj, initial={".rodata": rodata()}) as obj:
        obj.attach_all()
        rb = obj.ring_buffer("rb", lambda data: None)
        obj.perf_buffer("pb", lambda cpu, data: None)
        obj.user_ring_buffer("urb").send(bytes(8))
        os.getppid()
        rb.poll(100)
        view = obj.maps["sums"]
        assert view.lookup(key(0)) is not None
    assert open_fds() == before


def test_from_pin_of_a_program_is_refused(counters_obj):
    from hybrid.kernel import libbpf

    from .conftest import open_fds

    path = "/sys/fs/bpf/hybrid-test-%s" % uuid.uuid4().hex[:8]
    with KernelObject(counters_obj, programs={"raw_enter"}) as obj:
        assert libbpf.lib().bpf_obj_pin(obj.programs["raw_enter"].fd, path.encode()) == 0
    try:
        before = open_fds()
        with pytest.raises(MapError, match="not a bpf map .*bpf-prog"):
            KernelMap.from_pin(path)
        assert open_fds() == before
    finally:
        os.unlink(path)


def test_maps_option_creates_only_those(events_obj):
    with KernelObject(events_obj, programs={"to_ringbuf"}, maps={"rb", "sums", ".rodata"},
                      initial={".rodata": rodata()}) as obj:
        assert set(obj.maps) == {"rb", "sums", "events.rodata"}
        got = []
        rb = obj.ring_buffer("rb", got.append)
        obj.attach()
        os.getppid()
        assert rb.poll(1000) == 1 and len(got) == 1
        with pytest.raises(KernelError, match="map 'urb' was not created"):
            obj.map("urb")
