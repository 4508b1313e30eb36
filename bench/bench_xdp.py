"""Userspace XDP against kernel XDP: packets per second and the program's cost per packet.

Two network namespaces joined by a veth pair (hybrid.xdp.net): a generator
sends 64-byte UDP frames as fast as it can (AF_PACKET, sendmmsg batches of
64, ``hybrid_xdp_gen_send``) and the receiver runs the same program of
``programs/xdp.bpf.c`` as

* kernel XDP, native (veth's driver mode) and generic (skb) mode, loaded by libbpf;
* userspace XDP: ``hybrid.xdp.XdpSession`` (AF_XDP copy mode on veth, the program JIT'd).

Rows, one value per burst of ``N`` frames:

* ``throughput``: the burst's duration divided by the packets the program ran
  on (ns per packet; 1e9 / that is the rate).  A side that cannot keep up
  loses packets, which shows as a longer time per processed packet; the
  note gives the rate and the share of the burst processed.  The generator
  itself costs about as much per packet as veth and kernel XDP together,
  so the kernel's rows are bounded by it.  The generator is pinned to CPU 1
  (veth's receive path, kernel XDP and the copy into the AF_XDP socket run
  there, in its softirq), the userspace loop to CPU 0;
* ``program run``: the program alone on one 64-byte frame, ``BPF_PROG_TEST_RUN``
  with ``repeat`` (the kernel's JIT, ns per run) against the JIT'd program
  called in a C loop on the same frame (``hybrid_xdp_bench_prog``);
* ``program in the loop``: rdtsc around the program runs of the userspace
  loop during the throughput runs (ns per packet), against the same
  program's kernel test run;
* ``round trip``: latency per packet: one frame at a time sent from the
  generator's namespace (AF_PACKET) to a reflector (MAC swap, ``XDP_TX``)
  and received back, kernel XDP (native) against userspace XDP; median of
  each value's pings.

    python bench/bench_xdp.py -o OUT.json [--quick] [--quiet]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
SOURCE = BENCH / "programs" / "xdp.bpf.c"
BUILD = BENCH / "build"
SUITE = "xdp"
PROGRAMS = ("drop", "filter")
PORT = 9999
FULL = {"packets": 2_000_000, "values": 5, "repeat": 2_000_000, "pings": 2000}
QUICK = {"packets": 200_000, "values": 2, "repeat": 200_000, "pings": 300}
SIDES = ("native", "generic", "user")
# The generator (and veth's receive softirq, which runs where it sends) on one CPU, the userspace loop on
# another, as AF_XDP applications are deployed (a core of their own); -1: wherever the scheduler puts them.
GEN_CPU, LOOP_CPU = (1, 0) if (os.cpu_count() or 1) > 1 else (-1, -1)
LABELS = {"native": "kernel XDP, native (veth driver mode)", "generic": "kernel XDP, generic (skb) mode",
          "user": "userspace XDP (AF_XDP copy mode, JIT)"}

sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCH))


def build() -> Path:
    from hybrid.user.toolchain import compile_bpf

    BUILD.mkdir(parents=True, exist_ok=True)
    return Path(compile_bpf(SOURCE, BUILD / "xdp.bpf.o"))


def frame(src_mac: str, dst_mac: str) -> bytes:
    """A 64-byte Ethernet/IPv4/UDP frame to PORT (checksums computed, payload zeros)."""
    import struct

    def csum(b: bytes) -> int:
        s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
        while s >> 16:
            s = (s & 0xFFFF) + (s >> 16)
        return ~s & 0xFFFF

    payload = bytes(64 - 14 - 20 - 8)
    sip, dip = socket.inet_aton("10.230.0.1"), socket.inet_aton("10.230.0.2")
    ulen = 8 + len(payload)
    udp = struct.pack("!HHHH", 40000, PORT, ulen, 0) + payload
    udp = udp[:6] + struct.pack("!H", csum(sip + dip + struct.pack("!BBH", 0, 17, ulen) + udp) or 0xFFFF) + udp[8:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + ulen, 1, 0, 64, 17, 0, sip, dip)
    ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
    return bytes.fromhex(dst_mac.replace(":", "")) + bytes.fromhex(src_mac.replace(":", "")) + b"\x08\x00" + ip + udp


GEN = """
import os, sys, time
sys.path.insert(0, %(root)r)
if %(cpu)d >= 0:
    os.sched_setaffinity(0, {%(cpu)d})
from hybrid import native
mod = native._native()
f = bytes.fromhex(%(frame)r)
t0 = time.perf_counter()
n = mod.lib.hybrid_xdp_gen_send(%(ifindex)d, f, len(f), %(count)d, 0)
print(n, time.perf_counter() - t0)
"""


def _setns(name: str) -> None:
    """Move this thread (and the threads it starts) into network namespace ``name``."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open("/run/netns/" + name, os.O_RDONLY)
    try:
        if libc.setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
            raise OSError(ctypes.get_errno(), "setns(%s)" % name)
    finally:
        os.close(fd)


class Bench:
    def __init__(self, sizes: dict, quiet: bool):
        from hybrid.xdp.net import Network

        self.sizes, self.quiet = sizes, quiet
        self.busy = False
        self.obj_path = build()
        self.net = Network()
        self.gen, self.rx = self.net.host("gen"), self.net.host("rx")
        self.g0, self.r0 = self.net.link(self.gen, "10.230.0.1/24", self.rx, "10.230.0.2/24")
        self.frame = frame(self.gen.devs[self.g0]["mac"], self.rx.devs[self.r0]["mac"])
        self.results: dict[str, list[float]] = {}
        self.meta: dict[str, dict] = {}
        self.missing: dict[str, str] = {}
        self._home = os.open("/proc/self/ns/net", os.O_RDONLY)
        _setns(self.rx.name)

    def close(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.setns(self._home, 0x40000000)
        os.close(self._home)
        self.net.close()

    def burst(self) -> tuple[int, float]:
        code = GEN % {"root": str(ROOT), "frame": self.frame.hex(), "ifindex": self.gen.devs[self.g0]["ifindex"],
                      "count": self.sizes["packets"], "cpu": GEN_CPU}
        out = self.gen.run([sys.executable, "-c", code], timeout=300).stdout.split()
        return int(out[0]), float(out[1])

    def record(self, name: str, values: list[float], **meta) -> None:
        self.results[name] = values
        self.meta[name] = meta
        if not self.quiet:
            print("%s: %.1f ns" % (name, statistics.median(values) * 1e9), flush=True)

    # --- the sides ---------------------------------------------------------------------------------

    def kernel_side(self, prog: str, mode: str) -> None:
        from hybrid import native
        from hybrid.kernel.object import KernelObject

        lib = native._native().lib
        name = "%s: throughput, %s" % (prog, mode)
        try:
            k = KernelObject(str(self.obj_path), programs=[prog])
        except Exception as e:  # noqa: BLE001 - the reason becomes the row's
            self.missing[name] = "kernel load failed: %s" % e
            return
        with k:
            if prog == "filter":
                k.maps["blocked"].update(PORT.to_bytes(2, "little"), bytes(8))
            flags = 4 if mode == "native" else 2  # XDP_FLAGS_DRV_MODE / XDP_FLAGS_SKB_MODE
            fd = lib.hybrid_xdp_link(k.programs[prog].fd, self.rx.devs[self.r0]["ifindex"], flags)
            if fd < 0:
                self.missing[name] = "attach in %s mode: %s" % (mode, os.strerror(-fd))
                return
            try:
                values, seen_all = [], []
                for _ in range(self.sizes["values"]):
                    before = int.from_bytes(k.maps["seen"].lookup(bytes(4)), "little")
                    sent, secs = self.burst()
                    time.sleep(0.2)
                    seen = int.from_bytes(k.maps["seen"].lookup(bytes(4)), "little") - before
                    values.append(secs / max(seen, 1))
                    seen_all.append(seen / max(sent, 1))
                self.record(name, values, processed=statistics.median(seen_all), sent=sent)
            finally:
                os.close(fd)

    def user_side(self, prog: str) -> None:
        from hybrid.xdp import XdpSession

        name = "%s: throughput, user" % prog
        try:
            s = XdpSession(str(self.obj_path), [self.r0], prog=prog)
        except Exception as e:  # noqa: BLE001
            self.missing[name] = "userspace XDP failed: %s" % e
            return
        with s:
            if prog == "filter":
                s.maps["blocked"].update(PORT.to_bytes(2, "little"), bytes(8))
            cpus = os.sched_getaffinity(0)
            if LOOP_CPU >= 0:
                os.sched_setaffinity(0, {LOOP_CPU})  # the loop thread inherits it
            try:
                s.start(busy=self.busy)
            finally:
                os.sched_setaffinity(0, cpus)
            values, seen_all, prog_ns, batch = [], [], [], []
            for _ in range(self.sizes["values"]):
                before = s.stats()
                sent, secs = self.burst()
                time.sleep(0.2)
                after = s.stats()
                seen = after["rx"] - before["rx"]
                values.append(secs / max(seen, 1))
                seen_all.append(seen / max(sent, 1))
                ticks = after["prog_ticks"] - before["prog_ticks"]
                if after["batches"] > before["batches"]:
                    batch.append(seen / (after["batches"] - before["batches"]))
                from hybrid import native

                hz = native._native().lib.hybrid_tsc_hz()
                if seen and hz:
                    prog_ns.append(ticks / hz / seen)
            s.stop()
            mode = "%s mode, %s" % (s.ports[0].mode, "zero-copy" if s.ports[0].zerocopy else "copy")
            self.record(name, values, processed=statistics.median(seen_all), sent=sent, mode=mode)
            if prog_ns:
                self.record("%s: program in the loop, user" % prog, prog_ns,
                            batch=statistics.median(batch) if batch else 0)

    def latency(self, side: str) -> None:
        """Round trips of one frame through the reflector (XDP_TX): kernel XDP (native) or userspace XDP."""
        from hybrid import native
        from hybrid.kernel.object import KernelObject
        from hybrid.xdp import XdpSession

        mod = native._native()
        name = "reflect: round trip, %s" % side
        n = self.sizes["pings"]
        rtts = mod.ffi.new("uint64_t[]", n)
        link = gen_link = -1
        subject = None
        try:
            # veth delivers XDP_TX frames to its peer through the peer's NAPI, which an XDP program there enables
            _setns(self.gen.name)
            try:
                pass_fd = mod.lib.hybrid_xdp_kernel_prog(1, -1, mod.ffi.NULL, 0)
                if pass_fd >= 0:
                    gen_link = mod.lib.hybrid_xdp_link(pass_fd, self.gen.devs[self.g0]["ifindex"], 4)
                    os.close(pass_fd)  # the link holds the program
            finally:
                _setns(self.rx.name)
            if side == "native":
                subject = KernelObject(str(self.obj_path), programs=["reflect"])
                link = mod.lib.hybrid_xdp_link(subject.programs["reflect"].fd, self.rx.devs[self.r0]["ifindex"], 4)
                if link < 0:
                    raise OSError(-link, "attach: " + os.strerror(-link))
            else:
                subject = XdpSession(str(self.obj_path), [self.r0], prog="reflect")
                subject.start()
            values, lost = [], 0
            for _ in range(self.sizes["values"]):
                _setns(self.gen.name)
                try:
                    got = mod.lib.hybrid_xdp_gen_pingpong(self.gen.devs[self.g0]["ifindex"], self.frame,
                                                          len(self.frame), n, 200, rtts)
                finally:
                    _setns(self.rx.name)
                if got < 0:
                    raise OSError(-got, os.strerror(-got))
                ok = sorted(rtts[i] for i in range(n) if rtts[i])
                lost += n - len(ok)
                if ok:
                    values.append(ok[len(ok) // 2] * 1e-9)
            if not values:
                self.missing[name] = "no frame came back (%d sent)" % (n * self.sizes["values"])
                return
            self.record(name, values, lost=lost, pings=n)
        except Exception as e:  # noqa: BLE001
            self.missing[name] = "%s: %s" % (LABELS[side], e)
        finally:
            if link >= 0:
                os.close(link)
            if gen_link >= 0:
                os.close(gen_link)
            if subject is not None:
                subject.close()

    def program_run(self, prog: str) -> None:
        """The program alone: kernel test run vs the JIT'd program in a C loop, same frame."""
        from hybrid import native
        from hybrid.kernel.object import KernelObject
        from hybrid.xdp import load_program
        from hybrid.user.jit import LlvmJit

        mod = native._native()
        repeat = self.sizes["repeat"]
        kname, uname = "%s: program run, kernel" % prog, "%s: program run, user" % prog
        f = self.frame
        try:
            with KernelObject(str(self.obj_path), programs=[prog]) as k:
                if prog == "filter":
                    k.maps["blocked"].update(PORT.to_bytes(2, "little"), bytes(8))
                vals = []
                for _ in range(self.sizes["values"]):
                    ret, dur = mod.ffi.new("uint32_t *"), mod.ffi.new("uint32_t *")
                    r = mod.lib.hybrid_xdp_test_run(k.programs[prog].fd, f, len(f), repeat, 0, 0, 0, mod.ffi.NULL,
                                                    ret, dur)
                    if r < 0:
                        raise OSError(-r, os.strerror(-r))
                    vals.append(dur[0] * 1e-9)
                self.record(kname, vals, retval=int(ret[0]))
        except Exception as e:  # noqa: BLE001
            self.missing[kname] = "kernel test run failed: %s" % e
        obj, _, program, _ = load_program(str(self.obj_path), prog=prog)
        try:
            if prog == "filter":
                obj.maps["blocked"].update(PORT.to_bytes(2, "little"), bytes(8))
            eng = LlvmJit(program)
            vals = []
            for _ in range(self.sizes["values"]):
                ret = mod.ffi.new("uint32_t *")
                vals.append(mod.lib.hybrid_xdp_bench_prog(eng.address, f, len(f), repeat, ret) * 1e-9)
            self.record(uname, vals, retval=int(ret[0]))
            eng.close()
        finally:
            obj.close()

    def run(self) -> None:
        for prog in PROGRAMS:
            self.program_run(prog)
            for mode in ("native", "generic"):
                self.kernel_side(prog, mode)
            self.user_side(prog)
        for side in ("native", "user"):
            self.latency(side)

    def write(self, output: str | None) -> None:
        import pyperf

        first = True
        for name, values in self.results.items():
            md = {"name": name, "unit": "second", "loops": 1, "hybrid_suite": SUITE,
                  "hybrid_meta": json.dumps(self.meta.get(name, {}))}
            if first:
                md["hybrid_missing"] = json.dumps(self.missing)
                first = False
            b = pyperf.Benchmark([pyperf.Run(values, metadata=md, collect_metadata=False)])
            if output:
                pyperf.add_runs(output, b)


def main(argv: list[str] | None = None) -> int:
    from harness import take_quick

    argv = list(sys.argv[1:] if argv is None else argv)
    quick = take_quick(argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-o", "--output", help="pyperf JSON file to write (must not exist)")
    ap.add_argument("-q", "--quiet", action="store_true")
    args, unknown = ap.parse_known_args(argv)
    if unknown:
        print("bench_xdp: ignoring %s (not a pyperf Runner)" % " ".join(unknown), file=sys.stderr)
    if args.output and os.path.exists(args.output):
        ap.error("%s exists (pyperf would add to it): remove it first" % args.output)
    if os.geteuid() != 0:
        print("bench_xdp: needs root (network namespaces, XDP, AF_XDP)", file=sys.stderr)
        return 2
    b = Bench(QUICK if quick else FULL, args.quiet)
    try:
        b.run()
    finally:
        b.close()
    if not b.results:
        print("bench_xdp: nothing measured: %s" % b.missing, file=sys.stderr)
        return 1
    b.write(args.output)
    return 0


# --- the report ------------------------------------------------------------------------------------


def _load(json_path) -> dict:
    from report import benchmarks

    return benchmarks(json_path)


def _meta(b) -> dict:
    return json.loads(b.get_metadata().get("hybrid_meta", "{}")) if b is not None else {}


def rows(json_path) -> list:
    from report import Row, Stat, missing_sides

    by = _load(json_path)
    missing = missing_sides(by)

    def stat(name):
        b = by.get(name)
        return Stat.of(b) if b is not None else None

    def why(*names):
        return "; ".join("%s: %s" % (n.split(", ")[-1], missing[n]) for n in names if n in missing)

    out = []
    for prog in PROGRAMS:
        u = "%s: throughput, user" % prog
        um = _meta(by.get(u))
        for mode in ("native", "generic"):
            k = "%s: throughput, %s" % (prog, mode)
            km = _meta(by.get(k))
            note = []
            for label, s, m in (("kernel", stat(k), km), ("user", stat(u), um)):
                if s is not None:
                    note.append("%s %.2f Mpps, %.0f%% of the burst processed" % (label, 1e3 / s.median,
                                                                                 100 * m.get("processed", 0)))
            if um.get("mode"):
                note.append("userspace: %s" % um["mode"])
            note.append("%d-frame bursts of 64-byte UDP from an AF_PACKET generator on a veth pair"
                        % (km.get("sent") or um.get("sent") or 0))
            out.append(Row(SUITE, "%s: throughput vs %s XDP" % (prog, mode), "ns/packet", stat(k), stat(u),
                           reason=why(k, u), kernel_label=LABELS[mode], user_label=LABELS["user"],
                           note="; ".join(note), goal=1.0 if prog == "drop" else None))
        k, uu = "%s: program run, kernel" % prog, "%s: program run, user" % prog
        out.append(Row(SUITE, "%s: program run on one frame" % prog, "ns/run", stat(k), stat(uu), reason=why(k, uu),
                       kernel_label="kernel JIT (BPF_PROG_TEST_RUN, repeat)", user_label="hybrid JIT (C loop)",
                       note="the same 64-byte frame; the kernel's figure includes its test-run loop", goal=1.0))
        li = "%s: program in the loop, user" % prog
        out.append(Row(SUITE, "%s: program per packet in the receive loop" % prog, "ns/packet", stat(k), stat(li),
                       reason=why(k, li) or ("" if stat(li) else "no packet reached the userspace loop"),
                       kernel_label="kernel JIT (BPF_PROG_TEST_RUN, repeat)",
                       user_label="hybrid JIT in the AF_XDP loop (rdtsc per batch)",
                       note="program runs only, on packets just written by the receiving CPU, in batches of %.1f "
                            "packets on average (two rdtsc per batch included), against the kernel's test run"
                            % _meta(by.get(li)).get("batch", 0)))
    k, u = "reflect: round trip, native", "reflect: round trip, user"
    km, um = _meta(by.get(k)), _meta(by.get(u))
    out.append(Row(SUITE, "reflect: round trip of one frame (XDP_TX)", "ns", stat(k), stat(u), reason=why(k, u),
                   kernel_label=LABELS["native"], user_label=LABELS["user"],
                   note="median round trip of a 64-byte frame sent with AF_PACKET and reflected (MAC swap, XDP_TX), "
                        "%d pings a value, lost: kernel %s, user %s" % (km.get("pings") or um.get("pings") or 0,
                                                                       km.get("lost", "?"), um.get("lost", "?"))))
    return out


def missed_goals(json_path) -> list[str]:
    return ["%s/%s: kernel/user %.2f, goal ≥ %.1f" % (SUITE, r.name, r.ratio, r.goal) for r in rows(json_path)
            if r.goal_met is False]


def summarize(json_path) -> str:
    from report import fmt_ratio, fmt_stat

    import bench_engines  # machine_line

    lines = ["# XDP: userspace XDP (AF_XDP + JIT) against kernel XDP", "", bench_engines.machine_line() + ".", "",
             "Two network namespaces joined by a veth pair; an AF_PACKET generator sends bursts of 64-byte UDP "
             "frames as fast as it can, the receiver runs the same program as kernel XDP (native, generic) or as "
             "userspace XDP. **ns/packet** for throughput = burst time / packets the program ran on (1e9 / rate); "
             "program rows: the program alone on one frame. Median ± stdev over the bursts.", "",
             "| what | unit | kernel | userspace | kernel/user | note |", "|---|---|---:|---:|---:|---|"]
    for r in rows(json_path):
        lines.append("| %s | %s | %s | %s | %s | %s |" % (r.name, r.unit, fmt_stat(r.kernel), fmt_stat(r.user),
                                                         fmt_ratio(r.ratio), r.note or r.reason))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
