"""``hybrid xdp attach OBJ --dev IFACE ...``: the command line of userspace XDP (see hybrid/cli.py)."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading


def add_parser(sub, func=None) -> None:
    """The ``xdp`` command and its ``attach`` action (handled by ``func``, default :func:`attach`) on the
    subparsers ``sub`` of hybrid's parser."""
    x = sub.add_parser("xdp", help="run an XDP program in userspace on an interface's packets (AF_XDP)")
    x_sub = x.add_subparsers(dest="xdp_command", required=True, metavar="ACTION")
    a = x_sub.add_parser("attach", help="receive IFACE's packets through AF_XDP and run OBJ's xdp program on them",
                         epilog="example: hybrid xdp attach filter.bpf.o --dev eth0 -d 60 --json")
    a.add_argument("object", help="clang-compiled eBPF object with an xdp program")
    a.add_argument("--dev", action="append", required=True, metavar="IFACE",
                   help="interface to attach to (repeatable: XDP_REDIRECT goes to the other attached interfaces)")
    a.add_argument("--queue", type=int, action="append", metavar="N",
                   help="receive queue of the AF_XDP sockets (default 0; repeatable: one socket per queue)")
    a.add_argument("--mode", choices=("auto", "native", "generic"), default="auto",
                   help="where the kernel's redirect program goes: driver (native) or generic (skb) mode; auto: "
                        "native where the driver has it")
    a.add_argument("--copy", action="store_true", help="AF_XDP copy mode even where zero-copy is available")
    a.add_argument("--engine", choices=("jit", "aot"), default="jit", help="how the program is compiled (jit)")
    a.add_argument("--prog", help="the xdp program (needed when the object has several)")
    a.add_argument("--devmap", action="append", default=[], metavar="MAP",
                   help="fill devmap MAP with key i -> the i-th --dev (repeatable)")
    a.add_argument("--update", action="append", nargs=3, default=[], metavar=("MAP", "KEY", "VALUE"),
                   help="set an entry of MAP before the first packet, KEY and VALUE as hex bytes (repeatable)")
    a.add_argument("--value", action="append", default=[], metavar="NAME=INT",
                   help="set a const volatile global before loading (repeatable)")
    a.add_argument("-d", "--duration", type=float, help="detach after this many seconds (default: Ctrl-C)")
    a.add_argument("--count", type=int, default=0, metavar="N", help="detach after N packets")
    a.add_argument("--busy", action="store_true", help="busy-poll the rings instead of sleeping in poll()")
    a.add_argument("--json", action="store_true", help="print the counters and maps at exit as JSON")
    a.add_argument("-q", "--quiet", action="store_true", help="print nothing but the final report")
    a.set_defaults(func=func or attach)


def _values(items) -> dict:
    from hybrid.errors import HybridError

    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise HybridError("--value %r: NAME=INT expected" % item)
        try:
            out[name] = int(value, 0)
        except ValueError:
            raise HybridError("--value %r: %r is not an integer" % (item, value)) from None
    return out


def _update(s, name: str, key: str, value: str) -> None:
    from hybrid.errors import HybridError

    if name not in s.maps:
        raise HybridError("--update: object %r has no map %r (maps: %s)" % (s.spec.name, name, ", ".join(s.maps)))
    try:
        k, v = bytes.fromhex(key), bytes.fromhex(value)
    except ValueError as e:
        raise HybridError("--update %s: KEY and VALUE are hex bytes (%s)" % (name, e)) from None
    s.maps[name].update(k, v)


def _num(b: bytes):
    return int.from_bytes(b, "little") if len(b) in (1, 2, 4, 8) else b.hex()


def dump_maps(maps) -> dict:
    """``{map: {key: value}}`` with 1/2/4/8-byte keys and values as integers, others as hex."""
    out = {}
    for name, m in maps.items():
        if name.startswith(".") and name != ".bss" and name != ".data":
            continue
        try:
            items = list(m.items())
        except Exception:  # noqa: BLE001 - rings and the like have no items
            continue
        entries = {}
        for k, v in items:
            entries[str(_num(k))] = [_num(x) for x in v] if isinstance(v, list) else _num(v)
        out[name] = entries
    return out


def attach(args: argparse.Namespace) -> int:
    from hybrid.xdp import XdpSession

    stop = threading.Event()
    with XdpSession(args.object, args.dev, queue=args.queue or [0], mode=args.mode, prog=args.prog,
                    values=_values(args.value), copy=True if args.copy else None, engine=args.engine) as s:
        for name in args.devmap:
            s.fill_devmap(name)
        for name, key, value in args.update:
            _update(s, name, key, value)
        if not args.quiet:
            ports = ", ".join("%s queue %d (%s mode, %s)" % (p.dev, p.queue, p.mode,
                                                              "zero-copy" if p.zerocopy else "copy") for p in s.ports)
            note = "" if s.pass_to_kernel else "; XDP_PASS packets are dropped (generic mode: see README)"
            print("hybrid: xdp program %r attached to %s%s" % (s.spec.name, ports, note), file=sys.stderr, flush=True)
        old = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            s.start(duration=args.duration, max_rx=args.count, busy=args.busy)
            while s._thread is not None and s._thread.is_alive() and not stop.is_set():
                stop.wait(0.2)
        finally:
            s.stop()
            for sig, h in old.items():
                signal.signal(sig, h)
        st = s.stats()
        maps = dump_maps(s.maps)
        if args.json:
            print(json.dumps({"program": s.spec.name, "ports": [{"dev": p.dev, "queue": p.queue, "mode": p.mode,
                                                                  "zerocopy": p.zerocopy} for p in s.ports],
                              "stats": st, "maps": maps}))
        else:
            print("rx %(rx)d  pass %(pass)d  drop %(drop)d  tx %(tx)d  redirect %(redirect)d  aborted %(aborted)d  "
                  "failed: pass %(pass_failed)d tx %(tx_failed)d redirect %(redirect_failed)d" % st)
            if st.get("prog_ns") is not None:
                print("program: %.1f ns per packet" % st["prog_ns"])
            for name, entries in maps.items():
                for k, v in entries.items():
                    print("@%s[%s]: %s" % (name, k, v))
    return 0
