"""The hybrid command line."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from hybrid.cli import main
from hybrid.user.asm import assemble

HYBRID = [sys.executable, "-m", "hybrid.cli"]


@pytest.fixture
def vectors(tmp_path, conformance_dir):
    for name in ("add.data", "lock_cmpxchg.data", "callx.data"):
        shutil.copy(conformance_dir / "tests" / name, tmp_path)
    return tmp_path


def test_conformance_all_pass(vectors, capsys):
    assert main(["conformance", str(vectors), "--engine", "interp"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "3 passed, 0 failed"


def test_conformance_reports_failures_with_file_and_reason(vectors, conformance_dir):
    bad = (conformance_dir / "tests" / "add.data").read_text().replace("0x3", "0x4")
    (vectors / "wrong.data").write_text(bad)
    shutil.copy(conformance_dir / "negative" / "unused-exit-dst.data", vectors)
    (vectors / "accepted.data").write_text("-- asm\nmov %r0, 1\nexit\n-- error\n")
    proc = subprocess.run(HYBRID + ["conformance", str(vectors), "--engine", "jit"], capture_output=True, text=True)
    lines = proc.stdout.splitlines()
    assert proc.returncode == 1
    assert "FAIL wrong.data: r0 = 0x3, expected 0x4" in lines
    assert "FAIL accepted.data: expected the load to fail, but the program was accepted" in lines
    assert lines[-1] == "4 passed, 2 failed"  # unused-exit-dst.data is refused, so it passes


def test_conformance_missing_directory(capsys, tmp_path):
    assert main(["conformance", str(tmp_path / "nope")]) == 2
    assert "nope: not a directory" in capsys.readouterr().err


def test_run_asm_disasm_round_trip(tmp_path, capsys):
    src = tmp_path / "p.s"
    src.write_text("ldxw %r0, [%r1+0]\nadd %r0, 1\nexit\n")
    out = tmp_path / "p.bin"
    assert main(["asm", str(src), "-o", str(out)]) == 0
    assert out.read_bytes() == assemble(src.read_text())
    assert main(["prog", "run", str(out), "--engine", "interp", "--mem", "29 00 00 00"]) == 0
    assert capsys.readouterr().out.strip() == "0x2a"
    assert main(["disasm", str(out)]) == 0
    assert "ldxw %r0, [%r1]" in capsys.readouterr().out


def test_bad_program_is_a_clear_error_not_a_traceback(tmp_path):
    out = tmp_path / "bad.bin"
    out.write_bytes(b"\x95\x00\x00")
    proc = subprocess.run(HYBRID + ["prog", "run", str(out)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "hybrid: DecodeError: bytecode length 3 is not a multiple of 8 (truncated after insn #0)"
    out.write_bytes(assemble("call 63\nexit"))
    proc = subprocess.run(HYBRID + ["prog", "run", str(out)], capture_output=True, text=True)
    assert proc.stderr.strip() == "hybrid: VerifierError: insn #0 (call 63): unknown helper 63"
    assert "Traceback" not in proc.stderr


def test_prog_run_an_elf_object(bpf_build, capsys):
    obj = str(bpf_build.obj("run_basic"))
    regs = bytearray(168)
    regs[112:120] = (5).to_bytes(8, "little")  # di: the first argument
    assert main(["prog", "run", obj, "-p", "count", "--engine", "jit", "--mem", regs.hex()]) == 0
    assert capsys.readouterr().out.strip() == "0xf"  # bpf_loop's 10 + 5
    assert main(["prog", "run", obj]) == 2
    assert "several programs: choose one with -p (programs: count, tail_target)" in capsys.readouterr().err


def test_tool_runs_a_ported_bcc_tool(capsys):
    from hybrid.cli import main

    assert main(["tool", "funclatency", "--ebpf", "c:malloc"]) == 0
    assert "uprobe" in capsys.readouterr().out
    assert main(["tool", "no_such_tool"]) == 2
    err = capsys.readouterr().err
    assert "no tool 'no_such_tool'" in err and "funclatency" in err


def test_features_lists_what_the_kernel_can_do(capsys):
    import json
    import os

    from hybrid.cli import main

    assert main(["features", "--json"]) == 0
    rows = {r["feature"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["kprobes"]["available"] == os.path.exists("/sys/bus/event_source/devices/kprobe")
    assert rows["uprobes"]["available"] == os.path.exists("/sys/bus/event_source/devices/uprobe")
