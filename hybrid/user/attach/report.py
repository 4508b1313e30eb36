"""Printing what attached programs collected: maps as ``@name[key]: value`` lines."""

from __future__ import annotations

# Maps that are machinery, not results.
_HIDDEN_PREFIXES = (".", "__bpf_usdt")
_RING_TYPES = {27, 4}  # RINGBUF, PERF_EVENT_ARRAY: consumed, not dumped


def _value(b: bytes) -> str:
    if len(b) in (1, 2, 4, 8):
        return str(int.from_bytes(b, "little"))
    return b.hex()


def _key(b: bytes) -> str:
    if len(b) in (1, 2, 4, 8):
        return str(int.from_bytes(b, "little"))
    return b.hex()


def _map_type(m) -> int:
    spec = getattr(m, "spec", None)  # a map of the region; a kernel map has its type itself
    return spec.type if spec is not None else m.type


def format_maps(obj, limit: int = 1000) -> str:
    """Every non-empty result map of ``obj``; per-CPU values are summed when they are integers."""
    lines = []
    for name, m in sorted(obj.maps.items()):
        if name.startswith(_HIDDEN_PREFIXES) or _map_type(m) in _RING_TYPES:
            continue
        rows = []
        try:
            items = list(m.items())
        except Exception:  # noqa: BLE001 - maps without iteration (queues, stacks) are skipped
            continue
        for k, v in items[:limit]:
            if isinstance(v, list):  # per-CPU
                v = sum(int.from_bytes(x, "little") for x in v).to_bytes(8, "little") \
                    if all(len(x) <= 8 for x in v) else b"".join(v)
            elif not isinstance(v, (bytes, bytearray)):
                continue
            if _map_type(m) == 2 and not any(v):  # arrays: skip zero slots
                continue
            rows.append("@%s[%s]: %s" % (name, _key(k), _value(bytes(v))))
        if rows:
            lines.extend(rows)
            if len(items) > limit:
                lines.append("@%s: ... %d more" % (name, len(items) - limit))
    return "\n".join(lines)
