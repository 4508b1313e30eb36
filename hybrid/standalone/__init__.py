"""Standalone binaries from eBPF objects (``hybrid aot build``).

:func:`build` compiles one program of a clang-compiled object ahead of time,
with its maps (their initial contents included) and the helpers it calls,
into an executable or a shared library (``lib=True``, with a C header) that
needs nothing but libc.  See ``builder.py`` for how, ``standalone.c`` for the
executable's command line and ``standalone.h`` for the library's interface.
Importing this package imports neither LLVM nor the object loader.
"""

from __future__ import annotations


def build(*args, **kwargs):
    """See :func:`hybrid.standalone.builder.build`."""
    from hybrid.standalone.builder import build as _build

    return _build(*args, **kwargs)
