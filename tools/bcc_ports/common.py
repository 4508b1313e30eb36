"""What the bcc tool ports share: bcc's histogram printing, building a tool's eBPF C once,
the traced process (``-p PID`` or a command started with the probes in place), and bcc's
trace loop with its Ctrl-C handling.

A port is a ``main(argv) -> int`` that parses bcc's options (plus ``--mode`` and
``-- COMMAND``), builds ``progs/<tool>.bpf.c`` with :func:`build`, loads it with
``hybrid.load`` (``kernel=False`` in ``user`` mode, kernel programs in ``kernel``
mode), starts tracing with :func:`start` and prints with :func:`trace_loop`,
wrapped in :func:`run` for the one-line errors.

Stable API (other ports import it): :class:`ToolError`, :func:`print_log2_hist`,
:func:`log2_hist_lines`, :func:`build`, :func:`source`, :func:`split_command`,
:func:`add_mode_argument`, :func:`check_pid`, :func:`set_global`, :func:`start`,
:class:`Target`, :func:`trace_loop`, :func:`run`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

HERE = Path(__file__).resolve().parent
PROGS = HERE / "progs"
ROOT = HERE.parent.parent
MODES = ("user", "kernel")


class ToolError(Exception):
    """A failure the tool reports as one line (``Error: ...``) with exit status 1."""


# --- bcc's histograms (bcc/table.py) -------------------------------------------------------

STARS_MAX = 40
LOG2_INDEX_MAX = 65


def _stars(val, val_max, width) -> str:
    i = 0
    text = ""
    while True:
        if (i > (width * val / val_max) - 1) or (i > width - 1):
            break
        text += "*"
        i += 1
    if val > val_max:
        text = text[:-1] + "+"
    return text


def log2_hist_lines(vals: Sequence[int], val_type: str = "value", strip_leading_zero=None) -> list[str]:
    """The lines bcc's ``_print_log2_hist`` prints for slot counts ``vals`` (slot i holds values
    ``2**(i-1) .. 2**i - 1``, slot 1 also 0, as bcc's ``bpf_log2l`` buckets them)."""
    idx_max = -1
    val_max = 0
    for i, v in enumerate(vals):
        if v > 0:
            idx_max = i
        if v > val_max:
            val_max = v
    if idx_max <= 32:
        header = "     %-19s : count     distribution"
        body = "%10d -> %-10d : %-8d |%-*s|"
        stars = STARS_MAX
    else:
        header = "               %-29s : count     distribution"
        body = "%20d -> %-20d : %-8d |%-*s|"
        stars = int(STARS_MAX / 2)
    out = []
    if idx_max > 0:
        out.append(header % val_type)
    for i in range(1, idx_max + 1):
        low = (1 << i) >> 1
        high = (1 << i) - 1
        if low == high:
            low -= 1
        val = vals[i]
        if strip_leading_zero:
            if val:
                out.append(body % (low, high, val, stars, _stars(val, val_max, stars)))
                strip_leading_zero = False
        else:
            out.append(body % (low, high, val, stars, _stars(val, val_max, stars)))
    return out


def print_log2_hist(dist, val_type: str = "value", section_header: str = "Bucket ptr",
                    section_print_fn: Callable | None = None, bucket_fn: Callable | None = None,
                    strip_leading_zero=None, bucket_sort_fn: Callable | None = None, file=None) -> None:
    """bcc's ``table.print_log2_hist``, for counts read from a map.

    ``dist`` is a sequence of slot counts, a mapping ``slot -> count``, or (a histogram
    with a secondary key) a mapping ``(bucket, slot) -> count``: then one section per
    bucket, headed ``\\n<section_header> = <section_print_fn(bucket) or repr(bucket)>``,
    with ``bucket_fn`` and ``bucket_sort_fn`` applied as bcc applies them.
    """
    file = file if file is not None else sys.stdout
    if isinstance(dist, Mapping) and dist and isinstance(next(iter(dist)), tuple):
        tmp: dict = {}
        for (bucket, slot), count in dist.items():
            if bucket_fn:
                bucket = bucket_fn(bucket)
            vals = tmp.setdefault(bucket, [0] * LOG2_INDEX_MAX)
            vals[slot] = count
        buckets = list(tmp)
        if bucket_sort_fn:
            buckets = bucket_sort_fn(buckets)
        for bucket in buckets:
            if section_print_fn:
                print("\n%s = %s" % (section_header, section_print_fn(bucket)), file=file)
            else:
                print("\n%s = %r" % (section_header, bucket), file=file)
            for line in log2_hist_lines(tmp[bucket], val_type, strip_leading_zero):
                print(line, file=file)
        return
    vals = [0] * LOG2_INDEX_MAX
    items = dist.items() if isinstance(dist, Mapping) else enumerate(dist)
    for slot, count in items:
        vals[slot] = count
    for line in log2_hist_lines(vals, val_type, strip_leading_zero):
        print(line, file=file)


# --- building the eBPF C -------------------------------------------------------------------


def build_dir() -> Path:
    """Where built objects are cached: ``build/tools/bcc_ports`` in the repository (else ~/.cache)."""
    for d in (ROOT / "build" / "tools" / "bcc_ports", Path.home() / ".cache" / "hybrid" / "tools"):
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(d, os.W_OK):
            return d
    raise ToolError("no writable build directory (tried %s and ~/.cache/hybrid/tools)" % (ROOT / "build"))


def source(tool: str) -> str:
    """The eBPF C of ``tool`` (``progs/<tool>.bpf.c``)."""
    return (PROGS / ("%s.bpf.c" % tool)).read_text()


def build(tool: str, *, defines: Mapping[str, object] | None = None,
          generated: Mapping[str, str] | None = None) -> Path:
    """``progs/<tool>.bpf.c`` compiled once per source, ``-D`` defines and generated headers.

    ``generated`` maps header names (included by the C through a define) to their text;
    they are written next to the object.  The object's name carries a hash of all of
    it, so a build is reused until something it was made from changes.
    """
    from hybrid.user.toolchain import compile_bpf

    defines = dict(defines or {})
    generated = dict(generated or {})
    h = hashlib.sha256(source(tool).encode())
    for k in sorted(defines):
        h.update(b"\0D%s=%s" % (k.encode(), str(defines[k]).encode()))
    for k in sorted(generated):
        h.update(b"\0G%s\0%s" % (k.encode(), generated[k].encode()))
    key = h.hexdigest()[:16]
    out_dir = build_dir()
    obj = out_dir / ("%s-%s.bpf.o" % (tool, key))
    if obj.exists():
        return obj
    gen_dir = out_dir / ("gen-%s" % key)
    gen_dir.mkdir(exist_ok=True)
    for name, text in generated.items():
        (gen_dir / name).write_text(text)
    tmp = out_dir / ("%s-%s.%d.tmp.o" % (tool, key, os.getpid()))
    try:
        compile_bpf(PROGS / ("%s.bpf.c" % tool), tmp, include_dirs=[gen_dir],
                    defines=["%s=%s" % (k, v) for k, v in defines.items()])
        os.replace(tmp, obj)
    finally:
        if tmp.exists():
            tmp.unlink()
    return obj


# --- arguments ------------------------------------------------------------------------------


def split_command(argv: Sequence[str] | None) -> tuple[list[str], list[str]]:
    """``[tool options] -- COMMAND ARGS...`` -> (tool options, command); the command may be empty."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


COMMAND_USAGE = " [-- COMMAND [ARG ...]]"
COMMAND_HELP = """\
hybrid:
  -- COMMAND [ARG ...]  start COMMAND with the probes in place before its main
                        (instead of -p PID) and trace it until it exits
  --mode user           run the probes inside the traced process (hybrid's
                        userspace probes; the default with -p or a command)
  --mode kernel         the same programs in the kernel (kernel uprobes, kernel
                        tracepoints; the default without a process)
"""


def add_mode_argument(parser) -> None:
    """``--mode {user,kernel}`` (None: the tool decides, user when there is a process to trace)."""
    parser.add_argument("--mode", choices=MODES, default=None,
                        help="where the programs run: user (in the traced process) or kernel")


def usage_with_command(parser) -> None:
    """Add ``[-- COMMAND [ARG ...]]`` to the parser's usage line."""
    usage = parser.format_usage()
    if usage.startswith("usage: "):
        usage = usage[len("usage: "):]
    parser.usage = usage.rstrip("\n") + COMMAND_USAGE


def check_pid(pid: int) -> None:
    """ToolError unless process ``pid`` exists (and is not a zombie)."""
    if pid is None or pid <= 0:
        raise ToolError("invalid PID %s" % pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        raise ToolError("no process with PID %d" % pid) from None
    except PermissionError:
        pass
    try:
        with open("/proc/%d/stat" % pid) as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        raise ToolError("no process with PID %d" % pid) from None
    if state == "Z":
        raise ToolError("process %d has exited (a zombie)" % pid)


def tgid_of(tid: int) -> int:
    """The process of thread ``tid``."""
    try:
        with open("/proc/%d/status" % tid) as f:
            for line in f:
                if line.startswith("Tgid:"):
                    return int(line.split()[1])
    except OSError:
        pass
    raise ToolError("no thread with TID %d" % tid)


def own_pid(pid: int) -> int:
    """``pid`` (or a tid) as the process sees itself, in its own pid namespace: what
    ``bpf_get_current_pid_tgid`` gives a program running inside it (``NSpid``'s last field)."""
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("NSpid:"):
                    return int(line.split()[-1])
    except (OSError, ValueError, IndexError):
        pass
    return pid


def set_global(obj, name: str, value: int) -> None:
    """Write the writable global ``name`` (.bss/.data) of a loaded object, on whichever side it lives."""
    var = obj.spec.variable(name)
    m = obj.maps[var.section]
    data = bytearray(m.lookup(b"\0\0\0\0"))
    data[var.offset:var.offset + var.size] = value.to_bytes(var.size, "little", signed=value < 0)
    m.update(b"\0\0\0\0", bytes(data))


# --- the traced process ----------------------------------------------------------------------


class Target:
    """What is traced: a process (``pid``), a command started for it (``popen``), or every process.

    ``detach()`` removes the probes (idempotent); a started command keeps running.
    """

    def __init__(self, pid: int | None, popen=None, attachment=None,
                 links: Iterable = ()):
        self.pid = pid
        self.popen = popen
        self.attachment = attachment
        self.links = list(links)

    @property
    def command(self) -> bool:
        return self.popen is not None

    def finished(self) -> bool:
        """The started command has exited (always False for -p and system-wide tracing)."""
        return self.popen is not None and self.popen.poll() is not None

    def wait(self, seconds: float) -> None:
        """Sleep ``seconds``, or until the started command exits."""
        if self.popen is None:
            time.sleep(seconds)
            return
        try:
            self.popen.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            pass

    def detach(self) -> None:
        att, self.attachment = self.attachment, None
        links, self.links = self.links, []
        try:
            if att is not None:
                att.detach()
        finally:
            for link in links:
                link.close()


class _HeldChild:
    """A forked child held before its ``exec`` (the ``subprocess.Popen`` calls the tools use)."""

    def __init__(self, argv: Sequence[str]):
        exe = shutil.which(argv[0])
        if exe is None:
            raise ToolError("command not found: %s" % argv[0])
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: as few system calls as possible before the exec
            try:
                os.close(w)
                if os.read(r, 1) == b"g":
                    os.close(r)
                    os.execv(exe, list(argv))
            finally:
                os._exit(127)
        os.close(r)
        self.pid = pid
        self.returncode: int | None = None
        self._gate = w

    def release(self) -> None:
        """Let the command run (exec it)."""
        gate, self._gate = self._gate, None
        if gate is not None:
            try:
                os.write(gate, b"g")
            finally:
                os.close(gate)

    def _reap(self, flags: int) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, flags)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def poll(self) -> int | None:
        return self._reap(os.WNOHANG)

    def wait(self, timeout: float | None = None) -> int:
        if timeout is None:
            return self._reap(0)
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise subprocess.TimeoutExpired([str(self.pid)], timeout)
            time.sleep(min(0.05, left))
        return self.returncode

    def kill(self) -> None:
        if self._gate is not None:
            os.close(self._gate)  # the child reads EOF and exits
            self._gate = None
        elif self.returncode is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def start(obj, *, mode: str, pid: int | None = None, command: Sequence[str] = (),
          programs: Sequence[str] | None = None, on_pid: Callable[[int], None] | None = None) -> Target:
    """Put ``obj``'s programs in place and return the :class:`Target`.

    ``user`` mode: the userspace programs (``programs``, default all) inside process ``pid``
    (``obj.attach(pid)``) or inside ``command`` started with them (``obj.launch``).
    ``kernel`` mode: the object's kernel programs (``obj.attach_kernel``): uprobes for ``pid``
    or ``command`` (started held before its exec until they are attached), tracepoints once;
    with neither, every process.  ``on_pid(pid)`` is called as soon as the pid is known
    (before a command runs in kernel mode, right after it started in user mode), with the pid
    the programs will see (in user mode: the process's own, :func:`own_pid`).
    """
    if mode == "user":
        if command:
            launched = obj.launch(list(command), programs=programs)
            if on_pid:
                on_pid(own_pid(launched.pid))
            return Target(launched.pid, launched.popen, launched.attachment)
        if pid is None:
            raise ToolError("--mode user needs a process: -p PID or -- COMMAND")
        check_pid(pid)
        if on_pid:
            on_pid(own_pid(pid))
        return Target(pid, None, obj.attach(pid, programs=programs))
    if command:
        child = _HeldChild(command)
        try:
            if on_pid:
                on_pid(child.pid)
            links = obj.attach_kernel(child.pid)
        except BaseException:
            child.kill()
            child.wait()
            raise
        child.release()
        return Target(child.pid, child, None, links)
    if pid is not None:
        check_pid(pid)
    if on_pid and pid is not None:
        on_pid(pid)
    return Target(pid, None, None, obj.attach_kernel(pid))


# --- bcc's trace loop ----------------------------------------------------------------------------


def _signal_ignore(signum, frame):
    print()


def trace_loop(target: Target, interval: int, duration: int | None, report: Callable[[bool], None],
               banner: Callable[[], None] | None = None) -> None:
    """bcc's ``while (1): sleep(interval) ... print ... if exiting: print("Detaching..."); exit()``.

    ``banner()`` prints the "Tracing ..." line (a Ctrl-C from then on is a normal end);
    ``report(final)`` prints one interval's output (and clears the maps).  The loop ends
    after ``duration`` seconds, on Ctrl-C, or when a started command exits; the probes are
    detached before the last report, so it has everything that was collected.
    """
    seconds = 0
    exiting = False

    def interrupted() -> None:
        nonlocal exiting
        exiting = True
        # as cleanup can take a moment, trap Ctrl-C (bcc does the same)
        signal.signal(signal.SIGINT, _signal_ignore)

    try:
        if banner is not None:
            banner()
            sys.stdout.flush()
    except KeyboardInterrupt:
        interrupted()
    while True:
        if not exiting:
            try:
                target.wait(interval)
                seconds += interval
            except KeyboardInterrupt:
                interrupted()
        if duration and seconds >= duration:
            exiting = True
        if target.finished():
            exiting = True
        if exiting:
            target.detach()
        report(exiting)
        if exiting:
            print("Detaching...")
            sys.stdout.flush()
            return


def run(tool: str, body: Callable[[], int]) -> int:
    """Run a tool's ``body``; errors become one line on stderr and exit status 1."""
    from hybrid.errors import HybridError

    try:
        return body()
    except (ToolError, HybridError) as e:
        print("Error: %s" % e, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 1
