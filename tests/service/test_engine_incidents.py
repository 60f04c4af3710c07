"""Tests of the engine's new wiring and of the primary cause over realistic incidents."""

from __future__ import annotations

import math

import pytest

from nanwatch.service.checks.catalog import Where, new_finding
from nanwatch.service.diagnosis import choose_primary
from nanwatch.service.engine import CheckEngine
from nanwatch.v1 import nanwatch_pb2 as pb

RUN = "run-incident"


def _register(engine: CheckEngine, **fields: object) -> list[pb.Finding]:
    values: dict[str, object] = dict(run_id=RUN, rank=0, world_size=1, loss_function="CrossEntropyLoss",
                                     optimizer=pb.OptimizerInfo(type="Adam", lr=1e-3, hyperparameters={"eps": 1e-8}))
    values.update(fields)
    return engine.check_registration(pb.RegisterRankRequest(**values))


def _step(step: int, **fields: object) -> pb.StepReport:
    values: dict[str, object] = dict(step=step, loss=1.0, loss_finite=True, grad_norm=1.0, param_norm=5.0,
                                     update_norm=math.nan, lr=1e-3, output_checked=True, output_finite=True)
    values.update(fields)
    return pb.StepReport(**values)


def test_first_forward_targets_out_of_range() -> None:
    engine = CheckEngine()
    _register(engine)
    trace = [pb.ModuleCall(name="0", type="Linear")]
    engine.check_report(RUN, 0, _step(0, forward_trace=trace, output_shape=[16, 10]))
    targets = pb.TensorSummary(name="targets", dtype="int64", shape=[16], min=1, max=10)
    findings = engine.check_report(RUN, 0, _step(1, batch=[targets]))
    assert [f.code for f in findings] == ["DATA_TARGET_RANGE"]


def test_autocast_without_scaler_once() -> None:
    engine = CheckEngine()
    _register(engine)
    trace = [pb.ModuleCall(name="0", type="Linear")]
    first = engine.check_report(RUN, 0, _step(0, forward_trace=trace, autocast_dtype="float16"))
    assert [f.code for f in first] == ["AMP_NO_SCALER"]
    assert engine.check_report(RUN, 0, _step(1, forward_trace=trace, autocast_dtype="float16")) == []


def test_autocast_with_seen_scaler_silent() -> None:
    engine = CheckEngine()
    _register(engine)
    trace = [pb.ModuleCall(name="0", type="Linear")]
    assert engine.check_report(RUN, 0, _step(0, forward_trace=trace, autocast_dtype="float16", loss_scale=65536.0)) == []


def test_single_spike_info_sustained_warning() -> None:
    engine = CheckEngine()
    _register(engine)
    for step in range(20):
        engine.check_report(RUN, 0, _step(step))
    severities = [f.severity for step in range(20, 23)
                  for f in engine.check_report(RUN, 0, _step(step, grad_norm=100.0 + step))
                  if f.code == "GRAD_EXPLODING"]
    assert severities == [pb.SEVERITY_INFO, pb.SEVERITY_WARNING]


def test_healthy_new_client_silent() -> None:
    engine = CheckEngine()
    findings = _register(engine)
    for step in range(300):
        noise = 1.0 + 0.3 * math.sin(step * 1.7)
        findings += engine.check_report(RUN, 0, _step(step, loss=2.0 / (1 + step / 50) * noise, grad_norm=noise,
                                                      update_norm=0.01 if step % 10 == 1 else math.nan))
    assert findings == []


def test_where_trap_primary_stage3() -> None:
    engine = CheckEngine()
    findings = _register(engine)
    for step in range(46):
        findings += engine.check_report(RUN, 0, _step(step))
    norms = [pb.ParameterGradNorm(name="var_logit.weight", grad_norm=math.nan),
             pb.ParameterGradNorm(name="mu.weight", grad_norm=0.5)]
    findings += engine.check_report(RUN, 0, _step(46, grad_norm=math.nan, nonfinite_grad_count=1,
                                                  parameter_grad_norms=norms))
    primary = choose_primary(findings, 46)
    assert primary.code == "LOSS_BACKWARD_NONFINITE"
    assert primary.evidence.layer == "var_logit"


def test_input_nan_outranks_static() -> None:
    engine = CheckEngine()
    findings = _register(engine, optimizer=pb.OptimizerInfo(type="SGD", lr=100.0))
    batch = pb.TensorSummary(name="inputs", dtype="float32", shape=[4, 3], nan_count=1, min=0, max=1)
    findings += engine.check_report(RUN, 0, _step(3, batch=[batch], loss=math.nan, loss_finite=False,
                                                  output_finite=False))
    assert choose_primary(findings, 3).code == "DATA_NONFINITE"


@pytest.mark.parametrize("severity", [pb.SEVERITY_INFO, pb.SEVERITY_WARNING])
def test_advice_never_primary(severity: pb.Severity) -> None:
    where = Where(run_id="r", rank=0, step=5)
    advice = new_finding("GRAD_NO_CLIPPING", severity, where, message="m", fix="f")
    double = new_finding("LOSS_DOUBLE_SOFTMAX", pb.SEVERITY_WARNING, Where(run_id="r", rank=0), message="m", fix="f")
    loss = new_finding("LOSS_NONFINITE", pb.SEVERITY_CRITICAL, where, message="m", fix="f")
    assert choose_primary([advice, double, loss], 5).code == "LOSS_NONFINITE"


def test_not_normalized_below_static() -> None:
    where = Where(run_id="r", rank=0, step=0)
    inputs = new_finding("DATA_NOT_NORMALIZED", pb.SEVERITY_WARNING, where, message="m", fix="f")
    lr = new_finding("LR_TOO_HIGH", pb.SEVERITY_WARNING, Where(run_id="r", rank=0), message="m", fix="f")
    assert choose_primary([inputs, lr], 4).code == "LR_TOO_HIGH"
    assert choose_primary([inputs], 4).code == "DATA_NOT_NORMALIZED"


def test_incident_context_findings() -> None:
    engine = CheckEngine()
    _register(engine)
    constant = pb.TensorSummary(name="x", dtype="float32", shape=[8, 2], min=1.0, max=1.0)
    findings = engine.check_report(RUN, 0, _step(0, batch=[constant], output_finite=False, loss=math.nan,
                                                 loss_finite=False, grad_norm=math.nan, nonfinite_grad_count=1))
    codes = {f.code for f in findings}
    assert {"DATA_CONSTANT", "NONFINITE_ORDER", "GRAD_NO_CLIPPING", "FORWARD_NONFINITE"} <= codes


def test_static_cause_before_runtime_symptom() -> None:
    forward = new_finding("FORWARD_NONFINITE", pb.SEVERITY_WARNING, Where(run_id="r", rank=0, step=6),
                          message="m", fix="f")
    lr = new_finding("LR_TOO_HIGH", pb.SEVERITY_WARNING, Where(run_id="r", rank=0), message="m", fix="f")
    assert choose_primary([forward, lr], 6).code == "LR_TOO_HIGH"
