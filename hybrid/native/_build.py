"""cffi build script for ``hybrid._native`` (API mode, out-of-line).

Used by setup.py through ``cffi_modules``; can also be run by hand
(``python hybrid/native/_build.py``) to build the module in place.
The cdef is the block between the ``cdef-begin``/``cdef-end`` markers of
runtime.h, so the prototypes are written once.
"""

from __future__ import annotations

import os

from cffi import FFI

_HERE = os.path.dirname(os.path.abspath(__file__))


def _cdef() -> str:
    with open(os.path.join(_HERE, "runtime.h"), encoding="utf-8") as f:
        text = f.read()
    begin = text.index("/* cdef-begin */") + len("/* cdef-begin */")
    end = text.index("/* cdef-end */")
    return text[begin:end]


def _rel(path: str) -> str:
    # setuptools wants source paths relative to the directory setup.py runs in.
    return os.path.relpath(path)


ffibuilder = FFI()
ffibuilder.cdef(_cdef())
ffibuilder.set_source(
    "hybrid._native",
    '#include "runtime.h"',
    sources=[_rel(os.path.join(_HERE, "runtime.c"))],
    include_dirs=[_rel(_HERE)],
    extra_compile_args=["-O2", "-Wall"],
)

if __name__ == "__main__":
    # Build in place: writes hybrid/_native*.so next to the package sources.
    ffibuilder.compile(tmpdir=os.path.dirname(os.path.dirname(_HERE)), verbose=True)
