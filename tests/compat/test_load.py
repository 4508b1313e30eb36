"""``hybrid load -- LOADER``: the libbpf test program (tests/compat/progs/hload*.c, a bpftool skeleton linked
with the system's libbpf), unmodified, with its uprobe, uretprobe, USDT probe and sys_enter_getppid
tracepoint running inside the workload, must report exactly what the workload did -- the same as
against the kernel (test_libbpf_kernel.py) -- with no kernel probe of its own."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.compat.test_libbpf_kernel import (EVENT, EVENTS, M, N, TOTAL, USDT_ARG2, K, NR_GETPPID, art,  # noqa: F401
                                             expected_totals, fields, needs_kernel)

HYBRID = str(Path(sys.executable).with_name("hybrid"))


def _env(run_dir: Path) -> dict:
    return dict(os.environ, HYBRID_RUN_DIR=str(run_dir))


@pytest.fixture
def run_dir(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    return d


class Target:
    """The workload, plain or under ``hybrid run --`` (an agent host), waiting for its go-file."""

    def __init__(self, art, go: Path, run_dir: Path, host: bool, n=N, m=M, k=K):
        self.go = go
        cmd = [str(art.workload), str(go), str(n), str(m), str(k)]
        if host:
            cmd = [HYBRID, "run", "--"] + cmd
        self.p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(run_dir))
        first = self.p.stdout.readline()
        m_ = re.fullmatch(r"waiting (\d+)\n", first)
        if not m_:
            self.kill()
            pytest.fail("the workload did not start: %r %s" % (first, self.p.stderr.read()))
        self.pid = int(m_[1])
        assert (self.pid != self.p.pid) == host

    def go_and_wait(self, timeout: float = 60) -> str:
        self.go.touch()
        out, err = self.p.communicate(timeout=timeout)
        assert self.p.returncode == 0, err
        return out

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
        self.p.communicate()


class Loader:
    """``hybrid load -- hload -p PID -b WORKLOAD -r READY``, once READY exists."""

    def __init__(self, art, pid: int, ready: Path, run_dir: Path, *opts: str):
        self.p = subprocess.Popen([HYBRID, "load", *opts, "--", str(art.loader), "-p", str(pid), "-b",
                                   str(art.workload), "-r", str(ready)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(run_dir))
        deadline = time.monotonic() + 60
        while not ready.exists():
            if self.p.poll() is not None or time.monotonic() > deadline:
                self.p.kill()
                out, err = self.p.communicate()
                pytest.fail("the loader was not ready (exit %s):\n%s%s" % (self.p.returncode, out, err))
            time.sleep(0.01)

    def loader_pid(self) -> int:
        """The loader: hybrid load's child (``--kernel`` execs it: hybrid load's own pid)."""
        kids = psutil.Process(self.p.pid).children()
        assert len(kids) <= 1, kids
        return kids[0].pid if kids else self.p.pid

    def stop(self, sig: int = signal.SIGINT, wrapper: bool = False) -> tuple[str, str]:
        """``sig`` to the loader, or to ``hybrid load`` (``wrapper``), which passes it on."""
        os.kill(self.p.pid if wrapper else self.loader_pid(), sig)
        try:
            out, err = self.p.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.p.kill()
            out, err = self.p.communicate()
            pytest.fail("hybrid load did not stop:\n%s%s" % (out, err))
        assert self.p.returncode == 0, err
        return out, err

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
        self.p.communicate()


def kernel_perf_links() -> int:
    """perf_event links in the kernel (what libbpf makes for a uprobe or a tracepoint).

    bpftool fails when a link goes away between its listing and its query (other processes'
    links come and go): try again."""
    for _ in range(20):
        r = subprocess.run(["bpftool", "-j", "link", "show"], capture_output=True, text=True, timeout=30)
        if r.returncode == 0:
            return sum(1 for lk in json.loads(r.stdout or "[]") if lk.get("type") == "perf_event")
        time.sleep(0.05)
    pytest.fail("bpftool link show keeps failing: %s%s" % (r.stdout, r.stderr))


def check_report(out: str, err: str, pid: int, n=N, m=M, k=K) -> None:
    total, events = TOTAL.search(out), EVENTS.search(out)
    assert total and events, out + err
    assert fields(total[1]) == expected_totals(n, m, k)
    assert fields(events[1]) == {"uprobe": n, "uretprobe": n, "usdt": m, "getppid": k, "dropped": 0}
    lines = EVENT.findall(out)
    assert {int(p) for _k, p, _v, _a in lines} <= {pid}
    kinds = [kind for kind, _p, _v, _a in lines]
    assert kinds == ["uprobe", "uretprobe"] * n + ["usdt"] * m + ["getppid"] * k
    usdt = [(int(v), int(a)) for kind, _p, v, a in lines if kind == "usdt"]
    assert usdt == [(i, USDT_ARG2 * i) for i in range(1, m + 1)]
    assert "runs in the kernel" not in err, err
    assert "batch same (4 entries)" in out  # bpf_map_lookup_batch on a userspace map: the same totals


@pytest.mark.parametrize("host", [True, False], ids=["hybrid-run", "plain-pid"])
@needs_kernel
def test_load_reports_exactly_what_the_workload_did(art, tmp_path, run_dir, host):
    """Under ``hybrid run`` or by pid: exact totals and events, every probe in the workload, none in the kernel."""
    before = kernel_perf_links()
    w = Target(art, tmp_path / "go", run_dir, host)
    try:
        ld = Loader(art, w.pid, tmp_path / "ready", run_dir)
        try:
            assert kernel_perf_links() == before  # uprobes, USDT and the tracepoint: none in the kernel
            links = json.loads(subprocess.run([HYBRID, "link", "list", "--json"], capture_output=True, text=True,
                                              env=_env(run_dir), check=True).stdout)
            mine = sorted(lk["program"] for lk in links if lk.get("pid") == w.pid)
            assert mine == ["hload_enter", "hload_exit", "hload_getppid", "hload_tick"], links
            for _i in range(25):  # this process's getppid() calls: not traced (not a host, filtered anyway)
                os.getppid()
            did = w.go_and_wait()
            assert "did work=%d usdt=%d getppid=%d semaphore=1" % (N, M, K) in did  # the USDT semaphore was set
        except BaseException:
            ld.kill()
            raise
        # SIGTERM to hybrid load itself reaches the loader, which prints its totals; then hybrid load cleans up
        out, err = ld.stop(signal.SIGTERM, wrapper=True) if not host else ld.stop()
    finally:
        w.kill()
    check_report(out, err, w.pid)


@needs_kernel
def test_two_loaders_at_once_do_not_disturb_each_other(art, tmp_path, run_dir):
    """Two sessions on one agent host: each has its own object, maps and ring; both see everything."""
    w = Target(art, tmp_path / "go", run_dir, True)
    loaders = []
    try:
        for i in range(2):
            loaders.append(Loader(art, w.pid, tmp_path / ("ready%d" % i), run_dir))
        w.go_and_wait()
        reports = [ld.stop() for ld in loaders]
    finally:
        for ld in loaders:
            ld.kill()
        w.kill()
    for out, err in reports:
        check_report(out, err, w.pid)


@needs_kernel
def test_host_started_after_the_loader_gets_the_probes_before_main(art, tmp_path, run_dir):
    """A syscall tracepoint attached with no host yet reaches a `hybrid run` process started later, held
    before main until the session attached it: every getppid() of the workload is counted."""
    first = Target(art, tmp_path / "go1", run_dir, True, 0, 0, 0)
    try:
        ld = Loader(art, first.pid, tmp_path / "ready", run_dir)
        try:
            # a second host, started now: the loader's tracepoint program (filtered on the first pid's tgid)
            # runs there too; its getppid calls are filtered out by the program, not lost by hybrid
            second = Target(art, tmp_path / "go2", run_dir, True, 0, 0, 7)
            try:
                links = json.loads(subprocess.run([HYBRID, "link", "list", "--json"], capture_output=True,
                                                  text=True, env=_env(run_dir), check=True).stdout)
                assert any(lk.get("pid") == second.pid and lk["program"] == "hload_getppid" for lk in links), links
                second.go_and_wait()
            finally:
                second.kill()
            first.go_and_wait()
        except BaseException:
            ld.kill()
            raise
        out, err = ld.stop()
    finally:
        first.kill()
    check_report(out, err, first.pid, 0, 0, 0)


@needs_kernel
def test_kernel_mode_runs_the_loader_as_it_is(art, tmp_path, run_dir):
    """``hybrid load --kernel``: the loader alone, its probes in the kernel, the same report."""
    w = Target(art, tmp_path / "go", run_dir, False)
    try:
        ld = Loader(art, w.pid, tmp_path / "ready", run_dir, "--kernel")
        try:
            assert kernel_perf_links() >= 4
            w.go_and_wait()
        except BaseException:
            ld.kill()
            raise
        out, err = ld.stop()
    finally:
        w.kill()
    check_report(out, err, w.pid)


def test_bad_loader_is_a_clear_error(tmp_path):
    for argv, what in ((["load", "--", str(tmp_path / "nope")], "loader not found"),
                       (["load"], "no loader given")):
        r = subprocess.run([HYBRID, *argv], capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and what in r.stderr, r.stderr


# --- where programs run: the controller's decisions ---------------------------------------------


def test_programs_that_cannot_run_in_userspace_are_named_with_the_reason():
    """A prog array, a map shared with a kernel-attached program: kernel, and why; a perf event array is fine."""
    from hybrid.compat import load as L

    s = L.Session.__new__(L.Session)
    s.maps = {fd: L.KMap(fd, -1, t, 4, 8, 4, 0, name, 0, 0) for fd, t, name in
              ((10, 1, "counts"), (11, 4, "perf_out"), (12, 3, "jmp"), (13, 2, "shared"), (14, 27, "rb"))}
    s.progs = {20: L.KProg(20, L.PROG_KPROBE, 0, "ok", b"", frozenset({10, 14})),
               21: L.KProg(21, L.PROG_KPROBE, 0, "perf", b"", frozenset({11})),
               22: L.KProg(22, L.PROG_KPROBE, 0, "tail", b"", frozenset({12})),
               23: L.KProg(23, L.PROG_TRACEPOINT, 0, "sched", b"", frozenset({13}), kernel_attached=True),
               24: L.KProg(24, L.PROG_KPROBE, 0, "joins", b"", frozenset({13})),
               25: L.KProg(25, 1, 0, "socket", b"", frozenset({10}))}
    s.kernel_maps = {13}
    out = L.Session._exclusions(s)
    assert 20 not in out and 25 not in out
    assert 21 not in out  # perf event arrays: the loader's perf buffers are fed from both sides
    assert out[22] == "it uses tail calls (a prog array)"
    assert out[23] == "it is attached in the kernel"
    assert out[24] == "it shares map 'shared' with a program in the kernel"
    # a program sharing a map with an excluded one is excluded too (to a fixpoint)
    s.progs[26] = L.KProg(26, L.PROG_KPROBE, 0, "friend", b"", frozenset({12, 10}))
    out = L.Session._exclusions(s)
    assert out[26] == "it uses tail calls (a prog array)"
    assert out[20] == "it shares map 'counts' with a program in the kernel"


# --- perf buffers and global data -----------------------------------------------------------------

PERF = re.compile(r"^perf events=(\d+) sum=(-?\d+) lost=(\d+) calls=(\d+) failed=(\d+)$", re.M)


@pytest.fixture(scope="module")
def hperf(art, tmp_path_factory) -> Path:
    """tests/compat/progs/hperf*.c: a uprobe writing a perf event array, its loader using perf_buffer."""
    import platform
    import shutil

    from hybrid.user.toolchain import clang_system_includes
    from tests.compat.libbpf_progs import BPF_FLAGS, LOADER_FLAGS, TARGET_ARCH

    progs = Path(__file__).resolve().parent / "progs"
    d = tmp_path_factory.mktemp("hperf")
    clang = shutil.which("clang")
    flags = [*BPF_FLAGS, "-D__TARGET_ARCH_%s" % TARGET_ARCH[platform.machine()], *clang_system_includes(clang)]
    subprocess.run([clang, *flags, "-I%s" % art.directory, "-c", str(progs / "hperf.bpf.c"), "-o",
                    str(d / "hperf.bpf.o")], check=True)
    with open(d / "hperf.skel.h", "w") as f:
        subprocess.run(["bpftool", "gen", "skeleton", str(d / "hperf.bpf.o")], stdout=f, check=True)
    subprocess.run(["cc", *LOADER_FLAGS, "-I%s" % d, str(progs / "hperf.c"), "-o", str(d / "hperf"), "-lbpf"],
                   check=True)
    return d / "hperf"


@pytest.mark.parametrize("calls", [2000, 200_000])
@needs_kernel
def test_perf_buffer_and_skeleton_globals(art, hperf, tmp_path, run_dir, calls):
    """A program writing a perf event array runs in the workload; the loader's perf_buffer__poll gets its
    records (the interposer's perf ring, fed from the userspace one), and its skeleton's ``bss->calls``
    (an mmap of the kernel array) sees the program's count: the program uses that memory.  A burst of
    200k calls in a tight loop may outrun the loader: every record is then received or reported lost."""
    w = Target(art, tmp_path / "go", run_dir, False, calls, 0, 0)
    ready = tmp_path / "ready"
    p = subprocess.Popen([HYBRID, "load", "--", str(hperf), "-p", str(w.pid), "-b", str(art.workload), "-r",
                          str(ready)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(run_dir))
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert p.poll() is None and time.monotonic() < deadline, p.communicate()
            time.sleep(0.01)
        w.go_and_wait()
        time.sleep(0.3)
        os.kill(psutil.Process(p.pid).children()[0].pid, signal.SIGINT)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
        w.kill()
    assert p.returncode == 0, err
    m = PERF.search(out)
    assert m, out + err
    events, total, lost, seen_calls, failed = (int(x) for x in m.groups())
    assert seen_calls == calls  # the skeleton's .bss is the program's memory
    assert "runs in the kernel" not in err, err
    # nothing vanishes: an output the full ring refused failed in the program (as in the kernel: -ENOSPC)
    # and reached the loader as a lost record
    assert events + lost == calls and failed == lost, (events, lost, failed)
    if calls <= 2000:
        assert (events, lost, total) == (calls, 0, calls * (calls + 1) // 2)


# --- what stays in the kernel ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def kernel_progs(art, tmp_path_factory) -> Path:
    """hbad.bpf.o (an XDP program the verifier refuses), hsched.bpf.o (a sched_switch tracepoint),
    hmix.bpf.o (a uprobe and a sched_switch tracepoint sharing a hash map) and hauto (attach by name)."""
    import platform
    import shutil

    from hybrid.user.toolchain import clang_system_includes
    from tests.compat.libbpf_progs import BPF_FLAGS, LOADER_FLAGS, TARGET_ARCH

    progs = Path(__file__).resolve().parent / "progs"
    d = tmp_path_factory.mktemp("kernel_progs")
    clang = shutil.which("clang")
    flags = [*BPF_FLAGS, "-D__TARGET_ARCH_%s" % TARGET_ARCH[platform.machine()], *clang_system_includes(clang)]
    for name in ("hbad", "hsched", "hmix"):
        subprocess.run([clang, *flags, "-I%s" % art.directory, "-c", str(progs / (name + ".bpf.c")), "-o",
                        str(d / (name + ".bpf.o"))], check=True)
    subprocess.run(["cc", *LOADER_FLAGS, str(progs / "hauto.c"), "-o", str(d / "hauto"), "-lbpf"], check=True)
    return d


@needs_kernel
def test_a_program_the_kernel_refuses_gets_the_kernels_answer(kernel_progs, tmp_path, run_dir):
    """bpftool (itself a libbpf program) loading an XDP program the verifier refuses: the same exit
    status and the same verifier log under hybrid load as alone."""
    results = []
    for prefix in ([], [HYBRID, "load", "--"]):
        pin = "/sys/fs/bpf/hybrid-test-%d-%d" % (os.getpid(), len(results))
        r = subprocess.run([*prefix, "bpftool", "prog", "load", str(kernel_progs / "hbad.bpf.o"), pin],
                           capture_output=True, text=True, timeout=60, env=_env(run_dir))
        assert not os.path.exists(pin)
        results.append((r.returncode, [ln for ln in r.stderr.splitlines() if not ln.startswith("hybrid")]))
    assert results[0][0] != 0 and "invalid access to packet" in "\n".join(results[0][1])
    assert results[1] == results[0]


def _hauto(kernel_progs: Path, obj: str, tmp_path: Path, run_dir: Path, *progs: str) -> tuple[str, str, int]:
    """``hybrid load -- hauto OBJ READY PROGS...``: its output, stderr, and the kernel perf links it made."""
    ready = tmp_path / ("ready-" + "-".join(progs))
    before = kernel_perf_links()
    p = subprocess.Popen([HYBRID, "load", "--", str(kernel_progs / "hauto"), str(kernel_progs / obj), str(ready),
                          *progs], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(run_dir))
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert p.poll() is None and time.monotonic() < deadline, p.communicate()
            time.sleep(0.01)
        made = kernel_perf_links() - before
        os.kill(psutil.Process(p.pid).children()[0].pid, signal.SIGINT)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == 0, err
    return out, err, made


@needs_kernel
def test_other_tracepoints_go_to_the_kernel_unchanged(kernel_progs, tmp_path, run_dir):
    out, err, made = _hauto(kernel_progs, "hsched.bpf.o", tmp_path, run_dir, "count_switch")
    assert out == "attached count_switch\n" and made == 1, (out, err)
    assert "hybrid load" not in err


@needs_kernel
def test_a_map_shared_with_a_kernel_program_keeps_both_in_the_kernel(kernel_progs, tmp_path, run_dir):
    """The tracepoint attached first: the uprobe sharing its map runs in the kernel too, and says so."""
    out, err, made = _hauto(kernel_progs, "hmix.bpf.o", tmp_path, run_dir, "on_switch", "on_getppid")
    assert out == "attached on_switch\nattached on_getppid\n" and made == 2, (out, err)
    assert "program 'on_getppid' on uprobe " in err, err
    assert "runs in the kernel: it shares map 'shared' with a program in the kernel" in err


@needs_kernel
def test_a_kernel_attach_of_a_map_userspace_programs_use_is_refused(kernel_progs, tmp_path, run_dir):
    """The uprobe attached first (in userspace): the tracepoint's attach fails with EBUSY and a reason."""
    out, err, made = _hauto(kernel_progs, "hmix.bpf.o", tmp_path, run_dir, "on_getppid", "on_switch")
    assert out == "attached on_getppid\nfailed on_switch: Device or resource busy\n" and made == 0, (out, err)
    assert "program 'on_switch' cannot be attached in the kernel: its map 'shared' also serves programs " \
           "running in userspace" in err
