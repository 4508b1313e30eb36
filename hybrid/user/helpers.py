"""The helper table: kernel helper ids, names, and their two implementations.

Each helper has a native implementation in the runtime module
(``hybrid_helper_<name>`` in ``hybrid/native/runtime.c``), used by the JIT
and AOT engines, and a Python one used by the reference interpreter.  The
ids and semantics are the kernel's (``include/uapi/linux/bpf.h``).
"""

from __future__ import annotations

import ctypes
import os
import random
import threading
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Protocol


class Memory(Protocol):
    """What a Python helper may do with the program's memory."""

    def read(self, addr: int, size: int) -> bytes: ...

    def write(self, addr: int, data: bytes) -> None: ...


PyHelper = Callable[..., int]  # (mem, r1, r2, r3, r4, r5) -> int


@dataclass(frozen=True)
class HelperSpec:
    id: int
    name: str
    py: PyHelper  # the interpreter's implementation
    native: str | None = None  # symbol suffix in the runtime: hybrid_helper_<native>
    args: tuple[str, ...] = ()  # argument kinds (ARG_KINDS), r1 first; () = not described

    @property
    def symbol(self) -> str:
        return "hybrid_helper_" + (self.native or self.name)


U64 = (1 << 64) - 1

# Linux's clock id; Python's time module does not define CLOCK_MONOTONIC_COARSE (3.11, 3.12)
CLOCK_MONOTONIC_COARSE = getattr(time, "CLOCK_MONOTONIC_COARSE", 6)


def _ns(clock: int) -> int:
    return time.clock_gettime_ns(clock) & U64


def _comm(mem: Memory, buf: int, size: int, *_: int) -> int:
    """The thread name, NUL-padded to ``size`` bytes (the kernel's strscpy_pad, as runtime.c's)."""
    size &= 0xFFFFFFFF  # a u32, as the native helper reads it
    if size == 0:
        return -22 & U64  # -EINVAL
    check = getattr(mem, "check", None)
    if check is not None:
        check(buf, size, True)  # before building `size` bytes
    name = _thread_name()[: size - 1]
    mem.write(buf, name + bytes(size - len(name)))
    return 0


def _thread_name() -> bytes:
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(16)
    libc.prctl(16, buf, 0, 0, 0)  # PR_GET_NAME
    return buf.value


_rng = random.Random()
_rng_lock = threading.Lock()


def _prandom(*_: int) -> int:
    with _rng_lock:
        return _rng.getrandbits(32)


def _pid_tgid(*_: int) -> int:
    return (os.getpid() << 32) | threading.get_native_id()


def _uid_gid(*_: int) -> int:
    return (os.getgid() << 32) | os.getuid()


def _cpu(*_: int) -> int:
    try:
        return os.sched_getcpu() if hasattr(os, "sched_getcpu") else _getcpu()
    except OSError:
        return 0


def _getcpu() -> int:
    libc = ctypes.CDLL(None)
    return libc.sched_getcpu()


def _spec(id: int, name: str, py: PyHelper) -> HelperSpec:
    return HelperSpec(id, name, py)


# The helpers every engine can call without a map or a traced process.
BASE_HELPERS: dict[int, HelperSpec] = {
    h.id: h
    for h in (
        _spec(5, "ktime_get_ns", lambda mem, *a: _ns(time.CLOCK_MONOTONIC)),
        _spec(7, "get_prandom_u32", lambda mem, *a: _prandom()),
        _spec(8, "get_smp_processor_id", lambda mem, *a: _cpu()),
        _spec(14, "get_current_pid_tgid", lambda mem, *a: _pid_tgid()),
        _spec(15, "get_current_uid_gid", lambda mem, *a: _uid_gid()),
        _spec(16, "get_current_comm", _comm),
        _spec(125, "ktime_get_boot_ns", lambda mem, *a: _ns(time.CLOCK_BOOTTIME)),
        _spec(160, "ktime_get_coarse_ns", lambda mem, *a: _ns(CLOCK_MONOTONIC_COARSE)),
    )
}

HelperTable = Mapping[int, HelperSpec]


# --- map helpers --------------------------------------------------------------
#
# The interpreter's implementations call the same C functions as native code
# (hybrid._native), after checking every pointer argument against the
# interpreter's Memory: the map must be an open map of this process, keys and
# values must lie in memory the program may read, outputs in memory it may
# write.  The first use of a map also registers its region with that Memory,
# so loads and stores through the value pointers a lookup returns are allowed.

def _native_maps():
    from hybrid.user import maps

    return maps


def _vm_error(what: str) -> Exception:
    from hybrid.errors import VmError

    return VmError(what)


def _map_arg(mem: Memory, addr: int, helper: str):
    maps = _native_maps()
    m = maps.map_at(addr)
    if m is None:
        raise _vm_error("%s: %#x is not the address of a map" % (helper, addr))
    _allow_region(mem, m.region)
    return m


def _allow_region(mem: Memory, region) -> None:
    check, add = getattr(mem, "check", None), getattr(mem, "add", None)
    if check is None or add is None:
        return
    try:
        check(region.base, region.size, True)
    except Exception:  # noqa: BLE001 - not registered yet
        region.attach(mem)


def _ptr(addr: int):
    maps = _native_maps()
    return maps.ffi.cast("void *", addr)


def _addr(p) -> int:
    maps = _native_maps()
    return int(maps.ffi.cast("uintptr_t", p))


def _check_write(mem: Memory, addr: int, size: int) -> None:
    check = getattr(mem, "check", None)
    if check is not None:
        check(addr, size, True)


def _allow_bridge_copy(mem: Memory, m, value: int) -> int:
    """A lookup of a syscall-mode bridged map returns a pointer into the thread's copy arena, not
    into the region: let the interpreter's Memory reach that arena (the copies of this run)."""
    if value and m.spec.bridge == "syscall":
        check, add = getattr(mem, "check", None), getattr(mem, "add", None)
        if check is not None and add is not None:
            try:
                check(value, m.value_size, True)
            except Exception:  # noqa: BLE001 - this thread's arena is not registered yet
                lib = _native_maps().lib
                size = _native_maps().ffi.new("uint64_t *")
                start = _addr(lib.hybrid_bridge_arena(size))
                add(start, int(size[0]), "copies of bridged map values (this thread)")
    return value


def _h_lookup(mem, r1, r2, *_):
    m = _map_arg(mem, r1, "map_lookup_elem")
    key = mem.read(r2, m.key_size) if m.key_size else b""
    return _allow_bridge_copy(mem, m, _addr(_native_maps().lib.hybrid_map_lookup(m._p(), key)))


def _h_update(mem, r1, r2, r3, r4, *_):
    m = _map_arg(mem, r1, "map_update_elem")
    if m.key_size:
        mem.read(r2, m.key_size)  # checks the key
    if m._c_value_size:
        mem.read(r3, m._c_value_size)  # checks the value
    # the checked addresses go to the native helper itself: one implementation of its rules
    return _native_maps().lib.hybrid_helper_map_update_elem(r1, r2 if m.key_size else 0, r3, r4, 0) & U64


def _h_delete(mem, r1, r2, *_):
    m = _map_arg(mem, r1, "map_delete_elem")
    if m.key_size:
        mem.read(r2, m.key_size)  # checks the key
    return _native_maps().lib.hybrid_helper_map_delete_elem(r1, r2 if m.key_size else 0, 0, 0, 0) & U64


def _h_perf_event_output(mem, r1, r2, r3, r4, r5):
    m = _map_arg(mem, r2, "perf_event_output")
    data = mem.read(r4, r5) if r5 else b""
    return _native_maps().lib.hybrid_perf_output(m._p(), r3, data, r5) & U64


def _h_push(mem, r1, r2, r3, *_):
    m = _map_arg(mem, r1, "map_push_elem")
    return _native_maps().lib.hybrid_map_push(m._p(), mem.read(r2, m.value_size), r3) & U64


def _h_pop_or_peek(fn: str, helper: str):
    def impl(mem, r1, r2, *_):
        m = _map_arg(mem, r1, helper)
        if fn == "hybrid_map_peek" and m.type == 30:  # bloom filter: r2 is the value to test
            return _native_maps().lib.hybrid_map_peek(m._p(), mem.read(r2, m.value_size)) & U64
        _check_write(mem, r2, m.value_size)
        return getattr(_native_maps().lib, fn)(m._p(), _ptr(r2)) & U64

    return impl


def _h_ringbuf_output(mem, r1, r2, r3, r4, *_):
    m = _map_arg(mem, r1, "ringbuf_output")
    data = mem.read(r2, r3) if r3 else b""
    return _native_maps().lib.hybrid_ringbuf_output(m._p(), data, r3, r4) & U64


def _h_ringbuf_reserve(mem, r1, r2, r3, *_):
    m = _map_arg(mem, r1, "ringbuf_reserve")
    return _addr(_native_maps().lib.hybrid_ringbuf_reserve(m._p(), r2, r3))


def _h_ringbuf_commit(fn: str, helper: str):
    def impl(mem, r1, r2, *_):
        maps = _native_maps()
        if maps.region_containing(r1 - 8, 8) is None:
            raise _vm_error("%s: %#x is not a record of a ring buffer" % (helper, r1))
        getattr(maps.lib, fn)(_ptr(r1), r2)
        return 0

    return impl


def _h_ringbuf_query(mem, r1, r2, *_):
    m = _map_arg(mem, r1, "ringbuf_query")
    return int(_native_maps().lib.hybrid_ringbuf_query(m._p(), r2))


def _h_lookup_percpu(mem, r1, r2, r3, *_):
    m = _map_arg(mem, r1, "map_lookup_percpu_elem")
    key = mem.read(r2, m.key_size)
    value = _addr(_native_maps().lib.hybrid_map_lookup_cpu(m._p(), key, r3 & 0xFFFFFFFF))
    return _allow_bridge_copy(mem, m, value)


# The map helpers (kernel ids); native symbols hybrid_helper_<name> in maps.c / ring.c.
MAP_HELPERS: dict[int, HelperSpec] = {
    h.id: h
    for h in (
        _spec(1, "map_lookup_elem", _h_lookup),
        _spec(2, "map_update_elem", _h_update),
        _spec(3, "map_delete_elem", _h_delete),
        _spec(25, "perf_event_output", _h_perf_event_output),
        _spec(87, "map_push_elem", _h_push),
        _spec(88, "map_pop_elem", _h_pop_or_peek("hybrid_map_pop", "map_pop_elem")),
        _spec(89, "map_peek_elem", _h_pop_or_peek("hybrid_map_peek", "map_peek_elem")),
        _spec(130, "ringbuf_output", _h_ringbuf_output),
        _spec(131, "ringbuf_reserve", _h_ringbuf_reserve),
        _spec(132, "ringbuf_submit", _h_ringbuf_commit("hybrid_ringbuf_submit", "ringbuf_submit")),
        _spec(133, "ringbuf_discard", _h_ringbuf_commit("hybrid_ringbuf_discard", "ringbuf_discard")),
        _spec(134, "ringbuf_query", _h_ringbuf_query),
        _spec(195, "map_lookup_percpu_elem", _h_lookup_percpu),
    )
}


# --- tracing helpers ------------------------------------------------------------
#
# Native in hybrid/native/helpers.c (which documents each helper's userspace
# semantics).  The interpreter runs the same C code: ``native_py`` checks the
# pointer arguments against the interpreter's Memory according to the
# helper's argument kinds, then calls ``hybrid_helper_<name>`` through cffi.
# So both engines share one implementation, and the interpreter keeps its
# rule that a program touches only the memory it was given (a bad pointer of
# a checked kind is a VmError naming the helper and the register).  Memory
# reached through "ptr_user" arguments is not checked: the helper reads it
# with the fault-safe copy and returns -EFAULT, exactly as from JIT code.

ARG_KINDS = {
    "any": "a scalar (or a pointer the helper does not dereference)",
    "size": "the size in bytes (u32) of the pointer argument before it",
    "ptr_mem": "readable memory of `size` bytes (next argument)",
    "ptr_mem_or_null": "ptr_mem, or NULL with size 0",
    "ptr_uninit_mem": "writable memory of `size` bytes (next argument)",
    "ptr_uninit_mem_or_null": "ptr_uninit_mem, or NULL with size 0",
    "str": "a format/string in readable memory of `size` bytes (next argument)",
    "const_str": "a NUL-terminated string in readable memory (no size argument)",
    "ptr_u64": "a writable 8-byte slot (ARG_PTR_TO_LONG)",
    "ptr_ctx": "the program's context (not dereferenced by the helper)",
    "ptr_regs": "the context as a readable struct pt_regs (168 bytes)",
    "ptr_regs_rw": "the context as a writable struct pt_regs (168 bytes)",
    "ptr_map": "a map (checked by the map helpers themselves)",
    "ptr_map_key": "a key of that map",
    "ptr_map_value": "a value of that map",
    "ptr_user": "any address: the helper accesses it fault-safely itself",
    "ptr_func": "a callback: a subprogram of the program (lddw of a function)",
}

PT_REGS_SIZE = 168  # x86-64 struct pt_regs
_CONST_STR_MAX = 1 << 16


def _native_lib():
    from hybrid import native

    return native._native().lib


def _check_arg(mem: Memory, kind: str, regs: tuple[int, ...], i: int) -> None:
    """Check argument ``i`` of kind ``kind`` against the interpreter's memory (raises VmError)."""
    value = regs[i]
    check = getattr(mem, "check", None)

    def need(addr: int, size: int, write: bool) -> None:
        if check is not None:
            check(addr, size, write)
        elif size:
            mem.read(addr, size)

    if kind in ("ptr_mem", "ptr_mem_or_null", "ptr_uninit_mem", "ptr_uninit_mem_or_null", "str"):
        size = regs[i + 1] & 0xFFFFFFFF if i + 1 < len(regs) else 0
        if kind.endswith("_or_null") and value == 0:
            return  # NULL with a size: the helper's -EINVAL/-EFAULT, as from native code
        if size:
            need(value, size, kind.startswith("ptr_uninit"))
    elif kind == "const_str":
        for k in range(_CONST_STR_MAX):
            if mem.read(value + k, 1) == b"\0":
                return
        raise _vm_error("string at %#x has no NUL in %d bytes" % (value, _CONST_STR_MAX))
    elif kind == "ptr_u64":
        need(value, 8, True)
    elif kind in ("ptr_regs", "ptr_regs_rw"):
        need(value, PT_REGS_SIZE, kind == "ptr_regs_rw")
    elif kind == "ptr_map" and "_map_arg" in globals():
        _map_arg(mem, value, "map argument")  # the map helpers' check: an open map of this process


def check_args(mem: Memory, name: str, kinds: tuple[str, ...], regs: tuple[int, ...]) -> None:
    """Check every pointer argument of helper ``name`` per ``kinds``; VmError names the register."""
    from hybrid.errors import VmError

    for i, kind in enumerate(kinds):
        try:
            _check_arg(mem, kind, regs, i)
        except VmError as e:
            raise VmError("helper %s, r%d (%s): %s" % (name, i + 1, kind, e)) from None


def native_py(name: str, args: tuple[str, ...]) -> PyHelper:
    """The interpreter's implementation of helper ``name``: check ``args``, then call the C helper."""
    fn = None

    def helper(mem: Memory, r1: int = 0, r2: int = 0, r3: int = 0, r4: int = 0, r5: int = 0) -> int:
        nonlocal fn
        regs = (r1 & U64, r2 & U64, r3 & U64, r4 & U64, r5 & U64)
        check_args(mem, name, args, regs)
        if fn is None:
            fn = getattr(_native_lib(), "hybrid_helper_" + name)
        return int(fn(*regs)) & U64

    helper.__name__ = helper.__qualname__ = "native_" + name
    return helper


# bpf_loop in the interpreter: the callback is a subprogram (lddw of a function),
# run by the interpreter; addresses registered here are native functions
# (uint64_t f(u64 x5)), called through the C helper (used by tests).
_NATIVE_CALLBACKS: set[int] = set()

BPF_MAX_LOOPS = 1 << 23


def register_native_callback(address: int) -> None:
    """Allow ``address`` (a native ``uint64_t f(uint64_t x5)``) as a bpf_loop callback in the interpreter."""
    _NATIVE_CALLBACKS.add(address & U64)


def _py_loop(mem: Memory, nr: int, callback: int, ctx: int, flags: int, *_: int) -> int:
    """bpf_loop(nr_loops, callback_fn, callback_ctx, flags), as helpers.c's."""
    if callback & U64 in _NATIVE_CALLBACKS:
        return int(_native_lib().hybrid_helper_loop(nr & U64, callback & U64, ctx & U64, flags & U64, 0))
    if flags:
        return -22 & U64  # -EINVAL
    nr &= 0xFFFFFFFF
    if nr > BPF_MAX_LOOPS:
        return -7 & U64  # -E2BIG
    call = getattr(mem, "call_function", None)
    if call is None:
        interp = getattr(mem, "interpreter", None)
        call = getattr(interp, "call_function", None)
    if call is None:
        raise _vm_error("bpf_loop: this interpreter cannot call back into the program "
                        "(its Memory has no call_function)")
    for i in range(nr):
        if call(callback & U64, i, ctx & U64, 0, 0, 0) & U64:
            return i + 1
    return nr


def _trace_spec(id: int, name: str, *args: str) -> HelperSpec:
    return HelperSpec(id, name, native_py(name, args), args=args)


_READ = ("ptr_uninit_mem", "size", "ptr_user")
_REGS = "ptr_regs"

TRACE_HELPERS: dict[int, HelperSpec] = {
    h.id: h
    for h in (
        _trace_spec(4, "probe_read", *_READ),
        _trace_spec(6, "trace_printk", "str", "size", "any", "any", "any"),
        _trace_spec(35, "get_current_task"),
        _trace_spec(36, "probe_write_user", "ptr_user", "ptr_mem", "size"),
        _trace_spec(45, "probe_read_str", *_READ),
        _trace_spec(58, "override_return", "ptr_regs_rw", "any"),
        _trace_spec(67, "get_stack", _REGS, "ptr_uninit_mem", "size", "any"),
        _trace_spec(109, "send_signal", "any"),
        _trace_spec(112, "probe_read_user", *_READ),
        _trace_spec(113, "probe_read_kernel", *_READ),
        _trace_spec(114, "probe_read_user_str", *_READ),
        _trace_spec(115, "probe_read_kernel_str", *_READ),
        _trace_spec(117, "send_signal_thread", "any"),
        _trace_spec(118, "jiffies64"),
        _trace_spec(120, "get_ns_current_pid_tgid", "any", "any", "ptr_uninit_mem", "size"),
        _trace_spec(165, "snprintf", "ptr_uninit_mem_or_null", "size", "const_str", "ptr_mem_or_null", "size"),
        _trace_spec(173, "get_func_ip", "ptr_ctx"),
        _trace_spec(174, "get_attach_cookie", "ptr_ctx"),
        _trace_spec(177, "trace_vprintk", "str", "size", "ptr_mem_or_null", "size"),
        HelperSpec(181, "loop", _py_loop, args=("any", "ptr_func", "any", "any")),
        _trace_spec(182, "strncmp", "ptr_mem", "size", "const_str"),
        _trace_spec(183, "get_func_arg", _REGS, "any", "ptr_u64"),
        _trace_spec(184, "get_func_ret", _REGS, "ptr_u64"),
        _trace_spec(185, "get_func_arg_cnt", "ptr_ctx"),
        _trace_spec(27, "get_stackid", _REGS, "ptr_map", "any"),  # a STACK_TRACE map of maps.py
    )
}


def trace_pipe_path() -> str:
    """Where trace_printk lines go unless redirected: $HYBRID_TRACE_PIPE or /dev/shm/hybrid-trace."""
    return os.environ.get("HYBRID_TRACE_PIPE") or "/dev/shm/hybrid-trace"


# bpf_tail_call (12) is no ordinary call: on success the caller never goes
# on.  The engines lower it themselves (the interpreter switches programs,
# native code calls the target and returns its result); its spec only makes
# the id known to the verifier.
TAIL_CALL = 12


def _py_tail_call(mem: Memory, *_: int) -> int:
    raise _vm_error("bpf_tail_call is handled by the engine, not called as a helper")


TAIL_CALL_SPEC = HelperSpec(TAIL_CALL, "tail_call", _py_tail_call)

# Every helper hybrid implements, by kernel id: what Program.load allows by default.
ALL_HELPERS: dict[int, HelperSpec] = {**BASE_HELPERS, **MAP_HELPERS, **TRACE_HELPERS, TAIL_CALL: TAIL_CALL_SPEC}
assert len(ALL_HELPERS) == len(BASE_HELPERS) + len(MAP_HELPERS) + len(TRACE_HELPERS) + 1, "helper ids overlap"

# Runtime functions (not helpers) that lowered code calls by name.
RUNTIME_SYMBOLS = ("hybrid_tail_call_target", "hybrid_tail_call_run", "hybrid_current_cpu")
