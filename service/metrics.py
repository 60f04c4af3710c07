"""Prometheus metrics of the service, on a registry of their own.

Per-rank series multiply by the world size, so the ``rank`` label is optional
(``rank_label=False`` keeps one series per run, fed by rank 0).
"""

from __future__ import annotations

import math

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from nanwatch.v1 import nanwatch_pb2 as pb


class ServiceMetrics:
    """The service's metric families.

    Example:
        metrics = ServiceMetrics()
        metrics.observe_report("run-1", 0, report)
        prometheus_client.generate_latest(metrics.registry)
    """

    def __init__(self, *, rank_label: bool = True, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.rank_label = rank_label
        step_labels = ["run_id", "rank"] if rank_label else ["run_id"]
        reg = self.registry

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

    def observe_report(self, run_id: str, rank: int, report: pb.StepReport) -> None:
        """Update the gauges and counters from one step report."""
        self.reports.inc()
        # A rank that observed no loss sends loss=NaN with loss_finite=true.
        if not math.isfinite(report.loss) and not report.loss_finite:
            self.nonfinite_loss.labels(run_id).inc()
        if report.nonfinite_grad_count > 0 or not math.isfinite(report.grad_norm):
            self.nonfinite_grads.labels(run_id).inc()
        if not self.rank_label and rank != 0:
            return
        labels = (run_id, str(rank)) if self.rank_label else (run_id,)
        self.loss.labels(*labels).set(report.loss)
        self.grad_norm.labels(*labels).set(report.grad_norm)
        self.step.labels(*labels).set(report.step)
        if report.loss_scale > 0:  # 0 means the rank uses no GradScaler
            self.loss_scale.labels(*labels).set(report.loss_scale)

    def observe_finding(self, finding: pb.Finding) -> None:
        self.findings.labels(
            finding.evidence.run_id,
            str(finding.stage),
            pb.Severity.Name(finding.severity).removeprefix("SEVERITY_").lower(),
            finding.code,
        ).inc()

    def observe_halt(self, run_id: str, source: str) -> None:
        self.halts.labels(run_id, source).inc()
        self.run_halted.labels(run_id).set(1)

    def observe_run(self, run_id: str, *, halted: bool) -> None:
        """Create the run's halted gauge so dashboards see 0 before any halt."""
        self.run_halted.labels(run_id).set(1 if halted else 0)
