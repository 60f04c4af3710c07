"""Interleaved trials: run every variant once per round, rotate the order, compare medians and ratios."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field


@dataclass(kw_only=True)
class VariantResult:
    """Trial times of one variant and its ratio and difference to the baseline of the same round."""

    name: str
    times_s: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)
    added_s: list[float] = field(default_factory=list)

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    @property
    def median_ratio(self) -> float:
        return statistics.median(self.ratios)

    @property
    def median_added_s(self) -> float:
        return statistics.median(self.added_s)

    def ratio_quartiles(self) -> tuple[float, float]:
        """Return the 25th and 75th percentiles of the per-round ratios (both the median for one round)."""
        return quartiles(self.ratios)


def quartiles(values: list[float]) -> tuple[float, float]:
    """Return the 25th and 75th percentiles of values."""
    if len(values) < 2:
        return values[0], values[0]
    cuts = statistics.quantiles(values, n=4, method="inclusive")
    return cuts[0], cuts[2]


def percentile(values: list[float], fraction: float) -> float:
    """Return the fraction-quantile of values by linear interpolation (fraction in 0..1)."""
    ordered = sorted(values)
    position = fraction * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def timed_trial(action: Callable[[], object], repeats: int) -> Callable[[], float]:
    """Return a trial that calls action repeats times and returns the mean seconds per call."""
    def trial() -> float:
        started = time.perf_counter()
        for _ in range(repeats):
            action()
        return (time.perf_counter() - started) / repeats

    return trial


def run_interleaved(
    trials: Mapping[str, Callable[[], float]], *, rounds: int, baseline: str
) -> dict[str, VariantResult]:
    """Run each trial once per round and return the results by variant name.

    A trial returns a time in seconds. Round r starts with the r-th variant, so no
    variant always runs right after the same neighbour. Ratios and added times
    compare a variant with the baseline's trial of the same round, which cancels
    slow drifts of a shared machine.
    """
    if baseline not in trials:
        raise ValueError(f"baseline {baseline!r} is not a variant; choose one of {sorted(trials)}")
    names = list(trials)
    results = {name: VariantResult(name=name) for name in names}
    for round_index in range(rounds):
        offset = round_index % len(names)
        for name in names[offset:] + names[:offset]:
            results[name].times_s.append(trials[name]())
    for result in results.values():
        base = results[baseline].times_s
        result.ratios = [time_s / base_s for time_s, base_s in zip(result.times_s, base)]
        result.added_s = [time_s - base_s for time_s, base_s in zip(result.times_s, base)]
    return results
