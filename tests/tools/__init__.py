"""Tests of the bcc tool ports (tools/bcc_ports): a C workload, the port and Debian's bcc tool on it."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable

# One round per line read: "WORK WORK2 NEST DEPTH GETPPID FAIL" calls of work(), work2(), nest(DEPTH),
# syscall(SYS_getppid) and syscall(SYS_close, -1) (EBADF); "done ACC" when it is over; "q" ends it.
WORKLOAD_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/syscall.h>

__attribute__((noinline)) long work(long x) { __asm__ volatile("" : "+r"(x)); return x * 2 + 1; }
__attribute__((noinline)) long work2(long x) { __asm__ volatile("" : "+r"(x)); return x * 3 + 1; }
__attribute__((noinline)) long nest(long depth)
{
    long r = depth > 1 ? nest(depth - 1) : 0;
    __asm__ volatile("" : "+r"(r));
    return r + 1;
}

int main(void)
{
    char line[128];
    printf("ready %d\n", getpid());
    fflush(stdout);
    while (fgets(line, sizeof line, stdin)) {
        long work_n = 0, work2_n = 0, nest_n = 0, depth = 0, getppid_n = 0, fail_n = 0, acc = 0;
        if (line[0] == 'q')
            break;
        sscanf(line, "%ld %ld %ld %ld %ld %ld", &work_n, &work2_n, &nest_n, &depth, &getppid_n, &fail_n);
        for (long i = 0; i < work_n; i++) acc += work(i);
        for (long i = 0; i < work2_n; i++) acc += work2(i);
        for (long i = 0; i < nest_n; i++) acc += nest(depth);
        for (long i = 0; i < getppid_n; i++) acc += syscall(SYS_getppid);
        for (long i = 0; i < fail_n; i++) acc += syscall(SYS_close, -1);
        printf("done %ld\n", acc);
        fflush(stdout);
    }
    return 0;
}
"""

FUNCLATENCY_BCC = "/usr/sbin/funclatency-bpfcc"
SYSCOUNT_BCC = "/usr/sbin/syscount-bpfcc"


def build_workload(directory: Path) -> str:
    src = directory / "workload.c"
    src.write_text(WORKLOAD_C)
    exe = directory / "hybrid-tools-workload"
    subprocess.run(["gcc", "-O2", "-g", str(src), "-o", str(exe)], check=True)
    return str(exe)


def have(path: str) -> bool:
    """Debian's bcc tool at ``path`` is installed (it runs with the system's python3)."""
    return os.access(path, os.X_OK) and shutil.which("python3") is not None


def round_line(work=0, work2=0, nest=0, depth=0, getppid=0, fail=0) -> str:
    return "%d %d %d %d %d %d\n" % (work, work2, nest, depth, getppid, fail)


class Workload:
    """The workload process, waiting for rounds on its stdin."""

    def __init__(self, exe: str):
        self.proc = subprocess.Popen([exe], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        assert line.startswith("ready "), line
        self.pid = self.proc.pid

    def round(self, **calls) -> None:
        self.proc.stdin.write(round_line(**calls))
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line.startswith("done "), line

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("q\n")
                self.proc.stdin.close()
            except BrokenPipeError:
                pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def tool_env() -> dict:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = str(ROOT)
    return env


def port(name: str) -> list[str]:
    return [PYTHON, str(ROOT / "tools" / "bcc_ports" / ("%s.py" % name))]


def trace_round(argv: list[str], workload: Workload, timeout: float = 60, settle: float = 0.2,
                **calls) -> tuple[int, str, str]:
    """Start the tool, wait for its "Tracing ..." line, run one round of the workload, Ctrl-C the tool
    ``settle`` seconds later (the ports take Ctrl-C as the end from their "Tracing" line on)."""
    tool = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=tool_env(),
                            cwd=str(ROOT))
    try:
        first = tool.stdout.readline()
        if not first.startswith("Tracing"):
            out, err = tool.communicate(timeout=timeout)
            return tool.returncode, first + out, err
        workload.round(**calls)
        # bcc is only in its sleep() (where it takes Ctrl-C) a moment after its "Tracing" line
        time.sleep(settle)
        tool.send_signal(signal.SIGINT)
        out, err = tool.communicate(timeout=timeout)
        return tool.returncode, first + out, err
    finally:
        if tool.poll() is None:
            tool.kill()
            tool.wait()


def run_tool(argv: list[str], timeout: float = 60, stdin: str | None = None) -> tuple[int, str, str]:
    r = subprocess.run(argv, capture_output=True, text=True, env=tool_env(), cwd=str(ROOT), timeout=timeout,
                       input=stdin)
    return r.returncode, r.stdout, r.stderr


# --- bcc's log2 histogram layout -------------------------------------------------------------------

HIST_LINE = re.compile(r"^ *(\d+) -> (\d+) *: (\d+) *\|([*+ ]*)\|$")


def hist_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if HIST_LINE.match(line)]


def check_hist_layout(lines: list[str]) -> list[tuple[int, int, int]]:
    """Every bucket line is exactly what bcc's format makes of its numbers; returns (low, high, count)."""
    rows = [tuple(int(x) for x in HIST_LINE.match(line).groups()[:3]) for line in lines]
    assert rows, "no histogram lines"
    wide = rows[-1][1] >= (1 << 32)
    body = "%20d -> %-20d : %-8d |%-*s|" if wide else "%10d -> %-10d : %-8d |%-*s|"
    stars = 20 if wide else 40
    for line, (low, high, count) in zip(lines, rows):
        bar = HIST_LINE.match(line).group(4)
        assert line == body % (low, high, count, stars, bar.rstrip()), line
    return rows
