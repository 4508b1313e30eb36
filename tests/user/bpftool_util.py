"""Ground truth from the reference tools: bpftool's raw BTF dump, llvm-readelf, llvm-objdump.

Parsed with regular expressions, independently of hybrid's own parsers, so
that the tests compare hybrid against what the reference tools say.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass, field
from functools import lru_cache


def _tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/local/sbin")
    assert path, "%s not found" % name
    return path


def run(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


@dataclass
class RawType:
    id: int
    kind: str
    name: str  # "" for (anon)
    attrs: dict[str, str]
    items: list[tuple[str, dict[str, str]]] = field(default_factory=list)  # (name, attrs) per member/param/...


_HEAD = re.compile(r"^\[(\d+)\] (\w+) '(.*?)'(.*)$")
_ATTR = re.compile(r"(\w+)=([^\s,]+)")
_ITEM = re.compile(r"^\t'(.*?)' ?(.*)$")
_SECINFO = re.compile(r"^\ttype_id=(\d+) offset=(\d+) size=(\d+)")


def parse_raw(text: str) -> dict[int, RawType]:
    """``bpftool btf dump file X`` (raw format) -> {type id: RawType}."""
    out: dict[int, RawType] = {}
    cur: RawType | None = None
    for line in text.splitlines():
        m = _HEAD.match(line)
        if m:
            name = "" if m.group(3) == "(anon)" else m.group(3)
            cur = RawType(int(m.group(1)), m.group(2), name, dict(_ATTR.findall(m.group(4))))
            out[cur.id] = cur
            continue
        if cur is None or not line.startswith("\t"):
            continue
        m = _SECINFO.match(line)
        if m:
            cur.items.append(("", {"type_id": m.group(1), "offset": m.group(2), "size": m.group(3)}))
            continue
        m = _ITEM.match(line)
        if m:
            name = "" if m.group(1) == "(anon)" else m.group(1)
            cur.items.append((name, dict(_ATTR.findall(m.group(2)))))
    return out


@lru_cache(maxsize=8)
def btf_raw(path: str) -> dict[int, RawType]:
    return parse_raw(run(_tool("bpftool"), "btf", "dump", "file", path))


def raw_int(text: str) -> int:
    return int(re.sub(r"U?LL$", "", text), 0)


def raw_struct(raw: dict[int, RawType], name: str) -> RawType:
    for t in raw.values():
        if t.kind == "STRUCT" and t.name == name:
            return t
    raise KeyError(name)


def raw_member_offset(raw: dict[int, RawType], struct: str, path: str) -> int:
    """Byte offset of ``a.b.c`` in ``struct`` from the raw dump (through typedefs/anonymous members)."""

    def skip(tid: int) -> RawType:
        t = raw[tid]
        while t.kind in ("TYPEDEF", "CONST", "VOLATILE", "RESTRICT", "TYPE_TAG"):
            t = raw[int(t.attrs["type_id"])]
        return t

    def find(t: RawType, name: str) -> tuple[int, int] | None:
        for mname, a in t.items:
            if mname == name:
                return int(a["bits_offset"]), int(a["type_id"])
        for mname, a in t.items:
            if not mname:
                inner = skip(int(a["type_id"]))
                if inner.kind in ("STRUCT", "UNION"):
                    got = find(inner, name)
                    if got is not None:
                        return int(a["bits_offset"]) + got[0], got[1]
        return None

    t = raw_struct(raw, struct)
    bits = 0
    for part in path.split("."):
        got = find(t, part)
        assert got is not None, (struct, path, part)
        bits += got[0]
        t = skip(got[1])
    return bits // 8


@dataclass
class Symbol:
    value: int
    size: int
    type: str
    bind: str
    section: str
    name: str


def elf_symbols(path: str) -> list[Symbol]:
    """``llvm-readelf -s``, with section indices translated to names via ``llvm-readelf -S``."""
    secs = {}
    for line in run(_tool("llvm-readelf"), "-S", "-W", path).splitlines():
        m = re.match(r"\s*\[\s*(\d+)\]\s+(\S+)", line)
        if m:
            secs[m.group(1)] = m.group(2)
    out = []
    for line in run(_tool("llvm-readelf"), "-s", "-W", path).splitlines():
        m = re.match(r"\s*\d+:\s+([0-9a-f]+)\s+(\d+)\s+(\w+)\s+(\w+)\s+\w+\s+(\w+)\s*(.*)$", line)
        if m:
            out.append(Symbol(int(m.group(1), 16), int(m.group(2)), m.group(3), m.group(4),
                              secs.get(m.group(5), m.group(5)), m.group(6).strip()))
    return out


@dataclass
class Reloc:
    section: str  # the code section
    offset: int  # byte offset in the section
    type: str
    symbol: str


def code_relocations(path: str) -> list[Reloc]:
    """``llvm-objdump -r``: relocation records of every section."""
    out, sec = [], None
    for line in run(_tool("llvm-objdump"), "-r", path).splitlines():
        m = re.match(r"RELOCATION RECORDS FOR \[(.*)\]:", line)
        if m:
            sec = m.group(1)
            if sec.startswith(".rel"):
                sec = sec[4:]
            continue
        m = re.match(r"([0-9a-f]{16}) (\S+)\s+(\S+)", line)
        if m and sec is not None:
            out.append(Reloc(sec, int(m.group(1), 16), m.group(2), m.group(3)))
    return out
