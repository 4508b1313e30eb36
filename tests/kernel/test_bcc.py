"""BccProgram: Debian's bcc wrapped, next to libbpf on the same uprobe."""

from __future__ import annotations

import errno
import os

import pytest

from hybrid.errors import FeatureError, KernelError
from hybrid.kernel import KernelMap, KernelObject, features

from .conftest import key, u64

bcc = pytest.importorskip("bcc", reason="bcc (python3-bpfcc) is not importable: run `make setup`")

TEXT = r"""
#include <uapi/linux/ptrace.h>

BPF_ARRAY(counts, u64, 8);

TRACEPOINT_PROBE(syscalls, sys_enter_getppid)
{
    if ((bpf_get_current_pid_tgid() >> 32) != TGID)
        return 0;
    counts.increment(0);
    return 0;
}

int on_add(struct pt_regs *ctx) { counts.increment(1); return 0; }
int on_add_ret(struct pt_regs *ctx) { counts.increment(2); counts.increment(3, PT_REGS_RC(ctx)); return 0; }

int on_raw_exit(struct bpf_raw_tracepoint_args *ctx)
{
    if ((bpf_get_current_pid_tgid() >> 32) == TGID)
        counts.increment(4);
    return 0;
}
"""


@pytest.fixture(scope="module")
def prog():
    from hybrid.kernel import BccProgram

    with BccProgram(TEXT, cflags=["-DTGID=%d" % os.getpid()]) as p:
        yield p


def slot(table: KernelMap, i: int) -> int:
    return u64(table[key(i)])


def test_tracepoint_probe_counts_and_table(prog):
    with prog.table("counts") as counts:
        assert counts.type_name == "array" and counts.max_entries == 8 and counts.name == "counts"
        before = slot(counts, 0)
        for _ in range(25):
            os.getppid()
        assert slot(counts, 0) - before == 25
        ours = {k: u64(v) for k, v in counts.items()}
        theirs = {key(k.value): v.value for k, v in prog.bpf[b"counts"].items()}
        assert ours == theirs
    with pytest.raises(KernelError, match="no table 'nope'"):
        prog.table("nope")


def test_raw_tracepoint_attach(prog):
    with prog.table("counts") as counts:
        prog.attach_raw_tracepoint("sys_exit", "on_raw_exit")
        try:
            before = slot(counts, 4)
            for _ in range(10):
                os.getppid()
            assert slot(counts, 4) - before >= 10  # every syscall exit of this process
        finally:
            prog.bpf.detach_raw_tracepoint(b"sys_exit")


def test_bcc_and_libbpf_uprobes_on_the_same_function(prog, probes_obj, workload, running):
    """The ref_ctr_offset workaround: bcc's and libbpf's uprobes on work_add coexist and both count exactly."""
    w = running()
    with prog.table("counts") as counts, KernelObject(probes_obj, programs={"up_entry", "up_return"}) as obj:
        before = [slot(counts, i) for i in (1, 2, 3)]
        obj.attach("up_entry", binary=workload, func="work_add", pid=w.pid)  # libbpf first
        prog.attach_uprobe(str(workload), "on_add", sym="work_add", pid=w.pid)  # then bcc on the same spot
        prog.attach_uretprobe(str(workload), "on_add_ret", sym="work_add", pid=w.pid)
        obj.attach("up_return", binary=workload, func="work_add", pid=w.pid)  # and libbpf after bcc
        try:
            assert w.run("add", 300) == 300 * 301 // 2
            got = [slot(counts, i) - b for i, b in zip((1, 2, 3), before)]
            assert got == [300, 300, 300 * 301 // 2]
            hits = obj.maps["hits"]
            assert [u64(hits[key(0)]), u64(hits[key(1)]), u64(hits[key(2)])] == [300, 300, 300 * 301 // 2]
            with pytest.raises(KernelError, match="already attached"):
                prog.attach_uprobe(str(workload), "on_add", sym="work_add", pid=w.pid)
        finally:
            prog.bpf.detach_uprobe(name=str(workload).encode(), sym=b"work_add", pid=w.pid)
            prog.bpf.detach_uretprobe(name=str(workload).encode(), sym=b"work_add", pid=w.pid)
        w.run("add", 5)
        assert slot(counts, 1) - before[0] == 300  # detached


def test_uprobe_on_a_missing_symbol(prog, workload):
    with pytest.raises(KernelError, match="could not determine address of symbol no_such_fn"):
        prog.attach_uprobe(str(workload), "on_add", sym="no_such_fn")


def test_kprobe_needs_kprobes(prog):
    if features.has("kprobes"):
        pytest.skip("this kernel has kprobes")
    with pytest.raises(FeatureError, match=r"bcc function on_add \(kprobe __x64_sys_getppid\): this kernel has no "
                                           r"kprobes.*tracepoint/syscalls/sys_enter_getppid"):
        prog.attach_kprobe("__x64_sys_getppid", "on_add")


def test_auto_attached_kprobe_is_refused_before_compiling():
    if features.has("kprobes"):
        pytest.skip("this kernel has kprobes")
    from hybrid.kernel import BccProgram

    with pytest.raises(FeatureError, match=r"bcc function kprobe__do_sys_openat2: this kernel has no kprobes"):
        BccProgram("int kprobe__do_sys_openat2(struct pt_regs *ctx) { return 0; }")


def test_compile_error_is_a_kernel_error():
    from hybrid.kernel import BccProgram

    with pytest.raises(KernelError, match="bcc: compiling/loading the program failed"):
        BccProgram("int broken(struct pt_regs *ctx) { return undefined_thing; }")


def test_why_the_workaround(prog, probes_obj, workload):
    """bcc 0.26's own attach_uprobe passes a garbage ref_ctr_offset: it fails, or a libbpf uprobe on the same
    spot is then refused (EINVAL).  Through BccProgram.attach_uprobe both work (previous test)."""
    path = str(workload).encode()
    try:
        prog.bpf.attach_uprobe(name=path, sym=b"work_add", fn_name=b"on_add")
    except Exception as e:  # noqa: BLE001 - bcc raises bare Exception
        assert "Failed to attach" in str(e)
        return
    try:
        with KernelObject(probes_obj, programs={"up_entry"}) as obj:
            try:
                obj.attach("up_entry", binary=workload, func="work_add")
            except KernelError as e:
                assert e.errno == errno.EINVAL
            else:
                pytest.skip("bcc's attach_uprobe did not pass a conflicting ref_ctr_offset this time")
    finally:
        prog.bpf.detach_uprobe(name=path, sym=b"work_add")
