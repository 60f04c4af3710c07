"""Tests of stage 3: output activation and loss pairing."""

from __future__ import annotations

import pytest

from nanwatch.service.checks.catalog import Where
from nanwatch.service.checks.loss import check_output_activation, last_leaf
from nanwatch.v1 import nanwatch_pb2 as pb

WHERE = Where(run_id="run-a", rank=0)


def _trace(*calls: tuple[str, str]) -> list[pb.ModuleCall]:
    return [pb.ModuleCall(name=name, type=kind) for name, kind in calls]


# Post-order, as a forward hook records it: children finish before their parents.
SIGMOID_HEAD = _trace(("body.0", "Linear"), ("body.1", "ReLU"), ("body", "Sequential"),
                      ("head.0", "Linear"), ("head.1", "Sigmoid"), ("head", "Sequential"), ("", "Net"))
# Pre-order, as a forward pre-hook records it.
SOFTMAX_HEAD = _trace(("", "Sequential"), ("0", "Linear"), ("1", "ReLU"), ("2", "Linear"), ("3", "Softmax"))
LOGITS_HEAD = _trace(("", "Sequential"), ("0", "Linear"), ("1", "ReLU"), ("2", "Linear"))


def test_last_leaf_post_order() -> None:
    assert last_leaf(SIGMOID_HEAD).name == "head.1"


def test_last_leaf_root_only() -> None:
    assert last_leaf(_trace(("", "Linear"))).type == "Linear"


@pytest.mark.parametrize("loss_function", ["BCELoss", "binary_cross_entropy", "torch.nn.BCELoss", "MyBCELoss"])
def test_sigmoid_bce_warning(loss_function: str) -> None:
    [finding] = check_output_activation(SIGMOID_HEAD, loss_function, WHERE)
    assert finding.code == "LOSS_SIGMOID_BCE"
    assert finding.severity == pb.SEVERITY_WARNING
    assert finding.evidence.layer == "head.1"
    assert "BCEWithLogitsLoss" in finding.fix
    assert "'head.1'" in finding.fix


@pytest.mark.parametrize("loss_function", ["BCEWithLogitsLoss", "binary_cross_entropy_with_logits", "MSELoss", ""])
def test_sigmoid_other_loss_silent(loss_function: str) -> None:
    assert check_output_activation(SIGMOID_HEAD, loss_function, WHERE) == []


@pytest.mark.parametrize("loss_function", ["NLLLoss", "nll_loss", "F.nll_loss", "kl_div", "log"])
def test_softmax_log_warning(loss_function: str) -> None:
    [finding] = check_output_activation(SOFTMAX_HEAD, loss_function, WHERE)
    assert finding.code == "LOSS_SOFTMAX_LOG"
    assert "LogSoftmax" in finding.fix
    assert "'3'" in finding.message


def test_healthy_logits_cross_entropy_silent() -> None:
    assert check_output_activation(LOGITS_HEAD, "CrossEntropyLoss", WHERE) == []


def test_bce_on_logits_model_silent() -> None:
    assert check_output_activation(LOGITS_HEAD, "BCELoss", WHERE) == []


def test_sigmoid_inside_model_silent() -> None:
    trace = _trace(("", "Sequential"), ("0", "Linear"), ("1", "Sigmoid"), ("2", "Linear"))
    assert check_output_activation(trace, "BCEWithLogitsLoss", WHERE) == []
    assert check_output_activation(trace, "BCELoss", WHERE) == []
