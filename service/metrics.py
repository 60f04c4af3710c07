"""Prometheus metrics of the service, on a registry of their own.

Per-rank series multiply by the world size, so the ``rank`` label is optional
(``rank_label=False`` keeps one series per run, fed by rank 0). Series labelled
with a run id exist for at most ``max_runs`` runs at a time, and a finished run's
series are removed ``run_ttl_s`` seconds after its last rank disconnected.

Step reports arrive thousands of times a second, so a report only stores its values
in a plain Python object per rank, and each per-rank gauge reads its value from
there when the registry is collected (Gauge.set_function).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase

from nanwatch.v1 import nanwatch_pb2 as pb

logger = logging.getLogger(__name__)

DEFAULT_MAX_RUNS = 1000
DEFAULT_RUN_TTL_S = 3600.0


class RunSeriesBudget:
    """Decides which runs may hold labelled series: a cap on their number and an expiry of finished runs.

    A run is finished while none of its ranks is connected. When the cap is reached,
    the run that finished earliest gives way to the new one. When every tracked run
    is still connected, the new run gets no series.

    Example:
        budget = RunSeriesBudget(max_runs=2, ttl_s=60.0)
        admitted, evicted = budget.admit("run-1")
    """

    def __init__(self, *, max_runs: int, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if max_runs < 1:
            raise ValueError(f"max_runs={max_runs} must be at least 1; it caps the runs that have metric series")
        if not ttl_s > 0:
            raise ValueError(f"run_ttl_s={ttl_s} must be positive; it is how long a finished run keeps its series")
        self.max_runs = max_runs
        self.ttl_s = ttl_s
        self._clock = clock
        # run id -> clock time since which no rank is connected, or None while one is.
        self._finished_since: dict[str, float | None] = {}
        # Earliest clock time at which a tracked run can expire; saves a scan per observation.
        self._next_expiry = math.inf

    def __len__(self) -> int:
        return len(self._finished_since)

    def __contains__(self, run_id: str) -> bool:
        return run_id in self._finished_since

    def admit(self, run_id: str) -> tuple[bool, list[str]]:
        """Return whether run_id may hold series, and the runs evicted to make room for it."""
        if run_id in self._finished_since:
            return True, []
        evicted = []
        if len(self._finished_since) >= self.max_runs:
            oldest = self._earliest_finished()
            if oldest is None:
                return False, []
            del self._finished_since[oldest]
            evicted.append(oldest)
        # A run that no rank has connected to yet counts as finished from now on.
        self._set_finished(run_id, self._clock())
        return True, evicted

    def mark(self, run_id: str, *, connected: bool) -> None:
        """Record that run_id has a connected rank, or that its last rank disconnected."""
        if run_id in self._finished_since:
            self._set_finished(run_id, None if connected else self._clock())

    def is_expiry_due(self) -> bool:
        """Return whether a tracked run may have expired, so that pop_expired has work to do."""
        return self._clock() >= self._next_expiry

    def pop_expired(self) -> list[str]:
        """Remove and return the runs finished for longer than ttl_s."""
        now = self._clock()
        if now < self._next_expiry:
            return []
        expired = [run_id for run_id, since in self._finished_since.items()
                   if since is not None and now - since >= self.ttl_s]
        for run_id in expired:
            del self._finished_since[run_id]
        pending = [since for since in self._finished_since.values() if since is not None]
        self._next_expiry = min(pending) + self.ttl_s if pending else math.inf
        return expired

    def _set_finished(self, run_id: str, since: float | None) -> None:
        self._finished_since[run_id] = since
        if since is not None:
            self._next_expiry = min(self._next_expiry, since + self.ttl_s)

    def _earliest_finished(self) -> str | None:
        finished = [(since, run_id) for run_id, since in self._finished_since.items() if since is not None]
        return min(finished)[1] if finished else None


class _SweepOnCollect:
    """A collector without samples that expires finished runs before each scrape reads the families."""

    def __init__(self, sweep: Callable[[], None]) -> None:
        self._sweep = sweep

    def collect(self) -> Iterator[object]:
        self._sweep()
        return iter(())


class ServiceMetrics:
    """The service's metric families.

    Example:
        metrics = ServiceMetrics()
        metrics.observe_report("run-1", 0, report)
        prometheus_client.generate_latest(metrics.registry)
    """

    def __init__(
        self, *, rank_label: bool = True, registry: CollectorRegistry | None = None,
        max_runs: int = DEFAULT_MAX_RUNS, run_ttl_s: float = DEFAULT_RUN_TTL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.rank_label = rank_label
        self.budget = RunSeriesBudget(max_runs=max_runs, ttl_s=run_ttl_s, clock=clock)
        # Held while series of a run are written or removed: the scrape thread expires runs too.
        self._lock = threading.RLock()
        step_labels = ["run_id", "rank"] if rank_label else ["run_id"]
        reg = self.registry
        reg.register(_SweepOnCollect(self.expire_finished_runs))

        self.loss = Gauge("nanwatch_loss", "Last reported training loss.", step_labels, registry=reg)
        self.grad_norm = Gauge(
            "nanwatch_grad_norm", "Last reported total L2 gradient norm.", step_labels, registry=reg
        )
        self.step = Gauge("nanwatch_step", "Last reported optimizer step.", step_labels, registry=reg)
        self.loss_scale = Gauge(
            "nanwatch_loss_scale", "Last reported GradScaler loss scale (0 without a scaler).", step_labels,
            registry=reg,
        )
        self.nonfinite_loss = Counter(
            "nanwatch_nonfinite_loss", "Step reports whose loss was NaN or Inf.", ["run_id"], registry=reg
        )
        self.nonfinite_grads = Counter(
            "nanwatch_nonfinite_grads", "Step reports with at least one NaN or Inf gradient.", ["run_id"],
            registry=reg,
        )
        self.skipped_updates = Counter(
            "nanwatch_skipped_updates", "Non-finite updates that a rank skipped under the skip policy.", ["run_id"],
            registry=reg,
        )
        self.findings = Counter(
            "nanwatch_findings", "Findings recorded by the staged checks.",
            ["run_id", "stage", "severity", "code"], registry=reg,
        )
        self.halts = Counter("nanwatch_halts", "Runs halted, by what caused the halt.", ["run_id", "source"], registry=reg)
        self.run_halted = Gauge("nanwatch_run_halted", "1 when the run is halted, else 0.", ["run_id"], registry=reg)
        self.reports = Counter("nanwatch_reports", "Step reports received.", registry=reg)
        self.reports_dropped = Counter(
            "nanwatch_client_reports_dropped", "Step reports that clients dropped because their buffer was full.",
            registry=reg,
        )
        self.batches_checked = Counter("nanwatch_batches_checked", "Whole batches checked.", registry=reg)
        self.active_streams = Gauge("nanwatch_active_streams", "Open Watch streams (one per connected rank).", registry=reg)
        self.rpc_errors = Counter(
            "nanwatch_rpc_errors", "RPCs answered with an error status.", ["method", "code"], registry=reg
        )
        self.report_seconds = Histogram(
            "nanwatch_report_processing_seconds", "Time to check one step report.",
            buckets=(0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5),
            registry=reg,
        )
        self.runs_in_metrics = Gauge(
            "nanwatch_runs_in_metrics", "Runs that currently have series labelled with their run id.", registry=reg
        )
        self.runs_removed = Counter(
            "nanwatch_runs_removed_from_metrics", "Runs whose labelled series were removed, by why.", ["reason"],
            registry=reg,
        )
        self.runs_rejected = Counter(
            "nanwatch_runs_rejected_from_metrics",
            "Observations of a run left out of the metrics because max_runs connected runs already have series.",
            registry=reg,
        )
        # The latest values of each rank with series, by run id and rank; the gauges read them.
        self._rank_series: dict[str, dict[int, _RankSeries]] = {}
        step_names = tuple(step_labels)
        self._run_families: list[tuple[MetricWrapperBase, tuple[str, ...]]] = [
            (self.loss, step_names), (self.grad_norm, step_names), (self.step, step_names),
            (self.loss_scale, step_names), (self.nonfinite_loss, ("run_id",)), (self.nonfinite_grads, ("run_id",)),
            (self.skipped_updates, ("run_id",)), (self.findings, ("run_id", "stage", "severity", "code")), (self.halts, ("run_id", "source")),
            (self.run_halted, ("run_id",)),
        ]

    # ---- which runs have series ----

    def run_connected(self, run_id: str) -> None:
        """Note that a rank of run_id opened its stream; the run's series do not expire meanwhile."""
        with self._lock:
            if self._admit(run_id):
                self.budget.mark(run_id, connected=True)

    def run_finished(self, run_id: str) -> None:
        """Note that no rank of run_id is connected; its series expire run_ttl_s from now."""
        with self._lock:
            self.budget.mark(run_id, connected=False)

    def expire_finished_runs(self) -> None:
        """Remove the series of runs finished for longer than run_ttl_s."""
        with self._lock:
            for run_id in self.budget.pop_expired():
                self._remove_run(run_id, "expired")
            self.runs_in_metrics.set(len(self.budget))

    def _admit(self, run_id: str) -> bool:
        """Return whether run_id may write series, evicting the earliest finished run at the cap."""
        if run_id in self.budget and not self.budget.is_expiry_due():
            return True  # nothing to expire or evict, and runs_in_metrics already counts the run
        self.expire_finished_runs()
        admitted, evicted = self.budget.admit(run_id)
        for old in evicted:
            self._remove_run(old, "cap")
        self.runs_in_metrics.set(len(self.budget))
        if not admitted:
            self.runs_rejected.inc()
            logger.debug("metrics: run %s left out, %d connected runs have series", run_id, self.budget.max_runs)
        return admitted

    def _remove_run(self, run_id: str, reason: str) -> None:
        """Remove every series labelled with run_id from the run-labelled families."""
        self._rank_series.pop(run_id, None)
        for family, names in self._run_families:
            for labels in _label_values(family, names, run_id):
                family.remove(*labels)
        self.runs_removed.labels(reason).inc()
        logger.info("metrics: removed the series of run %s (%s)", run_id, reason)

    # ---- observations ----

    def observe_report(self, run_id: str, rank: int, report: pb.StepReport) -> None:
        """Update the gauges and counters from one step report."""
        self.reports.inc()
        with self._lock:
            if self._admit(run_id):
                self._observe_run_report(run_id, rank, report)

    def _observe_run_report(self, run_id: str, rank: int, report: pb.StepReport) -> None:
        # A rank that observed no loss sends loss=NaN with loss_finite=true.
        if not math.isfinite(report.loss) and not report.loss_finite:
            self.nonfinite_loss.labels(run_id).inc()
        if report.nonfinite_grad_count > 0 or not math.isfinite(report.grad_norm):
            self.nonfinite_grads.labels(run_id).inc()
        if report.update_skipped:
            self.skipped_updates.labels(run_id).inc()
        if not self.rank_label and rank != 0:
            return
        series = self._series_of(run_id, rank)
        series.loss = report.loss
        series.grad_norm = report.grad_norm
        series.step = report.step
        loss_scale = report.loss_scale
        if loss_scale > 0:  # 0 means the rank uses no GradScaler
            if not series.has_loss_scale:
                self.loss_scale.labels(*series.labels).set_function(series.read_loss_scale)
                series.has_loss_scale = True
            series.loss_scale = loss_scale

    def _series_of(self, run_id: str, rank: int) -> _RankSeries:
        """Return the holder of the rank's latest values, creating the rank's series on its first report."""
        by_rank = self._rank_series.setdefault(run_id, {})
        series = by_rank.get(rank)
        if series is None:
            series = _RankSeries(labels=(run_id, str(rank)) if self.rank_label else (run_id,))
            self.loss.labels(*series.labels).set_function(series.read_loss)
            self.grad_norm.labels(*series.labels).set_function(series.read_grad_norm)
            self.step.labels(*series.labels).set_function(series.read_step)
            by_rank[rank] = series
        return series

    def observe_finding(self, finding: pb.Finding) -> None:
        with self._lock:
            if not self._admit(finding.evidence.run_id):
                return
            self.findings.labels(
                finding.evidence.run_id,
                str(finding.stage),
                pb.Severity.Name(finding.severity).removeprefix("SEVERITY_").lower(),
                finding.code,
            ).inc()

    def observe_halt(self, run_id: str, source: str) -> None:
        with self._lock:
            if self._admit(run_id):
                self.halts.labels(run_id, source).inc()
                self.run_halted.labels(run_id).set(1)

    def observe_run(self, run_id: str, *, halted: bool) -> None:
        """Create the run's halted gauge so dashboards see 0 before any halt."""
        with self._lock:
            if self._admit(run_id):
                self.run_halted.labels(run_id).set(1 if halted else 0)


@dataclass(slots=True)
class _RankSeries:
    """The latest values of one rank's report, which its labelled gauges read when collected."""

    labels: tuple[str, ...]
    loss: float = 0.0
    grad_norm: float = 0.0
    step: int = 0
    loss_scale: float = 0.0
    """The latest positive loss scale; the rank has a loss-scale series once it reported one."""
    has_loss_scale: bool = False

    def read_loss(self) -> float:
        return self.loss

    def read_grad_norm(self) -> float:
        return self.grad_norm

    def read_step(self) -> float:
        return self.step

    def read_loss_scale(self) -> float:
        return self.loss_scale


def _label_values(family: MetricWrapperBase, names: tuple[str, ...], run_id: str) -> set[tuple[str, ...]]:
    """Return the label values of family's series whose run_id label is run_id, in label-name order."""
    values: set[tuple[str, ...]] = set()
    for metric in family.collect():
        for sample in metric.samples:
            if sample.labels.get("run_id") == run_id:
                values.add(tuple(sample.labels[name] for name in names))
    return values
