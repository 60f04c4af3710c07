"""Stage 2: parameter values before the first step (non-finite, all-zero or constant, badly scaled)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from nanwatch.service.checks.catalog import Where, format_number, new_finding
from nanwatch.service.thresholds import Thresholds
from nanwatch.v1 import nanwatch_pb2 as pb

# std x sqrt(fan_in) of common inits: nn.Linear/Conv default (kaiming_uniform_ with
# a=sqrt(5)) gives 1/sqrt(3) = 0.577; kaiming_normal_ with the ReLU gain gives sqrt(2).
REFERENCE_SCALE_LOW = 1.0 / math.sqrt(3.0)
REFERENCE_SCALE_HIGH = math.sqrt(2.0)

# Weight-norm reparametrizations divide by ||v||: the old API names v "weight_v", the
# parametrization API names it "parametrizations.weight.original1".
_WEIGHT_NORM_DIRECTION_SUFFIXES = ("weight_v", "parametrizations.weight.original1")


def check_parameters(
    parameters: Sequence[pb.ParameterInfo], where: Where, thresholds: Thresholds
) -> list[pb.Finding]:
    """Return the stage-2 findings for the parameters of one rank, at most one per parameter."""
    findings = []
    for parameter in parameters:
        finding = _check_parameter(parameter, where, thresholds)
        if finding is not None:
            findings.append(finding)
    return findings


def _check_parameter(
    parameter: pb.ParameterInfo, where: Where, thresholds: Thresholds
) -> pb.Finding | None:
    if _is_nonfinite(parameter):
        return _nonfinite_finding(parameter, where)
    if not _is_weight_matrix(parameter):
        return None  # biases and norm weights are fine at 0 or 1
    if parameter.min == 0.0 and parameter.max == 0.0:
        return _all_zero_finding(parameter, where) if _is_layer_weight(parameter) else None
    if parameter.min == parameter.max and _fan_in(parameter) >= 2 and parameter.shape[0] >= 2:
        return _constant_finding(parameter, where)
    return _scale_finding(parameter, where, thresholds)


def _is_nonfinite(parameter: pb.ParameterInfo) -> bool:
    extremes = (parameter.min, parameter.max)
    return parameter.nonfinite_count > 0 or not all(math.isfinite(value) for value in extremes)


def _is_weight_matrix(parameter: pb.ParameterInfo) -> bool:
    return len(parameter.shape) >= 2 and _numel(parameter) >= 2


def _is_layer_weight(parameter: pb.ParameterInfo) -> bool:
    """Return whether the parameter is the weight of a layer, not a free tensor such as a zero-init position table."""
    name = parameter.name
    return name.endswith(("weight", *_WEIGHT_NORM_DIRECTION_SUFFIXES)) or parameter.module_type.startswith(
        ("Linear", "Conv", "Bilinear"))


def _numel(parameter: pb.ParameterInfo) -> int:
    return parameter.numel if parameter.numel > 0 else math.prod(parameter.shape)


def _fan_in(parameter: pb.ParameterInfo) -> int:
    return parameter.fan_in if parameter.fan_in > 0 else math.prod(parameter.shape[1:])


def _shape_text(parameter: pb.ParameterInfo) -> str:
    return "[" + ", ".join(str(dim) for dim in parameter.shape) + "]"


def _stats(parameter: pb.ParameterInfo) -> dict[str, str]:
    return {
        "shape": _shape_text(parameter),
        "mean": format_number(parameter.mean),
        "std": format_number(parameter.std),
        "min": format_number(parameter.min),
        "max": format_number(parameter.max),
    }


def _nonfinite_finding(parameter: pb.ParameterInfo, where: Where) -> pb.Finding:
    values = _stats(parameter) | {"nonfinite_count": str(parameter.nonfinite_count)}
    message = (
        f"Parameter '{parameter.name}' {_shape_text(parameter)} on rank {where.rank} contains "
        f"{parameter.nonfinite_count} NaN/Inf values before the first step "
        f"(min {values['min']}, max {values['max']})."
    )
    fix = (
        f"Re-initialize '{parameter.name}' (for example with its module's reset_parameters()), or "
        f"load a checkpoint in which '{parameter.name}' is finite."
    )
    return new_finding("INIT_NONFINITE", pb.SEVERITY_CRITICAL, where, message=message, fix=fix,
                       tensor=parameter.name, layer=_layer_of(parameter.name), values=values)


def _all_zero_finding(parameter: pb.ParameterInfo, where: Where) -> pb.Finding:
    name = parameter.name
    if name.endswith(_WEIGHT_NORM_DIRECTION_SUFFIXES):
        message = (
            f"Weight-normalized direction '{name}' {_shape_text(parameter)} on rank {where.rank} is "
            f"all zero: weight norm computes g * v / ||v|| = 0/0, so outputs, loss and gradients "
            f"are NaN from step 0."
        )
        fix = (
            f"Initialize '{name}' randomly and put a small or zero magnitude g instead, or drop "
            f"weight_norm on '{_layer_of(name)}'."
        )
        severity = pb.SEVERITY_WARNING
    else:
        # A zero-init output, residual or LoRA-B layer is a common, deliberate choice and cannot
        # by itself make a value non-finite, so it is advice rather than a cause.
        severity = pb.SEVERITY_INFO
        message = (
            f"Weight matrix '{name}' {_shape_text(parameter)} on rank {where.rank} is all zero before "
            f"the first step. Unless this is a deliberate zero-init of an output, residual or "
            f"LoRA-B layer, its units cannot break symmetry, and any norm that divides by it is 0/0."
        )
        fix = (
            f"Initialize '{name}' randomly (nn.init.kaiming_uniform_ or xavier_uniform_), or keep "
            f"the zero-init only on an output/residual layer that nothing normalizes."
        )
    return new_finding("INIT_ALL_ZERO", severity, where, message=message, fix=fix,
                       tensor=name, layer=_layer_of(name), values=_stats(parameter))


def _constant_finding(parameter: pb.ParameterInfo, where: Where) -> pb.Finding:
    value = format_number(parameter.min)
    message = (
        f"Weight matrix '{parameter.name}' {_shape_text(parameter)} on rank {where.rank} has every "
        f"element equal to {value} before the first step, so all its output units compute the "
        f"same function and receive the same gradient."
    )
    fix = f"Initialize '{parameter.name}' randomly (nn.init.kaiming_uniform_ or xavier_uniform_)."
    return new_finding("INIT_CONSTANT", pb.SEVERITY_WARNING, where, message=message, fix=fix,
                       tensor=parameter.name, layer=_layer_of(parameter.name), values=_stats(parameter))


def _scale_finding(
    parameter: pb.ParameterInfo, where: Where, thresholds: Thresholds
) -> pb.Finding | None:
    if not _is_scale_checked(parameter, thresholds):
        return None
    scale = parameter.std * math.sqrt(_fan_in(parameter))
    low = REFERENCE_SCALE_LOW * thresholds.init_scale_min_ratio
    high = REFERENCE_SCALE_HIGH * thresholds.init_scale_max_ratio
    if low <= scale <= high:
        return None
    direction = "above" if scale > high else "below"
    limit = high if scale > high else low
    message = (
        f"{parameter.module_type} weight '{parameter.name}' {_shape_text(parameter)} on rank "
        f"{where.rank} starts with std {format_number(parameter.std)} and fan_in "
        f"{_fan_in(parameter)}: std x sqrt(fan_in) = {format_number(scale)} is {direction} "
        f"{format_number(limit)} (default init gives {REFERENCE_SCALE_LOW:.3f}, Kaiming normal "
        f"{REFERENCE_SCALE_HIGH:.3f}), so activations {'grow' if scale > high else 'shrink'} layer by layer."
    )
    target_std = REFERENCE_SCALE_HIGH / math.sqrt(_fan_in(parameter))
    fix = (
        f"Initialize '{parameter.name}' with the module's default init, "
        f"nn.init.kaiming_normal_(nonlinearity='relu') (std {format_number(target_std)} here) "
        f"or nn.init.xavier_uniform_."
    )
    values = _stats(parameter) | {"fan_in": str(_fan_in(parameter)), "std_x_sqrt_fan_in": format_number(scale)}
    return new_finding("INIT_SCALE", pb.SEVERITY_WARNING, where, message=message, fix=fix,
                       tensor=parameter.name, layer=_layer_of(parameter.name), values=values)


def _is_scale_checked(parameter: pb.ParameterInfo, thresholds: Thresholds) -> bool:
    """Return whether the parameter is a Linear or Conv weight large enough for a stable std."""
    module_type = parameter.module_type
    is_linear_or_conv = module_type.endswith("Linear") or module_type.startswith(("Conv", "LazyConv"))
    is_weight = parameter.name == "weight" or parameter.name.endswith(".weight")
    return is_linear_or_conv and is_weight and _numel(parameter) >= thresholds.init_scale_min_numel


def _layer_of(parameter_name: str) -> str:
    """Return the module part of a qualified parameter name ("enc.fc.weight" -> "enc.fc").

    A parametrized weight ("fc.parametrizations.weight.original1") belongs to "fc".
    """
    if ".parametrizations." in parameter_name:
        return parameter_name.split(".parametrizations.")[0]
    layer, _, _ = parameter_name.rpartition(".")
    return layer
