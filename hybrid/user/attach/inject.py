"""Process injection: call functions inside another running process (ptrace).

:func:`inject_and_call` is the whole operation the attach code needs::

    result = inject_and_call(pid, "/path/libhybrid_agent.so", "hybrid_agent_apply_file", spec_path)

It stops ONE thread of the target (the main thread when it can), makes it
``dlopen`` the library, looks the function up with ``dlsym``, calls it with a
pointer to a copy of the string, puts every register back exactly as it was
and lets the thread go.  The other threads of the target keep running all
along (the injected code must be thread-safe on its own).

:class:`RemoteProcess` is the lower level: a ptrace session on one thread
with :meth:`~RemoteProcess.call` (a remote function call), memory access
through ``/proc/PID/mem``, string allocation in scratch memory below the
thread's stack, symbol lookup in the target's libraries and remote
``dlopen``/``dlsym``.

How a remote call works (x86-64, System V ABI):

* ``PTRACE_SEIZE`` + ``PTRACE_INTERRUPT`` stop the thread; its general
  registers (``PTRACE_GETREGS``) and full FP/vector state (``PTRACE_GETREGSET
  NT_X86_XSTATE``, falling back to ``PTRACE_GETFPREGS``) are saved.
* A frame is built below the red zone and the scratch strings: ``rsp`` is
  aligned so that ``rsp % 16 == 8`` at function entry, and the pushed return
  address is 0.  When the function returns, the thread faults on address 0
  and reports a SIGSEGV signal-delivery-stop with ``rip == 0``: that is our
  "call finished" trap.  The SIGSEGV is then discarded (never delivered).
* ``orig_rax = -1`` so the kernel does not try to restart an interrupted
  system call into the middle of our call (see :meth:`RemoteProcess.call`).
* Afterwards the saved registers are written back unchanged, so a system call
  the thread was blocked in (``read``, ``nanosleep``...) restarts exactly as
  the kernel intended.

Limitations (also in the docstrings): the stopped thread may hold a lock the
injected function needs (``malloc``'s arena lock, the dynamic loader's lock,
stdio locks): then the call deadlocks, times out, and is abandoned with that
lock possibly still held by the abandoned call.  A process with SIGSEGV
blocked in every thread, or ignored, is refused (the trap would reset its
SIGSEGV disposition).  Only x86-64 Linux, glibc (or any libc exporting
``dlopen``), dynamically linked targets.
"""

from __future__ import annotations

import ctypes
import errno as _errno
import os
import re
import signal
import struct
import threading
import time
from dataclasses import dataclass

from hybrid.closable import Closable
from hybrid.errors import InjectError

__all__ = [
    "RTLD_LAZY",
    "RTLD_NOW",
    "RTLD_GLOBAL",
    "RemoteProcess",
    "Mapping",
    "inject_and_call",
    "process_maps",
    "find_module",
    "symbol_address",
]

# -ERESTARTSYS, -ERESTARTNOINTR, -ERESTARTNOHAND, -ERESTART_RESTARTBLOCK: a stopped thread's interrupted
# system call that the kernel restarts when the thread resumes without a signal (rip -= 2)
_RESTART_ERRNOS = (-512, -513, -514, -516)
_NR_RESTART_SYSCALL = 219  # x86-64

RTLD_LAZY = 0x1
RTLD_NOW = 0x2
RTLD_GLOBAL = 0x100
_RTLD_DLOPEN = 0x80000000  # __libc_dlopen_mode's internal flag (old glibc fallback)

# ptrace requests and constants (<sys/ptrace.h>, <linux/elf.h>)
_PTRACE_CONT = 7
_PTRACE_GETREGS = 12
_PTRACE_SETREGS = 13
_PTRACE_GETFPREGS = 14
_PTRACE_SETFPREGS = 15
_PTRACE_DETACH = 17
_PTRACE_GETSIGINFO = 0x4202
_PTRACE_SETSIGINFO = 0x4203
_PTRACE_GETREGSET = 0x4204
_PTRACE_SETREGSET = 0x4205
_PTRACE_SEIZE = 0x4206
_PTRACE_INTERRUPT = 0x4207
_PTRACE_EVENT_STOP = 128
_NT_X86_XSTATE = 0x202
_WALL = 0x40000000

_RED_ZONE = 128
_SCRATCH_MAX = 64 * 1024
_SIGRTMIN = 34
# signals a fault in the called code raises (si_code > 0 = sent by the kernel)
_FAULT_SIGNALS = frozenset(
    (signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE, signal.SIGTRAP, signal.SIGSYS)
)


class _Regs(ctypes.Structure):
    """``struct user_regs_struct`` of x86-64 (<sys/user.h>)."""

    _fields_ = [
        (name, ctypes.c_ulonglong)
        for name in (
            "r15 r14 r13 r12 rbp rbx r11 r10 r9 r8 rax rcx rdx rsi rdi orig_rax "
            "rip cs eflags rsp ss fs_base gs_base ds es fs gs"
        ).split()
    ]

    def copy(self) -> "_Regs":
        new = _Regs()
        ctypes.memmove(ctypes.byref(new), ctypes.byref(self), ctypes.sizeof(self))
        return new


class _IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


_libc = ctypes.CDLL(None, use_errno=True)
_ptrace_fn = _libc.ptrace
_ptrace_fn.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
_ptrace_fn.restype = ctypes.c_long


def _ptrace(request: int, tid: int, addr=None, data=None) -> int:
    """ptrace(2); raises OSError with the errno on failure (never used for PEEK requests)."""
    ctypes.set_errno(0)
    r = _ptrace_fn(request, tid, addr, data)
    if r == -1:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return r


def _signame(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return "signal %d" % sig


# --- /proc/PID/maps and symbols (no ptrace needed) ----------------------------------


@dataclass(frozen=True)
class Mapping:
    """One line of ``/proc/PID/maps``."""

    start: int
    end: int
    perms: str
    offset: int
    dev: int  # os.makedev(major, minor)
    inode: int
    path: str


def process_maps(pid: int) -> list[Mapping]:
    """The mappings of process ``pid`` (``InjectError`` when it is gone or unreadable)."""
    try:
        with open("/proc/%d/maps" % pid) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise InjectError("no process %d" % pid) from None
    except OSError as e:
        raise InjectError("cannot read /proc/%d/maps: %s" % (pid, e.strerror)) from None
    out = []
    for line in lines:
        parts = line.split(None, 5)
        if len(parts) < 5:
            continue
        start, end = (int(x, 16) for x in parts[0].split("-"))
        major, minor = (int(x, 16) for x in parts[3].split(":"))
        path = parts[5] if len(parts) > 5 else ""
        dev = os.makedev(major, minor)
        out.append(Mapping(start, end, parts[1], int(parts[2], 16), dev, int(parts[4]), path))
    return out


def _target_file(pid: int, path: str) -> str:
    """The path under which we can open the target's file ``path`` (its mount namespace may differ)."""
    rooted = "/proc/%d/root%s" % (pid, path)
    return rooted if os.path.exists(rooted) else path


_LIBC_RE = re.compile(r"^libc(\.so(\.\d+)*|-[\d.]+\.so)$")


def _matches(m: Mapping, library: str, ident: tuple[int, int] | None) -> bool:
    if not m.path.startswith("/"):
        return False
    if "/" in library:
        return m.path == library or (ident is not None and (m.dev, m.inode) == ident)
    base = os.path.basename(m.path)
    if library == "libc":
        return bool(_LIBC_RE.match(base))
    return base == library or base.startswith(library + ".so") or base.startswith(library + "-")


def find_module(pid: int, library: str, maps: list[Mapping] | None = None) -> tuple[str, int] | None:
    """``(path, load_bias)`` of the object ``library`` loaded in process ``pid``, or ``None``.

    ``library`` is a path (matched by path or by device and inode) or a basename
    (``"libc.so.6"``, ``"libdl"``; the special name ``"libc"`` matches ``libc.so.6`` and
    ``libc-2.31.so``).  The load bias is what ``dl_iterate_phdr`` calls ``dlpi_addr``:
    run-time address = load bias + VADDR.
    """
    maps = process_maps(pid) if maps is None else maps
    ident = None
    if "/" in library:
        try:
            st = os.stat(_target_file(pid, library))
            ident = (st.st_dev, st.st_ino)
        except OSError:
            pass
    hits = [m for m in maps if _matches(m, library, ident)]
    if not hits:
        return None
    path = hits[0].path
    hits = [m for m in hits if m.path == path]
    first = min(hits, key=lambda m: m.start)
    table = _elf_symbols(_target_file(pid, path))
    for vaddr, offset, _filesz in table.loads:
        if offset & ~0xFFF == first.offset:
            return path, first.start - (vaddr & ~0xFFF)
    # no PT_LOAD matches the first mapping's offset: assume the usual layout
    vaddr0 = table.loads[0][0] & ~0xFFF if table.loads else 0
    return path, first.start - vaddr0


@dataclass
class _SymbolTable:
    loads: list[tuple[int, int, int]]  # (p_vaddr, p_offset, p_filesz) of each PT_LOAD
    symbols: dict[str, tuple[int, bool]]  # name -> (st_value, is_ifunc), defined symbols, default version


def _elf_symbols(path: str) -> _SymbolTable:
    """PT_LOADs and defined ``.dynsym`` symbols of the ELF file ``path`` (cached by inode and mtime)."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise InjectError("cannot read %s: %s" % (path, e.strerror)) from None
    key = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
    table = _SYMBOL_CACHE.get(key)
    if table is None:
        table = _read_elf_symbols(path)
        if len(_SYMBOL_CACHE) >= 64:
            _SYMBOL_CACHE.pop(next(iter(_SYMBOL_CACHE)))
        _SYMBOL_CACHE[key] = table
    return table


_SYMBOL_CACHE: dict[tuple[int, int, int, int], _SymbolTable] = {}
_STT_WANTED = {0: False, 1: False, 2: False, 10: True}  # NOTYPE OBJECT FUNC GNU_IFUNC -> is_ifunc


def _read_elf_symbols(path: str) -> _SymbolTable:
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile

    try:
        with open(path, "rb") as f:
            elf = ELFFile(f)
            if elf.elfclass != 64 or not elf.little_endian:
                raise InjectError("%s is not a 64-bit little-endian ELF file" % path)
            loads = sorted(
                (seg["p_vaddr"], seg["p_offset"], seg["p_filesz"])
                for seg in elf.iter_segments()
                if seg["p_type"] == "PT_LOAD"
            )
            symbols: dict[str, tuple[int, bool]] = {}
            dynsym = elf.get_section_by_name(".dynsym")
            if dynsym is not None:
                # Raw Elf64_Sym records (pyelftools' per-symbol objects are ~100x slower on libc).
                strtab = elf.get_section(dynsym["sh_link"]).data()
                versym = elf.get_section_by_name(".gnu.version")
                versions = versym.data() if versym is not None else b""
                for i, (name, info, _other, shndx, value, _size) in enumerate(
                    struct.iter_unpack("<IBBHQQ", dynsym.data())
                ):
                    if not name or shndx == 0 or (info & 0xF) not in _STT_WANTED:
                        continue
                    sym = strtab[name : strtab.index(b"\0", name)].decode(errors="replace")
                    hidden = len(versions) >= 2 * i + 2 and bool(versions[2 * i + 1] & 0x80)
                    if hidden and sym in symbols:
                        continue  # keep the default version (name@@VER) over name@VER
                    symbols[sym] = (value, _STT_WANTED[info & 0xF])
    except (OSError, ELFError, ValueError, struct.error) as e:
        raise InjectError("cannot read the ELF symbols of %s: %s" % (path, e)) from None
    return _SymbolTable(loads, symbols)


def _symbol(pid: int, library: str, symbol: str, maps=None) -> tuple[int, bool] | None:
    """(absolute address, is_ifunc) of ``symbol`` in ``library`` loaded in ``pid``, or None."""
    mod = find_module(pid, library, maps)
    if mod is None:
        return None
    path, bias = mod
    hit = _elf_symbols(_target_file(pid, path)).symbols.get(symbol)
    if hit is None:
        return None
    return bias + hit[0], hit[1]


def symbol_address(pid: int, library: str, symbol: str) -> int:
    """Run-time address of ``symbol`` (from ``.dynsym``) in ``library`` as loaded in process ``pid``.

    Does not stop the process.  For an IFUNC symbol this is the resolver's address
    (:meth:`RemoteProcess.symbol_address` calls the resolver).
    """
    maps = process_maps(pid)
    if find_module(pid, library, maps) is None:
        raise InjectError("process %d has no library %s loaded" % (pid, library))
    hit = _symbol(pid, library, symbol, maps)
    if hit is None:
        raise InjectError("symbol %s not found in %s of process %d" % (symbol, library, pid))
    return hit[0]


def _require_dynamic(pid: int, maps: list[Mapping]) -> None:
    if find_module(pid, "libc", maps) is None and not any(
        os.path.basename(m.path).startswith("ld-linux") for m in maps
    ):
        raise InjectError("process %d is statically linked: hybrid cannot inject into it" % pid)


# --- the ptrace session ---------------------------------------------------------------


def _task_status(pid: int, tid: int) -> dict[str, str]:
    out = {}
    try:
        with open("/proc/%d/task/%d/status" % (pid, tid)) as f:
            for line in f:
                k, _, v = line.partition(":")
                out[k] = v.strip()
    except OSError:
        pass
    return out


def _sig_in_mask(mask_hex: str, sig: int) -> bool:
    try:
        return bool(int(mask_hex, 16) >> (sig - 1) & 1)
    except ValueError:
        return False


class RemoteProcess(Closable):
    """A ptrace session on one thread of process ``pid``; that thread is stopped until :meth:`close`.

    ``tid`` picks the thread; by default the main thread (or, if it is a zombie or blocks
    SIGSEGV, another one).  Only that thread stops; the others keep running.  All calls
    must come from the thread that created the session (ptrace's rule: the tracer is a
    thread).  Use as a context manager or call :meth:`close`, which puts the registers
    back, re-delivers the signals that arrived meanwhile and detaches.
    """

    def __init__(self, pid: int, tid: int | None = None, *, timeout: float = 5.0):
        self.pid = pid
        self.tid = 0
        self._owner = threading.get_ident()
        self._attached = False
        self._alive = True
        self._mem_fd = -1
        self._deferred: list[tuple[int, bytes]] = []  # signals that arrived during our calls
        self._in_signal_stop = False  # the last stop was a signal-delivery-stop
        self._regs: _Regs | None = None
        self._fp: bytes | None = None
        self._fp_regset = False
        self._scratch_used = 0
        self._dirty = False  # the thread's registers are not the saved ones
        self.tid = self._choose_thread(pid, tid)
        try:
            self._seize(timeout)
            self._mem_fd = os.open("/proc/%d/mem" % pid, os.O_RDWR | os.O_CLOEXEC)
            self._regs = self._getregs()
            self._fp = self._get_fp()
        except BaseException:
            self.close()
            raise

    # --- attaching --------------------------------------------------------------------

    @staticmethod
    def _choose_thread(pid: int, tid: int | None) -> int:
        import psutil

        if pid == os.getpid():
            raise InjectError("cannot inject into the calling process %d itself" % pid)
        try:
            proc = psutil.Process(pid)
            status = proc.status()
        except psutil.NoSuchProcess:
            raise InjectError("no process %d" % pid) from None
        except psutil.AccessDenied:
            raise InjectError(
                "cannot ptrace process %d: Operation not permitted (are you root? ptrace_scope?)" % pid
            ) from None
        tgid = int(_task_status(pid, pid).get("Tgid", pid) or pid)
        if tgid != pid:
            raise InjectError("%d is a thread of process %d, not a process (pass tid=%d)" % (pid, tgid, pid))
        try:
            tids = sorted(int(t) for t in os.listdir("/proc/%d/task" % pid))
        except OSError:
            raise InjectError("no process %d" % pid) from None
        live = {}
        for t in tids:
            st = _task_status(pid, t)
            if st and st.get("State", "Z")[:1] not in ("Z", "X"):
                live[t] = st
        if not live:
            if status == psutil.STATUS_ZOMBIE or tids:
                raise InjectError("process %d is a zombie" % pid)
            raise InjectError("no process %d" % pid)
        if _sig_in_mask(live[next(iter(live))].get("SigIgn", "0"), signal.SIGSEGV):
            raise InjectError(
                "process %d ignores SIGSEGV: hybrid's call trap would reset that disposition, refusing" % pid
            )
        if tid is not None:
            if tid not in live:
                raise InjectError("process %d has no live thread %d" % (pid, tid))
            return tid
        ok = [t for t in live if not _sig_in_mask(live[t].get("SigBlk", "0"), signal.SIGSEGV)]
        if not ok:
            raise InjectError(
                "every thread of process %d blocks SIGSEGV: hybrid's call trap would reset its "
                "disposition, refusing" % pid
            )
        return pid if pid in ok else ok[0]

    def _seize(self, timeout: float) -> None:
        try:
            _ptrace(_PTRACE_SEIZE, self.tid, None, None)
        except OSError as e:
            if e.errno == _errno.ESRCH:
                raise InjectError("no process %d" % self.pid) from None
            tracer = _task_status(self.pid, self.tid).get("TracerPid", "0")
            if e.errno == _errno.EPERM and tracer not in ("0", ""):
                raise InjectError(
                    "cannot ptrace process %d: it is already traced by process %s" % (self.pid, tracer)
                ) from None
            raise InjectError(
                "cannot ptrace process %d: %s (are you root? ptrace_scope?)" % (self.pid, e.strerror)
            ) from None
        self._attached = True
        self._ptrace(_PTRACE_INTERRUPT)
        # Wait for the interrupt's PTRACE_EVENT_STOP (or a group-stop if the process was
        # stopped).  A signal arriving first reports a signal-delivery-stop: keep it for
        # later (re-delivered at close) and go on waiting for the interrupt.
        deadline = time.monotonic() + timeout
        while True:
            try:
                status = self._wait(deadline, "stopping thread %d" % self.tid)
            except TimeoutError:
                raise InjectError(
                    "thread %d of process %d did not stop within %g s (uninterruptible sleep?)"
                    % (self.tid, self.pid, timeout)
                ) from None
            sig, event = os.WSTOPSIG(status), status >> 16
            if event == _PTRACE_EVENT_STOP:
                self._in_signal_stop = False
                return
            if event == 0:
                self._defer(sig)
            self._ptrace(_PTRACE_CONT, None, 0)

    # --- low level ----------------------------------------------------------------

    def _check(self) -> None:
        if not self._attached:
            raise InjectError("the ptrace session on process %d is closed" % self.pid)
        if not self._alive:
            raise InjectError("process %d (thread %d) is gone" % (self.pid, self.tid))
        if threading.get_ident() != self._owner:
            raise InjectError("a RemoteProcess must be used from the thread that created it (ptrace rule)")

    def _ptrace(self, request: int, addr=None, data=None) -> int:
        try:
            return _ptrace(request, self.tid, addr, data)
        except OSError as e:
            if e.errno == _errno.ESRCH and not os.path.exists("/proc/%d/task/%d" % (self.pid, self.tid)):
                self._alive = False
                raise InjectError("process %d (thread %d) is gone" % (self.pid, self.tid)) from None
            raise InjectError(
                "ptrace(%#x) on thread %d of process %d: %s" % (request, self.tid, self.pid, e.strerror)
            ) from None

    def _wait(self, deadline: float, what: str) -> int:
        """waitpid(tid, __WALL) until the thread stops: its status.

        InjectError when the thread exited or was killed, TimeoutError at ``deadline``.
        """
        delay = 2e-5
        while True:
            try:
                wpid, status = os.waitpid(self.tid, os.WNOHANG | _WALL)
            except ChildProcessError:
                self._alive = False
                raise InjectError("process %d (thread %d) is gone (while %s)" % (self.pid, self.tid, what)) from None
            if wpid:
                if os.WIFSTOPPED(status):
                    return status
                self._alive = False
                if os.WIFSIGNALED(status):
                    how = "was killed by %s" % _signame(os.WTERMSIG(status))
                else:
                    how = "exited with status %d" % os.WEXITSTATUS(status)
                raise InjectError("process %d (thread %d) %s while %s" % (self.pid, self.tid, how, what))
            now = time.monotonic()
            if now >= deadline:
                raise TimeoutError(what)
            time.sleep(min(delay, deadline - now))
            delay = min(delay * 2, 0.002)

    def _getregs(self) -> _Regs:
        regs = _Regs()
        self._ptrace(_PTRACE_GETREGS, None, ctypes.addressof(regs))
        return regs

    def _setregs(self, regs: _Regs) -> None:
        self._ptrace(_PTRACE_SETREGS, None, ctypes.addressof(regs))

    def _get_fp(self) -> bytes:
        buf = ctypes.create_string_buffer(16384)
        iov = _IoVec(ctypes.addressof(buf), len(buf))
        try:
            _ptrace(_PTRACE_GETREGSET, self.tid, _NT_X86_XSTATE, ctypes.addressof(iov))
            self._fp_regset = True
            return buf.raw[: iov.iov_len]
        except OSError:
            self._fp_regset = False
        fp = ctypes.create_string_buffer(512)
        self._ptrace(_PTRACE_GETFPREGS, None, ctypes.addressof(fp))
        return fp.raw

    def _set_fp(self, data: bytes) -> None:
        buf = ctypes.create_string_buffer(data, len(data))
        if self._fp_regset:
            iov = _IoVec(ctypes.addressof(buf), len(data))
            self._ptrace(_PTRACE_SETREGSET, _NT_X86_XSTATE, ctypes.addressof(iov))
        else:
            self._ptrace(_PTRACE_SETFPREGS, None, ctypes.addressof(buf))

    def _siginfo(self) -> bytes:
        buf = ctypes.create_string_buffer(128)
        self._ptrace(_PTRACE_GETSIGINFO, None, ctypes.addressof(buf))
        return buf.raw

    def _defer(self, sig: int) -> None:
        """Remember a signal that arrived while we hold the thread; it is delivered at close."""
        info = self._siginfo()
        if sig < _SIGRTMIN and any(s == sig for s, _ in self._deferred):
            return  # standard signals do not queue
        self._deferred.append((sig, info))

    def _restore(self) -> None:
        """Put back the registers and FP state saved when the thread was stopped."""
        self._setregs(self._regs)
        self._set_fp(self._fp)
        self._dirty = False

    # --- memory -------------------------------------------------------------------

    def read_memory(self, address: int, n: int) -> bytes:
        """``n`` bytes at ``address`` in the target (``/proc/PID/mem``)."""
        self._check()
        try:
            data = os.pread(self._mem_fd, n, address)
        except OSError as e:
            data, why = b"", e.strerror
        else:
            why = "short read"
        if len(data) != n:
            raise InjectError("cannot read %d bytes at %#x in process %d: %s" % (n, address, self.pid, why))
        return data

    def write_memory(self, address: int, data: bytes) -> None:
        """Write ``data`` at ``address`` in the target (``/proc/PID/mem``, works on read-only pages too)."""
        self._check()
        data = bytes(data)
        try:
            n = os.pwrite(self._mem_fd, data, address)
        except OSError as e:
            n, why = -1, e.strerror
        else:
            why = "short write"
        if n != len(data):
            raise InjectError("cannot write %d bytes at %#x in process %d: %s" % (len(data), address, self.pid, why))

    def read_string(self, address: int, limit: int = 4096) -> bytes:
        """The NUL-terminated string at ``address`` (at most ``limit`` bytes, NUL excluded)."""
        out = b""
        while len(out) < limit:
            chunk = min(256, 4096 - (address + len(out)) % 4096, limit - len(out))
            data = self.read_memory(address + len(out), chunk)
            nul = data.find(b"\0")
            if nul >= 0:
                return out + data[:nul]
            out += data
        return out

    def alloc(self, data: bytes, align: int = 16) -> int:
        """Copy ``data`` into scratch memory below the thread's stack (and its red zone); its address.

        The memory is valid until :meth:`close` (the thread reuses its stack afterwards):
        a called function must copy what it wants to keep.
        """
        self._check()
        data = bytes(data)
        top = self._regs.rsp - _RED_ZONE
        used = (self._scratch_used + len(data) + align - 1) // align * align
        if used > _SCRATCH_MAX:
            raise InjectError("scratch memory of %d bytes exhausted in process %d" % (_SCRATCH_MAX, self.pid))
        address = (top - used) & ~(align - 1)
        self.write_memory(address, data)
        self._scratch_used = top - address
        return address

    def alloc_string(self, s: str | bytes) -> int:
        """Copy ``s`` (UTF-8 if str) NUL-terminated into the target (see :meth:`alloc`); its address."""
        if isinstance(s, str):
            s = s.encode()
        if b"\0" in s:
            raise InjectError("string for process %d contains a NUL byte" % self.pid)
        return self.alloc(s + b"\0")

    # --- calls --------------------------------------------------------------------

    def call(self, func_address: int, *args: int, timeout: float = 5.0) -> int:
        """Call ``func_address(*args)`` (up to 6 integer/pointer args) on the stopped thread; rax (u64).

        The registers are restored afterwards, also on errors.  A signal arriving during the
        call is held back and delivered at :meth:`close`.  A fault in the function (SIGSEGV,
        SIGBUS, ...) or a timeout raises :class:`InjectError` (the call is abandoned; the thread
        goes on from where it was stopped).
        """
        self._check()
        if len(args) > 6:
            raise InjectError("a remote call takes at most 6 arguments, got %d" % len(args))
        if not func_address:
            raise InjectError("remote call to address 0")
        saved = self._regs
        regs = saved.copy()
        # Frame: below the red zone and the scratch strings; rsp % 16 == 8 at the entry of
        # the function, as after a `call` from 16-byte aligned code.  The return address is 0:
        # the function's `ret` jumps to 0 and the fault stops the thread (our trap).
        frame = (saved.rsp - _RED_ZONE - self._scratch_used - 256) & ~0xF
        sp = frame - 8
        self.write_memory(sp, b"\0" * 8)
        regs.rsp = sp
        regs.rip = func_address
        regs.rax = 0  # al = number of vector registers holding arguments (variadic callees)
        for name, value in zip(("rdi", "rsi", "rdx", "rcx", "r8", "r9"), args):
            setattr(regs, name, int(value) & 0xFFFFFFFFFFFFFFFF)
        regs.eflags &= ~(0x400 | 0x100)  # DF = 0 as the ABI wants; no single-step
        # orig_rax = -1: "not in a system call".  If the thread was stopped inside a
        # blocking system call (read, nanosleep...), the kernel would otherwise apply
        # its restart logic (rip -= 2, rax = orig_rax) to OUR registers when the thread
        # resumes.  With -1 it leaves them alone; the real restart happens when we put
        # the saved registers back (see _finish).
        regs.orig_rax = 0xFFFFFFFFFFFFFFFF
        self._setregs(regs)
        self._dirty = True
        what = "calling %#x in process %d" % (func_address, self.pid)
        deadline = time.monotonic() + timeout
        try:
            self._ptrace(_PTRACE_CONT, None, 0)
            self._in_signal_stop = False
            while True:
                try:
                    status = self._wait(deadline, what)
                except TimeoutError:
                    return self._timed_out(func_address, timeout, sp)
                done = self._on_stop(status, sp, func_address)
                if done is not None:
                    return done
        finally:
            self._finish()

    def _on_stop(self, status: int, sp: int, func_address: int) -> int | None:
        """Handle one stop during a call: the result when the call is done, else None (resumed)."""
        sig, event = os.WSTOPSIG(status), status >> 16
        if event != 0:
            # PTRACE_EVENT_STOP: a group-stop (SIGSTOP to the process) or a late interrupt.
            self._in_signal_stop = False
            self._ptrace(_PTRACE_CONT, None, 0)
            return None
        self._in_signal_stop = True
        regs = self._getregs()
        if sig == signal.SIGSEGV and regs.rip == 0 and regs.rsp == sp + 8:
            return regs.rax  # the function returned to our address 0
        info = self._siginfo()
        si_code = struct.unpack_from("<i", info, 8)[0]
        if sig in _FAULT_SIGNALS and si_code > 0:
            if self._handles(sig):
                # The target catches it: hybrid's agent sends int3 traps of sites being patched to their
                # trampolines and turns faults of safe copies into -EFAULT.  Deliver it now.
                self._in_signal_stop = False
                self._ptrace(_PTRACE_CONT, None, sig)
                return None
            fault = struct.unpack_from("<Q", info, 16)[0]
            raise InjectError(
                "the call to %#x in process %d crashed: %s at rip %#x (fault address %#x); "
                "the call was abandoned" % (func_address, self.pid, _signame(sig), regs.rip, fault)
            )
        self._defer(sig)
        self._ptrace(_PTRACE_CONT, None, 0)  # held back, delivered at close
        return None

    def _handles(self, sig: int) -> bool:
        """Whether the stopped thread has a handler for ``sig`` (SigCgt in /proc/PID/task/TID/status)."""
        try:
            with open("/proc/%d/task/%d/status" % (self.pid, self.tid)) as f:
                for line in f:
                    if line.startswith("SigCgt:"):
                        return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
        except (OSError, ValueError, IndexError):
            pass
        return False

    def _timed_out(self, func_address: int, timeout: float, sp: int) -> int:
        self._ptrace(_PTRACE_INTERRUPT)
        deadline = time.monotonic() + 2.0
        while True:
            try:
                status = self._wait(deadline, "interrupting a timed-out call")
            except TimeoutError:
                raise InjectError(
                    "the call to %#x in process %d timed out after %g s and thread %d cannot be "
                    "stopped again; the process is left running the call"
                    % (func_address, self.pid, timeout, self.tid)
                ) from None
            if status >> 16 == _PTRACE_EVENT_STOP:
                self._in_signal_stop = False
                break
            done = self._on_stop(status, sp, func_address)
            if done is not None:
                return done  # it finished just now
        raise InjectError(
            "the call to %#x in process %d timed out after %g s (the stopped thread may hold a lock "
            "the function needs, e.g. malloc's); the call was abandoned" % (func_address, self.pid, timeout)
        )

    def _finish(self) -> None:
        """Put the saved registers back after a call (success or not).

        They are restored exactly, orig_rax and rax included: if the thread had been stopped
        inside an interrupted system call (orig_rax = its number, rax = -ERESTARTSYS,
        -ERESTART_RESTARTBLOCK...), the kernel's signal-exit path runs its restart logic on
        these registers when the thread resumes (we resume it with the SIGSEGV trap
        discarded, i.e. "no signal delivered"), so the system call is restarted exactly as
        if we had never been there.
        """
        if self._alive and self._attached and self._dirty:
            try:
                self._restore()
            except InjectError:
                pass

    # --- symbols, dlopen ------------------------------------------------------------

    def symbol_address(self, library: str, symbol: str) -> int:
        """Run-time address of ``symbol`` in ``library`` (see :func:`find_module`); IFUNCs are resolved."""
        self._check()
        maps = process_maps(self.pid)
        if find_module(self.pid, library, maps) is None:
            if library == "libc" or _LIBC_RE.match(os.path.basename(library)):
                _require_dynamic(self.pid, maps)
            raise InjectError("process %d has no library %s loaded" % (self.pid, library))
        hit = _symbol(self.pid, library, symbol, maps)
        if hit is None:
            raise InjectError("symbol %s not found in %s of process %d" % (symbol, library, self.pid))
        address, ifunc = hit
        return self.call(address) if ifunc else address

    def _libc_symbol(self, *candidates: tuple[str, str]) -> tuple[str, int] | None:
        maps = process_maps(self.pid)
        _require_dynamic(self.pid, maps)
        for library, name in candidates:
            hit = _symbol(self.pid, library, name, maps)
            if hit is not None:
                return name, (self.call(hit[0]) if hit[1] else hit[0])
        return None

    def remote_dlerror(self) -> str | None:
        """The target thread's ``dlerror()`` text (None when there is none or no dlerror)."""
        found = self._libc_symbol(("libc", "dlerror"), ("libdl", "dlerror"))
        if found is None:
            return None
        msg = self.call(found[1])
        return self.read_string(msg).decode(errors="replace") if msg else None

    def remote_dlopen(self, path: str, flags: int = RTLD_NOW | RTLD_GLOBAL, *, timeout: float = 5.0) -> int:
        """``dlopen(path, flags)`` in the target; the handle (already loaded: refcount + 1).

        glibc >= 2.34 has ``dlopen`` in libc.so.6; older ones in libdl.so.2 when the program
        links it, else ``__libc_dlopen_mode`` is used.
        """
        self._check()
        found = self._libc_symbol(("libc", "dlopen"), ("libdl", "dlopen"), ("libc", "__libc_dlopen_mode"))
        if found is None:
            raise InjectError("process %d has no dlopen (no libc exports dlopen or __libc_dlopen_mode)" % self.pid)
        name, dlopen = found
        if name == "__libc_dlopen_mode":
            flags |= _RTLD_DLOPEN
        handle = self.call(dlopen, self.alloc_string(path), flags, timeout=timeout)
        if not handle:
            reason = self.remote_dlerror() or "unknown error"
            raise InjectError("dlopen(%s) in process %d failed: %s" % (path, self.pid, reason))
        return handle

    def relocate_resume(self, relocate: int) -> None:
        """Move the stopped thread's own resume point out of code the injected call patched.

        Code patched in the target (a jump written over a window of instructions) may cover the
        place this thread was stopped at: the agent quiesces the other threads, but this one's
        registers are saved here.  ``relocate(pc)`` (the agent's ``hybrid_agent_relocate_pc``)
        says where the instruction at ``pc`` lives now.  A system call the thread was in that the
        kernel would restart on resume (``rip - 2`` is its ``syscall``) is restarted here instead,
        as the kernel would do it: ``rax`` = the call's number (``restart_syscall`` after
        -ERESTART_RESTARTBLOCK), ``orig_rax`` = -1, ``rip`` = the relocated ``syscall``.
        Raises :class:`InjectError` when the thread cannot be resumed (stopped between instructions
        of a window: it is then left where it was, which is what would have crashed anyway)."""
        regs = self._regs
        rax = regs.rax - (1 << 64) if regs.rax >> 63 else regs.rax
        restart = regs.orig_rax != 0xFFFFFFFFFFFFFFFF and rax in _RESTART_ERRNOS
        pc = regs.rip - 2 if restart else regs.rip
        new = self.call(relocate, pc) & 0xFFFFFFFFFFFFFFFF
        if new == 0xFFFFFFFFFFFFFFFF:
            raise InjectError("thread %d of process %d was stopped at %#x, inside code that was just patched, "
                              "between two instructions" % (self.tid, self.pid, pc))
        if new == pc:
            return
        if restart:
            regs.rax = _NR_RESTART_SYSCALL if rax == -516 else regs.orig_rax
            regs.orig_rax = 0xFFFFFFFFFFFFFFFF
        regs.rip = new
        self._dirty = True

    def remote_dlsym(self, handle: int, symbol: str, *, what: str | None = None) -> int:
        """``dlsym(handle, symbol)`` in the target; raises when not found."""
        self._check()
        found = self._libc_symbol(("libc", "dlsym"), ("libdl", "dlsym"), ("libc", "__libc_dlsym"))
        if found is None:
            raise InjectError("process %d has no dlsym" % self.pid)
        address = self.call(found[1], handle, self.alloc_string(symbol))
        if not address:
            reason = self.remote_dlerror() if found[0] == "dlsym" else None
            raise InjectError(
                "symbol %s not found in %s in process %d%s"
                % (symbol, what or "handle %#x" % handle, self.pid, ": " + reason if reason else "")
            )
        return address

    # --- detaching ------------------------------------------------------------------

    def close(self) -> None:
        """Restore the thread's registers, re-deliver held-back signals, detach.  Idempotent."""
        if self._mem_fd >= 0:
            os.close(self._mem_fd)
            self._mem_fd = -1
        if not self._attached:
            return
        self._attached = False
        if not self._alive:
            return
        if self._regs is not None and self._fp is not None:
            try:
                self._restore()
            except InjectError:
                pass
        deferred, self._deferred = self._deferred, []
        sig = 0
        if deferred and self._in_signal_stop:
            # From a signal-delivery-stop, PTRACE_DETACH delivers the signal given, with the
            # siginfo we set: the first held-back signal goes out exactly as it arrived.
            first, info = deferred.pop(0)
            try:
                buf = ctypes.create_string_buffer(info, len(info))
                _ptrace(_PTRACE_SETSIGINFO, self.tid, None, ctypes.addressof(buf))
                sig = first
            except OSError:
                deferred.insert(0, (first, info))
        try:
            _ptrace(_PTRACE_DETACH, self.tid, None, sig)
        except OSError as e:
            if e.errno == _errno.ESRCH and os.path.exists("/proc/%d/task/%d" % (self.pid, self.tid)):
                self._detach_late()
        for s, _ in deferred:  # the rest: resent (the sender becomes us)
            try:
                _tgkill(self.pid, self.tid, s)
            except OSError:
                pass

    def _detach_late(self) -> None:
        """The thread was not in a ptrace-stop (a call we could not interrupt): wait a little for one."""
        try:
            status = self._wait(time.monotonic() + 1.0, "detaching")
        except (TimeoutError, InjectError):
            return  # it stays traced until it stops and this process exits (the kernel detaches then)
        sig = 0
        try:
            if status >> 16 == 0:
                sig = os.WSTOPSIG(status)
                if sig == signal.SIGSEGV and self._getregs().rip == 0:
                    sig = 0  # our call trap
            if self._regs is not None and self._fp is not None:
                self._restore()
        except InjectError:
            pass
        try:
            _ptrace(_PTRACE_DETACH, self.tid, None, sig)
        except OSError:
            pass

    def __del__(self):  # never leave a thread stopped because a session was dropped
        try:
            if self._attached and threading.get_ident() == self._owner:
                self.close()
        except Exception:
            pass


_SYS_tgkill = 234


def _tgkill(tgid: int, tid: int, sig: int) -> None:
    ctypes.set_errno(0)
    if _libc.syscall(_SYS_tgkill, tgid, tid, sig) == -1:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def inject_and_call(
    pid: int,
    so_path: str,
    function_name: str,
    string_arg: str | bytes,
    *,
    timeout: float = 5.0,
    tid: int | None = None,
    relocate: str | None = None,
) -> int:
    """Load ``so_path`` into process ``pid`` and return ``function_name(string_arg)`` from there.

    ``relocate`` names a function of the library that says where the stopped thread resumes when
    the call patched code (see :meth:`RemoteProcess.relocate_resume`).

    ``dlopen(so_path, RTLD_NOW|RTLD_GLOBAL)`` (a library already loaded just gets its reference
    count raised; it is never closed), ``dlsym`` the function, call it as
    ``int function_name(const char *)`` with a copy of ``string_arg`` (valid during the call
    only), and return its result sign-extended from 32 bits.  The target is always left
    running (registers restored, detached), also when this raises :class:`InjectError`.
    ``timeout`` bounds each remote call.
    """
    path = os.path.abspath(so_path)
    RemoteProcess._choose_thread(pid, tid)  # no process, zombie...: before looking at its maps
    _require_dynamic(pid, process_maps(pid))
    with RemoteProcess(pid, tid, timeout=timeout) as rp:
        handle = rp.remote_dlopen(path, RTLD_NOW | RTLD_GLOBAL, timeout=timeout)
        function = rp.remote_dlsym(handle, function_name, what=path)
        result = rp.call(function, rp.alloc_string(string_arg), timeout=timeout) & 0xFFFFFFFF
        if relocate:  # the call may have patched code where this thread was stopped
            rp.relocate_resume(rp.remote_dlsym(handle, relocate, what=path))
    return result - (1 << 32) if result & 0x80000000 else result
