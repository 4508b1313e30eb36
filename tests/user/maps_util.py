"""Shared helpers of the map tests."""

from __future__ import annotations

import pytest

from hybrid.user.maps import MapSpec, Region


def k(i: int, size: int = 4) -> bytes:
    """Little-endian integer key."""
    return i.to_bytes(size, "little")


def u64(i: int) -> bytes:
    return i.to_bytes(8, "little")


def as_int(b: bytes) -> int:
    return int.from_bytes(b, "little")


class Regions:
    """Creates regions and closes them at the end of the test."""

    def __init__(self):
        self.open: list[Region] = []

    def __call__(self, *specs: MapSpec, **kw) -> Region:
        r = Region(list(specs), **kw)
        self.open.append(r)
        return r

    def one(self, spec: MapSpec, **kw):
        return self(spec, **kw)[spec.name]

    def close(self):
        for r in self.open:
            r.close()


@pytest.fixture
def regions():
    r = Regions()
    yield r
    r.close()
