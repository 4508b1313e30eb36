"""The native tracing helpers (hybrid/native/helpers.c), called through cffi with real
memory, and through programs on every engine."""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import gzip
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from hybrid.errors import VmError
from hybrid.user import helpers as H
from hybrid.user import isa
from hybrid.user.asm import assemble
from hybrid.user.engine import create_engine
from hybrid.user.program import Program

_native = pytest.importorskip("hybrid._native")
lib, ffi = _native.lib, _native.ffi

M64 = (1 << 64) - 1
PAGE = os.sysconf("SC_PAGE_SIZE")
PROT_NONE, PROT_READ, PROT_WRITE = 0, 1, 2
MAP_PRIVATE, MAP_ANONYMOUS = 0x02, 0x20
BPF_F_USER_STACK = 1 << 8
BPF_F_USER_BUILD_ID = 1 << 11
ENGINES = ("interp", "jit", "aot")
TABLE = {**H.BASE_HELPERS, **H.TRACE_HELPERS}

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def neg(e: int) -> int:
    return -e & M64


def s64(v: int) -> int:
    return v - (1 << 64) if v >> 63 else v


def addr(cdata) -> int:
    return int(ffi.cast("uintptr_t", cdata))


def call(name: str, *args: int) -> int:
    regs = [a & M64 for a in args] + [0] * (5 - len(args))
    return int(getattr(lib, "hybrid_helper_" + name)(*regs))


@pytest.fixture
def pages():
    """Two pages: ``base`` is read-write, ``base + PAGE`` is PROT_NONE."""
    base = _libc.mmap(None, 2 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
    assert base not in (None, ctypes.c_void_p(-1).value)
    assert _libc.mprotect(base + PAGE, PAGE, PROT_NONE) == 0
    yield base
    _libc.munmap(base, 2 * PAGE)


# --- safe copies and probe_read -------------------------------------------------


BAD_ADDRESSES = {
    "null": 0,
    "low": 0x10,
    "kernel": 0xFFFFFFFF81000000,
    "non-canonical": 0x8000000000000000,  # a #GP, not a page fault: si_code SI_KERNEL
    "top": M64 - 3,
}


@pytest.mark.parametrize("where", sorted(BAD_ADDRESSES))
def test_probe_read_user_of_a_bad_address_is_efault_and_zeroes_dst(where):
    dst = ffi.new("char[16]", b"\xaa" * 16)
    before = lib.hybrid_safe_fault_count()
    assert call("probe_read_user", addr(dst), 16, BAD_ADDRESSES[where]) == neg(errno.EFAULT)
    assert bytes(ffi.buffer(dst)) == bytes(16)
    assert lib.hybrid_safe_fault_count() > before


def test_probe_read_of_a_prot_none_page_and_across_a_page_end(pages):
    dst = ffi.new("char[64]", b"\xaa" * 64)
    assert call("probe_read", addr(dst), 8, pages + PAGE) == neg(errno.EFAULT)
    assert bytes(ffi.buffer(dst))[:8] == bytes(8)
    # the first 4 bytes are readable, the rest is not: the whole read fails
    ctypes.memmove(pages + PAGE - 4, b"abcd", 4)
    dst = ffi.new("char[64]", b"\xaa" * 64)
    for size in (8, 9, 63, 64, 200):
        buf = ffi.new("char[]", size)
        assert call("probe_read_user", addr(buf), size, pages + PAGE - 4) == neg(errno.EFAULT)
        assert bytes(ffi.buffer(buf)) == bytes(size)
    assert call("probe_read_user", addr(dst), 4, pages + PAGE - 4) == 0
    assert bytes(ffi.buffer(dst))[:4] == b"abcd"


@pytest.mark.parametrize("size", [0, 1, 2, 7, 8, 9, 15, 16, 63, 64, 65, 1000, 4096])
def test_probe_read_user_copies(size):
    src = bytes((i * 7 + 3) & 0xFF for i in range(size))
    s = ffi.new("char[]", src or b"\0")
    d = ffi.new("char[]", size + 8)
    ffi.memmove(d + size, b"\x55" * 8, 8)
    assert call("probe_read_user", addr(d), size, addr(s)) == 0
    assert bytes(ffi.buffer(d))[:size] == src
    assert bytes(ffi.buffer(d))[size:] == b"\x55" * 8  # nothing past size


def test_a_bad_destination_is_efault_too(pages):
    src = ffi.new("char[8]", b"1234567")
    assert call("probe_read_user", pages + PAGE, 8, addr(src)) == neg(errno.EFAULT)
    assert lib.hybrid_safe_copy(ffi.cast("void *", pages + PAGE), src, 8) == -errno.EFAULT
    assert lib.hybrid_safe_memset(ffi.cast("void *", pages + PAGE), 0, 1) == -errno.EFAULT
    assert lib.hybrid_safe_memset(ffi.cast("void *", pages), 0x41, 3) == 0
    assert ctypes.string_at(pages, 3) == b"AAA"


@pytest.mark.parametrize("size", [0, 1, 7, 8, 9, 63, 64, 65, 300])
def test_safe_memset(size):
    buf = ffi.new("char[]", size + 8)
    ffi.memmove(buf, b"\x11" * (size + 8), size + 8)
    assert lib.hybrid_safe_memset(buf, 0xC3, size) == 0
    assert bytes(ffi.buffer(buf)) == b"\xc3" * size + b"\x11" * 8


def test_size_is_a_u32_like_the_kernels():
    src = ffi.new("char[8]", b"abcdefg")
    dst = ffi.new("char[8]")
    assert call("probe_read_user", addr(dst), (1 << 32) | 4, addr(src)) == 0
    assert bytes(ffi.buffer(dst)) == b"abcd" + bytes(4)


def test_probe_read_kernel_reads_process_memory():
    # a traced process's "kernel" memory is the context hybrid built in process memory
    src = ffi.new("char[8]", b"abcdefg")
    dst = ffi.new("char[8]", b"\xaa" * 8)
    assert call("probe_read_kernel", addr(dst), 8, addr(src)) == 0
    assert bytes(ffi.buffer(dst)) == b"abcdefg\0"
    dst = ffi.new("char[8]", b"\xaa" * 8)
    assert call("probe_read_kernel_str", addr(dst), 8, addr(src)) == 8
    assert call("probe_read_kernel", addr(dst), 8, 0xFFFFFFFF81000000) == neg(errno.EFAULT)
    assert bytes(ffi.buffer(dst)) == bytes(8)
    assert call("probe_read_kernel_str", addr(dst), 0, addr(src)) == 0


def _ref_str(data: bytes, size: int) -> tuple[int, bytes]:
    """The kernel's strncpy_from_user into a `size`-byte buffer: (result, copied bytes)."""
    if size == 0:
        return 0, b""
    nul = data.find(b"\0")
    if 0 <= nul < size - 1:
        return nul + 1, data[: nul + 1]
    return size, data[: size - 1] + b"\0"


@pytest.mark.parametrize("helper", ["probe_read_user_str", "probe_read_str"])
def test_probe_read_str(helper):
    s = ffi.new("char[]", b"hello")
    for size, want, content in [(16, 6, b"hello\0"), (6, 6, b"hello\0"), (5, 5, b"hell\0"), (1, 1, b"\0")]:
        d = ffi.new("char[16]", b"\xaa" * 16)
        assert call(helper, addr(d), size, addr(s)) == want
        assert bytes(ffi.buffer(d))[: len(content)] == content
        assert bytes(ffi.buffer(d))[len(content):] == b"\xaa" * (16 - len(content))  # no padding
    d = ffi.new("char[4]", b"\xaa" * 4)
    assert call(helper, addr(d), 0, addr(s)) == 0 and bytes(ffi.buffer(d)) == b"\xaa" * 4
    assert call(helper, addr(d), 4, 0) == neg(errno.EFAULT) and bytes(ffi.buffer(d)) == bytes(4)


def test_probe_read_str_every_alignment_and_length():
    data = bytes(range(1, 40)) + b"\0" + b"tail"
    src = ffi.new("char[]", 64 + len(data))
    for off in range(16):
        ffi.memmove(src + off, data, len(data))
        for cut in (0, 1, 7, 8, 9, 17, 39):  # strings of length `cut`
            piece = data[:cut] + b"\0"
            ffi.memmove(src + off, piece, len(piece))
            for size in (0, 1, 2, 7, 8, 9, 15, 16, 17, 40, 48):
                d = ffi.new("char[64]", b"\xaa" * 64)
                want, content = _ref_str(piece, size)
                assert call("probe_read_user_str", addr(d), size, addr(src) + off) == want, (off, cut, size)
                assert bytes(ffi.buffer(d))[: len(content)] == content
            ffi.memmove(src + off, data, len(data))


def test_probe_read_str_never_reads_past_the_nul(pages):
    # a string whose NUL is the last byte before a PROT_NONE page
    ctypes.memmove(pages + PAGE - 6, b"abcde\0", 6)
    d = ffi.new("char[64]")
    assert call("probe_read_user_str", addr(d), 64, pages + PAGE - 6) == 6
    assert ffi.string(d) == b"abcde"
    # no NUL before the page ends: the read faults and dst is zeroed
    ctypes.memmove(pages + PAGE - 6, b"abcdef", 6)
    d = ffi.new("char[64]", b"\xaa" * 64)
    assert call("probe_read_user_str", addr(d), 64, pages + PAGE - 6) == neg(errno.EFAULT)
    assert bytes(ffi.buffer(d)) == bytes(64)
    # ... unless the buffer is full first
    assert call("probe_read_user_str", addr(d), 6, pages + PAGE - 6) == 6
    assert ffi.string(d) == b"abcde"


def test_probe_write_user(pages):
    src = ffi.new("char[8]", b"patched")
    target = ffi.new("char[16]", b"x" * 15)
    assert call("probe_write_user", addr(target), addr(src), 7) == 0
    assert ffi.string(target) == b"patchedxxxxxxxx"
    assert call("probe_write_user", pages + PAGE, addr(src), 7) == neg(errno.EFAULT)
    assert call("probe_write_user", 0, addr(src), 7) == neg(errno.EFAULT)
    # a read-only page: the write faults, the page is unchanged
    ctypes.memmove(pages, b"original", 8)
    assert _libc.mprotect(pages, PAGE, PROT_READ) == 0
    try:
        assert call("probe_write_user", pages, addr(src), 7) == neg(errno.EFAULT)
        assert ctypes.string_at(pages, 8) == b"original"
    finally:
        _libc.mprotect(pages, PAGE, PROT_READ | PROT_WRITE)
    # a bad source is an error too, not a crash
    assert call("probe_write_user", addr(target), 0x10, 4) == neg(errno.EFAULT)
    big = ffi.new("char[]", b"y" * 1000)
    out = ffi.new("char[1000]")
    assert call("probe_write_user", addr(out), addr(big), 1000) == 0 and bytes(ffi.buffer(out)) == b"y" * 1000


# --- the fault handler and the process's own handlers ------------------------------


def _run(code: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=60, **kw)


BAD_READ = """
from hybrid import _native
lib, ffi = _native.lib, _native.ffi
d = ffi.new("char[8]")
r = lib.hybrid_helper_probe_read_user(int(ffi.cast("uintptr_t", d)), 8, 16, 0, 0)
assert r == (-14) & (2**64 - 1), r
print("survived", flush=True)
"""


def test_a_real_segfault_still_kills_the_process():
    r = _run(BAD_READ + "import ctypes; ctypes.string_at(8, 1)\nprint('not reached')")
    assert r.stdout == "survived\n"
    assert r.returncode == -signal.SIGSEGV, r.stderr


def test_faulthandler_installed_before_still_reports_a_real_crash():
    r = _run("import faulthandler; faulthandler.enable()\n" + BAD_READ + "import ctypes; ctypes.string_at(8, 1)")
    assert r.stdout == "survived\n"
    assert "Segmentation fault" in r.stderr  # faulthandler's report, chained from our handler
    assert r.returncode == -signal.SIGSEGV


def test_a_killed_with_sigsegv_process_dies():
    r = _run(BAD_READ + "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)\nprint('not reached')")
    assert r.stdout == "survived\n" and r.returncode == -signal.SIGSEGV


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")
def test_the_programs_own_siginfo_handler_keeps_working(tmp_path):
    src = tmp_path / "own.c"
    src.write_text(textwrap.dedent("""
        #define _GNU_SOURCE
        #include <signal.h>
        #include <string.h>
        #include <unistd.h>
        static void on_segv(int sig, siginfo_t *si, void *uc) {
            static const char msg[] = "own handler\\n";
            (void)sig; (void)uc;
            write(2, msg, sizeof(msg) - 1);
            _exit(si->si_addr == (void *)8 ? 42 : 43);
        }
        void install(void) {
            struct sigaction sa;
            memset(&sa, 0, sizeof(sa));
            sa.sa_sigaction = on_segv;
            sa.sa_flags = SA_SIGINFO;
            sigaction(SIGSEGV, &sa, 0);
        }
        int crash(void) { return *(volatile int *)8; }
    """))
    so = tmp_path / "libown.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-O1", "-o", str(so), str(src)], check=True)
    code = "import ctypes\nown = ctypes.CDLL(%r)\nown.install()\n" % str(so) + BAD_READ + "own.crash()\n"
    r = _run(code)
    assert r.stdout == "survived\n"
    assert r.stderr == "own handler\n"
    assert r.returncode == 42  # the program's handler ran, with the right siginfo


def test_install_is_idempotent():
    assert lib.hybrid_safe_install() == 0
    assert lib.hybrid_safe_install() == 0
    d = ffi.new("char[8]")
    assert call("probe_read_user", addr(d), 8, 0) == neg(errno.EFAULT)


def test_faults_on_many_threads_at_once():
    errors = []

    def worker():
        d = ffi.new("char[32]")
        s = ffi.new("char[32]", b"z" * 31)
        for i in range(2000):
            if call("probe_read_user", addr(d), 32, 0x1000 + i) != neg(errno.EFAULT):
                errors.append("bad read")
            if call("probe_read_user", addr(d), 32, addr(s)) != 0:
                errors.append("good read")

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


# --- trace_printk -------------------------------------------------------------------

HEADER = re.compile(r"^(.{16})-(\d+) +\[(\d{3})\] \.\.\.\.\. +(\d+)\.(\d{6}): bpf_trace_printk: ", re.M)


class Record:
    def __init__(self, m: re.Match, msg: str):
        self.comm, self.tid, self.cpu = m.group(1).strip(), int(m.group(2)), int(m.group(3))
        self.ts = int(m.group(4)) + int(m.group(5)) / 1e6
        self.msg = msg


class Trace:
    def __init__(self, path):
        self.path = path

    def records(self) -> list[Record]:
        """The lines written so far; a message may contain newlines, every record ends in one."""
        text = self.path.read_bytes().decode()
        heads = list(HEADER.finditer(text))
        assert (heads[0].start() if heads else len(text)) == 0, text
        out = []
        for m, nxt in zip(heads, heads[1:] + [None]):
            body = text[m.end():nxt.start() if nxt else len(text)]
            assert body.endswith("\n"), body
            out.append(Record(m, body[:-1]))
        return out

    def messages(self) -> list[str]:
        return [r.msg for r in self.records()]


@pytest.fixture
def trace(tmp_path):
    path = tmp_path / "trace"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    assert lib.hybrid_trace_set_fd(fd) == 0
    try:
        yield Trace(path)
    finally:
        lib.hybrid_trace_set_fd(-1)
        os.close(fd)


def printk(fmt: bytes, *args: int, size: int | None = None) -> int:
    buf = ffi.new("char[]", fmt)
    return s64(call("trace_printk", addr(buf), len(fmt) + 1 if size is None else size, *args))


def test_trace_line_layout(trace):
    assert printk(b"hello") == 5
    (r,) = trace.records()
    comm = ctypes.create_string_buffer(17)
    _libc.prctl(16, comm, 0, 0, 0)
    assert r.comm == comm.value.decode()
    assert r.tid == threading.get_native_id()
    assert r.cpu < os.cpu_count()
    assert abs(r.ts - time.monotonic()) < 5
    assert r.msg == "hello"
    line = trace.path.read_text()
    assert line.index("-") == 16 and line.endswith(": bpf_trace_printk: hello\n")  # the kernel's columns


STR = ffi.new("char[]", b"world")
IP4 = ffi.new("unsigned char[4]", [10, 0, 0, 1])
IP6 = ffi.new("unsigned char[16]", [0x20, 0x01, 0x0D, 0xB8] + [0] * 11 + [1])

FORMATS = [
    (b"%d %i %u", (-1, -2, 3), "-1 -2 3"),
    (b"%d", (1 << 32 | 5,), "5"),  # an int: the low 32 bits
    (b"%u %x %X", (-1, 0xDEADBEEF, 0xABC), "4294967295 deadbeef ABC"),
    (b"%ld %li %lu", (-5, -(1 << 40), -1), "-5 -1099511627776 18446744073709551615"),
    (b"%lld %llu %llx", (-7, 1 << 63, 0xFEDCBA9876543210), "-7 9223372036854775808 fedcba9876543210"),
    (b"%lx", (0x1234,), "1234"),
    (b"[%5d|%-5d|%05d]", (42, 42, -42), "[   42|42   |-0042]"),
    (b"[%+d|% d|%+d]", (7, 7, -7), "[+7| 7|-7]"),
    (b"[%08x|%-8X|%3u]", (0xBEEF, 0xBEEF, 12345), "[0000beef|BEEF    |12345]"),
    (b"%c%c%c", (ord("a"), ord("b"), ord("c")), "abc"),
    (b"[%3c|%-3c]", (ord("x"), ord("y")), "[  x|y  ]"),
    (b"hello %s!", (addr(STR),), "hello world!"),
    (b"[%8s|%-8s]", (addr(STR), addr(STR)), "[   world|world   ]"),
    (b"%pks %pus", (addr(STR), addr(STR)), "world world"),
    (b"[%s]", (0x10,), "[]"),  # unreadable: empty, like the kernel
    (b"%p", (0x1234,), "0000000000001234"),
    (b"%px %pK %pS", (1, 2, 0xFFFF), "0000000000000001 0000000000000002 000000000000ffff"),
    (b"%pI4 %pi4", (addr(IP4), addr(IP4)), "10.0.0.1 010.000.000.001"),
    (b"%pI6", (addr(IP6),), "2001:0db8:0000:0000:0000:0000:0000:0001"),
    (b"%pi6", (addr(IP6),), "20010db8000000000000000000000001"),
    (b"%pI4", (0x10,), "0.0.0.0"),
    (b"100%% %d%%", (5,), "100% 5%"),
    (b"tab\there", (), "tab\there"),
    (b"", (), ""),
]


@pytest.mark.parametrize("fmt,args,want", FORMATS, ids=[f[0].decode() or "empty" for f in FORMATS])
def test_trace_printk_formats(trace, fmt, args, want):
    assert printk(fmt, *args) == len(want)
    assert trace.messages() == [want]


INVALID = [
    (b"%q", (1,)),
    (b"%d %d %d %d", (1, 2, 3)),  # more specifiers than trace_printk's 3 arguments
    (b"%sX", (0,)),  # %s followed by an alphanumeric
    (b"%pZ", (0,)),
    (b"%pI5", (0,)),
    (b"%", ()),
    (b"%#x", (1,)),
    (b"%.3d", (1,)),
    (b"%hd", (1,)),
    (b"%lllx", (1,)),
    (b"caf\xc3\xa9", ()),  # not ASCII
    (b"bell\x07", ()),
]


@pytest.mark.parametrize("fmt,args", INVALID, ids=[repr(f[0]) for f in INVALID])
def test_trace_printk_invalid_formats(trace, fmt, args):
    assert printk(fmt, *args) == -errno.EINVAL
    assert trace.messages() == []


def test_trace_printk_fmt_size(trace):
    assert printk(b"abc", size=3) == -errno.EINVAL  # no NUL within fmt_size
    assert printk(b"abc", size=0) == -errno.EINVAL
    assert printk(b"abc", size=4) == 3
    assert printk(b"ab\0cd", size=6) == 2  # stops at the first NUL
    assert s64(call("trace_printk", 0x10, 8)) == -errno.EFAULT
    assert trace.messages() == ["abc", "ab"]


def test_trace_printk_long_output_is_cut_but_counted(trace):
    assert printk(b"%1500d", 7) == 1500
    (msg,) = trace.messages()
    assert len(msg) == 1023 and msg == " " * 1023


def test_trace_printk_newline_and_embedded_newlines(trace):
    assert printk(b"one\n") == 4
    assert printk(b"two") == 3
    assert printk(b"a\nb\n") == 4
    assert trace.path.read_text().count("bpf_trace_printk: ") == 3
    assert trace.messages() == ["one", "two", "a\nb"]


def test_trace_vprintk(trace):
    args = ffi.new("uint64_t[]", [1, 2, 3, 4, 5, addr(STR)])
    fmt = ffi.new("char[]", b"%d %d %d %d %d %s")
    assert s64(call("trace_vprintk", addr(fmt), 18, addr(args), 48)) == len("1 2 3 4 5 world")
    assert s64(call("trace_vprintk", addr(fmt), 18, addr(args), 40)) == -errno.EINVAL  # too few
    assert s64(call("trace_vprintk", addr(fmt), 18, addr(args), 44)) == -errno.EINVAL  # not a multiple of 8
    assert s64(call("trace_vprintk", addr(fmt), 18, 0, 48)) == -errno.EINVAL
    assert s64(call("trace_vprintk", addr(fmt), 18, 0x10, 48)) == -errno.EFAULT
    assert trace.messages() == ["1 2 3 4 5 world"]


def test_trace_lines_from_threads_are_whole(trace):
    def worker(n):
        for i in range(200):
            printk(b"thread %d line %d", n, i)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    msgs = trace.messages()
    assert sorted(msgs) == sorted("thread %d line %d" % (n, i) for n in range(4) for i in range(200))


def test_default_trace_file_from_the_environment(tmp_path):
    path = tmp_path / "pipe"
    code = """
        from hybrid import _native
        lib, ffi = _native.lib, _native.ffi
        fmt = ffi.new("char[]", b"from env %d")
        print(lib.hybrid_helper_trace_printk(int(ffi.cast("uintptr_t", fmt)), 12, 7, 0, 0))
    """
    r = _run(code, env={**os.environ, "HYBRID_TRACE_PIPE": str(path)})
    assert r.returncode == 0 and r.stdout == "10\n", r.stderr
    assert path.read_text().endswith(": bpf_trace_printk: from env 7\n")
    assert H.trace_pipe_path() == os.environ.get("HYBRID_TRACE_PIPE", "/dev/shm/hybrid-trace")


def test_a_pipe_without_reader_neither_blocks_nor_kills():
    code = """
        import os, signal
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # Python ignores it; a C program would not
        from hybrid import _native
        lib, ffi = _native.lib, _native.ffi
        r, w = os.pipe()
        os.close(r)
        lib.hybrid_trace_set_fd(w)
        fmt = ffi.new("char[]", b"nobody listens")
        for _ in range(3):
            assert lib.hybrid_helper_trace_printk(int(ffi.cast("uintptr_t", fmt)), 15, 0, 0, 0) == 14
        print("alive")
    """
    r = _run(code)
    assert r.returncode == 0 and r.stdout == "alive\n", r.stderr


def test_a_fifo_gets_lines_once_someone_reads_it(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    code = """
        import sys, time
        from hybrid import _native
        lib, ffi = _native.lib, _native.ffi
        fmt = ffi.new("char[]", b"line %d")
        def printk(n):
            return lib.hybrid_helper_trace_printk(int(ffi.cast("uintptr_t", fmt)), 8, n, 0, 0)
        assert printk(1) == 6  # no reader yet: dropped, not blocked
        print("ready", flush=True)
        sys.stdin.readline()  # the reader is there now
        time.sleep(1.1)  # the open is retried once a second
        assert printk(2) == 6
        print("done", flush=True)
    """
    p = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True, env={**os.environ, "HYBRID_TRACE_PIPE": str(fifo)})
    try:
        assert p.stdout.readline() == "ready\n"
        rfd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        try:
            p.stdin.write("go\n")
            p.stdin.flush()
            assert p.stdout.readline() == "done\n"
            assert p.wait(timeout=30) == 0
            data = os.read(rfd, 4096).decode()
        finally:
            os.close(rfd)
    finally:
        p.kill()
        p.wait()
    assert data.endswith(": bpf_trace_printk: line 2\n") and "line 1" not in data


# --- snprintf, strncmp ----------------------------------------------------------------


def snprintf(size: int, fmt: bytes, *args: int, null: bool = False, data_len: int | None = None):
    out = ffi.new("char[]", max(size, 1) + 8)
    ffi.memmove(out, b"\xaa" * (max(size, 1) + 8), max(size, 1) + 8)
    data = ffi.new("uint64_t[]", [a & M64 for a in args] or [0])
    f = ffi.new("char[]", fmt)
    n = 8 * len(args) if data_len is None else data_len
    r = s64(call("snprintf", 0 if null else addr(out), size, addr(f), addr(data) if args else 0, n))
    return r, bytes(ffi.buffer(out))


def test_snprintf():
    r, out = snprintf(64, b"%d-%s", 42, addr(STR))
    assert r == 9 and out.startswith(b"42-world\0")
    r, out = snprintf(4, b"%d-%s", 42, addr(STR))
    assert r == 9 and out[:5] == b"42-\0\xaa"  # cut: str_size - 1 bytes and a NUL
    r, out = snprintf(1, b"%d", 12345)
    assert r == 6 and out[:2] == b"\0\xaa"
    assert snprintf(0, b"%d-%s", 42, addr(STR), null=True)[0] == 9
    assert snprintf(16, b"no args")[0] == 8
    assert snprintf(16, b"%pI4", addr(IP4))[1].startswith(b"10.0.0.1\0")
    r, out = snprintf(100, b"%llx %u %c", 0xABCDEF0123, 3, ord("z"))
    assert r == len("abcdef0123 3 z") + 1 and out.startswith(b"abcdef0123 3 z\0")


def test_snprintf_errors():
    assert snprintf(16, b"%d %d", 1)[0] == -errno.EINVAL  # more specifiers than data
    assert snprintf(16, b"%d", 1, data_len=4)[0] == -errno.EINVAL  # not a multiple of 8
    assert snprintf(16, b"%d" * 13, *range(13))[0] == -errno.EINVAL  # more than 12 arguments
    assert snprintf(16, b"%k", 1)[0] == -errno.EINVAL
    fmt = ffi.new("char[]", b"%d")
    assert s64(call("snprintf", 0x10, 16, addr(fmt), 0, 0)) == -errno.EINVAL  # %d without data
    assert s64(call("snprintf", 0x10, 16, 0x10, 0, 0)) == -errno.EFAULT  # unreadable format
    assert s64(call("snprintf", 0x10, 16, addr(ffi.new("char[]", b"x")), 0, 0)) == -errno.EFAULT  # bad str


@pytest.mark.parametrize("s1,n,s2,want", [
    (b"hello", 5, b"hello", 0),
    (b"hello", 5, b"help", -1),   # 'l' < 'p'
    (b"help", 4, b"hello", 1),
    (b"hello", 3, b"help", 0),    # only 3 bytes compared
    (b"abc\0xyz", 7, b"abc", 0),  # both end at the NUL
    (b"abc", 3, b"abcd", 0),
    (b"abc", 4, b"abcd", -1),     # s1's NUL against 'd'
    (b"\xff", 1, b"a", 1),        # unsigned bytes
    (b"x" * 200, 200, b"x" * 199 + b"y", -1),
    (b"anything", 0, b"", 0),
])
def test_strncmp(s1, n, s2, want):
    a, b = ffi.new("char[]", s1), ffi.new("char[]", s2)
    assert s64(call("strncmp", addr(a), n, addr(b))) == want


def test_strncmp_bad_pointers():
    a = ffi.new("char[]", b"abc")
    assert call("strncmp", 0x10, 3, addr(a)) == neg(errno.EFAULT)
    assert call("strncmp", addr(a), 3, 0x10) == neg(errno.EFAULT)


# --- jiffies, namespaces, signals, task ------------------------------------------------


def _config_hz() -> int | None:
    try:
        with gzip.open("/proc/config.gz", "rt") as f:
            for line in f:
                if line.startswith("CONFIG_HZ="):
                    return int(line.split("=")[1])
    except OSError:
        return None
    return None


def test_jiffies_hz_is_the_kernels():
    hz = lib.hybrid_jiffies_hz()
    want = _config_hz()
    if want is None:
        assert hz in (100, 250, 300, 1000)
    else:
        assert hz == want


def test_jiffies64_follows_the_kernels_counter():
    hz = lib.hybrid_jiffies_hz()
    a = call("jiffies64")
    time.sleep(0.05)
    b = call("jiffies64")
    assert 0 < b - a <= hz  # it moves, at HZ
    try:
        with open("/proc/timer_list") as f:  # root only
            kernel = next(int(line.split()[1]) for line in f if line.startswith("jiffies:"))
    except (OSError, StopIteration):
        pytest.skip("/proc/timer_list not readable")
    ours = call("jiffies64")
    assert abs(ours - kernel) <= max(3, hz // 50), (ours, kernel)


def _pidns():
    st = os.stat("/proc/self/ns/pid")
    return st.st_dev, st.st_ino, (os.major(st.st_dev) << 20) | os.minor(st.st_dev)


def test_get_ns_current_pid_tgid():
    dev, ino, kdev = _pidns()
    info = ffi.new("struct hybrid_pidns_info *")
    for d in (dev, kdev):
        info.pid = info.tgid = 0
        assert call("get_ns_current_pid_tgid", d, ino, addr(info), 8) == 0
        assert (info.pid, info.tgid) == (threading.get_native_id(), os.getpid())
    for bad in ((dev, ino + 1, 8), (dev + (1 << 32), ino, 8), (dev + 1, ino, 8), (dev, ino, 4)):
        info.pid = info.tgid = 77
        assert call("get_ns_current_pid_tgid", bad[0], bad[1], addr(info), bad[2]) == neg(errno.EINVAL)
        assert info.tgid == 0 or bad[2] == 4
    assert call("get_ns_current_pid_tgid", dev, ino, 0x10, 8) == neg(errno.EFAULT)


def test_get_ns_current_pid_tgid_on_another_thread():
    dev, ino, _ = _pidns()
    got = {}

    def worker():
        info = ffi.new("struct hybrid_pidns_info *")
        got["rc"] = call("get_ns_current_pid_tgid", dev, ino, addr(info), 8)
        got["ids"] = (info.pid, info.tgid, threading.get_native_id())

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert got["rc"] == 0 and got["ids"][0] == got["ids"][2] and got["ids"][1] == os.getpid()


def _wait_for(cond, timeout=2.0):
    end = time.monotonic() + timeout
    while not cond() and time.monotonic() < end:
        time.sleep(0.001)
    return cond()


@pytest.mark.parametrize("helper,sig", [("send_signal_thread", signal.SIGUSR1), ("send_signal", signal.SIGUSR2)])
def test_send_signal_reaches_a_python_handler(helper, sig):
    got = []
    old = signal.signal(sig, lambda s, f: got.append(s))
    try:
        assert call(helper, sig) == 0
        assert _wait_for(lambda: got == [sig])
    finally:
        signal.signal(sig, old)


def test_send_signal_checks_the_signal():
    assert call("send_signal", 65) == neg(errno.EINVAL)
    assert call("send_signal_thread", 1 << 32 | 65) == neg(errno.EINVAL)
    assert call("send_signal", 0) == 0  # signal 0: only checks, like kill(pid, 0)
    assert call("send_signal_thread", 0) == 0


def test_get_current_task_is_null():
    assert call("get_current_task") == 0


# --- the current probe -----------------------------------------------------------------


@pytest.fixture
def regs():
    r = ffi.new("struct hybrid_pt_regs *")
    assert ffi.sizeof(r[0]) == 168
    r.di, r.si, r.dx, r.cx, r.r8, r.r9 = 10, 11, 12, 13, 14, 15
    r.ax, r.ip, r.bp = 99, 0x401000, 0
    return r


@pytest.fixture
def probe():
    p = ffi.new("struct hybrid_probe_ctx *")
    prev = lib.hybrid_probe_enter(p)
    assert prev == ffi.NULL
    try:
        yield p
    finally:
        lib.hybrid_probe_exit()


def test_outside_a_probe(regs):
    assert lib.hybrid_probe_current() == ffi.NULL
    v = ffi.new("uint64_t *", 5)
    for name in ("get_func_ip", "get_attach_cookie", "get_func_arg_cnt"):
        assert call(name, addr(regs)) == 0
    for n in range(6):  # argument count unknown: the 6 register arguments
        assert call("get_func_arg", addr(regs), n, addr(v)) == 0 and v[0] == 10 + n
    assert call("get_func_arg", addr(regs), 6, addr(v)) == neg(errno.EINVAL) and v[0] == 0
    assert call("get_func_arg", addr(regs), 1 << 32, addr(v)) == 0 and v[0] == 10  # n is a u32
    assert call("get_func_ret", addr(regs), addr(v)) == neg(errno.EOPNOTSUPP)
    assert call("override_return", addr(regs), 7) == neg(errno.EINVAL) and regs.ax == 99


def test_in_an_entry_probe(regs, probe):
    probe.func_ip, probe.cookie, probe.nargs = 0x401000, 0xC00C1E, 2
    v = ffi.new("uint64_t *")
    assert call("get_func_ip", addr(regs)) == 0x401000
    assert call("get_attach_cookie", addr(regs)) == 0xC00C1E
    assert call("get_func_arg_cnt", addr(regs)) == 2
    assert call("get_func_arg", addr(regs), 1, addr(v)) == 0 and v[0] == 11
    assert call("get_func_arg", addr(regs), 2, addr(v)) == neg(errno.EINVAL) and v[0] == 0
    assert call("get_func_ret", addr(regs), addr(v)) == neg(errno.EOPNOTSUPP)
    assert call("override_return", addr(regs), -errno.ENOMEM) == 0
    assert regs.ax == neg(errno.ENOMEM) and probe.override == 1 and probe.override_rc == neg(errno.ENOMEM)


def test_in_a_return_probe(regs, probe):
    probe.flags = lib.HYBRID_PROBE_RETURN
    v = ffi.new("uint64_t *")
    assert call("get_func_ret", addr(regs), addr(v)) == 0 and v[0] == 99
    assert call("get_func_ret", 0x10, addr(v)) == neg(errno.EFAULT)
    assert call("get_func_ret", addr(regs), 0x10) == neg(errno.EFAULT)


def test_probe_nesting_and_threads(probe):
    inner = ffi.new("struct hybrid_probe_ctx *")
    inner.cookie = 2
    probe.cookie = 1
    prev = lib.hybrid_probe_enter(inner)
    assert call("get_attach_cookie", 0) == 2
    seen = []
    t = threading.Thread(target=lambda: seen.append(call("get_attach_cookie", 0)))
    t.start()
    t.join()
    assert seen == [0]  # thread-local
    lib.hybrid_probe_restore(prev)
    assert call("get_attach_cookie", 0) == 1


def test_probe_helpers_with_a_bad_context(probe):
    v = ffi.new("uint64_t *", 3)
    assert call("get_func_arg", 0x10, 0, addr(v)) == neg(errno.EFAULT) and v[0] == 0
    assert call("get_func_arg", 0, 0, 0x10) == neg(errno.EFAULT)
    assert call("override_return", 0x10, 1) == neg(errno.EFAULT)


# --- stacks ------------------------------------------------------------------------------


def fake_stack(pages, rets, last_fp):
    """Frames {next fp, return address} in the RW page; the last one's next fp is ``last_fp``."""
    frames = [pages + 64 * k for k in range(len(rets))]
    for k, ret in enumerate(rets):
        nxt = frames[k + 1] if k + 1 < len(frames) else last_fp
        ctypes.memmove(frames[k], nxt.to_bytes(8, "little") + ret.to_bytes(8, "little"), 16)
    return frames[0]


def get_stack(regs, nwords, flags, size=None):
    buf = ffi.new("uint64_t[]", [0xAA] * max(nwords, 1))
    r = s64(call("get_stack", addr(regs), addr(buf), nwords * 8 if size is None else size, flags))
    return r, list(buf)


def test_get_stack_walks_frame_pointers_until_a_bad_frame(pages, regs):
    regs.ip = 0x400100
    regs.bp = fake_stack(pages, [0x1111, 0x2222, 0x3333], pages + PAGE)  # then the PROT_NONE page
    assert get_stack(regs, 8, BPF_F_USER_STACK) == (32, [0x400100, 0x1111, 0x2222, 0x3333, 0, 0, 0, 0])
    assert get_stack(regs, 2, BPF_F_USER_STACK) == (16, [0x400100, 0x1111])
    assert get_stack(regs, 8, BPF_F_USER_STACK | 2) == (16, [0x2222, 0x3333] + [0] * 6)  # skip 2
    assert get_stack(regs, 8, BPF_F_USER_STACK | 4) == (0, [0] * 8)
    assert get_stack(regs, 8, BPF_F_USER_STACK | 5) == (-errno.EFAULT, [0] * 8)  # fewer frames than skip
    regs.bp = 0  # no frame pointer: just the ip
    assert get_stack(regs, 3, BPF_F_USER_STACK) == (8, [0x400100, 0, 0])


def test_get_stack_stops_on_a_cycle_at_the_buffer_size(pages, regs):
    regs.bp = fake_stack(pages, [0x5555], pages)  # a frame that points to itself
    r, ips = get_stack(regs, 16, BPF_F_USER_STACK)
    assert r == 128 and ips == [regs.ip] + [0x5555] * 15


def test_get_stack_depth_limit(pages, regs):
    regs.bp = fake_stack(pages, [0x5555], pages)
    limit = lib.hybrid_max_stack_depth()
    n = limit + 20
    r, ips = get_stack(regs, n, BPF_F_USER_STACK)
    assert r == limit * 8 and ips[limit:] == [0] * 20
    r, ips = get_stack(regs, n, BPF_F_USER_STACK | 10)  # skipped frames count against the limit
    assert r == (limit - 10) * 8
    if limit < 255:  # skipping more than the limit: the walk never gets there
        assert get_stack(regs, 4, BPF_F_USER_STACK | 255) == (-errno.EFAULT, [0] * 4)


def test_get_stack_errors(regs):
    assert get_stack(regs, 4, 0) == (-errno.EFAULT, [0] * 4)  # a kernel stack
    assert get_stack(regs, 4, BPF_F_USER_STACK, size=12) == (-errno.EINVAL, [0, 0, 0xAA, 0xAA])
    assert get_stack(regs, 4, BPF_F_USER_STACK | BPF_F_USER_BUILD_ID)[0] == -errno.EINVAL
    assert get_stack(regs, 4, BPF_F_USER_STACK | 1 << 12)[0] == -errno.EINVAL
    buf = ffi.new("uint64_t[4]")
    assert s64(call("get_stack", 0x10, addr(buf), 32, BPF_F_USER_STACK)) == -errno.EFAULT
    assert s64(call("get_stack", addr(regs), 0x10, 32, BPF_F_USER_STACK)) == -errno.EFAULT


STACK_LIB = r"""
#include <stdint.h>
typedef uint64_t (*helper_t)(uint64_t, uint64_t, uint64_t, uint64_t, uint64_t);
volatile uint64_t sink;

__attribute__((noinline)) uint64_t leaf(helper_t h, uint64_t *regs, uint64_t *buf, uint32_t size) {
    uint64_t bp;
    __asm__ volatile("mov %%rbp, %0" : "=r"(bp));
    regs[4] = bp;                       /* bp */
    regs[16] = (uint64_t)(uintptr_t)leaf;  /* ip */
    uint64_t r = h((uint64_t)(uintptr_t)regs, (uint64_t)(uintptr_t)buf, size, 1 << 8, 0);
    sink = r;
    return r;
}
__attribute__((noinline)) uint64_t mid(helper_t h, uint64_t *regs, uint64_t *buf, uint32_t size) {
    uint64_t r = leaf(h, regs, buf, size);
    sink += 1;
    return r;
}
__attribute__((noinline)) uint64_t top(helper_t h, uint64_t *regs, uint64_t *buf, uint32_t size) {
    uint64_t r = mid(h, regs, buf, size);
    sink += 2;
    return r;
}
"""


@pytest.mark.skipif(shutil.which("cc") is None or os.uname().machine != "x86_64", reason="needs cc on x86-64")
def test_get_stack_of_a_real_frame_pointer_chain(tmp_path):
    src = tmp_path / "stack.c"
    src.write_text(STACK_LIB)
    so = tmp_path / "libstack.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-O2", "-fno-omit-frame-pointer", "-fno-optimize-sibling-calls",
                    "-o", str(so), str(src)], check=True)
    c = ctypes.CDLL(str(so))
    c.top.restype = ctypes.c_uint64
    c.top.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_uint32]
    regs = (ctypes.c_uint64 * 21)()
    buf = (ctypes.c_uint64 * 8)()
    from hybrid import native

    r = c.top(native.helper_address("get_stack"), regs, buf, 64)
    assert r >= 24 and r % 8 == 0
    leaf, mid, top = (ctypes.cast(getattr(c, n), ctypes.c_void_p).value for n in ("leaf", "mid", "top"))
    assert buf[0] == leaf
    assert 0 < buf[1] - mid < 128  # the return address into mid
    assert 0 < buf[2] - top < 128  # ... and into top


def test_collect_user_stack(pages, regs):
    regs.bp = fake_stack(pages, [1, 2, 3], pages + PAGE)
    ips = ffi.new("uint64_t[8]")
    assert lib.hybrid_collect_user_stack(regs, ips, 8, 0) == 4 and list(ips)[:4] == [regs.ip, 1, 2, 3]
    assert lib.hybrid_collect_user_stack(regs, ips, 2, 1) == 2 and list(ips)[:2] == [1, 2]
    assert lib.hybrid_collect_user_stack(regs, ips, 8, 5) == -errno.EFAULT
    assert lib.hybrid_collect_user_stack(ffi.cast("void *", 0x10), ips, 8, 0) == -errno.EFAULT


def test_get_stackid(pages, regs):
    maps = pytest.importorskip("hybrid.user.maps")
    region = maps.Region([maps.MapSpec("stacks", maps.MapType.STACK_TRACE, 4, 8 * 3, 4096)], memfd=True)
    try:
        m = region["stacks"]
        regs.ip = 0x400100
        regs.bp = fake_stack(pages, [0x1111, 0x2222, 0x3333], pages + PAGE)
        sid = s64(call("get_stackid", addr(regs), m.address, BPF_F_USER_STACK))
        assert sid >= 0
        assert m.stack(sid) == [0x400100, 0x1111, 0x2222]  # cut at value_size / 8
        assert s64(call("get_stackid", addr(regs), m.address, BPF_F_USER_STACK)) == sid  # same stack, same id
        # another stack: REUSE so a hash-bucket collision (random seed) cannot make this flaky
        sid2 = s64(call("get_stackid", addr(regs), m.address, BPF_F_USER_STACK | 1 | 1 << 10))
        assert m.stack(sid2) == [0x1111, 0x2222, 0x3333]
        assert s64(call("get_stackid", addr(regs), m.address, BPF_F_USER_STACK | 4)) == -errno.EFAULT
        assert s64(call("get_stackid", addr(regs), m.address, 0)) == -errno.EFAULT  # kernel stack
        assert s64(call("get_stackid", addr(regs), m.address, 1 << 11)) == -errno.EINVAL
        assert s64(call("get_stackid", addr(regs), pages + PAGE, BPF_F_USER_STACK)) == -errno.EINVAL
    finally:
        region.close()


# --- bpf_loop ----------------------------------------------------------------------------


def test_loop_with_a_native_callback():
    calls = []

    @ffi.callback("uint64_t(uint64_t, uint64_t, uint64_t, uint64_t, uint64_t)")
    def cb(i, ctx, a, b, c):
        calls.append((i, ctx, a, b, c))
        return 1 if i == 5 else 0

    fn = addr(cb)
    assert call("loop", 10, fn, 0xC7) == 6
    assert calls == [(i, 0xC7, 0, 0, 0) for i in range(6)]
    calls.clear()
    assert call("loop", 3, fn, 0) == 3 and len(calls) == 3
    assert call("loop", (1 << 32) | 2, fn, 0) == 2  # nr_loops is a u32
    calls.clear()
    assert call("loop", 0, fn, 0) == 0
    assert call("loop", 4, fn, 0, 1) == neg(errno.EINVAL)
    assert call("loop", (1 << 23) + 1, fn, 0) == neg(errno.E2BIG)
    assert call("loop", 3, 0, 0) == neg(errno.EINVAL)
    assert calls == []


# --- through programs, on every engine ------------------------------------------------------


def load(text: str, **kw) -> Program:
    return Program.load(assemble(textwrap.dedent(text)), helpers=TABLE, **kw)


def engine(kind: str, program: Program):
    try:
        return create_engine(kind, program)
    except Exception as e:  # noqa: BLE001 - e.g. no C compiler for AOT
        if kind == "aot":
            pytest.skip("aot engine unavailable: %s" % e)
        raise


BAD_READ_PROG = """
    stdw [%r10-8], 0x1234
    mov %r1, %r10
    add %r1, -8
    mov %r2, 8
    lddw %r3, {src}
    call 112
    ldxdw %r6, [%r10-8]
    jeq %r6, 0, +1
    mov %r0, 1
    exit
"""


@pytest.mark.parametrize("kind", ENGINES)
@pytest.mark.parametrize("src", [0x10, 0xFFFFFFFF81000000, 0x8000000000000000])
def test_probe_read_user_of_a_bad_address_in_a_program(kind, src):
    with engine(kind, load(BAD_READ_PROG.format(src=hex(src)))) as e:
        assert e.run() == neg(errno.EFAULT)
        assert e.run() == neg(errno.EFAULT)  # and again: the process is fine


@pytest.mark.parametrize("kind", ENGINES)
def test_probe_read_user_of_the_context(kind):
    prog = """
        mov %r3, %r1
        mov %r1, %r10
        add %r1, -8
        mov %r2, 8
        call 112
        jne %r0, 0, +1
        ldxdw %r0, [%r10-8]
        exit
    """
    with engine(kind, load(prog)) as e:
        assert e.run(b"12345678") == int.from_bytes(b"12345678", "little")


def test_interpreter_checks_the_destination():
    prog = """
        lddw %r1, 0x10
        mov %r2, 8
        mov %r3, %r10
        add %r3, -8
        call 112
        exit
    """
    p = load(prog)
    with pytest.raises(VmError, match=r"probe_read_user, r1 \(ptr_uninit_mem\)"):
        create_engine("interp", p).run()
    with engine("jit", p) as e:  # native code cannot raise: the safe copy says -EFAULT
        assert e.run() == neg(errno.EFAULT)


def _fmt_program(fmt: bytes, tail: str) -> str:
    """Store ``fmt`` (padded with NULs to 8 bytes) at r10 - len, then ``tail``."""
    data = fmt + b"\0" * (8 - len(fmt) % 8)
    lines = []
    for i in range(0, len(data), 8):
        lines.append("lddw %%r1, 0x%x" % int.from_bytes(data[i:i + 8], "little"))
        lines.append("stxdw [%%r10-%d], %%r1" % (len(data) - i))
    lines.append("mov %%r1, %%r10\nadd %%r1, -%d\nmov %%r2, %d" % (len(data), len(data)))
    return "\n".join(lines) + "\n" + textwrap.dedent(tail)


@pytest.mark.parametrize("kind", ENGINES)
def test_trace_printk_from_a_program(kind, trace):
    prog = _fmt_program(b"hello from %s: %d\n", """
        mov %r3, %r6
        mov %r4, 42
        call 6
        exit
    """)
    # r6: a string in the context, read safely by %s
    prog = "mov %r6, %r1\n" + prog
    with engine(kind, load(prog)) as e:
        assert e.run(b"bpf\0") == len("hello from bpf: 42\n")
    assert trace.messages() == ["hello from bpf: 42"]


@pytest.mark.parametrize("kind", ENGINES)
def test_get_func_arg_from_a_program(kind, probe):
    probe.nargs = 3
    regs = bytearray(168)
    regs[14 * 8:15 * 8] = (1234).to_bytes(8, "little")  # di
    prog = """
        mov %r6, %r1
        mov %r2, 0
        mov %r3, %r10
        add %r3, -8
        call 183
        jne %r0, 0, +3
        ldxdw %r0, [%r10-8]
        exit
        mov %r0, 0
        exit
    """
    with engine(kind, load(prog)) as e:
        assert e.run(regs) == 1234


def _with_function_address(text: str, label_slot: int) -> Program:
    """Assemble ``text``; its ``lddw %r2, 0`` becomes ``lddw %r2, func(slot label_slot)``."""
    insns = list(isa.decode(assemble(textwrap.dedent(text))))
    slots = isa.slot_index(insns)
    for n, insn in enumerate(insns):
        if isa.OPS[insn.opcode].kind is isa.Kind.LDDW:
            insns[n] = dataclasses.replace(insn, src=isa.PSEUDO_FUNC, imm=label_slot - slots[n] - 1, imm_hi=0)
    return Program.load(insns, helpers=TABLE)


LOOP_PROG = """
    stdw [%r10-8], 0
    mov %r1, 10
    lddw %r2, 0
    mov %r3, %r10
    add %r3, -8
    mov %r4, 0
    call 181
    ldxdw %r1, [%r10-8]
    lsh %r0, 32
    or %r0, %r1
    exit
    ldxdw %r3, [%r2]
    add %r3, 1
    stxdw [%r2], %r3
    mov %r0, 0
    jne %r1, 6, +1
    mov %r0, 1
    exit
"""


@pytest.mark.parametrize("kind", ENGINES)
def test_bpf_loop_with_a_program_callback(kind):
    program = _with_function_address(LOOP_PROG, 12)  # the callback starts after main's 12 slots
    with engine(kind, program) as e:
        if kind == "interp" and not hasattr(e.memory, "call_function"):
            e.memory.call_function = e.call_function  # how the interpreter lends helpers its calls
        assert e.run() == (7 << 32) | 7  # stopped after i == 6: 7 calls


def test_bpf_loop_in_the_interpreter_without_call_function_is_a_vm_error():
    class Mem:
        def read(self, addr, size):
            return ctypes.string_at(addr, size)

    with pytest.raises(VmError, match="cannot call back"):
        H.TRACE_HELPERS[181].py(Mem(), 3, 0xC0DE << 48, 0, 0, 0)


def test_every_trace_helper_is_native_and_described():
    from hybrid import native

    for hid, spec in H.TRACE_HELPERS.items():
        assert native.helper_address(spec.native or spec.name)
        assert spec.args is not None and all(k in H.ARG_KINDS for k in spec.args), spec.name
        for i, k in enumerate(spec.args):
            if k in ("ptr_mem", "ptr_uninit_mem", "str", "ptr_mem_or_null", "ptr_uninit_mem_or_null"):
                assert spec.args[i + 1] == "size", spec.name
    assert not set(H.TRACE_HELPERS) & set(H.BASE_HELPERS)


@pytest.mark.parametrize("kind", ["interp", "jit"])
def test_snprintf_with_null_data_is_einval_on_every_engine(kind):
    prog = _fmt_program(b"%d", """
        mov %r3, %r1
        mov %r1, 0
        mov %r2, 0
        mov %r4, 0
        mov %r5, 8
        call 165
        exit
    """)
    with engine(kind, load(prog)) as e:
        assert e.run() == neg(errno.EINVAL)


def test_interpreter_refuses_a_format_outside_its_memory():
    prog = """
        lddw %r1, 0x10
        mov %r2, 4
        call 6
        exit
    """
    with pytest.raises(VmError, match=r"trace_printk, r1 \(str\)"):
        create_engine("interp", load(prog)).run()
    with engine("jit", load(prog)) as e:
        assert e.run() == neg(errno.EFAULT)
