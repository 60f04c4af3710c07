"""Tests of the check catalog and the Finding builder."""

from __future__ import annotations

import math

import pytest

from nanwatch.service.checks.catalog import CHECKS, Where, format_number, new_finding, spec_for
from nanwatch.v1 import nanwatch_pb2 as pb


def test_codes_unique() -> None:
    codes = [spec.code for spec in CHECKS]
    assert len(codes) == len(set(codes))


def test_ordered_by_stage() -> None:
    stages = [spec.stage for spec in CHECKS]
    assert stages == sorted(stages)


def test_every_stage_covered() -> None:
    assert {spec.stage for spec in CHECKS} == {1, 2, 3, 4, 5, 6}


def test_unknown_code_named() -> None:
    with pytest.raises(KeyError, match="NOPE"):
        spec_for("NOPE")


@pytest.mark.parametrize(("value", "text"), [(math.nan, "nan"), (math.inf, "inf"), (-math.inf, "-inf"), (0.0, "0"), (1e-8, "1e-08")])
def test_format_number(value: float, text: str) -> None:
    assert format_number(value) == text


def test_new_finding_fills_evidence() -> None:
    finding = new_finding("GRAD_EXPLODING", pb.SEVERITY_WARNING, Where(run_id="r", rank=3, step=9),
                          message="m", fix="f", tensor="t", layer="l", values={"k": "v"}, sample_indices=[1])
    assert finding.stage == pb.STAGE_GRADIENTS
    assert finding.evidence.rank == 3
    assert finding.evidence.values["k"] == "v"
    assert finding.id == ""
    assert finding.created_unix_s == 0.0
