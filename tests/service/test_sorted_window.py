"""SortedWindow's running medians against statistics.median, and the loss tracker built on it."""

from __future__ import annotations

import math
import statistics
from collections import deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanwatch.service.checks import loss_trends
from nanwatch.service.checks.catalog import Where
from nanwatch.service.checks.windows import SortedWindow
from nanwatch.service.thresholds import Thresholds
from nanwatch.v1 import nanwatch_pb2 as pb

# Few distinct values make ties; signed zeros and huge magnitudes test the float edge cases.
VALUES = st.one_of(st.sampled_from([0.0, -0.0, 1.0, -1.0, 2.5, 1e308, -1e308]),
                   st.floats(allow_nan=False, allow_infinity=False, width=32))
THRESHOLDS = Thresholds(loss_warmup_steps=3, loss_history=8)
WHERE = Where(run_id="r", rank=0, step=1)


def _sign(value: float) -> float:
    return math.copysign(1.0, value)


@settings(max_examples=300, deadline=None)
@given(st.lists(VALUES, min_size=1, max_size=40), st.integers(min_value=1, max_value=12))
def test_window_median_matches(values: list[float], maxlen: int) -> None:
    window = SortedWindow(maxlen=maxlen)
    for value in values:
        window.append(value)
        expected = statistics.median(list(window))
        assert window.median() == expected
        assert _sign(window.median()) == _sign(expected)


@settings(max_examples=300, deadline=None)
@given(st.lists(VALUES, min_size=1, max_size=40), st.integers(min_value=1, max_value=12), VALUES)
def test_window_mad_matches(values: list[float], maxlen: int, other_center: float) -> None:
    window = SortedWindow(values, maxlen=maxlen)
    for center in (window.median(), other_center):
        expected = statistics.median(abs(value - center) for value in window)
        assert window.median_abs_deviation(center) == expected


@given(st.lists(VALUES, max_size=30), st.integers(min_value=1, max_value=12))
def test_window_keeps_arrival_order(values: list[float], maxlen: int) -> None:
    window = SortedWindow(values, maxlen=maxlen)
    assert list(window) == values[-maxlen:]


def test_window_rejects_nan() -> None:
    with pytest.raises(ValueError, match="NaN"):
        SortedWindow().append(math.nan)


def test_window_empty_median() -> None:
    with pytest.raises(ValueError, match="empty"):
        SortedWindow().median()


def _reference_limit(history: list[float], thresholds: Thresholds) -> float | None:
    """The spike limit computed with statistics.median, as the tracker computed it before SortedWindow."""
    if len(history) < thresholds.loss_warmup_steps:
        return None
    median = statistics.median(history)
    mad = statistics.median(abs(value - median) for value in history) * loss_trends.MAD_TO_STD
    return median + max(thresholds.loss_spike_mads * mad, abs(median), 1e-8)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(min_value=-10.0, max_value=1e4, allow_nan=False), min_size=1, max_size=40))
def test_tracker_matches_reference(losses: list[float]) -> None:
    tracker = loss_trends.LossTracker(history=deque(maxlen=THRESHOLDS.loss_history))
    reference: deque[float] = deque(maxlen=THRESHOLDS.loss_history)
    streak = 0
    for loss in losses:
        limit = _reference_limit(list(reference), THRESHOLDS)
        tracker.check(pb.StepReport(step=1, loss=loss, loss_finite=True), WHERE, THRESHOLDS)
        if limit is not None and loss > limit:
            streak += 1
        else:
            streak = 0
            reference.append(loss)
        assert tracker.streak == streak
        assert list(tracker.history) == list(reference)
