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
    CheckSpec(2, "INIT_NONFINITE", "Initial parameters are finite",
              "Re-initialize the parameter, or load a checkpoint without NaN/Inf."),
    CheckSpec(2, "INIT_ALL_ZERO", "Weight matrices are not all zero",
              "Initialize weight matrices randomly (nn.init.kaiming_uniform_ or xavier_uniform_)."),
    CheckSpec(2, "INIT_CONSTANT", "Weight matrices are not constant",
              "Initialize weight matrices randomly so that units break symmetry."),
    CheckSpec(2, "INIT_SCALE", "Linear/Conv weight scale is in the Kaiming/Xavier range",
              "Use the module's default init, nn.init.kaiming_normal_ or nn.init.xavier_uniform_."),
    CheckSpec(3, "LOSS_SIGMOID_BCE", "No Sigmoid output fed into BCELoss",
              "Drop the final Sigmoid and use nn.BCEWithLogitsLoss on the logits."),
    CheckSpec(3, "LOSS_SOFTMAX_LOG", "No Softmax output fed into a log or NLLLoss",
              "Use nn.LogSoftmax with NLLLoss, or nn.CrossEntropyLoss on the logits."),
    CheckSpec(4, "LR_TOO_HIGH", "Learning rate is in the optimizer's usual range",
              "Lower the learning rate into the optimizer's usual range, or add a warm-up."),
    CheckSpec(4, "OPTIMIZER_EPS_FP16", "Optimizer eps is representable in float16",
              "Keep float32 weights with torch.autocast + GradScaler, or raise eps to about 1e-4."),
    CheckSpec(5, "GRAD_NONFINITE", "Gradients are finite",
              "Find the operation whose backward produces NaN/Inf (torch.autograd.detect_anomaly)."),
    CheckSpec(5, "GRAD_EXPLODING", "Gradient norm has no spikes",
              "Clip gradients with clip_grad_norm_, lower the learning rate or add a warm-up."),
    CheckSpec(5, "PARAM_NONFINITE", "Parameters stay finite after optimizer updates",
              "Check the optimizer's eps and lr for the parameter dtype."),
    CheckSpec(6, "LOSS_NONFINITE", "Loss is finite",
              "Look at the first non-finite input, activation or parameter of that step."),
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
