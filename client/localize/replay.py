"""Replay of a non-finite step on its own inputs, and the Location it yields.

The replay runs the model's forward pass again with the RNG and autocast
state of the original pass, then the loss. Backward then starts from the
gradients that reached the model output in the real step. All of it runs
under nanwatch's tracing mode and hooks. It never touches .grad, restores the RNG and the module
buffers afterwards, and applies no update. It runs only on a step that is
about to halt, on the unwrapped model, so it issues no collective.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from nanwatch.client.localize.backward import BackwardResult, search_backward
from nanwatch.client.localize.capture import LossCall, RootCall, StepCapture
from nanwatch.client.localize.guard import replay_guard
from nanwatch.client.localize.origins import LOSS_SEGMENT, ForwardOrigins, Origin, OpSite, float_tensors
from nanwatch.client.localize.sources import add_boundary
from nanwatch.client.localize.spans import ModuleSpans
from nanwatch.v1 import nanwatch_pb2 as pb

logger = logging.getLogger(__name__)

_PHASE_BY_KIND = {"input": pb.LOCATION_PHASE_INPUT, "parameter": pb.LOCATION_PHASE_PARAMETER,
                  "buffer": pb.LOCATION_PHASE_PARAMETER}


@dataclass(kw_only=True)
class _Replayed:
    """Tensors and trace of one replayed forward pass and loss."""

    origins: ForwardOrigins
    spans: ModuleSpans
    outputs: list[torch.Tensor]
    loss: torch.Tensor | None


class Localizer:
    """Finds where a halting step's first non-finite value was born, by replaying the step.

    Example:
        localizer = Localizer(model, StepCapture(model))
        location = localizer.localize(step=7, rank=0, loss_finite=False)
    """

    def __init__(self, model: nn.Module, capture: StepCapture) -> None:
        self.model = model
        self.capture = capture

    def localize(self, *, step: int, rank: int, loss_finite: bool, may_be_remote: bool = False) -> pb.Location | None:
        """Return the Location of the step's first non-finite value, or None when there is no location to report.

        None means nothing was captured to replay, or, with may_be_remote (several
        ranks, and a finite loss on this one), that the replay stayed finite: the
        non-finite gradients may have arrived from another rank through the all-reduce.
        """
        calls = list(self.capture.calls)
        loss_calls = list(self.capture.loss_calls)
        if not calls and not loss_calls:
            return None
        with replay_guard(), _preserved(self.model):
            location = self._search(calls, loss_calls, loss_finite)
        if location is None or (may_be_remote and location.phase == pb.LOCATION_PHASE_NOT_REPRODUCED):
            return None
        location.rank = rank
        location.step = step
        logger.info("nanwatch rank %d: step %d localized: %s", rank, step, location.detail)
        return location

    def _search(self, calls: list[RootCall], loss_calls: list[LossCall], loss_finite: bool) -> pb.Location | None:
        for index, call in enumerate(calls):
            matched = next((loss for loss in loss_calls if loss.call_index == index), None)
            location = self._replay_call(call, matched, loss_finite)
            if location is not None:
                return location
        for loss_call in loss_calls:
            if loss_call.call_index is None:
                location = self._replay_loss_alone(loss_call)
                if location is not None:
                    return location
        if not calls:
            return None  # without a forward pass to replay, a finite loss replay proves nothing
        return _not_reproduced()

    # ---- one forward pass with its loss ----

    def _replay_call(self, call: RootCall, loss_call: LossCall | None, loss_finite: bool) -> pb.Location | None:
        replayed = self._forward(call, loss_call)
        forward = _forward_location(replayed, loss_finite)
        backward = self._backward(call, replayed, loss_call)
        if forward is not None:
            # Every gradient after a forward NaN is NaN, so only the located module's own parameters tell more.
            prefix = f"{forward.module}." if forward.module else ""
            forward.parameter = next((name for name in backward.parameters if prefix and name.startswith(prefix)), "")
            return forward
        after_loss = loss_call.name if loss_call is not None and _returned_finite(loss_call) else ""
        return _backward_location(backward, loss_finite=loss_finite, loss_replayed=replayed.loss is not None,
                                  after_loss=after_loss)

    def _forward(self, call: RootCall, loss_call: LossCall | None) -> _Replayed:
        named = [(tensor, "parameter", name) for name, tensor in self.model.named_parameters()]
        named += [(tensor, "buffer", name) for name, tensor in self.model.named_buffers()]
        origins = ForwardOrigins(named)
        for tensor, name in _argument_names(call.args, call.kwargs):
            origins.name(tensor, "input", name)
        spans = ModuleSpans(self.model, origins)
        try:
            with _rng_of(call), _autocast_of(call), torch.enable_grad(), origins:
                outputs = float_tensors(self.model(*call.args, **call.kwargs))
                loss = None
                if loss_call is not None:
                    origins.segment = LOSS_SEGMENT
                    loss = _loss_tensor(_call_loss(loss_call, outputs))
        finally:
            spans.remove()
        return _Replayed(origins=origins, spans=spans, outputs=outputs, loss=loss)

    def _backward(self, call: RootCall, replayed: _Replayed, loss_call: LossCall | None) -> BackwardResult:
        """Search the backward pass: from the recorded output gradients, else from the replayed loss."""
        leaves = [(name, tensor) for name, tensor in self.model.named_parameters()]
        sites = replayed.origins.node_sites
        positions = sorted(position for position in call.output_grads if position < len(replayed.outputs))
        roots = [replayed.outputs[position] for position in positions if replayed.outputs[position].requires_grad]
        loss = replayed.loss if replayed.loss is not None and replayed.loss.requires_grad else None
        try:
            if roots and len(roots) == len(positions):
                result = search_backward(roots, [call.output_grads[p] for p in positions], leaves, sites)
                if not result.seed_nonfinite or loss_call is None or loss is None:
                    return result
                # The recorded output gradient was non-finite: find where in the loss's backward.
                in_loss = self._loss_backward(loss_call, replayed.outputs)
                in_loss.parameters = result.parameters
                in_loss.seed_nonfinite = True
                return in_loss
            if loss is not None:
                result = search_backward([loss], None, leaves, sites)
                seed_flagged = any(bool(flag) for flag in call.output_grad_flags.values())
                if not seed_flagged or result.node or loss_call is None:
                    return result
                # The output gradient of the real step was non-finite and the model's backward is
                # finite: the NaN came from the loss's backward, traced or not.
                in_loss = self._loss_backward(loss_call, replayed.outputs)
                in_loss.parameters = result.parameters
                in_loss.seed_nonfinite = True
                return in_loss
        except Exception:  # noqa: BLE001 - the forward result still stands
            logger.debug("nanwatch: the backward replay failed", exc_info=True)
        return BackwardResult()

    def _loss_backward(self, loss_call: LossCall, outputs: list[torch.Tensor]) -> BackwardResult:
        """Run the loss alone on detached model outputs and search its backward."""
        leaves = [tensor.detach().requires_grad_(True) for tensor in outputs]
        origins = ForwardOrigins([])
        origins.segment = LOSS_SEGMENT
        with torch.enable_grad(), origins:
            loss = _loss_tensor(_call_loss(loss_call, leaves))
        if loss is None or not loss.requires_grad:
            return BackwardResult()
        return search_backward([loss], None, [(f"output {i}", t) for i, t in enumerate(leaves)], origins.node_sites)

    # ---- a loss whose input was not a model output ----

    def _replay_loss_alone(self, loss_call: LossCall) -> pb.Location | None:
        origins = ForwardOrigins([])
        origins.segment = LOSS_SEGMENT
        args, kwargs, leaves = _leaf_arguments(loss_call)
        for tensor, name in _argument_names(args, kwargs):
            origins.name(tensor, "input", f"{loss_call.name} {name}")
        for name, tensor in leaves:
            origins.name(tensor, "input", name)
        with torch.enable_grad(), origins:
            loss = _loss_tensor(loss_call.fn(*args, **kwargs))
        if loss is not None and not bool(torch.isfinite(loss.detach()).all()):
            origin = origins.origin_of(loss)
            if origin.root().tensor in {name for name, _ in leaves}:
                return None  # a non-finite model output, which the model's replay did not reach
            return _origin_location(origin, None)
        if loss is None or not loss.requires_grad or not leaves:
            return None
        result = search_backward([loss], None, leaves, origins.node_sites)
        return _backward_location(result, loss_finite=True, loss_replayed=True)


add_boundary(Localizer._forward)
add_boundary(Localizer._loss_backward)
add_boundary(Localizer._replay_loss_alone)


# ---- building the Location ----


def _not_reproduced() -> pb.Location:
    return pb.Location(
        phase=pb.LOCATION_PHASE_NOT_REPRODUCED, reproduced=False,
        detail=("Replaying the step on the same inputs, RNG state and parameters gave finite values everywhere: "
                "the original NaN/Inf points to non-determinism or faulty hardware rather than to the model."))


def _forward_location(replayed: _Replayed, loss_finite: bool) -> pb.Location | None:
    """Return the location of the first non-finite forward value that reached the loss, or None."""
    loss = replayed.loss
    loss_bad = loss is not None and not bool(torch.isfinite(loss.detach()).all())
    bad_outputs = [tensor for tensor in replayed.outputs if not bool(torch.isfinite(tensor.detach()).all())]
    if loss_bad:
        final = loss
    elif bad_outputs and (loss is None and not loss_finite or _has_nan(bad_outputs[0])):
        # An output with only Inf next to a finite loss is often on purpose (masked logits).
        final = bad_outputs[0]
    else:
        return None
    origin = replayed.origins.origin_of(final)
    hit = replayed.spans.first_hit_from(origin.root())
    return _origin_location(origin, hit)


def _origin_location(origin: Origin, hit: Any) -> pb.Location:
    root = origin.root()
    location = pb.Location(reproduced=True)
    if hit is not None:
        location.module, location.module_type = hit.name, hit.module_type
    if root.kind in _PHASE_BY_KIND:
        location.phase = _PHASE_BY_KIND[root.kind]
        location.tensor = root.tensor
        location.produced = root.produced
        location.detail = _describe_named(root, location)
        return location
    site = root.site
    if site is None:
        location.phase = pb.LOCATION_PHASE_FORWARD
        location.detail = "A NaN/Inf appeared in the forward pass from an operation nanwatch could not trace."
        return location
    location.phase = pb.LOCATION_PHASE_LOSS_FORWARD if site.segment == LOSS_SEGMENT else pb.LOCATION_PHASE_FORWARD
    _set_site(location, site, root.produced)
    if origin is not root and origin.site is not None:
        location.then_op, location.then_source = origin.site.op, origin.site.source
    if not location.module:
        location.module, location.module_type = site.module, site.module_type
    location.detail = _describe_forward(location)
    return location


def _backward_location(result: BackwardResult, *, loss_finite: bool, loss_replayed: bool,
                       after_loss: str = "") -> pb.Location | None:
    """Return the location of the backward search's first non-finite gradient, or None when it found none.

    A recorded output gradient can be non-finite while the replay finds no origin.
    The origin then lies outside the traced code. after_loss names the traced loss
    call when it returned a finite value in the step: the value passed to backward()
    then came from code after that call. Otherwise the origin is in the loss
    computation when the step's loss was finite (or not replayed), else in a forward
    pass that the replay did not reproduce.
    """
    is_untraced = not result.node and result.seed_nonfinite
    is_after_loss = is_untraced and loss_replayed and bool(after_loss)
    if not result.node and not is_after_loss and not (is_untraced and (loss_finite or not loss_replayed)):
        return None
    location = pb.Location(reproduced=True, op=result.node, produced=result.produced or "nan,inf")
    if result.parameters:
        location.parameter = result.parameters[0]
    site = result.site
    if is_after_loss:
        location.after_loss = after_loss
        location.phase = pb.LOCATION_PHASE_LOSS_BACKWARD if loss_finite else pb.LOCATION_PHASE_LOSS_FORWARD
        location.detail = _describe_after_loss(after_loss)
        return location
    if is_untraced:
        location.phase = pb.LOCATION_PHASE_LOSS_BACKWARD if loss_finite else pb.LOCATION_PHASE_LOSS_FORWARD
        location.detail = _UNTRACED_LOSS[location.phase]
        return location
    is_loss = site is not None and site.segment == LOSS_SEGMENT
    location.phase = pb.LOCATION_PHASE_LOSS_BACKWARD if is_loss else pb.LOCATION_PHASE_BACKWARD
    if site is not None:
        location.source, location.code = site.source, site.code
        location.module, location.module_type = site.module, site.module_type
    location.detail = _describe_backward(location, site)
    return location


def _returned_finite(loss_call: LossCall) -> bool:
    """Return whether the loss call returned a finite value in the step (one host synchronization, replays only)."""
    return loss_call.output is not None and bool(torch.isfinite(loss_call.output).all())


def _describe_after_loss(name: str) -> str:
    return (f"{name} returned a finite loss in the step and in the replay, and its backward gave finite gradients "
            f"at the model output, but in the step the gradient that reached the model output was non-finite. "
            f"So the value passed to backward() was computed from that loss by code after {name} (a scaling, a "
            f"sum of loss terms, a regularizer), and that code made NaN/Inf. Check what happens to the loss "
            f"between {name} and backward().")


_UNTRACED_LOSS = {
    pb.LOCATION_PHASE_LOSS_BACKWARD: (
        "The forward pass and the loss were finite, and the gradient that reached the model output was already "
        "non-finite: the backward of the loss computation outside the model made it. The operation is named "
        "when the loss is a loss_fn module of the Watcher, or under nanwatch run a module or a torch loss "
        "function called on the model output."),
    pb.LOCATION_PHASE_LOSS_FORWARD: (
        "The replayed model output was finite but the step's loss was not: the loss computation outside the "
        "model made NaN/Inf. The operation is named when the loss is a loss_fn module of the Watcher, or "
        "under nanwatch run a module or a torch loss function called on the model output."),
}


def _set_site(location: pb.Location, site: OpSite, produced: str) -> None:
    location.op, location.source, location.code = site.op, site.source, site.code
    location.produced = produced
    if site.module:
        location.module, location.module_type = location.module or site.module, location.module_type or site.module_type


def _describe_named(root: Origin, location: pb.Location) -> str:
    where = f"; the first module to return it was '{location.module}'" if location.module else ""
    produced = _produced_words(root.produced)
    if location.phase == pb.LOCATION_PHASE_INPUT:
        return f"The input {root.tensor} already held {produced} when the forward pass began{where}."
    return f"The {root.kind} '{root.tensor}' already held {produced} when the step began{where}."


def _describe_forward(location: pb.Location) -> str:
    if location.phase == pb.LOCATION_PHASE_LOSS_FORWARD:
        part = "the loss computation"
    elif location.module:
        part = f"module '{location.module}' ({location.module_type})"
    else:
        part = "the model's forward pass"
    text = f"{location.op}{_at(location.source)} in {part} made {_produced_words(location.produced)} from finite inputs"
    if location.then_op:
        text += f"; {location.then_op}{_at(location.then_source)} then turned it into NaN"
    return text + "."


def _describe_backward(location: pb.Location, site: OpSite | None) -> str:
    created = f", created by {site.op}{_at(site.source)}," if site is not None else ""
    if location.phase == pb.LOCATION_PHASE_LOSS_BACKWARD:
        where = "in the loss computation"
    elif location.module:
        where = f"in module '{location.module}'"
    else:
        where = "in the model"
    return (f"The forward pass and the loss were finite; the backward of {location.op}{created} {where} made "
            f"the first NaN/Inf gradient from finite ones.")


def _at(source: str) -> str:
    """Return " at file.py:42", or "" when no line of the user's code called the operation (torch modules only)."""
    return f" at {source}" if source else ""


def _produced_words(produced: str) -> str:
    """Return "inf and -inf" for the produced field "inf,-inf"."""
    return " and ".join(produced.split(",")) if produced else "NaN/Inf"


# ---- helpers ----


def _has_nan(tensor: torch.Tensor) -> bool:
    return bool(torch.isnan(tensor.detach()).any())


def _loss_tensor(value: Any) -> torch.Tensor | None:
    tensors = float_tensors(value, limit=1)
    if not tensors:
        return None
    loss = tensors[0]
    return loss if loss.numel() == 1 else loss.float().mean()


def _call_loss(loss_call: LossCall, outputs: list[torch.Tensor]) -> Any:
    def value(slot: tuple[str, Any]) -> Any:
        kind, item = slot
        return outputs[item] if kind == "output" and item < len(outputs) else item

    args = [value(slot) for slot in loss_call.args]
    kwargs = {key: value(slot) for key, slot in loss_call.kwargs.items()}
    return loss_call.fn(*args, **kwargs)


def _leaf_arguments(loss_call: LossCall) -> tuple[list[Any], dict[str, Any], list[tuple[str, torch.Tensor]]]:
    """Return the loss arguments with fresh leaves for those that required grad, and those leaves by name."""
    leaves: list[tuple[str, torch.Tensor]] = []

    def value(key: int | str, slot: tuple[str, Any]) -> Any:
        item = slot[1]
        if key in loss_call.grad_args and isinstance(item, torch.Tensor):
            item = item.detach().requires_grad_(True)
            leaves.append((f"{loss_call.name} argument {key}", item))
        return item

    args = [value(index, slot) for index, slot in enumerate(loss_call.args)]
    kwargs = {key: value(key, slot) for key, slot in loss_call.kwargs.items()}
    return args, kwargs, leaves


def _argument_names(args: Any, kwargs: dict[str, Any]) -> list[tuple[torch.Tensor, str]]:
    named = [(value, f"args[{index}]") for index, value in enumerate(args) if isinstance(value, torch.Tensor)]
    named += [(value, key) for key, value in kwargs.items() if isinstance(value, torch.Tensor)]
    return named


@contextlib.contextmanager
def _preserved(model: nn.Module) -> Iterator[None]:
    """Restore the CPU/CUDA RNG and every module buffer (BatchNorm statistics) after the block."""
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    buffers = [(buffer, buffer.detach().clone()) for buffer in model.buffers()]
    try:
        yield
    finally:
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)


@contextlib.contextmanager
def _rng_of(call: RootCall) -> Iterator[None]:
    torch.set_rng_state(call.cpu_rng)
    if call.cuda_rng is not None:
        torch.cuda.set_rng_state(call.cuda_rng[1], call.cuda_rng[0])
    yield


def _autocast_of(call: RootCall) -> contextlib.AbstractContextManager[Any]:
    if call.autocast_dtype is None:
        return torch.autocast(call.device_type, enabled=False)
    return torch.autocast(call.device_type, dtype=call.autocast_dtype)
