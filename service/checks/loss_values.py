"""Stage 3 at run time: where a step first went non-finite when its batch and parameters were finite."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from nanwatch.service.checks.catalog import Where, format_list, format_number, new_finding
from nanwatch.service.checks.gradients import has_nonfinite_gradient, nonfinite_gradient_names
from nanwatch.service.checks.monitoring import has_nonfinite_loss
from nanwatch.service.thresholds import Thresholds
from nanwatch.v1 import nanwatch_pb2 as pb


@dataclass(frozen=True, kw_only=True)
class StepFacts:
    """Facts of one step that the engine has beyond the report itself."""

    batch_finite: bool
    loss_function: str = ""
    layer_order: Sequence[str] = ()
    """Module names in forward order (the first forward pass's trace); may be empty."""
    clipping_enabled: bool = False
    targets_checked: bool = True
    """False when no batch tensor of the step was named like targets, so they may be the NaN source."""
    output_module: str = ""
    """Type of the model's last leaf module in the first forward pass, such as "Sigmoid"; may be empty."""
    world_size: int = 1


def has_finite_inputs(report: pb.StepReport, facts: StepFacts) -> bool:
    """Return whether the batch and the parameters of the step were finite (param_norm 0 = not measured)."""
    return facts.batch_finite and (report.param_norm == 0.0 or math.isfinite(report.param_norm))


def check_step_values(report: pb.StepReport, facts: StepFacts, where: Where, thresholds: Thresholds) -> list[pb.Finding]:
    """Return the stage-3 finding that locates the step's first non-finite value, if the client measured outputs."""
    if not report.output_checked or not has_finite_inputs(report, facts):
        return []
    if not report.output_finite:
        if has_nonfinite_loss(report) or has_nonfinite_gradient(report):
            return [_forward_finding(report, where)]
        return []  # a model may output -inf on purpose (masked logits); only a non-finite step counts
    if has_nonfinite_loss(report):
        return [_loss_finding(report, facts, where)]
    # An infinite norm seen by clip_grad_norm_ means gradients overflowed (clipping then turned
    # them into NaN): that is a gradient-scale problem, not a NaN-producing backward op.
    is_overflow = math.isinf(report.clip_total_norm)
    if (has_nonfinite_gradient(report) and math.isfinite(report.loss) and report.loss_scale <= 0.0
            and not is_overflow):
        return [_backward_finding(report, facts, where, thresholds)]
    return []


def _forward_finding(report: pb.StepReport, where: Where) -> pb.Finding:
    message = (
        f"The model output on rank {where.rank} at step {where.step} is non-finite although the batch and "
        f"the parameters are finite: an activation overflowed or a layer divided by 0 in the forward pass."
    )
    fix = (
        f"Register forward hooks that check torch.isfinite on each module output at step {where.step} to "
        f"find the first bad layer; guard its exp/pow/division, or lower the learning rate if the weights grew."
    )
    values = {"loss": format_number(report.loss), "param_norm": format_number(report.param_norm)}
    return new_finding("FORWARD_NONFINITE", pb.SEVERITY_WARNING, where, message=message, fix=fix, values=values)


_UNCHECKED_TARGETS = (
    " No target tensor was checked at this step, so a NaN/Inf target fed to the loss is as likely: pass "
    "the targets to check_batch (watcher.check_batch(targets=y)) to tell the two apart; under nanwatch run, "
    "targets are checked when they go into a torch loss module or torch.nn.functional loss."
)


def _loss_finding(report: pb.StepReport, facts: StepFacts, where: Where) -> pb.Finding:
    loss_name = facts.loss_function or "the loss function"
    values = {"loss": format_number(report.loss), "output_finite": "true",
              "targets_checked": "true" if facts.targets_checked else "false"}
    if facts.output_module in _PROBABILITY_OUTPUTS:
        return _saturated_output_finding(report, facts.output_module, loss_name, values, where)
    finding = _loss_function_finding(report, loss_name, values, where)
    if not facts.targets_checked:
        finding.message += _UNCHECKED_TARGETS
        finding.fix = f"Check the targets of step {where.step} for NaN/Inf first. " + finding.fix
    return finding


# Output modules whose values a hand-written loss takes the log of; code and the logits-based fix.
_PROBABILITY_OUTPUTS = {
    "Sigmoid": ("LOSS_SIGMOID_BCE", "drop the Sigmoid and use nn.BCEWithLogitsLoss on the logits"),
    "Softmax": ("LOSS_SOFTMAX_LOG", "drop the Softmax and use nn.CrossEntropyLoss (or LogSoftmax + NLLLoss) "
                                    "on the logits"),
}


def _saturated_output_finding(report: pb.StepReport, output_module: str, loss_name: str,
                              values: dict[str, str], where: Where) -> pb.Finding:
    """Return the stage-3 cause when a loss goes non-finite on the finite output of a Sigmoid or Softmax."""
    code, remedy = _PROBABILITY_OUTPUTS[output_module]
    message = (
        f"The loss on rank {where.rank} at step {where.step} is {format_number(report.loss)} while the model "
        f"output is finite, and the model ends in {output_module}: in float32 its output saturates to exactly "
        f"0 or 1, so a log of it inside {loss_name} is -inf and 0 * log(0) is NaN."
    )
    fix = f"Compute the loss on the logits: {remedy}; apply {output_module} only for metrics."
    values = {**values, "output_module": output_module}
    return new_finding(code, pb.SEVERITY_CRITICAL, where, message=message, fix=fix, values=values)


def _loss_function_finding(report: pb.StepReport, loss_name: str, values: dict[str, str], where: Where) -> pb.Finding:
    if math.isinf(report.loss):
        message = (
            f"The loss on rank {where.rank} at step {where.step} is {format_number(report.loss)} while the "
            f"model output is finite: {loss_name} takes the log of a value that reached 0 (a probability "
            f"that underflowed, a Softmax or Sigmoid output of exactly 0 or 1) or divides by 0."
        )
        fix = (
            f"Compute {loss_name} in log space on the logits (F.log_softmax, F.cross_entropy, "
            f"BCEWithLogitsLoss), or clamp the log argument: torch.log(p.clamp_min(1e-7))."
        )
        return new_finding("LOSS_LOG_ZERO", pb.SEVERITY_CRITICAL, where, message=message, fix=fix, values=values)
    message = (
        f"The loss on rank {where.rank} at step {where.step} is NaN while the model output is finite: "
        f"{loss_name} computes 0/0, inf - inf, 0 * inf, or sqrt/log of a negative number."
    )
    fix = (
        f"Guard the divisions of {loss_name} (x / (n + 1e-8), skip empty masks), clamp arguments of "
        f"sqrt/log to be positive, and check the reduction over an empty selection (mean of 0 elements)."
    )
    return new_finding("LOSS_UNDEFINED", pb.SEVERITY_CRITICAL, where, message=message, fix=fix, values=values)


def deepest_bad_parameter(report: pb.StepReport, layer_order: Sequence[str]) -> tuple[str, list[str]]:
    """Return the parameter nearest the output whose gradient is non-finite, and all bad parameter names.

    NaN flows backward from the faulty operation to everything before it, so
    the last bad layer in forward order sits just before the faulty operation.
    Without a trace, the parameter order replaces the forward order.
    """
    names = nonfinite_gradient_names(report)
    if not names:
        return "", []
    position = {layer: index for index, layer in enumerate(layer_order)}
    all_names = [norm.name for norm in report.parameter_grad_norms]
    fallback = {name: index for index, name in enumerate(all_names)}
    deepest = max(names, key=lambda name: (position.get(_layer_of(name), -1), fallback[name]))
    return deepest, names


def _backward_finding(report: pb.StepReport, facts: StepFacts, where: Where, thresholds: Thresholds) -> pb.Finding:
    deepest, names = deepest_bad_parameter(report, facts.layer_order)
    layer = _layer_of(deepest)
    is_spread = facts.clipping_enabled and names and len(names) == len(report.parameter_grad_norms)
    if layer and not is_spread:
        located = (f" The last layer in forward order with a non-finite gradient is '{layer}', so the faulty "
                   f"operation sits between '{layer}' and the loss.")
    else:
        located = " Every gradient is non-finite (clipping spreads a non-finite norm to all of them)." if is_spread else ""
    message = (
        f"Gradients on rank {where.rank} at step {where.step} are non-finite (grad_norm "
        f"{format_number(report.grad_norm)}) while the batch, the model output and the loss "
        f"({format_number(report.loss)}) are finite: an operation has a finite forward and a NaN/Inf "
        f"backward.{located}"
    )
    if facts.world_size > 1:
        message += (" With several ranks, NaN gradients of another rank also arrive here through the "
                    "all-reduce: check the other ranks' findings of this step first.")
    after = f" after '{layer}'" if layer else ""
    fix = (
        f"Look at the operations{after}: sqrt or norm of 0 (add an eps inside: sqrt(x + 1e-12)), pow with "
        f"exponent < 1 at 0, division by a value that reaches 0, and torch.where/masking whose unselected "
        f"branch overflows (clamp the input of exp/log before torch.where, or use F.softplus)."
    )
    values = {"grad_norm": format_number(report.grad_norm), "loss": format_number(report.loss),
              "nonfinite_grad_count": str(report.nonfinite_grad_count)}
    if names:
        values["nonfinite_parameters"] = format_list(names, thresholds.max_listed)
    # With several ranks the gradients may come from another rank through the all-reduce.
    # The rank where they were born replays the step and reports a located, critical finding.
    severity = pb.SEVERITY_WARNING if facts.world_size > 1 else pb.SEVERITY_CRITICAL
    return new_finding("LOSS_BACKWARD_NONFINITE", severity, where, message=message, fix=fix,
                       tensor=deepest, layer=layer, values=values)


def _layer_of(parameter_name: str) -> str:
    if ".parametrizations." in parameter_name:
        return parameter_name.split(".parametrizations.")[0]
    return parameter_name.rpartition(".")[0]
