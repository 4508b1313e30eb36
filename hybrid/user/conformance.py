"""Runs bpf_conformance ``.data`` vectors against any engine.

A vector is parsed into a :class:`Case` (program bytes, input memory,
expected ``r0`` or expected refusal), then :func:`run_case` loads it through
the verifier and runs it on the chosen engine.  The same functions serve
``hybrid conformance`` and the parametrized test suite.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from hybrid.errors import ConformanceFormatError, HybridError
from hybrid.user.asm import assemble

# section kinds as the upstream runner finds them, in its order
_SECTION_KINDS = ("asm", "result", "mem", "raw", "no register offset", "c", "error")


@dataclass(frozen=True)
class Case:
    name: str
    code: bytes | None  # None when the program does not assemble
    mem: bytes
    result: int | None
    expect_error: bool  # an "-- error" section: the load must fail
    asm_error: str | None = None


@dataclass(frozen=True)
class Outcome:
    case: Case
    passed: bool
    reason: str = ""


def _sections(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    current: str | None = None
    for raw in text.splitlines():
        line = raw.rstrip("\r").split("#", 1)[0]
        if "--" in line:
            header = line.split("--", 1)[1].strip()
            current = next((k for k in _SECTION_KINDS if header == k), "unknown:" + header)
            out.setdefault(current, [])
            continue
        if current is not None and line.strip():
            out[current].append(line.strip())
    return out


def _raw_bytes(tokens: list[str]) -> bytes:
    """``-- raw``: u64 words (``0x...``), or 8 hex bytes a line in memory order."""
    if tokens and all(re.fullmatch(r"[0-9A-Fa-f]{2}", t) for t in tokens):
        return bytes(int(t, 16) for t in tokens)
    return b"".join((int(t, 0) & ((1 << 64) - 1)).to_bytes(8, "little") for t in tokens)


def parse_case(path: str | Path) -> Case:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConformanceFormatError("%s: cannot read: %s" % (path, e.strerror)) from None
    sec = _sections(text)
    unknown = [k for k in sec if k.startswith("unknown:")]
    if unknown:
        raise ConformanceFormatError("%s: unknown section %r" % (path.name, unknown[0][8:]))
    if "result" not in sec and "error" not in sec:
        raise ConformanceFormatError("%s: neither a '-- result' nor an '-- error' section" % path.name)
    result = None
    if sec.get("result"):
        last = sec["result"][-1]
        try:
            result = int(last, 16) if "0x" in last else int(last, 10)
        except ValueError:
            raise ConformanceFormatError("%s: bad result %r" % (path.name, last)) from None
    try:
        mem = bytes(int(t, 16) for t in " ".join(sec.get("mem", [])).split())
    except ValueError:
        raise ConformanceFormatError("%s: bad '-- mem' byte" % path.name) from None
    code, asm_error = None, None
    try:
        if "raw" in sec:
            code = _raw_bytes(" ".join(sec["raw"]).split())
        elif "asm" in sec:
            code = assemble("\n".join(sec["asm"]))
        else:
            raise ConformanceFormatError("%s: no program ('-- asm' or '-- raw')" % path.name)
    except HybridError as e:
        if isinstance(e, ConformanceFormatError):
            raise
        asm_error = str(e)
    except ValueError as e:
        asm_error = "bad raw word: %s" % e
    return Case(path.name, code, mem, result, "error" in sec, asm_error)


def run_case(case: Case, engine: str) -> Outcome:
    """Load ``case`` through the verifier and run it on ``engine``."""
    from hybrid.user.engine import create_engine
    from hybrid.user.program import Program

    if case.asm_error is not None:
        if case.expect_error:
            return Outcome(case, True, "refused: " + case.asm_error)
        return Outcome(case, False, "does not assemble: " + case.asm_error)
    try:
        prog = Program.load(case.code, name=case.name)
    except HybridError as e:
        if case.expect_error:
            return Outcome(case, True, "refused: %s" % e)
        return Outcome(case, False, "refused at load: %s" % e)
    if case.expect_error:
        return Outcome(case, False, "expected the load to fail, but the program was accepted")
    try:
        with create_engine(engine, prog) as eng:
            r0 = eng.run(bytearray(case.mem))
    except HybridError as e:
        return Outcome(case, False, "%s: %s" % (type(e).__name__, e))
    if r0 != case.result:
        return Outcome(case, False, "r0 = %#x, expected %#x" % (r0, case.result))
    return Outcome(case, True)


def case_files(directory: str | Path) -> list[Path]:
    d = Path(directory)
    if not d.is_dir():
        raise ConformanceFormatError("%s: not a directory" % d)
    return sorted(d.glob("*.data"))


def run_directory(directory: str | Path, engine: str):
    """Yields an :class:`Outcome` per ``.data`` file, in name order."""
    for path in case_files(directory):
        try:
            case = parse_case(path)
        except ConformanceFormatError as e:
            yield Outcome(Case(path.name, None, b"", None, False), False, str(e))
            continue
        yield run_case(case, engine)
