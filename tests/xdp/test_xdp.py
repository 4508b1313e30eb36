"""Userspace XDP (hybrid/xdp, hybrid/native/xdp.c): real packets between network namespaces, real verdicts.

Every network test builds its own namespaces and veth pairs (hybrid.xdp.net.Network, deleted after the
test), runs ``hybrid xdp attach`` in one of them and sends packets from another with traffic.py.
"""

from __future__ import annotations

import ctypes
import socket
import struct
import subprocess
import sys

import pytest

from tests.xdp.conftest import ROOT, Sink, traffic, udp_frame

def _lib():
    from hybrid import native

    mod = native._native()
    return mod.ffi, mod.lib


def _no_xdp_left(host, dev):
    out = host.run(["ip", "link", "show", "dev", dev]).stdout
    assert " xdp" not in out and "prog/xdp" not in out, out


# --- the context rewrite and the helpers, without a network --------------------------------------------------


def test_ctx_rewrite_makes_real_pointers(xdp_progs):
    """data/data_end loads become 64-bit loads of the real pointers: right with a packet above 4 GiB too."""
    from hybrid.user.jit import LlvmJit
    from hybrid.xdp import load_program

    obj, pspec, program, rewritten = load_program(str(xdp_progs["xdp_count"]))
    try:
        assert rewritten == 2  # ctx->data and ctx->data_end
        ffi, lib = _lib()
        eng = LlvmJit(program)
        pkt = ctypes.create_string_buffer(b"\xaa" * 98)  # Python's heap: far above 4 GiB on x86-64
        md = ffi.new("struct hybrid_xdp_md *")
        addr = ctypes.addressof(pkt)
        md.data_p = md.data_meta_p = addr
        md.data_end_p = addr + 98
        md.data, md.data_end, md.data_meta = addr & 0xFFFFFFFF, (addr + 98) & 0xFFFFFFFF, addr & 0xFFFFFFFF
        for _ in range(3):
            assert eng.run_ptr(int(ffi.cast("uintptr_t", md)), 24) == 2  # XDP_PASS
        counts = obj.maps["counts"]
        assert int.from_bytes(counts.lookup(struct.pack("<I", 0)), "little") == 3
        assert int.from_bytes(counts.lookup(struct.pack("<I", 1)), "little") == 3 * 98
        eng.close()
    finally:
        obj.close()


def test_ctx_rewrite_follows_copies_spills_and_calls():
    """The analysis: copies of r1, an 8-byte spill and its fill, a bpf-to-bpf call's r1; not a clobbered r1."""
    from hybrid.user import isa
    from hybrid.xdp.ctx import rewrite

    insns = [
        isa.Insn(0xBF, 6, 1),             # mov r6, r1
        isa.Insn(0x7B, 10, 6, -8),        # stxdw [r10-8], r6
        isa.Insn(0x61, 2, 6, 0),          # ldxw r2, [r6+0]       -> rewritten
        isa.Insn(0x79, 7, 10, -8),        # ldxdw r7, [r10-8]
        isa.Insn(0x61, 3, 7, 4),          # ldxw r3, [r7+4]       -> rewritten (filled from the stack)
        isa.Insn(0xBF, 1, 6),             # mov r1, r6
        isa.Insn(0x85, 0, 1, 0, 3),       # call local +3 (slot 10)
        isa.Insn(0x61, 4, 1, 8),          # ldxw r4, [r1+8]       -> kept: r1 clobbered by the call
        isa.Insn(0x61, 5, 6, 16),         # ldxw r5, [r6+16]      -> kept: rx_queue_index is a real u32
        isa.Insn(0x95),                   # exit
        isa.Insn(0x61, 0, 1, 8),          # (slot 10) ldxw r0, [r1+8] -> rewritten (the callee's r1 is ctx)
        isa.Insn(0x95),
    ]
    out, n = rewrite(tuple(insns))
    assert n == 3
    assert [(i.opcode, i.off) for i in (out[2], out[4], out[10])] == [(0x79, 24), (0x79, 32), (0x79, 40)]
    assert (out[7].opcode, out[7].off) == (0x61, 8) and (out[8].opcode, out[8].off) == (0x61, 16)


def test_csum_diff_matches_the_internet_checksum():
    ffi, lib = _lib()
    old, new = socket.inet_aton("10.0.0.100"), socket.inet_aton("10.1.2.3")
    hdr = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 60, 7, 0, 64, 17, 0, socket.inet_aton("10.0.0.1"), old))

    def csum(b):
        s = sum(struct.unpack("!10H", bytes(b)))
        while s >> 16:
            s = (s & 0xFFFF) + (s >> 16)
        return ~s & 0xFFFF

    struct.pack_into("!H", hdr, 10, csum(hdr))
    check = struct.unpack_from("<H", hdr, 10)[0]  # as a program loads it
    a, b = ffi.new("char[]", old), ffi.new("char[]", new)
    d = lib.hybrid_helper_xdp_csum_diff(int(ffi.cast("uintptr_t", a)), 4, int(ffi.cast("uintptr_t", b)), 4,
                                        ~check & 0xFFFF)
    while d >> 16:
        d = (d & 0xFFFF) + (d >> 16)
    hdr[16:20] = new
    struct.pack_into("<H", hdr, 10, ~d & 0xFFFF)
    assert csum(hdr) == 0  # a valid header
    assert lib.hybrid_helper_xdp_csum_diff(0, 3, 0, 0, 0) == (-22) & (2**64 - 1)  # -EINVAL: not words


def test_adjust_helpers_keep_the_kernels_bounds():
    ffi, lib = _lib()
    frame = ffi.new("char[]", 4096)
    base = int(ffi.cast("uintptr_t", frame))
    md = ffi.new("struct hybrid_xdp_md *")
    md.hard_start, md.hard_end = base, base + 4096
    md.data_p = md.data_meta_p = base + 256
    md.data_end_p = base + 256 + 60
    p = int(ffi.cast("uintptr_t", md))
    neg = lambda v: v & (2**64 - 1)  # noqa: E731
    assert lib.hybrid_helper_xdp_adjust_head(p, neg(-217), 0, 0, 0) == neg(-22)    # into the kernel's xdp_frame
    assert lib.hybrid_helper_xdp_adjust_head(p, neg(-216), 0, 0, 0) == 0 and md.data_p == base + 40
    assert lib.hybrid_helper_xdp_adjust_head(p, neg(-1), 0, 0, 0) == neg(-22)      # no headroom left
    assert lib.hybrid_helper_xdp_adjust_head(p, 216, 0, 0, 0) == 0
    assert lib.hybrid_helper_xdp_adjust_head(p, 60 - 13, 0, 0, 0) == neg(-22)      # less than an Ethernet header
    assert lib.hybrid_helper_xdp_adjust_tail(p, neg(-47), 0, 0, 0) == neg(-22)
    assert lib.hybrid_helper_xdp_adjust_tail(p, neg(-46), 0, 0, 0) == 0 and md.data_end_p == base + 256 + 14
    assert lib.hybrid_helper_xdp_adjust_tail(p, 4096, 0, 0, 0) == neg(-22)         # past the frame
    assert lib.hybrid_helper_xdp_adjust_meta(p, neg(-8), 0, 0, 0) == 0 and md.data_p - md.data_meta_p == 8
    assert lib.hybrid_helper_xdp_adjust_meta(p, neg(-2), 0, 0, 0) == neg(-13)      # -EACCES: not a multiple of 4
    assert lib.hybrid_helper_xdp_adjust_meta(p, neg(-28), 0, 0, 0) == neg(-13)     # more than 32 bytes
    assert lib.hybrid_helper_xdp_get_buff_len(p, 0, 0, 0, 0) == 14


# --- bad input ----------------------------------------------------------------------------------------------


def _cli(*args, host=None):
    argv = [sys.executable, "-m", "hybrid.cli", *map(str, args)]
    if host is not None:
        return host.run(argv, check=False, cwd=str(ROOT))
    return subprocess.run(argv, capture_output=True, text=True, cwd=str(ROOT))


def test_missing_interface_is_a_clear_error(xdp_progs):
    r = _cli("xdp", "attach", xdp_progs["xdp_count"], "--dev", "hx-no-such0")
    assert r.returncode == 2
    assert "no network interface 'hx-no-such0'" in r.stderr and "Traceback" not in r.stderr


def test_program_that_is_not_xdp_is_refused(net, xdp_progs):
    a, b = net.host("a"), net.host("b")
    _, vb = net.link(a, "10.203.0.1/24", b, "10.203.0.2/24")
    r = _cli("xdp", "attach", xdp_progs["not_xdp"], "--dev", vb, host=b)
    assert r.returncode == 2 and "has no XDP program" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = _cli("xdp", "attach", xdp_progs["not_xdp"], "--dev", vb, "--prog", "probe", host=b)
    assert r.returncode == 2 and "is not an XDP program" in r.stderr, r.stderr
    _no_xdp_left(b, vb)


def test_missing_queue_is_a_clear_error(net, xdp_progs):
    a, b = net.host("a"), net.host("b")
    _, vb = net.link(a, "10.208.0.1/24", b, "10.208.0.2/24")
    r = _cli("xdp", "attach", xdp_progs["xdp_count"], "--dev", vb, "--queue", 7, host=b)
    assert r.returncode == 2 and "has %s a receive queue 7?" % vb in r.stderr, r.stderr
    _no_xdp_left(b, vb)


def test_busy_interface_and_kill_leave_nothing_attached(net, xdp_progs, attach):
    a, b = net.host("a"), net.host("b")
    _, vb = net.link(a, "10.204.0.1/24", b, "10.204.0.2/24")
    first = attach(b, xdp_progs["xdp_count"], [vb])
    r = _cli("xdp", "attach", xdp_progs["xdp_count"], "--dev", vb, host=b)
    assert r.returncode == 2 and "already has an AF_XDP socket" in r.stderr, r.stderr
    first.proc.kill()  # SIGKILL: the BPF link goes with the process
    first.proc.communicate()
    _no_xdp_left(b, vb)


# --- verdicts on real packets ---------------------------------------------------------------------------------


def test_counter_passes_packets_to_the_kernel_stack(net, xdp_progs, attach):
    """XDP_PASS: every datagram is counted in userspace and still reaches a UDP socket of the host."""
    a, b = net.host("a"), net.host("b")
    _, vb = net.link(a, "10.205.0.1/24", b, "10.205.0.2/24")
    x = attach(b, xdp_progs["xdp_count"], [vb])
    assert "native mode" in x.banner
    sink = Sink(b, "udp-recv", 7777)
    traffic(a, "udp-send", "10.205.0.2", 7777, 50, "--payload", "hello")
    got = sink.result()
    report = x.finish()
    assert got == {"7777": {"hello": 50}}
    st = report["stats"]
    assert st["pass"] >= 50 and st["pass_failed"] == 0 and st["rx"] == report["maps"]["counts"]["0"]
    assert report["maps"]["counts"]["0"] >= 50  # and the ARP exchange, passed too
    assert report["maps"]["counts"]["1"] >= 50 * (14 + 20 + 8 + 5)
    _no_xdp_left(b, vb)


def test_every_queue_has_a_socket(net, xdp_progs, attach):
    """Two receive queues: with a socket on each every flow is counted; on queue 0 only, queue 1's packets
    go to the kernel's stack without the program (the redirect program's XDP_PASS fallback)."""
    a, b = net.host("a"), net.host("b")
    va, vb = net.link(a, "10.209.0.1/24", b, "10.209.0.2/24", queues=2)
    a.run(["ip", "neigh", "add", "10.209.0.2", "lladdr", b.devs[vb]["mac"], "dev", va])  # no ARP queueing
    sports = ",".join(str(p) for p in range(41000, 41032))
    seen = {}
    for queues in (("--queue", 0, "--queue", 1), ("--queue", 0)):
        x = attach(b, xdp_progs["xdp_count"], [vb], *queues)
        sink = Sink(b, "udp-recv", 7777)
        traffic(a, "udp-send", "10.209.0.2", 7777, 2, "--sports", sports, "--payload", "q")
        got = sink.result()
        report = x.finish()
        assert got == {"7777": {"q": 64}}, report  # every datagram reaches the socket either way
        assert len(report["ports"]) == len(queues) // 2
        seen[len(queues) // 2] = report["maps"]["counts"]["0"]
        _no_xdp_left(b, vb)
    assert seen[2] >= 64  # both queues: every datagram ran the program
    assert seen[1] < 64  # queue 0 only: the flows hashed to queue 1 did not


@pytest.mark.parametrize("engine", ["jit", "aot"])
def test_drop_filter_by_port(net, xdp_progs, attach, engine):
    """XDP_DROP for a blocked UDP port, XDP_PASS for the others (the program JIT'd, or AOT-built)."""
    a, b = net.host("a"), net.host("b")
    _, vb = net.link(a, "10.206.0.1/24", b, "10.206.0.2/24")
    x = attach(b, xdp_progs["xdp_filter"], [vb], "--update", "blocked", struct.pack("<H", 9999).hex(),
               bytes(8).hex(), "--engine", engine)
    sink = Sink(b, "udp-recv", 7777, 9999)
    traffic(a, "udp-send", "10.206.0.2", 9999, 40, "--payload", "blocked")
    traffic(a, "udp-send", "10.206.0.2", 7777, 30, "--payload", "open")
    got = sink.result()
    report = x.finish()
    assert got == {"7777": {"open": 30}, "9999": {}}
    assert report["maps"]["blocked"] == {"9999": 40}
    assert sum(report["maps"]["verdicts"]["1"]) == 40 and report["stats"]["drop"] == 40
    assert sum(report["maps"]["verdicts"]["0"]) >= 30


def test_reflector_sends_packets_back_with_xdp_tx(net, xdp_progs, attach):
    """XDP_TX: the MAC-swapping reflector's packets come back to the sender, bytes otherwise unchanged."""
    a, b = net.host("a"), net.host("b")
    va, vb = net.link(a, "10.207.0.1/24", b, "10.207.0.2/24")
    mac_a, mac_b = a.devs[va]["mac"], b.devs[vb]["mac"]
    x = attach(b, xdp_progs["xdp_reflect"], [vb])
    frame = udp_frame(mac_a, mac_b, "10.207.0.1", "10.207.0.2", 5000, 6000, b"reflect me please")
    sink = Sink(a, "raw-recv", va)
    traffic(a, "raw-send", va, frame.hex(), 25)
    frames = [bytes.fromhex(f) for f in sink.result()]
    report = x.finish()
    back = [f for f in frames if f[6:12] == frame[:6] and f[:6] == frame[6:12]]
    assert len(back) == 25, frames[:3]
    assert all(f == frame[6:12] + frame[:6] + frame[12:] for f in back)
    assert report["maps"]["reflected"] == {"0": 25} and report["stats"]["tx"] == 25


# --- the load balancer: rewrite, checksums, XDP_REDIRECT through a devmap ------------------------------------

RING = 61


def _flow_hash(saddr: bytes, daddr: bytes, sport: int, dport: int) -> int:
    """xdp_lb.bpf.c's flow_hash on the raw (network-order) fields loaded little-endian."""
    m = 0xFFFFFFFF
    s, d = int.from_bytes(saddr, "little"), int.from_bytes(daddr, "little")
    sp, dp = int.from_bytes(sport.to_bytes(2, "big"), "little"), int.from_bytes(dport.to_bytes(2, "big"), "little")
    h = (s * 0x9E3779B1) & m
    h ^= (d + 0x7F4A7C15 + (h << 6) + (h >> 2)) & m
    h ^= (((sp << 16) | dp) + 0x7F4A7C15 + (h << 6) + (h >> 2)) & m
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & m
    h ^= h >> 13
    return h


def maglev(names: list[str], size: int = RING) -> list[int]:
    """Maglev's consistent-hash table: slot -> backend index."""
    import hashlib

    perms = []
    for n in names:
        d = hashlib.sha256(n.encode()).digest()
        off, skip = int.from_bytes(d[:8], "little") % size, int.from_bytes(d[8:16], "little") % (size - 1) + 1
        perms.append([(off + j * skip) % size for j in range(size)])
    table, nxt, filled = [-1] * size, [0] * len(names), 0
    while filled < size:
        for i in range(len(names)):
            while table[perms[i][nxt[i]]] >= 0:
                nxt[i] += 1
            table[perms[i][nxt[i]]] = i
            nxt[i] += 1
            filled += 1
            if filled == size:
                break
    return table


def test_load_balancer_rewrites_and_redirects(net, xdp_progs, attach):
    cli, lb, be1, be2 = net.host("cli"), net.host("lb"), net.host("be1"), net.host("be2")
    c0, l0 = net.link(cli, "10.210.0.1/24", lb, "10.210.0.2/24")
    l1, b1 = net.link(lb, "10.210.1.1/24", be1, "10.210.1.11/24")
    l2, b2 = net.link(lb, "10.210.2.1/24", be2, "10.210.2.12/24")
    vip, port = "10.210.0.100", 8080
    # the client reaches the VIP through the load balancer's interface
    cli.run(["ip", "neigh", "add", vip, "lladdr", lb.devs[l0]["mac"], "dev", c0])
    backends = [(be1, b1, l1), (be2, b2, l2)]
    table = maglev(["be1", "be2"])
    args = ["--devmap", "tx_ports", "--value", "vip_ip=%d" % int.from_bytes(socket.inet_aton(vip), "little"),
            "--value", "vip_port=%d" % port]
    for i, (h, dev, ldev) in enumerate(backends):
        value = socket.inet_aton(h.devs[dev]["ip"]) + bytes.fromhex(h.devs[dev]["mac"].replace(":", "")) + \
            bytes.fromhex(lb.devs[ldev]["mac"].replace(":", "")) + struct.pack("<II", i + 1, 0)
        args += ["--update", "backends", struct.pack("<I", i).hex(), value.hex()]
    for slot, bi in enumerate(table):
        args += ["--update", "ring", struct.pack("<I", slot).hex(), struct.pack("<I", bi).hex()]
    x = attach(lb, xdp_progs["xdp_lb"], [l0, l1, l2], *args)
    sinks = [Sink(h, "udp-recv", port) for h, _, _ in backends]
    sports = list(range(40000, 40024))
    traffic(cli, "udp-send", vip, port, 5, "--sports", ",".join(map(str, sports)), "--gap", "0.001")
    got = [s.result() for s in sinks]
    report = x.finish()
    expected = [{}, {}]
    for sp in sports:
        bi = table[_flow_hash(socket.inet_aton("10.210.0.1"), socket.inet_aton(vip), sp, port) % RING]
        expected[bi]["flow %d" % sp] = 5
    assert expected[0] and expected[1], "the test's flows should reach both backends"
    assert [g[str(port)] for g in got] == expected  # every flow on its backend, checksums accepted
    assert report["maps"]["forwarded"]["0"] == 5 * len(expected[0])
    assert report["maps"]["forwarded"]["1"] == 5 * len(expected[1])
    assert report["stats"]["redirect"] == 5 * len(sports) and report["stats"]["redirect_failed"] == 0


def test_router_answers_fib_lookup_from_the_kernel(net, xdp_progs, attach):
    """bpf_fib_lookup (the kernel's FIB and neighbours) and bpf_redirect to the egress interface."""
    a, r, b = net.host("a"), net.host("r"), net.host("b")
    va, ra = net.link(a, "10.220.1.2/24", r, "10.220.1.1/24")
    rb, vb = net.link(r, "10.220.2.1/24", b, "10.220.2.2/24")
    a.run(["ip", "route", "add", "10.220.2.0/24", "via", "10.220.1.1"])
    b.run(["ip", "route", "add", "10.220.1.0/24", "via", "10.220.2.1"])
    r.run(["sysctl", "-qw", "net.ipv4.ip_forward=1"])
    x = attach(r, xdp_progs["xdp_fwd"], [ra, rb])
    sink = Sink(b, "udp-recv", 9000)
    traffic(a, "udp-send", "10.220.2.2", 9000, 40, "--payload", "routed", "--gap", "0.005")
    got = sink.result()
    report = x.finish()
    assert got == {"9000": {"routed": 40}}  # forwarded by the program or, before ARP resolved, by the kernel
    results = report["maps"]["results"]
    assert results["0"] > 0 and results["15"] == results["0"]  # BPF_FIB_LKUP_RET_SUCCESS, then redirected
    assert report["stats"]["redirect"] == results["15"] and report["stats"]["redirect_failed"] == 0
    assert results["0"] + results["7"] >= 40  # success or no neighbour yet (then passed to the kernel)


def _user_run(eng, ffi, frame: bytes) -> tuple[int, bytes]:
    """Run a JIT'd XDP program on ``frame`` (256 bytes of headroom, a 4 KiB frame): (verdict, metadata and
    packet after, as the kernel's test run gives them)."""
    buf = ffi.new("char[]", 4096)
    base = int(ffi.cast("uintptr_t", buf))
    ffi.memmove(buf + 256, frame, len(frame))
    md = ffi.new("struct hybrid_xdp_md *")
    md.hard_start, md.hard_end = base, base + 4096
    md.data_p = md.data_meta_p = base + 256
    md.data_end_p = base + 256 + len(frame)
    md.data, md.data_end, md.data_meta = md.data_p & 0xFFFFFFFF, md.data_end_p & 0xFFFFFFFF, md.data_p & 0xFFFFFFFF
    md.ingress_ifindex = 1
    verdict = eng.run_ptr(int(ffi.cast("uintptr_t", md)), 24) & 0xFFFFFFFF
    return verdict, bytes(ffi.buffer(buf + (md.data_meta_p - base), md.data_end_p - md.data_meta_p))


@pytest.mark.parametrize("name,prog", [("xdp_filter", "filter"), ("xdp_reflect", "reflect"), ("xdp_count", "count")])
def test_same_verdicts_and_bytes_as_the_kernel(xdp_progs, name, prog):
    """Each frame through the kernel (BPF_PROG_TEST_RUN) and through the VM: same verdict, same packet out."""
    from hybrid.kernel.object import KernelObject
    from hybrid.user.jit import LlvmJit
    from hybrid.xdp import load_program

    ffi, lib = _lib()
    m1, m2 = "02:00:00:00:00:01", "02:00:00:00:00:02"
    frames = [
        udp_frame(m1, m2, "10.0.0.1", "10.0.0.2", 1234, 9999, b"blocked port"),
        udp_frame(m1, m2, "10.0.0.1", "10.0.0.2", 1234, 7777, b"open port" * 20),
        udp_frame(m1, m2, "10.0.0.1", "10.0.0.2", 1234, 7777, b"")[:34],  # IPv4 header, no UDP header
        bytes.fromhex("ffffffffffff020000000001" "0806") + bytes(28),  # an ARP-sized frame
        bytes.fromhex("0200000000020200000000010800") + b"\x45",  # 15 bytes: a truncated IPv4 header
    ]
    with KernelObject(str(xdp_progs[name]), programs=[prog]) as k:
        obj, _, program, _ = load_program(str(xdp_progs[name]), prog=prog)
        try:
            if prog == "filter":
                for m in (k.maps["blocked"], obj.maps["blocked"]):
                    m.update(struct.pack("<H", 9999), bytes(8))
            eng = LlvmJit(program)
            for f in frames:
                out = ctypes.create_string_buffer(len(f) + 256)
                ret, dur = ffi.new("uint32_t *"), ffi.new("uint32_t *")
                attr_out = ffi.cast("void *", ctypes.addressof(out))
                assert lib.hybrid_xdp_test_run(k.programs[prog].fd, f, len(f), 1, 0, 0, 0, attr_out, ret, dur) == 0
                verdict, data = _user_run(eng, ffi, f)
                assert verdict == ret[0], (prog, f.hex())
                assert data == out.raw[:len(data)], (prog, f.hex())
            eng.close()
            if prog == "filter":
                assert k.maps["blocked"].lookup(struct.pack("<H", 9999)) == obj.maps["blocked"].lookup(
                    struct.pack("<H", 9999)) == struct.pack("<Q", 1)
        finally:
            obj.close()


def test_load_balancer_rewrites_the_same_bytes_as_the_kernel(xdp_progs):
    """The load balancer's rewrite (bpf_csum_diff on the IPv4 and UDP checksums, addresses, redirect through a
    devmap) on many flows: the kernel and the VM give the same verdicts and the same bytes."""
    from hybrid.kernel.object import KernelObject
    from hybrid.user.jit import LlvmJit
    from hybrid.xdp import load_program

    ffi, lib = _lib()
    vip, port = "10.9.0.100", 8080
    vip_ip = int.from_bytes(socket.inet_aton(vip), "little")
    rodata = struct.pack("<IH", vip_ip, port)
    table = maglev(["a", "b"])
    backend = [socket.inet_aton("10.9.%d.7" % i) + bytes([2, 0, 0, 0, i, 1]) + bytes([2, 0, 0, 0, i, 2])
               + struct.pack("<II", 1, 0) for i in (1, 2)]
    with KernelObject(str(xdp_progs["xdp_lb"]), initial={".rodata": rodata}) as k:
        obj, _, program, _ = load_program(str(xdp_progs["xdp_lb"]), values={"vip_ip": vip_ip, "vip_port": port})
        try:
            for maps in (k.maps, obj.maps):
                for i, b in enumerate(backend):
                    maps["backends"].update(struct.pack("<I", i), b)
                for slot, bi in enumerate(table):
                    maps["ring"].update(struct.pack("<I", slot), struct.pack("<I", bi))
                maps["tx_ports"].update(struct.pack("<I", 1), struct.pack("<I", 1))  # lo
            eng = LlvmJit(program)
            m1, m2 = "02:00:00:00:00:01", "02:00:00:00:00:02"
            frames = [udp_frame(m1, m2, "10.9.0.%d" % (1 + n % 200), vip, 1000 + 7 * n, port, b"x" * (n % 13))
                      for n in range(60)]
            frames.append(udp_frame(m1, m2, "10.9.0.1", "10.9.0.2", 1000, port, b"not the vip"))
            nocsum = bytearray(frames[0])
            nocsum[40:42] = b"\0\0"  # UDP without a checksum: left without one
            frames.append(bytes(nocsum))
            verdicts = set()
            for f in frames:
                out = ctypes.create_string_buffer(len(f) + 256)
                ret, dur = ffi.new("uint32_t *"), ffi.new("uint32_t *")
                assert lib.hybrid_xdp_test_run(k.programs["balance"].fd, f, len(f), 1, 0, 0, 0,
                                               ffi.cast("void *", ctypes.addressof(out)), ret, dur) == 0
                verdict, data = _user_run(eng, ffi, f)
                assert (verdict, data) == (ret[0], out.raw[:len(data)]), f.hex()
                verdicts.add(verdict)
            assert verdicts == {2, 4}  # XDP_PASS for the frame not to the VIP, XDP_REDIRECT for the others
            eng.close()
            assert k.maps["forwarded"].lookup(struct.pack("<I", 0)) == obj.maps["forwarded"].lookup(
                struct.pack("<I", 0))
        finally:
            obj.close()


def test_cli_stops_after_count_and_prints_maps(net, xdp_progs):
    """``--count N``: detaches by itself after N packets; the plain report has the counters and the maps."""
    a, b = net.host("a"), net.host("b")
    va, vb = net.link(a, "10.211.0.1/24", b, "10.211.0.2/24")
    a.run(["ip", "neigh", "add", "10.211.0.2", "lladdr", b.devs[vb]["mac"], "dev", va])
    b.run(["ip", "neigh", "add", "10.211.0.1", "lladdr", a.devs[va]["mac"], "dev", vb])  # b's ICMP: no ARP
    proc = b.popen([sys.executable, "-m", "hybrid.cli", "xdp", "attach", str(xdp_progs["xdp_count"]), "--dev", vb,
                    "--count", "5", "-d", "30"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(ROOT))
    try:
        assert "attached" in proc.stderr.readline()
        traffic(a, "udp-send", "10.211.0.2", 7777, 5)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("rx 5  pass 5  drop 0  tx 0"), out
    assert "@counts[0]: 5" in lines and "program: " in out
    _no_xdp_left(b, vb)
