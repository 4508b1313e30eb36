"""Kernel side of hybrid: loading, attaching and talking to kernel eBPF programs.

* :class:`KernelObject` (:mod:`hybrid.kernel.object`): a clang-compiled
  object loaded through libbpf, attached by section, with its maps;
* :class:`KernelMap` (:mod:`hybrid.kernel.maps`): a kernel map by fd, with
  the Python API of :class:`hybrid.user.maps.Map`;
* :class:`BccProgram` (:mod:`hybrid.kernel.bcc`): a thin wrapper of bcc;
* :mod:`features`: what the running kernel can do;
* :mod:`hybrid.kernel.events`: ring buffer, perf buffer and user ring buffer.

Importing this package is cheap: libbpf is bound on first use, bcc imported
only by :class:`BccProgram`.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "KernelObject": ("hybrid.kernel.object", "KernelObject"),
    "KernelProgram": ("hybrid.kernel.object", "KernelProgram"),
    "KernelMap": ("hybrid.kernel.maps", "KernelMap"),
    "BccProgram": ("hybrid.kernel.bcc", "BccProgram"),
    "Link": ("hybrid.kernel.attach", "Link"),
    "RingBuffer": ("hybrid.kernel.events", "RingBuffer"),
    "PerfBuffer": ("hybrid.kernel.events", "PerfBuffer"),
    "UserRingBuffer": ("hybrid.kernel.events", "UserRingBuffer"),
    "features": ("hybrid.kernel.features", None),
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    try:
        module, attr = _LAZY[name]
    except KeyError:
        raise AttributeError("module 'hybrid.kernel' has no attribute %r" % name) from None
    mod = importlib.import_module(module)
    value = mod if attr is None else getattr(mod, attr)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
