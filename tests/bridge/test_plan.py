"""Placement of programs and roles of maps (hybrid.bridge.plan), on a real clang-compiled object."""

from __future__ import annotations

import pytest

from hybrid.bridge import plan
from hybrid.errors import FeatureError, HybridError
from hybrid.user.elf import load_object_spec

MIXED = r"""
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

struct { __uint(type, BPF_MAP_TYPE_ARRAY); __uint(max_entries, 4); __type(key, __u32); __type(value, __u64); } arr SEC(".maps");
struct { __uint(type, BPF_MAP_TYPE_HASH); __uint(max_entries, 64); __type(key, __u32); __type(value, __u64); } hsh SEC(".maps");
struct { __uint(type, BPF_MAP_TYPE_HASH); __uint(max_entries, 64); __type(key, __u32); __type(value, __u64); } only_user SEC(".maps");
struct { __uint(type, BPF_MAP_TYPE_RINGBUF); __uint(max_entries, 4096); } events SEC(".maps");
struct { __uint(type, BPF_MAP_TYPE_PROG_ARRAY); __uint(max_entries, 4); __type(key, __u32); __type(value, __u32); } jumps SEC(".maps");
__u64 seen;

static void touch(void *m) { __u32 k = 0; __u64 *v = bpf_map_lookup_elem(m, &k); if (v) (*v)++; }

SEC("raw_tp/sched_switch") int kern(void *ctx) { touch(&arr); touch(&hsh); seen++; bpf_ringbuf_output(&events, &seen, 8, 0); return 0; }
SEC("kprobe/do_nanosleep") int kp(void *ctx) { touch(&hsh); return 0; }
SEC("tracepoint/syscalls/sys_enter_getppid") int sys(void *ctx) { touch(&arr); return 0; }
SEC("uprobe/libc.so.6:getpid") int up(void *ctx) { touch(&arr); touch(&hsh); touch(&only_user); seen++;
    bpf_ringbuf_output(&events, &seen, 8, 0); return 0; }
SEC("uprobe/libc.so.6:getuid") int jumper(void *ctx) { bpf_tail_call(ctx, &jumps, 0); return 0; }
char LICENSE[] SEC("license") = "GPL";
"""


def _features(missing=("kprobes", "kretprobes", "fentry", "fexit")):
    return lambda name, p: (name not in missing, "program %r (%s): this kernel has no %s" % (p.name, p.section, name))


@pytest.fixture(scope="module")
def spec(bpf_build):
    return load_object_spec(bpf_build.source("plan_mixed", MIXED))


def test_auto_placement_keeps_userspace_kinds_in_the_vm(spec):
    p = plan.place(spec, None, _features())
    assert p.kernel == {"kern"}
    assert p.user == {"kp", "sys", "up", "jumper"}
    assert "kp" in p.unavailable and "kprobes" in p.unavailable["kp"]


def test_explicit_kernel_placement_and_missing_feature(spec):
    p = plan.place(spec, ["sys", "up"], _features())
    assert p.kernel == {"kern", "sys", "up"}
    with pytest.raises(FeatureError, match=r"program 'kp' \(kprobe/do_nanosleep\): this kernel has no kprobes"):
        plan.place(spec, ["kp"], _features())
    with pytest.raises(HybridError, match="no program 'nope'"):
        plan.place(spec, ["nope"], _features())
    assert plan.place(spec, False, None).kernel == frozenset()
    everything = plan.place(spec, True, _features(missing=()))
    assert everything.kernel == {"kern", "kp", "sys", "up", "jumper"}


def test_map_users_follow_the_code(spec):
    users = plan.map_users(spec)
    assert users["arr"] == {"kern", "sys", "up"}
    assert users["only_user"] == {"up"}
    assert users["jumps"] == {"jumper"}


def test_map_roles(spec):
    p = plan.place(spec, None, _features())
    roles = plan.map_roles(spec, p)
    assert roles["arr"] == "mmap"
    assert roles["hsh"] == "syscall"
    assert roles["only_user"] == "user"
    assert roles["events"] == "rings"
    assert roles["jumps"] == "user"
    assert roles[".bss"] == "mmap"  # `seen`: global data used by both sides
    assert plan.map_roles(spec, p, mirror={"hsh": 0.1})["hsh"] == "mirror"
    with pytest.raises(HybridError, match="only hash, lru_hash and lpm_trie maps can be mirrored"):
        plan.map_roles(spec, p, mirror={"arr": 0.1})
    with pytest.raises(HybridError, match="no map 'nope'"):
        plan.map_roles(spec, p, mirror={"nope": 0.1})


def test_a_prog_array_cannot_cross_sides(spec):
    p = plan.place(spec, ["jumper"], _features())
    assert p.kernel >= {"jumper"}
    roles = plan.map_roles(spec, p)
    assert roles["jumps"] == "kernel"
    p2 = plan.Placement(frozenset({"kern"}), frozenset({"jumper"}))
    # jumps used only by userspace: fine; make the kernel use it too through `share`
    with pytest.raises(HybridError, match="tail call cannot cross"):
        plan.map_roles(spec, p2, shared=["jumps"])
