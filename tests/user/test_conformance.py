"""Every bpf_conformance vector on every engine, and the negative vectors."""

from __future__ import annotations

import pytest

from hybrid.user.conformance import parse_case, run_case
from tests.conftest import ENGINES, conformance_files

VECTORS = conformance_files("tests")
UNUSED_FIELD = [p for p in conformance_files("negative") if p.name.startswith("unused-")]


def test_the_vectors_are_there(conformance_dir):
    # the suite is pinned at 313 vectors and 45 unused-field vectors
    assert len(VECTORS) == 313
    assert len(UNUSED_FIELD) == 45


@pytest.mark.parametrize(
    "path,engine",
    [(p, e) for p in VECTORS for e in ENGINES],
    ids=["%s[%s]" % (p.stem, e) for p in VECTORS for e in ENGINES],
)
def test_vector(path, engine):
    outcome = run_case(parse_case(path), engine)
    assert outcome.passed, outcome.reason


@pytest.mark.parametrize("path", UNUSED_FIELD, ids=[p.stem for p in UNUSED_FIELD])
def test_unused_field_is_refused_at_load(path):
    case = parse_case(path)
    assert case.expect_error and case.code
    outcome = run_case(case, "interp")
    assert outcome.passed, outcome.reason
    # the refusal names the instruction and the field
    assert outcome.reason.startswith("refused: insn #0 (")
    assert "field must be 0" in outcome.reason or "invalid off" in outcome.reason
