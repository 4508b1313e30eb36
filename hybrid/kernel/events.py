"""Event channels between kernel programs and Python, through libbpf.

* :class:`RingBuffer` reads a ``BPF_MAP_TYPE_RINGBUF`` (libbpf ``ring_buffer``):
  ``callback(data: bytes)`` once per record, in order;
* :class:`PerfBuffer` reads a ``BPF_MAP_TYPE_PERF_EVENT_ARRAY`` (libbpf
  ``perf_buffer``, ``pages`` per CPU): ``callback(cpu, data)`` per record and
  ``lost(cpu, count)`` when the kernel dropped records;
* :class:`UserRingBuffer` writes a ``BPF_MAP_TYPE_USER_RINGBUF``
  (libbpf ``user_ring_buffer``): ``send(data)``, drained by programs with
  ``bpf_user_ringbuf_drain``.

Each takes a :class:`~hybrid.kernel.maps.KernelMap`, so code without a
:class:`~hybrid.kernel.object.KernelObject` can use them.  A callback that
raises stops the current ``poll``/``consume``, which re-raises it; a ring
buffer callback returning a negative int stops it too and the int is
returned (the record counts as consumed), as in libbpf.
"""

from __future__ import annotations

import ctypes
import errno as E
from typing import Callable

from hybrid.closable import Closable
from hybrid.errors import MapError
from hybrid.kernel import libbpf as L
from hybrid.kernel.maps import BPF_MAP_TYPE_PERF_EVENT_ARRAY, BPF_MAP_TYPE_RINGBUF, BPF_MAP_TYPE_USER_RINGBUF, \
    KernelMap


def _expect(m: KernelMap, t: int, what: str, op: str) -> None:
    if not isinstance(m, KernelMap):
        raise MapError(E.EINVAL, getattr(m, "name", None), op, "not a KernelMap (%s)" % type(m).__name__)
    if m.type != t:
        raise m._error(E.EINVAL, op, "not a %s map" % what)


class _Reader(Closable):
    _ptr = None
    _exc: BaseException | None = None
    _stopped = False
    _poll_fn = _consume_fn = _free_fn = _epoll_fn = ""

    def _p(self):
        if not self._ptr:
            raise self.map._error(E.EBADF, "poll", "the %s is closed" % type(self).__name__)
        return self._ptr

    def _finish(self, rc: int, op: str) -> int:
        exc, self._exc = self._exc, None
        stopped, self._stopped = self._stopped, False
        if exc is not None:
            raise exc
        if rc == -E.EINTR:
            return 0
        if rc < 0 and not stopped:
            raise self.map._error(-rc, op)
        return rc

    def poll(self, timeout_ms: int = -1) -> int:
        """Wait up to ``timeout_ms`` (-1: no limit) for records and read them; returns how many."""
        return self._finish(getattr(L.lib(), self._poll_fn)(self._p(), timeout_ms), "poll")

    def consume(self) -> int:
        """Read every available record without waiting; returns how many."""
        return self._finish(getattr(L.lib(), self._consume_fn)(self._p()), "consume")

    @property
    def epoll_fd(self) -> int:
        """The epoll fd to wait on (for an event loop)."""
        return getattr(L.lib(), self._epoll_fn)(self._p())

    def close(self) -> None:
        ptr, self._ptr = self._ptr, None
        if ptr:
            getattr(L.lib(), self._free_fn)(ptr)


class RingBuffer(_Reader):
    """Reads a ring buffer map: ``callback(data) -> int | None`` once per record."""

    _poll_fn, _consume_fn, _free_fn, _epoll_fn = ("ring_buffer__poll", "ring_buffer__consume", "ring_buffer__free",
                                                  "ring_buffer__epoll_fd")

    def __init__(self, map: KernelMap, callback: Callable[[bytes], int | None]):
        _expect(map, BPF_MAP_TYPE_RINGBUF, "ring buffer (BPF_MAP_TYPE_RINGBUF)", "ring_buffer")
        self.map = map
        self.callback = callback
        self._cb = L.RING_SAMPLE_FN(self._sample)
        ptr = L.lib().ring_buffer__new(map.fd, self._cb, None, None)
        if not ptr:
            raise map._error(ctypes.get_errno() or E.EINVAL, "ring_buffer__new")
        self._ptr = ptr

    def _sample(self, _ctx, data, size) -> int:
        try:
            rc = self.callback(ctypes.string_at(data, size))
        except BaseException as e:  # noqa: BLE001 - re-raised by poll()/consume()
            self._exc = e
            return -E.ECANCELED
        if isinstance(rc, int) and rc < 0:
            self._stopped = True
            return rc
        return 0


class PerfBuffer(_Reader):
    """Reads a perf event array: ``callback(cpu, data)`` per record, ``lost(cpu, count)`` for drops
    (also added up in :attr:`lost_count`)."""

    _poll_fn, _consume_fn, _free_fn, _epoll_fn = ("perf_buffer__poll", "perf_buffer__consume", "perf_buffer__free",
                                                  "perf_buffer__epoll_fd")

    def __init__(self, map: KernelMap, callback: Callable[[int, bytes], object],
                 lost: Callable[[int, int], object] | None = None, pages: int = 8):
        _expect(map, BPF_MAP_TYPE_PERF_EVENT_ARRAY, "perf event array (BPF_MAP_TYPE_PERF_EVENT_ARRAY)",
                "perf_buffer")
        if pages <= 0 or pages & (pages - 1):
            raise map._error(E.EINVAL, "perf_buffer", "pages must be a power of 2, not %d" % pages)
        self.map = map
        self.callback = callback
        self.lost = lost
        self.lost_count = 0
        self._sample_cb = L.PERF_SAMPLE_FN(self._sample)
        self._lost_cb = L.PERF_LOST_FN(self._lost)
        ptr = L.lib().perf_buffer__new(map.fd, pages, self._sample_cb, self._lost_cb, None, None)
        if not ptr:
            err = ctypes.get_errno() or E.EINVAL
            raise map._error(err, "perf_buffer__new", "cannot open the per-CPU perf events: %s" % L.strerror(err))
        self._ptr = ptr

    def _sample(self, _ctx, cpu, data, size) -> None:
        if self._exc is not None:
            return
        try:
            self.callback(cpu, ctypes.string_at(data, size))
        except BaseException as e:  # noqa: BLE001 - re-raised by poll()/consume()
            self._exc = e

    def _lost(self, _ctx, cpu, count) -> None:
        self.lost_count += count
        if self.lost is None or self._exc is not None:
            return
        try:
            self.lost(cpu, count)
        except BaseException as e:  # noqa: BLE001
            self._exc = e


class UserRingBuffer(Closable):
    """Writes a user ring buffer map: ``send(data)`` posts one record for ``bpf_user_ringbuf_drain``."""

    def __init__(self, map: KernelMap):
        _expect(map, BPF_MAP_TYPE_USER_RINGBUF, "user ring buffer (BPF_MAP_TYPE_USER_RINGBUF)", "user_ring_buffer")
        self.map = map
        ptr = L.function("user_ring_buffer__new")(map.fd, None)
        if not ptr:
            raise map._error(ctypes.get_errno() or E.EINVAL, "user_ring_buffer__new")
        self._ptr = ptr

    def send(self, data) -> None:
        """Post ``data`` as one record; MapError(ENOSPC) when the ring is full."""
        if not self._ptr:
            raise self.map._error(E.EBADF, "send", "the UserRingBuffer is closed")
        data = bytes(data)
        lib = L.lib()
        sample = lib.user_ring_buffer__reserve(self._ptr, len(data))
        if not sample:
            err = ctypes.get_errno() or E.ENOSPC
            raise self.map._error(err, "send", "ring buffer full (programs have not drained it)"
                                  if err == E.ENOSPC else None)
        ctypes.memmove(sample, data, len(data))
        lib.user_ring_buffer__submit(self._ptr, sample)

    def close(self) -> None:
        ptr, self._ptr = self._ptr, None
        if ptr:
            L.lib().user_ring_buffer__free(ptr)
