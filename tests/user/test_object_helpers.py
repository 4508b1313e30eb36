"""Every helper through hybrid.load(): tests/user/progs/helpers_*.bpf.c (and maps_all) on every engine.

Results are checked exactly against what the test passed in, or against
Python's view of the same thing: clocks read before and after the run, the
pid/uid/comm from os and prctl, memory the test owns.
"""

from __future__ import annotations

import ctypes
import errno as E
import os
import re
import signal
import struct
import threading
import time

import pytest

import hybrid
from hybrid.native import _native
from hybrid.user import isa
from hybrid.user.helpers import ALL_HELPERS, CLOCK_MONOTONIC_COARSE, trace_pipe_path
from tests.user.object_util import (ENGINES, U64, allowed_cpus, as_u64, caller, frame_chain, neg, on_cpu, pt_regs, reg,
                                    set_var, var)

ffi, lib = _native().ffi, _native().lib
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
PAGE = os.sysconf("SC_PAGE_SIZE")
PROT_NONE, PROT_READ, PROT_WRITE = 0, 1, 2
MAP_PRIVATE, MAP_ANONYMOUS = 0x02, 0x20
BPF_F_USER_STACK = 1 << 8
PR_SET_NAME, PR_GET_NAME = 15, 16

OBJECTS = ("maps_all", "helpers_mem", "helpers_info", "helpers_probe")


@pytest.fixture
def load(bpf_build):
    """``load(name)``: tests/user/progs/<name>.bpf.c compiled and loaded (closed after the test)."""
    objs = []

    def _load(name, **values):
        obj = hybrid.load(bpf_build.obj(name), values=values or None)
        objs.append(obj)
        return obj

    yield _load
    for obj in objs:
        obj.close()


def thread_name() -> bytes:
    buf = ctypes.create_string_buffer(16)
    libc.prctl(PR_GET_NAME, buf, 0, 0, 0)
    return buf.value


class Pages:
    """``n`` fresh anonymous pages; ``protect(i, prot)`` changes page ``i``."""

    def __init__(self, n: int):
        self.n = n
        self.base = libc.mmap(None, n * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
        assert self.base not in (None, ctypes.c_void_p(-1).value)

    def protect(self, i: int, prot: int) -> None:
        assert libc.mprotect(self.base + i * PAGE, PAGE, prot) == 0

    def write(self, off: int, data: bytes) -> None:
        ctypes.memmove(self.base + off, data, len(data))

    def read(self, off: int, n: int) -> bytes:
        return ctypes.string_at(self.base + off, n)

    def close(self) -> None:
        libc.munmap(self.base, self.n * PAGE)


@pytest.fixture
def pages():
    made = []

    def _pages(n: int) -> Pages:
        made.append(Pages(n))
        return made[-1]

    yield _pages
    for p in made:
        p.close()


# --- probe_read & co. ---------------------------------------------------------------------------

READ, READ_USER, READ_STR, READ_USER_STR, READ_KERNEL, READ_KERNEL_STR = range(6)
FILL = b"\xaa" * 64


@pytest.mark.parametrize("engine", ENGINES)
def test_probe_read_of_user_memory(load, engine):
    obj = load("helpers_mem")
    read = caller(obj, "read", engine)
    data = bytes(range(1, 65))
    src = ctypes.create_string_buffer(data, 64)
    for kind in (READ, READ_USER):
        for size in (1, 7, 8, 13, 64):
            set_var(obj, "out", FILL)
            assert read(kind, ctypes.addressof(src), size) == 0
            assert var(obj, "out") == data[:size] + FILL[size:]
    text = b"hello, hybrid"
    s = ctypes.create_string_buffer(text + b"\0" + b"tail")
    for kind in (READ_STR, READ_USER_STR):
        set_var(obj, "out", FILL)
        assert read(kind, ctypes.addressof(s), 64) == len(text) + 1  # strlen + 1
        assert var(obj, "out")[:len(text) + 1] == text + b"\0"
        set_var(obj, "out", FILL)
        assert read(kind, ctypes.addressof(s), 5) == 5  # cut: size, the last byte a NUL
        assert var(obj, "out") == text[:4] + b"\0" + FILL[5:]
        assert read(kind, ctypes.addressof(s), 0) == 0
    # probe_read_kernel reads process memory: in a traced process the context is "kernel" memory
    set_var(obj, "out", FILL)
    assert read(READ_KERNEL, ctypes.addressof(src), 16) == 0
    assert var(obj, "out")[:16] == data[:16]
    set_var(obj, "out", FILL)
    assert read(READ_KERNEL_STR, ctypes.addressof(s), 64) == len(text) + 1
    assert read(READ_KERNEL_STR, ctypes.addressof(src), 0) == 0
    read_stack = caller(obj, "read_stack", engine)
    assert read_stack(0, ctypes.addressof(src)) == as_u64(data)
    assert read_stack(1, ctypes.addressof(src)) == as_u64(data)


@pytest.mark.parametrize("engine", ENGINES)
def test_probe_read_of_a_bad_address_is_efault(load, engine, pages):
    obj = load("helpers_mem")
    read, read_stack = caller(obj, "read", engine), caller(obj, "read_stack", engine)
    guard = pages(2)
    guard.write(PAGE - 4, b"abcd")  # 4 readable bytes, then a PROT_NONE page (no NUL before it)
    guard.protect(1, PROT_NONE)
    faults = lib.hybrid_safe_fault_count()
    # the NULL page, a PROT_NONE page, 4 good bytes then that page, a kernel and a non-canonical address
    bad = [0, 8, 4095, guard.base + PAGE, guard.base + PAGE - 4, 0xFFFFFFFF81000000, 1 << 63, U64 - 7]
    for addr in bad:
        for kind in (READ, READ_USER, READ_STR, READ_USER_STR, READ_KERNEL, READ_KERNEL_STR):
            set_var(obj, "out", FILL)
            assert read(kind, addr, 8) == neg(E.EFAULT), (kind, hex(addr))
            assert var(obj, "out") == bytes(8) + FILL[8:], (kind, hex(addr))  # dst zeroed on a fault
        assert read_stack(0, addr) == neg(E.EFAULT)
    assert lib.hybrid_safe_fault_count() > faults  # real faults, caught
    set_var(obj, "out", FILL)
    assert read(READ_USER_STR, guard.base + PAGE - 4, 4) == 4  # "abc\0": stops before the bad page
    assert var(obj, "out")[:5] == b"abc\0" + FILL[:1]
    # the process survived all of it, and a good read still works
    ok = ctypes.create_string_buffer(b"x" * 8)
    assert read_stack(0, ctypes.addressof(ok)) == as_u64(b"x" * 8)


@pytest.mark.parametrize("engine", ENGINES)
def test_probe_write_user(load, engine, pages):
    obj = load("helpers_mem")
    write = caller(obj, "write", engine)
    buf = ctypes.create_string_buffer(16)
    value = 0x1122334455667788
    assert write(ctypes.addressof(buf) + 3, value, 5) == 0
    assert buf.raw == bytes(3) + value.to_bytes(8, "little")[:5] + bytes(8)
    assert write(ctypes.addressof(buf), value, 8) == 0
    assert buf.raw[:8] == value.to_bytes(8, "little")
    ro = pages(2)
    ro.protect(0, PROT_READ)
    ro.protect(1, PROT_NONE)
    for addr in (0, ro.base, ro.base + PAGE, ro.base + PAGE - 4, 1 << 63):
        assert write(addr, value, 8) == neg(E.EFAULT), hex(addr)
    assert ro.read(0, 16) == bytes(16)  # a read-only page is left alone


# --- snprintf, trace_printk, strncmp, loop --------------------------------------------------------


def s32(v: int) -> int:
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >> 31 else v


def expected_fmt(a: int, b: int, c: int, s: bytes) -> bytes:
    """``"a=%d b=%u c=%llx s=%s|%5d|%-4x|%c"`` with data {a, b, c, str, a, b, 'Q'}, as C formats it."""
    return b"a=%d b=%d c=%x s=%s|%5d|%-4x|%c" % (s32(a), b & 0xFFFFFFFF, c & U64, s, s32(a), b & 0xFFFFFFFF,
                                                 ord("Q"))


@pytest.mark.parametrize("engine", ENGINES)
def test_snprintf(load, engine):
    obj = load("helpers_mem")
    fmt = caller(obj, "fmt", engine)
    s = ctypes.create_string_buffer(b"str!")
    for a, b, c in [(1, 2, 3), (-5, 0xFFFFFFFF, U64), (1 << 40 | 7, (1 << 33) + 9, 0xABCDEF)]:
        want = expected_fmt(a, b, c, b"str!")
        set_var(obj, "out", FILL)
        assert fmt(a, b, c, ctypes.addressof(s), 64) == len(want) + 1
        assert var(obj, "out")[:len(want) + 1] == want + b"\0"
        set_var(obj, "out", FILL)
        assert fmt(a, b, c, ctypes.addressof(s), 10) == len(want) + 1  # the whole length, even when cut
        assert var(obj, "out") == want[:9] + b"\0" + FILL[10:]
        set_var(obj, "out", FILL)
        assert fmt(a, b, c, ctypes.addressof(s), 0) == len(want) + 1 and var(obj, "out") == FILL  # only measures
    want = expected_fmt(1, 2, 3, b"")
    assert fmt(1, 2, 3, 8, 64) == len(want) + 1  # %s of an unreadable pointer: ""
    assert var(obj, "out")[:len(want) + 1] == want + b"\0"
    assert caller(obj, "fmt_bad", engine)() == neg(E.EINVAL)


LINE = re.compile(rb"^ *(?P<comm>.{1,16})-(?P<tid>\d+) *\[(?P<cpu>\d{3})\] \.\.\.\.\. +(?P<sec>\d+)\.(?P<usec>\d{6}): "
                  rb"bpf_trace_printk: (?P<msg>.*)\n$")


def check_trace_lines(text: bytes, messages: list[bytes], t0: int, t1: int) -> None:
    lines = text.splitlines(keepends=True)
    assert len(lines) == len(messages), text
    for line, msg in zip(lines, messages):
        m = LINE.match(line)
        assert m, line
        assert line.startswith(b"%16s-%-7d [" % (thread_name(), threading.get_native_id()))  # the kernel's layout
        assert m["comm"].strip() == thread_name() and int(m["tid"]) == threading.get_native_id()
        assert int(m["cpu"]) < os.cpu_count()
        usec = int(m["sec"]) * 1_000_000 + int(m["usec"])
        assert t0 // 1000 <= usec <= t1 // 1000  # CLOCK_MONOTONIC, in microseconds
        assert m["msg"] == msg


@pytest.mark.parametrize("engine", ENGINES)
def test_trace_printk_lines(load, engine, tmp_path, monkeypatch):
    obj = load("helpers_mem")
    printk = caller(obj, "printk", engine)
    s = ctypes.create_string_buffer(b"word")
    cases = [(7, 8, 0xBEEF), (-1, 0xFFFFFFFF, 1 << 63)]

    def expect(a, b, c):
        first = b"printk a=%d b=%d c=%x" % (s32(a), b & 0xFFFFFFFF, c)
        second = b"vprintk %d %d %d word" % (s32(a), s32(b), s32(c))
        return first, second

    # 1. to the default file, trace_pipe_path() ($HYBRID_TRACE_PIPE)
    path = tmp_path / "trace_pipe"
    monkeypatch.setenv("HYBRID_TRACE_PIPE", str(path))
    assert trace_pipe_path() == str(path)
    lib.hybrid_trace_set_fd(-1)  # reopen the default file on the next line
    try:
        t0 = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        want = []
        for a, b, c in cases:
            first, second = expect(a, b, c)
            assert printk(a, b, c, ctypes.addressof(s)) == (len(first) << 32) | len(second)
            want += [first, second]
        t1 = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        check_trace_lines(path.read_bytes(), want, t0, t1)
    finally:
        lib.hybrid_trace_set_fd(-1)
    # 2. to a file descriptor given with hybrid_trace_set_fd
    other = tmp_path / "trace_fd"
    fd = os.open(other, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    assert lib.hybrid_trace_set_fd(fd) == 0
    try:
        t0 = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        assert printk(1, 2, 3, ctypes.addressof(s)) >> 32 == len(expect(1, 2, 3)[0])
        t1 = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    finally:
        lib.hybrid_trace_set_fd(-1)
        os.close(fd)
    check_trace_lines(other.read_bytes(), list(expect(1, 2, 3)), t0, t1)
    assert len(path.read_bytes().splitlines()) == 4  # nothing more went to the first file


def c_strncmp(a: bytes, b: bytes, n: int) -> int:
    """C's strncmp sign on NUL-terminated ``a`` and ``b``."""
    a, b = a + b"\0", b + b"\0"
    for i in range(n):
        x, y = a[i] if i < len(a) else 0, b[i] if i < len(b) else 0
        if x != y:
            return -1 if x < y else 1
        if x == 0:
            return 0
    return 0


@pytest.mark.parametrize("engine", ENGINES)
def test_strncmp(load, engine):
    obj = load("helpers_mem")
    cmp = caller(obj, "cmp", engine)
    for text in (b"hybrid", b"hybris", b"hyb", b"hybrid2", b"zzz", b"", b"HYBRID", b"hybri"):
        s = ctypes.create_string_buffer(text)
        for n in (0, 1, 3, 6, 7, 15):
            assert cmp(ctypes.addressof(s), n) == c_strncmp(text, b"hybrid", n) & U64, (text, n)
    assert cmp(0, 3) == neg(E.EFAULT)  # the probe_read_user_str before it


@pytest.mark.parametrize("engine", ENGINES)
def test_bpf_loop(load, engine):
    obj = load("helpers_mem")
    loop = caller(obj, "loop", engine)

    def state():
        return struct.unpack("<3Q", var(obj, "out")[:24])

    assert loop(10, 1000, 0) == 10 and state() == (sum(i * i for i in range(10)), 1000, 10)
    assert loop(10, 3, 0) == 4 and state() == (0 + 1 + 4 + 9, 3, 4)  # the callback stops the loop
    assert loop(0, 0, 0) == 0 and state() == (0, 0, 0)
    assert loop(5, 1000, 1) == neg(E.EINVAL) and state() == (0, 1000, 0)  # flags must be 0
    assert loop((1 << 23) + 1, 0, 0) == neg(E.E2BIG) and state() == (0, 0, 0)


# --- clocks, randomness, the current task -----------------------------------------------------------

INFO = struct.Struct("<4Q4Q4Qq16sqII")


def info(obj) -> dict:
    names = ("ktime boot coarse jiffies r0 r1 r2 r3 cpu pid_tgid uid_gid task comm_rc comm ns_rc ns_pid "
             "ns_tgid").split()
    return dict(zip(names, INFO.unpack(var(obj, "info"))))


def pidns() -> tuple[int, int]:
    st = os.stat("/proc/self/ns/pid")
    return (os.major(st.st_dev) << 20) | os.minor(st.st_dev), st.st_ino


@pytest.mark.parametrize("engine", ENGINES)
def test_clocks(load, engine):
    obj = load("helpers_info")
    now = caller(obj, "now", engine)
    hz = lib.hybrid_jiffies_hz()
    user_hz = os.sysconf("SC_CLK_TCK")
    clocks = (time.CLOCK_MONOTONIC, time.CLOCK_BOOTTIME, CLOCK_MONOTONIC_COARSE)
    samples = []
    for _ in range(3):
        before = [time.clock_gettime_ns(c) for c in clocks]
        jiffies_before = os.times().elapsed
        r0 = now(*pidns())
        jiffies_after = os.times().elapsed
        after = [time.clock_gettime_ns(c) for c in clocks]
        got = info(obj)
        assert r0 == got["ktime"]
        for name, lo, hi in zip(("ktime", "boot", "coarse"), before, after):
            assert lo <= got[name] <= hi, name
        # jiffies_64 against times() (jiffies in USER_HZ units): within HZ / USER_HZ + 2 ticks
        slack = hz // user_hz + 2
        assert jiffies_before * hz - slack <= got["jiffies"] <= jiffies_after * hz + slack
        samples.append(got)
        time.sleep(0.02)
    for a, b in zip(samples, samples[1:]):
        assert a["ktime"] < b["ktime"] and a["boot"] < b["boot"] and a["coarse"] <= b["coarse"]
        ticks = (b["coarse"] - a["coarse"]) * hz / 1e9  # jiffies advance with the coarse clock at HZ
        assert abs((b["jiffies"] - a["jiffies"]) - ticks) <= 2
    randoms = [s[r] for s in samples for r in ("r0", "r1", "r2", "r3")]
    assert all(0 <= r < 1 << 32 for r in randoms)
    assert len(set(randoms)) >= len(randoms) - 1  # 12 draws of 32 bits: (almost surely) distinct


@pytest.mark.parametrize("engine", ENGINES)
def test_current_task(load, engine):
    obj = load("helpers_info")
    now = caller(obj, "now", engine)
    dev, ino = pidns()
    for cpu in allowed_cpus():
        with on_cpu(cpu):
            now(dev, ino)
        assert info(obj)["cpu"] == cpu < os.cpu_count()
    got = info(obj)
    assert got["pid_tgid"] == os.getpid() << 32 | threading.get_native_id()
    assert got["uid_gid"] == os.getgid() << 32 | os.getuid()
    assert got["task"] == 0  # no task_struct in userspace
    assert got["comm_rc"] == 0 and got["comm"] == thread_name().ljust(16, b"\0")
    assert got["ns_rc"] == 0 and (got["ns_pid"], got["ns_tgid"]) == (threading.get_native_id(), os.getpid())
    now(dev, ino + 1)  # another namespace: -EINVAL, nsdata zeroed
    got = info(obj)
    assert got["ns_rc"] == -E.EINVAL and (got["ns_pid"], got["ns_tgid"]) == (0, 0)

    # in another thread, with its own name
    seen = {}

    def other():
        libc.prctl(PR_SET_NAME, b"hyb-thread-7", 0, 0, 0)
        now(dev, ino)
        seen.update(info(obj), tid=threading.get_native_id())

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert seen["pid_tgid"] == os.getpid() << 32 | seen["tid"] and seen["tid"] != threading.get_native_id()
    assert seen["comm"].rstrip(b"\0") == b"hyb-thread-7"
    assert (seen["ns_pid"], seen["ns_tgid"]) == (seen["tid"], os.getpid())

    comm = caller(obj, "comm", engine)
    set_var(obj, "small", b"\xaa" * 16)
    assert comm(4) == 0 and var(obj, "small") == thread_name()[:3] + b"\0" + b"\xaa" * 12
    assert comm(16) == 0 and var(obj, "small") == thread_name().ljust(16, b"\0")  # NUL-padded, as the kernel
    assert comm(0) == neg(E.EINVAL)


# --- the current probe, stacks, signals ---------------------------------------------------------------

SEEN = struct.Struct("<3Q7q7QqQq")


def seen(obj) -> dict:
    v = SEEN.unpack(var(obj, "seen"))
    return {"func_ip": v[0], "cookie": v[1], "arg_cnt": v[2], "arg_rc": list(v[3:10]), "arg": list(v[10:17]),
            "ret_rc": v[17], "ret": v[18], "override_rc": v[19]}


class Probe:
    """The current probe of this thread while in the ``with`` block (what a trampoline sets)."""

    def __init__(self, func_ip=0, cookie=0, nargs=0, ret=False):
        self.ctx = ffi.new("struct hybrid_probe_ctx *")
        self.ctx.func_ip, self.ctx.cookie, self.ctx.nargs = func_ip, cookie, nargs
        self.ctx.flags = lib.HYBRID_PROBE_RETURN if ret else 0

    def __enter__(self):
        self.prev = lib.hybrid_probe_enter(self.ctx)
        return self.ctx

    def __exit__(self, *exc):
        lib.hybrid_probe_restore(self.prev)


ARGS = (0x10, 0x11, 0x12, 0x13, 0x14, 0x15)


@pytest.mark.parametrize("engine", ENGINES)
def test_probe_helpers_in_an_entry_probe(load, engine):
    obj = load("helpers_probe")
    on_entry = obj.programs["on_entry"]
    for nargs in (2, 6, 0):
        ctx = bytearray(pt_regs(*ARGS, ax=0x99))
        with Probe(func_ip=0x401000 + nargs, cookie=0xC00C1E + nargs, nargs=nargs) as p:
            assert on_entry.run(ctx, engine=engine) == 0
            assert (p.override, p.override_rc) == (1, ARGS[4])  # override_return(ctx, r8)
        got = seen(obj)
        assert (got["func_ip"], got["cookie"], got["arg_cnt"]) == (0x401000 + nargs, 0xC00C1E + nargs, nargs)
        limit = nargs or 6  # 0: unknown, the 6 argument registers
        assert got["arg_rc"] == [0] * limit + [-E.EINVAL] * (7 - limit)
        assert got["arg"] == list(ARGS[:limit]) + [0] * (7 - limit)
        assert got["ret_rc"] == -E.EOPNOTSUPP  # not a return probe
        assert got["override_rc"] == 0 and reg(ctx, "ax") == ARGS[4]  # regs->ax = rc, seen by the caller
    # outside a probe: no ip, no cookie, no override
    ctx = bytearray(pt_regs(*ARGS, ax=0x99))
    assert on_entry.run(ctx, engine=engine) == neg(E.EINVAL)
    got = seen(obj)
    assert (got["func_ip"], got["cookie"], got["arg_cnt"]) == (0, 0, 0)
    assert got["arg"][:6] == list(ARGS) and got["arg_rc"][6] == -E.EINVAL
    assert got["override_rc"] == -E.EINVAL and reg(ctx, "ax") == 0x99


@pytest.mark.parametrize("engine", ENGINES)
def test_probe_helpers_in_a_return_probe(load, engine):
    obj = load("helpers_probe")
    on_return = obj.programs["on_return"]
    for ax in (0, 42, U64):
        with Probe(func_ip=0x402000, cookie=7, nargs=1, ret=True):
            assert on_return.run(pt_regs(*ARGS, ax=ax), engine=engine) == 0
        got = seen(obj)
        assert (got["ret_rc"], got["ret"]) == (0, ax)  # get_func_ret: ax of the context
        assert (got["func_ip"], got["cookie"], got["arg_cnt"]) == (0x402000, 7, 1)
        assert got["arg_rc"][:2] == [0, -E.EINVAL] and got["arg"][0] == ARGS[0]
    assert on_return.run(pt_regs(ax=5), engine=engine) == neg(E.EOPNOTSUPP)  # no probe


@pytest.mark.parametrize("engine", ENGINES)
def test_get_stack(load, engine):
    obj = load("helpers_probe")
    user_stack = caller(obj, "user_stack", engine)
    rets = [0x7F0000001000 + 0x40 * i for i in range(4)]
    frames, fp = frame_chain(rets)
    ip = 0x7F0000000123
    full = [ip] + rets

    def stack() -> list[int]:
        return list(struct.unpack("<8Q", var(obj, "stack")))

    assert user_stack(64, BPF_F_USER_STACK, ip=ip, bp=fp) == 8 * len(full)
    assert stack() == full + [0] * (8 - len(full))  # the rest zeroed
    assert user_stack(64, BPF_F_USER_STACK | 2, ip=ip, bp=fp) == 8 * (len(full) - 2)
    assert stack() == full[2:] + [0] * (8 - len(full) + 2)
    assert user_stack(16, BPF_F_USER_STACK, ip=ip, bp=fp) == 16
    assert stack()[:2] == full[:2]
    assert user_stack(64, BPF_F_USER_STACK, ip=ip, bp=0) == 8  # no frame: only ip
    assert stack() == [ip] + [0] * 7
    assert user_stack(64, 0, ip=ip, bp=fp) == neg(E.EFAULT)  # a kernel stack: there is none
    assert stack() == [0] * 8
    assert user_stack(12, BPF_F_USER_STACK, ip=ip, bp=fp) == neg(E.EINVAL)  # not a multiple of 8
    assert user_stack(64, BPF_F_USER_STACK | 1 << 11, ip=ip, bp=fp) == neg(E.EINVAL)  # build ids
    del frames


@pytest.mark.parametrize("engine", ENGINES)
def test_send_signal(load, engine):
    obj = load("helpers_probe")
    send = caller(obj, "signal", engine)
    got = []
    old = signal.signal(signal.SIGUSR1, lambda sig, frame: got.append(sig))
    try:
        assert send(signal.SIGUSR1, 0) == 0  # bpf_send_signal: to this process
        assert send(signal.SIGUSR1, 1) == 0  # bpf_send_signal_thread: to this thread
        assert send(0, 0) == 0  # no signal, only the check
        assert send(65, 0) == neg(E.EINVAL) and send(65, 1) == neg(E.EINVAL)
        for _ in range(100):
            if len(got) == 2:
                break
            time.sleep(0.001)
        assert got == [signal.SIGUSR1] * 2
    finally:
        signal.signal(signal.SIGUSR1, old)


# --- every helper hybrid implements is called by the programs above ------------------------------------


def test_every_helper_is_exercised(bpf_build):
    called = set()
    for name in OBJECTS:
        with hybrid.load(bpf_build.obj(name)) as obj:
            for p in obj.programs.values():
                called |= {i.imm for i in p.program.insns if i.opcode == 0x85 and i.src == isa.CALL_HELPER}
    assert called == set(ALL_HELPERS), (sorted(set(ALL_HELPERS) - called), sorted(called - set(ALL_HELPERS)))
