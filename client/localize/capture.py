"""Per-step capture of what a replay needs: the model's inputs, RNG state, autocast state and output gradients.

A healthy step pays for references to the inputs (no copies), one copy of the
CPU generator state, and one tensor hook on the model output: about 0.1 ms per
step in the localization benchmark (BENCHMARKS.md). Everything is dropped after
each optimizer update.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from nanwatch.client.localize.guard import replaying
from nanwatch.client.localize.origins import float_tensors, has_nonfinite

# Forward passes and loss calls kept per optimizer step (gradient accumulation makes several).
MAX_CALLS_PER_STEP = 4
# Output gradients up to this many elements are kept as they are, which saves the few small
# operations of a finiteness flag. Larger ones, such as logits, are kept only as a flag.
SMALL_GRAD_ELEMENTS = 1 << 16


@dataclass(kw_only=True)
class RootCall:
    """One forward pass of the model in the current step."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    cpu_rng: torch.Tensor
    cuda_rng: tuple[int, torch.Tensor] | None
    device_type: str
    autocast_dtype: torch.dtype | None
    output_ids: list[int] = field(default_factory=list)
    output_grads: dict[int, torch.Tensor] = field(default_factory=dict)
    """Gradient that reached each output tensor (by position) in the real backward, when kept."""
    output_count: int = 0
    output_grad_flags: dict[int, torch.Tensor] = field(default_factory=dict)
    """Device flags "the gradient that reached this output held NaN/Inf", when the gradient was not kept."""
    loss_traced: bool = False
    """True when a loss call on this pass's outputs was recorded: the replay can recompute the gradients."""


@dataclass(kw_only=True)
class LossCall:
    """One loss computation: a loss module or function, and where its arguments came from.

    An argument is ("output", position) when it was a model output tensor of
    root call `call_index`, else ("value", value), with tensors detached.
    """

    fn: Callable[..., Any]
    name: str
    args: list[tuple[str, Any]]
    kwargs: dict[str, tuple[str, Any]]
    call_index: int | None
    grad_args: set[int | str] = field(default_factory=set)
    """Positions and keywords of arguments that required grad when the loss ran."""
    output: torch.Tensor | None = None
    """The loss value the call returned in the step (detached), when the caller saw it."""


class StepCapture:
    """Keeps the current step's forward passes and loss calls of one model for a replay."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.calls: collections.deque[RootCall] = collections.deque(maxlen=MAX_CALLS_PER_STEP)
        self.loss_calls: collections.deque[LossCall] = collections.deque(maxlen=MAX_CALLS_PER_STEP)
        self._handles: list[RemovableHandle] = [
            model.register_forward_pre_hook(self._on_forward_pre, with_kwargs=True),
            model.register_forward_hook(self._on_forward),
        ]
        self._pending: RootCall | None = None

    def _on_forward_pre(self, unused_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.begin_call(args, kwargs)

    def begin_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Start recording a forward pass of the model; the forward pre-hook calls this.

        Call it directly for a pass that was already running when the capture was
        created, whose pre-hooks torch had already gathered.
        """
        if replaying() or not torch.is_grad_enabled():
            self._pending = None
            return
        tensors = float_tensors((args, kwargs), limit=1)
        device_type = tensors[0].device.type if tensors else "cpu"
        self._pending = RootCall(
            args=args, kwargs=dict(kwargs), cpu_rng=torch.get_rng_state(), cuda_rng=_cuda_rng(device_type),
            device_type=device_type,
            autocast_dtype=torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None,
        )

    def _on_forward(self, unused_module: nn.Module, unused_args: Any, output: Any) -> None:
        call, self._pending = self._pending, None
        if call is None or replaying():
            return
        outputs = float_tensors(output)
        call.output_ids = [id(tensor) for tensor in outputs]
        call.output_count = len(outputs)
        for position, tensor in enumerate(outputs):
            if tensor.requires_grad:
                tensor.register_hook(_grad_keeper(call, position))
        self.calls.append(call)

    def capture_loss(self, fn: Callable[..., Any], name: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                     *, only_on_output: bool = False, output: Any = None) -> None:
        """Record a loss call of this step; its arguments are matched against the last forward pass's outputs.

        With only_on_output, a call that takes no output of that pass is not recorded:
        the caller could not tell whether it computes the loss.
        """
        if replaying():
            return
        call_index = len(self.calls) - 1 if self.calls else None
        positions = {tensor_id: position for position, tensor_id in enumerate(self.calls[-1].output_ids)} \
            if self.calls else {}
        grad_args: set[int | str] = set()

        def slot(key: int | str, value: Any) -> tuple[str, Any]:
            if isinstance(value, torch.Tensor):
                if id(value) in positions:
                    return ("output", positions[id(value)])
                if value.requires_grad:
                    grad_args.add(key)
                return ("value", value.detach())
            return ("value", value)

        loss_args = [slot(index, value) for index, value in enumerate(args)]
        loss_kwargs = {key: slot(key, value) for key, value in kwargs.items()}
        matched = any(kind == "output" for kind, _ in [*loss_args, *loss_kwargs.values()])
        if only_on_output and not matched:
            return
        if matched:
            self.calls[-1].loss_traced = True
        value = output.detach() if isinstance(output, torch.Tensor) else None
        self.loss_calls.append(LossCall(fn=fn, name=name, args=loss_args, kwargs=loss_kwargs,
                                        call_index=call_index if matched else None, grad_args=grad_args,
                                        output=value))

    def clear(self) -> None:
        """Forget the step's calls; called after each optimizer update."""
        self.calls.clear()
        self.loss_calls.clear()
        self._pending = None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.clear()


def _grad_keeper(call: RootCall, position: int) -> Callable[[torch.Tensor], None]:
    """Return a tensor hook that keeps the gradient of one model output for the replay.

    With a traced loss the replay recomputes the gradient from the loss, so for a
    large output the hook keeps only a device flag of whether the gradient was
    finite, read only by a replay. Keeping the logits' gradient costs memory and
    about 1% of a transformer step on CPU.
    """
    def keep(grad: torch.Tensor) -> None:
        if replaying():
            return
        if not call.loss_traced or grad.numel() <= SMALL_GRAD_ELEMENTS:
            call.output_grads[position] = grad
            return
        flag = has_nonfinite(grad.detach())
        if flag is not None:
            call.output_grad_flags[position] = flag

    return keep


def _cuda_rng(device_type: str) -> tuple[int, torch.Tensor] | None:
    if device_type != "cuda" or not torch.cuda.is_initialized():
        return None
    device = torch.cuda.current_device()
    return device, torch.cuda.get_rng_state(device)
