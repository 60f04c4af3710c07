"""Tests of stage 6: a non-finite loss."""

from __future__ import annotations

import math

import pytest

from nanwatch.service.checks.catalog import Where
from nanwatch.service.checks.monitoring import check_loss
from nanwatch.v1 import nanwatch_pb2 as pb

WHERE = Where(run_id="run-a", rank=0, step=7)


@pytest.mark.parametrize("loss", [math.nan, math.inf, -math.inf])
def test_nonfinite_loss_critical(loss: float) -> None:
    [finding] = check_loss(pb.StepReport(step=7, loss=loss, loss_finite=False), WHERE)
    assert finding.code == "LOSS_NONFINITE"
    assert finding.severity == pb.SEVERITY_CRITICAL
    assert finding.stage == pb.STAGE_MONITORING
    assert "at step 7" in finding.message
    assert finding.evidence.values["loss"] == ("nan" if math.isnan(loss) else str(loss))


@pytest.mark.parametrize("loss", [0.0, 2.3, -1.0, 1e30])
def test_finite_loss_silent(loss: float) -> None:
    assert check_loss(pb.StepReport(step=7, loss=loss, loss_finite=True), WHERE) == []


def test_unset_loss_finite_flag_ignored() -> None:
    assert check_loss(pb.StepReport(step=7, loss=2.3), WHERE) == []


def test_unobserved_loss_silent() -> None:
    # A rank that observed no loss in the step sends loss=NaN with loss_finite=true.
    assert check_loss(pb.StepReport(step=7, loss=math.nan, loss_finite=True), WHERE) == []
