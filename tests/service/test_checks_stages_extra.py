"""Tests of the value, activation, loss-value, update, trend and advice checks (fire, stay silent, edges)."""

from __future__ import annotations

import math
from collections import deque

import pytest

from nanwatch.service.checks import (
    activations, data_values, gradient_trends, hyperparameters, loss, loss_trends, loss_values, updates,
)
from nanwatch.service.checks.catalog import Where
from nanwatch.service.thresholds import Thresholds
from nanwatch.v1 import nanwatch_pb2 as pb

THRESHOLDS = Thresholds()
WHERE = Where(run_id="r", rank=1, step=7)
CLASSES = data_values.DataContext(num_classes=10, loss_function="CrossEntropyLoss")


def _summary(name: str, low: float, high: float, dtype: str = "int64", **fields: object) -> pb.TensorSummary:
    return pb.TensorSummary(name=name, dtype=dtype, shape=[16], min=low, max=high, **fields)


@pytest.mark.parametrize(("low", "high"), [(0, 10), (-1, 5), (1, 10), (-5, -1)])
def test_target_range_fires(low: int, high: int) -> None:
    [finding] = data_values.check_value_ranges([_summary("targets", low, high)], CLASSES, WHERE, THRESHOLDS)
    assert finding.code == "DATA_TARGET_RANGE"
    assert finding.severity == pb.SEVERITY_CRITICAL
    assert "0..9" in finding.fix


@pytest.mark.parametrize(("low", "high"), [(0, 9), (-100, 9), (3, 3)])
def test_target_range_silent(low: int, high: int) -> None:
    assert data_values.check_value_ranges([_summary("labels", low, high)], CLASSES, WHERE, THRESHOLDS) == []


def test_target_range_needs_class_loss() -> None:
    context = data_values.DataContext(num_classes=1, loss_function="MSELoss")
    assert data_values.check_value_ranges([_summary("y", 0, 300)], context, WHERE, THRESHOLDS) == []


def test_target_range_ignores_inputs() -> None:
    assert data_values.check_value_ranges([_summary("input_ids", 0, 30000)], CLASSES, WHERE, THRESHOLDS) == []


def test_fp16_overflow_fires() -> None:
    context = data_values.DataContext(trains_in_float16=True)
    [finding] = data_values.check_value_ranges([_summary("x", -1.0, 7e4, "float32")], context, WHERE, THRESHOLDS)
    assert finding.code == "DATA_FP16_OVERFLOW"


def test_fp16_overflow_silent_in_float32() -> None:
    findings = data_values.check_value_ranges([_summary("x", -1.0, 7e4, "float32")], CLASSES, WHERE, THRESHOLDS)
    assert [f.code for f in findings] == ["DATA_NOT_NORMALIZED"]


@pytest.mark.parametrize(("name", "high", "expected"), [("x", 255.0, 0), ("x", 5e3, 1), ("targets", 5e3, 0)])
def test_not_normalized(name: str, high: float, expected: int) -> None:
    findings = data_values.check_value_ranges([_summary(name, 0.0, high, "float32")], CLASSES, WHERE, THRESHOLDS)
    assert len(findings) == expected


def test_constant_tensors() -> None:
    constant = _summary("x", 2.0, 2.0, "float32")
    varied = _summary("z", 0.0, 1.0, "float32")
    assert data_values.constant_tensors([constant, varied, _summary("t", 1, 1)]) == [constant]


def _layer(name: str, kind: str, std: float, **fields: object) -> pb.LayerActivation:
    fields.setdefault("saturated_fraction", math.nan)
    return pb.LayerActivation(name=name, type=kind, numel=100, std=std, max_abs=3 * std, **fields)


def test_activation_growth_fires() -> None:
    layers = [_layer("0", "Linear", 1.0), _layer("1", "ReLU", 1.0), _layer("2", "Linear", 5e3)]
    [finding] = activations.check_activations(layers, "2", WHERE, THRESHOLDS)
    assert finding.code == "ACT_SCALE_GROWTH"
    assert finding.evidence.layer == "2"


def test_activation_vanish_info() -> None:
    layers = [_layer("0", "Linear", 1.0), _layer("2", "Linear", 1e-6)]
    [finding] = activations.check_activations(layers, "2", WHERE, THRESHOLDS)
    assert finding.severity == pb.SEVERITY_INFO


def test_activation_healthy_silent() -> None:
    layers = [_layer("0", "Linear", 0.5), _layer("1", "Tanh", 0.4, saturated_fraction=0.01), _layer("2", "Linear", 0.3)]
    assert activations.check_activations(layers, "2", WHERE, THRESHOLDS) == []


@pytest.mark.parametrize(("last_leaf", "severity"), [("1", pb.SEVERITY_WARNING), ("9", pb.SEVERITY_INFO)])
def test_saturation_severity(last_leaf: str, severity: int) -> None:
    layers = [_layer("0", "Linear", 20.0), _layer("1", "Sigmoid", 0.5, saturated_fraction=0.9)]
    [finding] = activations.check_activations(layers, last_leaf, WHERE, THRESHOLDS)
    assert finding.code == "ACT_SATURATED"
    assert finding.severity == severity


def test_first_nonfinite_layer_named() -> None:
    layers = [_layer("0", "Linear", 1.0), _layer("3", "Linear", 1.0, nonfinite_count=5)]
    [finding] = activations.check_activations(layers, "3", WHERE, THRESHOLDS)
    assert finding.code == "FORWARD_NONFINITE"
    assert finding.evidence.layer == "3"


def test_nonfinite_layer_skipped_with_bad_parameters() -> None:
    layers = [_layer("0", "Linear", 1.0, nonfinite_count=5)]
    assert activations.check_activations(layers, "0", WHERE, THRESHOLDS, parameters_finite=False) == []


def test_masked_softmax() -> None:
    layers = [_layer("attn", "Softmax", 0.1, nonfinite_count=8, input_inf_count=8)]
    [finding] = activations.check_activations(layers, "x", WHERE, THRESHOLDS)
    assert finding.code == "LOSS_MASKED_SOFTMAX"


def test_double_softmax() -> None:
    trace = [pb.ModuleCall(name="0", type="Linear"), pb.ModuleCall(name="1", type="Softmax")]
    [finding] = loss.check_output_activation(trace, "CrossEntropyLoss", WHERE)
    assert finding.code == "LOSS_DOUBLE_SOFTMAX"


@pytest.mark.parametrize(("loss_name", "source", "expected"),
                         [("BCELoss", "float16 autocast", 1), ("BCEWithLogitsLoss", "float16 autocast", 0),
                          ("BCELoss", "", 0)])
def test_bce_float16(loss_name: str, source: str, expected: int) -> None:
    assert len(loss.check_bce_float16(loss_name, source, WHERE)) == expected


def _step(**fields: object) -> pb.StepReport:
    values: dict[str, object] = dict(step=7, loss=1.0, loss_finite=True, grad_norm=1.0, param_norm=5.0,
                                     output_checked=True, output_finite=True)
    values.update(fields)
    return pb.StepReport(**values)


FACTS = loss_values.StepFacts(batch_finite=True, loss_function="nll_loss", layer_order=["body", "head", "mu"])


@pytest.mark.parametrize(("value", "code"), [(math.inf, "LOSS_LOG_ZERO"), (math.nan, "LOSS_UNDEFINED")])
def test_loss_from_finite_output(value: float, code: str) -> None:
    [finding] = loss_values.check_step_values(_step(loss=value, loss_finite=False), FACTS, WHERE, THRESHOLDS)
    assert finding.code == code
    assert finding.stage == pb.STAGE_LOSS


def test_loss_unchecked_targets_named() -> None:
    facts = loss_values.StepFacts(batch_finite=True, targets_checked=False)
    [finding] = loss_values.check_step_values(_step(loss=math.nan, loss_finite=False), facts, WHERE, THRESHOLDS)
    assert "target" in finding.message


def test_backward_nonfinite_located() -> None:
    norms = [pb.ParameterGradNorm(name="body.weight", grad_norm=math.nan),
             pb.ParameterGradNorm(name="head.weight", grad_norm=math.nan),
             pb.ParameterGradNorm(name="mu.weight", grad_norm=0.3)]
    report = _step(grad_norm=math.nan, nonfinite_grad_count=2, parameter_grad_norms=norms)
    [finding] = loss_values.check_step_values(report, FACTS, WHERE, THRESHOLDS)
    assert finding.code == "LOSS_BACKWARD_NONFINITE"
    assert finding.evidence.layer == "head"


@pytest.mark.parametrize("fields", [
    dict(output_checked=False, loss=math.nan, loss_finite=False),   # old client
    dict(grad_norm=math.nan, loss_scale=1024.0),                    # GradScaler skip
    dict(param_norm=math.nan, loss=math.nan, loss_finite=False),    # parameters already broken
    dict(output_finite=False),                                      # -inf logits on purpose, finite loss
])
def test_step_values_silent(fields: dict[str, object]) -> None:
    assert loss_values.check_step_values(_step(**fields), FACTS, WHERE, THRESHOLDS) == []


def test_forward_nonfinite_with_bad_loss() -> None:
    report = _step(output_finite=False, loss=math.nan, loss_finite=False)
    [finding] = loss_values.check_step_values(report, FACTS, WHERE, THRESHOLDS)
    assert finding.code == "FORWARD_NONFINITE"


@pytest.mark.parametrize(("update", "expected"), [(0.01, 0), (5.0, 1), (math.nan, 0), (0.0, 0)])
def test_update_ratio(update: float, expected: int) -> None:
    report = _step(update_norm=update, param_norm=2.0, lr=0.5)
    assert len(updates.check_update_ratio(report, WHERE, THRESHOLDS)) == expected


@pytest.mark.parametrize(("scale", "expected"), [(0.0, 0), (65536.0, 0), (1.0, 0), (0.25, 1)])
def test_loss_scale_collapse(scale: float, expected: int) -> None:
    assert len(updates.check_loss_scale(_step(loss_scale=scale), WHERE, THRESHOLDS)) == expected


@pytest.mark.parametrize(("kind", "lr", "decay", "expected"),
                         [("SGD", 0.1, 5e-4, 0), ("AdamW", 1e-3, 0.1, 0), ("SGD", 1.0, 1.5, 1), ("Adam", 1.0, 5.0, 0)])
def test_weight_decay(kind: str, lr: float, decay: float, expected: int) -> None:
    optimizer = pb.OptimizerInfo(type=kind, lr=lr, hyperparameters={"weight_decay": decay})
    assert len(hyperparameters.check_weight_decay(optimizer, WHERE)) == expected


@pytest.mark.parametrize(("lr", "momentum", "expected"), [(0.1, 0.9, 0), (0.1, 1.0, 1), (0.5, 0.999, 1), (0.1, 0.0, 0)])
def test_momentum(lr: float, momentum: float, expected: int) -> None:
    optimizer = pb.OptimizerInfo(type="SGD", lr=lr, hyperparameters={"momentum": momentum})
    assert len(hyperparameters.check_momentum(optimizer, WHERE, THRESHOLDS)) == expected


@pytest.mark.parametrize(("dtype", "scaler", "expected"),
                         [("float16", False, 1), ("float16", True, 0), ("bfloat16", False, 0), ("", False, 0)])
def test_autocast_scaler(dtype: str, scaler: bool, expected: int) -> None:
    assert len(hyperparameters.check_autocast_scaler(dtype, scaler, WHERE)) == expected


@pytest.mark.parametrize(("norms", "expected"), [
    ([1.0, 2, 4, 8, 16, 32, 64, 128], True),
    ([1.0, 2, 4, 8, 16, 32, 64, 60], False),
    ([1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7], False),
    ([1.0, 2, 4], False),
])
def test_grad_growth(norms: list[float], expected: bool) -> None:
    assert gradient_trends.is_growing(norms, THRESHOLDS) is expected


def test_no_clipping_advice_ignores_exploding_norms() -> None:
    exploding = [10.0 ** power for power in range(1, 11)]
    finding = gradient_trends.no_clipping_finding([1.0] * 40 + exploding, "non-finite gradients",
                                                  Where(run_id="r", rank=0, step=50))
    assert finding.evidence.values["suggested_max_norm"] == "2"
    assert finding.evidence.values["exploding_norms"] == "9"
    assert "max_norm=2)" in finding.fix


def test_suggest_max_norm() -> None:
    assert gradient_trends.suggest_max_norm([]) == 1.0
    assert gradient_trends.suggest_max_norm([1.0] * 20) == pytest.approx(2.0)


def test_layer_ratio() -> None:
    norms = [pb.ParameterGradNorm(name="0.weight", grad_norm=1e3), pb.ParameterGradNorm(name="4.weight", grad_norm=1e-3)]
    [finding] = gradient_trends.check_layer_ratio(_step(parameter_grad_norms=norms), ["0.weight", "4.weight"],
                                                  WHERE, THRESHOLDS)
    assert finding.severity == pb.SEVERITY_WARNING


def test_loss_spike_then_diverging() -> None:
    tracker = loss_trends.LossTracker(history=deque([1.0 + 0.01 * (i % 5) for i in range(50)], maxlen=100))
    first = tracker.check(_step(loss=10.0), WHERE, THRESHOLDS)
    assert [f.severity for f in first] == [pb.SEVERITY_INFO]
    codes = [f.code for _ in range(THRESHOLDS.loss_diverge_patience - 1)
             for f in tracker.check(_step(loss=10.0), WHERE, THRESHOLDS)]
    assert codes == ["LOSS_DIVERGING"]


def test_loss_spike_recovers_silent() -> None:
    tracker = loss_trends.LossTracker(history=deque([1.0] * 50, maxlen=100))
    tracker.check(_step(loss=10.0), WHERE, THRESHOLDS)
    assert tracker.check(_step(loss=1.0), WHERE, THRESHOLDS) == []
    assert tracker.streak == 0


def test_rank_outlier() -> None:
    comparer = loss_trends.RankLossComparer(world_size=4)
    findings = []
    for step in range(30):
        for rank in range(4):
            value = 50.0 if rank == 2 and step >= 10 else 1.0 + 0.05 * ((step + rank) % 3)
            findings += comparer.add("r", rank, _step(step=step, loss=value), THRESHOLDS)
    assert [(f.code, f.evidence.rank) for f in findings] == [("LOSS_RANK_OUTLIER", 2)]


def test_nonfinite_order() -> None:
    report = _step(loss=math.nan, loss_finite=False, grad_norm=math.nan)
    assert loss_trends.nonfinite_order(report, True) == ["batch", "loss", "gradients"]
