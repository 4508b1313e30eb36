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


def helper_address(name: str) -> int:
    """Address of the native helper ``hybrid_helper_<name>``, as an int.

    The function takes five uint64_t arguments and returns a uint64_t.
    Raises EngineError when the native module is not built or has no such helper.
    """
    mod = _native()
    try:
        fn = mod.ffi.addressof(mod.lib, "hybrid_helper_" + name)
    except AttributeError as e:
        raise EngineError(f"no native helper named {name!r}") from e
    return int(mod.ffi.cast("uintptr_t", fn))


def module_path() -> str:
    """File of the built native module (AOT libraries resolve their helpers against it)."""
    return _native().__file__
