"""Process injection (hybrid.user.attach.inject): remote calls, dlopen, restart of interrupted syscalls."""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from hybrid.errors import InjectError
from hybrid.user.attach.inject import RemoteProcess, find_module, inject_and_call, symbol_address

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(sys.platform != "linux" or os.uname().machine != "x86_64", reason="x86-64 Linux only"),
    pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc"),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (ptrace)"),
]

TARGET_C = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static volatile unsigned long progress[2];
static volatile sig_atomic_t usr1;

static void on_usr1(int sig) { (void)sig; usr1++; }

static void *worker(void *arg) {
    long i = (long)arg;
    volatile double x = 0;
    for (;;) {
        for (int k = 0; k < 20000; k++) x += k * 0.5;
        progress[i]++;
    }
    return NULL;
}

int main(int argc, char **argv) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_usr1;
    sa.sa_flags = SA_RESTART;
    sigaction(SIGUSR1, &sa, NULL);
    pthread_t t[2];
    for (long i = 0; i < 2; i++) pthread_create(&t[i], NULL, worker, (void *)i);
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("ready\n");
    if (argc > 1 && strcmp(argv[1], "sleep") == 0) {
        for (;;) {  /* nanosleep: interrupted with -ERESTART_RESTARTBLOCK */
            struct timespec req = {0, 300000000}, t0, t1;
            clock_gettime(CLOCK_MONOTONIC, &t0);
            int r = nanosleep(&req, &req);
            int e = r ? errno : 0;
            clock_gettime(CLOCK_MONOTONIC, &t1);
            long ms = (t1.tv_sec - t0.tv_sec) * 1000 + (t1.tv_nsec - t0.tv_nsec) / 1000000;
            printf("tick %d %d %ld\n", r, e, ms);
        }
    }
    char buf[256];
    for (;;) {  /* read: interrupted with -ERESTARTSYS */
        ssize_t n = read(0, buf, sizeof buf - 1);
        if (n < 0) { printf("error %d\n", errno); sleep(1); continue; }
        if (n == 0) return 0;
        buf[n] = 0;
        buf[strcspn(buf, "\n")] = 0;
        printf("echo %s %lu %lu %d\n", buf, progress[0], progress[1], (int)usr1);
    }
}
"""

HELLO_C = r"""
#include <fcntl.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

int hello(const char *s) {
    int fd = open(OUT, O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (fd < 0) return -1;
    write(fd, s, strlen(s));
    write(fd, "\n", 1);
    close(fd);
    return (int)strlen(s);
}
int negative(const char *s) { (void)s; return -42; }
int crash(const char *s) { (void)s; return *(volatile int *)16; }
int spin(const char *s) { (void)s; for (;;) __asm__ volatile(""); }
int slow(const char *s) {
    (void)s;
    struct timespec ts = {0, 300000000};
    while (nanosleep(&ts, &ts) != 0) {}
    return 7;
}
"""

STATIC_C = r"""
#include <stdio.h>
#include <unistd.h>
int main(void) { setvbuf(stdout, NULL, _IOLBF, 0); printf("ready\n"); for (;;) sleep(1); }
"""


def _gcc(*args: str) -> None:
    r = subprocess.run(["gcc", *args], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError("gcc %s failed:\n%s" % (" ".join(args), r.stderr))


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    d = tmp_path_factory.mktemp("inject")
    (d / "target.c").write_text(TARGET_C)
    (d / "hello.c").write_text(HELLO_C)
    out = d / "hello.out"
    _gcc("-O1", "-pthread", "-o", str(d / "target"), str(d / "target.c"))
    _gcc("-O1", "-shared", "-fPIC", '-DOUT="%s"' % out, "-o", str(d / "libhello.so"), str(d / "hello.c"))
    return d


@pytest.fixture
def out_file(build):
    out = build / "hello.out"
    out.unlink(missing_ok=True)
    yield out
    out.unlink(missing_ok=True)


class Target:
    """A child process speaking lines on stdin/stdout."""

    def __init__(self, argv: list[str]):
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.pid = self.proc.pid
        self._buf = b""
        assert self.line() == "ready"

    def line(self, timeout: float = 3.0) -> str:
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise AssertionError("no line from process %d in %g s" % (self.pid, timeout))
            chunk = os.read(fd, 4096)
            if not chunk:
                raise AssertionError("process %d closed its stdout (exit %s)" % (self.pid, self.proc.poll()))
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    def echo(self, word: str) -> list[str]:
        """Send a word, return the target's answer: ['echo', word, progress0, progress1, usr1]."""
        self.proc.stdin.write(word.encode() + b"\n")
        self.proc.stdin.flush()
        parts = self.line().split()
        assert parts[:2] == ["echo", word], parts
        return parts

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass


@pytest.fixture
def spawn():
    targets: list[Target] = []

    def make(*argv) -> Target:
        t = Target([str(a) for a in argv])
        targets.append(t)
        return t

    yield make
    for t in targets:
        t.kill()


@pytest.fixture
def target(build, spawn):
    return spawn(build / "target")


def _utime(pid: int, tid: int) -> int:
    with open("/proc/%d/task/%d/stat" % (pid, tid)) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def _state(pid: int, tid: int) -> str:
    with open("/proc/%d/task/%d/stat" % (pid, tid)) as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def _wait_blocked(pid: int) -> None:
    """Wait until the main thread sleeps (blocked in its read/nanosleep)."""
    deadline = time.monotonic() + 3
    while _state(pid, pid) != "S":
        assert time.monotonic() < deadline, "thread %d never blocks" % pid
        time.sleep(0.005)


# --- the high-level operation -------------------------------------------------------------


def test_inject_and_call(build, target, out_file):
    before = target.echo("a")
    assert inject_and_call(target.pid, build / "libhello.so", "hello", "hi there") == 8
    assert out_file.read_text() == "hi there\n"
    # the main thread was blocked in read(): it restarted and still answers; workers progressed
    after = target.echo("b")
    assert int(after[2]) > int(before[2]) and int(after[3]) > int(before[3])
    assert target.proc.poll() is None
    assert inject_and_call(target.pid, build / "libhello.so", "negative", "") == -42


def test_nanosleep_restarts(build, spawn, out_file):
    t = spawn(build / "target", "sleep")
    t.line()  # a tick: the next nanosleep has just begun
    time.sleep(0.1)
    assert inject_and_call(t.pid, build / "libhello.so", "hello", "zz") == 2
    # the interrupted nanosleep restarted with its remaining time: no EINTR, slept in full
    for _ in range(2):
        r, e, ms = (int(x) for x in t.line().split()[1:])
        assert (r, e) == (0, 0) and ms >= 295, (r, e, ms)
    assert out_file.read_text() == "zz\n"


def test_repeated_injection(build, target, out_file):
    start = target.echo("a")
    for i in range(50):
        assert inject_and_call(target.pid, build / "libhello.so", "hello", "msg%d" % i) == len("msg%d" % i)
    assert out_file.read_text().splitlines() == ["msg%d" % i for i in range(50)]
    end = target.echo("b")
    assert int(end[2]) > int(start[2]) and int(end[3]) > int(start[3])


def test_python_target(build, spawn, out_file):
    code = "import time\nprint('ready', flush=True)\nwhile True: time.sleep(0.05)\n"
    t = spawn(sys.executable, "-c", code)
    assert inject_and_call(t.pid, build / "libhello.so", "hello", "from python") == 11
    assert out_file.read_text() == "from python\n"
    time.sleep(0.2)
    assert t.proc.poll() is None and _state(t.pid, t.pid) in "SR"


# --- errors: the target is never harmed ---------------------------------------------------


def test_no_such_process():
    with open("/proc/sys/kernel/pid_max") as f:
        pid = int(f.read()) + 1
    with pytest.raises(InjectError, match="no process %d" % pid):
        RemoteProcess(pid)
    with pytest.raises(InjectError, match="no process %d" % pid):
        inject_and_call(pid, "/x.so", "f", "")


def test_zombie():
    p = subprocess.Popen(["true"])
    try:
        deadline = time.monotonic() + 3
        while psutil.Process(p.pid).status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with pytest.raises(InjectError, match="process %d is a zombie" % p.pid):
            inject_and_call(p.pid, "/x.so", "f", "")
    finally:
        p.wait()


def test_self_refused():
    with pytest.raises(InjectError, match="calling process"):
        RemoteProcess(os.getpid())


def test_missing_library(build, target):
    missing = build / "nope.so"
    with pytest.raises(InjectError) as ei:
        inject_and_call(target.pid, missing, "hello", "x")
    msg = str(ei.value)
    assert msg.startswith("dlopen(%s) in process %d failed: " % (missing, target.pid))
    assert "cannot open shared object file" in msg
    target.echo("still-alive")


def test_missing_symbol(build, target):
    pattern = r"symbol nosuch not found in .*libhello.so in process \d+: .*undefined symbol: nosuch"
    with pytest.raises(InjectError, match=pattern):
        inject_and_call(target.pid, build / "libhello.so", "nosuch", "x")
    target.echo("still-alive")


def test_static_target(build, spawn, tmp_path):
    (tmp_path / "s.c").write_text(STATIC_C)
    try:
        _gcc("-static", "-O1", "-o", str(tmp_path / "s"), str(tmp_path / "s.c"))
    except RuntimeError as e:
        pytest.skip("gcc -static does not work here (libc.a missing?): %s" % str(e).splitlines()[-1])
    t = spawn(tmp_path / "s")
    pattern = "process %d is statically linked: hybrid cannot inject into it" % t.pid
    with pytest.raises(InjectError, match=pattern):
        inject_and_call(t.pid, build / "libhello.so", "hello", "x")
    assert t.proc.poll() is None


def test_crash_in_call(build, target):
    with pytest.raises(InjectError, match=r"crashed: SIGSEGV at rip 0x[0-9a-f]+ \(fault address 0x10\)"):
        inject_and_call(target.pid, build / "libhello.so", "crash", "")
    target.echo("survived")


def test_timeout(build, target):
    t0 = time.monotonic()
    with pytest.raises(InjectError, match="timed out after 0.3 s"):
        inject_and_call(target.pid, build / "libhello.so", "spin", "", timeout=0.3)
    assert time.monotonic() - t0 < 2
    target.echo("survived")


def _tgkill(pid: int, tid: int, sig: int) -> None:
    import ctypes

    if ctypes.CDLL(None, use_errno=True).syscall(234, pid, tid, sig) != 0:  # SYS_tgkill
        raise OSError(ctypes.get_errno(), "tgkill")


def test_signal_during_call_is_delivered_after(build, target):
    assert target.echo("a")[4] == "0"
    with RemoteProcess(target.pid) as rp:
        slow = rp.remote_dlsym(rp.remote_dlopen(str(build / "libhello.so")), "slow")
        # sent to the main thread, the one running the call (a kill() may pick a worker thread)
        timer = threading.Timer(0.1, _tgkill, (target.pid, target.pid, signal.SIGUSR1))
        timer.start()
        try:
            t0 = time.monotonic()
            assert rp.call(slow) == 7
            assert time.monotonic() - t0 >= 0.29  # the call's nanosleep was not cut short
        finally:
            timer.join()
        assert [s for s, _ in rp._deferred] == [signal.SIGUSR1]
    # held back during the call, delivered to the handler afterwards; read() restarted (SA_RESTART)
    assert target.echo("b")[4] == "1"


# --- the lower level ----------------------------------------------------------------------


def test_only_one_thread_stops(target):
    tids = sorted(int(t) for t in os.listdir("/proc/%d/task" % target.pid))
    workers = [t for t in tids if t != target.pid]
    assert len(workers) == 2
    with RemoteProcess(target.pid) as rp:
        assert rp.tid == target.pid
        assert _state(target.pid, target.pid) == "t"
        before = [_utime(target.pid, t) for t in workers]
        time.sleep(0.3)
        after = [_utime(target.pid, t) for t in workers]
        assert all(b > a for a, b in zip(before, after)), (before, after)
        assert all(_state(target.pid, t) == "R" for t in workers)
    target.echo("after")


def test_remote_calls_and_registers(target):
    libc = find_module(target.pid, "libc")
    assert libc is not None and os.path.basename(libc[0]) == "libc.so.6"
    getpid = symbol_address(target.pid, "libc.so.6", "getpid")
    _wait_blocked(target.pid)
    with RemoteProcess(target.pid) as rp:
        regs0 = bytes(rp._regs)
        fp0 = rp._fp
        assert rp.call(getpid) == target.pid
        strlen = rp.symbol_address("libc", "strlen")  # an IFUNC: the resolver is called
        s = rp.alloc_string("hello, world")
        assert rp.read_memory(s, 13) == b"hello, world\0"
        assert rp.read_string(s) == b"hello, world"
        assert rp.call(strlen, s) == 12
        # 6 arguments: snprintf(buf, n, fmt, a, b, c)
        snprintf = rp.symbol_address("libc", "snprintf")
        buf = rp.alloc(b"\0" * 64)
        n = rp.call(snprintf, buf, 64, rp.alloc_string("%d-%d-%s"), 7, -3 & (2**64 - 1), rp.alloc_string("x"))
        assert (n, rp.read_string(buf)) == (6, b"7--3-x")
        rp.write_memory(buf, b"abc\0")
        assert rp.call(strlen, buf) == 3
        assert bytes(rp._getregs()) == regs0  # restored after every call
    # the thread went back into read(), restarted it, and was stopped there again: same state
    _wait_blocked(target.pid)
    with RemoteProcess(target.pid) as rp:
        assert bytes(rp._regs) == regs0
        assert rp._fp[:512] == fp0[:512]
    target.echo("after")


def test_remote_dlopen(build, target, out_file):
    so = str(build / "libhello.so")
    with RemoteProcess(target.pid) as rp:
        h1 = rp.remote_dlopen(so)
        h2 = rp.remote_dlopen(so)
        assert h1 == h2 != 0
        hello = rp.remote_dlsym(h1, "hello")
        assert find_module(target.pid, so) is not None
        assert hello == symbol_address(target.pid, so, "hello")
        assert rp.call(hello, rp.alloc_string("direct")) == 6
    assert out_file.read_text() == "direct\n"
    target.echo("after")


def test_used_from_another_thread_refused(target):
    with RemoteProcess(target.pid) as rp:
        errors = []

        def other():
            try:
                rp.read_memory(rp._regs.rsp, 8)
            except InjectError as e:
                errors.append(str(e))

        th = threading.Thread(target=other)
        th.start()
        th.join()
        assert errors and "thread that created it" in errors[0]
    target.echo("after")


def test_worker_thread(build, target, out_file):
    worker = max(int(t) for t in os.listdir("/proc/%d/task" % target.pid))
    before = _utime(target.pid, worker)
    assert inject_and_call(target.pid, build / "libhello.so", "hello", "from a worker", tid=worker) == 13
    assert out_file.read_text() == "from a worker\n"
    time.sleep(0.1)
    assert _utime(target.pid, worker) > before and _state(target.pid, worker) == "R"
    target.echo("after")


def test_killed_during_call(build, target):
    with RemoteProcess(target.pid) as rp:
        slow = rp.remote_dlsym(rp.remote_dlopen(str(build / "libhello.so")), "slow")
        timer = threading.Timer(0.1, os.kill, (target.pid, signal.SIGKILL))
        timer.start()
        try:
            with pytest.raises(InjectError, match="process %d .* was killed by SIGKILL" % target.pid):
                rp.call(slow)
        finally:
            timer.join()
        with pytest.raises(InjectError, match="is gone"):
            rp.call(slow)
    # close() after the death is quiet


def test_stopped_process_stays_stopped(build, target, out_file):
    os.kill(target.pid, signal.SIGSTOP)
    deadline = time.monotonic() + 3
    while _state(target.pid, target.pid) != "T":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert inject_and_call(target.pid, build / "libhello.so", "hello", "stopped") == 7
    assert out_file.read_text() == "stopped\n"
    time.sleep(0.1)
    assert all(_state(target.pid, int(t)) == "T" for t in os.listdir("/proc/%d/task" % target.pid))
    os.kill(target.pid, signal.SIGCONT)
    target.echo("after")
