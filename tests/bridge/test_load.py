"""hybrid.load of one object with kernel and userspace programs: the maps both use are shared.

The kernel program runs on ``raw_tp/task_rename``, which fires exactly once
per ``prctl(PR_SET_NAME)`` of the renaming thread, so the test makes it run
a known number of times; the userspace program is run by the VM
(``program.run``), so every count is exact on both sides.
"""

from __future__ import annotations

import ctypes
import os
import struct
import subprocess
import sys
import threading

import pytest

import hybrid
from hybrid.errors import FeatureError, HybridError, KernelError

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="loading kernel programs needs root")

SOURCE = r"""
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

struct { __uint(type, BPF_MAP_TYPE_ARRAY); __uint(max_entries, 8); __type(key, __u32); __type(value, __u64); } arr SEC(".maps");
struct { __uint(type, BPF_MAP_TYPE_HASH); __uint(max_entries, 64); __type(key, __u32); __type(value, __u64); } hsh SEC(".maps");
struct { __uint(type, BPF_MAP_TYPE_HASH); __uint(max_entries, 64); __type(key, __u32); __type(value, __u64); } hot SEC(".maps");
struct { __uint(type, BPF_MAP_TYPE_RINGBUF); __uint(max_entries, 4096); } events SEC(".maps");
struct { __uint(type, BPF_MAP_TYPE_USER_RINGBUF); __uint(max_entries, 4096); } to_kernel SEC(".maps");
struct { __uint(type, BPF_MAP_TYPE_HASH); __uint(max_entries, 8); __type(key, __u32); __type(value, __u64); } kernel_only SEC(".maps");

const volatile __u32 target_tgid = 0;
__u64 renames;       /* .bss, written by the kernel program, read by both */

static void add(void *map, __u32 k, __u64 n)
{
    __u64 *v = bpf_map_lookup_elem(map, &k);
    if (v)
        __sync_fetch_and_add(v, n);
    else
        bpf_map_update_elem(map, &k, &n, BPF_NOEXIST);
}

static long drained(struct bpf_dynptr *d, void *ctx)
{
    __u64 v = 0;
    if (bpf_dynptr_read(&v, sizeof(v), d, 0, 0))
        return 1;
    add(&arr, 2, v);
    add(&arr, 3, 1);
    return 0;
}

SEC("raw_tp/task_rename")
int on_rename(void *ctx)
{
    if (bpf_get_current_pid_tgid() >> 32 != target_tgid)
        return 0;
    renames++;
    add(&arr, 0, 1);
    add(&hsh, 1, 1);
    add(&hot, 1, 1);
    add(&kernel_only, 7, 1);
    __u64 rec = 1000 + renames;
    bpf_ringbuf_output(&events, &rec, sizeof(rec), 0);
    bpf_user_ringbuf_drain(&to_kernel, drained, NULL, 0);
    __u32 k1 = 1, k4 = 4;
    __u64 *user_count = bpf_map_lookup_elem(&arr, &k1);   /* what userspace wrote, read by the kernel */
    if (user_count)
        bpf_map_update_elem(&arr, &k4, user_count, BPF_ANY);
    return 0;
}

SEC("uprobe")
int user_side(void *ctx)
{
    add(&arr, 1, 1);
    add(&hsh, 2, 1);
    add(&hot, 2, 1);
    __u64 rec = 2000 + renames;
    bpf_ringbuf_output(&events, &rec, sizeof(rec), 0);
    __u64 v = 5;
    bpf_ringbuf_output(&to_kernel, &v, sizeof(v), 0);
    return target_tgid;
}

char LICENSE[] SEC("license") = "GPL";
"""

PR_SET_NAME = 15
_libc = ctypes.CDLL(None, use_errno=True)


def rename(times: int) -> None:
    """Make raw_tp/task_rename fire ``times`` times, in a thread of this process made for it (so the
    test process keeps its own name)."""
    errors = []

    def renamer():
        for i in range(times):
            if _libc.prctl(PR_SET_NAME, b"renamer%d" % (i % 10), 0, 0, 0):
                errors.append(OSError(ctypes.get_errno(), "prctl"))
                return

    t = threading.Thread(target=renamer)
    t.start()
    t.join()
    if errors:
        raise errors[0]


def u32(v):
    return struct.pack("<I", v)


def u64_of(b) -> int:
    return struct.unpack("<Q", bytes(b)[:8])[0]


@pytest.fixture(scope="module")
def obj_path(bpf_build):
    return bpf_build.source("bridge_mixed", SOURCE)


def open_fds() -> set[str]:
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.add(os.readlink("/proc/self/fd/%s" % fd))
        except OSError:
            pass
    return {t for t in out if "bpf" in t}


def shm_regions() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith("hybrid.%d." % os.getpid())}


@pytest.mark.parametrize("engine", ["interp", "jit", "aot"])
def test_both_sides_share_arrays_hashes_globals_and_rings(obj_path, engine):
    pid = os.getpid()
    with hybrid.load(obj_path, values={"target_tgid": pid}) as obj:
        assert obj.kernel is not None and set(obj.kernel.programs) == {"on_rename"}
        assert set(obj.programs) == {"user_side"}
        assert obj.maps["arr"].bridge == "mmap" and obj.maps["hsh"].bridge == "syscall"
        seen = []
        with obj.ring_buffer("events", lambda data: seen.append(u64_of(data))) as rb:
            obj.attach_kernel()
            rename(7)
            user = obj.programs["user_side"]
            for _ in range(5):
                assert user.run(bytes(168), engine=engine) == pid  # .rodata set on the VM side too
            obj.sync()  # forward now what userspace wrote for the kernel (the forwarder does it every 10 ms)
            rename(1)  # the kernel program drains the 5 records from its user ring buffer
            deadline = 50
            while len(seen) < 13 and deadline:
                rb.poll(100)
                deadline -= 1
        k = obj.kernel.maps
        # the array: kernel's writes seen by userspace at memory speed, and the reverse
        assert u64_of(obj.maps["arr"].lookup(u32(0))) == 8 == u64_of(k["arr"].lookup(u32(0)))
        assert u64_of(k["arr"].lookup(u32(1))) == 5
        # the hash through bpf(): both keys on both views
        assert u64_of(obj.maps["hsh"].lookup(u32(1))) == 8 and u64_of(obj.maps["hsh"].lookup(u32(2))) == 5
        assert u64_of(k["hsh"].lookup(u32(2))) == 5
        # global data written by the kernel, read through the region
        assert u64_of(obj.maps[".bss"].lookup(u32(0))[:8]) == 8
        # userspace -> kernel user ring buffer -> drained by the kernel program
        assert u64_of(k["arr"].lookup(u32(3))) == 5 and u64_of(k["arr"].lookup(u32(2))) == 25
        # the kernel program read what the userspace program wrote into the shared array
        assert u64_of(k["arr"].lookup(u32(4))) == 5
        # one consumer, both rings: kernel records 1001..1008, userspace records 2007 x5
        assert sorted(seen) == sorted([*range(1001, 1009), *[2007] * 5])
        assert u64_of(obj.maps["kernel_only"].lookup(u32(7))) == 8


def test_mirror_syncs_in_batches_and_leaves_kernel_keys_alone(obj_path):
    with hybrid.load(obj_path, values={"target_tgid": os.getpid()}, mirror={"hot": 0}) as obj:
        obj.attach_kernel()
        rename(3)
        user = obj.programs["user_side"]
        for _ in range(4):
            user.run(bytes(168))
        kernel_hot = obj.kernel.maps["hot"]
        assert obj.maps["hot"] is not obj.region["hot"]  # obj.maps: the kernel's (complete) view
        assert u64_of(obj.region["hot"].lookup(u32(2))) == 4
        assert kernel_hot.lookup(u32(2)) is None  # not synced yet: interval 0 means only on sync()
        obj.sync()
        assert u64_of(kernel_hot.lookup(u32(2))) == 4
        assert u64_of(kernel_hot.lookup(u32(1))) == 3  # the kernel's own key, untouched by the push
        obj.region["hot"].delete(u32(2))
        obj.sync()
        assert kernel_hot.lookup(u32(2)) is None and u64_of(kernel_hot.lookup(u32(1))) == 3


def test_mirror_thread_syncs_within_its_interval(obj_path):
    import time

    with hybrid.load(obj_path, values={"target_tgid": os.getpid()}, mirror={"hot": 0.02}) as obj:
        obj.programs["user_side"].run(bytes(168))
        kernel_hot = obj.kernel.maps["hot"]
        deadline = time.monotonic() + 2
        while kernel_hot.lookup(u32(2)) is None and time.monotonic() < deadline:
            time.sleep(0.005)
        assert u64_of(kernel_hot.lookup(u32(2))) == 1
        obj.programs["user_side"].run(bytes(168))
    # close() made a final sync: nothing written before it was lost (checked through the mirror object)


def test_concurrent_updates_from_both_sides(obj_path):
    """Kernel increments (renames in one thread) and userspace increments (JIT runs in others) on one array."""
    with hybrid.load(obj_path, values={"target_tgid": os.getpid()}) as obj:
        obj.attach_kernel()
        user = obj.programs["user_side"]
        user.engine("jit")

        def runs():
            for _ in range(2000):
                user.run(bytes(168))

        threads = [threading.Thread(target=runs) for _ in range(2)]
        for t in threads:
            t.start()
        rename(3000)
        for t in threads:
            t.join()
        k = obj.kernel.maps["arr"]
        assert u64_of(k.lookup(u32(0))) == 3000 and u64_of(k.lookup(u32(1))) == 4000


def test_vm_only_and_kernel_everywhere(obj_path):
    with pytest.raises(HybridError, match="to_kernel.*user_ringbuf"):  # a kernel-only map type: no VM twin
        hybrid.load(obj_path, kernel=False)
    # everything in the kernel: the kernel refuses userspace's write into its user ring buffer, and says so
    before, regions = open_fds(), shm_regions()
    with pytest.raises(KernelError, match=r"(?s)program 'user_side' \(uprobe\).*map_type 31"):
        hybrid.load(obj_path, kernel=True)
    assert open_fds() == before and shm_regions() == regions


def test_feature_missing_is_named_with_the_alternative(bpf_build):
    from hybrid.kernel import features

    if features.has("kprobes"):
        pytest.skip("this kernel has kprobes")
    path = bpf_build.source("bridge_kprobe", r"""
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
SEC("kprobe/do_sys_openat2") int open_probe(void *ctx) { return 0; }
SEC("raw_tp/task_rename") int other(void *ctx) { return 0; }
char LICENSE[] SEC("license") = "GPL";
""")
    before, regions = open_fds(), shm_regions()
    with pytest.raises(FeatureError, match=r"(?s)open_probe.*kprobe.*(tracepoint|raw_tp)"):
        hybrid.load(path, kernel=["open_probe"])
    assert open_fds() == before and shm_regions() == regions
    with hybrid.load(path) as obj:  # automatic placement: the kprobe stays in the VM, attaching it says why
        assert set(obj.kernel.programs) == {"other"} and "open_probe" in obj.programs
        with pytest.raises(FeatureError, match="kprobe"):
            obj.attach(programs=["open_probe"])


def test_kernel_refusal_leaves_nothing_behind(bpf_build):
    path = bpf_build.source("bridge_refused", r"""
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
struct { __uint(type, BPF_MAP_TYPE_HASH); __uint(max_entries, 1); __type(key, __u32); __type(value, __u64); } arr SEC(".maps");
SEC("raw_tp/task_rename") int bad(void *ctx) { __u32 k = 0; __u64 *v = bpf_map_lookup_elem(&arr, &k); *v = 1; return 0; }
SEC("uprobe") int user(void *ctx) { __u32 k = 0; __u64 *v = bpf_map_lookup_elem(&arr, &k); if (v) *v = 2; return 0; }
char LICENSE[] SEC("license") = "GPL";
""")
    before, regions = open_fds(), shm_regions()
    with pytest.raises(KernelError, match=r"(?s)bad.*(invalid mem access|null)"):
        hybrid.load(path)
    assert open_fds() == before and shm_regions() == regions


def test_unknown_map_type_is_a_clear_error(bpf_build):
    path = bpf_build.source("bridge_maptype", r"""
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
struct { __uint(type, 40); __uint(max_entries, 1); __type(key, __u32); __type(value, __u64); } odd SEC(".maps");
SEC("raw_tp/task_rename") int k(void *ctx) { __u32 key = 0; bpf_map_lookup_elem(&odd, &key); return 0; }
char LICENSE[] SEC("license") = "GPL";
""")
    before, regions = open_fds(), shm_regions()
    with pytest.raises(HybridError, match=r"(?s)odd.*(type 40|map type)"):
        hybrid.load(path)
    assert open_fds() == before and shm_regions() == regions


def test_not_root_is_a_clear_error(obj_path):
    import shutil
    import tempfile

    d = tempfile.mkdtemp(prefix="hybrid-nobody-")  # pytest's tmp_path is not reachable by nobody
    try:
        obj = os.path.join(d, "mixed.bpf.o")
        shutil.copy(obj_path, obj)
        os.chmod(d, 0o755)
        os.chmod(obj, 0o644)
        # everything imported before dropping root: nobody cannot read this Python's standard library
        code = ("import os, sys, threading, dataclasses, logging, ctypes, struct, errno, weakref, hybrid, "
                "hybrid.errors\n"
                "import hybrid.bridge.loader, hybrid.bridge.plan, hybrid.kernel.features, hybrid.kernel.object\n"
                "import hybrid.kernel.libbpf, hybrid.user.elf, hybrid.user.object, hybrid.user.maps, hybrid.user.btf\n"
                "import hybrid.user.core, hybrid.user.verifier, hybrid.user.program, hybrid.user.engine\n"
                "hybrid.user.elf.load_object_spec(sys.argv[1])  # imports what parsing needs\n"
                "os.setgid(65534); os.setuid(65534)\n"
                "try:\n    hybrid.load(sys.argv[1])\n"
                "except hybrid.errors.HybridError as e:\n    print(type(e).__name__, e); sys.exit(3)\n")
        r = subprocess.run([sys.executable, "-c", code, obj], capture_output=True, text=True, timeout=120,
                           env=dict(os.environ, HOME=d), cwd=d)
    finally:
        shutil.rmtree(d)
    assert r.returncode == 3, (r.stdout, r.stderr)
    assert r.stdout.startswith("KernelError") and "needs root" in r.stdout, r.stdout
    assert "on_rename" in r.stdout, r.stdout  # names the program that needed the kernel


PERF = r"""
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
struct { __uint(type, BPF_MAP_TYPE_PERF_EVENT_ARRAY); __uint(key_size, 4); __uint(value_size, 4); } out SEC(".maps");
const volatile __u32 target_tgid = 0;
SEC("raw_tp/task_rename") int kern(void *ctx)
{
    if (bpf_get_current_pid_tgid() >> 32 != target_tgid)
        return 0;
    __u64 v = 1;
    bpf_perf_event_output(ctx, &out, BPF_F_CURRENT_CPU, &v, sizeof(v));
    return 0;
}
SEC("uprobe") int user(void *ctx)
{
    __u64 v = 2;
    bpf_perf_event_output(ctx, &out, BPF_F_CURRENT_CPU, &v, sizeof(v));
    return 0;
}
char LICENSE[] SEC("license") = "GPL";
"""


def test_perf_buffer_of_both_sides(bpf_build):
    path = bpf_build.source("bridge_perf", PERF)
    with hybrid.load(path, values={"target_tgid": os.getpid()}) as obj:
        got = []
        with obj.perf_buffer("out", lambda cpu, data: got.append(u64_of(data))) as pb:
            obj.attach_kernel()
            rename(4)
            for _ in range(3):
                obj.programs["user"].run(bytes(168))
            for _ in range(50):
                if len(got) >= 7:
                    break
                pb.poll(100)
        assert sorted(got) == [1, 1, 1, 1, 2, 2, 2]


def test_pin_root_not_on_bpffs_leaves_nothing_behind(bpf_build, tmp_path):
    path = bpf_build.source("bridge_pinned", r"""
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
struct { __uint(type, BPF_MAP_TYPE_HASH); __uint(max_entries, 4); __type(key, __u32); __type(value, __u64);
         __uint(pinning, LIBBPF_PIN_BY_NAME); } pinned SEC(".maps");
SEC("raw_tp/task_rename") int k(void *ctx) { __u32 key = 0; bpf_map_lookup_elem(&pinned, &key); return 0; }
SEC("uprobe") int u(void *ctx) { __u32 key = 0; bpf_map_lookup_elem(&pinned, &key); return 0; }
char LICENSE[] SEC("license") = "GPL";
""")
    before, regions = open_fds(), shm_regions()
    with pytest.raises(KernelError, match=r"not on a bpf filesystem.*mount -t bpf"):
        hybrid.load(path, pin_root=str(tmp_path))
    assert open_fds() == before and shm_regions() == regions
    assert list(tmp_path.iterdir()) == []
