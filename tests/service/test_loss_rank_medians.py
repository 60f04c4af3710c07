"""Leave-one-out medians of the cross-rank loss check against the naive per-rank median."""

from __future__ import annotations

import random
import statistics

import pytest

from nanwatch.service.checks import loss_trends
from nanwatch.service.thresholds import Thresholds
from nanwatch.v1 import nanwatch_pb2 as pb


def _naive_medians(values: dict[int, float]) -> dict[int, float]:
    return {key: statistics.median(v for k, v in values.items() if k != key) for key in values}


def _random_losses(rng: random.Random, count: int) -> dict[int, float]:
    pool = [rng.choice([1.0, 2.5, 2.5, -0.5]) for _ in range(3)]  # repeated values make ties
    return {rank: rng.choice(pool) if rng.random() < 0.3 else rng.gauss(2.0, 1.0) for rank in range(count)}


@pytest.mark.parametrize("seed", range(40))
def test_medians_match_naive(seed: int) -> None:
    rng = random.Random(seed)
    losses = _random_losses(rng, rng.randint(2, 60))
    assert loss_trends.leave_one_out_medians(losses) == _naive_medians(losses)


def test_medians_two_values() -> None:
    assert loss_trends.leave_one_out_medians({0: 1.0, 1: 3.0}) == {0: 3.0, 1: 1.0}


def test_medians_one_value_rejected() -> None:
    with pytest.raises(ValueError, match="at least 2 values"):
        loss_trends.leave_one_out_medians({0: 1.0})


class _NaiveComparer(loss_trends.RankLossComparer):
    """The comparer with the per-rank median of the others computed directly."""

    def _compare(self, run_id, step, losses, thresholds):  # type: ignore[no-untyped-def]
        original = loss_trends.leave_one_out_medians
        loss_trends.leave_one_out_medians = _naive_medians
        try:
            return super()._compare(run_id, step, losses, thresholds)
        finally:
            loss_trends.leave_one_out_medians = original


@pytest.mark.parametrize("seed", range(5))
def test_comparer_findings_match_naive(seed: int) -> None:
    rng = random.Random(seed)
    world, thresholds = rng.randint(3, 24), Thresholds()
    fast, naive = loss_trends.RankLossComparer(world_size=world), _NaiveComparer(world_size=world)
    outlier = rng.randrange(world)
    fast_findings, naive_findings = [], []
    for step in range(40):
        for rank in range(world):
            loss = 30.0 if rank == outlier and step >= 15 else rng.gauss(1.0, 0.05)
            report = pb.StepReport(step=step, loss=loss, loss_finite=True)
            fast_findings += fast.add("r", rank, report, thresholds)
            naive_findings += naive.add("r", rank, report, thresholds)
    assert fast_findings == naive_findings
    assert [finding.evidence.rank for finding in fast_findings] == [outlier]
    assert list(fast.spreads) == list(naive.spreads)
