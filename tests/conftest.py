"""Shared fixtures and helpers of the test suite."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# The registry of loaded objects (hybrid/registry.py): the tests' own, not the machine's /run/hybrid.
if "HYBRID_RUN_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["HYBRID_RUN_DIR"] = tempfile.mkdtemp(prefix="hybrid-run-tests-")
    atexit.register(shutil.rmtree, os.environ["HYBRID_RUN_DIR"], True)
CONFORMANCE = Path(os.environ.get("HYBRID_CONFORMANCE", ROOT.parent / "shared" / "bpf_conformance"))
ENGINES = ("interp", "jit", "aot")


def conformance_files(sub: str) -> list[Path]:
    d = CONFORMANCE / sub
    return sorted(d.glob("*.data")) if d.is_dir() else []


def pytest_report_header(config):
    return "conformance vectors: %s (%d)" % (CONFORMANCE, len(conformance_files("tests")))


@pytest.fixture(scope="session")
def conformance_dir() -> Path:
    if not (CONFORMANCE / "tests").is_dir():
        pytest.skip("bpf_conformance vectors not found at %s (set HYBRID_CONFORMANCE)" % CONFORMANCE)
    return CONFORMANCE


# --- eBPF objects compiled from tests/user/progs/*.bpf.c (ELF/BTF loader tests) --------

PROGS = ROOT / "tests" / "user" / "progs"
KERNEL_BTF = Path("/sys/kernel/btf/vmlinux")


def _tool(name: str) -> str | None:
    import shutil

    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/local/sbin")


class BpfBuild:
    """Compiles ``tests/user/progs/<name>.bpf.c`` once per session, like libbpf-bootstrap:
    ``clang -O2 -g -target bpf -D__TARGET_ARCH_x86 -I<dir of vmlinux.h>`` + clang's system includes."""

    def __init__(self, out: Path, clang: str, bpftool: str, sys_includes: list[str]):
        self.out = out
        self.clang = clang
        self.bpftool = bpftool
        self.sys_includes = sys_includes
        self.vmlinux_h = out / "vmlinux.h"
        self._objs: dict[str, Path] = {}

    def compile(self, source: Path | str, name: str | None = None, extra: tuple[str, ...] = ()) -> Path:
        import subprocess

        source = Path(source)
        name = name or source.name.split(".")[0]
        obj = self.out / (name + ".bpf.o")
        cmd = [self.clang, "-O2", "-g", "-target", "bpf", "-D__TARGET_ARCH_x86", "-I%s" % self.out,
               *self.sys_includes, *extra, "-c", str(source), "-o", str(obj)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            pytest.fail("compiling %s failed:\n%s\n%s" % (source, " ".join(cmd), r.stderr))
        return obj

    def obj(self, name: str) -> Path:
        """The object compiled from ``tests/user/progs/<name>.bpf.c`` (cached)."""
        if name not in self._objs:
            self._objs[name] = self.compile(PROGS / (name + ".bpf.c"), name)
        return self._objs[name]

    def source(self, name: str, text: str, extra: tuple[str, ...] = ()) -> Path:
        """Compile C source text given inline (for one-off error cases)."""
        src = self.out / (name + ".bpf.c")
        src.write_text(text)
        return self.compile(src, name, extra)


@pytest.fixture(scope="session")
def bpf_build(tmp_path_factory) -> BpfBuild:
    import subprocess

    clang, bpftool = _tool("clang"), _tool("bpftool")
    if clang is None:
        pytest.skip("clang not found: cannot compile the eBPF test programs")
    if bpftool is None:
        pytest.skip("bpftool not found: cannot generate vmlinux.h")
    if not KERNEL_BTF.exists():
        pytest.skip("%s not found: cannot generate vmlinux.h" % KERNEL_BTF)
    out = tmp_path_factory.mktemp("bpf")
    with open(out / "vmlinux.h", "w") as f:
        r = subprocess.run([bpftool, "btf", "dump", "file", str(KERNEL_BTF), "format", "c"], stdout=f,
                           stderr=subprocess.PIPE, text=True)
    if r.returncode:
        pytest.fail("bpftool btf dump failed: %s" % r.stderr)
    from hybrid.user.toolchain import clang_system_includes

    sys_includes = list(clang_system_includes(clang))
    return BpfBuild(out, clang, bpftool, sys_includes)
