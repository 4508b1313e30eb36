"""A bcc tool's tables bridged by fd: the maps a bcc program created are the maps of a userspace program.

The bcc program counts getppid() calls of this process in the kernel; the
userspace program (a clang-compiled object run by the VM) adds to the same
tables through ``hybrid.load(path, share={name: table})``.  Both sides see
each other's counts exactly.
"""

from __future__ import annotations

import os
import struct

import pytest

import hybrid

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="bcc and kernel maps need root")
bcc = pytest.importorskip("bcc", reason="bcc (python3-bpfcc) is not importable: run `make setup`")

BCC_TEXT = r"""
BPF_HASH(calls, u32, u64, 64);
BPF_ARRAY(slots, u64, 4);

TRACEPOINT_PROBE(syscalls, sys_enter_getppid)
{
    if ((bpf_get_current_pid_tgid() >> 32) != TGID)
        return 0;
    u32 k = 1;
    calls.increment(k);
    slots.increment(0);
    return 0;
}
"""

USER = r"""
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
struct { __uint(type, BPF_MAP_TYPE_HASH); __uint(max_entries, 64); __type(key, __u32); __type(value, __u64); } calls SEC(".maps");
struct { __uint(type, BPF_MAP_TYPE_ARRAY); __uint(max_entries, 4); __type(key, __u32); __type(value, __u64); } slots SEC(".maps");

SEC("uprobe")
int count(void *ctx)
{
    __u32 k = 2, s = 1;
    __u64 one = 1, *v = bpf_map_lookup_elem(&calls, &k);
    if (v)
        *v += 1;
    else
        bpf_map_update_elem(&calls, &k, &one, BPF_NOEXIST);
    v = bpf_map_lookup_elem(&slots, &s);
    if (v)
        *v += 1;
    k = 1;
    v = bpf_map_lookup_elem(&calls, &k);   /* what the bcc program counted */
    return v ? *v : 0;
}
char LICENSE[] SEC("license") = "GPL";
"""


def u32(v):
    return struct.pack("<I", v)


def value(table, k) -> int:
    leaf = table[table.Key(k)]
    return leaf.value


def test_userspace_program_on_bcc_tables(bpf_build):
    from hybrid.kernel import BccProgram

    path = bpf_build.source("bcc_share", USER)
    with BccProgram(BCC_TEXT, cflags=["-DTGID=%d" % os.getpid()]) as b:
        # (TRACEPOINT_PROBE attaches itself when bcc loads the program)
        for _ in range(6):
            os.getppid()
        calls, slots = b.table("calls"), b.table("slots")
        with hybrid.load(path, share={"calls": calls, "slots": slots}) as obj:
            assert obj.maps["calls"].bridge == "syscall"
            assert obj.maps["slots"].bridge == "syscall"  # bcc's arrays are not BPF_F_MMAPABLE
            for engine in ("interp", "jit", "aot"):
                assert obj.programs["count"].run(bytes(168), engine=engine) == 6  # bcc's count, seen by the VM
            for _ in range(4):
                os.getppid()
            assert obj.programs["count"].run(bytes(168)) == 10
        # bcc's own Python view of its tables has the userspace program's counts
        assert value(b.bpf[b"calls"], 2) == 4 and value(b.bpf[b"calls"], 1) == 10
        assert value(b.bpf[b"slots"], 1) == 4 and value(b.bpf[b"slots"], 0) == 10
        calls.close()
        slots.close()
