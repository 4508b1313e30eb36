"""x86-64 syscall numbers and the kernel's syscall tracepoint formats (tracefs).

Syscall programs in the target get the same record as the kernel's
``syscalls/sys_enter_NAME`` / ``sys_exit_NAME`` tracepoints; their event ids and
field layouts come from tracefs so programs compiled against them agree.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from typing import NamedTuple

from hybrid.errors import AttachError

UNISTD_64 = ("/usr/include/x86_64-linux-gnu/asm/unistd_64.h", "/usr/include/asm/unistd_64.h")
TRACEFS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")


@functools.lru_cache(maxsize=1)
def syscall_table() -> dict[str, int]:
    """name -> number, from ``asm/unistd_64.h`` (bcc's table when the header is missing)."""
    for path in UNISTD_64:
        try:
            with open(path) as f:
                text = f.read()
        except OSError:
            continue
        table = {m.group(1): int(m.group(2)) for m in re.finditer(r"^#define __NR_(\w+)\s+(\d+)\s*$", text, re.M)}
        if table:
            return table
    try:
        from bcc import syscall as bcc_syscall  # type: ignore[import-not-found]
    except ImportError:
        raise AttachError("no x86-64 syscall table: none of %s exists (install linux-libc-dev) and bcc is "
                          "not installed" % ", ".join(UNISTD_64)) from None
    return {(v.decode() if isinstance(v, bytes) else v): k for k, v in bcc_syscall.syscalls.items()}


def syscall_number(name: str) -> int:
    """The x86-64 number of syscall NAME (``openat``; a ``sys_`` prefix is accepted)."""
    table = syscall_table()
    nr = table.get(name)
    if nr is None and name.startswith("sys_"):
        nr = table.get(name[4:])
    if nr is None:
        raise AttachError("unknown x86-64 syscall %r" % name)
    return nr


def syscall_name(nr: int) -> str:
    for k, v in syscall_table().items():
        if v == nr:
            return k
    raise AttachError("no x86-64 syscall has number %d" % nr)


# --- tracefs ----------------------------------------------------------------------


@dataclass(frozen=True)
class Field:
    name: str
    type: str  # C type as written ("const char *", "int", "unsigned long[6]")
    offset: int
    size: int
    signed: bool


@dataclass(frozen=True)
class EventFormat:
    category: str
    event: str
    id: int
    fields: tuple[Field, ...]

    def field(self, name: str) -> Field:
        for f in self.fields:
            if f.name == name:
                return f
        raise AttachError("tracepoint %s/%s has no field %r" % (self.category, self.event, name))


def tracefs_root() -> str:
    """The mounted tracefs directory (``/sys/kernel/tracing`` or the debugfs one)."""
    for d in TRACEFS:
        if os.path.isdir(os.path.join(d, "events")):
            return d
    raise AttachError("tracefs is not mounted: none of %s has an events/ directory "
                      "(mount -t tracefs nodev /sys/kernel/tracing)" % ", ".join(TRACEFS))


_FIELD = re.compile(r"^\s*field:(.*?);\s*offset:(\d+);\s*size:(\d+);\s*signed:(\d+);", re.M)


def parse_format(text: str, category: str = "", event: str = "") -> EventFormat:
    """A tracefs ``format`` file's event id and fields."""
    m = re.search(r"^ID:\s*(\d+)", text, re.M)
    if not m:
        raise AttachError("tracepoint %s/%s: format has no ID line" % (category, event))
    fields = []
    for fm in _FIELD.finditer(text):
        decl = fm.group(1).strip()
        dm = re.match(r"^(.*?)\s*\b(\w+)\s*((?:\[[^\]]*\])*)$", decl)
        if not dm:
            raise AttachError("tracepoint %s/%s: cannot parse field %r" % (category, event, decl))
        ctype = (dm.group(1) + dm.group(3)).strip()
        fields.append(Field(dm.group(2), ctype, int(fm.group(2)), int(fm.group(3)), fm.group(4) != "0"))
    return EventFormat(category, event, int(m.group(1)), tuple(fields))


def tracepoint_format(category: str, event: str) -> EventFormat:
    """Event id and fields of tracepoint CATEGORY/EVENT from tracefs."""
    if not re.fullmatch(r"[\w.-]+", category or "") or not re.fullmatch(r"[\w.-]+", event or ""):
        raise AttachError("invalid tracepoint name %r/%r" % (category, event))
    root = tracefs_root()
    path = os.path.join(root, "events", category, event, "format")
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        raise AttachError("no tracepoint %s/%s (%s does not exist)" % (category, event, path)) from None
    except OSError as e:
        raise AttachError("cannot read %s: %s" % (path, e.strerror or e)) from None
    return parse_format(text, category, event)


class SyscallEvent(NamedTuple):
    """``(nr, event_id, fields)`` of a syscall tracepoint."""

    nr: int
    event_id: int
    fields: tuple[Field, ...]


def _sys_event(name: str, kind: str) -> SyscallEvent:
    base = name[4:] if name.startswith("sys_") and name not in syscall_table() else name
    nr = syscall_number(base)
    try:
        fmt = tracepoint_format("syscalls", "sys_%s_%s" % (kind, base))
    except AttachError as e:
        if "no tracepoint" not in str(e):
            raise
        raise AttachError("syscall %r (nr %d) has no syscalls/sys_%s_%s tracepoint in this kernel"
                          % (base, nr, kind, base)) from None
    return SyscallEvent(nr, fmt.id, fmt.fields)


def sys_enter_event(name: str) -> SyscallEvent:
    """(nr, event id, fields) of ``syscalls/sys_enter_NAME``."""
    return _sys_event(name, "enter")


def sys_exit_event(name: str) -> SyscallEvent:
    """(nr, event id, fields) of ``syscalls/sys_exit_NAME``."""
    return _sys_event(name, "exit")
