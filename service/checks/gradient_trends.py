"""Stage 5 over time: exponential gradient growth, clipping advice, clipping of a non-finite norm, depth balance."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

from nanwatch.service.checks.catalog import Where, format_number, new_finding
from nanwatch.service.thresholds import Thresholds
from nanwatch.v1 import nanwatch_pb2 as pb


def is_growing(history: Sequence[float], thresholds: Thresholds) -> bool:
    """Return whether the last grad_growth_window norms rose at every step and by more than grad_growth_factor."""
    size, count = thresholds.grad_growth_window, len(history)
    # Most reports end here: the window must rise at its last step too (size is at least 3).
    if count < size or history[count - 1] <= history[count - 2]:
        return False
    window = [history[index] for index in range(count - size, count)]
    if window[0] <= 0.0:
        return False
    rises = all(later > earlier for earlier, later in zip(window, window[1:]))
    return rises and window[-1] > thresholds.grad_growth_factor * window[0]


def growth_finding(history: Sequence[float], where: Where, thresholds: Thresholds) -> pb.Finding:
    """Build GRAD_GROWTH from the window of norms that rose steadily."""
    window = list(history)[-thresholds.grad_growth_window:]
    steps = len(window) - 1
    per_step = (window[-1] / window[0]) ** (1.0 / steps)
    message = (
        f"The gradient norm on rank {where.rank} rose at every one of the last {steps} steps, from "
        f"{format_number(window[0])} to {format_number(window[-1])} at step {where.step} (x{format_number(per_step)} "
        f"per step): the updates feed back into larger gradients and the run is diverging."
    )
    fix = (
        f"Lower the learning rate (by 10x as a start), add a warm-up, and clip with "
        f"torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm={format_number(suggest_max_norm(window[:1]))})."
    )
    values = {"first_norm": format_number(window[0]), "grad_norm": format_number(window[-1]),
              "growth_per_step": format_number(per_step), "steps": str(steps)}
    return new_finding("GRAD_GROWTH", pb.SEVERITY_WARNING, where, message=message, fix=fix, values=values)


def suggest_max_norm(healthy_norms: Sequence[float]) -> float:
    """Return a clipping threshold from healthy norms: twice their 90th percentile, 1.0 without history."""
    finite = sorted(norm for norm in healthy_norms if math.isfinite(norm) and norm > 0.0)
    if not finite:
        return 1.0
    if len(finite) == 1:
        return 2.0 * finite[0]
    return 2.0 * statistics.quantiles(finite, n=10, method="inclusive")[-1]


# A norm above this multiple of the lower quartile of a rank's recent norms counts as exploding.
EXPLODING_OVER_LOWER_QUARTILE = 10.0


def healthy_norms(norms: Sequence[float]) -> list[float]:
    """Return the finite positive norms at most EXPLODING_OVER_LOWER_QUARTILE times their lower quartile.

    A run that diverged before its gradients turned non-finite ends its history with
    norms that grew by orders of magnitude. A threshold taken from those would clip nothing.
    """
    finite = [norm for norm in norms if math.isfinite(norm) and norm > 0.0]
    if len(finite) < 4:
        return finite
    lower_quartile = statistics.quantiles(finite, n=4, method="inclusive")[0]
    return [norm for norm in finite if norm <= EXPLODING_OVER_LOWER_QUARTILE * lower_quartile]


def no_clipping_finding(recent_norms: Sequence[float], trigger: str, where: Where) -> pb.Finding:
    """Build the GRAD_NO_CLIPPING advice, sent once when a gradient problem shows up in a run without clipping.

    The suggested max_norm comes from the recent norms without the exploding ones (see healthy_norms).
    """
    healthy = healthy_norms(recent_norms)
    max_norm = suggest_max_norm(healthy)
    message = (
        f"Rank {where.rank} trains without gradient clipping and showed {trigger} at step {where.step}; "
        f"the healthy gradient norms so far had a median of "
        f"{format_number(statistics.median(healthy)) if healthy else 'n/a'}."
    )
    fix = (
        f"Call torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm={format_number(max_norm)}) "
        f"between loss.backward() and optimizer.step() (twice the 90th percentile of the healthy norms)."
    )
    values = {"suggested_max_norm": format_number(max_norm), "healthy_norms": str(len(healthy)),
              "exploding_norms": str(len(recent_norms) - len(healthy))}
    # A warning, so that the checklist row "Gradient clipping is configured" does not read "pass".
    return new_finding("GRAD_NO_CLIPPING", pb.SEVERITY_WARNING, where, message=message, fix=fix, values=values)


def clip_nonfinite_finding(report: pb.StepReport, max_norm: float, where: Where) -> pb.Finding:
    """Build GRAD_CLIP_NONFINITE: clipping met a non-finite total norm, which it spreads to every gradient."""
    total = report.clip_total_norm if report.clip_max_norm > 0.0 else report.grad_norm
    message = (
        f"clip_grad_norm_ on rank {where.rank} at step {where.step} got a total norm of "
        f"{format_number(total)} (max_norm {format_number(max_norm)}): it multiplies every gradient by "
        f"max_norm / total_norm, which turns all of them NaN, so clipping cannot rescue this step."
    )
    fix = (
        f"Call clip_grad_norm_(..., max_norm={format_number(max_norm)}, error_if_nonfinite=True) or skip "
        f"the step when the returned norm is not finite, and fix the first non-finite gradient."
    )
    values = {"total_norm": format_number(total), "max_norm": format_number(max_norm)}
    return new_finding("GRAD_CLIP_NONFINITE", pb.SEVERITY_WARNING, where, message=message, fix=fix, values=values)


def check_layer_ratio(
    report: pb.StepReport, weight_names: Sequence[str], where: Where, thresholds: Thresholds
) -> list[pb.Finding]:
    """Return GRAD_LAYER_RATIO when the first and last Linear/Conv weights' grad norms differ by a huge factor.

    Gradients much larger near the input (exploding with depth) are a warning;
    much smaller near the input (vanishing) are info, since they slow training
    but produce no NaN.
    """
    norms = {norm.name: norm.grad_norm for norm in report.parameter_grad_norms}
    layers = [(name, norms[name]) for name in weight_names if name in norms and math.isfinite(norms[name])]
    if len(layers) < 2 or layers[-1][1] <= 0.0 or layers[0][1] <= 0.0:
        return []
    (first, first_norm), (last, last_norm) = layers[0], layers[-1]
    ratio = first_norm / last_norm
    if 1.0 / thresholds.layer_grad_ratio_max <= ratio <= thresholds.layer_grad_ratio_max:
        return []
    exploding = ratio > 1.0
    trend = "explode toward the input" if exploding else "vanish toward the input"
    message = (
        f"At step {where.step} on rank {where.rank} the gradient norm of '{first}' is {format_number(first_norm)} "
        f"and of '{last}' {format_number(last_norm)} ({format_number(ratio)}x): gradients {trend}."
    )
    fix = (
        "Use Kaiming/Xavier init for every layer, add normalization layers or residual connections, and clip "
        "gradients." if exploding else
        "Use ReLU-family activations with Kaiming init, normalization layers or residual connections."
    )
    severity = pb.SEVERITY_WARNING if exploding else pb.SEVERITY_INFO
    values = {"first_layer_grad_norm": format_number(first_norm), "last_layer_grad_norm": format_number(last_norm),
              "ratio": format_number(ratio)}
    return [new_finding("GRAD_LAYER_RATIO", severity, where, message=message, fix=fix, tensor=first, values=values)]
