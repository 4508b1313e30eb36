"""cffi build script for ``hybrid._native`` (API mode, out-of-line).

Used by setup.py through ``cffi_modules``; can also be run by hand
(``python hybrid/native/_build.py``) to build the module in place.
The cdef is the blocks between the ``cdef-begin``/``cdef-end`` markers of
the headers, so the prototypes are written once.
"""

from __future__ import annotations

import os

from cffi import FFI

_HERE = os.path.dirname(os.path.abspath(__file__))


def _read(name: str) -> str:
    with open(os.path.join(_HERE, name), encoding="utf-8") as f:
        return f.read()


def _listed(ext: str, marked: bool = False) -> tuple[str, ...]:
    """Every ``*.ext`` here (runtime first, then by name); with ``marked``, only files with a cdef block."""
    names = sorted(n for n in os.listdir(_HERE) if n.endswith(ext))
    if marked:
        names = [n for n in names if "/* cdef-begin */" in _read(n)]
    return tuple(sorted(names, key=lambda n: (not n.startswith("runtime."), n)))


# Every .c file is compiled; every header with cdef markers is in the cdef and included.
HEADERS = _listed(".h", marked=True)
SOURCES = _listed(".c")

# Python functions C calls back (consumers of ring buffers and perf buffers).
CALLBACKS = 'extern "Python" int _hybrid_py_sample(void *ctx, void *data, uint32_t size);'


def _cdef(header: str) -> str:
    with open(os.path.join(_HERE, header), encoding="utf-8") as f:
        text = f.read()
    begin = text.index("/* cdef-begin */") + len("/* cdef-begin */")
    end = text.index("/* cdef-end */")
    return text[begin:end]


def _rel(path: str) -> str:
    # setuptools wants source paths relative to the directory setup.py runs in.
    return os.path.relpath(path)


def agent_extension():
    """The standalone probe agent: every .c here, without Python, as ``hybrid/libhybrid_agent*.so``.

    It is only ever LD_PRELOADed or dlopen'd into a traced process (never imported, so no
    PyInit); HYBRID_AGENT_MAIN adds the constructor that applies $HYBRID_AGENT_SPEC.
    """
    from setuptools import Extension

    return Extension(
        "hybrid.libhybrid_agent",
        sources=[_rel(os.path.join(_HERE, s)) for s in SOURCES],
        include_dirs=[_rel(_HERE)],
        define_macros=[("HYBRID_AGENT_MAIN", "1")],
        libraries=["dl", "pthread"],
        extra_compile_args=["-O2", "-Wall", "-Werror=implicit-function-declaration", "-fvisibility=default"],
    )


def preload_extension():
    """``hybrid/libhybrid_preload*.so``: the interposer ``hybrid load`` preloads into libbpf programs
    (preload/preload.c, alone: it dlopens the agent for the map code)."""
    from setuptools import Extension

    return Extension(
        "hybrid.libhybrid_preload",
        sources=[_rel(os.path.join(_HERE, "preload", "preload.c"))],
        libraries=["dl", "pthread"],
        extra_compile_args=["-O2", "-Wall", "-Werror=implicit-function-declaration", "-fvisibility=default"],
    )


def build_agent(outdir: str, verbose: bool = False) -> str:
    """Build the standalone agent with the C compiler directly; returns the path of the .so."""
    import subprocess
    import sysconfig

    cc = os.environ.get("CC", "cc")
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    out = os.path.join(outdir, "libhybrid_agent" + suffix)
    cmd = [cc, "-shared", "-fPIC", "-O2", "-Wall", "-fvisibility=default", "-DHYBRID_AGENT_MAIN=1",
           "-I", _HERE, "-o", out] + [os.path.join(_HERE, s) for s in SOURCES] + ["-ldl", "-lpthread"]
    if verbose:
        print(" ".join(cmd))
    subprocess.run(cmd, check=True)
    return out


ffibuilder = FFI()
ffibuilder.cdef("\n".join(_cdef(h) for h in HEADERS) + "\n" + CALLBACKS)
ffibuilder.set_source(
    "hybrid._native",
    "".join('#include "%s"\n' % h for h in HEADERS),
    sources=[_rel(os.path.join(_HERE, s)) for s in SOURCES],
    include_dirs=[_rel(_HERE)],
    extra_compile_args=["-O2", "-Wall", "-Werror=implicit-function-declaration"],
)

if __name__ == "__main__":
    # Build in place: writes hybrid/_native*.so next to the package sources.
    ffibuilder.compile(tmpdir=os.path.dirname(os.path.dirname(_HERE)), verbose=True)
    build_agent(os.path.dirname(_HERE), verbose=True)
