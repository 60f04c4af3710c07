"""Stage 3: the output activation and loss function pairing (Sigmoid + BCELoss, Softmax + log)."""

from __future__ import annotations

from collections.abc import Sequence

from nanwatch.service.checks.catalog import Where, new_finding
from nanwatch.v1 import nanwatch_pb2 as pb

_SOFTMAX_TYPES = frozenset({"Softmax", "Softmax2d"})
# Losses that expect log-probabilities, or a bare log, compared in lower case.
_LOG_INPUT_LOSSES = frozenset({"nllloss", "nll_loss", "kldivloss", "kl_div", "log"})


def last_leaf(trace: Sequence[pb.ModuleCall]) -> pb.ModuleCall | None:
    """Return the last module call of the trace that has no submodule in the trace.

    The check works on names, so it works whether the client records modules
    when their forward starts or when it ends.
    """
    names = {call.name for call in trace}
    for call in reversed(trace):
        prefix = f"{call.name}." if call.name else ""
        has_child = any(name != call.name and name.startswith(prefix) for name in names)
        if not has_child:
            return call
    return None


def is_bce_without_logits(loss_function: str) -> bool:
    """Return whether the loss name is a BCE loss that takes probabilities, not logits."""
    name = _short_name(loss_function).lower()
    if "withlogits" in name or "with_logits" in name:
        return False
    return "bceloss" in name or name == "binary_cross_entropy"


def takes_log_input(loss_function: str) -> bool:
    """Return whether the loss name is NLLLoss, KL divergence or a bare log of its input."""
    return _short_name(loss_function).lower() in _LOG_INPUT_LOSSES


def check_output_activation(
    trace: Sequence[pb.ModuleCall], loss_function: str, where: Where
) -> list[pb.Finding]:
    """Return a finding when the model's last leaf module saturates into a loss that takes a log."""
    leaf = last_leaf(trace)
    if leaf is None or not loss_function:
        return []
    if leaf.type == "Sigmoid" and is_bce_without_logits(loss_function):
        return [_sigmoid_bce_finding(leaf, loss_function, where)]
    if leaf.type in _SOFTMAX_TYPES and takes_log_input(loss_function):
        return [_softmax_log_finding(leaf, loss_function, where)]
    if leaf.type in _SOFTMAX_TYPES and is_cross_entropy(loss_function):
        return [_double_softmax_finding(leaf, loss_function, where)]
    return []


def is_cross_entropy(loss_function: str) -> bool:
    """Return whether the loss name is CrossEntropyLoss or F.cross_entropy (log-softmax inside)."""
    return _short_name(loss_function).lower() in ("crossentropyloss", "cross_entropy")


def _double_softmax_finding(leaf: pb.ModuleCall, loss_function: str, where: Where) -> pb.Finding:
    layer = leaf.name or "<root>"
    message = (
        f"The model ends in {leaf.type} '{layer}' and the loss is {loss_function}, which applies "
        f"log-softmax itself: the probabilities are squashed twice, so the loss barely moves and "
        f"the gradients are small."
    )
    fix = f"Drop {leaf.type} '{layer}' from the model and give {loss_function} the raw logits."
    values = {"last_module": layer, "last_module_type": leaf.type, "loss_function": loss_function}
    return new_finding("LOSS_DOUBLE_SOFTMAX", pb.SEVERITY_WARNING, where, message=message, fix=fix,
                       layer=leaf.name, values=values)


def check_bce_float16(loss_function: str, float16_source: str, where: Where) -> list[pb.Finding]:
    """Return LOSS_BCE_FP16 when a BCE loss on probabilities runs in float16.

    float16_source says why the forward pass is float16 ("float16 autocast",
    "float16 parameters"); "" means it is not.
    """
    if not float16_source or not is_bce_without_logits(loss_function):
        return []
    message = (
        f"{loss_function} on rank {where.rank} takes probabilities while the model runs with "
        f"{float16_source}: float16 rounds a Sigmoid output to exactly 1.0 once the logit passes about "
        f"8, so log(1 - p) is -inf and the loss or gradients turn inf/NaN."
    )
    fix = (
        f"Replace {loss_function} with nn.BCEWithLogitsLoss on the logits (drop the final Sigmoid); it "
        f"is computed stably and is allowed under float16 autocast."
    )
    values = {"loss_function": loss_function, "float16_source": float16_source}
    return [new_finding("LOSS_BCE_FP16", pb.SEVERITY_WARNING, where, message=message, fix=fix, values=values)]


def _sigmoid_bce_finding(leaf: pb.ModuleCall, loss_function: str, where: Where) -> pb.Finding:
    layer = leaf.name or "<root>"
    message = (
        f"The model ends in Sigmoid '{layer}' and the loss is {loss_function}, which takes log(p) "
        f"and log(1 - p) of the Sigmoid output. Once a logit passes about 17 in float32, p rounds "
        f"to exactly 1.0 and log(1 - p) is -inf: nn.BCELoss clamps it to -100 and the gradient "
        f"vanishes, a hand-written BCE turns the loss and gradients into inf or NaN."
    )
    fix = (
        f"Drop the Sigmoid '{layer}' from the model and replace {loss_function} with "
        f"nn.BCEWithLogitsLoss (F.binary_cross_entropy_with_logits) on the raw logits; apply "
        f"torch.sigmoid only when you need probabilities for metrics."
    )
    values = {"last_module": layer, "last_module_type": leaf.type, "loss_function": loss_function}
    return new_finding("LOSS_SIGMOID_BCE", pb.SEVERITY_WARNING, where, message=message, fix=fix,
                       layer=leaf.name, values=values)


def _softmax_log_finding(leaf: pb.ModuleCall, loss_function: str, where: Where) -> pb.Finding:
    layer = leaf.name or "<root>"
    if _short_name(loss_function).lower() in ("nllloss", "nll_loss"):
        consequence = (
            "NLLLoss expects log-probabilities, so on probabilities it minimizes -p instead of "
            "-log(p), and a log added in between gives log(0) = -inf once a probability underflows"
        )
    else:
        consequence = "a probability that underflows to 0 gives log(0) = -inf and NaN gradients"
    message = f"The model ends in {leaf.type} '{layer}' and the loss is {loss_function}: {consequence}."
    fix = (
        f"Replace {leaf.type} '{layer}' with nn.LogSoftmax(dim=...) and keep {loss_function}, or "
        f"drop it and use nn.CrossEntropyLoss on the logits."
    )
    values = {"last_module": layer, "last_module_type": leaf.type, "loss_function": loss_function}
    return new_finding("LOSS_SOFTMAX_LOG", pb.SEVERITY_WARNING, where, message=message, fix=fix,
                       layer=leaf.name, values=values)


def _short_name(loss_function: str) -> str:
    """Strip a module path and call parentheses ("torch.nn.functional.nll_loss()" -> "nll_loss")."""
    return loss_function.strip().removesuffix("()").rpartition(".")[2]
