"""hybrid.load(): real clang-compiled objects running in the userspace VM on every engine."""

from __future__ import annotations

import struct

import pytest

import hybrid
from hybrid.errors import HybridError
from hybrid.user.maps import RingBufferConsumer

ENGINES = ("interp", "jit", "aot")


def pt_regs(*args: int) -> bytes:
    """A 168-byte x86-64 struct pt_regs with the first arguments in di, si, dx, cx, r8, r9."""
    regs = [0] * 21
    for value, index in zip(args, (14, 13, 12, 11, 9, 8)):  # di si dx cx r8 r9
        regs[index] = value
    return struct.pack("<21Q", *regs)


def u64(v: int) -> bytes:
    return v.to_bytes(8, "little")


@pytest.mark.parametrize("engine", ENGINES)
def test_basic_object_on_every_engine(bpf_build, engine):
    with hybrid.load(bpf_build.obj("run_basic"), values={"multiplier": 3}) as obj:
        assert sorted(obj.programs) == ["count", "tail_target"]
        assert {"counts", "slots", "events", "jumps", ".rodata", ".data", ".bss"} <= set(obj.maps)
        count = obj.programs["count"]
        seen = []
        consumer = RingBufferConsumer(obj.maps["events"], lambda data: seen.append(struct.unpack("<QQ", data)))
        assert count.run(pt_regs(5), engine=engine) == 15  # bpf_loop sum 10 + arg
        assert count.run(pt_regs(5), engine=engine) == 15
        assert count.run(pt_regs(2), engine=engine) == 12
        assert count.run(pt_regs(7), engine=engine) == 1007  # tail call into tail_target
        assert obj.maps["counts"].lookup(u64(5)) == u64(2)
        assert obj.maps["counts"].lookup(u64(2)) == u64(1)
        assert obj.maps["counts"].lookup(u64(9)) is None
        assert obj.maps["slots"].lookup(b"\0\0\0\0") == u64(3 * (5 + 5 + 2 + 7))
        assert obj.maps[".data"].lookup(b"\0\0\0\0") == u64(100 + 19)
        assert obj.maps[".bss"].lookup(b"\0\0\0\0") == u64(4)
        assert consumer.consume() == 4
        assert seen == [(5, 105), (5, 110), (2, 112), (7, 119)]


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(HybridError, match="nope.o"):
        hybrid.load(tmp_path / "nope.o")


def test_unknown_variable(bpf_build):
    with pytest.raises(HybridError, match="no_such_var"):
        hybrid.load(bpf_build.obj("run_basic"), values={"no_such_var": 1})


WRITES_PROG_ARRAY = r"""
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
char LICENSE[] SEC("license") = "GPL";
struct {
    __uint(type, BPF_MAP_TYPE_PROG_ARRAY);
    __uint(max_entries, 2);
    __type(key, u32);
    __type(value, u32);
} jumps SEC(".maps");
SEC("uprobe")
int redirect(struct pt_regs *ctx)
{
    u32 k = 0, id = PT_REGS_PARM1(ctx);
    long update = bpf_map_update_elem(&jumps, &k, &id, 0);
    long delete = bpf_map_delete_elem(&jumps, &k);
    return update == -1 && delete == -1;   /* both -EPERM */
}
"""


@pytest.mark.parametrize("engine", ENGINES)
def test_programs_cannot_write_a_prog_array(bpf_build, engine):
    # as the kernel's verifier: a program must not redirect other programs' tail calls
    with hybrid.load(bpf_build.source("writes_prog_array", WRITES_PROG_ARRAY)) as obj:
        assert obj.programs["redirect"].run(pt_regs(obj.program_id("redirect")), engine=engine) == 1
        assert obj.maps["jumps"].lookup(b"\0\0\0\0") is None
