"""Fixtures of the kernel-side tests: compiled objects, the traced workload, fd counting."""

from __future__ import annotations

import os
import platform
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
PROGS = HERE / "progs"
NR_GETPPID = {"x86_64": 110, "aarch64": 173}.get(platform.machine())
SDT_H = ("/usr/include/x86_64-linux-gnu/sys/sdt.h", "/usr/include/sys/sdt.h")


def bpf_problem() -> str | None:
    """Why kernel eBPF cannot be used here, or None."""
    if os.geteuid() != 0:
        return "kernel eBPF needs root"
    if NR_GETPPID is None:
        return "no getppid syscall number for %s" % platform.machine()
    try:
        from hybrid.kernel import features

        f = features.check("bpf")
    except Exception as e:  # noqa: BLE001 - libbpf missing
        return str(e)
    return None if f.available else f.detail


def pytest_collection_modifyitems(config, items):
    problem = None
    checked = False
    for item in items:
        if "tests/kernel/" not in str(item.fspath).replace(os.sep, "/"):
            continue
        if not checked:
            problem, checked = bpf_problem(), True
        item.add_marker(pytest.mark.root)
        item.add_marker(pytest.mark.kernel)
        if problem:
            item.add_marker(pytest.mark.skip(reason=problem))


def rodata(pid: int | None = None, nr: int | None = None) -> bytes:
    """The ``cfg`` of counters/events.bpf.c: this process's tgid and __NR_getppid."""
    return struct.pack("<II", os.getpid() if pid is None else pid, NR_GETPPID if nr is None else nr)


def open_fds() -> set[str]:
    """This process's open fds with what they point at (to find leaks)."""
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.add("%s -> %s" % (fd, os.readlink("/proc/self/fd/%s" % fd)))
        except OSError:
            pass
    return out


def u64(raw) -> int:
    return int.from_bytes(raw[:8], "little")


def key(i: int) -> bytes:
    return struct.pack("<I", i)


@pytest.fixture(scope="session")
def counters_obj(bpf_build) -> Path:
    return bpf_build.compile(PROGS / "counters.bpf.c")


@pytest.fixture(scope="session")
def events_obj(bpf_build) -> Path:
    return bpf_build.compile(PROGS / "events.bpf.c")


@pytest.fixture(scope="session")
def workload(tmp_path_factory) -> Path:
    gcc = shutil.which("gcc")
    if gcc is None or not any(os.path.exists(p) for p in SDT_H):
        pytest.skip("gcc or sys/sdt.h (systemtap-sdt-dev) missing: cannot build the workload")
    out = tmp_path_factory.mktemp("workload") / "workload"
    r = subprocess.run([gcc, "-O2", "-g", "-o", str(out), str(PROGS / "workload.c")], capture_output=True, text=True)
    if r.returncode:
        pytest.fail("building the workload failed:\n%s" % r.stderr)
    return out


@pytest.fixture(scope="session")
def probes_obj(bpf_build, workload) -> Path:
    return bpf_build.compile(PROGS / "probes.bpf.c", extra=('-DWORKLOAD="%s"' % workload,))


class Workload:
    """A running workload process: ``run("add", n)`` returns what it printed for ``add n``."""

    def __init__(self, path: Path):
        self.p = subprocess.Popen([str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        assert self.p.stdout.readline().strip() == "ready"
        self.pid = self.p.pid

    def run(self, cmd: str, n: int) -> int:
        self.p.stdin.write("%s %d\n" % (cmd, n))
        self.p.stdin.flush()
        return int(self.p.stdout.readline())

    def close(self) -> None:
        if self.p.poll() is None:
            self.p.stdin.close()
            try:
                self.p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self.p.stdout.close()


@pytest.fixture
def running(workload):
    """Start workload processes: ``running()`` -> :class:`Workload`, all stopped after the test."""
    started: list[Workload] = []

    def start() -> Workload:
        w = Workload(workload)
        started.append(w)
        return w

    yield start
    for w in started:
        w.close()
