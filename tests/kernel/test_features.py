"""Feature detection against independent evidence (sysfs, tracefs, the kernel's answers)."""

from __future__ import annotations

import os

import pytest

from hybrid.errors import FeatureError, KernelError
from hybrid.kernel import features as F


def test_summary_lists_every_feature():
    rows = F.summary()
    assert [r.name for r in rows] == list(F.DESCRIPTIONS)
    for name, available, detail in rows:
        assert isinstance(available, bool) and detail, name
    assert F.check("bpf").available


def test_kprobes_match_sysfs_and_tracefs():
    tr = F.tracefs_path()
    evidence = os.path.isdir("/sys/bus/event_source/devices/kprobe") or bool(
        tr and os.path.exists(os.path.join(tr, "kprobe_events")))
    assert F.has("kprobes") == evidence
    assert F.has("kretprobes") == evidence
    if not evidence:
        assert "/sys/bus/event_source/devices/kprobe" in F.check("kprobes").detail


def test_uprobes_match_sysfs():
    tr = F.tracefs_path()
    evidence = os.path.isdir("/sys/bus/event_source/devices/uprobe") or bool(
        tr and os.path.exists(os.path.join(tr, "uprobe_events")))
    assert F.has("uprobes") == evidence


def test_filesystems_match_mounts():
    with open("/proc/self/mounts") as f:
        mounts = {(line.split()[1], line.split()[2]) for line in f}
    assert F.has("bpffs") == (("/sys/fs/bpf", "bpf") in mounts)
    tracefs_mounted = any(t == "tracefs" and d in F.TRACEFS_PATHS for d, t in mounts)
    assert F.has("tracefs") == tracefs_mounted
    assert F.is_bpffs("/sys/fs/bpf") == (("/sys/fs/bpf", "bpf") in mounts)
    assert not F.is_bpffs("/proc")
    assert "mount -t bpf bpf /proc" in F.bpffs_problem("/proc")


def test_tracing_features_match_a_real_load():
    """fentry is what loading a BPF_PROG_TYPE_TRACING program says; the probe is cached."""
    f = F.check("fentry")
    assert "BPF_PROG_TYPE_TRACING" in f.detail
    assert F.check("fentry") is f
    assert F.has("fmod_ret") == f.available


def test_present_on_any_modern_kernel():
    """Kernels >= 6.1 with BPF (this project's floor) have these; each probe really ran."""
    for name in ("tracepoints", "raw_tracepoints", "ringbuf", "user_ringbuf", "mmapable_array", "perf_events"):
        f = F.check(name)
        assert f.available, (name, f.detail)


def test_map_types():
    assert F.map_type(1).available  # hash
    f = F.map_type(40)
    assert not f.available and "40" in f.detail
    with pytest.raises(FeatureError, match="map type 40"):
        F.require_map_type(40, "map 'weird'")


def test_require_names_what_and_alternative():
    if F.has("kprobes"):
        F.require("kprobes", "program 'x' (kprobe/__x64_sys_getppid)")
        pytest.skip("this kernel has kprobes: no error to check")
    with pytest.raises(FeatureError) as ei:
        F.require("kprobes", "program 'x' (kprobe/__x64_sys_getppid)", "__x64_sys_getppid")
    msg = str(ei.value)
    assert msg.startswith("program 'x' (kprobe/__x64_sys_getppid): this kernel has no kprobes")
    assert "CONFIG_KPROBES" in msg
    assert "tracepoint/syscalls/sys_enter_getppid" in msg and "raw_tp/sys_enter" in msg
    with pytest.raises(FeatureError, match="sys_exit_openat"):
        F.require("kretprobes", "program 'y' (kretsyscall/openat)", "openat", syscall=True)


def test_require_fentry_names_alternative():
    if F.has("fentry"):
        pytest.skip("this kernel has fentry")
    with pytest.raises(FeatureError) as ei:
        F.require("fentry", "program 'f' (fentry/vfs_read)", "vfs_read")
    assert "fentry" in str(ei.value) and "raw tracepoint" in str(ei.value)
    assert isinstance(ei.value, KernelError)


def test_unknown_feature():
    with pytest.raises(KeyError, match="unknown kernel feature"):
        F.check("warp_drive")
