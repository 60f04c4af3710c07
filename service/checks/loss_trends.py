"""Stage 6 over time: loss spikes and divergence, a rank's loss far from the others, the order of non-finite values."""

from __future__ import annotations

import bisect
import math
import statistics
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from nanwatch.service.checks.catalog import Where, format_number, new_finding
from nanwatch.service.checks.windows import SortedWindow
from nanwatch.service.thresholds import Thresholds
from nanwatch.v1 import nanwatch_pb2 as pb

# Scales a median absolute deviation (MAD) to the standard deviation of a normal distribution.
MAD_TO_STD = 1.4826


def observed_finite_loss(report: pb.StepReport) -> float | None:
    """Return the report's loss when the rank observed a finite one, else None."""
    return report.loss if math.isfinite(report.loss) else None


def spike_limit(history: Sequence[float], thresholds: Thresholds) -> float | None:
    """Return the loss above which a value counts as a spike, or None during warm-up.

    The limit is median + max(loss_spike_mads x scaled MAD, |median|): a spike
    must also be at least twice the median's distance from 0, so a loss with no
    noise at all does not warn on a small wobble.
    """
    if len(history) < thresholds.loss_warmup_steps:
        return None
    window = history if isinstance(history, SortedWindow) else SortedWindow(history)
    median = window.median()
    mad = window.median_abs_deviation(median) * MAD_TO_STD
    return median + max(thresholds.loss_spike_mads * mad, abs(median), 1e-8)


@dataclass
class LossTracker:
    """Per-rank loss history and the current run of reports above the spike limit.

    A deque given as history becomes a SortedWindow of the same maxlen, which
    keeps the spike limit's two medians at O(log n) per report.
    """

    history: SortedWindow
    streak: int = 0
    is_diverging_reported: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.history, SortedWindow):
            self.history = SortedWindow(self.history, maxlen=getattr(self.history, "maxlen", None))

    def check(self, report: pb.StepReport, where: Where, thresholds: Thresholds) -> list[pb.Finding]:
        """Return LOSS_SPIKE (info) on the first report above the limit, LOSS_DIVERGING when it stays there."""
        loss = observed_finite_loss(report)
        if loss is None:
            return []
        limit = None if self._is_surely_below_limit(loss, thresholds) else spike_limit(self.history, thresholds)
        if limit is None or loss <= limit:
            self.streak = 0
            self.history.append(loss)
            return []
        self.streak += 1  # the baseline keeps its pre-spike values while the loss is high
        median = self.history.median()
        if self.streak == 1:
            return [_spike_finding(loss, median, limit, where)]
        if self.streak == thresholds.loss_diverge_patience and not self.is_diverging_reported:
            self.is_diverging_reported = True
            return [_diverging_finding(loss, median, self.streak, report.lr, where)]
        return []

    def _is_surely_below_limit(self, loss: float, thresholds: Thresholds) -> bool:
        """Return True when loss <= spike_limit(history) is known without the MAD, or when there is no limit yet.

        The limit is median + max(loss_spike_mads x MAD, |median|, 1e-8), and float addition is
        monotonic, so a loss at most median + |median| is below it. Most healthy reports stop here.
        Thresholds rejects a non-finite loss_spike_mads, so the first term of max() is never NaN.
        """
        if len(self.history) < thresholds.loss_warmup_steps:
            return True
        median = self.history.median()
        return loss <= median + abs(median)


def _spike_finding(loss: float, median: float, limit: float, where: Where) -> pb.Finding:
    message = (
        f"The loss on rank {where.rank} jumped to {format_number(loss)} at step {where.step}, above the limit "
        f"{format_number(limit)} from its running median {format_number(median)}; a single spike that "
        f"recovers is common, a run of them is not."
    )
    fix = f"Look at the batch of step {where.step} for outliers or label noise; clip gradients if spikes repeat."
    values = {"loss": format_number(loss), "median": format_number(median), "limit": format_number(limit)}
    return new_finding("LOSS_SPIKE", pb.SEVERITY_INFO, where, message=message, fix=fix, values=values)


def _diverging_finding(loss: float, median: float, streak: int, lr: float, where: Where) -> pb.Finding:
    message = (
        f"The loss on rank {where.rank} has stayed above its spike limit for {streak} reports in a row "
        f"({format_number(loss)} at step {where.step} against a running median of {format_number(median)}): "
        f"training is diverging."
    )
    fix = (
        f"Lower the learning rate (now {format_number(lr)}) by 3-10x, add a warm-up and gradient clipping, "
        f"and resume from a checkpoint taken before the loss rose."
    )
    values = {"loss": format_number(loss), "median": format_number(median), "reports": str(streak)}
    return new_finding("LOSS_DIVERGING", pb.SEVERITY_WARNING, where, message=message, fix=fix, values=values)


@dataclass
class RankLossComparer:
    """Compares the losses of every rank at the same step (runs of three ranks or more)."""

    world_size: int
    step_losses: dict[int, dict[int, float]] = field(default_factory=dict)
    spreads: deque[float] = field(default_factory=lambda: deque(maxlen=500))
    streaks: dict[int, int] = field(default_factory=dict)
    reported: set[int] = field(default_factory=set)

    def add(self, run_id: str, rank: int, report: pb.StepReport, thresholds: Thresholds) -> list[pb.Finding]:
        """Record a rank's loss; once every rank reported the step, return LOSS_RANK_OUTLIER findings."""
        loss = observed_finite_loss(report)
        if self.world_size < 3 or loss is None:
            return []
        losses = self.step_losses.setdefault(report.step, {})
        losses[rank] = loss
        if len(losses) < self.world_size:
            return []
        del self.step_losses[report.step]
        for old_step in [step for step in self.step_losses if step < report.step - 100]:
            del self.step_losses[old_step]  # steps some rank never reported
        return self._compare(run_id, report.step, losses, thresholds)

    def _compare(self, run_id: str, step: int, losses: dict[int, float], thresholds: Thresholds) -> list[pb.Finding]:
        others = leave_one_out_medians(losses)
        deviations = {rank: abs(loss - others[rank]) for rank, loss in losses.items()}
        spread = statistics.median(self.spreads) if len(self.spreads) >= 3 * self.world_size else None
        self.spreads.extend(deviations.values())
        if spread is None:
            return []
        scale = max(spread, 1e-3 * abs(statistics.median(losses.values())), 1e-8)
        findings = []
        for rank, deviation in sorted(deviations.items()):
            is_outlier = deviation > thresholds.rank_outlier_factor * scale
            self.streaks[rank] = self.streaks.get(rank, 0) + 1 if is_outlier else 0
            if self.streaks[rank] >= thresholds.rank_outlier_patience and rank not in self.reported:
                self.reported.add(rank)
                where = Where(run_id=run_id, rank=rank, step=step)
                findings.append(_outlier_finding(losses, rank, others[rank], scale, where))
        return findings


def leave_one_out_medians(values: dict[int, float]) -> dict[int, float]:
    """Return, for each key, the median of all the other values; O(n log n) for n values.

    The values are sorted once. Without the value at sorted position i, the remaining
    list reads sorted[k] below i and sorted[k + 1] from i on, so its median is one or
    two of the middle values; equal values give the same remaining list whichever of
    them is left out. The mean of two middles is computed as statistics.median does.
    """
    ordered = sorted(values.values())
    count = len(ordered) - 1
    if count < 1:
        raise ValueError(f"leave_one_out_medians needs at least 2 values, got {len(ordered)}; pass more ranks")
    return {key: _median_without(ordered, bisect.bisect_left(ordered, value), count)
            for key, value in values.items()}


def _median_without(ordered: list[float], position: int, count: int) -> float:
    """Return the median of ordered without the element at position; count is len(ordered) - 1."""
    def remaining(index: int) -> float:
        return ordered[index] if index < position else ordered[index + 1]

    middle = count // 2
    if count % 2 == 1:
        return remaining(middle)
    return (remaining(middle - 1) + remaining(middle)) / 2


def _outlier_finding(losses: dict[int, float], rank: int, others: float, spread: float, where: Where) -> pb.Finding:
    message = (
        f"The loss of rank {rank} is {format_number(losses[rank])} at step {where.step} while the other ranks' "
        f"median is {format_number(others)} (usual spread between ranks {format_number(spread)}), and it has "
        f"been this far off for several steps: rank {rank}'s data shard or its hardware differs."
    )
    fix = (
        f"Check the samples that the sampler gives rank {rank} (DistributedSampler shard) for bad labels or "
        f"scaling, and run a GPU health check on rank {rank}'s device."
    )
    values = {"loss": format_number(losses[rank]), "others_median": format_number(others),
              "spread": format_number(spread)}
    return new_finding("LOSS_RANK_OUTLIER", pb.SEVERITY_WARNING, where, message=message, fix=fix, values=values)


def nonfinite_order(report: pb.StepReport, batch_nonfinite: bool) -> list[str]:
    """Return the non-finite quantities of one step in flow order: parameters (from the previous update) first."""
    order = []
    if report.param_norm != 0.0 and not math.isfinite(report.param_norm):
        order.append("parameters (after the previous update)")
    if batch_nonfinite:
        order.append("batch")
    if report.output_checked and not report.output_finite:
        order.append("model output")
    if not math.isfinite(report.loss) and not report.loss_finite:
        order.append("loss")
    if report.nonfinite_grad_count > 0 or not math.isfinite(report.grad_norm):
        order.append("gradients")
    return order


def order_finding(order: Sequence[str], where: Where) -> pb.Finding:
    """Build the NONFINITE_ORDER note of the first non-finite step of a run."""
    message = (
        f"First non-finite values of the run: rank {where.rank} at step {where.step}, in flow order "
        f"{' -> '.join(order)}; everything after the first one follows from it."
    )
    fix = f"Fix the {order[0]}: the later quantities turned non-finite because of it."
    return new_finding("NONFINITE_ORDER", pb.SEVERITY_INFO, where, message=message, fix=fix,
                       values={"order": " -> ".join(order), "first": order[0]})
