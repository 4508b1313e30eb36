"""``hybrid prog list``, ``map list``, ``map dump``, ``link list``, ``stats``, ``detach --link``:
a clang-compiled object loaded by a controller process, attached to a running C workload,
inspected from a third process (the command line), with exact counts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import hybrid
from hybrid.user.maps import possible_cpus

ROOT = Path(__file__).resolve().parent.parent
WORKLOAD = ROOT / "tests" / "user" / "attach" / "workload.c"
HYBRID = [sys.executable, "-m", "hybrid.cli"]
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="attaching to another process needs root (ptrace)")

PROGRAM = r"""
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

char LICENSE[] SEC("license") = "GPL";

struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 4);
    __type(key, u32);
    __type(value, u64);
} counts SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 16);
    __type(key, u32);
    __type(value, u64);
} by_arg SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __uint(max_entries, 1);
    __type(key, u32);
    __type(value, u64);
} per_cpu SEC(".maps");

SEC("uprobe/{exe}:add")
int BPF_KPROBE(on_add, long a, long b)
{
    u32 k = 0, m = (u64)a & 3;
    u64 one = 1, *p;

    p = bpf_map_lookup_elem(&counts, &k);
    if (p)
        __sync_fetch_and_add(p, 1);
    k = 1;
    p = bpf_map_lookup_elem(&counts, &k);
    if (p)
        __sync_fetch_and_add(p, a);
    p = bpf_map_lookup_elem(&by_arg, &m);
    if (p)
        __sync_fetch_and_add(p, 1);
    else
        bpf_map_update_elem(&by_arg, &m, &one, BPF_NOEXIST);
    k = 0;
    p = bpf_map_lookup_elem(&per_cpu, &k);
    if (p)
        __sync_fetch_and_add(p, 1);
    return 0;
}

SEC("uprobe/{exe}:fact")
int BPF_KPROBE(on_fact, long n)
{
    u32 k = 2;
    u64 *p = bpf_map_lookup_elem(&counts, &k);

    if (p)
        __sync_fetch_and_add(p, 1);
    return 0;
}
"""

CONTROLLER = textwrap.dedent("""
    import sys
    import hybrid

    obj = hybrid.load(sys.argv[1])
    if len(sys.argv) > 2:
        obj.attach(int(sys.argv[2]))
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() == "close":
            obj.close()
            print("closed", flush=True)
""")


@pytest.fixture(scope="module")
def workload(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("workload") / "workload"
    subprocess.run(["gcc", "-O2", "-g", "-pthread", "-o", str(out), str(WORKLOAD)], check=True)
    return str(out)


@pytest.fixture
def run_dir(tmp_path, monkeypatch) -> Path:
    d = tmp_path / "run"
    monkeypatch.setenv("HYBRID_RUN_DIR", str(d))
    monkeypatch.delenv("HYBRID_STATS", raising=False)
    return d


@pytest.fixture(scope="module")
def obj_path(bpf_build, workload) -> Path:
    return bpf_build.source("inspect", PROGRAM.replace("{exe}", workload))


class Workload:
    def __init__(self, exe: str):
        self.p = subprocess.Popen([exe, "-i"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.p.stdout.readline().startswith("ready")
        self.pid = self.p.pid

    def run(self, mode: str, calls: int) -> str:
        self.p.stdin.write("%s 1 %d\n" % (mode, calls))  # one thread: every count is exact
        self.p.stdin.flush()
        line = self.p.stdout.readline()
        assert line.startswith("ok "), line
        return line

    def close(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait()


class Controller:
    """Another process that loads the object (and attaches it to ``pid``) and keeps it until closed."""

    def __init__(self, obj: Path, pid: int | None = None):
        args = [sys.executable, "-c", CONTROLLER, str(obj)] + ([str(pid)] if pid else [])
        self.p = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True)
        line = self.p.stdout.readline()
        assert line.strip() == "ready", line + self.p.stderr.read()
        self.pid = self.p.pid

    def close(self) -> str:
        self.p.stdin.write("close\n")
        self.p.stdin.flush()
        line = self.p.stdout.readline()
        self.p.stdin.close()
        self.p.wait(30)
        return line.strip() + self.p.stderr.read()

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait()


@pytest.fixture
def procs():
    made = []
    yield made
    for p in made:
        if isinstance(p, Workload):
            subprocess.run(HYBRID + ["detach", "-p", str(p.pid)], capture_output=True)  # if a test failed early
        p.close() if isinstance(p, Workload) else p.kill()


def cli(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(HYBRID + list(args), capture_output=True, text=True, timeout=60)
    if ok:
        assert r.returncode == 0, r.stderr
        assert "Traceback" not in r.stderr
    return r


def js(*args: str):
    return json.loads(cli(*args, "--json").stdout)


def prog(name: str) -> dict:
    rows = [r for r in js("prog", "list") if r["name"] == name]
    assert len(rows) == 1, rows
    return rows[0]


def entries(name: str) -> dict:
    return {e["key_int"]: e.get("value_int", e.get("values")) for e in js("map", "dump", name)["entries"]}


def tri(n: int) -> int:
    return n * (n - 1) // 2


@root_only
def test_inspect_a_running_attachment(run_dir, obj_path, workload, procs):
    w = Workload(workload)
    procs.append(w)
    ctl = Controller(obj_path, w.pid)
    procs.append(ctl)

    add = prog("on_add")
    assert add["runs"] == 0 and add["pids"] == [w.pid] and add["controller"] == ctl.pid
    assert add["side"] == "user" and add["kind"] == "uprobe" and add["object"] == "inspect"
    assert add["run_time_ns"] is None  # run-time statistics are off

    w.run("add", 1000)
    add = prog("on_add")
    assert add["runs"] == 1000 and add["run_time_ns"] is None
    assert prog("on_fact")["runs"] == 0

    # run time, like kernel.bpf_stats_enabled: measured only while on
    assert "statistics on (1 loaded object" in cli("stats", "on").stderr
    w.run("add", 500)
    add = prog("on_add")
    assert add["runs"] == 1500 and add["run_time_ns"] > 0 and add["avg_ns"] > 0 and add["stats_enabled"]
    cli("stats", "off")
    w.run("add", 100)
    off = prog("on_add")
    assert off["runs"] == 1600 and off["run_time_ns"] == add["run_time_ns"] and not off["stats_enabled"]

    # the text form: bpftool-like, aligned columns
    text = cli("prog", "list").stdout.splitlines()
    assert text[0].split() == ["ID", "NAME", "KIND", "SIDE", "OBJECT", "CONTROLLER", "PIDS", "RUNS", "RUN_TIME_NS",
                               "AVG_NS"]
    row = next(line for line in text if " on_add " in line)
    assert row.split()[1:8] == ["on_add", "uprobe", "user", "inspect", str(ctl.pid), str(w.pid), "1600"]
    assert text[0].index("NAME") == row.index("on_add")

    # maps: listed, dumped exactly
    maps = {m["name"]: m for m in js("map", "list")}
    assert {"counts", "by_arg", "per_cpu"} <= set(maps)
    assert (maps["by_arg"]["type"], maps["by_arg"]["key_size"], maps["by_arg"]["value_size"],
            maps["by_arg"]["max_entries"], maps["by_arg"]["where"]) == ("hash", 4, 8, 16, "region")
    assert entries("counts") == {0: 1600, 1: tri(1000) + tri(500) + tri(100), 2: 0, 3: 0}
    calls = list(range(1000)) + list(range(500)) + list(range(100))
    assert entries(str(maps["by_arg"]["id"])) == {k: sum(1 for a in calls if a % 4 == k) for k in range(4)}
    (percpu,) = entries("per_cpu").values()
    assert len(percpu) == possible_cpus()
    assert sum(v["value_int"] for v in percpu) == 1600
    dump = cli("map", "dump", "counts").stdout.splitlines()
    assert dump[0] == "key: 00 00 00 00 (0)  value: 40 06 00 00 00 00 00 00 (1600)"
    assert dump[-1] == "Found 4 elements"

    # links: one per program, in the workload
    links = {lk["program"]: lk for lk in js("link", "list")}
    assert set(links) == {"on_add", "on_fact"}
    assert links["on_add"]["pid"] == w.pid and links["on_add"]["kind"] == "uprobe"
    assert "add" in links["on_add"]["where"] and links["on_add"]["controller"] == ctl.pid
    assert links["on_add"]["prog_id"] == add["id"]

    # detach one link from here: its hits stop, the other link and the workload go on
    r = cli("detach", "--link", str(links["on_add"]["id"]))
    assert "link %d detached" % links["on_add"]["id"] in r.stderr
    assert [lk["program"] for lk in js("link", "list")] == ["on_fact"]
    assert w.run("add", 300).split()[1] == "add=%d" % tri(300)
    assert prog("on_add")["runs"] == 1600 and prog("on_add")["pids"] == []
    w.run("fact", 10)
    assert prog("on_fact")["runs"] == 1 + sum(range(1, 10))  # fact(n) runs n frames (1 for 0)
    assert cli("detach", "--link", str(links["on_add"]["id"]), ok=False).returncode == 2

    # the controller closes: its record goes, and its own detach skips the link removed from here
    assert ctl.close() == "closed"
    assert js("prog", "list") == [] and js("map", "list") == [] and js("link", "list") == []
    assert not list(run_dir.glob("obj.*")) and not list(run_dir.glob("detached.*"))
    w.run("fact", 10)
    assert w.p.poll() is None


@root_only
def test_killed_controller_is_pruned(run_dir, obj_path, workload, procs):
    w = Workload(workload)
    procs.append(w)
    ctl = Controller(obj_path, w.pid)
    procs.append(ctl)
    rec = json.loads(next(run_dir.glob("obj.*.json")).read_text())
    region, scratch = rec["region"]["path"], rec["scratch"]
    assert os.path.exists(region) and scratch and all(os.path.isdir(p) for p in scratch)
    w.run("add", 10)
    assert prog("on_add")["runs"] == 10
    os.kill(ctl.pid, signal.SIGKILL)
    ctl.p.wait()
    r = cli("prog", "list")
    assert r.stdout == ""
    assert ("controller %d of object 'inspect' is gone; its probes in process %d run on until `hybrid detach -p %d`"
            % (ctl.pid, w.pid, w.pid)) in r.stderr
    assert not list(run_dir.glob("obj.*")) and not os.path.exists(region)
    assert not any(os.path.exists(p) for p in scratch)  # the AOT libraries stay loaded in the workload
    assert w.run("add", 10)  # the probes still run (into a region nobody reads) until detached
    cli("detach", "-p", str(w.pid))
    assert w.run("add", 10) and w.p.poll() is None


@root_only
def test_in_process_controller_and_api(run_dir, obj_path, workload, procs, monkeypatch):
    w = Workload(workload)
    procs.append(w)
    monkeypatch.setenv("HYBRID_STATS", "1")  # run time measured from the load on
    with hybrid.load(obj_path) as obj:
        obj.attach(w.pid)
        w.run("add", 250)
        st = obj.stats()
        assert st["on_add"].runs == 250 and st["on_add"].run_time_ns > 0 and st["on_fact"].runs == 0
        obj.set_stats(False)
        w.run("add", 50)
        assert obj.stats()["on_add"].runs == 300 and obj.stats()["on_add"].run_time_ns == st["on_add"].run_time_ns
        add = prog("on_add")
        assert add["controller"] == os.getpid() and add["runs"] == 300
    assert js("prog", "list") == []


def test_listing_without_attaching(run_dir, obj_path):
    """Loading alone registers the object: programs with no runs, maps with their contents."""
    with hybrid.load(obj_path) as obj:
        obj.maps["counts"].update((3).to_bytes(4, "little"), (42).to_bytes(8, "little"))
        progs = {p["name"]: p for p in js("prog", "list")}
        assert set(progs) == {"on_add", "on_fact"}
        assert progs["on_add"]["runs"] == 0 and progs["on_add"]["pids"] == [] and progs["on_add"]["links"] == []
        assert progs["on_add"]["id"] != progs["on_fact"]["id"]
        assert entries("counts") == {0: 0, 1: 0, 2: 0, 3: 42}
        assert js("link", "list") == []
        assert "no map 'nope'" in cli("map", "dump", "nope", ok=False).stderr
        with hybrid.load(obj_path):  # a second object: names are ambiguous, ids are not
            r = cli("map", "dump", "counts", ok=False)
            assert r.returncode == 2 and "several maps are called 'counts'" in r.stderr
            ids = sorted(m["id"] for m in js("map", "list") if m["name"] == "counts")
            assert len(set(ids)) == 2 and entries(str(ids[0]))[3] == 42
    assert js("prog", "list") == []
