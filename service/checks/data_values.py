"""Stage 1: value ranges of batch tensors (class targets, float16 overflow, constant and unnormalized inputs)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from nanwatch.service.checks.catalog import Where, format_number, new_finding
from nanwatch.service.thresholds import Thresholds
from nanwatch.v1 import nanwatch_pb2 as pb

FLOAT16_MAX = 65504.0
# CrossEntropyLoss and NLLLoss skip targets equal to ignore_index, -100 by default.
DEFAULT_IGNORE_INDEX = -100
_TARGET_NAMES = frozenset({"y", "t", "target", "targets", "label", "labels", "y_true", "gt", "truth"})
_INTEGER_PREFIXES = ("int", "uint")
# Loss names (lower case, module path and "()" stripped) that take class indices as targets.
_CLASS_INDEX_LOSSES = ("crossentropy", "cross_entropy", "nllloss", "nll_loss", "nllloss2d")


@dataclass(frozen=True, kw_only=True)
class DataContext:
    """Facts of a rank that the value checks of its batch tensors need."""

    num_classes: int = 0
    """Size of the class dimension of the model output; 0 when unknown."""
    loss_function: str = ""
    trains_in_float16: bool = False
    """True when parameters are float16 or the forward pass runs under float16 autocast."""


def is_target_name(name: str) -> bool:
    """Return whether a batch tensor name denotes targets or labels ("y", "targets", "batch_labels")."""
    lowered = name.lower()
    return lowered in _TARGET_NAMES or lowered.endswith(("target", "targets", "label", "labels"))


def takes_class_indices(loss_function: str) -> bool:
    """Return whether the loss compares outputs with integer class indices (cross entropy, NLL)."""
    short = loss_function.strip().removesuffix("()").rpartition(".")[2].lower()
    return any(short.startswith(prefix) for prefix in _CLASS_INDEX_LOSSES)


def is_integer(summary: pb.TensorSummary) -> bool:
    return summary.dtype.removeprefix("torch.").startswith(_INTEGER_PREFIXES)


def check_value_ranges(
    summaries: Sequence[pb.TensorSummary], context: DataContext, where: Where, thresholds: Thresholds
) -> list[pb.Finding]:
    """Return DATA_TARGET_RANGE, DATA_FP16_OVERFLOW and DATA_NOT_NORMALIZED findings of one step's batch."""
    findings = []
    for summary in summaries:
        finding = _target_range_finding(summary, context, where)
        finding = finding or _fp16_overflow_finding(summary, context, where)
        finding = finding or _not_normalized_finding(summary, where, thresholds)
        if finding is not None:
            findings.append(finding)
    return findings


def _target_range_finding(summary: pb.TensorSummary, context: DataContext, where: Where) -> pb.Finding | None:
    if context.num_classes < 1 or not is_integer(summary) or not is_target_name(summary.name):
        return None
    if context.loss_function and not takes_class_indices(context.loss_function):
        return None  # an integer target of another loss (a count, a regression value) has no class range
    low, high = int(summary.min), int(summary.max)
    is_low_bad = low < 0 and low != DEFAULT_IGNORE_INDEX
    if not (is_low_bad or high >= context.num_classes):
        return None
    bad = high if high >= context.num_classes else low
    message = (
        f"Class targets '{summary.name}' on rank {where.rank} at step {where.step} range from {low} to "
        f"{high}, but the model has {context.num_classes} outputs, so valid classes are 0.."
        f"{context.num_classes - 1}: target {bad} indexes outside the logits (a device-side assert "
        f"on CUDA, a wrong or NaN loss elsewhere)."
    )
    fix = (
        f"Remap the labels of '{summary.name}' to 0..{context.num_classes - 1} (for 1-based labels, "
        f"subtract 1), or give the last layer {max(high + 1, context.num_classes)} outputs."
    )
    values = {"min": str(low), "max": str(high), "num_classes": str(context.num_classes)}
    return new_finding("DATA_TARGET_RANGE", pb.SEVERITY_CRITICAL, where, message=message, fix=fix,
                       tensor=summary.name, values=values)


def max_abs(summary: pb.TensorSummary) -> float:
    """Return the largest finite magnitude of a summarized tensor; 0 when it had no finite element."""
    extremes = [abs(value) for value in (summary.min, summary.max) if math.isfinite(value)]
    return max(extremes, default=0.0)


def _fp16_overflow_finding(summary: pb.TensorSummary, context: DataContext, where: Where) -> pb.Finding | None:
    if not context.trains_in_float16 or is_integer(summary) or max_abs(summary) <= FLOAT16_MAX:
        return None
    largest = max_abs(summary)
    message = (
        f"Batch tensor '{summary.name}' on rank {where.rank} at step {where.step} holds values up to "
        f"{format_number(largest)} in magnitude, above the float16 maximum 65504; the model trains in "
        f"float16, so these values (or the first layer's products) become inf."
    )
    fix = (
        f"Normalize '{summary.name}' (divide by its scale {format_number(largest)} or standardize it), or "
        f"run this path in bfloat16/float32 (torch.autocast(dtype=torch.bfloat16))."
    )
    values = {"max_abs": format_number(largest), "float16_max": "65504"}
    return new_finding("DATA_FP16_OVERFLOW", pb.SEVERITY_WARNING, where, message=message, fix=fix,
                       tensor=summary.name, values=values)


def _not_normalized_finding(summary: pb.TensorSummary, where: Where, thresholds: Thresholds) -> pb.Finding | None:
    if is_integer(summary) or is_target_name(summary.name) or summary.dtype == "bool":
        return None
    largest = max_abs(summary)
    if largest <= thresholds.input_abs_max:
        return None
    message = (
        f"Input tensor '{summary.name}' on rank {where.rank} at step {where.step} is far from normalized: "
        f"values up to {format_number(largest)} in magnitude (mean {format_number(summary.mean)}, std "
        f"{format_number(summary.std)}); large inputs give large activations and gradients."
    )
    fix = (
        f"Standardize '{summary.name}' with the training-set statistics ((x - mean) / std), or scale it "
        f"down by about {format_number(largest)}."
    )
    values = {"max_abs": format_number(largest), "mean": format_number(summary.mean),
              "std": format_number(summary.std)}
    return new_finding("DATA_NOT_NORMALIZED", pb.SEVERITY_WARNING, where, message=message, fix=fix,
                       tensor=summary.name, values=values)


def constant_tensors(summaries: Sequence[pb.TensorSummary]) -> list[pb.TensorSummary]:
    """Return the float batch tensors of more than one element whose finite values are all equal."""
    constant = []
    for summary in summaries:
        numel = math.prod(summary.shape) if summary.shape else 1
        if is_integer(summary) or summary.dtype == "bool" or numel < 2:
            continue
        if math.isfinite(summary.min) and summary.min == summary.max and summary.nan_count + summary.inf_count == 0:
            constant.append(summary)
    return constant


def constant_finding(summary: pb.TensorSummary, where: Where) -> pb.Finding:
    """Build DATA_CONSTANT for a constant batch tensor seen at a step that went non-finite."""
    value = format_number(summary.min)
    message = (
        f"Batch tensor '{summary.name}' on rank {where.rank} at step {where.step} is constant (every "
        f"element is {value}, std 0) and the step went non-finite: a normalization that divides by its "
        f"std or range computes 0/0."
    )
    fix = (
        f"Add an eps to the divisor that normalizes '{summary.name}' (x / (x.std() + 1e-6)), or skip "
        f"batches where '{summary.name}' is constant."
    )
    return new_finding("DATA_CONSTANT", pb.SEVERITY_WARNING, where, message=message, fix=fix,
                       tensor=summary.name, values={"value": value, "std": "0"})
