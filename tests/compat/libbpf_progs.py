"""Builds the libbpf test program of ``hybrid load`` (tests/compat/progs): ``hload.bpf.o``, its loader
``hload`` (a bpftool skeleton, linked with the system's shared libbpf) and the traced ``hload_workload``.

:func:`build` compiles them like libbpf-tools does::

    bpftool btf dump file /sys/kernel/btf/vmlinux format c > vmlinux.h
    clang -O2 -g -target bpf -D__TARGET_ARCH_x86 -I. <clang's -idirafter includes> -c hload.bpf.c -o hload.bpf.o
    bpftool gen skeleton hload.bpf.o > hload.skel.h
    cc -O2 -g -Wall -I. hload.c -o hload -lbpf
    cc -O1 -g -Wall hload_workload.c -o hload_workload

into ``OUTDIR/hload-<hash>/``, the hash covering the sources, the flags, the tools' versions and the
kernel's BTF, so a build is reused until something it was made from changes (concurrent builds each
write a temporary directory and rename it into place).  A missing tool or header skips the test; a
failing compiler fails it, with the command and its output.

By hand: ``.venv/bin/python -m tests.compat.libbpf_progs OUTDIR`` prints the three paths.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
PROGS = HERE / "progs"
BPF_SOURCE = PROGS / "hload.bpf.c"
LOADER_SOURCE = PROGS / "hload.c"
WORKLOAD_SOURCE = PROGS / "hload_workload.c"
KERNEL_BTF = Path("/sys/kernel/btf/vmlinux")

BPF_FLAGS = ("-O2", "-g", "-target", "bpf")
LOADER_FLAGS = ("-O2", "-g", "-Wall")
WORKLOAD_FLAGS = ("-O1", "-g", "-Wall")
# headers the sources include, from libbpf-dev and systemtap-sdt-dev
HEADERS = {
    "bpf/usdt.bpf.h": "libbpf-dev",
    "bpf/libbpf.h": "libbpf-dev",
    "sys/sdt.h": "systemtap-sdt-dev",
}
INCLUDE_DIRS = ("/usr/include", "/usr/include/%s-linux-gnu" % platform.machine(), "/usr/local/include")
TARGET_ARCH = {"x86_64": "x86", "aarch64": "arm64", "s390x": "s390", "ppc64le": "powerpc"}


@dataclass(frozen=True)
class Artifacts:
    directory: Path  # where all of it is: vmlinux.h, hload.skel.h, ...
    bpf_object: Path  # hload.bpf.o
    loader: Path  # hload: the libbpf loader (-p PID [-b BINARY] [-d SECONDS] [-r FILE])
    workload: Path  # hload_workload GO_FILE N M K


def _tool(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/local/sbin")


def _version(tool: str, *args: str) -> str:
    r = subprocess.run([tool, *args], capture_output=True, text=True)
    return r.stdout + r.stderr


def _run(cmd: list[str], what: str, stdout=None) -> None:
    r = subprocess.run(cmd, stdout=stdout if stdout is not None else subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True)
    if r.returncode:
        out = "" if stdout is not None else r.stdout
        pytest.fail("building %s failed (exit %d):\n%s\n%s%s" % (what, r.returncode, " ".join(cmd), out, r.stderr),
                    pytrace=False)


def _missing() -> str | None:
    """Why the programs cannot be built here (a tool or header is absent), or None."""
    for tool, pkg in (("clang", "clang"), ("bpftool", "bpftool"), ("cc", "gcc")):
        if _tool(tool) is None:
            return "%s not found (apt-get install %s)" % (tool, pkg)
    for header, pkg in HEADERS.items():
        if not any(os.path.exists(os.path.join(d, header)) for d in INCLUDE_DIRS):
            return "<%s> not found (apt-get install %s)" % (header, pkg)
    if not KERNEL_BTF.exists():
        return "%s not found: cannot generate vmlinux.h" % KERNEL_BTF
    if platform.machine() not in TARGET_ARCH:
        return "no __TARGET_ARCH for %s" % platform.machine()
    return None


def build(outdir: Path) -> Artifacts:
    """The loader, the workload and the BPF object, built in (or reused from) ``outdir/hload-<hash>``."""
    problem = _missing()
    if problem:
        pytest.skip("cannot build the libbpf test programs: %s" % problem)
    from hybrid.user.toolchain import clang_system_includes

    clang, bpftool, cc = _tool("clang"), _tool("bpftool"), _tool("cc")
    bpf_flags = [*BPF_FLAGS, "-D__TARGET_ARCH_%s" % TARGET_ARCH[platform.machine()],
                 *clang_system_includes(clang)]
    h = hashlib.sha256()
    for part in (BPF_SOURCE.read_bytes(), LOADER_SOURCE.read_bytes(), WORKLOAD_SOURCE.read_bytes(),
                 " ".join(bpf_flags), " ".join(LOADER_FLAGS), " ".join(WORKLOAD_FLAGS),
                 _version(clang, "--version"), _version(bpftool, "version"), _version(cc, "--version"),
                 KERNEL_BTF.read_bytes()):
        h.update((part.encode() if isinstance(part, str) else part) + b"\0")
    outdir = Path(outdir)
    final = outdir / ("hload-%s" % h.hexdigest()[:16])
    art = Artifacts(final, final / "hload.bpf.o", final / "hload", final / "hload_workload")
    if art.loader.exists() and art.workload.exists() and art.bpf_object.exists():
        return art

    outdir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=outdir, prefix=final.name + ".", suffix=".tmp"))
    try:
        with open(tmp / "vmlinux.h", "w") as f:
            _run([bpftool, "btf", "dump", "file", str(KERNEL_BTF), "format", "c"], "vmlinux.h", stdout=f)
        _run([clang, *bpf_flags, "-I%s" % tmp, "-c", str(BPF_SOURCE), "-o", str(tmp / "hload.bpf.o")],
             "hload.bpf.o")
        with open(tmp / "hload.skel.h", "w") as f:
            _run([bpftool, "gen", "skeleton", str(tmp / "hload.bpf.o")], "hload.skel.h", stdout=f)
        _run([cc, *LOADER_FLAGS, "-I%s" % tmp, str(LOADER_SOURCE), "-o", str(tmp / "hload"), "-lbpf"], "hload")
        _run([cc, *WORKLOAD_FLAGS, str(WORKLOAD_SOURCE), "-o", str(tmp / "hload_workload")], "hload_workload")
        os.chmod(tmp, 0o755)
        try:
            os.rename(tmp, final)
        except OSError:
            if not art.loader.exists():  # not another build that finished first
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return art


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m tests.compat.libbpf_progs OUTDIR")
    a = build(Path(sys.argv[1]))
    print("bpf_object %s\nloader %s\nworkload %s" % (a.bpf_object, a.loader, a.workload))
