"""``obj.attach(programs=[...], targets={name: target})``: a program attached where the caller says, not where
its section says; one bare ``SEC("uprobe")`` program at several places, each attach its own placements."""

from __future__ import annotations

import ctypes
import subprocess

import pytest

import hybrid
from hybrid.errors import AttachError
from hybrid.user.elf import UprobeTarget

LIB_C = r"""
__attribute__((noinline)) long t_a(long x) { __asm__ volatile("" : "+r"(x)); return x + 1; }
__attribute__((noinline)) long t_b(long x) { __asm__ volatile("" : "+r"(x)); return x * 3; }
"""

PROG = r"""
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

char LICENSE[] SEC("license") = "GPL";

struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 2);
    __type(key, u32);
    __type(value, u64);
} counts SEC(".maps");

SEC("uprobe")
int BPF_KPROBE(count, long x)
{
    u32 k = 0;
    u64 *p = bpf_map_lookup_elem(&counts, &k);
    if (p)
        __sync_fetch_and_add(p, 1);
    k = 1;
    p = bpf_map_lookup_elem(&counts, &k);
    if (p)
        __sync_fetch_and_add(p, x);
    return 0;
}
"""


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    d = tmp_path_factory.mktemp("targets")
    src, so = d / "libtargets.c", d / "libtargets.so"
    src.write_text(LIB_C)
    subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", str(so), str(src)], check=True)
    h = ctypes.CDLL(str(so))
    for f in (h.t_a, h.t_b):
        f.restype, f.argtypes = ctypes.c_long, [ctypes.c_long]
    return str(so), h


def counts(obj) -> list[int]:
    m = obj.maps["counts"]
    return [int.from_bytes(m.lookup(i.to_bytes(4, "little")), "little") for i in range(2)]


def test_one_bare_program_at_two_places(bpf_build, lib):
    so, h = lib
    with hybrid.load(bpf_build.source("targets", PROG)) as obj:
        with pytest.raises(AttachError, match="no attach target"):
            obj.attach(programs=["count"])
        a = obj.attach(programs=["count"], targets={"count": "uprobe/%s:t_a" % so})
        b = obj.attach(programs=["count"], targets={"count": UprobeTarget(so, "t_b")})
        assert [p.kind for p in a.placements + b.placements] == ["uprobe", "uprobe"]
        assert "t_a" in a.placements[0].where and "t_b" in b.placements[0].where
        for i in range(3):
            assert h.t_a(i) == i + 1
        for i in range(4):
            assert h.t_b(10) == 30
        assert counts(obj) == [7, 0 + 1 + 2 + 40]
        assert (a.hits(), b.hits()) == (3, 4)
        a.detach()
        h.t_a(5)
        h.t_b(1)
        assert counts(obj) == [8, 44]
        b.detach()
        # a uretprobe at an explicit target: x is the return value's register there (rax)... any value: count it
        r = obj.attach(programs=["count"], targets={"count": "uretprobe/%s:t_a" % so})
        assert r.placements[0].kind == "uretprobe"
        h.t_a(1)
        assert r.hits() == 1 and counts(obj)[0] == 9
        r.detach()


def test_bad_targets(bpf_build, lib):
    so, _ = lib
    with hybrid.load(bpf_build.source("targets", PROG)) as obj:
        with pytest.raises(AttachError, match="has no program 'nope'"):
            obj.attach(programs=["count"], targets={"nope": "uprobe/%s:t_a" % so})
        with pytest.raises(AttachError, match="targets: 'uprobe/x' for program 'count'"):
            obj.attach(programs=["count"], targets={"count": "uprobe/x"})
        with pytest.raises(AttachError, match="no_such_function"):
            obj.attach(programs=["count"], targets={"count": "uprobe/%s:no_such_function" % so})
        # nothing was left attached: a call counts nothing
        lib[1].t_a(1)
        assert counts(obj) == [0, 0]


def test_the_agents_own_calls_are_not_hits(bpf_build, lib):
    """A probe on a libc function the agent itself calls while it applies a spec (strtoull parses every
    number of it): placing more probes runs nothing there, only the process's own calls count."""
    so, h = lib
    libc = ctypes.CDLL("libc.so.6")
    libc.strtoull.restype, libc.strtoull.argtypes = ctypes.c_ulonglong, [ctypes.c_char_p, ctypes.c_void_p,
                                                                        ctypes.c_int]
    with hybrid.load(bpf_build.source("targets", PROG)) as obj:
        a = obj.attach(programs=["count"], targets={"count": "uprobe/libc.so.6:strtoull"})
        before = counts(obj)[0]
        more = [obj.attach(programs=["count"], targets={"count": "uprobe/%s:%s" % (so, f)}) for f in ("t_a", "t_b")]
        assert counts(obj)[0] == before  # the agent parsed two specs full of numbers
        for s in (b"1", b"22", b"333"):
            libc.strtoull(s, None, 10)
        assert counts(obj)[0] == before + 3
        for att in more + [a]:
            att.detach()
