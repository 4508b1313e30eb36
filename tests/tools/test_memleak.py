"""tools/bcc_ports/memleak.py on a real process: outstanding bytes and counts per call site, bcc's format,
and Debian's memleak-bpfcc (kernel uprobes) on the same workload.

The workload (C, built here with frame pointers) prints "ready PID", waits
for a line on stdin, then allocates from two call sites and frees some of
each (plus a realloc chain, posix_memalign, aligned_alloc and memalign, all
freed), prints "done" and waits for the end of its stdin:

    leak_a: malloc(1111) x 12, 5 freed  -> 7777 bytes in 7 allocations
    leak_b: calloc(3, 741) x 4, 1 freed -> 6669 bytes in 3 allocations
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOOL = [sys.executable, str(ROOT / "tools" / "bcc_ports" / "memleak.py")]
BCC = "/usr/sbin/memleak-bpfcc"

pytestmark = [pytest.mark.root, pytest.mark.kernel,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
              pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")]

WORKLOAD_C = r"""
#include <malloc.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

void *volatile keep[64];
volatile int n_a = 12, n_b = 4, free_a = 5;  /* volatile: one call site each, no unrolled copies */

__attribute__((noinline)) void *leak_a(void) { void *p = malloc(1111); __asm__ volatile("" ::: "memory"); return p; }
__attribute__((noinline)) void *leak_b(void) { void *p = calloc(3, 741); __asm__ volatile("" ::: "memory"); return p; }

__attribute__((noinline)) void others(void)
{
    void *p = malloc(10), *q;
    p = realloc(p, 5000);
    free(p);
    if (posix_memalign(&q, 64, 4096) == 0)
        free(q);
    free(aligned_alloc(64, 128));
    free(memalign(64, 256));
}

int main(void)
{
    char line[64];
    int i;

    printf("ready %d\n", getpid());
    fflush(stdout);
    if (!fgets(line, sizeof line, stdin))
        return 1;
    for (i = 0; i < n_a; i++)
        keep[i] = leak_a();
    for (i = 0; i < n_b; i++)
        keep[20 + i] = leak_b();
    for (i = 0; i < free_a; i++)
        free(keep[i]);
    free(keep[20]);
    others();
    printf("done\n");
    fflush(stdout);
    while (fgets(line, sizeof line, stdin))
        ;
    return 0;
}
"""

SITES = {"leak_a": (7777, 7), "leak_b": (6669, 3)}
REPORT_HEAD = re.compile(r"^\[\d\d:\d\d:\d\d\] Top (\d+) stacks with outstanding allocations:$")
BLOCK = re.compile(r"^\t(\d+) bytes in (\d+) allocations from stack$")
FRAME = re.compile(r"^\t\t0x[0-9a-f]{16}\t(\S+?)(\+0x[0-9a-f]+)?( \[[^]]+\])?$")


@pytest.fixture(scope="module")
def workload(tmp_path_factory) -> str:
    base = tmp_path_factory.mktemp("memleak")
    src = base / "allocs.c"
    src.write_text(WORKLOAD_C)
    exe = base / "allocs-workload"
    subprocess.run(["gcc", "-O1", "-g", "-fno-omit-frame-pointer", "-fno-optimize-sibling-calls", str(src), "-o",
                    str(exe)], check=True)
    return str(exe)


def env() -> dict:
    e = dict(os.environ, PYTHONUNBUFFERED="1")
    e["PYTHONPATH"] = str(ROOT)
    return e


def last_report(out: str, frames: bool = True) -> list[tuple[int, int, list[str]]]:
    """(bytes, allocations, frame lines) of each stack of the last report, the layout checked on the way."""
    lines = out.splitlines()
    heads = [i for i, line in enumerate(lines) if REPORT_HEAD.match(line)]
    assert heads, "no report in:\n" + out
    blocks = []
    for line in lines[heads[-1] + 1:]:
        m = BLOCK.match(line)
        if m:
            blocks.append((int(m.group(1)), int(m.group(2)), []))
        elif line.startswith("\t\t") and blocks:
            if frames:
                assert FRAME.match(line), "not bcc's frame format: %r" % line
            blocks[-1][2].append(line)
        elif line.startswith("\taddr = "):
            continue
        else:
            break
    return blocks


def sites(blocks) -> dict[str, tuple[int, int]]:
    """The blocks whose top frame is in leak_a / leak_b."""
    found = {}
    for size, count, frames in blocks:
        if frames:
            top = frames[0].split("\t")[-1]
            for name in SITES:
                if top.startswith(name + "+"):
                    assert name not in found, "two stacks for %s" % name
                    found[name] = (size, count)
    return found


def run_command(args: list[str], workload: str) -> tuple[int, str, str]:
    """The port running the workload (-c), "go" on its stdin then its end: the report the exit prints."""
    r = subprocess.run(TOOL + args + ["-c", workload], input="go\n", capture_output=True, text=True, env=env(),
                       timeout=90, cwd=str(ROOT))
    return r.returncode, r.stdout, r.stderr


class Waiting:
    """A workload started here, waiting for "go"."""

    def __init__(self, exe: str):
        self.p = subprocess.Popen([exe], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.p.stdout.readline().startswith("ready ")
        self.pid = self.p.pid

    def go(self) -> None:
        self.p.stdin.write("go\n")
        self.p.stdin.flush()
        assert self.p.stdout.readline() == "done\n"

    def end(self) -> None:
        if self.p.poll() is None:
            try:
                self.p.stdin.close()
            except BrokenPipeError:
                pass
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()


def run_attached(argv: list[str], workload: str, end: str) -> tuple[int, str, str]:
    """A tool on a waiting workload (``-p``, reports every second): its first report means it is attached;
    then "go"; then the end: ``exit`` (the workload ends, the port with it), ``sigint`` (Ctrl-C after the
    next report) or ``count`` (bcc's count argument: three reports, then it exits by itself; bcc's memleak
    only takes Ctrl-C cleanly while it sleeps)."""
    w = Waiting(workload)
    extra = ["1", "3"] if end == "count" else ["1"]
    tool = subprocess.Popen(argv + ["-p", str(w.pid), "-o", "0"] + extra, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env(), cwd=str(ROOT))
    out = []
    try:
        for line in tool.stdout:
            out.append(line)
            if REPORT_HEAD.match(line.rstrip("\n")):
                break
        else:
            return tool.wait(), "".join(out), tool.stderr.read()
        w.go()
        if end == "sigint":
            for line in tool.stdout:
                out.append(line)
                if REPORT_HEAD.match(line.rstrip("\n")):
                    break
            tool.send_signal(signal.SIGINT)
        elif end == "exit":
            w.end()
        rest, err = tool.communicate(timeout=60)
        return tool.returncode, "".join(out) + rest, err
    finally:
        w.end()
        if tool.poll() is None:
            tool.kill()
            tool.wait()


# --- tests --------------------------------------------------------------------------------

def test_command_reports_exact_leaks_per_site(workload):
    rc, out, err = run_command(["-a", "-o", "0", "30"], workload)
    assert rc == 0, err
    assert out.splitlines()[0] == "Executing '%s' and tracing the resulting process." % workload
    assert re.search(r"^Attaching to pid \d+, Ctrl\+C to quit\.$", out, re.M)
    blocks = last_report(out)
    assert sites(blocks) == SITES
    for size, count, frames in blocks:
        if frames and frames[0].split("\t")[-1].startswith("leak_"):
            assert re.search(r"\tmain\+0x[0-9a-f]+ \[allocs-workload\]$", frames[1])
            assert "__libc_start_call_main" in frames[2] or "[libc.so.6]" in frames[2]
    # -a: an address line per outstanding allocation of the sites (sizes 1111 and 2223)
    addrs = re.findall(r"^\taddr = [0-9a-f]+ size = (\d+)$", out.split("Top 10")[-1], re.M)
    assert addrs.count("1111") == 7 and addrs.count("2223") == 3
    # nothing the workload freed (realloc, posix_memalign, aligned_alloc, memalign) is outstanding
    assert not any(f for _, _, f in blocks if f and f[0].split("\t")[-1].startswith("others+"))


def test_combined_only_and_size_filter(workload):
    rc, out, err = run_command(["--combined-only", "-o", "0", "30"], workload)
    assert rc == 0, err
    head = [line for line in out.splitlines() if REPORT_HEAD.match(line)]
    assert head and REPORT_HEAD.match(head[-1]).group(1) == "10"
    tail = out.split(head[-1])[-1]
    found = {}
    for m in re.finditer(r"^\t(\d+) bytes in (\d+) allocations from stack\n\t\t(\w+)\+0x", tail, re.M):
        if m.group(3) in SITES:
            found[m.group(3)] = (int(m.group(1)), int(m.group(2)))
    assert found == SITES
    rc, out, err = run_command(["-z", "2000", "-Z", "3000", "-o", "0", "30"], workload)
    assert rc == 0, err
    assert sites(last_report(out)) == {"leak_b": SITES["leak_b"]}


def test_attach_pid_user_and_kernel_modes(workload):
    for mode in ("user", "kernel"):
        rc, out, err = run_attached(TOOL + ["--mode", mode], workload, "exit")
        assert rc == 0, (mode, err)
        assert sites(last_report(out)) == SITES, (mode, out)


@pytest.mark.skipif(not os.access(BCC, os.X_OK), reason="Debian's memleak-bpfcc is not installed")
def test_same_totals_as_bcc_memleak(workload):
    rc, bcc_out, err = run_attached([BCC], workload, "count")
    assert rc == 0, err
    bcc = sites(last_report(bcc_out))
    assert bcc == SITES, bcc_out
    rc, out, err = run_attached(TOOL, workload, "sigint")  # the port on Ctrl-C: detaches, a last report
    assert rc == 0, err
    assert sites(last_report(out)) == bcc


def test_errors_are_one_line(workload):
    r = subprocess.run(TOOL + ["-p", "999999999"], capture_output=True, text=True, env=env(), timeout=30)
    assert r.returncode == 1 and r.stderr.strip() == "memleak: process 999999999 does not exist"
    r = subprocess.run(TOOL + ["-c", "/nonexistent/prog"], capture_output=True, text=True, env=env(), timeout=30)
    assert r.returncode == 1 and r.stderr.strip() == "memleak: command not found: /nonexistent/prog"
    r = subprocess.run(TOOL + ["-O", "nosuchlib", "-c", workload], capture_output=True, text=True, env=env(),
                       timeout=30)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "nosuchlib" in r.stderr
    r = subprocess.run(TOOL + ["-O", workload, "-c", workload], capture_output=True, text=True, env=env(),
                       timeout=30)
    assert r.returncode == 1 and r.stderr.strip() == "memleak: %s has no function malloc" % workload
    r = subprocess.run(TOOL + ["-z", "10", "-Z", "5"], capture_output=True, text=True, env=env(), timeout=30)
    assert r.returncode == 1 and r.stdout.strip() == "min_size (-z) can't be greater than max_size (-Z)"


def test_ebpf_and_usage():
    r = subprocess.run(TOOL + ["--ebpf", "-p", str(os.getpid())], capture_output=True, text=True, env=env(),
                       timeout=30)
    assert r.returncode == 0 and "int BPF_KPROBE(malloc_enter, size_t size)" in r.stdout
    assert '#define OBJ "' in r.stdout and "libc.so.6" in r.stdout
    r = subprocess.run(TOOL + ["-h"], capture_output=True, text=True, env=env(), timeout=30)
    assert r.returncode == 0 and "Trace outstanding memory allocations that weren't freed." in r.stdout
    assert "./memleak -ap $(pidof allocs) 10" in r.stdout
