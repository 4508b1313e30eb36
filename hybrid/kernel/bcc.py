"""A thin wrapper of bcc (Debian's ``python3-bpfcc``), imported only when a :class:`BccProgram` is made.

bcc compiles C text with its own clang against the kernel headers
(``/lib/modules/$(uname -r)/build``, linked by ``scripts/setup.sh``) and
auto-attaches ``TRACEPOINT_PROBE``/``RAW_TRACEPOINT_PROBE``/``kprobe__*``
functions.  This wrapper adds what bcc lacks here:

* bcc's errors (bare ``Exception``) become :class:`~hybrid.errors.KernelError`;
* kprobes/kfuncs on a kernel without them are a :class:`~hybrid.errors.FeatureError`
  (checked before compiling for auto-attached ``kprobe__``/``kretprobe__``/
  ``kfunc__``/``kretfunc__`` functions);
* uprobes are attached through libbcc's C ``bpf_attach_uprobe`` with
  ``ref_ctr_offset`` 0: bcc 0.26's Python ``attach_uprobe`` declares one
  argument too few and passes a garbage reference-counter offset (bcc issue
  5236), which makes the kernel refuse a libbpf uprobe on the same spot;
* :meth:`BccProgram.table` gives a table as a :class:`~hybrid.kernel.maps.KernelMap`
  (on a duplicate of its fd).

Anything else: ``program.bpf`` is the ``bcc.BPF``.
"""

from __future__ import annotations

import ctypes
import errno as E
import re
from typing import Sequence

from hybrid.closable import Closable
from hybrid.errors import KernelError
from hybrid.kernel import features
from hybrid.kernel.maps import KernelMap

BPF_PROBE_ENTRY, BPF_PROBE_RETURN = 0, 1  # enum bpf_probe_attach_type

# function-name prefixes bcc attaches by itself -> the feature they need
_AUTO = (("kprobe__", "kprobes"), ("kretprobe__", "kretprobes"), ("kfunc__", "fentry"), ("kretfunc__", "fexit"),
         ("lsm__", "lsm"))
_AUTO_RE = re.compile(r"\b(kprobe__|kretprobe__|kfunc__|kretfunc__|lsm__)(\w+)\s*\(")
_MACRO_RE = re.compile(r"\b(KFUNC_PROBE|KRETFUNC_PROBE|LSM_PROBE)\s*\(\s*(\w+)")
_MACRO_FEATURE = {"KFUNC_PROBE": "fentry", "KRETFUNC_PROBE": "fexit", "LSM_PROBE": "lsm"}

_bcc_module = None
_libbcc = None


def _import_bcc():
    global _bcc_module
    if _bcc_module is None:
        try:
            import bcc  # noqa: PLC0415 - heavy (loads libbcc and LLVM): only when needed
        except ImportError as e:
            raise KernelError("bcc is not importable (%s): run `make setup` (it links Debian's python3-bpfcc into "
                              ".venv) or apt-get install python3-bpfcc" % e, E.ENOENT) from None
        _bcc_module = bcc
    return _bcc_module


def _attach_uprobe_fn():
    """libbcc's ``bpf_attach_uprobe`` with its real 7 arguments (a handle of our own: bcc's stays as it is)."""
    global _libbcc
    if _libbcc is None:
        bcc = _import_bcc()
        so = ctypes.CDLL(bcc.libbcc.lib._name, use_errno=True)
        fn = so.bpf_attach_uprobe
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint64, ctypes.c_int,
                       ctypes.c_uint32]
        _libbcc = so
    return _libbcc.bpf_attach_uprobe


def _errno_in(message: str) -> int:
    for err, words in ((E.EPERM, ("Operation not permitted", "super-user")), (E.EACCES, ("Permission denied",)),
                       (E.ENOENT, ("No such file",))):
        if any(w in message for w in words):
            return err
    return 0


def _translate(what: str, e: Exception) -> KernelError:
    msg = str(e)
    err = _errno_in(msg)
    if err in (E.EPERM, E.EACCES):
        msg += " (%s)" % features.NEEDS_ROOT
    return KernelError("%s: %s" % (what, msg), err)


def _b(s) -> bytes:
    return s if isinstance(s, bytes) else str(s).encode()


class BccProgram(Closable):
    """bcc C ``text`` compiled and loaded by ``bcc.BPF(text=text, cflags=cflags, ...)``; see the module doc.

    Extra keyword arguments go to ``bcc.BPF`` (``debug``, ``usdt_contexts``...).
    """

    def __init__(self, text: str, cflags: Sequence[str] = (), **bpf_options):
        bcc = _import_bcc()
        for m in _AUTO_RE.finditer(text):
            prefix, fn = m.group(1), m.group(2)
            feature = dict(_AUTO)[prefix]
            features.require(feature, "bcc function %s%s" % (prefix, fn), fn)
        for m in _MACRO_RE.finditer(text):
            features.require(_MACRO_FEATURE[m.group(1)], "bcc %s(%s)" % (m.group(1), m.group(2)), m.group(2))
        self.bpf = None
        try:
            flags = [f.decode() if isinstance(f, bytes) else str(f) for f in cflags]  # bcc encodes them itself
            self.bpf = bcc.BPF(text=_b(text), cflags=flags, **bpf_options)
        except Exception as e:  # noqa: BLE001 - bcc raises bare Exception
            raise _translate("bcc: compiling/loading the program failed (the compiler's messages are on stderr)"
                             if "compile" in str(e) else "bcc", e) from None

    def _live(self):
        if self.bpf is None:
            raise KernelError("bcc program is closed", E.EBADF)
        return self.bpf

    # --- attaching -------------------------------------------------------------------------------

    def attach_tracepoint(self, tp: str, fn_name: str) -> None:
        """Attach ``fn_name`` to tracepoint ``category:name``."""
        features.require("tracepoints", "bcc function %s (tracepoint %s)" % (fn_name, tp), tp)
        try:
            self._live().attach_tracepoint(tp=_b(tp), fn_name=_b(fn_name))
        except Exception as e:  # noqa: BLE001
            raise _translate("bcc function %s: attach to tracepoint %s" % (fn_name, tp), e) from None

    def attach_raw_tracepoint(self, tp: str, fn_name: str) -> None:
        """Attach ``fn_name`` to raw tracepoint ``tp`` (``sys_enter``...)."""
        features.require("raw_tracepoints", "bcc function %s (raw tracepoint %s)" % (fn_name, tp), tp)
        try:
            self._live().attach_raw_tracepoint(tp=_b(tp), fn_name=_b(fn_name))
        except Exception as e:  # noqa: BLE001
            raise _translate("bcc function %s: attach to raw tracepoint %s" % (fn_name, tp), e) from None

    def attach_uprobe(self, binary: str, fn_name: str, *, sym: str | None = None, addr: int | None = None,
                      sym_off: int = 0, pid: int = -1, retprobe: bool = False) -> None:
        """Attach ``fn_name`` to ``binary`` at ``sym`` (+``sym_off``) or ``addr``, for ``pid`` (-1: every
        process), through libbcc's ``bpf_attach_uprobe`` with ``ref_ctr_offset`` 0."""
        bcc = _import_bcc()
        b = self._live()
        kind = "uretprobe" if retprobe else "uprobe"
        where = "%s:%s" % (binary, sym if sym else "%#x" % (addr or 0))
        what = "bcc function %s (%s %s)" % (fn_name, kind, where)
        features.require("uretprobes" if retprobe else "uprobes", what)
        try:
            path, address = bcc.BPF._check_path_symbol(_b(binary), _b(sym or ""), addr, pid, sym_off)
            fn = b.load_func(_b(fn_name), bcc.BPF.KPROBE)
        except Exception as e:  # noqa: BLE001
            raise _translate(what, e) from None
        ev_name = b._get_uprobe_evname(b"r" if retprobe else b"p", path, address, pid)
        if ev_name in b.uprobe_fds:
            raise KernelError("%s: already attached there" % what, E.EEXIST)
        fd = _attach_uprobe_fn()(fn.fd, BPF_PROBE_RETURN if retprobe else BPF_PROBE_ENTRY, ev_name, path, address,
                                 pid, 0)
        if fd < 0:
            err = ctypes.get_errno() or (-fd if fd < -1 else E.EINVAL)
            from hybrid.kernel import libbpf as L

            raise L.error("%s: attach" % what, err,
                          "%s: %s" % (L.strerror(err), features.NEEDS_ROOT) if err in (E.EPERM, E.EACCES) else None)
        b._add_uprobe_fd(ev_name, fd)  # bcc's cleanup() detaches it

    def attach_uretprobe(self, binary: str, fn_name: str, **kw) -> None:
        self.attach_uprobe(binary, fn_name, retprobe=True, **kw)

    def attach_kprobe(self, event: str, fn_name: str, *, retprobe: bool = False) -> None:
        """Attach ``fn_name`` to kernel function ``event``; FeatureError on a kernel without kprobes."""
        kind = "kretprobe" if retprobe else "kprobe"
        features.require(kind + "s", "bcc function %s (%s %s)" % (fn_name, kind, event), event)
        try:
            b = self._live()
            (b.attach_kretprobe if retprobe else b.attach_kprobe)(event=_b(event), fn_name=_b(fn_name))
        except Exception as e:  # noqa: BLE001
            raise _translate("bcc function %s: attach to %s %s" % (fn_name, kind, event), e) from None

    def attach_kretprobe(self, event: str, fn_name: str) -> None:
        self.attach_kprobe(event, fn_name, retprobe=True)

    # --- tables ------------------------------------------------------------------------------------

    def table(self, name: str) -> KernelMap:
        """bcc's table ``name`` as a :class:`KernelMap` on a duplicate of its fd (close it when done; it
        stays valid after :meth:`close`)."""
        b = self._live()
        try:
            t = b.get_table(_b(name))
        except KeyError:
            raise KernelError("bcc program has no table %r" % name, E.ENOENT) from None
        except Exception as e:  # noqa: BLE001
            raise _translate("bcc table %r" % name, e) from None
        return KernelMap.from_fd(t.map_fd, dup=True, name=name)

    def close(self) -> None:
        """bcc's cleanup: detach every probe, free the module and its tables; idempotent."""
        b, self.bpf = self.bpf, None
        if b is not None:
            b.cleanup()
