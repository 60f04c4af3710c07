"""Tests of stage 5 helpers: non-finite gradients, spike limit, non-finite parameters."""

from __future__ import annotations

import math

import pytest

from nanwatch.service.checks.catalog import Where
from nanwatch.service.checks import gradients
from nanwatch.service.thresholds import Thresholds
from nanwatch.v1 import nanwatch_pb2 as pb

WHERE = Where(run_id="run-a", rank=2, step=46)
THRESHOLDS = Thresholds()


def _report(grad_norm: float, *, bad_count: int = 0, norms: dict[str, float] | None = None) -> pb.StepReport:
    per_parameter = [pb.ParameterGradNorm(name=n, grad_norm=v) for n, v in (norms or {}).items()]
    return pb.StepReport(step=46, loss=2.0, grad_norm=grad_norm, nonfinite_grad_count=bad_count,
                         parameter_grad_norms=per_parameter, lr=1e-2)


@pytest.mark.parametrize("grad_norm", [0.0, 1.5, 1e6])
def test_finite_gradient_clean(grad_norm: float) -> None:
    assert not gradients.has_nonfinite_gradient(_report(grad_norm))


@pytest.mark.parametrize("grad_norm", [math.nan, math.inf, -math.inf])
def test_nonfinite_norm_detected(grad_norm: float) -> None:
    assert gradients.has_nonfinite_gradient(_report(grad_norm))


def test_nonfinite_count_detected() -> None:
    assert gradients.has_nonfinite_gradient(_report(1.0, bad_count=1))


def test_finding_names_parameters() -> None:
    norms = {"body.0.weight": 0.3, "var_logit.weight": math.nan, "var_logit.bias": math.inf}
    finding = gradients.nonfinite_gradient_finding(_report(math.nan, bad_count=2, norms=norms), WHERE, THRESHOLDS)
    assert finding.code == "GRAD_NONFINITE"
    assert finding.severity == pb.SEVERITY_CRITICAL
    assert "var_logit.weight, var_logit.bias" in finding.message
    assert "body.0.weight" not in finding.message
    assert finding.evidence.tensor == "var_logit.weight"
    assert "detect_anomaly" in finding.fix


def test_finding_lists_first_few() -> None:
    norms = {f"layer{i}.weight": math.nan for i in range(8)}
    finding = gradients.nonfinite_gradient_finding(_report(math.nan, norms=norms), WHERE, Thresholds(max_listed=3))
    assert "layer0.weight, layer1.weight, layer2.weight and 5 more" in finding.message


def test_limit_none_in_warmup() -> None:
    assert gradients.exploding_limit([1.0] * (THRESHOLDS.grad_warmup_steps - 1), THRESHOLDS) is None


def test_limit_none_for_zero_norms() -> None:
    assert gradients.exploding_limit([0.0] * 20, THRESHOLDS) is None


def test_limit_uses_median() -> None:
    history = [1.0] * 10 + [1000.0] * 3
    assert gradients.exploding_limit(history, THRESHOLDS) == pytest.approx(20.0)


def test_exploding_fix_without_clipping() -> None:
    finding = gradients.exploding_finding(_report(500.0), 20.0, None, WHERE, THRESHOLDS)
    assert finding.severity == pb.SEVERITY_WARNING
    assert "500x the median 1" in finding.message
    assert "clip_grad_norm_" in finding.fix


def test_exploding_fix_with_clipping() -> None:
    clipping = pb.ClippingInfo(enabled=True, max_norm=1.0, norm_type=2.0)
    finding = gradients.exploding_finding(_report(500.0), 20.0, clipping, WHERE, THRESHOLDS)
    assert "max_norm 1" in finding.fix


@pytest.mark.parametrize(("param_norm", "expected"), [(0.0, False), (12.5, False), (math.nan, True), (math.inf, True)])
def test_param_norm_nonfinite(param_norm: float, expected: bool) -> None:
    report = pb.StepReport(param_norm=param_norm)
    assert gradients.has_nonfinite_parameters(report) is expected
