"""Planning checks that need no target: the syscall record layout against tracefs."""

from __future__ import annotations

import pytest

from hybrid.errors import HybridError
from hybrid.user.attach import syscalls
from hybrid.user.attach.agent import _record_layout_problem
from hybrid.user.attach.syscalls import Field


def _events():
    try:
        return [syscalls.sys_enter_event(n) for n in ("openat", "read", "getppid", "mmap")], \
            [syscalls.sys_exit_event(n) for n in ("openat", "read", "getppid")]
    except HybridError as e:
        pytest.skip("no syscall tracepoints here: %s" % e)


def test_the_kernels_syscall_records_match_the_agents():
    enters, exits = _events()
    for ev in enters:
        assert _record_layout_problem(ev.fields, "enter") is None
    for ev in exits:
        assert _record_layout_problem(ev.fields, "exit") is None


def test_a_different_layout_is_named():
    common = [Field("common_type", "unsigned short", 0, 2, False), Field("common_flags", "unsigned char", 2, 1, False),
              Field("common_preempt_count", "unsigned char", 3, 1, False), Field("common_pid", "int", 4, 4, True),
              Field("__syscall_nr", "int", 8, 4, True)]
    assert _record_layout_problem(common + [Field("fd", "int", 16, 4, False)], "enter") == \
        "argument fd at offset 16 size 4"
    assert _record_layout_problem(common + [Field("ret", "long", 24, 8, True)], "exit") == "ret at offset 24 size 8"
    moved = [Field("common_type", "unsigned short", 0, 2, False), Field("__syscall_nr", "int", 12, 4, True)]
    assert _record_layout_problem(moved, "enter") == "__syscall_nr at offset 12 size 4"
