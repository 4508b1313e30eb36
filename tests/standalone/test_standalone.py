"""``hybrid aot build``: standalone executables and libraries from clang-compiled objects.

Every binary runs in a fresh process with an empty environment (``env -i``: no Python, no
LLVM, no PYTHONPATH) and its results (r0, and the maps it dumps as JSON) are compared with
the JIT's on the same inputs, each side starting from freshly loaded maps.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

import hybrid
from hybrid.cli import main as cli
from hybrid.errors import AotError
from hybrid.standalone import build
from hybrid.user.maps import MapType
from tests.user.object_util import allowed_cpus, on_cpu, pt_regs, u32

HERE = Path(__file__).resolve().parent
KEYLESS = {"ringbuf", "perf_event_array", "queue", "stack", "bloom_filter"}
LIBC_ONLY = {"libc.so.6", "ld-linux-x86-64.so.2"}
CPU = allowed_cpus()[0]  # both sides run there (the child inherits the affinity): per-CPU results agree

pytestmark = pytest.mark.skipif(shutil.which("cc") is None or shutil.which("readelf") is None,
                                reason="needs a C compiler (cc) and readelf")


@pytest.fixture(scope="module")
def built(bpf_build, tmp_path_factory):
    """``built(object, program, **kw)``: the executable (or library) of one program, built once."""
    cache: dict = {}
    out = tmp_path_factory.mktemp("aot")

    def get(name: str, program: str, **kw) -> Path:
        key = (name, program, tuple(sorted(kw.items())))
        if key not in cache:
            path = out / ("lib%s.so" % program if kw.get("lib") else "%s-%s" % (name, program))
            cache[key] = build(bpf_build.obj(name), path, program=program, **kw).path
        return cache[key]

    return get


def run_exe(exe: Path, ctx: bytes, *args: str, stdin: bool = False) -> subprocess.CompletedProcess:
    """Run ``exe`` with nothing in its environment, the context from a file (or standard input)."""
    if stdin:
        return subprocess.run(["env", "-i", str(exe), *args], input=ctx, capture_output=True, timeout=60)
    path = exe.with_name(exe.name + ".ctx")
    path.write_bytes(ctx)
    return subprocess.run(["env", "-i", str(exe), *args, str(path)], capture_output=True, timeout=60)


def exe_result(exe: Path, ctx: bytes, repeat: int = 1) -> tuple[int, dict]:
    """r0 and the normalized maps after ``repeat`` runs of the executable on ``ctx``."""
    proc = run_exe(exe, ctx, "--dump-maps", "--repeat", str(repeat))
    assert proc.returncode == 0, proc.stderr.decode()
    first, _, rest = proc.stdout.decode().partition("\n")
    m = re.fullmatch(r"r0 = (\d+) \(0x([0-9a-f]+)\)", first)
    assert m and int(m.group(1)) == int(m.group(2), 16), first
    dump = json.loads(rest)
    assert dump["r0"] == int(m.group(1))
    return dump["r0"], normalize_exe(dump["maps"])


def _sum(values) -> int:
    return sum(int.from_bytes(bytes.fromhex(v) if isinstance(v, str) else v, "little") for v in values)


def normalize_exe(maps: dict) -> dict:
    """{map: {key hex: value}}: per-CPU values summed over CPUs, prog arrays by program name."""
    out = {}
    for name, m in maps.items():
        if m["type"] in KEYLESS:
            assert "entries" not in m
            continue
        entries = {}
        for e in m["entries"]:
            if "values" in e:
                entries[e["key"]] = _sum(e["values"])
            elif m["type"] == "prog_array":
                entries[e["key"]] = e.get("program")
            else:
                entries[e["key"]] = e["value"]
        out[name] = entries
    return out


def jit_maps(obj) -> dict:
    """The same view of a loaded object's maps, through the Python map API."""
    names = {lp.id: lp.name for lp in obj.programs.values()}
    out = {}
    for name, m in obj.maps.items():
        kind = MapType(m.type).name.lower()
        if kind in KEYLESS:
            continue
        entries = {}
        key = m.next_key()
        while key is not None:
            value = m.lookup(key)
            if value is not None:
                if isinstance(value, list):
                    value = _sum(value)
                elif kind in ("array_of_maps", "hash_of_maps"):
                    value = value.name
                elif kind == "prog_array":
                    value = names.get(int.from_bytes(value, "little"))
                else:
                    value = value.hex()
                entries[key.hex()] = value
            key = m.next_key(key)
        out[name] = entries
    return out


def jit_result(bpf_build, name: str, program: str, ctx: bytes, repeat: int = 1) -> tuple[int, dict]:
    with hybrid.load(bpf_build.obj(name), kernel=False) as obj:
        for _ in range(repeat):
            r0 = obj.programs[program].run(ctx, engine="jit")
        return r0, jit_maps(obj)


# (object, program, contexts, runs on each): every map type a program can reach without a process
CASES = [
    ("standalone", "count", [pt_regs(5, 7), pt_regs(9, 1 << 40)], 3),
    ("standalone", "checksum", [bytes(range(64)), os.urandom(64), os.urandom(100)], 2),
    ("standalone", "helpers", [pt_regs(0), pt_regs(5), pt_regs(1000)], 1),
    ("standalone", "route", [pt_regs(0, 0x0A000000, 8, 42), pt_regs(1, 0x0A000001), pt_regs(1, 0x0B000001)], 1),
    ("standalone", "dispatch", [pt_regs(0, 5), pt_regs(1, 5), pt_regs(2, 6), pt_regs(9, 1)], 2),
    ("maps_all", "kv", [pt_regs(0, 0, 3, 77, 0), pt_regs(1, 0, 4, 5, 0), pt_regs(2, 3, 2, 9, 0),
                        pt_regs(0, 1, 3, 0, 0)], 2),
    ("maps_all", "percpu", [pt_regs(0, 1, 5, CPU), pt_regs(1, 2, 7, CPU), pt_regs(2, 3, 1, CPU)], 3),
    ("maps_all", "qs", [pt_regs(0, 0, 11, 0), pt_regs(1, 0, 12, 0), pt_regs(2, 0, 13, 0)], 3),
    ("maps_all", "lpm_prog", [pt_regs(0, 0x0000000A, 8, 5), pt_regs(1, 0x0000000A, 8, 0)], 1),
    ("maps_all", "mim", [pt_regs(0, 0, 1, 4), pt_regs(0, 1, 2, 4), pt_regs(1, 0, 1, 4)], 2),
    ("maps_all", "rb", [pt_regs(0, 1, 2), pt_regs(3, 2)], 2),
    ("maps_all", "tail_entry", [pt_regs(0, 5), pt_regs(1, 5)], 1),
    ("maps_all", "globals", [pt_regs(3), pt_regs(1 << 33)], 4),
]


@pytest.mark.parametrize("name,program,contexts,repeat", CASES, ids=["%s-%s" % c[:2] for c in CASES])
def test_executable_matches_the_jit(bpf_build, built, name, program, contexts, repeat):
    exe = built(name, program)
    with on_cpu(CPU):
        for ctx in contexts:
            want = jit_result(bpf_build, name, program, ctx, repeat)
            got = exe_result(exe, ctx, repeat)
            assert got == want, "context %s" % ctx.hex()


def test_executable_needs_only_libc(built):
    exe = built("standalone", "dispatch")
    needed = re.findall(r"\(NEEDED\).*\[(.+)\]", subprocess.run(["readelf", "-d", str(exe)], capture_output=True,
                                                               text=True, check=True).stdout)
    assert "libc.so.6" in needed and set(needed) <= LIBC_ONLY, needed
    ldd = shutil.which("ldd")
    if ldd:  # what the dynamic loader would load: libc, the loader, the vDSO, nothing else
        libs = re.findall(r"^\s*(\S+)", subprocess.run([ldd, str(exe)], capture_output=True, text=True).stdout, re.M)
        assert {os.path.basename(x) for x in libs} <= LIBC_ONLY | {"linux-vdso.so.1"}, libs


def test_executable_runs_alone(built, tmp_path):
    """Copied elsewhere, with an empty environment, context on standard input; the tail-call
    targets of a prog array's initial values are compiled in and named in the dump."""
    exe = tmp_path / "dispatch"
    shutil.copy(built("standalone", "dispatch"), exe)
    proc = run_exe(exe, pt_regs(2, 6), "--dump-maps", stdin=True)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.decode().split("\n", 1)
    assert lines[0] == "r0 = 2018 (0x7e2)"  # jump_b: 2000 + 6 * scale (3)
    dump = json.loads(lines[1])
    jumps = {e["key"]: e.get("program") for e in dump["maps"]["jumps"]["entries"]}
    assert jumps == {u32(0).hex(): "jump_a", u32(2).hex(): "jump_b"}
    assert dump["maps"][".bss"]["entries"][0]["value"].startswith(struct.pack("<Q", 101).hex())  # runs
    assert run_exe(exe, pt_regs(0, 1), "-", stdin=True).stdout == b"r0 = 1001 (0x3e9)\n"


def test_executable_command_line(built, tmp_path):
    exe = built("standalone", "count")
    assert run_exe(exe, pt_regs(1, 1)).stdout == b"r0 = 1107 (0x453)\n"  # 1 * 3 + 1000 + 'h'
    proc = run_exe(exe, pt_regs(1, 1), "--repeat", "4")
    assert proc.stdout == b"r0 = 1116 (0x45c)\n" and b"4 runs" in proc.stderr
    assert subprocess.run(["env", "-i", str(exe), "--help"], capture_output=True).returncode == 0
    for bad in (["--repeat", "0"], ["--repeat", "x"], ["--bogus"], [str(tmp_path / "missing")]):
        proc = subprocess.run(["env", "-i", str(exe), *bad], capture_output=True, stdin=subprocess.DEVNULL)
        assert proc.returncode == 2 and proc.stderr, bad
    # no context at all: r1 = NULL, r2 = 0 (the program does not read it)
    proc = run_exe(built("standalone", "tick"), b"", "--repeat", "3", stdin=True)
    assert proc.returncode == 0 and proc.stdout == b"r0 = 3 (0x3)\n", proc.stderr
    # bpf_printk lines go to standard error, in trace_pipe's format
    assert re.findall(rb"bpf_trace_printk: (tick \d)\n", proc.stderr) == [b"tick 1", b"tick 2", b"tick 3"]


def test_values_and_emit_llvm(bpf_build, tmp_path, capsys):
    out = tmp_path / "dispatch"
    assert cli(["aot", "build", str(bpf_build.obj("standalone")), "-p", "dispatch", "-o", str(out),
                "--emit-llvm", "--value", "scale=5"]) == 0
    assert "tail calls: jump_a, jump_b" in capsys.readouterr().out
    ir = (tmp_path / "dispatch.ll").read_text()
    assert "define i64 @hybrid_sa_prog_0" in ir and "@hybrid_sa_prog_2" in ir and "@hybrid_sa_region" in ir
    assert run_exe(out, pt_regs(2, 7)).stdout == b"r0 = 2035 (0x7f3)\n"  # scale 5


def test_refused_helpers(bpf_build, tmp_path, capsys):
    out = tmp_path / "peek"
    with pytest.raises(AotError) as e:
        build(bpf_build.obj("standalone"), out, program="peek")
    assert str(e.value) == ("%s: program 'peek' calls bpf_get_current_pid_tgid (14), bpf_probe_read_user (112): "
                            "these need a kernel or a traced process" % bpf_build.obj("standalone"))
    assert cli(["aot", "build", str(bpf_build.obj("maps_all")), "-p", "stackid", "-o", str(out)]) == 2
    assert "program 'stackid' calls bpf_get_stackid (27): this needs a kernel or a traced process" \
        in capsys.readouterr().err
    assert not out.exists()


def test_bad_input(bpf_build, tmp_path, capsys):
    out = str(tmp_path / "x")
    junk = tmp_path / "junk.o"
    junk.write_text("not an object\n")
    obj = str(bpf_build.obj("standalone"))
    for argv, message in [
        ([str(junk)], "ElfError: junk: "),
        ([str(tmp_path / "missing.o")], "missing.o: cannot read"),
        ([obj], "AotError: %s: 9 programs (checksum, count, dispatch, helpers, jump_a, jump_b, peek, route, tick): "
                "choose one with -p" % obj),
        ([obj, "-p", "nope"], "AotError: %s: no program 'nope' (programs: checksum, count," % obj),
        ([obj, "-p", "count", "--lib", "--name", "1x"], "AotError: --name '1x' is no C identifier"),
        ([obj, "-p", "count", "--value", "scale"], "--value 'scale': want NAME=INTEGER"),
    ]:
        assert cli(["aot", "build", *argv, "-o", out]) == 2, argv
        assert message in capsys.readouterr().err, argv
    assert not os.path.exists(out)


# --- the library -------------------------------------------------------------------------------


def expected_embed_output(bpf_build) -> str:
    """What embed.c prints, computed with the JIT and the Python map API."""
    lines = []
    with hybrid.load(bpf_build.obj("standalone"), kernel=False) as obj:
        prog = obj.programs["count"]
        counts, data = obj.maps["counts"], obj.maps[".data"]

        def count(key: int, add: int) -> int:
            return prog.run(pt_regs(key, add), engine="jit")

        for i, key in enumerate((1, 2, 1, 7, 1, 2)):
            lines.append("run %d %d" % (key, count(key, 10 + i)))
        for key in range(9):
            v = counts.lookup(u32(key))
            lines.append("counts %d %d %d" % (key, 0 if v else -errno.ENOENT, int.from_bytes(v or b"", "little")))
        lines.append(".data 0 %d" % int.from_bytes(data.lookup(u32(0)), "little"))
        counts.update(u32(99), struct.pack("<Q", 1234))
        lines += ["update 0", "update_noexist 1", "run 99 %d" % count(99, 1)]
        data.update(u32(0), struct.pack("<Q", 5))
        lines += ["update_data 0", "run 99 %d" % count(99, 1), "delete 1"]
        counts.delete(u32(7))
        lines += ["delete 7 0", "keys %d 1" % len(list(counts.keys()))]
        pc = obj.maps["percpu_runs"]
        lines.append("percpu_size %d" % (8 * pc.nr_cpus))
        lines.append("percpu_total 0 %d" % pc.sum(u32(0)))
        lines.append("no_map 1 1 1")
        lines += ["map %s" % m.name for m in obj.region.maps]
    return "\n".join(lines) + "\n"


def test_library_embedded_in_a_c_program(bpf_build, built, tmp_path):
    lib = built("standalone", "count", lib=True)
    header = lib.with_name("libcount.h")
    text = header.read_text()
    for fn in ("count_run(void *ctx, size_t len)", "count_map_lookup(const char *map, const void *key, void *value)",
               "count_map_update(const char *map, const void *key, const void *value, uint64_t flags)",
               "count_map_delete", "count_map_next_key", "count_map_value_size", "count_map_name"):
        assert fn in text, fn
    exe = tmp_path / "embed"
    subprocess.run(["cc", "-O2", "-Wall", "-Werror", "-I", str(lib.parent), "-o", str(exe), str(HERE / "embed.c"),
                    "-L", str(lib.parent), "-lcount", "-Wl,-rpath,%s" % lib.parent], check=True)
    proc = subprocess.run(["env", "-i", str(exe)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == expected_embed_output(bpf_build)
    # only the documented interface is exported; only libc is needed
    syms = subprocess.run(["readelf", "-W", "--dyn-syms", str(lib)], capture_output=True, text=True, check=True).stdout
    exported = {line.split()[-1] for line in syms.splitlines()
                if " FUNC " in line and " UND " not in line and "GLOBAL" in line}
    assert exported == {"count_run", "count_map_lookup", "count_map_update", "count_map_delete",
                        "count_map_next_key", "count_map_value_size", "count_map_name"}
    dyn = subprocess.run(["readelf", "-d", str(lib)], capture_output=True, text=True, check=True).stdout
    assert set(re.findall(r"\(NEEDED\).*\[(.+)\]", dyn)) <= LIBC_ONLY


def test_library_name_option(bpf_build, tmp_path):
    res = build(bpf_build.obj("standalone"), tmp_path / "libthing.so.1", program="helpers", lib=True, name="sq")
    assert res.header == tmp_path / "libthing.h"
    assert "uint64_t sq_run(void *ctx, size_t len);" in res.header.read_text()
    prog = tmp_path / "use.c"
    prog.write_text('#include "libthing.h"\n#include <stdio.h>\n#include <stdint.h>\n'
                    "int main(void) { uint64_t regs[21] = {0}; regs[14] = 5;\n"
                    '  printf("%llu\\n", (unsigned long long)sq_run(regs, sizeof(regs))); return 0; }\n')
    exe = tmp_path / "use"
    subprocess.run(["cc", "-I", str(tmp_path), "-o", str(exe), str(prog), str(res.path)], check=True)
    out = subprocess.run(["env", "-i", "LD_LIBRARY_PATH=%s" % tmp_path, str(exe)], capture_output=True, text=True)
    assert out.stdout == "30111\n"  # 0 + 1 + 4 + 9 + 16 = 30; * 1000 + snprintf's 11 * 10 + strncmp's 1
