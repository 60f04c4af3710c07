"""Tests of the CheckEngine: stage wiring, deduplication, per-rank state."""

from __future__ import annotations

import math

import numpy as np
import pytest

from nanwatch.service.engine import CheckEngine
from nanwatch.service.thresholds import Thresholds
from nanwatch.v1 import nanwatch_pb2 as pb

RUN = "run-engine"


def _linear(name: str, out_features: int, in_features: int) -> pb.ParameterInfo:
    bound = 1.0 / math.sqrt(in_features)
    values = np.random.default_rng(0).uniform(-bound, bound, size=(out_features, in_features))
    return pb.ParameterInfo(name=name, shape=[out_features, in_features], dtype="float32", numel=values.size,
                            mean=float(values.mean()), std=float(values.std()), min=float(values.min()),
                            max=float(values.max()), fan_in=in_features, module_type="Linear")


def _healthy_registration(rank: int = 0, **overrides: object) -> pb.RegisterRankRequest:
    fields: dict[str, object] = dict(
        run_id=RUN, rank=rank, world_size=2, loss_function="CrossEntropyLoss",
        parameters=[_linear("0.weight", 128, 64), _linear("2.weight", 10, 128)],
        forward_trace=[pb.ModuleCall(name="", type="Sequential"), pb.ModuleCall(name="0", type="Linear"),
                       pb.ModuleCall(name="1", type="ReLU"), pb.ModuleCall(name="2", type="Linear")],
        optimizer=pb.OptimizerInfo(type="SGD", lr=0.1, hyperparameters={"momentum": 0.9}),
    )
    fields.update(overrides)
    return pb.RegisterRankRequest(**fields)


def _step(step: int, grad_norm: float = 1.0, **overrides: object) -> pb.StepReport:
    fields: dict[str, object] = dict(step=step, loss=2.0, loss_finite=True, grad_norm=grad_norm, lr=0.1,
                                     param_norm=10.0, update_norm=0.01)
    fields.update(overrides)
    return pb.StepReport(**fields)


def test_healthy_run_silent() -> None:
    engine = CheckEngine()
    findings = engine.check_registration(_healthy_registration())
    rng = np.random.default_rng(0)
    for step in range(2000):
        norm = float(rng.lognormal(mean=0.0, sigma=0.5)) * (1.0 - step / 2500)  # noisy, slowly shrinking
        findings += engine.check_report(RUN, 0, _step(step, norm))
    assert findings == []


def test_adam_registration_silent() -> None:
    optimizer = pb.OptimizerInfo(type="Adam", lr=1e-3, hyperparameters={"eps": 1e-8, "beta1": 0.9})
    assert CheckEngine().check_registration(_healthy_registration(optimizer=optimizer)) == []


def test_evaluated_after_registration() -> None:
    engine = CheckEngine()
    engine.check_registration(_healthy_registration())
    evaluated = engine.evaluated_codes(RUN)
    assert {"INIT_NONFINITE", "INIT_SCALE", "LOSS_SIGMOID_BCE", "LR_TOO_HIGH"} <= evaluated
    assert "GRAD_NONFINITE" not in evaluated
    assert "OPTIMIZER_EPS_FP16" not in evaluated  # SGD has no eps


def test_static_findings_deduplicated() -> None:
    engine = CheckEngine()
    request = _healthy_registration(optimizer=pb.OptimizerInfo(type="Adam", lr=1.0))
    first = engine.check_registration(request)
    second = engine.check_registration(_healthy_registration(rank=1, optimizer=pb.OptimizerInfo(type="Adam", lr=1.0)))
    assert [f.code for f in first] == ["LR_TOO_HIGH"]
    assert second == []


def test_findings_ordered_by_stage() -> None:
    bad = _linear("0.weight", 128, 64)
    bad.nonfinite_count = 1
    request = _healthy_registration(
        parameters=[bad], optimizer=pb.OptimizerInfo(type="SGD", lr=100.0), loss_function="nll_loss",
        forward_trace=[pb.ModuleCall(name="0", type="Linear"), pb.ModuleCall(name="1", type="Softmax")])
    findings = CheckEngine().check_registration(request)
    assert [f.code for f in findings] == ["INIT_NONFINITE", "LOSS_SOFTMAX_LOG", "LR_TOO_HIGH"]


def test_trace_in_first_report() -> None:
    engine = CheckEngine()
    engine.check_registration(_healthy_registration(loss_function="BCELoss", forward_trace=[]))
    assert "LOSS_SIGMOID_BCE" not in engine.evaluated_codes(RUN)
    trace = [pb.ModuleCall(name="0", type="Linear"), pb.ModuleCall(name="1", type="Sigmoid")]
    [finding] = engine.check_report(RUN, 0, _step(0, forward_trace=trace))
    assert finding.code == "LOSS_SIGMOID_BCE"
    assert finding.evidence.step == -1
    assert engine.check_report(RUN, 0, _step(1, forward_trace=trace)) == []


def test_batch_summary_nan() -> None:
    engine = CheckEngine()
    summary = pb.TensorSummary(name="targets", shape=[16, 1], nan_count=1, nonfinite_sample_indices=[5])
    findings = engine.check_report(RUN, 1, _step(10, loss=math.nan, loss_finite=False, batch=[summary]))
    assert [f.code for f in findings] == ["DATA_NONFINITE", "LOSS_NONFINITE"]
    assert findings[0].evidence.rank == 1


@pytest.mark.parametrize("grad_norm", [math.nan, math.inf])
def test_nonfinite_gradient_every_step(grad_norm: float) -> None:
    engine = CheckEngine()
    for step in range(3):
        [finding] = engine.check_report(RUN, 0, _step(step, grad_norm, nonfinite_grad_count=1))
        assert finding.code == "GRAD_NONFINITE"
        assert finding.evidence.step == step


def test_spike_reported_once() -> None:
    engine = CheckEngine()
    for step in range(20):
        assert engine.check_report(RUN, 0, _step(step, 1.0)) == []
    [finding] = engine.check_report(RUN, 0, _step(20, 100.0))
    assert finding.code == "GRAD_EXPLODING"
    assert finding.evidence.values["ratio"] == "100"
    assert engine.check_report(RUN, 0, _step(21, 300.0)) == []
    assert engine.check_report(RUN, 0, _step(22, 1.0)) == []
    assert len(engine.check_report(RUN, 0, _step(23, 100.0))) == 1


def test_spike_history_per_rank() -> None:
    engine = CheckEngine()
    for step in range(20):
        engine.check_report(RUN, 0, _step(step, 1.0))
        engine.check_report(RUN, 1, _step(step, 100.0))
    assert engine.check_report(RUN, 1, _step(20, 150.0)) == []


def test_no_spike_during_warmup() -> None:
    engine = CheckEngine()
    engine.check_report(RUN, 0, _step(0, 1.0))
    assert engine.check_report(RUN, 0, _step(1, 1000.0)) == []
    assert "GRAD_EXPLODING" not in engine.evaluated_codes(RUN)


def test_scaler_skips_tolerated() -> None:
    engine = CheckEngine(Thresholds(grad_scaler_skip_limit=3))
    scale = 65536.0
    for step in range(2):
        assert engine.check_report(RUN, 0, _step(step, math.inf, loss_scale=scale)) == []
        scale /= 2
    assert engine.check_report(RUN, 0, _step(2, 1.0, loss_scale=scale)) == []
    for step in range(3, 5):
        assert engine.check_report(RUN, 0, _step(step, math.inf, loss_scale=scale)) == []
    [finding] = engine.check_report(RUN, 0, _step(5, math.inf, loss_scale=scale))
    assert finding.code == "GRAD_NONFINITE"
    assert "skipped 3 steps in a row" in finding.message


def test_param_nonfinite_once() -> None:
    engine = CheckEngine()
    [finding] = engine.check_report(RUN, 0, _step(0, 0.5, param_norm=math.nan))
    assert finding.code == "PARAM_NONFINITE"
    assert finding.severity == pb.SEVERITY_WARNING
    assert engine.check_report(RUN, 0, _step(1, 0.5, param_norm=math.nan)) == []


def test_param_nonfinite_left_to_gradients() -> None:
    findings = CheckEngine().check_report(RUN, 0, _step(0, math.nan, param_norm=math.nan))
    assert [f.code for f in findings] == ["GRAD_NONFINITE"]


def test_check_batch_marks_evaluated() -> None:
    engine = CheckEngine()
    batch = {"inputs": np.array([[0.0, np.inf]], dtype=np.float32)}
    [finding] = engine.check_batch(RUN, 0, 4, batch, [77])
    assert list(finding.evidence.sample_indices) == [77]
    assert "DATA_NONFINITE" in engine.evaluated_codes(RUN)


def test_forget_run_clears_state() -> None:
    engine = CheckEngine()
    request = _healthy_registration(optimizer=pb.OptimizerInfo(type="Adam", lr=1.0))
    engine.check_registration(request)
    engine.forget_run(RUN)
    assert engine.evaluated_codes(RUN) == set()
    assert [f.code for f in engine.check_registration(request)] == ["LR_TOO_HIGH"]


def test_runs_isolated() -> None:
    engine = CheckEngine()
    request = _healthy_registration(optimizer=pb.OptimizerInfo(type="Adam", lr=1.0))
    engine.check_registration(request)
    request.run_id = "other-run"
    assert len(engine.check_registration(request)) == 1
