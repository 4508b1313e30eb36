"""Only here because cffi's ``cffi_modules`` needs a setup.py; all metadata is in pyproject.toml.

Three native products: the cffi module hybrid._native (cffi_modules), the standalone probe agent
hybrid/libhybrid_agent*.so (a plain shared library of the same C sources, see _build.agent_extension)
and the interposer hybrid/libhybrid_preload*.so that `hybrid load` preloads (_build.preload_extension).
"""

import importlib.util
import os

from setuptools import setup
from setuptools.command.build_ext import build_ext


def _load_build():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hybrid", "native", "_build.py")
    spec = importlib.util.spec_from_file_location("_hybrid_native_build", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class _BuildExt(build_ext):
    """The agent is no Python module: export no PyInit_ symbol."""

    def copy_file(self, infile, outfile, *args, **kwargs):
        """Put a rebuilt library in place by renaming over the old one, never by rewriting it: processes
        running hybrid's agent (or the interposer) map the old file, and rewriting it under them crashes
        them.  Renamed over, the old file lives on for them until they exit."""
        if os.path.isfile(outfile):
            tmp = "%s.tmp-%d" % (outfile, os.getpid())
            _, copied = super().copy_file(infile, tmp, *args, **kwargs)
            os.replace(tmp, outfile)
            return outfile, copied
        return super().copy_file(infile, outfile, *args, **kwargs)

    def get_export_symbols(self, ext):
        if ext.name in ("hybrid.libhybrid_agent", "hybrid.libhybrid_preload"):
            return []
        return super().get_export_symbols(ext)


setup(
    cffi_modules=["hybrid/native/_build.py:ffibuilder"],
    ext_modules=[_load_build().agent_extension(), _load_build().preload_extension()],
    cmdclass={"build_ext": _BuildExt},
)
