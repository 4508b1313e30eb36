"""Only here because cffi's ``cffi_modules`` needs a setup.py; all metadata is in pyproject.toml."""

from setuptools import setup

setup(cffi_modules=["hybrid/native/_build.py:ffibuilder"])
