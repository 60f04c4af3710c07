"""Tests of stage 1: NaN/Inf in batch summaries and whole batches."""

from __future__ import annotations

import math

import numpy as np
import pytest

from nanwatch.service.checks.catalog import Where
from nanwatch.service.checks.data import check_batch_arrays, check_batch_summaries
from nanwatch.service.thresholds import Thresholds
from nanwatch.v1 import nanwatch_pb2 as pb

WHERE = Where(run_id="run-a", rank=1, step=10)
THRESHOLDS = Thresholds()


def _healthy_batch() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"inputs": rng.normal(size=(16, 10)).astype(np.float32), "targets": rng.normal(size=(16, 1))}


def test_summaries_healthy_silent() -> None:
    summary = pb.TensorSummary(name="inputs", shape=[16, 10], min=-2.0, max=2.0, mean=0.0, std=1.0)
    assert check_batch_summaries([summary], WHERE, THRESHOLDS) == []


def test_summaries_nan_targets_critical() -> None:
    summary = pb.TensorSummary(name="targets", shape=[16, 1], nan_count=2, nonfinite_sample_indices=[3, 9])
    [finding] = check_batch_summaries([summary], WHERE, THRESHOLDS)
    assert finding.code == "DATA_NONFINITE"
    assert finding.severity == pb.SEVERITY_CRITICAL
    assert finding.stage == pb.STAGE_DATA
    assert list(finding.evidence.sample_indices) == [3, 9]
    assert finding.evidence.tensor == "targets"
    assert finding.evidence.step == 10
    assert finding.evidence.rank == 1
    assert "'targets'" in finding.message
    assert "2 NaN" in finding.message
    assert "3, 9" in finding.message
    assert "targets" in finding.fix


def test_summaries_inf_only_counts() -> None:
    summary = pb.TensorSummary(name="inputs", shape=[4, 2], inf_count=1)
    [finding] = check_batch_summaries([summary], WHERE, THRESHOLDS)
    assert finding.evidence.values["inf_count"] == "1"
    assert finding.evidence.values["nan_count"] == "0"


def test_arrays_healthy_silent() -> None:
    assert check_batch_arrays(_healthy_batch(), [], WHERE, THRESHOLDS) == []


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_arrays_nonfinite_found(bad: float) -> None:
    batch = _healthy_batch()
    batch["inputs"][5, 7] = bad
    [finding] = check_batch_arrays(batch, [], WHERE, THRESHOLDS)
    assert finding.severity == pb.SEVERITY_CRITICAL
    assert list(finding.evidence.sample_indices) == [5]
    assert finding.evidence.values["positions"] == "(5, 7)"
    assert "batch samples 5" in finding.message


def test_arrays_zero_is_finite() -> None:
    batch = _healthy_batch()
    batch["inputs"][:] = 0.0
    assert check_batch_arrays(batch, [], WHERE, THRESHOLDS) == []


def test_arrays_sample_ids_named() -> None:
    batch = _healthy_batch()
    batch["targets"][[2, 11], 0] = np.nan
    ids = list(range(1000, 1016))
    [finding] = check_batch_arrays(batch, ids, WHERE, THRESHOLDS)
    assert list(finding.evidence.sample_indices) == [1002, 1011]
    assert "sample ids 1002, 1011" in finding.message


def test_arrays_wrong_id_count_uses_indices() -> None:
    batch = _healthy_batch()
    batch["targets"][2, 0] = np.nan
    [finding] = check_batch_arrays(batch, [7, 8], WHERE, THRESHOLDS)
    assert list(finding.evidence.sample_indices) == [2]


def test_arrays_positions_limited() -> None:
    batch = {"inputs": np.full((20, 3), np.nan, dtype=np.float16)}
    [finding] = check_batch_arrays(batch, [], WHERE, Thresholds(max_listed=2))
    assert finding.evidence.values["positions"] == "(0, 0), (0, 1) and 58 more"
    assert len(finding.evidence.sample_indices) == 20


def test_arrays_integer_skipped() -> None:
    batch = {"labels": np.array([1, 2, 3]), "mask": np.array([True, False])}
    assert check_batch_arrays(batch, [], WHERE, THRESHOLDS) == []


def test_arrays_scalar_tensor() -> None:
    [finding] = check_batch_arrays({"weight": np.array(np.inf)}, [], WHERE, THRESHOLDS)
    assert list(finding.evidence.sample_indices) == []
