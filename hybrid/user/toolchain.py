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
