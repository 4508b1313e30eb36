"""The ctypes binding of Debian's ``libbpf.so.1`` (libbpf >= 1.1), bound once on first use.

:func:`lib` loads the library, declares the prototypes the other modules of
:mod:`hybrid.kernel` use and routes libbpf's log into Python ``logging``
(logger ``hybrid.kernel.libbpf``; libbpf's warn/info/debug levels map to
WARNING/INFO/DEBUG).  libbpf prints a refused program's verifier log at
warn level; the last one of every program is kept (:func:`verifier_log`),
and :class:`capture` collects what libbpf prints during one call so the
caller can put libbpf's reason into its error message.

Foreign errors are translated here: libbpf 1.x returns ``-errno`` (and
sets ``errno``) or NULL with ``errno`` set; :func:`check` and
:func:`check_ptr` turn those into :class:`~hybrid.errors.KernelError`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno as E
import logging
import os
import re
import threading
from collections import deque

from hybrid.errors import KernelError

log = logging.getLogger("hybrid.kernel.libbpf")
log.addHandler(logging.NullHandler())  # libbpf's warnings end up in our errors: silent unless logging is set up

LIBRARY = "libbpf.so.1"
ENOTSUPP = 524  # the kernel-internal "operation not supported" some bpf() commands return

P, I, U32, U64, SZ = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_uint64, ctypes.c_size_t
STR, BOOL = ctypes.c_char_p, ctypes.c_bool


# --- option structs (bpf/libbpf.h, bpf/bpf.h of libbpf 1.1) ---------------------------


class _Opts(ctypes.Structure):
    """An ``*_opts`` struct: ``sz`` set to its size, the rest zero unless given."""

    def __init__(self, **kw):
        super().__init__(sz=ctypes.sizeof(self), **kw)


class ObjectOpenOpts(_Opts):
    _fields_ = [("sz", SZ), ("object_name", STR), ("relaxed_maps", BOOL), ("pin_root_path", STR),
                ("_attach_prog_fd", U32), ("kconfig", STR), ("btf_custom_path", STR),
                ("kernel_log_buf", P), ("kernel_log_size", SZ), ("kernel_log_level", U32)]


class UprobeOpts(_Opts):
    _fields_ = [("sz", SZ), ("ref_ctr_offset", SZ), ("bpf_cookie", U64), ("retprobe", BOOL), ("func_name", STR)]


class UsdtOpts(_Opts):
    _fields_ = [("sz", SZ), ("usdt_cookie", U64)]


class KprobeOpts(_Opts):
    _fields_ = [("sz", SZ), ("bpf_cookie", U64), ("offset", SZ), ("retprobe", BOOL)]


class PerfEventOpts(_Opts):
    _fields_ = [("sz", SZ), ("bpf_cookie", U64)]


class MapCreateOpts(_Opts):
    _fields_ = [("sz", SZ), ("btf_fd", U32), ("btf_key_type_id", U32), ("btf_value_type_id", U32),
                ("btf_vmlinux_value_type_id", U32), ("inner_map_fd", U32), ("map_flags", U32),
                ("map_extra", U64), ("numa_node", U32), ("map_ifindex", U32)]


class MapBatchOpts(_Opts):
    _fields_ = [("sz", SZ), ("elem_flags", U64), ("flags", U64)]


class ProgLoadOpts(_Opts):
    _fields_ = [("sz", SZ), ("attempts", I), ("expected_attach_type", I), ("prog_btf_fd", U32),
                ("prog_flags", U32), ("prog_ifindex", U32), ("kern_version", U32), ("attach_btf_id", U32),
                ("attach_prog_fd", U32), ("attach_btf_obj_fd", U32), ("fd_array", P), ("func_info", P),
                ("func_info_cnt", U32), ("func_info_rec_size", U32), ("line_info", P), ("line_info_cnt", U32),
                ("line_info_rec_size", U32), ("log_level", U32), ("log_size", U32), ("log_buf", P)]


class MapInfo(ctypes.Structure):
    """The start of ``struct bpf_map_info`` (uapi; the kernel copies what fits)."""

    _fields_ = [("type", U32), ("id", U32), ("key_size", U32), ("value_size", U32), ("max_entries", U32),
                ("map_flags", U32), ("name", ctypes.c_char * 16), ("ifindex", U32),
                ("btf_vmlinux_value_type_id", U32), ("netns_dev", U64), ("netns_ino", U64), ("btf_id", U32),
                ("btf_key_type_id", U32), ("btf_value_type_id", U32), ("_pad", U32), ("map_extra", U64)]


class ProgInfo(ctypes.Structure):
    """The start of ``struct bpf_prog_info`` (every pointer field left 0: the kernel fills none)."""

    _fields_ = [("type", U32), ("id", U32), ("tag", ctypes.c_uint8 * 8), ("jited_prog_len", U32),
                ("xlated_prog_len", U32), ("jited_prog_insns", U64), ("xlated_prog_insns", U64),
                ("load_time", U64), ("created_by_uid", U32), ("nr_map_ids", U32), ("map_ids", U64),
                ("name", ctypes.c_char * 16)]


PRINT_FN = ctypes.CFUNCTYPE(I, I, P, P)  # int (*)(enum libbpf_print_level, const char *fmt, va_list)
RING_SAMPLE_FN = ctypes.CFUNCTYPE(I, P, P, SZ)  # int (*)(void *ctx, void *data, size_t size)
PERF_SAMPLE_FN = ctypes.CFUNCTYPE(None, P, I, P, U32)  # void (*)(void *ctx, int cpu, void *data, __u32 size)
PERF_LOST_FN = ctypes.CFUNCTYPE(None, P, I, U64)  # void (*)(void *ctx, int cpu, __u64 cnt)

_PROTOTYPES = (
    # objects
    ("bpf_object__open_file", P, [STR, P]),
    ("bpf_object__load", I, [P]),
    ("bpf_object__close", None, [P]),
    ("bpf_object__name", STR, [P]),
    ("bpf_object__next_program", P, [P, P]),
    ("bpf_object__next_map", P, [P, P]),
    # programs
    ("bpf_program__name", STR, [P]),
    ("bpf_program__section_name", STR, [P]),
    ("bpf_program__set_autoload", I, [P, BOOL]),
    ("bpf_program__autoload", BOOL, [P]),
    ("bpf_program__fd", I, [P]),
    ("bpf_program__type", I, [P]),
    # maps of an object
    ("bpf_map__name", STR, [P]),
    ("bpf_map__type", I, [P]),
    ("bpf_map__fd", I, [P]),
    ("bpf_map__is_internal", BOOL, [P]),
    ("bpf_map__value_size", U32, [P]),
    ("bpf_map__map_flags", U32, [P]),
    ("bpf_map__set_map_flags", I, [P, U32]),
    ("bpf_map__initial_value", P, [P, ctypes.POINTER(SZ)]),
    ("bpf_map__set_initial_value", I, [P, P, SZ]),
    ("bpf_map__reuse_fd", I, [P, I]),
    ("bpf_map__pin_path", STR, [P]),
    ("bpf_map__set_autocreate", I, [P, BOOL]),
    ("bpf_map__autocreate", BOOL, [P]),
    # attaching
    ("bpf_program__attach", P, [P]),
    ("bpf_program__attach_tracepoint", P, [P, STR, STR]),
    ("bpf_program__attach_raw_tracepoint", P, [P, STR]),
    ("bpf_program__attach_uprobe_opts", P, [P, I, STR, SZ, ctypes.POINTER(UprobeOpts)]),
    ("bpf_program__attach_usdt", P, [P, I, STR, STR, STR, ctypes.POINTER(UsdtOpts)]),
    ("bpf_program__attach_kprobe_opts", P, [P, STR, ctypes.POINTER(KprobeOpts)]),
    ("bpf_program__attach_perf_event_opts", P, [P, I, ctypes.POINTER(PerfEventOpts)]),
    ("bpf_link__destroy", I, [P]),
    ("bpf_link__fd", I, [P]),
    # maps by fd (bpf/bpf.h)
    ("bpf_map_create", I, [I, STR, U32, U32, U32, ctypes.POINTER(MapCreateOpts)]),
    ("bpf_map_lookup_elem", I, [I, P, P]),
    ("bpf_map_update_elem", I, [I, P, P, U64]),
    ("bpf_map_delete_elem", I, [I, P]),
    ("bpf_map_get_next_key", I, [I, P, P]),
    ("bpf_map_lookup_and_delete_elem", I, [I, P, P]),
    ("bpf_map_lookup_batch", I, [I, P, P, P, P, ctypes.POINTER(U32), ctypes.POINTER(MapBatchOpts)]),
    ("bpf_map_update_batch", I, [I, P, P, ctypes.POINTER(U32), ctypes.POINTER(MapBatchOpts)]),
    ("bpf_map_delete_batch", I, [I, P, ctypes.POINTER(U32), ctypes.POINTER(MapBatchOpts)]),
    ("bpf_map_get_fd_by_id", I, [U32]),
    ("bpf_obj_get", I, [STR]),
    ("bpf_obj_pin", I, [I, STR]),
    ("bpf_obj_get_info_by_fd", I, [I, P, ctypes.POINTER(U32)]),
    ("bpf_prog_load", I, [I, STR, STR, P, SZ, ctypes.POINTER(ProgLoadOpts)]),
    # event buffers
    ("ring_buffer__new", P, [I, RING_SAMPLE_FN, P, P]),
    ("ring_buffer__poll", I, [P, I]),
    ("ring_buffer__consume", I, [P]),
    ("ring_buffer__epoll_fd", I, [P]),
    ("ring_buffer__free", None, [P]),
    ("perf_buffer__new", P, [I, SZ, PERF_SAMPLE_FN, PERF_LOST_FN, P, P]),
    ("perf_buffer__poll", I, [P, I]),
    ("perf_buffer__consume", I, [P]),
    ("perf_buffer__epoll_fd", I, [P]),
    ("perf_buffer__free", None, [P]),
    ("user_ring_buffer__new", P, [I, P]),
    ("user_ring_buffer__reserve", P, [P, U32]),
    ("user_ring_buffer__submit", None, [P, P]),
    ("user_ring_buffer__discard", None, [P, P]),
    ("user_ring_buffer__free", None, [P]),
    # BTF (feature probes)
    ("btf__load_vmlinux_btf", P, []),
    ("btf__find_by_name_kind", I, [P, STR, U32]),
    ("btf__free", None, [P]),
    # misc
    ("libbpf_set_print", P, [PRINT_FN]),
    ("libbpf_num_possible_cpus", I, []),
    ("libbpf_probe_bpf_map_type", I, [I, P]),
    ("libbpf_probe_bpf_prog_type", I, [I, P]),
    ("libbpf_bpf_prog_type_str", STR, [I]),
    ("libbpf_bpf_map_type_str", STR, [I]),
    ("libbpf_version_string", STR, []),
)

_lib: ctypes.CDLL | None = None
_bind_lock = threading.Lock()
_print_cb = None  # keeps the callback alive for as long as libbpf holds it


def lib() -> ctypes.CDLL:
    """``libbpf.so.1`` with its prototypes declared and its log routed into ``logging`` (bound once)."""
    global _lib, _print_cb
    if _lib is not None:
        return _lib
    with _bind_lock:
        if _lib is not None:
            return _lib
        try:
            so = ctypes.CDLL(LIBRARY, use_errno=True)
        except OSError:
            found = ctypes.util.find_library("bpf")
            if not found:
                raise KernelError("%s is not installed (apt-get install libbpf1, or run `make setup`)"
                                  % LIBRARY, E.ENOENT) from None
            so = ctypes.CDLL(found, use_errno=True)
        missing = []
        for name, restype, argtypes in _PROTOTYPES:
            try:
                fn = getattr(so, name)
            except AttributeError:
                missing.append(name)
                continue
            fn.restype, fn.argtypes = restype, argtypes
        if missing:
            log.debug("libbpf lacks %s", ", ".join(missing))
        if hasattr(so, "libbpf_set_print"):
            _print_cb = PRINT_FN(_on_print)
            so.libbpf_set_print(_print_cb)
        _lib = so
        return so


def version() -> str:
    """libbpf's version (``v1.1``), or ``?`` when it cannot tell."""
    fn = getattr(lib(), "libbpf_version_string", None)
    return fn().decode() if fn is not None else "?"


def function(name: str):
    """The libbpf function ``name``; FeatureError when this libbpf lacks it."""
    from hybrid.errors import FeatureError

    fn = getattr(lib(), name, None)
    if fn is None:
        raise FeatureError("libbpf %s has no %s() (a newer libbpf is needed)" % (version(), name), E.ENOSYS)
    return fn


# --- errors -------------------------------------------------------------------------


LIBBPF_ERRNOS = {  # libbpf's own error numbers (enum libbpf_errno)
    4000: ("LIBBPF_ERRNO__LIBELF", "something wrong in libelf"),
    4001: ("LIBBPF_ERRNO__FORMAT", "BPF object format invalid"),
    4002: ("LIBBPF_ERRNO__KVERSION", "incorrect or no 'version' section"),
    4003: ("LIBBPF_ERRNO__ENDIAN", "endian mismatch"),
    4004: ("LIBBPF_ERRNO__INTERNAL", "internal error in libbpf"),
    4005: ("LIBBPF_ERRNO__RELOC", "relocation failed"),
    4006: ("LIBBPF_ERRNO__LOAD", "load program failure for unknown reason"),
    4007: ("LIBBPF_ERRNO__VERIFY", "kernel verifier blocks program loading"),
    4008: ("LIBBPF_ERRNO__PROG2BIG", "program too big"),
    4009: ("LIBBPF_ERRNO__KVER", "incorrect kernel version"),
    4010: ("LIBBPF_ERRNO__PROGTYPE", "kernel doesn't support this program type"),
}


def errname(err: int) -> str:
    if err == ENOTSUPP:
        return "ENOTSUPP"
    if err in LIBBPF_ERRNOS:
        return LIBBPF_ERRNOS[err][0]
    return E.errorcode.get(err, "errno %d" % err)


def strerror(err: int) -> str:
    if err == ENOTSUPP:
        return "operation not supported"
    if err in LIBBPF_ERRNOS:
        return LIBBPF_ERRNOS[err][1]
    return os.strerror(err)


def errno_of(rc: int) -> int:
    """errno of a failed libbpf call: libbpf 1.x returns -errno (and sets errno)."""
    if rc < 0 and rc != -1:
        return -rc
    return ctypes.get_errno() or E.EINVAL


def error(what: str, err: int, detail: str | None = None) -> KernelError:
    """``KernelError("<what>: [EPERM] <detail or strerror>", err)``."""
    return KernelError("%s: [%s] %s" % (what, errname(err), detail or strerror(err)), err)


def check(rc: int, what: str, detail=None) -> int:
    """``rc`` when it is >= 0, else KernelError naming ``what`` (``detail(err)`` may explain the errno)."""
    if rc >= 0:
        return rc
    err = errno_of(rc)
    raise error(what, err, detail(err) if callable(detail) else detail)


def check_ptr(ptr, what: str, detail=None):
    """``ptr`` when it is not NULL, else KernelError from errno naming ``what``."""
    if ptr:
        return ptr
    err = ctypes.get_errno() or E.EINVAL
    raise error(what, err, detail(err) if callable(detail) else detail)


# --- libbpf's log -----------------------------------------------------------------------

LEVELS = {0: logging.WARNING, 1: logging.INFO, 2: logging.DEBUG}  # enum libbpf_print_level
_LOG_RE = re.compile(r"prog '([^']*)': -- BEGIN PROG LOAD LOG --\n(.*?)-- END PROG LOAD LOG --", re.S)
_recent: deque[str] = deque(maxlen=256)  # the last warnings, any thread
_verifier_logs: dict[str, list[str]] = {}  # program name -> its last verifier log
_last_verifier_log: list[str] = []
_tls = threading.local()
_libc = None


def _format(fmt: int, ap: int) -> str:
    """``vasprintf(fmt, ap)``: libbpf's message as text (x86-64 and arm64 pass va_list by pointer)."""
    global _libc
    if _libc is None:
        c = ctypes.CDLL(None)
        c.vasprintf.restype, c.vasprintf.argtypes = I, [ctypes.POINTER(P), P, P]
        c.free.restype, c.free.argtypes = None, [P]
        _libc = c
    out = P()
    if _libc.vasprintf(ctypes.byref(out), fmt, ap) < 0 or not out.value:
        return ctypes.string_at(fmt).decode(errors="replace")
    try:
        return ctypes.string_at(out.value).decode(errors="replace")
    finally:
        _libc.free(out)


def _on_print(level: int, fmt: int, ap: int) -> int:
    try:
        text = _format(fmt, ap)
        if "-- BEGIN PROG LOAD LOG --" in text:
            _record_verifier_log(text)
        if level == 0:
            _recent.append(text.rstrip("\n"))
        for sink in getattr(_tls, "sinks", ()):
            sink.append((level, text))
        lvl = LEVELS.get(level, logging.DEBUG)
        if log.isEnabledFor(lvl):
            log.log(lvl, "%s", text.removeprefix("libbpf: ").rstrip("\n"))
    except BaseException:  # noqa: BLE001 - never let an exception cross into C
        pass
    return 0


# libbpf's print callback is process-wide and others set it too (libbcc links the same libbpf.so.1 and
# installs its own): a capture makes sure ours is in place and puts back what was there when the last
# capture ends.
_print_lock = threading.Lock()
_print_holders = 0
_print_restore: tuple[int | None] | None = None  # (the callback to put back,), None: ours was in place


def _hold_print() -> None:
    global _print_holders, _print_restore
    so = lib()
    if _print_cb is None:
        return
    with _print_lock:
        if _print_holders == 0:
            prev = so.libbpf_set_print(_print_cb)
            ours = ctypes.cast(_print_cb, P).value
            _print_restore = None if prev == ours else (prev,)
        _print_holders += 1


def _release_print() -> None:
    global _print_holders, _print_restore
    if _print_cb is None:
        return
    with _print_lock:
        _print_holders -= 1
        if _print_holders == 0 and _print_restore is not None:
            prev = _print_restore[0]
            lib().libbpf_set_print(ctypes.cast(prev, PRINT_FN) if prev else PRINT_FN())
            _print_restore = None


def _record_verifier_log(text: str) -> None:
    global _last_verifier_log
    for m in _LOG_RE.finditer(text):
        lines = m.group(2).splitlines()
        _verifier_logs[m.group(1)] = lines
        _last_verifier_log = lines


def verifier_log(program: str | None = None) -> list[str]:
    """The last verifier log libbpf printed (for ``program``, or for any program), as lines."""
    if program is None:
        return list(_last_verifier_log)
    return list(_verifier_logs.get(program, ()))


def recent_warnings(n: int = 20) -> list[str]:
    """The last ``n`` warnings libbpf printed in this process."""
    return list(_recent)[-n:]


def verifier_reason(lines: list[str], n: int = 8) -> list[str]:
    """The last ``n`` meaningful lines of a verifier log (without the statistics lines)."""
    keep = [ln for ln in lines if ln.strip() and not ln.startswith(("processed ", "verification time",
                                                                     "stack depth", "-- END"))]
    return keep[-n:]


class capture:
    """``with capture() as c:`` collects what libbpf prints in this thread meanwhile (``c.messages``).

    libbpf's messages keep going to ``logging`` too.
    """

    def __enter__(self) -> "capture":
        self.messages: list[tuple[int, str]] = []
        sinks = getattr(_tls, "sinks", None)
        if sinks is None:
            sinks = _tls.sinks = []
        sinks.append(self.messages)
        _hold_print()
        return self

    def __exit__(self, *exc) -> None:
        _release_print()
        try:
            _tls.sinks.remove(self.messages)
        except (AttributeError, ValueError):
            pass

    def warnings(self) -> list[str]:
        """The warning lines, without libbpf's ``libbpf: `` prefix."""
        out = []
        for level, text in self.messages:
            if level == 0:
                out.extend(ln.removeprefix("libbpf: ") for ln in text.splitlines() if ln.strip())
        return out

    def failed_program(self) -> str | None:
        """The program libbpf reported as refused by the kernel, if any."""
        for _level, text in self.messages:
            m = re.search(r"prog '([^']*)': (?:BPF program load failed|failed to load)", text)
            if m:
                return m.group(1)
        return None

    def verifier_log(self, program: str | None = None) -> list[str]:
        """The verifier log printed meanwhile (for ``program``, or the last one)."""
        found: list[str] = []
        for _level, text in self.messages:
            for m in _LOG_RE.finditer(text):
                if program is None or m.group(1) == program:
                    found = m.group(2).splitlines()
        return found

    def summary(self, n: int = 3) -> str:
        """The last ``n`` warning lines outside verifier logs, joined with ``; `` (for error messages)."""
        return "; ".join(_strip_log_lines(self.warnings())[-n:])


def _strip_log_lines(lines: list[str]) -> list[str]:
    """Warning lines with the verifier-log bodies removed."""
    out, inlog = [], False
    for ln in lines:
        if "-- BEGIN PROG LOAD LOG --" in ln:
            inlog = True
            continue
        if "-- END PROG LOAD LOG --" in ln:
            inlog = False
            continue
        if not inlog:
            out.append(ln)
    return out
