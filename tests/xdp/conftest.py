"""Fixtures of the userspace XDP tests: compiled programs, private networks, the attach command."""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
PROGS = HERE / "progs"
TRAFFIC = HERE / "traffic.py"


def pytest_collection_modifyitems(config, items):
    """Every test here needs root (namespaces, AF_XDP, kernel programs to compare with)."""
    for item in items:
        if "tests/xdp/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.root)
            item.add_marker(pytest.mark.kernel)
            if os.geteuid() != 0:
                item.add_marker(pytest.mark.skip(reason="needs root (network namespaces, AF_XDP, XDP programs)"))


def _need_root():
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces, AF_XDP, XDP programs)")
    if not shutil.which("ip"):
        pytest.skip("needs iproute2's ip")


@pytest.fixture(scope="session")
def xdp_progs(tmp_path_factory) -> dict[str, Path]:
    """Every tests/xdp/progs/*.bpf.c compiled with clang -O2 -g -target bpf."""
    clang = shutil.which("clang")
    if not clang:
        pytest.skip("clang not found")
    out = tmp_path_factory.mktemp("xdp-progs")
    machine = subprocess.run(["gcc", "-dumpmachine"], capture_output=True, text=True).stdout.strip() or \
        "x86_64-linux-gnu"
    built = {}
    for src in sorted(PROGS.glob("*.bpf.c")):
        obj = out / (src.name[:-2] + ".o")
        subprocess.run([clang, "-O2", "-g", "-target", "bpf", "-I/usr/include/" + machine, "-c", str(src),
                        "-o", str(obj)], check=True)
        built[src.name[: -len(".bpf.c")]] = obj
    return built


@pytest.fixture
def net():
    """A fresh :class:`hybrid.xdp.net.Network`, deleted after the test whatever happens."""
    _need_root()
    from hybrid.xdp.net import Network

    n = Network()
    try:
        yield n
    finally:
        n.close()


class Attached:
    """``hybrid xdp attach`` running in a namespace; :meth:`finish` stops it and returns its JSON report."""

    def __init__(self, host, obj, devs, *extra):
        argv = [sys.executable, "-m", "hybrid.cli", "xdp", "attach", str(obj), "--json"]
        for d in devs:
            argv += ["--dev", d]
        argv += [str(x) for x in extra]
        self.host = host
        self.proc = host.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(ROOT))
        self.banner = self._wait_banner()

    def _wait_banner(self, timeout: float = 30.0) -> str:
        end = time.monotonic() + timeout
        line = ""
        while time.monotonic() < end:
            r, _, _ = select.select([self.proc.stderr], [], [], 0.2)
            if r:
                line = self.proc.stderr.readline()
                if "attached" in line:
                    return line
                if not line:
                    break
            if self.proc.poll() is not None:
                break
        out, err = self.proc.communicate(timeout=10)
        raise AssertionError("hybrid xdp attach did not start: %s%s%s" % (line, err, out))

    def finish(self, timeout: float = 20.0) -> dict:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        out, err = self.proc.communicate(timeout=timeout)
        assert self.proc.returncode == 0, err
        return json.loads(out.strip().splitlines()[-1])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


@pytest.fixture
def attach():
    """``attach(host, obj, devs, *args)`` starts ``hybrid xdp attach``; every one is killed after the test."""
    started = []

    def start(host, obj, devs, *extra):
        a = Attached(host, obj, devs, *extra)
        started.append(a)
        return a

    yield start
    for a in started:
        a.kill()


def traffic(host, *args, timeout: float = 30.0):
    """Run traffic.py in ``host`` and return its JSON output."""
    r = host.run([sys.executable, str(TRAFFIC), *map(str, args)], timeout=timeout)
    return json.loads(r.stdout.strip().splitlines()[-1])


class Sink:
    """traffic.py udp-recv / raw-recv running in a host, ready when constructed."""

    def __init__(self, host, *args):
        self.proc = host.popen([sys.executable, str(TRAFFIC), *map(str, args)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        assert line.strip() == "ready", (line, self.proc.stderr.read())

    def result(self, timeout: float = 30.0):
        out, err = self.proc.communicate(timeout=timeout)
        assert self.proc.returncode == 0, err
        return json.loads(out.strip().splitlines()[-1])


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def udp_frame(src_mac: str, dst_mac: str, src_ip: str, dst_ip: str, sport: int, dport: int, payload: bytes) -> bytes:
    """An Ethernet/IPv4/UDP frame with correct checksums."""
    import socket

    sip, dip = socket.inet_aton(src_ip), socket.inet_aton(dst_ip)
    ulen = 8 + len(payload)
    pseudo = sip + dip + struct.pack("!BBH", 0, 17, ulen)
    udp = struct.pack("!HHHH", sport, dport, ulen, 0) + payload
    ucs = checksum(pseudo + udp) or 0xFFFF
    udp = struct.pack("!HHHH", sport, dport, ulen, ucs) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + ulen, 1, 0, 64, 17, 0, sip, dip)
    ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
    return mac_bytes(dst_mac) + mac_bytes(src_mac) + b"\x08\x00" + ip + udp
