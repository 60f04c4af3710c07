"""Stage 5: gradients and updates (non-finite gradients, gradient-norm spikes, non-finite parameters)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from nanwatch.service.checks.catalog import Where, format_list, format_number, new_finding
from nanwatch.service.checks.windows import median_of
from nanwatch.service.thresholds import Thresholds
from nanwatch.v1 import nanwatch_pb2 as pb


def has_nonfinite_gradient(report: pb.StepReport) -> bool:
    """Return whether the report counts a non-finite gradient tensor or has a non-finite grad_norm."""
    return report.nonfinite_grad_count > 0 or not math.isfinite(report.grad_norm)


def nonfinite_gradient_names(report: pb.StepReport) -> list[str]:
    """Return the parameters whose reported gradient norm is NaN or Inf, in report order."""
    return [p.name for p in report.parameter_grad_norms if not math.isfinite(p.grad_norm)]


def nonfinite_gradient_finding(
    report: pb.StepReport, where: Where, thresholds: Thresholds, *, scaler_skips: int = 0
) -> pb.Finding:
    """Build the GRAD_NONFINITE finding of one report.

    scaler_skips is the number of consecutive steps a GradScaler skipped, 0
    when the rank uses no scaler.
    """
    names = nonfinite_gradient_names(report)
    named = f"; non-finite in {format_list(names, thresholds.max_listed)}" if names else ""
    message = (
        f"Gradients on rank {where.rank} at step {where.step} are non-finite: grad_norm "
        f"{format_number(report.grad_norm)}, {report.nonfinite_grad_count} gradient tensors contain "
        f"NaN/Inf{named}."
    )
    if scaler_skips:
        message += (
            f" The GradScaler skipped {scaler_skips} steps in a row and its scale is now "
            f"{format_number(report.loss_scale)}, so the gradients are non-finite at every scale tried."
        )
    fix = (
        f"Find the operation whose backward yields NaN/Inf{_first_name_hint(names)}: rerun step "
        f"{where.step} under torch.autograd.detect_anomaly(), and look for torch.where/masking with "
        f"a non-finite unselected branch, sqrt or pow at 0, and log or division near 0."
    )
    values = {
        "grad_norm": format_number(report.grad_norm),
        "nonfinite_grad_count": str(report.nonfinite_grad_count),
    }
    if names:
        values["nonfinite_parameters"] = format_list(names, thresholds.max_listed)
    if scaler_skips:
        values |= {"scaler_skips": str(scaler_skips), "loss_scale": format_number(report.loss_scale)}
    return new_finding("GRAD_NONFINITE", pb.SEVERITY_CRITICAL, where, message=message, fix=fix,
                       tensor=names[0] if names else "", values=values)


def _first_name_hint(names: Sequence[str]) -> str:
    return f" (the first named parameter is '{names[0]}')" if names else ""


def exploding_limit(history: Sequence[float], thresholds: Thresholds) -> float | None:
    """Return the grad_norm above which a norm counts as a spike, or None during warm-up."""
    if len(history) < thresholds.grad_warmup_steps:
        return None
    median = median_of(history)
    if median <= 0.0:
        return None  # all-zero gradients give no scale to compare against
    return thresholds.grad_explode_factor * median


def exploding_finding(
    report: pb.StepReport,
    limit: float,
    clipping: pb.ClippingInfo | None,
    where: Where,
    thresholds: Thresholds,
    *,
    severity: int = pb.SEVERITY_WARNING,
    streak: int = 1,
) -> pb.Finding:
    """Build the GRAD_EXPLODING finding for a report whose grad_norm is above limit for streak steps in a row."""
    median = limit / thresholds.grad_explode_factor
    ratio = report.grad_norm / median
    message = (
        f"Gradient norm on rank {where.rank} jumped to {format_number(report.grad_norm)} at step "
        f"{where.step}, {format_number(ratio)}x the median {format_number(median)} of its last "
        f"{thresholds.grad_history} finite norms (warns above {format_number(thresholds.grad_explode_factor)}x)."
    )
    if clipping is not None and clipping.enabled:
        fix = (
            f"Clipping at max_norm {format_number(clipping.max_norm)} caps the update; if the spikes "
            f"repeat, lower the learning rate or look for outlier batches at step {where.step}."
        )
    else:
        fix = (
            f"Clip gradients with torch.nn.utils.clip_grad_norm_(model.parameters(), "
            f"max_norm={format_number(median * 5)}) before optimizer.step(), and lower the learning "
            f"rate or add a warm-up if the norm keeps growing."
        )
    values = {"grad_norm": format_number(report.grad_norm), "median": format_number(median),
              "ratio": format_number(ratio)}
    if streak > 1:
        message += f" It has stayed above the limit for {streak} steps in a row."
        values["steps_above_limit"] = str(streak)
    return new_finding("GRAD_EXPLODING", severity, where, message=message, fix=fix, values=values)


def has_nonfinite_parameters(report: pb.StepReport) -> bool:
    """Return whether param_norm is NaN or Inf; 0 (the proto default) means not measured."""
    return not math.isfinite(report.param_norm)


def nonfinite_parameters_finding(report: pb.StepReport, where: Where) -> pb.Finding:
    """Build PARAM_NONFINITE for parameters that turned non-finite while the gradients were finite."""
    message = (
        f"Parameters on rank {where.rank} are non-finite at step {where.step} (param_norm "
        f"{format_number(report.param_norm)}) although the gradients are finite (grad_norm "
        f"{format_number(report.grad_norm)}): an optimizer update produced NaN/Inf."
    )
    fix = (
        f"Check the optimizer for the parameter dtype: an eps that rounds to 0 in float16, a "
        f"learning rate of {format_number(report.lr)} that is too high, or a zero second moment; "
        f"keep float32 master weights with torch.autocast + GradScaler."
    )
    values = {"param_norm": format_number(report.param_norm), "grad_norm": format_number(report.grad_norm),
              "update_norm": format_number(report.update_norm), "lr": format_number(report.lr)}
    return new_finding("PARAM_NONFINITE", pb.SEVERITY_WARNING, where, message=message, fix=fix,
                       values=values)
