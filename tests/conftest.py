"""Shared fixtures and helpers of the test suite."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONFORMANCE = Path(os.environ.get("HYBRID_CONFORMANCE", ROOT.parent / "shared" / "bpf_conformance"))
ENGINES = ("interp", "jit", "aot")


def conformance_files(sub: str) -> list[Path]:
    d = CONFORMANCE / sub
    return sorted(d.glob("*.data")) if d.is_dir() else []


def pytest_report_header(config):
    return "conformance vectors: %s (%d)" % (CONFORMANCE, len(conformance_files("tests")))


@pytest.fixture(scope="session")
def conformance_dir() -> Path:
    if not (CONFORMANCE / "tests").is_dir():
        pytest.skip("bpf_conformance vectors not found at %s (set HYBRID_CONFORMANCE)" % CONFORMANCE)
    return CONFORMANCE
