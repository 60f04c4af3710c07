"""Tests of stage 2: initial parameter values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from nanwatch.service.checks.catalog import Where
from nanwatch.service.checks.initialization import check_parameters
from nanwatch.service.thresholds import Thresholds
from nanwatch.v1 import nanwatch_pb2 as pb

WHERE = Where(run_id="run-a", rank=0)
THRESHOLDS = Thresholds()


def _info(name: str, values: np.ndarray, module_type: str = "Linear") -> pb.ParameterInfo:
    finite = values[np.isfinite(values)]
    return pb.ParameterInfo(
        name=name,
        shape=list(values.shape),
        dtype="float32",
        numel=values.size,
        mean=float(finite.mean()) if finite.size else math.nan,
        std=float(finite.std()) if finite.size else math.nan,
        min=float(values.min()),
        max=float(values.max()),
        nonfinite_count=int((~np.isfinite(values)).sum()),
        fan_in=int(np.prod(values.shape[1:])),
        module_type=module_type,
    )


def _linear_default(out_features: int, in_features: int, seed: int = 0) -> np.ndarray:
    """Return weights drawn like nn.Linear's default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(in_features)
    return np.random.default_rng(seed).uniform(-bound, bound, size=(out_features, in_features))


def _healthy_mlp() -> list[pb.ParameterInfo]:
    return [
        _info("0.weight", _linear_default(128, 64)),
        _info("0.bias", _linear_default(1, 128)[0]),
        _info("2.weight", _linear_default(10, 128, seed=1)),
        _info("2.bias", np.zeros(10)),
        _info("norm.weight", np.ones(128), module_type="LayerNorm"),
    ]


def test_healthy_mlp_silent() -> None:
    assert check_parameters(_healthy_mlp(), WHERE, THRESHOLDS) == []


def test_kaiming_normal_silent() -> None:
    weight = np.random.default_rng(0).normal(0.0, math.sqrt(2.0 / 256), size=(256, 256))
    assert check_parameters([_info("fc.weight", weight)], WHERE, THRESHOLDS) == []


def test_xavier_wide_output_silent() -> None:
    std = math.sqrt(2.0 / (10 + 1000))  # xavier_normal_ of Linear(10, 1000)
    weight = np.random.default_rng(0).normal(0.0, std, size=(1000, 10))
    assert check_parameters([_info("fc.weight", weight)], WHERE, THRESHOLDS) == []


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nonfinite_weight_critical(bad: float) -> None:
    weight = _linear_default(8, 8)
    weight[1, 2] = bad
    [finding] = check_parameters([_info("head.weight", weight)], WHERE, THRESHOLDS)
    assert finding.code == "INIT_NONFINITE"
    assert finding.severity == pb.SEVERITY_CRITICAL
    assert finding.evidence.step == -1
    assert finding.evidence.layer == "head"
    assert "'head.weight'" in finding.message


def test_nonfinite_bias_critical() -> None:
    [finding] = check_parameters([_info("head.bias", np.array([0.0, math.nan]))], WHERE, THRESHOLDS)
    assert finding.code == "INIT_NONFINITE"


def test_zero_weight_is_advice() -> None:
    # A zero-init output or residual layer is deliberate in many models and cannot make NaN alone.
    [finding] = check_parameters([_info("4.weight", np.zeros((1, 64)))], WHERE, THRESHOLDS)
    assert finding.code == "INIT_ALL_ZERO"
    assert finding.severity == pb.SEVERITY_INFO
    assert "all zero" in finding.message


def test_zero_free_parameter_silent() -> None:
    # A zero-init learned position table is not a layer weight.
    assert check_parameters([_info("position", np.zeros((1, 8, 16)), "Encoder")], WHERE, THRESHOLDS) == []


def test_zero_weight_norm_direction_named() -> None:
    name = "4.parametrizations.weight.original1"
    [finding] = check_parameters([_info(name, np.zeros((1, 64)), "ParametrizationList")], WHERE, THRESHOLDS)
    assert finding.code == "INIT_ALL_ZERO"
    assert finding.severity == pb.SEVERITY_WARNING
    assert "0/0" in finding.message
    assert finding.evidence.layer == "4"
    assert "weight_norm on '4'" in finding.fix


@pytest.mark.parametrize("values", [np.zeros(16), np.ones(16), np.zeros((1, 1))])
def test_bias_norm_and_scalar_silent(values: np.ndarray) -> None:
    assert check_parameters([_info("ln.weight", values, "LayerNorm")], WHERE, THRESHOLDS) == []


def test_constant_weight_warning() -> None:
    [finding] = check_parameters([_info("fc.weight", np.full((32, 16), 0.5))], WHERE, THRESHOLDS)
    assert finding.code == "INIT_CONSTANT"
    assert "0.5" in finding.message


def test_constant_per_channel_scale_silent() -> None:
    logit_scale = np.full((8, 1, 1), math.log(10.0))  # one scale per attention head
    assert check_parameters([_info("attn.logit_scale", logit_scale, "Attention")], WHERE, THRESHOLDS) == []


def test_randn_weight_scale_warning() -> None:
    weight = np.random.default_rng(0).normal(0.0, 1.0, size=(256, 784))
    [finding] = check_parameters([_info("fc1.weight", weight)], WHERE, THRESHOLDS)
    assert finding.code == "INIT_SCALE"
    assert finding.severity == pb.SEVERITY_WARNING
    assert "above" in finding.message
    assert "fan_in 784" in finding.message


def test_tiny_weight_scale_warning() -> None:
    weight = _linear_default(64, 64) * 1e-3
    [finding] = check_parameters([_info("conv.weight", weight.reshape(64, 4, 4, 4), "Conv2d")], WHERE, THRESHOLDS)
    assert finding.code == "INIT_SCALE"
    assert "below" in finding.message


def test_scale_skips_embedding() -> None:
    weight = np.random.default_rng(0).normal(0.0, 1.0, size=(1000, 64))
    assert check_parameters([_info("emb.weight", weight, "Embedding")], WHERE, THRESHOLDS) == []


def test_scale_skips_small_weight() -> None:
    weight = np.array([[5.0, -5.0], [3.0, -1.0]])
    assert check_parameters([_info("fc.weight", weight)], WHERE, THRESHOLDS) == []
