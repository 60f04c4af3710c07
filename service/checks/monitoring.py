"""Stage 6: the loss over time (a non-finite loss)."""

from __future__ import annotations

import math

from nanwatch.service.checks.catalog import Where, format_number, new_finding
from nanwatch.v1 import nanwatch_pb2 as pb


def has_nonfinite_loss(report: pb.StepReport) -> bool:
    """Return whether the rank observed a NaN or Inf loss in this step.

    A rank that observed no loss sends loss=NaN with loss_finite=true, so a
    NaN value counts only when loss_finite is false (its proto3 default).
    """
    return not math.isfinite(report.loss) and not report.loss_finite


def check_loss(report: pb.StepReport, where: Where) -> list[pb.Finding]:
    """Return LOSS_NONFINITE when the loss of the report is NaN or Inf."""
    if not has_nonfinite_loss(report):
        return []
    gradients = "non-finite" if not math.isfinite(report.grad_norm) else format_number(report.grad_norm)
    message = (
        f"Loss on rank {where.rank} is {format_number(report.loss)} at step {where.step} "
        f"(grad_norm {gradients}, lr {format_number(report.lr)})."
    )
    fix = (
        f"Find the first non-finite value of step {where.step}: check the batch tensors, then the "
        f"activations with forward hooks (torch.isfinite on each module output), then the "
        f"parameters; the data and initialization findings of this run point at the usual causes."
    )
    values = {"loss": format_number(report.loss), "grad_norm": format_number(report.grad_norm),
              "lr": format_number(report.lr)}
    return [new_finding("LOSS_NONFINITE", pb.SEVERITY_CRITICAL, where, message=message, fix=fix,
                        values=values)]
