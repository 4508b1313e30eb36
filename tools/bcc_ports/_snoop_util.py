"""Small helpers shared by the opensnoop and memleak ports (nothing else imports this).

- :func:`build`: compile ``progs/NAME.bpf.c`` with ``hybrid.user.toolchain.compile_bpf``,
  one cached object per set of ``-D`` macros, under ``build/tools/bcc_ports/``;
- :class:`ProcSyms` / :class:`KernelSyms`: addresses to ``name+0xoff [module]``
  the way bcc's ``BPF.sym(addr, pid, show_module=True, show_offset=True)`` prints them;
- :func:`parse_trace_line`: a trace_pipe line as bcc's ``BPF.trace_fields()`` tuple;
- :class:`TraceTail`: lines appended to a file (hybrid's ``bpf_printk`` sink) or read
  from tracefs' ``trace_pipe``;
- target checks that end in one-line messages (:class:`ToolError`).
"""

from __future__ import annotations

import bisect
import hashlib
import os
import re
import select
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
PROGS = HERE / "progs"
BUILD = ROOT / "build" / "tools" / "bcc_ports"


def ensure_importable() -> None:
    """Make ``import hybrid`` work when a tool is run as a script from anywhere."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))


ensure_importable()
from tools.bcc_ports.common import ToolError, tgid_of  # noqa: E402,F401 - one of each for every port


# --- building ---------------------------------------------------------------------


def object_path(name: str, defines: tuple[str, ...] = ()) -> Path:
    """Where ``progs/NAME.bpf.c`` compiled with ``defines`` is cached."""
    if not defines:
        return BUILD / ("%s.bpf.o" % name)
    tag = hashlib.sha1("\0".join(defines).encode()).hexdigest()[:12]
    return BUILD / ("%s-%s.bpf.o" % (name, tag))


def build(name: str, defines: tuple[str, ...] = ()) -> str:
    """``progs/NAME.bpf.c`` compiled (``-D`` each of ``defines``); rebuilt only when the source changed.

    Compiled to a private name first and renamed, so concurrent runs never load a half-written object.
    """
    from hybrid.user.toolchain import compile_bpf

    src = PROGS / ("%s.bpf.c" % name)
    out = object_path(name, defines)
    if out.exists() and out.stat().st_mtime >= src.stat().st_mtime:
        return str(out)
    BUILD.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name("%s.%d.tmp.o" % (out.stem, os.getpid()))
    from hybrid.errors import HybridError

    try:
        compile_bpf(src, tmp, defines=defines)
        os.replace(tmp, out)
    except HybridError as e:
        raise ToolError(str(e)) from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return str(out)


def source_text(name: str, defines: tuple[str, ...] = (), values: dict | None = None) -> str:
    """What ``--ebpf`` prints: the C source, preceded by the macros and load-time values it is built with."""
    head = ["// %s.bpf.c, compiled by hybrid.user.toolchain.compile_bpf" % name]
    for d in defines:
        k, _, v = d.partition("=")
        head.append("#define %s %s" % (k, v or "1"))
    for k, v in (values or {}).items():
        head.append("// const volatile %s = %s;  (set before load)" % (k, str(v).lower() if isinstance(v, bool) else v))
    return "\n".join(head) + "\n\n" + (PROGS / ("%s.bpf.c" % name)).read_text()


# --- processes --------------------------------------------------------------------


def process_alive(pid: int) -> bool:
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def check_pid(pid: int, what: str = "process") -> None:
    if pid <= 0 or not process_alive(pid):
        raise ToolError("%s %d does not exist" % (what, pid))


def check_command(argv: list[str]) -> str:
    """The executable of ``argv`` (PATH search), or a ToolError."""
    import shutil

    if not argv:
        raise ToolError("no command given")
    exe = shutil.which(argv[0])
    if exe is None:
        raise ToolError("command not found: %s" % argv[0])
    return exe


def spawn_stopped(argv: list[str], **popen_kw):
    """Start ``argv`` stopped at its first instruction; ``release()`` lets it run.  Returns (popen, release).

    For kernel probes that need the pid before the command does anything: the child asks to be
    traced (PTRACE_TRACEME) and execs, so it stops with SIGTRAP before the new program's first
    instruction; ``release()`` detaches (PTRACE_DETACH) and it runs on, never having done
    anything we did not see.  (A shell or Python waiting on a pipe before exec would make
    allocations and opens of its own under the probes.)
    """
    import ctypes
    import signal
    import subprocess

    libc = ctypes.CDLL(None, use_errno=True)
    libc.ptrace.argtypes = (ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p)
    libc.ptrace.restype = ctypes.c_long

    def traceme():
        libc.ptrace(0, 0, None, None)  # PTRACE_TRACEME

    popen = subprocess.Popen(argv, preexec_fn=traceme, **popen_kw)
    _, status = os.waitpid(popen.pid, os.WUNTRACED)
    if not os.WIFSTOPPED(status):  # it did not stop at exec: let Popen see how it ended
        popen.returncode = os.waitstatus_to_exitcode(status)
        raise ToolError("%s exited before it could be traced" % argv[0])
    released = []

    def release():
        if not released:
            released.append(1)
            libc.ptrace(17, popen.pid, None, None)  # PTRACE_DETACH, no signal

    if os.WSTOPSIG(status) != signal.SIGTRAP:  # unexpected, but do not lose the signal
        libc.ptrace(17, popen.pid, None, ctypes.c_void_p(os.WSTOPSIG(status)))
        released.append(1)
    return popen, release


def cgroup_id(pid: int) -> int | None:
    """The cgroup v2 id of ``pid`` (the inode of its cgroup directory), as bpf_get_current_cgroup_id() gives."""
    try:
        with open("/proc/%d/cgroup" % pid) as f:
            for line in f:
                if line.startswith("0::"):
                    path = line[3:].strip()
                    return os.stat("/sys/fs/cgroup" + path).st_ino
    except OSError:
        return None
    return None


def mntns_id(pid: int) -> int | None:
    """The mount namespace inode number of ``pid`` (bcc's mntnsmap key)."""
    try:
        return os.stat("/proc/%d/ns/mnt" % pid).st_ino
    except OSError:
        return None


def pinned_map(path: str, what: str):
    """The kernel map pinned at ``path`` (bcc's --cgroupmap / --mntnsmap), or a ToolError."""
    from hybrid.errors import HybridError
    from hybrid.kernel.maps import KernelMap

    try:
        return KernelMap.from_pin(path)
    except (HybridError, OSError) as e:
        raise ToolError("%s %s: %s" % (what, path, e)) from None


def in_pinned_map(path: str, key: int, what: str) -> bool:
    m = pinned_map(path, what)
    try:
        return m.lookup(key.to_bytes(8, "little")) is not None
    finally:
        m.close()


# --- symbols (bcc's BPF.sym format) -------------------------------------------------


def sym_format(name: str | None, offset: int, module: str | None, show_module: bool = True,
               show_offset: bool = True) -> str:
    """``name+0xoff [module]`` exactly as bcc's ``BPF.sym`` builds it."""
    off = "+0x%x" % offset if show_offset and name is not None else ""
    text = (name or "[unknown]") + off
    if show_module and module is not None:
        text += " [%s]" % os.path.basename(module)
    return text


def debug_file(path: str) -> str | None:
    """The separate debug file of ``path`` (by build id, then .gnu_debuglink), as gdb and bcc look for it."""
    from elftools.elf.elffile import ELFFile

    build_id = link = None
    try:
        with open(path, "rb") as f:
            elf = ELFFile(f)
            for sec in elf.iter_sections():
                if sec["sh_type"] == "SHT_NOTE":
                    for note in sec.iter_notes():
                        if note["n_type"] == "NT_GNU_BUILD_ID":
                            build_id = note["n_desc"]
            sec = elf.get_section_by_name(".gnu_debuglink")
            if sec is not None:
                link = sec.data().split(b"\0", 1)[0].decode(errors="replace")
    except Exception:  # noqa: BLE001 - not an ELF file we can read
        return None
    cands = []
    if build_id and len(build_id) > 2:
        cands.append("/usr/lib/debug/.build-id/%s/%s.debug" % (build_id[:2], build_id[2:]))
    if link:
        d = os.path.dirname(os.path.realpath(path))
        cands += [os.path.join(d, link), os.path.join(d, ".debug", link), "/usr/lib/debug" + os.path.join(d, link)]
    for c in cands:
        if os.path.isfile(c) and os.path.realpath(c) != os.path.realpath(path):
            return c
    return None


class _ModuleSyms:
    """Sorted function symbols of one ELF file: (start vaddr, size, name)."""

    def __init__(self, path: str):
        from hybrid.user.attach import symbols

        self.path = path
        self.starts: list[int] = []
        self.entries: list[tuple[int, int, str]] = []
        try:
            img = symbols.elf_image(path)
        except Exception:  # noqa: BLE001 - unreadable: no symbols, frames show [unknown]
            return
        syms = list(img.symbols)
        debug = debug_file(path) if not any(s.table == ".symtab" for s in syms) else None
        if debug is not None:  # a stripped library with its debug file installed (libc6-dbg): bcc reads it too
            try:
                syms += [s for s in symbols.elf_image(debug).symbols if s.table == ".symtab"]
            except Exception:  # noqa: BLE001
                pass
        best: dict[int, tuple] = {}
        for s in syms:
            if not s.shndx or s.type not in ("STT_FUNC", "STT_GNU_IFUNC") or not s.size:
                continue
            # One name per address: a global .symtab name without a version, then .dynsym's.
            rank = (s.hidden_version, "@" in s.name, s.name.startswith("_"), s.table != ".symtab", s.name)
            cur = best.get(s.value)
            if cur is None or rank < cur[0]:
                best[s.value] = (rank, s.size, s.base)
        for start in sorted(best):
            _, size, name = best[start]
            self.entries.append((start, size, name))
            self.starts.append(start)

    def lookup(self, vaddr: int) -> tuple[str, int] | None:
        i = bisect.bisect_right(self.starts, vaddr) - 1
        while i >= 0:
            start, size, name = self.entries[i]
            if start <= vaddr < start + size:
                return name, vaddr - start
            if vaddr - start > (1 << 20):  # nothing this far back contains it
                break
            i -= 1
        return None


_module_cache: dict[tuple, _ModuleSyms] = {}


def _module_syms(path: str) -> _ModuleSyms:
    try:
        st = os.stat(path)
        key = (path, st.st_ino, st.st_mtime_ns)
    except OSError:
        key = (path, 0, 0)
    ms = _module_cache.get(key)
    if ms is None:
        ms = _module_cache[key] = _ModuleSyms(path)
    return ms


class ProcSyms:
    """User addresses of process ``pid`` to symbols, from a snapshot of its /proc/PID/maps.

    ``refresh()`` re-reads the maps while the process lives; a process that has
    exited keeps its last snapshot, so stacks print after the command ended
    (bcc resolves at print time and shows ``[unknown]`` then).
    """

    def __init__(self, pid: int):
        self.pid = pid
        self.maps: list = []
        self.refresh()

    def refresh(self) -> None:
        from hybrid.user.attach import symbols

        try:
            maps = symbols.process_maps(self.pid)
        except Exception:  # noqa: BLE001 - gone: keep what we had
            return
        maps = [m for m in maps if m.path.startswith("/")]
        if maps:  # a zombie's maps are empty: keep the last snapshot
            self.maps = maps

    def _find(self, addr: int):
        for m in self.maps:
            if m.start <= addr < m.end:
                return m
        return None

    def resolve(self, addr: int) -> tuple[str | None, int, str | None]:
        """(name, offset, module path) like bcc's symcache; (None, addr, module or None) when unknown."""
        from hybrid.user.attach import symbols

        m = self._find(addr)
        if m is None and process_alive(self.pid):
            self.refresh()
            m = self._find(addr)
        if m is None:
            return None, addr, None
        path = m.path[:-len(" (deleted)")] if m.path.endswith(" (deleted)") else m.path
        file_off = addr - m.start + m.offset
        try:
            vaddr = symbols.offset_to_vaddr(path, file_off)
        except Exception:  # noqa: BLE001
            return None, file_off, path
        hit = _module_syms(path).lookup(vaddr)
        if hit is None:
            return None, vaddr, path
        return hit[0], hit[1], path

    def sym(self, addr: int, show_module: bool = True, show_offset: bool = True) -> str:
        name, off, module = self.resolve(addr)
        return sym_format(name, off, module, show_module, show_offset)


class KernelSyms:
    """Kernel addresses to symbols from /proc/kallsyms (bcc's pid -1 cache); modules as ``[name]``."""

    def __init__(self):
        self.starts: list[int] = []
        self.entries: list[tuple[int, str, str]] = []
        rows = []
        try:
            with open("/proc/kallsyms") as f:
                for line in f:
                    parts = line.split()
                    if len(parts) < 3 or parts[1] not in "tTwW":
                        continue
                    mod = parts[3].strip("[]") if len(parts) > 3 else "kernel"
                    rows.append((int(parts[0], 16), parts[2], mod))
        except OSError:
            pass
        rows.sort()
        for a, n, m in rows:
            if a:
                self.starts.append(a)
                self.entries.append((a, n, m))

    def sym(self, addr: int, show_module: bool = True, show_offset: bool = True) -> str:
        i = bisect.bisect_right(self.starts, addr) - 1
        if i < 0:
            return sym_format(None, addr, None, show_module, show_offset)
        start, name, mod = self.entries[i]
        return sym_format(name, addr - start, mod, show_module, show_offset)


# --- bpf_printk lines (bcc's trace_fields) --------------------------------------------


def parse_trace_line(line: bytes):
    """bcc's ``BPF.trace_fields()`` of one trace_pipe line: (task, pid, cpu, flags, ts, msg); None to skip."""
    line = line.rstrip(b"\n")
    if line.startswith(b"CPU:"):
        return None
    task = line[:16].lstrip()
    line = line[17:]
    ts_end = line.find(b":")
    try:
        pid, cpu, flags, ts = line[:ts_end].split()
    except Exception:  # noqa: BLE001 - bcc skips lines it cannot split
        return None
    cpu = cpu[1:-1]
    line = line[ts_end + 1:]
    sym_end = line.find(b":")
    msg = line[sym_end + 2:]
    try:
        return (task, int(pid), int(cpu), flags, float(ts), msg)
    except Exception:  # noqa: BLE001
        return ("Unknown", 0, 0, "Unknown", 0.0, "Unknown")


class TraceTail:
    """New lines of a trace sink: a regular file read from its current end, or tracefs' trace_pipe."""

    def __init__(self, path: str, from_start: bool = False):
        self.path = path
        self.pipe = path.endswith("trace_pipe")
        if not self.pipe and not os.path.exists(path):
            open(path, "ab").close()
        self.fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        if not self.pipe and not from_start:
            os.lseek(self.fd, 0, os.SEEK_END)
        self.buf = b""

    def lines(self, timeout: float) -> list[bytes]:
        if self.pipe:
            r, _, _ = select.select([self.fd], [], [], timeout)
            if not r:
                return []
        try:
            data = os.read(self.fd, 1 << 16)
        except BlockingIOError:
            data = b""
        if not data and not self.pipe:
            import time

            time.sleep(timeout)
            try:
                data = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                data = b""
        self.buf += data
        out = self.buf.split(b"\n")
        self.buf = out.pop()
        return [x + b"\n" for x in out]

    def close(self) -> None:
        os.close(self.fd)


def hybrid_trace_sink(pid: int | None) -> str:
    """Where ``bpf_printk`` of programs in process ``pid`` goes: its HYBRID_TRACE_PIPE, else hybrid's default."""
    if pid is not None:
        try:
            with open("/proc/%d/environ" % pid, "rb") as f:
                for kv in f.read().split(b"\0"):
                    if kv.startswith(b"HYBRID_TRACE_PIPE="):
                        v = kv.split(b"=", 1)[1].decode()
                        if v and v != "-":
                            return v
        except OSError:
            pass
    return "/dev/shm/hybrid-trace"


def tracefs_pipe() -> str:
    for d in ("/sys/kernel/tracing", "/sys/kernel/debug/tracing"):
        if os.path.exists(os.path.join(d, "trace_pipe")):
            return os.path.join(d, "trace_pipe")
    raise ToolError("tracefs is not mounted (no trace_pipe)")


# --- argument helpers -------------------------------------------------------------


def split_command(argv: list[str]) -> tuple[list[str], list[str]]:
    """``argv`` before ``--`` and the command after it (empty if there is none)."""
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return list(argv), []


def power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def one_line(e: BaseException) -> str:
    """An exception as one line (hybrid's errors may carry verifier output on later lines)."""
    text = str(e).strip() or type(e).__name__
    return re.sub(r"\s*\n\s*", "; ", text)
