"""Stage 4: optimizer hyperparameters (learning rate range, eps against the parameter dtype)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from nanwatch.service.checks.catalog import Where, format_number, new_finding
from nanwatch.service.thresholds import Thresholds
from nanwatch.v1 import nanwatch_pb2 as pb

# Upper end of the learning rates commonly used with each optimizer, keyed by the
# lower-case class name. These are rules of thumb from the optimizers' defaults and
# usual recipes, not limits: LR_TOO_HIGH fires only at Thresholds.lr_far_above_factor
# times these values. SGD with large-batch linear scaling reaches a few units.
USUAL_MAX_LR: dict[str, float] = {
    "sgd": 1.0,
    "asgd": 1.0,
    "lbfgs": 1.0,
    "adadelta": 1.0,  # default lr 1.0 scales an already normalized step
    "adagrad": 0.1,
    "rprop": 0.1,
    "rmsprop": 1e-2,
    "adam": 1e-2,
    "adamw": 1e-2,
    "nadam": 1e-2,
    "radam": 1e-2,
    "adamax": 1e-2,
    "sparseadam": 1e-2,
    "adafactor": 1e-2,
    "lamb": 1e-2,
    "lion": 1e-3,  # Lion's sign update needs a lr 3-10x below Adam's
}

# Optimizers that divide by sqrt(second moment) + eps, so eps guards a division.
_EPS_DIVIDING = frozenset({"adam", "adamw", "nadam", "radam", "adamax", "sparseadam",
                           "rmsprop", "adagrad", "adadelta"})
_FLOAT16_NAMES = frozenset({"float16", "half"})
# eps below 2**-25 rounds to 0 in float16.
FLOAT16_ROUNDS_TO_ZERO = 2.0**-25


def usual_max_lr(optimizer_type: str) -> float | None:
    """Return the usual upper lr of an optimizer class name, or None when the type is not in the table.

    Names outside the table that contain "adam" (FusedAdam, Adam8bit) count as Adam.
    """
    name = optimizer_type.strip().lower()
    if name in USUAL_MAX_LR:
        return USUAL_MAX_LR[name]
    if "adam" in name:
        return USUAL_MAX_LR["adam"]
    return None


def check_learning_rate(
    optimizer: pb.OptimizerInfo, where: Where, thresholds: Thresholds
) -> list[pb.Finding]:
    """Return LR_TOO_HIGH when lr is far above the usual range of the optimizer type."""
    usual_max = usual_max_lr(optimizer.type)
    if usual_max is None:
        return []
    limit = usual_max * thresholds.lr_far_above_factor
    if optimizer.lr <= limit:
        return []
    message = (
        f"{optimizer.type} on rank {where.rank} starts with lr {format_number(optimizer.lr)}, "
        f"more than {format_number(thresholds.lr_far_above_factor)}x the usual upper value "
        f"{format_number(usual_max)} for {optimizer.type}; the first updates can overshoot and diverge."
    )
    fix = (
        f"Lower the {optimizer.type} lr from {format_number(optimizer.lr)} to {format_number(usual_max)} "
        f"or less, or reach it through a warm-up schedule with gradient clipping."
    )
    values = {"optimizer": optimizer.type, "lr": format_number(optimizer.lr),
              "usual_max_lr": format_number(usual_max)}
    return [new_finding("LR_TOO_HIGH", pb.SEVERITY_WARNING, where, message=message, fix=fix, values=values)]


def is_lr_checked(optimizer: pb.OptimizerInfo) -> bool:
    """Return whether the lr table covers this optimizer type."""
    return usual_max_lr(optimizer.type) is not None


def float16_parameters(parameters: Sequence[pb.ParameterInfo]) -> list[str]:
    """Return the names of parameters stored in float16 ("float16", "torch.float16" or "half")."""
    return [p.name for p in parameters if p.dtype.removeprefix("torch.") in _FLOAT16_NAMES]


def is_eps_checked(optimizer: pb.OptimizerInfo) -> bool:
    """Return whether the optimizer divides by an eps-guarded root and reports its eps."""
    return optimizer.type.strip().lower() in _EPS_DIVIDING and "eps" in optimizer.hyperparameters


def check_eps_for_float16(
    optimizer: pb.OptimizerInfo,
    parameters: Sequence[pb.ParameterInfo],
    where: Where,
    thresholds: Thresholds,
) -> list[pb.Finding]:
    """Return OPTIMIZER_EPS_FP16 when float16 parameters train with an eps float16 cannot hold."""
    if not is_eps_checked(optimizer):
        return []
    eps = optimizer.hyperparameters["eps"]
    half_names = float16_parameters(parameters)
    if not half_names or eps >= thresholds.fp16_eps_min:
        return []
    if eps < FLOAT16_ROUNDS_TO_ZERO:
        effect = "rounds to 0 in float16, so m / (sqrt(v) + eps) is 0/0 = NaN or x/0 = inf"
    else:
        effect = "is subnormal in float16, so m / (sqrt(v) + eps) can be huge"
    message = (
        f"{optimizer.type} eps {format_number(eps)} on rank {where.rank} {effect} wherever the "
        f"second moment v is 0 or underflows. Float16 parameters: {len(half_names)}, "
        f"first '{half_names[0]}'. The weights can turn NaN/Inf after the first step."
    )
    fix = (
        "Keep float32 weights and optimizer state (torch.autocast(dtype=torch.float16) with "
        f"torch.amp.GradScaler instead of model.half()), or raise {optimizer.type} eps from "
        f"{format_number(eps)} to about 1e-4."
    )
    values = {"optimizer": optimizer.type, "eps": format_number(eps),
              "float16_parameters": str(len(half_names))}
    return [new_finding("OPTIMIZER_EPS_FP16", pb.SEVERITY_WARNING, where, message=message, fix=fix,
                        tensor=half_names[0], values=values)]


# Optimizers whose weight decay shrinks the weights directly by lr x weight_decay each step.
_DECOUPLED_DECAY = frozenset({"sgd", "adamw", "lion", "asgd"})


def check_weight_decay(optimizer: pb.OptimizerInfo, where: Where) -> list[pb.Finding]:
    """Return WEIGHT_DECAY_EXTREME when lr x weight_decay >= 1 for an optimizer that shrinks weights by it.

    Each step multiplies the weights by (1 - lr x weight_decay): at 1 they are
    zeroed, above 1 they flip sign, and above 2 they grow without bound.
    """
    decay = optimizer.hyperparameters.get("weight_decay", 0.0)
    product = optimizer.lr * decay
    if optimizer.type.strip().lower() not in _DECOUPLED_DECAY or product < 1.0:
        return []
    outcome = "grow without bound" if product > 2.0 else "flip sign every step"
    message = (
        f"{optimizer.type} on rank {where.rank} has lr {format_number(optimizer.lr)} and weight_decay "
        f"{format_number(decay)}: every step multiplies the weights by 1 - {format_number(product)}, so "
        f"they {outcome}."
    )
    fix = (
        f"Lower weight_decay from {format_number(decay)} to about {format_number(0.01 / max(optimizer.lr, 1e-12))} "
        f"or less (lr x weight_decay near 1e-2 at most)."
    )
    values = {"lr": format_number(optimizer.lr), "weight_decay": format_number(decay),
              "lr_x_weight_decay": format_number(product)}
    return [new_finding("WEIGHT_DECAY_EXTREME", pb.SEVERITY_WARNING, where, message=message, fix=fix,
                        values=values)]


def check_momentum(optimizer: pb.OptimizerInfo, where: Where, thresholds: Thresholds) -> list[pb.Finding]:
    """Return MOMENTUM_EXTREME when momentum >= 1, or lr / (1 - momentum) is far above the usual lr."""
    momentum = optimizer.hyperparameters.get("momentum", 0.0)
    usual_max = usual_max_lr(optimizer.type)
    if momentum <= 0.0:
        return []
    if momentum >= 1.0:
        effect = "the velocity never decays, so every gradient is added up forever and the steps grow"
        effective = math.inf
    else:
        effective = optimizer.lr / (1.0 - momentum)
        if usual_max is None or effective <= usual_max * thresholds.lr_far_above_factor:
            return []
        effect = f"the effective step size lr / (1 - momentum) is {format_number(effective)}"
    message = f"{optimizer.type} on rank {where.rank} has momentum {format_number(momentum)} and lr {format_number(optimizer.lr)}: {effect}."
    limit = usual_max if usual_max is not None else 1.0
    if momentum >= 1.0:
        fix = f"Use momentum 0.9 (or at most 0.99) and keep lr / (1 - momentum) below {format_number(limit)}."
    else:
        fix = (f"Lower lr to at most {format_number(limit * (1.0 - momentum))}, so that lr / (1 - momentum) "
               f"stays below {format_number(limit)}, or lower the momentum.")
    values = {"momentum": format_number(momentum), "lr": format_number(optimizer.lr),
              "effective_lr": format_number(effective)}
    return [new_finding("MOMENTUM_EXTREME", pb.SEVERITY_WARNING, where, message=message, fix=fix, values=values)]


def check_autocast_scaler(autocast_dtype: str, has_scaler: bool, where: Where) -> list[pb.Finding]:
    """Return AMP_NO_SCALER when float16 autocast runs without a GradScaler."""
    if autocast_dtype.removeprefix("torch.") not in _FLOAT16_NAMES or has_scaler:
        return []
    message = (
        f"Rank {where.rank} runs the forward pass under float16 autocast without a GradScaler: small "
        f"gradients underflow to 0 in float16 and large ones overflow to inf, and nothing skips the "
        f"poisoned step."
    )
    fix = (
        "Create scaler = torch.amp.GradScaler() and use scaler.scale(loss).backward(), "
        "scaler.step(optimizer), scaler.update(); or autocast to torch.bfloat16, which needs no scaler."
    )
    return [new_finding("AMP_NO_SCALER", pb.SEVERITY_WARNING, where, message=message, fix=fix,
                        values={"autocast_dtype": autocast_dtype, "grad_scaler": "false"})]
