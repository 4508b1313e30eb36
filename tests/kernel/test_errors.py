"""Error paths: clear messages naming what failed and why, and nothing left open."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import tempfile
from contextlib import contextmanager

import pytest

from hybrid.errors import FeatureError, KernelError
from hybrid.kernel import KernelObject, features

from .conftest import open_fds, rodata

HEADER = '#include "vmlinux.h"\n#include <bpf/bpf_helpers.h>\n#include <bpf/bpf_tracing.h>\n'
LICENSE = '\nchar LICENSE[] SEC("license") = "GPL";\n'
COUNTS = """
struct { __uint(type, BPF_MAP_TYPE_HASH); __uint(max_entries, 1); __type(key, __u32); __type(value, __u64); }
counts SEC(".maps");
"""
GOOD = 'SEC("raw_tp/sys_enter") int fine(void *ctx) { return 0; }\n'


def build(bpf_build, name: str, body: str):
    return bpf_build.source(name, HEADER + body + LICENSE)


@pytest.fixture(autouse=True)
def warm(counters_obj):
    """One successful load first, so libbpf's one-time probes are not counted as leaks."""
    with KernelObject(counters_obj, programs={"raw_enter"}, initial={".rodata": rodata()}):
        pass


@contextmanager
def no_leak():
    before = open_fds()
    yield
    assert open_fds() == before


def test_kprobe_section_is_a_feature_error(bpf_build):
    if features.has("kprobes"):
        pytest.skip("this kernel has kprobes")
    path = build(bpf_build, "kp", COUNTS + GOOD + 'SEC("kprobe/__x64_sys_getppid") int kp(void *ctx) { return 0; }\n')
    with no_leak(), pytest.raises(FeatureError) as ei:
        KernelObject(path)
    msg = str(ei.value)
    assert msg.startswith("program 'kp' (kprobe/__x64_sys_getppid): this kernel has no kprobes"), msg
    assert "CONFIG_KPROBES" in msg
    assert "use a tracepoint (tracepoint/syscalls/sys_enter_getppid) or a raw tracepoint (raw_tp/sys_enter)" in msg
    with KernelObject(path, programs={"fine"}) as obj:  # the rest of the object still loads
        assert set(obj.programs) == {"fine"}


def test_ksyscall_and_kretprobe_sections(bpf_build):
    if features.has("kprobes"):
        pytest.skip("this kernel has kprobes")
    path = build(bpf_build, "ksys", 'SEC("ksyscall/openat") int ks(void *ctx) { return 0; }\n'
                                    'SEC("kretprobe/vfs_read") int kr(void *ctx) { return 0; }\n')
    with no_leak():
        with pytest.raises(FeatureError, match=r"'ks' \(ksyscall/openat\).*tracepoint/syscalls/sys_enter_openat"):
            KernelObject(path, programs={"ks"})
        with pytest.raises(FeatureError, match=r"'kr' \(kretprobe/vfs_read\): this kernel has no kretprobes"):
            KernelObject(path, programs={"kr"})


def test_fentry_section_is_a_feature_error(bpf_build):
    if features.has("fentry"):
        pytest.skip("this kernel has fentry")
    path = build(bpf_build, "fe", 'SEC("fentry/vfs_read") int BPF_PROG(fe) { return 0; }\n'
                                  'SEC("fexit/vfs_read") int BPF_PROG(fx) { return 0; }\n')
    with no_leak(), pytest.raises(FeatureError) as ei:
        KernelObject(path)
    msg = str(ei.value)
    assert "program 'fe' (fentry/vfs_read): this kernel has no fentry programs" in msg
    assert "BPF_PROG_TYPE_TRACING" in msg and "raw tracepoint" in msg


def test_unknown_map_type(bpf_build):
    body = ("struct { __uint(type, 40); __uint(max_entries, 1); __type(key, __u32); __type(value, __u32); }"
            " weird SEC(\".maps\");\n" + GOOD)
    path = build(bpf_build, "weird", body)
    with no_leak(), pytest.raises(FeatureError) as ei:
        KernelObject(path)
    assert "map 'weird'" in str(ei.value) and "map type 40" in str(ei.value)


def test_verifier_refusal_names_the_reason(bpf_build):
    body = COUNTS + GOOD + """
SEC("raw_tp/sys_enter")
int bad(void *ctx)
{
    __u32 k = 0;
    __u64 *v = bpf_map_lookup_elem(&counts, &k);
    *v += 1;  /* no NULL check */
    return 0;
}
"""
    path = build(bpf_build, "bad", body)
    with no_leak(), pytest.raises(KernelError) as ei:
        KernelObject(path)
    msg = str(ei.value)
    assert msg.startswith("program 'bad' (raw_tp/sys_enter): load: [EACCES] the verifier refused it: "), msg
    assert "invalid mem access 'map_value_or_null'" in msg
    assert "verifier log (last lines)" in msg
    assert ei.value.errno == errno.EACCES
    from hybrid.kernel import libbpf

    assert any("map_value_or_null" in ln for ln in libbpf.verifier_log("bad"))
    with KernelObject(path, programs={"fine"}):
        pass


def test_missing_and_malformed_files(tmp_path):
    with no_leak():
        with pytest.raises(KernelError, match="no such file") as ei:
            KernelObject(tmp_path / "nope.bpf.o")
        assert ei.value.errno == errno.ENOENT
        junk = tmp_path / "junk.bpf.o"
        junk.write_bytes(b"\x7fELF not really")
        with pytest.raises(KernelError, match=r"junk.bpf.o: open: \[.*libbpf: .*ELF"):
            KernelObject(junk)
        text = tmp_path / "text.bpf.o"
        text.write_text("hello\n")
        with pytest.raises(KernelError, match="text.bpf.o: open"):
            KernelObject(text)


NOBODY = r"""
import os, sys
from hybrid.errors import KernelError, MapError
from hybrid.kernel import KernelMap, KernelObject, features  # before dropping root: the stdlib may be unreadable
import hybrid.kernel.attach, hybrid.kernel.events, hybrid.kernel.libbpf, hybrid.kernel.maps, hybrid.kernel.object
os.setgid(65534); os.setuid(65534)
print("FEATURE", features.check("bpf").detail)
try:
    KernelMap.create(1, 4, 4, 4, name="x")
except MapError as e:
    print("MAP", e)
try:
    KernelObject(sys.argv[1])
except KernelError as e:
    print("OBJECT", e.errno, e)
    sys.exit(3)
"""


def test_not_root(counters_obj):
    d = tempfile.mkdtemp(prefix="hybrid-nobody-")  # pytest's tmp_path is not reachable by nobody
    try:
        obj = os.path.join(d, "counters.bpf.o")
        shutil.copy(counters_obj, obj)
        os.chmod(d, 0o755)
        os.chmod(obj, 0o644)
        env = dict(os.environ, HOME=d)
        r = subprocess.run([sys.executable, "-c", NOBODY, obj], capture_output=True, text=True, timeout=60, env=env,
                           cwd=d)
    finally:
        shutil.rmtree(d)
    assert r.returncode == 3, (r.stdout, r.stderr)
    lines = dict(line.split(" ", 1) for line in r.stdout.splitlines())
    assert "needs root (or CAP_BPF and CAP_PERFMON)" in lines["FEATURE"]
    assert "needs root" in lines["MAP"] and "[EPERM]" in lines["MAP"]
    assert lines["OBJECT"].startswith("%d counters.bpf.o: load: [EPERM]" % errno.EPERM), lines["OBJECT"]
    assert "needs root (or CAP_BPF and CAP_PERFMON)" in lines["OBJECT"]
