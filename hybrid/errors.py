"""The one exception module of hybrid.

Every error hybrid raises on purpose is a :class:`HybridError`.  Foreign
errors (pyelftools, llvmlite, OS errors from the kernel) are translated into
one of these once, at the boundary where they enter hybrid, so callers only
ever need ``except HybridError``.
"""

from __future__ import annotations


class HybridError(Exception):
    """Base class of every error hybrid raises."""


class DecodeError(HybridError):
    """Bytecode that cannot be split into instructions (truncated, misaligned)."""


class AssemblerError(HybridError):
    """Assembler text that cannot be assembled; names the line."""


class VerifierError(HybridError):
    """A program refused at load time; the message names the instruction.

    ``VerifierError: insn #5 (call 63): unknown helper 63``
    """

    def __init__(self, message: str, pc: int | None = None):
        super().__init__(message)
        self.pc = pc


class VmError(HybridError):
    """A fault while a program runs (bad memory access, call depth, ...)."""

    def __init__(self, message: str, pc: int | None = None):
        super().__init__(message)
        self.pc = pc


class EngineError(HybridError):
    """An engine could not compile or load a program (LLVM, linker, dlopen)."""


class ConformanceFormatError(HybridError):
    """A conformance ``.data`` file that cannot be parsed."""


class MapError(HybridError):
    """A map operation failed; ``errno`` is the kernel's error number.

    The message names the map, the operation and the reason:
    ``MapError: map 'counts' (hash) update: [E2BIG] map is full (max_entries 16)``
    """

    def __init__(self, errno: int, map: str | None, op: str, detail: str | None = None):
        import errno as _errno
        import os as _os

        self.errno = errno
        self.map = map
        self.op = op
        self.detail = detail
        code = _errno.errorcode.get(errno, str(errno))
        what = "map %r %s" % (map, op) if map is not None else op
        super().__init__("%s: [%s] %s" % (what, code, detail or _os.strerror(errno)))

    def __reduce__(self):  # picklable across processes despite the custom signature
        return (type(self), (self.errno, self.map, self.op, self.detail))


class ElfError(HybridError):
    """An eBPF object file that cannot be loaded; names the section, symbol or offset.

    ``ElfError: t.bpf.o: section 'kprobe/x', insn #12: relocation against undefined symbol 'foo'``
    """


class BtfError(HybridError):
    """BTF or BTF.ext data that cannot be parsed or used; names the offset or type id.

    ``BtfError: .BTF: type id 17 (at offset 0x1a4): unknown kind 31``
    """


class AttachError(HybridError):
    """A probe that cannot be attached or detached; names the program, the target and the reason.

    ``AttachError: program 'count' (uprobe/libc.so.6:strlen): libc.so.6+0x9d0f4: a branch at +0x1a targets
    the middle of the patch window``.  Nothing is changed in the target when it is raised.
    """


class InjectError(HybridError):
    """Injecting into another process failed (ptrace, remote call, dlopen); names the process.

    ``InjectError: dlopen(/tmp/x.so) in process 123 failed: /tmp/x.so: cannot open shared object file``
    """


class KernelError(HybridError):
    """The kernel refused something (bpf(), perf_event_open(), a libbpf or bcc call); names what and why.

    ``KernelError: program 'count' (raw_tp/sys_enter): load: [EPERM] loading kernel programs needs root
    (or CAP_BPF and CAP_PERFMON)``.  ``errno`` is the kernel's error number (0 if there is none).
    Every kernel object created on the way is released before it is raised.
    """

    def __init__(self, message: str, errno: int = 0):
        super().__init__(message)
        self.errno = errno

    def __reduce__(self):
        return (type(self), (str(self), self.errno))


class FeatureError(KernelError):
    """The running kernel lacks a feature; names it, how it was detected and what to use instead.

    ``FeatureError: program 'open' (kprobe/do_sys_openat2): this kernel has no kprobes
    (/sys/bus/event_source/devices/kprobe is missing: CONFIG_KPROBES is not set); use a tracepoint
    (tracepoint/syscalls/sys_enter_openat) or a raw tracepoint (raw_tp/sys_enter) instead``
    """


class AotError(EngineError):
    """A standalone binary that cannot be built (``hybrid aot build``); names the object, program and reason.

    ``AotError: prog.bpf.o: program 'x' calls bpf_probe_read_user (112), bpf_get_current_pid_tgid (14):
    these need a kernel or a traced process``
    """
