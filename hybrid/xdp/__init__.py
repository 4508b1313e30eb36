"""Userspace XDP: an object's ``xdp`` program run in the VM on packets received through AF_XDP.

::

    from hybrid.xdp import XdpSession

    with XdpSession("lb.bpf.o", ["eth0", "eth1"]) as s:     # attached now
        s.maps["backends"].update(k, v)                     # the object's maps, in shared memory
        s.run(duration=10)                                   # the native loop, GIL released; stop() from another thread
        print(s.stats())                                     # rx, pass, drop, tx, redirect, ... and ns per program run

What happens (Python only sets it up; ``hybrid/native/xdp.c`` does the rest):

* the object is parsed and its maps created in a shared region as for
  ``hybrid.load``; a devmap, devmap_hash, cpumap or xskmap becomes an array
  (a hash for devmap_hash) of the same key and value sizes that
  ``bpf_redirect_map`` treats as that type;
* the ``xdp`` program is verified with the XDP helpers added, its context
  loads rewritten as the kernel does (:mod:`hybrid.xdp.ctx`) and compiled by
  the JIT;
* per interface: an AF_XDP socket on ``queue`` (zero-copy where the driver
  has it, else copy mode), an XSKMAP holding it, and a tiny kernel XDP
  program (``bpf_redirect_map(&xsks, rx_queue_index, XDP_PASS)``) attached
  with a BPF link, in driver mode where the driver has it (veth does), else
  generic mode.  The link goes away with the process, so nothing stays
  attached after a crash either;
* :meth:`XdpSession.run` runs the native loop: receive, program, verdict
  (see ``xdp.c``).  ``XDP_PASS`` hands the packet to the kernel's stack as
  received on the interface (a test run of an ``XDP_PASS`` program with
  ``BPF_F_TEST_XDP_LIVE_FRAMES``); with the redirect program in generic
  mode that packet would come back to the socket, so passed packets are
  then dropped and counted as ``pass_failed``.  A passed packet's skb is
  built on a whole page (the test run's page pool), so a receiving socket
  is charged about 4.2 KB for it, even for a tiny datagram (about 0.8 KB
  without XDP): a socket that must absorb bursts of passed datagrams needs
  a receive buffer (``SO_RCVBUF``) about five times larger than without XDP.
"""

from __future__ import annotations

import dataclasses
import errno as E
import os
import socket
import threading

from hybrid.closable import Closable
from hybrid.errors import AttachError, FeatureError, HybridError, KernelError, VerifierError

# enum bpf_map_type values the XDP redirect maps have
DEVMAP, CPUMAP, XSKMAP, DEVMAP_HASH = 14, 16, 17, 25
ARRAY, HASH = 2, 1
REDIRECT_MAPS = {DEVMAP: ARRAY, CPUMAP: ARRAY, XSKMAP: ARRAY, DEVMAP_HASH: HASH}

XDP_FLAGS_SKB_MODE, XDP_FLAGS_DRV_MODE = 2, 4
XDP_COPY, XDP_ZEROCOPY = 2, 4
MODES = ("auto", "native", "generic")
ACTIONS = {0: "XDP_ABORTED", 1: "XDP_DROP", 2: "XDP_PASS", 3: "XDP_TX", 4: "XDP_REDIRECT"}
STATS_FIELDS = ("rx", "pass", "drop", "aborted", "tx", "redirect", "pass_failed", "tx_failed", "redirect_failed",
                "batches", "polls", "prog_ticks")


def _lib():
    from hybrid import native

    mod = native._native()
    return mod.ffi, mod.lib


def xdp_helpers() -> dict:
    """The helper table of XDP programs: every helper hybrid has, plus the XDP ones (native in xdp.c)."""
    from hybrid.user.helpers import ALL_HELPERS, HelperSpec, native_py

    def spec(hid, name, *args):
        native = "xdp_" + name
        return HelperSpec(hid, name, native_py(native, args), native=native, args=args)

    extra = (
        spec(23, "redirect", "any", "any"),
        spec(28, "csum_diff", "ptr_mem_or_null", "size", "ptr_mem_or_null", "size", "any"),
        spec(44, "adjust_head", "ptr_ctx", "any"),
        spec(51, "redirect_map", "any", "any", "any"),
        spec(54, "adjust_meta", "ptr_ctx", "any"),
        spec(65, "adjust_tail", "ptr_ctx", "any"),
        spec(69, "fib_lookup", "ptr_ctx", "ptr_mem", "size", "any"),
        spec(188, "get_buff_len", "ptr_ctx"),
    )
    return {**ALL_HELPERS, **{h.id: h for h in extra}}


def ifindex(name: str) -> int:
    """The index of interface ``name`` in this network namespace; HybridError if there is none."""
    try:
        return socket.if_nametoindex(name)
    except OSError:
        raise HybridError("no network interface %r (in this network namespace)" % name) from None


def _xdp_program(spec, name: str | None):
    """The program spec to run: ``name``, or the object's only XDP program."""
    if name is not None:
        try:
            p = spec.program(name)
        except KeyError as e:
            raise HybridError(str(e.args[0])) from None
        if p.prog_type != 6 and p.kind != "xdp":
            raise HybridError("program %r (section %r) of %r is not an XDP program (section 'xdp' expected)"
                              % (p.name, p.section, spec.name))
        return p
    found = [p for p in spec.programs if p.kind == "xdp" or p.prog_type == 6]
    plain = [p for p in found if p.section in ("xdp", "xdp.frags")] or found
    if not plain:
        raise HybridError("object %r has no XDP program (section 'xdp'); its programs: %s"
                          % (spec.name, ", ".join("%s (%s)" % (p.name, p.section) for p in spec.programs) or "none"))
    if len(plain) > 1:
        raise HybridError("object %r has several XDP programs (%s): choose one with --prog"
                          % (spec.name, ", ".join(p.name for p in plain)))
    return plain[0]


def load_program(path, *, prog: str | None = None, values=None):
    """``(BpfObject with the maps, its XDP program spec, verified Program with the ctx rewrite, rewritten)``."""
    from hybrid.user.object import BpfObject, read_spec
    from hybrid.user.program import Program
    from hybrid.xdp import ctx

    spec = read_spec(path, values)
    pspec = _xdp_program(spec, prog)
    maps = tuple(dataclasses.replace(m, type=REDIRECT_MAPS[m.type]) if m.type in REDIRECT_MAPS else m
                 for m in spec.maps)
    progs = tuple(dataclasses.replace(p, autoload=False) for p in spec.programs)
    obj = BpfObject(dataclasses.replace(spec, maps=maps, programs=progs))
    try:
        refs = obj.region.map_refs() if obj.region else {}
        regions = obj.region.mem_regions() if obj.region else ()
        try:
            program = Program.load(pspec.insns, name=pspec.name, maps=refs, regions=regions, helpers=xdp_helpers())
        except VerifierError as e:
            raise VerifierError("program %r (section %r): %s" % (pspec.name, pspec.section, e), e.pc) from None
        insns, rewritten = ctx.rewrite(program.insns)
        program = dataclasses.replace(program, insns=insns)
        ffi, lib = _lib()
        for m, orig in zip(spec.maps, maps):
            if m.type in REDIRECT_MAPS:
                lib.hybrid_xdp_register_map(int(ffi.cast("uintptr_t", obj.maps[m.name]._p())), m.type)
        obj._xdp_types = {m.name: m.type for m in spec.maps if m.type in REDIRECT_MAPS}
    except BaseException:
        obj.close()
        raise
    return obj, pspec, program, rewritten


class _Kernel(Closable):
    """The kernel side of one session: the XSKMAP, the redirect / pass / fib programs, the links."""

    def __init__(self):
        self.fds: list[int] = []
        self.links: dict[str, tuple[int, str]] = {}  # dev -> (BPF link fd, mode)
        self.xsks: dict[str, int] = {}  # dev -> its XSKMAP's fd
        self.pass_fd = self.fib_fd = -1
        ffi, lib = _lib()
        self.ffi, self.lib = ffi, lib
        self.pass_fd = self._prog(1, "the XDP_PASS program")
        try:
            self.fib_fd = self._prog(4, "the fib_lookup program")
        except KernelError:
            self.fib_fd = -1  # bpf_fib_lookup then answers -EOPNOTSUPP

    def _fd(self, fd: int, what: str) -> int:
        if fd < 0:
            msg = {E.EPERM: "needs root (CAP_BPF and CAP_NET_ADMIN)"}.get(-fd, os.strerror(-fd))
            raise KernelError("%s: [%s] %s" % (what, E.errorcode.get(-fd, -fd), msg), -fd)
        self.fds.append(fd)
        return fd

    def _prog(self, kind: int, what: str, map_fd: int = -1) -> int:
        log = self.ffi.new("char[]", 65536)
        fd = self.lib.hybrid_xdp_kernel_prog(kind, map_fd, log, 65536)
        if fd < 0:
            text = self.ffi.string(log).decode(errors="replace").strip().splitlines()[-3:]
            raise KernelError("%s: load: [%s] %s%s" % (what, E.errorcode.get(-fd, -fd), os.strerror(-fd),
                                                        ("; verifier: " + " | ".join(text)) if text else ""), -fd)
        self.fds.append(fd)
        return fd

    def attach(self, dev: str, index: int, queue: int, xsk_fd: int, mode: str) -> str:
        """Put the socket in ``dev``'s XSKMAP and attach its redirect program to ``dev``; the mode that worked.

        Each interface has its own XSKMAP (keyed by queue) and redirect program: a socket receives
        only from the device and queue it is bound to."""
        if dev in self.xsks:
            map_fd = self.xsks[dev]
        else:
            map_fd = self.xsks[dev] = self._fd(self.lib.hybrid_xdp_map_create(XSKMAP, 4, 4, 64), "XSKMAP create")
        r = self.lib.hybrid_xdp_map_set(map_fd, queue, xsk_fd)
        if r < 0:
            raise KernelError("XSKMAP update for %s queue %d: %s" % (dev, queue, os.strerror(-r)), -r)
        if dev in self.links:
            return self.links[dev][1]
        redirect_fd = self._prog(0, "the redirect program", map_fd)
        tries = {"auto": (("native", XDP_FLAGS_DRV_MODE), ("generic", XDP_FLAGS_SKB_MODE)),
                 "native": (("native", XDP_FLAGS_DRV_MODE),), "generic": (("generic", XDP_FLAGS_SKB_MODE),)}[mode]
        errors = []
        for name, flags in tries:
            fd = self.lib.hybrid_xdp_link(redirect_fd, index, flags)
            if fd >= 0:
                self.fds.append(fd)
                self.links[dev] = (fd, name)
                return name
            errors.append("%s mode: %s" % (name, os.strerror(-fd)))
            if -fd in (E.EBUSY, E.EEXIST):
                raise AttachError("interface %s already has an XDP program (%s); detach it first (ip link set dev "
                                  "%s xdp off)" % (dev, os.strerror(-fd), dev))
        raise AttachError("cannot attach the AF_XDP redirect program to %s: %s" % (dev, "; ".join(errors)))

    def close(self) -> None:
        fds, self.fds = self.fds, []
        self.links = {}
        for fd in reversed(fds):  # links first: the interface is released before the sockets close
            try:
                os.close(fd)
            except OSError:
                pass


class Port:
    """One AF_XDP socket: an interface and a queue."""

    def __init__(self, dev: str, index: int, queue: int, ptr, zerocopy: bool):
        self.dev, self.ifindex, self.queue, self.ptr, self.zerocopy = dev, index, queue, ptr, zerocopy
        self.mode = ""  # native / generic, where the redirect program is attached

    def __repr__(self) -> str:
        return "<Port %s queue %d, %s mode, %s>" % (self.dev, self.queue, self.mode,
                                                    "zero-copy" if self.zerocopy else "copy")


class XdpSession(Closable):
    """An XDP program attached in userspace to interfaces ``devs`` (see the module's doc).

    ``queue``: a receive queue, or a list (one socket per interface and queue); ``mode``: where the kernel's
    redirect program goes (auto: native, else generic); ``copy``: force
    AF_XDP copy mode (None: zero-copy where the driver has it); ``engine``: ``"jit"`` or ``"aot"`` (a shared
    library built from the same IR).  Raises with nothing attached.
    """

    def __init__(self, path, devs, *, queue: int | list[int] = 0, mode: str = "auto", prog: str | None = None,
                 values=None, copy: bool | None = None, nframes: int = 4096, frame_size: int = 4096, ring_size: int = 2048,
                 pass_to_kernel: bool = True, engine: str = "jit"):
        if isinstance(devs, str):
            devs = [devs]
        queues = sorted(set([queue] if isinstance(queue, int) else queue))
        if not queues or any(not 0 <= q < 64 for q in queues):
            raise HybridError("queues are 0 to 63, not %s" % (queue,))
        if not devs:
            raise HybridError("no interface given (--dev)")
        if mode not in MODES:
            raise HybridError("mode must be one of %s, not %r" % (", ".join(MODES), mode))
        if engine not in ("jit", "aot"):
            raise HybridError("the receive loop calls native code: engine 'jit' or 'aot', not %r" % (engine,))
        self.obj = self.kernel = self.loop = self.engine = None
        self.ports: list[Port] = []
        self._thread = None
        self._closed = False
        indexes = [(d, ifindex(d)) for d in devs]  # a missing interface: before anything is created
        try:
            self.obj, self.spec, self.program, self.rewritten = load_program(path, prog=prog, values=values)
            self.maps = self.obj.maps
            from hybrid.user.engine import create_engine

            self.engine = create_engine(engine, self.program)
            ffi, lib = _lib()
            self._ffi, self._lib = ffi, lib
            self.kernel = _Kernel()
            for dev, index in indexes:
                for q in queues:
                    self._open_port(dev, index, q, mode, copy, nframes, frame_size, ring_size)
            generic = any(p.mode == "generic" for p in self.ports)
            self.pass_to_kernel = pass_to_kernel and not generic
            self.loop = lib.hybrid_xdp_loop_new(self.engine.address, self.kernel.pass_fd if self.pass_to_kernel else -1)
            if self.loop == ffi.NULL:
                raise MemoryError("hybrid_xdp_loop_new")
            for p in self.ports:
                if lib.hybrid_xdp_loop_add(self.loop, p.ptr) < 0:
                    raise HybridError("at most 16 sockets (interfaces × queues) in one session, not %d"
                                      % len(self.ports))
            lib.hybrid_xdp_set_fib_prog(self.kernel.fib_fd)
        except BaseException:
            self.close()
            raise

    def _open_port(self, dev, index, queue, mode, copy, nframes, frame_size, ring_size) -> None:
        ffi, lib = self._ffi, self._lib
        err = ffi.new("int *")
        at = ffi.new("char[]", 128)
        flags = XDP_COPY if copy else (XDP_ZEROCOPY if copy is False else 0)
        ptr = lib.hybrid_xsk_open(index, queue, nframes, frame_size, ring_size, flags, err, at, 128)
        if ptr == ffi.NULL:
            e, step = -err[0], ffi.string(at).decode()
            if step == "socket(AF_XDP)" and e in (E.EAFNOSUPPORT, E.EPROTONOSUPPORT, E.EINVAL):
                raise FeatureError("this kernel has no AF_XDP sockets (socket(AF_XDP): %s; "
                                   "CONFIG_XDP_SOCKETS is not set)" % os.strerror(e), e)
            if step == "bind" and e == E.EBUSY:
                raise AttachError("%s queue %d already has an AF_XDP socket (another hybrid xdp attach, or "
                                  "another AF_XDP program, is using it)" % (dev, queue))
            if step == "bind" and e == E.EINVAL:
                raise AttachError("AF_XDP socket on %s queue %d: bind: %s (has %s a receive queue %d?)"
                                  % (dev, queue, os.strerror(e), dev, queue))
            raise AttachError("AF_XDP socket on %s queue %d: %s: %s" % (dev, queue, step, os.strerror(e)))
        port = Port(dev, index, queue, ptr, bool(lib.hybrid_xsk_zerocopy(ptr)))
        self.ports.append(port)
        port.mode = self.kernel.attach(dev, index, queue, lib.hybrid_xsk_fd(ptr), mode)

    # --- running ------------------------------------------------------------------------

    def run(self, duration: float | None = None, max_rx: int = 0, busy: bool = False) -> None:
        """Run the loop in this thread until :meth:`stop`, ``duration`` seconds or ``max_rx`` packets."""
        if self.loop is None:
            raise HybridError("the XDP session is closed")
        r = self._lib.hybrid_xdp_loop_run(self.loop, int((duration or 0) * 1e9), max_rx, int(busy))
        if r < 0:
            raise OSError(-r, "XDP loop: " + os.strerror(-r))

    def start(self, **kw) -> "XdpSession":
        """Run the loop in a background thread (stop with :meth:`stop` or :meth:`close`)."""
        self._thread = threading.Thread(target=self.run, kwargs=kw, name="hybrid-xdp", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self.loop is not None:
            self._lib.hybrid_xdp_loop_stop(self.loop)
        t, self._thread = self._thread, None
        if t is not None:
            t.join()

    def stats(self) -> dict:
        """Counters of the loop; ``prog_ns`` is the average time of one program run, in ns."""
        if self.loop is None:
            return {}
        st = self._ffi.new("struct hybrid_xdp_stats *")
        self._lib.hybrid_xdp_loop_stats(self.loop, st)
        out = {f: int(getattr(st, f)) for f in STATS_FIELDS}
        hz = self._lib.hybrid_tsc_hz()
        out["prog_ns"] = (out["prog_ticks"] * 1e9 / hz / out["rx"]) if out["rx"] and hz else None
        return out

    def fill_devmap(self, name: str, devs=None) -> None:
        """Set devmap (or devmap_hash) ``name``: key i -> ifindex of the i-th of ``devs`` (default: the ports)."""
        devs = [p.dev for p in self.ports] if devs is None else list(devs)
        types = getattr(self.obj, "_xdp_types", {})
        if types.get(name) not in (DEVMAP, DEVMAP_HASH):
            raise HybridError("map %r is not a devmap of this object (devmaps: %s)"
                              % (name, ", ".join(n for n, t in types.items() if t in (DEVMAP, DEVMAP_HASH)) or "none"))
        m = self.maps[name]
        for i, d in enumerate(devs):
            value = ifindex(d).to_bytes(4, "little") + bytes(m.value_size - 4)
            m.update(i.to_bytes(m.key_size, "little"), value)

    def close(self) -> None:
        """Stop, detach the kernel programs, close the sockets and the object.  Idempotent."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        self.stop()
        if self.kernel is not None:
            self.kernel.close()
            self.kernel = None
        if getattr(self, "loop", None) is not None:
            self._lib.hybrid_xdp_loop_free(self.loop)
            self.loop = None
        for p in self.ports:
            self._lib.hybrid_xsk_close(p.ptr)
        self.ports = []
        if self.engine is not None:
            self.engine.close()
            self.engine = None
        if self.obj is not None:
            ffi, lib = _lib()
            for name in getattr(self.obj, "_xdp_types", {}):
                lib.hybrid_xdp_unregister_map(int(ffi.cast("uintptr_t", self.obj.maps[name]._p())))
            self.obj.close()
            self.obj = None
