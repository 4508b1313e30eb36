"""Small private networks for the XDP tests and benchmarks: network namespaces joined by veth pairs.

::

    with Network() as net:
        a, b = net.host("a"), net.host("b")
        net.link(a, "10.201.0.1/24", b, "10.201.0.2/24")      # a veth pair, addresses, up
        b.run(["ip", "addr"])
        proc = b.popen([sys.executable, "script.py"])          # a process inside b

Everything is created with ``ip`` and named ``hx<pid>-...`` (the creating
process's pid); ``close()`` deletes the namespaces (their veths go with
them), and :func:`prune` removes those of processes that are gone.  Only
the hosts created here exchange traffic.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import re
import socket
import struct
import subprocess
import sys

from hybrid.closable import Closable

SIOCETHTOOL = 0x8946
ETHTOOL_STXCSUM = 0x17
PREFIX = "hx"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def prune() -> None:
    """Delete namespaces ``hx<pid>-*`` whose creating process no longer runs."""
    out = _ip("netns", "list", check=False).stdout
    for line in out.splitlines():
        m = re.match(r"(%s(\d+)-\S+)" % PREFIX, line)
        if m and not os.path.exists("/proc/%s" % m.group(2)):
            _ip("netns", "del", m.group(1), check=False)


def tx_checksum_off(dev: str) -> None:
    """Turn off TX checksum offload of ``dev`` (this namespace), like ``ethtool -K dev tx off``.

    A veth sender leaves the UDP/TCP checksum to be completed later (CHECKSUM_PARTIAL); a packet
    taken by AF_XDP on the peer carries it unfinished.  Real NICs complete it in hardware.
    """
    ev = ctypes.create_string_buffer(struct.pack("II", ETHTOOL_STXCSUM, 0), 8)
    ifr = struct.pack("16sP", dev.encode(), ctypes.addressof(ev)) + bytes(16)
    s = socket.socket()
    try:
        fcntl.ioctl(s.fileno(), SIOCETHTOOL, ifr)
    finally:
        s.close()


class Host:
    """A network namespace."""

    def __init__(self, net: "Network", name: str):
        self.net, self.name = net, name
        self.devs: dict[str, dict] = {}  # dev -> {"mac": .., "ip": .., "ifindex": ..}

    def cmd(self, argv) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, argv, check: bool = True, **kw) -> subprocess.CompletedProcess:
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        return subprocess.run(self.cmd(argv), check=check, **kw)

    def popen(self, argv, **kw) -> subprocess.Popen:
        return subprocess.Popen(self.cmd(argv), **kw)

    def mac(self, dev: str) -> str:
        out = self.run(["cat", "/sys/class/net/%s/address" % dev]).stdout.strip()
        return out

    def ifindex(self, dev: str) -> int:
        return int(self.run(["cat", "/sys/class/net/%s/ifindex" % dev]).stdout.strip())

    def __repr__(self) -> str:
        return "<Host %s %s>" % (self.name, sorted(self.devs))


class Network(Closable):
    """Namespaces and veth pairs, all removed by :meth:`close` (also after a failure half-way)."""

    def __init__(self):
        prune()
        self.tag = "%s%d" % (PREFIX, os.getpid())
        self.hosts: list[Host] = []
        self._n = 0

    def host(self, short: str, ipv6: bool = False) -> Host:
        """A namespace (``hx<pid>-short``) with ``lo`` up, no reverse-path filter and, unless ``ipv6``,
        IPv6 off (no router solicitations or neighbour discovery to blur packet counts)."""
        name = "%s-%s" % (self.tag, short)
        _ip("netns", "del", name, check=False)
        _ip("netns", "add", name)
        h = Host(self, name)
        self.hosts.append(h)
        h.run(["ip", "link", "set", "lo", "up"])
        for key in ("all", "default"):
            h.run(["sysctl", "-qw", "net.ipv4.conf.%s.rp_filter=0" % key], check=False)
            if not ipv6:
                h.run(["sysctl", "-qw", "net.ipv6.conf.%s.disable_ipv6=1" % key], check=False)
        return h

    def link(self, a: Host, addr_a: str | None, b: Host, addr_b: str | None, *, csum_off: bool = True,
             names: tuple[str, str] | None = None, queues: int = 1) -> tuple[str, str]:
        """A veth pair between ``a`` and ``b`` with these addresses (CIDR, or None); its two names.

        ``csum_off`` turns TX checksum offload off on both ends (see :func:`tx_checksum_off`); ``queues``:
        receive and transmit queues of each end.
        """
        self._n += 1
        na, nb = names or ("v%da" % self._n, "v%db" % self._n)
        tmp_a, tmp_b = "%s%da" % (self.tag, self._n), "%s%db" % (self.tag, self._n)
        nq = ("numtxqueues", str(queues), "numrxqueues", str(queues))
        _ip("link", "add", tmp_a[:15], *nq, "type", "veth", "peer", "name", tmp_b[:15], *nq)
        _ip("link", "set", tmp_a[:15], "netns", a.name, "name", na)
        _ip("link", "set", tmp_b[:15], "netns", b.name, "name", nb)
        for h, dev, addr in ((a, na, addr_a), (b, nb, addr_b)):
            if addr:
                h.run(["ip", "addr", "add", addr, "dev", dev])
            h.run(["ip", "link", "set", dev, "up"])
            if csum_off:
                h.run([sys.executable, "-c", _CSUM_OFF % dev])
            h.devs[dev] = {"mac": h.mac(dev), "ip": addr.split("/")[0] if addr else None, "ifindex": h.ifindex(dev)}
        return na, nb

    def close(self) -> None:
        hosts, self.hosts = self.hosts, []
        for h in hosts:
            _ip("netns", "del", h.name, check=False)


_CSUM_OFF = """
import ctypes, fcntl, socket, struct
ev = ctypes.create_string_buffer(struct.pack("II", %d, 0), 8)
s = socket.socket()
fcntl.ioctl(s.fileno(), %d, struct.pack("16sP", %%r.encode(), ctypes.addressof(ev)) + bytes(16))
""" % (ETHTOOL_STXCSUM, SIOCETHTOOL)
