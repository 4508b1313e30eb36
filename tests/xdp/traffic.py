"""The XDP tests' traffic generator and sinks, run inside a test namespace (``ip netns exec NS python traffic.py``).

    traffic.py udp-send DST PORT COUNT [--sports 4000,4001] [--payload TEXT]  plain UDP datagrams
    traffic.py udp-recv PORT [PORT...] [--idle 1.0] [--rcvbuf BYTES]
                                                        prints "ready", then {"port": {payload: n}} as JSON
                                                        (and "drops": {"port": n} if its socket dropped any)
    traffic.py raw-send IFACE HEXFRAME COUNT            Ethernet frames through AF_PACKET
    traffic.py raw-recv IFACE [--idle 1.0]              prints "ready", then every frame received (hex) as JSON
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import sys
import time


def udp_send(a) -> None:
    sports = [int(p) for p in a.sports.split(",")] if a.sports else [0]
    socks = []
    for sp in sports:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("0.0.0.0", sp))
        socks.append((sp, s))
    for i in range(a.count):
        for sp, s in socks:
            payload = (a.payload or "flow %d" % sp).encode()
            s.sendto(payload, (a.dst, a.port))
        if a.gap:
            time.sleep(a.gap)
    print(json.dumps({"sent": a.count * len(socks)}))


def _recv_loop(socks, idle: float, read, first: float = 10.0):
    """Read until ``idle`` seconds pass without a packet, counted from the first packet (until then, up to
    ``first`` seconds: the sender is a new Python process under ``ip netns exec``, slow to start on a busy
    machine)."""
    print("ready", flush=True)
    start = time.monotonic()
    last = None
    while True:
        now = time.monotonic()
        if (now - last >= idle) if last is not None else (now - start >= max(first, idle)):
            break
        r, _, _ = select.select(socks, [], [], 0.05)
        for s in r:
            read(s)
            last = time.monotonic()


# The sink's receive buffer must hold a whole test burst: a datagram passed on by userspace XDP is a
# page-backed skb (the kernel's BPF_F_TEST_XDP_LIVE_FRAMES path) and is charged about 4.2 KB of the socket's
# buffer whatever its size (about 0.8 KB without XDP), so the default 208 KiB (net.core.rmem_default) holds
# only about 50 of them: a burst of 64 passed while this Python loop is not scheduled would overflow it
# (UdpRcvbufErrors, drop reason SOCKET_RCVBUFF), which says nothing about the XDP verdicts under test.
RCVBUF = 4 << 20


def _set_rcvbuf(s, size: int) -> None:
    """SO_RCVBUFFORCE (root: above net.core.rmem_max), else SO_RCVBUF (capped at rmem_max)."""
    try:
        s.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_RCVBUFFORCE", 33), size)
    except OSError:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)


def _udp_drops(s) -> int:
    """The socket's drop count (the last column of /proc/net/udp, found by the socket's inode)."""
    ino = str(os.fstat(s.fileno()).st_ino)
    try:
        with open("/proc/net/udp") as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                if len(cols) > 12 and cols[9] == ino:
                    return int(cols[-1])
    except OSError:
        pass
    return 0


def udp_recv(a) -> None:
    socks, got = [], {}
    for p in a.ports:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        if a.rcvbuf:
            _set_rcvbuf(s, a.rcvbuf)
        s.bind(("0.0.0.0", p))
        socks.append(s)
        got[str(p)] = {}

    def read(s):
        data, _ = s.recvfrom(4096)
        d = got[str(s.getsockname()[1])]
        key = data.decode(errors="replace")
        d[key] = d.get(key, 0) + 1

    _recv_loop(socks, a.idle, read)
    drops = {str(s.getsockname()[1]): _udp_drops(s) for s in socks}
    if any(drops.values()):
        got["drops"] = drops  # a receive buffer overflow: the test's result says so
    print(json.dumps(got), flush=True)


def raw_send(a) -> None:
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    s.bind((a.iface, 0))
    frame = bytes.fromhex(a.frame)
    for _ in range(a.count):
        s.send(frame)
        if a.gap:
            time.sleep(a.gap)
    print(json.dumps({"sent": a.count}))


def raw_recv(a) -> None:
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
    s.bind((a.iface, 0))
    frames = []

    def read(sock):
        data, addr = sock.recvfrom(65535)
        if addr[2] != socket.PACKET_OUTGOING:
            frames.append(data.hex())

    _recv_loop([s], a.idle, read)
    print(json.dumps(frames), flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    u = sub.add_parser("udp-send")
    u.add_argument("dst")
    u.add_argument("port", type=int)
    u.add_argument("count", type=int)
    u.add_argument("--sports")
    u.add_argument("--payload")
    u.add_argument("--gap", type=float, default=0.0)
    u.set_defaults(func=udp_send)
    r = sub.add_parser("udp-recv")
    r.add_argument("ports", type=int, nargs="+")
    r.add_argument("--idle", type=float, default=1.0)
    r.add_argument("--rcvbuf", type=int, default=RCVBUF, help="socket receive buffer (0: the default)")
    r.set_defaults(func=udp_recv)
    rs = sub.add_parser("raw-send")
    rs.add_argument("iface")
    rs.add_argument("frame")
    rs.add_argument("count", type=int)
    rs.add_argument("--gap", type=float, default=0.0)
    rs.set_defaults(func=raw_send)
    rr = sub.add_parser("raw-recv")
    rr.add_argument("iface")
    rr.add_argument("--idle", type=float, default=1.0)
    rr.set_defaults(func=raw_recv)
    a = p.parse_args()
    a.func(a)


if __name__ == "__main__":
    sys.exit(main())
