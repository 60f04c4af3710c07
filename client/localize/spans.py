"""Module hooks of a replay: the module stack that names each operation's module, and non-finite module outputs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from nanwatch.client.localize.origins import ForwardOrigins, Origin, float_tensors

# Module outputs recorded per replay; the first ones in execution order are the ones that matter.
MAX_HITS = 256


@dataclass(frozen=True, kw_only=True)
class ModuleHit:
    """A module call whose output held NaN or Inf, in the order the calls returned."""

    name: str
    module_type: str
    origin: Origin


class ModuleSpans:
    """Forward hooks on every module of the model for the length of one replay.

    Forward hooks run when a module returns, so the first hit is the innermost
    module that returned a non-finite output first.
    """

    def __init__(self, model: nn.Module, origins: ForwardOrigins) -> None:
        self.hits: list[ModuleHit] = []
        self._origins = origins
        self._handles: list[RemovableHandle] = []
        for name, module in model.named_modules():
            self._handles.append(module.register_forward_pre_hook(self._enter(name, type(module).__name__)))
            self._handles.append(module.register_forward_hook(self._leave(name, type(module).__name__),
                                                              always_call=True))

    def _enter(self, name: str, module_type: str) -> Any:
        def enter(unused_module: nn.Module, unused_args: Any) -> None:
            self._origins.modules.append((name, module_type))

        return enter

    def _leave(self, name: str, module_type: str) -> Any:
        def leave(unused_module: nn.Module, unused_args: Any, output: Any) -> None:
            if self._origins.modules:
                self._origins.modules.pop()
            if len(self.hits) >= MAX_HITS:
                return
            with self._origins.paused():
                bad = next((tensor for tensor in float_tensors(output)
                            if not bool(torch.isfinite(tensor.detach()).all())), None)
                if bad is not None:
                    self.hits.append(ModuleHit(name=name, module_type=module_type,
                                               origin=self._origins.origin_of(bad)))

        return leave

    def first_hit_from(self, root: Origin | None) -> ModuleHit | None:
        """Return the first hit whose value descends from root, else the first hit."""
        if root is not None:
            for hit in self.hits:
                if hit.origin.root() is root:
                    return hit
        return self.hits[0] if self.hits else None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
