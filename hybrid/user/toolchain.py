"""Building eBPF C with the system's clang, the way libbpf-bootstrap does."""

from __future__ import annotations

import functools
import subprocess

from hybrid.errors import HybridError


@functools.cache
def clang_system_includes(clang: str = "clang") -> tuple[str, ...]:
    """clang's own include directories as ``-idirafter`` flags.

    ``-target bpf`` drops the host's include path, and ``<linux/bpf.h>``
    needs ``<asm/types.h>`` from it, so they are added back after
    everything else, as libbpf-bootstrap's Makefile does.
    """
    try:
        text = subprocess.run([clang, "-v", "-E", "-"], input="", capture_output=True, text=True).stderr
    except OSError as e:
        raise HybridError("cannot run %r: %s" % (clang, e.strerror)) from None
    flags: list[str] = []
    inside = False
    for line in text.splitlines():
        if line.startswith("#include <...> search starts here"):
            inside = True
        elif line.startswith("End of search list"):
            inside = False
        elif inside and line.startswith(" /"):
            flags += ["-idirafter", line.strip()]
    return tuple(flags)


def _tool(name: str) -> str:
    import shutil

    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/local/sbin")
    if path is None:
        raise HybridError("%s not found (run `make setup`, or apt-get install %s)"
                          % (name, {"bpftool": "bpftool", "gcc": "gcc"}.get(name, "clang llvm")))
    return path


def vmlinux_h(directory) -> str:
    """``vmlinux.h`` of the running kernel in ``directory`` (made once with bpftool from its BTF); its path."""
    import os

    path = os.path.join(os.fspath(directory), "vmlinux.h")
    if os.path.exists(path):
        return path
    os.makedirs(os.fspath(directory), exist_ok=True)
    tmp = path + ".%d.tmp" % os.getpid()
    with open(tmp, "w") as f:
        r = subprocess.run([_tool("bpftool"), "btf", "dump", "file", "/sys/kernel/btf/vmlinux", "format", "c"],
                           stdout=f, stderr=subprocess.PIPE, text=True)
    if r.returncode:
        os.unlink(tmp)
        raise HybridError("bpftool btf dump of /sys/kernel/btf/vmlinux failed: %s" % r.stderr.strip())
    os.replace(tmp, path)
    return path


def compile_bpf(source, output, *, include_dirs=(), defines=()) -> str:
    """``clang -O2 -g -target bpf`` of ``source`` into ``output``, with vmlinux.h next to ``output``.

    Rebuilt only when the source is newer than the object.  Returns the object's path.
    """
    import os

    source, output = os.fspath(source), os.fspath(output)
    if os.path.exists(output) and os.path.getmtime(output) >= os.path.getmtime(source):
        return output
    outdir = os.path.dirname(os.path.abspath(output))
    vmlinux_h(outdir)
    cmd = [_tool("clang"), "-O2", "-g", "-target", "bpf", "-D__TARGET_ARCH_x86", "-I" + outdir,
           *["-I" + os.fspath(d) for d in include_dirs], *["-D" + d for d in defines],
           *clang_system_includes(), "-c", source, "-o", output]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise HybridError("compiling %s failed:\n%s" % (source, r.stderr.strip()))
    return output


def compile_c(source, output, *flags: str) -> str:
    """``gcc -O2 -g`` of a C program (rebuilt when the source is newer); returns the executable's path."""
    import os

    source, output = os.fspath(source), os.fspath(output)
    if os.path.exists(output) and os.path.getmtime(output) >= os.path.getmtime(source):
        return output
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    r = subprocess.run([_tool("gcc"), "-O2", "-g", *flags, source, "-o", output], capture_output=True, text=True)
    if r.returncode:
        raise HybridError("compiling %s failed:\n%s" % (source, r.stderr.strip()))
    return output
