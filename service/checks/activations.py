"""Stages 2 and 3: per-layer activations of the first forward pass (scale across depth, saturation, NaN)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from nanwatch.service.checks.catalog import Where, format_number, new_finding
from nanwatch.service.thresholds import Thresholds
from nanwatch.v1 import nanwatch_pb2 as pb

_SATURATING = {"Sigmoid": "6", "Tanh": "3"}  # |x| beyond which the derivative is below 0.01
_SOFTMAX_TYPES = frozenset({"Softmax", "Softmax2d", "LogSoftmax"})


def is_weight_layer(module_type: str) -> bool:
    """Return whether the module type is a Linear or Conv layer, whose output scale follows its init."""
    return module_type.endswith("Linear") or module_type.startswith(("Conv", "LazyConv"))


def check_activations(
    activations: Sequence[pb.LayerActivation],
    last_leaf: str | None,
    where: Where,
    thresholds: Thresholds,
    *,
    parameters_finite: bool = True,
) -> list[pb.Finding]:
    """Return the findings of the first forward pass's layer statistics.

    last_leaf names the module whose output goes to the loss; a saturated
    Sigmoid there is a warning, elsewhere it is only slow learning (info).
    With non-finite parameters (a watcher attached after an update already
    broke them) a non-finite layer output adds no information and is left out.
    """
    findings = []
    first_bad = first_nonfinite_layer(activations)
    if first_bad is not None and parameters_finite:
        findings.append(_nonfinite_finding(first_bad, where))
    findings += _scale_findings(activations, where, thresholds)
    findings += _saturation_findings(activations, last_leaf, where, thresholds)
    return findings


def first_nonfinite_layer(activations: Sequence[pb.LayerActivation]) -> pb.LayerActivation | None:
    """Return the first layer whose output contains NaN or Inf, in call order."""
    return next((layer for layer in activations if layer.nonfinite_count > 0), None)


def _nonfinite_finding(layer: pb.LayerActivation, where: Where) -> pb.Finding:
    if layer.type in _SOFTMAX_TYPES and layer.input_inf_count > 0 and layer.input_nan_count == 0:
        return _masked_softmax_finding(layer, where)
    name = layer.name or "<root>"
    inputs = ("its input was finite" if layer.input_nan_count + layer.input_inf_count == 0
              else f"its input already held {layer.input_nan_count} NaN and {layer.input_inf_count} Inf")
    message = (
        f"In the first forward pass on rank {where.rank}, {layer.type} '{name}' is the first layer whose "
        f"output is non-finite ({layer.nonfinite_count} of {layer.numel} elements NaN/Inf) and {inputs}."
    )
    fix = (
        f"Look at the computation of '{name}': a parameter that is 0 under a normalization (weight_norm "
        f"of a zero weight), an exp/pow that overflows, or a division or log at 0."
    )
    values = {"nonfinite_count": str(layer.nonfinite_count), "numel": str(layer.numel),
              "input_nan_count": str(layer.input_nan_count), "input_inf_count": str(layer.input_inf_count)}
    return new_finding("FORWARD_NONFINITE", pb.SEVERITY_WARNING, where, message=message, fix=fix,
                       layer=layer.name, values=values)


def _masked_softmax_finding(layer: pb.LayerActivation, where: Where) -> pb.Finding:
    name = layer.name or "<root>"
    message = (
        f"{layer.type} '{name}' on rank {where.rank} gets -inf inputs ({layer.input_inf_count} elements) and "
        f"returns NaN: a row whose every position is masked with -inf computes exp(-inf) / 0 = 0/0."
    )
    fix = (
        f"Leave at least one unmasked position in every row fed to '{name}', fill the mask with "
        f"torch.finfo(x.dtype).min instead of -inf, or zero fully masked rows after the softmax."
    )
    values = {"input_inf_count": str(layer.input_inf_count), "nonfinite_count": str(layer.nonfinite_count)}
    return new_finding("LOSS_MASKED_SOFTMAX", pb.SEVERITY_WARNING, where, message=message, fix=fix,
                       layer=layer.name, values=values)


def _scale_findings(
    activations: Sequence[pb.LayerActivation], where: Where, thresholds: Thresholds
) -> list[pb.Finding]:
    layers = [layer for layer in activations
              if is_weight_layer(layer.type) and layer.nonfinite_count == 0 and math.isfinite(layer.std)]
    if len(layers) < 2 or layers[0].std <= 0.0:
        return []
    first = layers[0]
    largest = max(layers[1:], key=lambda layer: layer.std)
    if largest.std > thresholds.activation_growth_factor * first.std:
        return [_growth_finding(first, largest, where)]
    last = layers[-1]
    if last.std < thresholds.activation_vanish_factor * first.std:
        return [_vanish_finding(first, last, where)]
    return []


def _growth_finding(first: pb.LayerActivation, layer: pb.LayerActivation, where: Where) -> pb.Finding:
    ratio = layer.std / first.std
    message = (
        f"In the first forward pass on rank {where.rank}, the output std grows from "
        f"{format_number(first.std)} at '{first.name}' to {format_number(layer.std)} at '{layer.name}' "
        f"({format_number(ratio)}x, max |x| {format_number(layer.max_abs)}): the weights amplify the "
        f"signal layer by layer, which overflows in float16 and destabilizes training."
    )
    fix = (
        f"Initialize the weights between '{first.name}' and '{layer.name}' with their default init or "
        f"nn.init.kaiming_normal_ / xavier_uniform_, or add normalization layers (LayerNorm/BatchNorm)."
    )
    values = {"first_std": format_number(first.std), "std": format_number(layer.std), "ratio": format_number(ratio),
              "max_abs": format_number(layer.max_abs)}
    return new_finding("ACT_SCALE_GROWTH", pb.SEVERITY_WARNING, where, message=message, fix=fix,
                       layer=layer.name, values=values)


def _vanish_finding(first: pb.LayerActivation, last: pb.LayerActivation, where: Where) -> pb.Finding:
    ratio = last.std / first.std
    message = (
        f"In the first forward pass on rank {where.rank}, the output std shrinks from "
        f"{format_number(first.std)} at '{first.name}' to {format_number(last.std)} at '{last.name}' "
        f"({format_number(ratio)}x): the deep layers get almost no signal and learn slowly."
    )
    fix = (
        f"Use nn.init.kaiming_normal_(nonlinearity='relu') for the layers up to '{last.name}', or add "
        f"normalization layers or residual connections."
    )
    values = {"first_std": format_number(first.std), "std": format_number(last.std), "ratio": format_number(ratio)}
    return new_finding("ACT_SCALE_VANISH", pb.SEVERITY_INFO, where, message=message, fix=fix,
                       layer=last.name, values=values)


def _saturation_findings(
    activations: Sequence[pb.LayerActivation], last_leaf: str | None, where: Where, thresholds: Thresholds
) -> list[pb.Finding]:
    findings = []
    for layer in activations:
        fraction = layer.saturated_fraction
        if layer.type not in _SATURATING or not math.isfinite(fraction):
            continue
        if fraction > thresholds.saturated_fraction_max:
            findings.append(_saturated_finding(layer, layer.name == last_leaf, where))
    return findings


def _saturated_finding(layer: pb.LayerActivation, feeds_loss: bool, where: Where) -> pb.Finding:
    name = layer.name or "<root>"
    tail = _SATURATING[layer.type]
    consequence = (
        "its output reaches exactly 0 or 1, so a log of it in the loss is -inf"
        if feeds_loss else "its gradient is almost 0 there, so the layers before it barely learn"
    )
    message = (
        f"At the start on rank {where.rank}, {format_number(100 * layer.saturated_fraction)}% of the "
        f"inputs of {layer.type} '{name}' have |x| > {tail}, where it is flat: {consequence}."
    )
    fix = (
        f"Scale down the init of the layer feeding '{name}' (Xavier init suits {layer.type}) or normalize "
        f"its input; for a final Sigmoid, use BCEWithLogitsLoss on the logits."
    )
    severity = pb.SEVERITY_WARNING if feeds_loss else pb.SEVERITY_INFO
    values = {"saturated_fraction": format_number(layer.saturated_fraction), "threshold_abs_x": tail}
    return new_finding("ACT_SATURATED", severity, where, message=message, fix=fix, layer=layer.name,
                       values=values)
