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

    @property
    def symbol(self) -> str:
        return "hybrid_helper_" + (self.native or self.name)


U64 = (1 << 64) - 1


def _ns(clock: int) -> int:
    return time.clock_gettime_ns(clock) & U64


def _comm(mem: Memory, buf: int, size: int, *_: int) -> int:
    if size == 0:
        return -22 & U64  # -EINVAL
    name = _thread_name()
    data = name[: size - 1] + b"\0"
    mem.write(buf, data)
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
        _spec(160, "ktime_get_coarse_ns", lambda mem, *a: _ns(time.CLOCK_MONOTONIC_COARSE)),
    )
}

HelperTable = Mapping[int, HelperSpec]
