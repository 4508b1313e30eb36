"""Events from both sides: one consumer over a kernel ring and a userspace ring, and the forwarder into
a kernel ``BPF_MAP_TYPE_USER_RINGBUF``.

A ring buffer (or perf event array) written by kernel *and* userspace
programs of one object is two rings: the kernel's and the region's.
:class:`CombinedConsumer` reads both with one callback.  Waiting alternates
between the two in slices of ``SLICE_MS`` (neither side's wake-up can be
waited on together with the other's), so an event may wait up to that long
when the consumer is idle; a busy consumer never waits.

:class:`Forwarder` moves what userspace programs write into a local ring on
to a kernel user ring buffer, where kernel programs drain it with
``bpf_user_ringbuf_drain``.  A thread of the controlling process does it, in
batches: a record reaches the kernel ring at most ``interval`` seconds after
it was written.  A record that does not fit in the kernel ring (the kernel
side is not draining) is kept and retried, not dropped; ``pending`` counts
them, and ``lost`` the records the local ring itself could not take.
"""

from __future__ import annotations

import collections
import logging
import threading
import time

from hybrid.closable import Closable

log = logging.getLogger("hybrid.bridge.events")

SLICE_MS = 5


class CombinedConsumer(Closable):
    """Consume several rings (kernel and userspace consumers with ``poll``/``consume``) as one."""

    def __init__(self, parts):
        self.parts = list(parts)

    def consume(self) -> int:
        return sum(max(p.consume(), 0) for p in self.parts)

    def poll(self, timeout_ms: int = -1) -> int:
        deadline = None if timeout_ms < 0 else time.monotonic() + timeout_ms / 1000
        while True:
            n = self.consume()
            if n:
                return n
            remaining = SLICE_MS if deadline is None else min(SLICE_MS, (deadline - time.monotonic()) * 1000)
            if remaining <= 0:
                return 0
            n = self.parts[0].poll(max(int(remaining), 1))
            if n:
                return n + self.consume()

    @property
    def lost(self) -> int:
        return sum(getattr(p, "lost", 0) or 0 for p in self.parts)

    def close(self) -> None:
        for p in self.parts:
            p.close()


class Forwarder(Closable):
    """Forward the records of ``local`` (a userspace RingBuf) into ``sink.send(bytes)`` (a kernel user ring)."""

    def __init__(self, local, sink, *, interval: float = 0.01, name: str | None = None):
        from hybrid.user.maps import RingBufferConsumer

        self.local = local
        self.sink = sink
        self.name = name or local.name
        self.interval = interval
        self.forwarded = 0
        self.error: BaseException | None = None
        self._backlog: collections.deque[bytes] = collections.deque()
        self._consumer = RingBufferConsumer(local, self._backlog.append)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.closed = False
        self._thread = threading.Thread(target=self._run, name="hybrid-forward-%s" % self.name, daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        """Records read from the local ring that the kernel ring had no room for yet."""
        return len(self._backlog)

    @property
    def lost(self) -> int:
        return self.local.lost

    def flush(self) -> int:
        """Forward what is there now; returns how many records went on."""
        with self._lock:
            self._consumer.consume()
            n = 0
            while self._backlog:
                try:
                    self.sink.send(self._backlog[0])
                except Exception as e:  # noqa: BLE001 - full kernel ring: keep the record, retry later
                    if getattr(e, "errno", None) in (28, 11, 16, 7):  # ENOSPC, EAGAIN, EBUSY, E2BIG
                        break
                    raise
                self._backlog.popleft()
                n += 1
            self.forwarded += n
            return n

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.flush()
            except Exception as e:  # noqa: BLE001 - logged once, kept for close()
                if self.error is None:
                    log.warning("forwarding ring %r: %s", self.name, e)
                self.error = e

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._stop.set()
        self._thread.join()
        self.flush()
