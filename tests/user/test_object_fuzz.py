"""Fuzzing hybrid.load(): real clang-compiled objects, mutated, then loaded and run on the interpreter.

Whatever the bytes, ``hybrid.load()`` either refuses them with a
HybridError or gives an object whose every program runs to its end or stops
with a HybridError (a VmError, the step limit); nothing else escapes, and
the process does not crash.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import os
from io import BytesIO

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import hybrid
from hybrid.errors import HybridError
from hybrid.native import _native
from hybrid.user.helpers import ALL_HELPERS, HelperSpec
from hybrid.user.interp import Interpreter
from tests.user.object_util import U64, pt_regs

OBJECTS = ("maps_all", "helpers_mem", "helpers_info", "helpers_probe")

# Helpers that act on the process by design are stubbed out (-EPERM): a mutated program could
# ask to SIGKILL the test run or to write over Python's memory, which is no crash of hybrid.
_STUBBED = {36: "probe_write_user", 109: "send_signal", 117: "send_signal_thread"}
SAFE_HELPERS = {**ALL_HELPERS, **{i: HelperSpec(i, n, lambda mem, *a: -errno.EPERM & U64) for i, n in _STUBBED.items()}}

_buffer = ctypes.create_string_buffer(b"a readable string\0" + bytes(100))
ARG = st.sampled_from([0, 1, 2, 3, 5, 7, 16, 64, 4096, 0xFFFFFFFF, 1 << 63, U64, ctypes.addressof(_buffer)])


def _parsed_ranges(raw: bytes) -> list[tuple[int, int]]:
    """(offset, size) of what the loader reads: the ELF header, the section headers, and the sections
    with code, BTF, symbols, relocations, maps and global data (not DWARF)."""
    from elftools.elf.elffile import ELFFile

    elf = ELFFile(BytesIO(raw))
    out = [(0, 64), (elf.header["e_shoff"], elf.header["e_shnum"] * elf.header["e_shentsize"])]
    for s in elf.iter_sections():
        name = s.name
        if "debug" in name or s["sh_type"] == "SHT_NOBITS" or not s["sh_size"]:
            continue
        loaded = name in (".BTF", ".BTF.ext", ".symtab", ".strtab", ".maps")
        if loaded or name.startswith((".rel", ".data", ".rodata")) or s["sh_flags"] & 4:  # 4: SHF_EXECINSTR
            out.append((s["sh_offset"], s["sh_size"]))
    return out


@pytest.fixture(scope="module")
def corpus(bpf_build) -> dict[str, tuple[bytes, list[tuple[int, int]]]]:
    out = {}
    for name in OBJECTS:
        raw = bpf_build.obj(name).read_bytes()
        out[name] = (raw, _parsed_ranges(raw))
    return out


@pytest.fixture(scope="module")
def quiet_trace():
    """trace_printk lines of the mutated programs go to /dev/null, not to the shared trace file."""
    lib = _native().lib
    fd = os.open(os.devnull, os.O_WRONLY)
    lib.hybrid_trace_set_fd(fd)
    yield
    lib.hybrid_trace_set_fd(-1)
    os.close(fd)


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(OBJECTS), data=st.data())
def test_mutated_objects_load_and_run_or_fail_cleanly(corpus, quiet_trace, name, data):
    raw, ranges = corpus[name]
    raw = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 4), label="mutations")):
        if data.draw(st.booleans(), label="anywhere"):
            pos = data.draw(st.integers(0, len(raw) - 1), label="pos")
        else:
            start, size = data.draw(st.sampled_from(ranges), label="range")
            pos = start + data.draw(st.integers(0, size - 1), label="pos")
        if data.draw(st.booleans(), label="bit flip"):
            raw[pos] ^= 1 << data.draw(st.integers(0, 7), label="bit")
        else:
            raw[pos] = data.draw(st.integers(0, 255) | st.sampled_from([0, 0xFF, 0x7F, 0x80]), label="byte")
    if data.draw(st.integers(0, 7), label="truncate?") == 0:
        raw = raw[:data.draw(st.integers(0, len(raw)), label="length")]
    try:
        obj = hybrid.load(bytes(raw))
    except HybridError as e:
        event("refused: %s" % type(e).__name__)  # --hypothesis-show-statistics
        return
    event("loaded")
    with obj:
        for lp in obj.programs.values():
            prog = dataclasses.replace(lp.program, helpers=SAFE_HELPERS)
            ctx = bytearray(pt_regs(*data.draw(st.lists(ARG, min_size=6, max_size=6), label="args")))
            try:
                Interpreter(prog, max_steps=3000).run(ctx)
            except HybridError as e:
                event("run stopped: %s" % type(e).__name__)
