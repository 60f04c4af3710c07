"""Every check code the engine can emit, and the helper that builds a Finding for one."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from nanwatch.v1 import nanwatch_pb2 as pb


@dataclass(frozen=True)
class CheckSpec:
    """One row of the staged checklist."""

    stage: int
    """Stage number, a value of the proto's Stage enum (1 data ... 6 monitoring)."""
    code: str
    """Stable machine-readable code, such as "DATA_NONFINITE"."""
    name: str
    """Human-readable name of the check, phrased as the healthy condition."""
    fix: str
    """Generic fix; findings carry a fix with the run's own names and numbers."""


CHECKS: tuple[CheckSpec, ...] = (
    CheckSpec(1, "DATA_NONFINITE", "Batch tensors are finite",
              "Drop or mask samples with NaN/Inf before the forward pass, or fix the data source."),
    CheckSpec(1, "DATA_TARGET_RANGE", "Class targets are in [0, num_classes)",
              "Map the labels to 0..num_classes-1, or give the last layer one output per class."),
    CheckSpec(1, "DATA_RANK_SCALE", "Every rank's batches are on the same scale",
              "Normalize every data shard the same way; compare per-shard mean and std."),
    CheckSpec(1, "DATA_FP16_OVERFLOW", "Batch values fit the float16 range (max 65504)",
              "Normalize the inputs, or train this tensor's path in bfloat16 or float32."),
    CheckSpec(1, "DATA_CONSTANT", "No constant batch tensor at a non-finite step",
              "Guard normalizations with an eps (x / (x.std() + 1e-6)) or drop constant features."),
    CheckSpec(1, "DATA_NOT_NORMALIZED", "Inputs are roughly normalized",
              "Standardize the inputs ((x - mean) / std over the training set)."),
    CheckSpec(2, "INIT_NONFINITE", "Initial parameters are finite",
              "Re-initialize the parameter, or load a checkpoint without NaN/Inf."),
    CheckSpec(2, "INIT_ALL_ZERO", "Weight matrices are not all zero",
              "Initialize weight matrices randomly (nn.init.kaiming_uniform_ or xavier_uniform_)."),
    CheckSpec(2, "INIT_CONSTANT", "Weight matrices are not constant",
              "Initialize weight matrices randomly so that units break symmetry."),
    CheckSpec(2, "INIT_SCALE", "Linear/Conv weight scale is in the Kaiming/Xavier range",
              "Use the module's default init, nn.init.kaiming_normal_ or nn.init.xavier_uniform_."),
    CheckSpec(2, "ACT_SCALE_GROWTH", "Activation scale does not grow with depth in the first forward pass",
              "Scale the weight init down (Kaiming/Xavier) or add normalization layers."),
    CheckSpec(2, "ACT_SCALE_VANISH", "Activation scale does not vanish with depth in the first forward pass",
              "Use Kaiming init for ReLU networks, or add normalization layers or residual connections."),
    CheckSpec(2, "ACT_SATURATED", "Sigmoid/Tanh inputs are not saturated at the start",
              "Scale the weights feeding the Sigmoid/Tanh down, or normalize its input."),
    CheckSpec(3, "FORWARD_NONFINITE", "The forward pass stays finite on finite inputs",
              "Find the first layer whose output is non-finite and guard its exp/log/division."),
    CheckSpec(3, "LOSS_SIGMOID_BCE", "No Sigmoid output fed into BCELoss",
              "Drop the final Sigmoid and use nn.BCEWithLogitsLoss on the logits."),
    CheckSpec(3, "LOSS_SOFTMAX_LOG", "No Softmax output fed into a log or NLLLoss",
              "Use nn.LogSoftmax with NLLLoss, or nn.CrossEntropyLoss on the logits."),
    CheckSpec(3, "LOSS_DOUBLE_SOFTMAX", "No Softmax output fed into CrossEntropyLoss",
              "Drop the final Softmax: CrossEntropyLoss applies log-softmax to the logits itself."),
    CheckSpec(3, "LOSS_BCE_FP16", "BCELoss does not run on float16 probabilities",
              "Use nn.BCEWithLogitsLoss on the logits, which is safe under float16 autocast."),
    CheckSpec(3, "LOSS_MASKED_SOFTMAX", "No softmax row is fully masked",
              "Leave at least one unmasked position per row, or fill masks with a large negative finite value."),
    CheckSpec(3, "LOSS_LOG_ZERO", "The loss stays finite on finite model outputs",
              "Clamp the argument of the log (torch.log(p.clamp_min(1e-7))) or use a log-space loss."),
    CheckSpec(3, "LOSS_UNDEFINED", "The loss function computes no 0/0 or inf - inf",
              "Guard the divisions and subtractions of the loss with an eps or a mask."),
    CheckSpec(3, "LOSS_BACKWARD_NONFINITE", "Gradients stay finite when the forward pass is finite",
              "Avoid sqrt/norm/pow at 0 and torch.where with a non-finite unselected branch."),
    CheckSpec(4, "LR_TOO_HIGH", "Learning rate is in the optimizer's usual range",
              "Lower the learning rate into the optimizer's usual range, or add a warm-up."),
    CheckSpec(4, "OPTIMIZER_EPS_FP16", "Optimizer eps is representable in float16",
              "Keep float32 weights with torch.autocast + GradScaler, or raise eps to about 1e-4."),
    CheckSpec(4, "UPDATE_RATIO_HIGH", "Update-to-weight ratio ||delta w|| / ||w|| stays small",
              "Lower the learning rate until the update ratio is near 1e-3."),
    CheckSpec(4, "AMP_NO_SCALER", "float16 autocast runs with a GradScaler",
              "Wrap backward and step with torch.amp.GradScaler, or autocast to bfloat16."),
    CheckSpec(4, "LOSS_SCALE_COLLAPSE", "The GradScaler scale stays above 1",
              "Find the overflowing operation (the scale halves on every inf/NaN gradient)."),
    CheckSpec(4, "WEIGHT_DECAY_EXTREME", "Weight decay times lr stays below 1",
              "Lower weight_decay so that lr x weight_decay is far below 1."),
    CheckSpec(4, "MOMENTUM_EXTREME", "Momentum is below 1 and the effective lr is usual",
              "Use momentum below 1 (0.9 is usual) and lower lr accordingly."),
    CheckSpec(5, "GRAD_NONFINITE", "Gradients are finite",
              "Find the operation whose backward produces NaN/Inf (torch.autograd.detect_anomaly)."),
    CheckSpec(5, "GRAD_EXPLODING", "Gradient norm has no spikes",
              "Clip gradients with clip_grad_norm_, lower the learning rate or add a warm-up."),
    CheckSpec(5, "GRAD_GROWTH", "Gradient norm does not grow exponentially",
              "Lower the learning rate and clip gradients with clip_grad_norm_."),
    CheckSpec(5, "GRAD_NO_CLIPPING", "Gradient clipping is configured",
              "Clip gradients with torch.nn.utils.clip_grad_norm_ before optimizer.step()."),
    CheckSpec(5, "GRAD_CLIP_NONFINITE", "Clipping never sees a non-finite total norm",
              "Skip the step when the norm is non-finite (clip_grad_norm_(..., error_if_nonfinite=True))."),
    CheckSpec(5, "GRAD_LAYER_RATIO", "Per-layer gradient norms are balanced across depth",
              "Use Kaiming/Xavier init, normalization layers or residual connections."),
    CheckSpec(5, "PARAM_NONFINITE", "Parameters stay finite after optimizer updates",
              "Check the optimizer's eps and lr for the parameter dtype."),
    CheckSpec(6, "LOSS_NONFINITE", "Loss is finite",
              "Look at the first non-finite input, activation or parameter of that step."),
    CheckSpec(6, "LOSS_SPIKE", "Loss has no spikes against its running median",
              "Look at the batch of the spike step for outliers."),
    CheckSpec(6, "LOSS_DIVERGING", "Loss does not stay far above its running median",
              "Lower the learning rate, add a warm-up and clip gradients."),
    CheckSpec(6, "LOSS_RANK_OUTLIER", "Every rank's loss is close to the other ranks'",
              "Check that rank's data shard and its hardware."),
    CheckSpec(6, "REPLAY_NOT_REPRODUCED", "A replay of a non-finite step reproduces it",
              "Check the rank's hardware and non-deterministic kernels; the model itself stayed finite."),
    CheckSpec(6, "NONFINITE_ORDER", "Order in which values first went non-finite",
              "Fix the earliest non-finite quantity; the later ones follow from it."),
)

_SPECS_BY_CODE: dict[str, CheckSpec] = {spec.code: spec for spec in CHECKS}


def spec_for(code: str) -> CheckSpec:
    """Return the CheckSpec of a code; raises KeyError naming the code when it is not in CHECKS."""
    try:
        return _SPECS_BY_CODE[code]
    except KeyError:
        raise KeyError(f"check code {code!r} is not in CHECKS; add a CheckSpec for it") from None


def format_number(value: float) -> str:
    """Format a measured value for display: "nan", "inf", "-inf" or 4 significant digits."""
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.4g}"


def format_list(items: Iterable[object], limit: int) -> str:
    """Join the first `limit` items with ", " and append how many more there are."""
    listed = list(items)
    shown = ", ".join(str(item) for item in listed[:limit])
    if len(listed) > limit:
        shown += f" and {len(listed) - limit} more"
    return shown


@dataclass(frozen=True, kw_only=True)
class Where:
    """Run, rank and step that a finding belongs to; step is -1 for facts known before the first step."""

    run_id: str
    rank: int
    step: int = -1


def new_finding(
    code: str,
    severity: int,
    where: Where,
    *,
    message: str,
    fix: str,
    tensor: str = "",
    layer: str = "",
    values: Mapping[str, str] | None = None,
    sample_indices: Iterable[int] = (),
) -> pb.Finding:
    """Build a Finding for a code of CHECKS; id and created_unix_s stay empty for the service to set."""
    evidence = pb.Evidence(
        run_id=where.run_id,
        rank=where.rank,
        step=where.step,
        tensor=tensor,
        layer=layer,
        values=dict(values or {}),
        sample_indices=list(sample_indices),
    )
    return pb.Finding(
        stage=spec_for(code).stage,
        severity=severity,
        code=code,
        message=message,
        fix=fix,
        evidence=evidence,
    )
