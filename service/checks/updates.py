"""Stage 4 at run time: measured update-to-weight ratio and a collapsing GradScaler scale."""

from __future__ import annotations

import math

from nanwatch.service.checks.catalog import Where, format_number, new_finding
from nanwatch.service.thresholds import Thresholds
from nanwatch.v1 import nanwatch_pb2 as pb


def update_ratio(report: pb.StepReport) -> float | None:
    """Return ||delta w|| / ||w|| of the update before this step, or None when it was not measured."""
    update, weights = report.update_norm, report.param_norm
    if not (math.isfinite(update) and math.isfinite(weights)) or weights <= 0.0:
        return None
    return update / weights


def check_update_ratio(report: pb.StepReport, where: Where, thresholds: Thresholds) -> list[pb.Finding]:
    """Return UPDATE_RATIO_HIGH when one measured update moved the weights by more than update_ratio_max."""
    ratio = update_ratio(report)
    if ratio is None or ratio <= thresholds.update_ratio_max:
        return []
    suggested = report.lr * 1e-3 / ratio if report.lr > 0.0 else 0.0
    message = (
        f"The optimizer update before step {where.step} on rank {where.rank} changed the weights by "
        f"||delta w|| / ||w|| = {format_number(ratio)} (||delta w|| {format_number(report.update_norm)}, "
        f"||w|| {format_number(report.param_norm)}); healthy training moves them by about 1e-3 per step, "
        f"so lr {format_number(report.lr)} is far too large for this model."
    )
    fix = (
        f"Lower the learning rate from {format_number(report.lr)} toward {format_number(suggested)} "
        f"(update ratio near 1e-3), or add a warm-up."
        if suggested > 0.0 else "Lower the learning rate until the update ratio is near 1e-3."
    )
    values = {"update_ratio": format_number(ratio), "update_norm": format_number(report.update_norm),
              "param_norm": format_number(report.param_norm), "lr": format_number(report.lr)}
    return [new_finding("UPDATE_RATIO_HIGH", pb.SEVERITY_WARNING, where, message=message, fix=fix, values=values)]


def check_loss_scale(report: pb.StepReport, where: Where, thresholds: Thresholds) -> list[pb.Finding]:
    """Return LOSS_SCALE_COLLAPSE when a GradScaler's scale fell below loss_scale_min."""
    scale = report.loss_scale
    if scale <= 0.0 or scale >= thresholds.loss_scale_min:
        return []
    halvings = math.log2(65536.0 / scale) if scale > 0.0 else math.inf
    message = (
        f"The GradScaler scale on rank {where.rank} fell to {format_number(scale)} at step {where.step}, "
        f"about {format_number(halvings)} halvings below its default start 65536: the gradients overflow "
        f"even unscaled, so the scaler keeps skipping steps and the model stops learning."
    )
    fix = (
        "Find the operation that overflows in float16 (an activation above 65504, a large loss sum): "
        "normalize its input, compute the loss in float32, or autocast to bfloat16."
    )
    values = {"loss_scale": format_number(scale), "loss_scale_min": format_number(thresholds.loss_scale_min)}
    return [new_finding("LOSS_SCALE_COLLAPSE", pb.SEVERITY_WARNING, where, message=message, fix=fix, values=values)]
