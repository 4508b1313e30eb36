"""Native (C) part of hybrid: the eBPF helper functions engines call.

The helpers live in the cffi extension module ``hybrid._native`` built from
runtime.c; it is imported only when an address is first asked for, so the
pure-Python parts of hybrid work without a C compiler.
"""

from __future__ import annotations

import functools

from hybrid.errors import EngineError

@functools.cache
def _native():
    try:
        from hybrid import _native
    except ImportError as e:
        raise EngineError(
            "the native module hybrid._native is not built "
            "(run 'make setup', or 'pip install -e .' in the repository): " + str(e)
        ) from e
    return _native


def symbol_address(symbol: str) -> int:
    """Address of the runtime function ``symbol``, as an int.

    Raises EngineError when the native module is not built or has no such function.
    """
    mod = _native()
    try:
        fn = mod.ffi.addressof(mod.lib, symbol)
    except AttributeError as e:
        raise EngineError(f"the native runtime has no function {symbol!r}") from e
    return int(mod.ffi.cast("uintptr_t", fn))


def helper_address(name: str) -> int:
    """Address of the native helper ``hybrid_helper_<name>`` (five uint64_t in, one out)."""
    return symbol_address("hybrid_helper_" + name)


def module_path() -> str:
    """File of the built native module (AOT libraries resolve their helpers against it)."""
    return _native().__file__


def agent_path() -> str:
    """File of the standalone probe agent (``hybrid/libhybrid_agent*.so``), to LD_PRELOAD or inject.

    Raises AttachError when it is not built.
    """
    import glob
    import os

    from hybrid.errors import AttachError

    pkg = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    found = sorted(glob.glob(os.path.join(pkg, "libhybrid_agent*.so")))
    if not found:
        raise AttachError(
            f"the probe agent {pkg}/libhybrid_agent*.so is not built "
            "(run 'make setup', or 'pip install -e .' in the repository)"
        )
    return found[0]
