"""Tests of stage 4: learning rate range and optimizer eps for float16."""

from __future__ import annotations

import pytest

from nanwatch.service.checks.catalog import Where
from nanwatch.service.checks.hyperparameters import check_eps_for_float16, check_learning_rate, usual_max_lr
from nanwatch.service.thresholds import Thresholds
from nanwatch.v1 import nanwatch_pb2 as pb

WHERE = Where(run_id="run-a", rank=0)
THRESHOLDS = Thresholds()


@pytest.mark.parametrize(("kind", "lr"), [("SGD", 0.1), ("SGD", 1.0), ("Adam", 1e-3), ("AdamW", 3e-4), ("RMSprop", 1e-2)])
def test_usual_lr_silent(kind: str, lr: float) -> None:
    assert check_learning_rate(pb.OptimizerInfo(type=kind, lr=lr), WHERE, THRESHOLDS) == []


@pytest.mark.parametrize(("kind", "lr"), [("SGD", 50.0), ("Adam", 0.5), ("FusedAdam", 1.0), ("Lion", 0.1)])
def test_far_above_warning(kind: str, lr: float) -> None:
    [finding] = check_learning_rate(pb.OptimizerInfo(type=kind, lr=lr), WHERE, THRESHOLDS)
    assert finding.code == "LR_TOO_HIGH"
    assert finding.severity == pb.SEVERITY_WARNING
    assert f"lr {lr:.4g}" in finding.message
    assert kind in finding.fix


def test_factor_from_thresholds() -> None:
    optimizer = pb.OptimizerInfo(type="Adam", lr=0.05)
    assert check_learning_rate(optimizer, WHERE, THRESHOLDS) == []
    assert len(check_learning_rate(optimizer, WHERE, Thresholds(lr_far_above_factor=2.0))) == 1


def test_unknown_optimizer_skipped() -> None:
    assert usual_max_lr("Shampoo") is None
    assert check_learning_rate(pb.OptimizerInfo(type="Shampoo", lr=100.0), WHERE, THRESHOLDS) == []


def _params(dtype: str) -> list[pb.ParameterInfo]:
    return [pb.ParameterInfo(name="0.weight", dtype=dtype, shape=[128, 64])]


@pytest.mark.parametrize("dtype", ["float16", "torch.float16", "half"])
def test_eps_fp16_warning(dtype: str) -> None:
    optimizer = pb.OptimizerInfo(type="Adam", lr=1e-3, hyperparameters={"eps": 1e-8})
    [finding] = check_eps_for_float16(optimizer, _params(dtype), WHERE, THRESHOLDS)
    assert finding.code == "OPTIMIZER_EPS_FP16"
    assert "rounds to 0" in finding.message
    assert "'0.weight'" in finding.message
    assert "GradScaler" in finding.fix


@pytest.mark.parametrize("eps", [0.0, 1e-8, 1e-6])
def test_eps_fp16_small_values(eps: float) -> None:
    optimizer = pb.OptimizerInfo(type="AdamW", lr=1e-3, hyperparameters={"eps": eps})
    assert len(check_eps_for_float16(optimizer, _params("float16"), WHERE, THRESHOLDS)) == 1


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_eps_other_dtype_silent(dtype: str) -> None:
    optimizer = pb.OptimizerInfo(type="Adam", lr=1e-3, hyperparameters={"eps": 1e-8})
    assert check_eps_for_float16(optimizer, _params(dtype), WHERE, THRESHOLDS) == []


def test_eps_raised_fp16_silent() -> None:
    optimizer = pb.OptimizerInfo(type="Adam", lr=1e-3, hyperparameters={"eps": 1e-4})
    assert check_eps_for_float16(optimizer, _params("float16"), WHERE, THRESHOLDS) == []


def test_eps_sgd_skipped() -> None:
    optimizer = pb.OptimizerInfo(type="SGD", lr=0.1, hyperparameters={"momentum": 0.9})
    assert check_eps_for_float16(optimizer, _params("float16"), WHERE, THRESHOLDS) == []
