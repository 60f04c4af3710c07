"""Findings from a rank's replay of its failing step: the module, parameter and operation where NaN/Inf was born."""

from __future__ import annotations

from collections.abc import Sequence

from nanwatch.service.checks.catalog import Where, new_finding
from nanwatch.v1 import nanwatch_pb2 as pb

# For each code a location can give, the codes of other checks that describe the same
# origin. A finding with one of them gets the location, so no second finding is made.
_SAME_ORIGIN: dict[str, frozenset[str]] = {
    "DATA_NONFINITE": frozenset({"DATA_NONFINITE"}),
    "PARAM_NONFINITE": frozenset({"PARAM_NONFINITE"}),
    "FORWARD_NONFINITE": frozenset({"FORWARD_NONFINITE"}),
    "LOSS_MASKED_SOFTMAX": frozenset({"LOSS_MASKED_SOFTMAX"}),
    "LOSS_LOG_ZERO": frozenset({"LOSS_LOG_ZERO", "LOSS_UNDEFINED", "LOSS_SIGMOID_BCE", "LOSS_SOFTMAX_LOG"}),
    "LOSS_UNDEFINED": frozenset({"LOSS_LOG_ZERO", "LOSS_UNDEFINED", "LOSS_SIGMOID_BCE", "LOSS_SOFTMAX_LOG"}),
    "LOSS_BACKWARD_NONFINITE": frozenset({"LOSS_BACKWARD_NONFINITE"}),
    "REPLAY_NOT_REPRODUCED": frozenset({"REPLAY_NOT_REPRODUCED"}),
    "LOSS_NONFINITE": frozenset({"LOSS_NONFINITE"}),
    "GRAD_NONFINITE": frozenset({"GRAD_NONFINITE"}),
}
_PHASE_CODES: dict[int, str] = {
    pb.LOCATION_PHASE_INPUT: "DATA_NONFINITE",
    pb.LOCATION_PHASE_PARAMETER: "PARAM_NONFINITE",
    pb.LOCATION_PHASE_FORWARD: "FORWARD_NONFINITE",
    pb.LOCATION_PHASE_BACKWARD: "LOSS_BACKWARD_NONFINITE",
    pb.LOCATION_PHASE_LOSS_BACKWARD: "LOSS_BACKWARD_NONFINITE",
    pb.LOCATION_PHASE_NOT_REPRODUCED: "REPLAY_NOT_REPRODUCED",
}
# Step-value guesses that a replay replaces when it located a different origin.
_GUESSED_CODES = frozenset({"FORWARD_NONFINITE", "LOSS_LOG_ZERO", "LOSS_UNDEFINED", "LOSS_BACKWARD_NONFINITE"})
# Operations that turn a row of -inf (a fully masked row) into NaN.
_SOFTMAX_OPS = frozenset({"softmax", "log_softmax", "multi_head_attention_forward", "scaled_dot_product_attention"})
# Operations that fail on part of their domain (log of 0, division by 0) rather than by overflow.
DOMAIN_OPS = frozenset({"log", "log2", "log10", "log1p", "div", "truediv", "rtruediv", "true_divide", "divide",
                        "reciprocal", "rsqrt",
                        "sqrt", "pow", "acos", "asin", "atanh", "xlogy", "lgamma", "digamma"})
# Advice per operation family, matched against the operation's base name.
_OP_FIXES: tuple[tuple[tuple[str, ...], str], ...] = (
    (("log1p",), "clamp its argument above -1 (torch.log1p(x.clamp_min(-1 + 1e-6))), or fix the values below -1 "
                 "that reach it"),
    (("log", "xlogy"), "clamp its argument above 0 (torch.log(x.clamp_min(1e-12))) or compute in log space "
                       "(F.log_softmax, F.logsigmoid, logits-based losses)"),
    (("div", "reciprocal"), "add an eps to the divisor (x / (d + 1e-8)) or mask the rows where it is 0"),
    (("sqrt", "rsqrt", "pow", "norm"), "clamp the argument to be positive (torch.sqrt(x.clamp_min(1e-12))): the "
                                       "derivative of sqrt, and of pow with exponent < 1, is infinite at 0 and NaN "
                                       "below 0, even in the unselected branch of torch.where"),
    (("exp", "softmax", "sigmoid", "tanh"), "clamp the input of exp, or use a stable form (F.softplus, "
                                            "torch.logsumexp, softmax over a row with at least one unmasked value)"),
    (("where", "masked"), "clamp the values of both torch.where branches: the unselected branch still gets a "
                          "gradient of 0, and 0 times inf is NaN"),
    (("linear", "matmul", "mm", "bmm", "conv", "mul", "add", "sum"),
     "the values overflowed: lower the learning rate, clip gradients, normalize the layer's input, or keep this "
     "layer in float32"),
)


def base_op(op: str) -> str:
    """Return the base name of an operation: "log" for "torch.log", "sqrt" for "SqrtBackward0"."""
    name = op.rpartition(".")[2]
    if name.endswith("Backward0") or name.endswith("Backward1"):
        name = name[: -len("Backward0")]
    return name.strip("_").lower()


def is_domain_error(location: pb.Location) -> bool:
    """Return True when the located operation failed on its domain (log of 0, x / 0), not by overflow."""
    return base_op(location.op) in DOMAIN_OPS


def apply_location(report: pb.StepReport, findings: list[pb.Finding], where: Where) -> list[pb.Finding]:
    """Attach the report's location to the step's findings and add or replace the finding of its phase."""
    if not report.HasField("location"):
        return findings
    location = report.location
    code = code_for(location)
    codes = _SAME_ORIGIN.get(code, frozenset())
    same = [finding for finding in findings if finding.code in codes and finding.evidence.step == where.step]
    same_ids = {id(finding) for finding in same}
    updated = [finding for finding in findings
            if id(finding) in same_ids or finding.code not in _GUESSED_CODES or finding.evidence.step != where.step]
    if same:
        for finding in same:
            _enrich(finding, location, where)
    elif code:
        updated.append(located_finding(location, where))
    for finding in updated:
        if finding.evidence.step == where.step and not finding.evidence.HasField("location"):
            finding.evidence.location.CopyFrom(location)
    return updated


def _enrich(finding: pb.Finding, location: pb.Location, where: Where) -> None:
    """Add the location to a finding of the same origin.

    A guess from the step's values (which layer might have overflowed) gives way
    to the located message and fix. A finding with its own insight, such as a
    Sigmoid fed into a hand-written BCE, keeps its text and gains the location.
    """
    finding.evidence.location.CopyFrom(location)
    finding.evidence.layer = finding.evidence.layer or location.module
    if finding.code in _GUESSED_CODES and (location.op or location.after_loss):
        located = located_finding(location, where)
        finding.code, finding.stage = located.code, located.stage
        finding.message, finding.fix = located.message, located.fix
        finding.severity = pb.SEVERITY_CRITICAL
        finding.evidence.values.update(located.evidence.values)
        return
    finding.message = f"{finding.message} Replayed on rank {location.rank}. {location.detail}"
    if location.phase == pb.LOCATION_PHASE_FORWARD:
        finding.severity = pb.SEVERITY_CRITICAL


def located_finding(location: pb.Location, where: Where) -> pb.Finding:
    """Return the finding that a location alone supports, with the stage of its phase."""
    code = code_for(location)
    severity = pb.SEVERITY_WARNING if code == "REPLAY_NOT_REPRODUCED" else pb.SEVERITY_CRITICAL
    message = f"Replayed on rank {location.rank} at step {location.step}. {location.detail}"
    values = {key: value for key, value in (("op", location.op), ("source", location.source),
                                            ("code", location.code), ("produced", location.produced),
                                            ("parameter", location.parameter)) if value}
    finding = new_finding(code, severity, where, message=message, fix=_fix_for(location, code),
                          tensor=location.tensor or location.parameter, layer=location.module, values=values)
    finding.evidence.location.CopyFrom(location)
    return finding


def is_overflow(location: pb.Location) -> bool:
    """Return True when a traced operation outside DOMAIN_OPS made only Inf: values grew past the dtype's range."""
    return bool(location.op) and not is_domain_error(location) and "nan" not in location.produced.split(",")


def code_for(location: pb.Location) -> str:
    """Return the check code that a location supports, or "" for an unknown phase.

    An overflow in the loss or in backward is the end of a growth, not a
    loss-function choice, so it supports LOSS_NONFINITE or GRAD_NONFINITE. A
    non-finite value made by code after a finite loss call (after_loss) is a loss
    computation that is undefined there: LOSS_UNDEFINED, with the located text.
    """
    if location.after_loss:
        return "LOSS_UNDEFINED"
    if location.phase == pb.LOCATION_PHASE_LOSS_FORWARD:
        if is_overflow(location):
            return "LOSS_NONFINITE"
        is_log = "log" in base_op(location.op) and "inf" in location.produced
        return "LOSS_LOG_ZERO" if is_log else "LOSS_UNDEFINED"
    is_backward = location.phase in (pb.LOCATION_PHASE_BACKWARD, pb.LOCATION_PHASE_LOSS_BACKWARD)
    if is_backward and is_overflow(location):
        return "GRAD_NONFINITE"
    is_masked_row = base_op(location.then_op) in _SOFTMAX_OPS and "-inf" in location.produced
    if location.phase == pb.LOCATION_PHASE_FORWARD and is_masked_row:
        return "LOSS_MASKED_SOFTMAX"
    return _PHASE_CODES.get(location.phase, "")


def _fix_for(location: pb.Location, code: str) -> str:
    if code == "REPLAY_NOT_REPRODUCED":
        return ("Rerun the step on this rank's host with the same data; if it stays finite, check that host's "
                "GPU (memory errors, clocks) and any non-deterministic kernels (torch.use_deterministic_algorithms).")
    if code == "DATA_NONFINITE":
        return f"Drop or mask samples with NaN/Inf in {location.tensor} before the forward pass, or fix the data source."
    if code == "LOSS_MASKED_SOFTMAX":
        return (f"{location.then_op} at {location.then_source} got a row where every position is masked (-inf from "
                f"{location.op} at {location.source}): leave at least one unmasked position per row, drop empty rows, "
                f"or fill masks with a large negative finite value.")
    if location.after_loss:
        return (f"Check each operation applied to the result of {location.after_loss} before backward() (a "
                f"scaling, a sum of loss terms, a regularizer) for NaN/Inf, or pass the value given to backward() "
                f"to watcher.observe_loss() so that its step is reported as well.")
    if code == "PARAM_NONFINITE":
        return (f"'{location.tensor}' was already non-finite: an earlier update poisoned it; lower the learning "
                f"rate or check the optimizer's eps for the parameter dtype.")
    where = f"At {location.source} (`{location.code}`)" if location.source else f"In {location.op or 'the operation'}"
    return f"{where}: {_op_fix(location.op)}."


def _op_fix(op: str) -> str:
    name = base_op(op)
    for keys, fix in _OP_FIXES:
        if any(key in name for key in keys):
            return fix
    return "guard this operation against inputs where it is undefined or overflows"


def locations_of(findings: Sequence[pb.Finding]) -> list[pb.Location]:
    """Return the locations carried by findings, in order."""
    return [finding.evidence.location for finding in findings if finding.evidence.HasField("location")]
