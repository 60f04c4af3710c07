"""Leaf-module forward trace of the first forward pass."""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.utils.hooks import RemovableHandle

from nanwatch.v1 import nanwatch_pb2 as pb

# A model that loops over a leaf module many times per forward pass would otherwise grow
# the trace without bound.
MAX_TRACE_CALLS = 10_000


class ForwardTrace:
    """Records which leaf modules (modules without children) run, in order, in the first forward pass.

    One-shot hooks: a forward pre-hook on every leaf records the call, and a forward
    hook on the root removes all hooks when the first forward pass ends.
    """

    def __init__(self, model: nn.Module) -> None:
        self.calls: list[pb.ModuleCall] = []
        self.finished = False
        self._handles: list[RemovableHandle] = []
        for name, module in model.named_modules():
            if next(module.children(), None) is None:
                self._handles.append(module.register_forward_pre_hook(self._make_recorder(name)))
        self._handles.append(model.register_forward_hook(self._on_root_done))

    def _make_recorder(self, name: str) -> Any:
        def record(module: nn.Module, unused_args: Any) -> None:
            if len(self.calls) < MAX_TRACE_CALLS:
                self.calls.append(pb.ModuleCall(name=name, type=type(module).__name__))

        return record

    def _on_root_done(self, unused_module: nn.Module, unused_args: Any, unused_output: Any) -> None:
        self.finished = True
        self.remove()

    def remove(self) -> None:
        """Remove every hook this trace installed; safe to call more than once."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
