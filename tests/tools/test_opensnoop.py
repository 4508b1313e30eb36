"""tools/bcc_ports/opensnoop.py on a real process: the files it opened, bcc's columns, its errors.

The workload (C, built here) prints "ready PID", waits for a line on stdin,
then makes a known list of open/openat/openat2 calls (some missing: ENOENT),
prints "done" and waits for the end of its stdin.  Ground truth is the
workload's own list and strace's record of the same program (Debian's
opensnoop-bpfcc does not run on this kernel: it picks kretfunc probes, whose
load is refused, and kprobes are not configured).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOOL = [sys.executable, str(ROOT / "tools" / "bcc_ports" / "opensnoop.py")]

pytestmark = [pytest.mark.root, pytest.mark.kernel,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
              pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")]

WORKLOAD_C = r"""
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <sys/syscall.h>
#include <linux/openat2.h>

static char path[4096];
static const char *at(const char *dir, const char *name)
{
    snprintf(path, sizeof path, "%s/%s", dir, name);
    return path;
}
static void shut(int fd) { if (fd >= 0) close(fd); }

int main(int argc, char **argv)
{
    const char *d = argv[1];
    char line[64];
    struct open_how how = { .flags = O_RDWR };
    int dfd;

    printf("ready %d\n", getpid());
    fflush(stdout);
    if (!fgets(line, sizeof line, stdin))
        return 1;
    shut(open(at(d, "exists.txt"), O_RDONLY));                              /* openat, ok */
    shut(open(at(d, "missing-1"), O_RDONLY));                               /* ENOENT */
    shut(openat(AT_FDCWD, at(d, "created.txt"), O_WRONLY | O_CREAT | O_TRUNC, 0644));
    dfd = open(d, O_RDONLY | O_DIRECTORY);                                  /* the directory */
    shut(openat(dfd, "missing-2", O_RDONLY));                               /* relative to dfd, ENOENT */
    shut(syscall(SYS_openat2, AT_FDCWD, at(d, "exists.txt"), &how, sizeof how));  /* openat2 */
    shut(syscall(SYS_open, at(d, "missing-3"), O_RDONLY));                  /* the open syscall */
    shut(open(at(d, "nodir/x"), O_WRONLY | O_APPEND));                      /* ENOENT */
    if (chdir(d) == 0)
        shut(open("exists.txt", O_RDONLY));                                 /* relative to the cwd */
    shut(dfd);
    printf("done\n");
    fflush(stdout);
    while (fgets(line, sizeof line, stdin))
        ;
    return 0;
}
"""


def expected(d: str) -> list[tuple[str, int, int]]:
    """(path as passed, errno, flags) of each open the workload makes, in order."""
    return [
        (d + "/exists.txt", 0, os.O_RDONLY),
        (d + "/missing-1", 2, os.O_RDONLY),
        (d + "/created.txt", 0, os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
        (d, 0, os.O_RDONLY | os.O_DIRECTORY),
        ("missing-2", 2, os.O_RDONLY),
        (d + "/exists.txt", 0, os.O_RDWR),
        (d + "/missing-3", 2, os.O_RDONLY),
        (d + "/nodir/x", 2, os.O_WRONLY | os.O_APPEND),
        ("exists.txt", 0, os.O_RDONLY),
    ]


@pytest.fixture(scope="module")
def workload(tmp_path_factory) -> tuple[str, str]:
    """(executable, directory with exists.txt) -- the directory is what the workload opens in."""
    base = tmp_path_factory.mktemp("opensnoop")
    src = base / "opens.c"
    src.write_text(WORKLOAD_C)
    exe = base / "opens-workload"
    subprocess.run(["gcc", "-O2", "-g", str(src), "-o", str(exe)], check=True)
    d = base / "files"
    d.mkdir()
    (d / "exists.txt").write_text("x\n")
    return str(exe), str(d)


def env() -> dict:
    e = dict(os.environ, PYTHONUNBUFFERED="1")
    e["PYTHONPATH"] = str(ROOT)
    return e


# --- bcc's line format -----------------------------------------------------------------

def header(args: set[str]) -> str:
    """bcc's header for the options in ``args`` (its format strings)."""
    h = ""
    if "-T" in args:
        h += "%-14s" % ("TIME(s)")
    if "-U" in args:
        h += "%-6s" % ("UID")
    h += "%-6s %-16s %4s %3s " % ("TID" if "-t" in args else "PID", "COMM", "FD", "ERR")
    if "-e" in args:
        h += "%-9s" % ("FLAGS")
    return h + "PATH"


def line_re(args: set[str]) -> re.Pattern:
    r = "^"
    if "-T" in args:
        r += r"(?P<ts>\d+\.\d{9} *)"
    if "-U" in args:
        r += r"(?P<uid>\d+ *)"
    r += r"(?P<pid>\d+ *) (?P<comm>.{16}) (?P<fd> *-?\d+) (?P<err> *\d+) "
    if "-e" in args:
        r += r"(?P<flags>[0-7]{8}) "
    return re.compile(r + r"(?P<path>.*)$")


def parse(out: str, args: set[str]) -> list[dict]:
    """Event lines of the tool's output, each checked to be exactly what bcc's formats make of it."""
    rx = line_re(args)
    rows = []
    for text in out.splitlines():
        m = rx.match(text)
        if not m or text.startswith(("ready ", "done")):
            continue
        g = m.groupdict()
        row = {"pid": int(g["pid"]), "comm": g["comm"].rstrip(), "fd": int(g["fd"]), "err": int(g["err"]),
               "path": g["path"]}
        again = ""
        if "-T" in args:
            row["ts"] = float(g["ts"])
            again += "%-14.9f" % row["ts"]
        if "-U" in args:
            row["uid"] = int(g["uid"])
            again += "%-6d" % row["uid"]
        again += "%-6d %-16s %4d %3d " % (row["pid"], row["comm"], row["fd"], row["err"])
        if "-e" in args:
            row["flags"] = int(g["flags"], 8)
            again += "%08o " % row["flags"]
        again += row["path"]
        assert text == again, "not bcc's format: %r vs %r" % (text, again)
        rows.append(row)
    return rows


def run_command(args: list[str], workload, extra_cmd: tuple[str, ...] = ()) -> tuple[int, str, str]:
    """The port with the workload as its command (after --), "go" on its stdin."""
    exe, d = workload
    r = subprocess.run(TOOL + args + ["--", exe, d, *extra_cmd], input="go\n", capture_output=True, text=True,
                       env=env(), timeout=60, cwd=str(ROOT))
    return r.returncode, r.stdout, r.stderr


def run_attached(args: list[str], workload) -> tuple[int, str, str, int]:
    """The port on a running workload (-p PID): wait for its header, then let the workload run and end."""
    exe, d = workload
    w = subprocess.Popen([exe, d], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert w.stdout.readline().startswith("ready ")
        tool = subprocess.Popen(TOOL + args + ["-p", str(w.pid)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=env(), cwd=str(ROOT))
        first = tool.stdout.readline()
        assert first.startswith(("PID", "TIME", "UID")), first + tool.stderr.read()
        w.stdin.write("go\n")
        w.stdin.flush()
        assert w.stdout.readline() == "done\n"
        w.stdin.close()
        w.wait(10)
        out, err = tool.communicate(timeout=30)  # the port ends when its process does
        return tool.returncode, first + out, err, w.pid
    finally:
        for p in (w,):
            if p.poll() is None:
                p.kill()
                p.wait()


def summary(rows: list[dict]) -> list[tuple[str, int]]:
    return [(r["path"], r["err"]) for r in rows]


# --- tests --------------------------------------------------------------------------------

def test_command_reports_exactly_its_opens(workload):
    rc, out, err = run_command(["-e"], workload)
    assert rc == 0, err
    assert header({"-e"}) in out.splitlines()
    rows = parse(out, {"-e"})
    want = expected(workload[1])
    assert summary(rows) == [(p, e) for p, e, _ in want]      # the workload's list, nothing else
    assert [r["flags"] for r in rows] == [f for _, _, f in want]
    assert all(r["comm"] == "opens-workload" for r in rows)
    assert all((r["fd"] >= 0) == (r["err"] == 0) for r in rows)
    assert len({r["pid"] for r in rows}) == 1


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_matches_strace(workload, tmp_path):
    """strace's record of the same program (its opens after it read "go") is what the port prints."""
    exe, d = workload
    log = tmp_path / "strace.log"
    subprocess.run(["strace", "-qq", "-e", "signal=none", "-e", "trace=read,open,openat,openat2", "-o", str(log),
                    exe, d], input="go\n", capture_output=True, text=True, timeout=30, check=True)
    calls = log.read_text().splitlines()
    start = next(i for i, c in enumerate(calls) if c.startswith("read(0,"))
    truth = []
    for c in calls[start:]:
        m = re.match(r'^open(?:at2?)?\((?:[^,]+, )?"([^"]*)".*\)\s+= (-?\d+)(?: (E\w+))?', c)
        if m:
            truth.append((m.group(1), 0 if int(m.group(2)) >= 0 else {"ENOENT": 2}[m.group(3)]))
    rc, out, err = run_command([], workload)
    assert rc == 0, err
    assert summary(parse(out, set())) == truth


def test_attach_pid_failed_only_with_timestamps_and_uid(workload):
    args = ["-x", "-T", "-U"]
    rc, out, err, pid = run_attached(args, workload)
    assert rc == 0, err
    assert out.splitlines()[0] == header({"-T", "-U"})
    rows = parse(out, {"-T", "-U"})
    assert summary(rows) == [(p, e) for p, e, _ in expected(workload[1]) if e]
    assert all(r["pid"] == pid and r["uid"] == os.getuid() and r["fd"] == -1 for r in rows)
    ts = [r["ts"] for r in rows]
    assert ts == sorted(ts) and ts[0] < 1.0


def test_flag_filter_and_full_path(workload):
    d = workload[1]
    rc, out, err = run_command(["-f", "O_WRONLY", "-F"], workload)
    assert rc == 0, err
    assert summary(parse(out, set())) == [(d + "/created.txt", 0), (d + "/nodir/x", 2)]
    rc, out, err = run_command(["-F", "-n", "opens-work"], workload)
    assert rc == 0, err
    paths = [r["path"] for r in parse(out, set())]
    assert paths[-1] == os.path.join(d, "exists.txt")       # "exists.txt" after chdir(d), completed
    assert paths[4] == os.path.join(d, "missing-2")          # relative to the directory fd
    rc, out, err = run_command(["-n", "nomatch"], workload)
    assert rc == 0 and parse(out, set()) == []


def test_kernel_mode_sees_the_same_and_the_loader(workload):
    rc, out, err = run_command(["--mode", "kernel", "-e"], workload)
    assert rc == 0, err
    rows = parse(out, {"-e"})
    d = workload[1]
    mine = [r for r in rows if r["path"].startswith(d) or r["path"] in ("missing-2", "exists.txt")]
    want = expected(d)
    assert summary(mine) == [(p, e) for p, e, _ in want]
    assert [r["flags"] for r in mine] == [f for _, _, f in want]
    # the dynamic loader's opens come before main: the kernel's tracepoints see them, libc's probes do not
    assert any(r["path"].endswith("libc.so.6") for r in rows)


def test_tid_filter(workload):
    exe, d = workload
    w = subprocess.Popen([exe, d], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert w.stdout.readline().startswith("ready ")
        tool = subprocess.Popen(TOOL + ["-t", str(w.pid)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=env(), cwd=str(ROOT))
        first = tool.stdout.readline()
        assert first == header({"-t"}) + "\n", first + tool.stderr.read()
        w.stdin.write("go\n")
        w.stdin.flush()
        assert w.stdout.readline() == "done\n"
        w.stdin.close()
        w.wait(10)
        out, err = tool.communicate(timeout=30)
        assert tool.returncode == 0, err
        rows = parse(out, {"-t"})
        assert len(rows) == len(expected(d)) and {r["pid"] for r in rows} == {w.pid}
    finally:
        if w.poll() is None:
            w.kill()
            w.wait()


def test_errors_are_one_line():
    r = subprocess.run(TOOL + ["-p", "999999999"], capture_output=True, text=True, env=env(), timeout=30)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.strip() == "opensnoop: process 999999999 does not exist"
    r = subprocess.run(TOOL + ["--", "/nonexistent/prog"], capture_output=True, text=True, env=env(), timeout=30)
    assert r.returncode == 1 and r.stderr.strip() == "opensnoop: command not found: /nonexistent/prog"
    r = subprocess.run(TOOL + ["-f", "WRONLY"], capture_output=True, text=True, env=env(), timeout=30)
    assert r.returncode == 1 and r.stderr.strip() == "opensnoop: Bad flag: WRONLY"
    r = subprocess.run(TOOL + ["-b", "3", "-p", "1"], capture_output=True, text=True, env=env(), timeout=30)
    assert r.returncode == 1 and "power of two" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_ebpf_and_usage():
    r = subprocess.run(TOOL + ["--ebpf", "-x"], capture_output=True, text=True, env=env(), timeout=30)
    assert r.returncode == 0 and 'SEC("tracepoint/syscalls/sys_enter_openat")' in r.stdout
    r = subprocess.run(TOOL + ["-h"], capture_output=True, text=True, env=env(), timeout=30)
    assert r.returncode == 0
    assert "./opensnoop -f O_WRONLY -f O_RDWR  # only print calls for writing" in r.stdout
    assert "-b BUFFER_PAGES, --buffer-pages BUFFER_PAGES" in r.stdout
