"""The libbpf test program of ``hybrid load`` (tests/compat/progs/hload*.c), run plainly against the kernel:
its loader -- a bpftool skeleton linked with the system's libbpf -- attaches a uprobe, a uretprobe and a
USDT probe (with a semaphore) to the workload, and a sys_enter_getppid tracepoint filtered on it, and
reports exactly what the workload did: the totals in its maps and one ring buffer event per hit, in order.
This is the reference ``hybrid load -- hload ...`` is compared with."""

from __future__ import annotations

import os
import platform
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.compat.libbpf_progs import Artifacts, build

ROOT = Path(__file__).resolve().parents[2]
NR_GETPPID = {"x86_64": 110, "aarch64": 173}.get(platform.machine())
TRACEFS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")
N, M, K = 500, 300, 200  # hload_work() calls, USDT hload:tick firings, getppid() calls
USDT_ARG2 = -1000000007  # hload:tick's second argument is USDT_ARG2 * i


def kernel_problem() -> str | None:
    """Why the loader cannot run against the kernel here, or None."""
    if os.geteuid() != 0:
        return "kernel eBPF needs root"
    if NR_GETPPID is None:
        return "no getppid syscall number for %s" % platform.machine()
    from tests.kernel.conftest import bpf_problem

    problem = bpf_problem()
    if problem:
        return problem
    if not os.path.exists("/sys/bus/event_source/devices/uprobe/type"):
        return "no uprobe PMU (/sys/bus/event_source/devices/uprobe)"
    if not any(os.path.exists(d + "/events/syscalls/sys_enter_getppid/id") for d in TRACEFS):
        return "tracefs with syscall tracepoints is not mounted (run scripts/setup.sh)"
    return None


_PROBLEM = kernel_problem()


def needs_kernel(test):
    """The markers of tests/kernel (root, kernel), and a skip when the kernel cannot do it here."""
    for mark in (pytest.mark.root, pytest.mark.kernel,
                 pytest.mark.skipif(_PROBLEM is not None, reason=_PROBLEM or "")):
        test = mark(test)
    return test


def build_dir(tmp_path_factory) -> Path:
    """``build/tests/compat`` in the repository (kept between runs: builds are cached by content), else a tmp dir."""
    d = ROOT / "build" / "tests" / "compat"
    try:
        d.mkdir(parents=True, exist_ok=True)
        if os.access(d, os.W_OK):
            return d
    except OSError:
        pass
    return tmp_path_factory.mktemp("libbpf_progs")


@pytest.fixture(scope="module")
def art(tmp_path_factory) -> Artifacts:
    return build(build_dir(tmp_path_factory))


# --- the programs' own outputs -------------------------------------------------------------------

TOTAL = re.compile(r"^total (.*)$", re.M)
EVENTS = re.compile(r"^events (.*)$", re.M)
EVENT = re.compile(r"^(uprobe|uretprobe|usdt|getppid) pid=(\d+) value=(-?\d+)(?: arg2=(-?\d+))?$", re.M)
DID = re.compile(r"^did work=(\d+) usdt=(\d+) getppid=(\d+) semaphore=(\d+)$", re.M)


def fields(line: str) -> dict[str, int]:
    return {k: int(v) for k, v in (kv.split("=") for kv in line.split())}


def expected_totals(n: int, m: int, k: int) -> dict[str, int]:
    return {
        "uprobe_calls": n, "uprobe_sum": n * (n + 1) // 2,
        "uretprobe_calls": n, "uretprobe_sum": sum(2 * i + 1 for i in range(1, n + 1)),
        "usdt_calls": m, "usdt_sum": m * (m + 1) // 2, "usdt_sum2": USDT_ARG2 * (m * (m + 1) // 2),
        "getppid": k, "getppid_sum": NR_GETPPID * k,
    }


class Workload:
    """``hload_workload GO N M K``, started and waiting for its go-file."""

    def __init__(self, art: Artifacts, go: Path, n: int, m: int, k: int):
        self.go = go
        self.p = subprocess.Popen([str(art.workload), str(go), str(n), str(m), str(k)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        first = self.p.stdout.readline()
        if first.strip() != "waiting %d" % self.p.pid:
            self.kill()
            pytest.fail("the workload did not start: %r %s" % (first, self.p.stderr.read()))
        self.pid = self.p.pid

    def go_and_wait(self, timeout: float = 60) -> str:
        self.go.touch()
        out, err = self.p.communicate(timeout=timeout)
        assert self.p.returncode == 0, err
        return out

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
        self.p.communicate()


def start_loader(art: Artifacts, pid: int, ready: Path, *extra: str) -> subprocess.Popen:
    """``hload -p PID -b WORKLOAD -r READY``, once READY exists (everything attached)."""
    loader = subprocess.Popen([str(art.loader), "-p", str(pid), "-b", str(art.workload), "-r", str(ready), *extra],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not ready.exists():
        if loader.poll() is not None:
            out, err = loader.communicate()
            pytest.fail("the loader exited (%d) before it was ready:\n%s%s" % (loader.returncode, out, err))
        if time.monotonic() > deadline:
            loader.kill()
            out, err = loader.communicate()
            pytest.fail("the loader was not ready after 30 s:\n%s%s" % (out, err))
        time.sleep(0.01)
    return loader


def stop(loader: subprocess.Popen, sig: int = signal.SIGINT) -> tuple[int, str, str]:
    loader.send_signal(sig)
    try:
        out, err = loader.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        loader.kill()
        out, err = loader.communicate()
        pytest.fail("the loader did not stop at signal %d:\n%s%s" % (sig, out, err))
    return loader.returncode, out, err


# --- tests ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@needs_kernel
def test_loader_reports_exactly_what_the_workload_did(art, tmp_path, sig):
    w = Workload(art, tmp_path / "go", N, M, K)
    try:
        loader = start_loader(art, w.pid, tmp_path / "ready")
        try:
            for _i in range(25):  # another process's getppid() calls: filtered out by target_tgid
                os.getppid()
            did = w.go_and_wait()
        except BaseException:
            loader.kill()
            loader.communicate()
            raise
    finally:
        w.kill()
    rc, out, err = stop(loader, sig)
    assert rc == 0, err

    # the workload did what it was asked, its USDT semaphore set by the kernel for libbpf's uprobe
    d = DID.search(did)
    assert d, did
    assert (int(d[1]), int(d[2]), int(d[3])) == (N, M, K), did
    assert int(d[4]) >= 1

    total, events = TOTAL.search(out), EVENTS.search(out)
    assert total and events, out + err
    assert fields(total[1]) == expected_totals(N, M, K)
    assert fields(events[1]) == {"uprobe": N, "uretprobe": N, "usdt": M, "getppid": K, "dropped": 0}
    assert "batch same (4 entries)" in out  # the kernel's bpf_map_lookup_batch agrees with the lookups

    # one line per event, each from the workload, in the order they happened
    lines = EVENT.findall(out)
    assert len(lines) == 2 * N + M + K
    assert {int(pid) for _k, pid, _v, _a in lines} == {w.pid}
    by_kind: dict[str, list[tuple[int, int | None]]] = {}
    for kind, _pid, value, arg2 in lines:
        by_kind.setdefault(kind, []).append((int(value), int(arg2) if arg2 else None))
    assert by_kind["uprobe"] == [(i, None) for i in range(1, N + 1)]
    assert by_kind["uretprobe"] == [(2 * i + 1, None) for i in range(1, N + 1)]
    assert by_kind["usdt"] == [(i, USDT_ARG2 * i) for i in range(1, M + 1)]
    assert by_kind["getppid"] == [(NR_GETPPID, None)] * K
    kinds = [kind for kind, _p, _v, _a in lines]
    assert kinds == ["uprobe", "uretprobe"] * N + ["usdt"] * M + ["getppid"] * K
    assert "Tracing process %d" % w.pid in err


@needs_kernel
def test_loader_duration_and_nothing_seen(art, tmp_path):
    """``-d 1``: the loader stops by itself; a workload that did nothing yet gives zero totals."""
    w = Workload(art, tmp_path / "go", N, M, K)
    try:
        t0 = time.monotonic()
        loader = start_loader(art, w.pid, tmp_path / "ready", "-d", "1")
        out, err = loader.communicate(timeout=30)
        assert loader.returncode == 0, err
        assert 0.9 <= time.monotonic() - t0 < 20
    finally:
        w.kill()
    assert fields(TOTAL.search(out)[1]) == expected_totals(0, 0, 0)
    assert fields(EVENTS.search(out)[1]) == {"uprobe": 0, "uretprobe": 0, "usdt": 0, "getppid": 0, "dropped": 0}
    assert EVENT.search(out) is None


def test_loader_usage(art):
    """Bad usage: exit status 2 and a message, before anything is loaded (no root needed)."""
    for argv in ([], ["-p", "x"], ["-p", "1", "extra"], ["-q"]):
        r = subprocess.run([str(art.loader), *argv], capture_output=True, text=True, timeout=30)
        assert r.returncode == 2, (argv, r.stderr)
        assert "usage:" in r.stderr and r.stdout == ""
    r = subprocess.run([str(art.loader), "-h"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stdout.startswith("usage:")


@needs_kernel
def test_loader_error_for_a_gone_process(art):
    """A process that is gone: exit status 1 and one message naming what failed."""
    p = subprocess.Popen(["true"])
    p.wait()
    r = subprocess.run([str(art.loader), "-p", str(p.pid)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "cannot find the executable of process %d" % p.pid in r.stderr
    r = subprocess.run([str(art.loader), "-p", str(p.pid), "-b", str(art.workload)], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 1 and "failed to attach uprobe" in r.stderr, r.stderr
