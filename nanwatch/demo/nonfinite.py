"""The demo's own check for non-finite values, in plain torch and independent of nanwatch."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn

NonfiniteWhat = Literal["input", "loss", "grad"]


def _all_finite(tensor: torch.Tensor) -> bool:
    return bool(torch.isfinite(tensor).all())


def find_nonfinite(
    *, inputs: torch.Tensor, targets: torch.Tensor, loss: torch.Tensor, parameters: Iterable[nn.Parameter]
) -> NonfiniteWhat | None:
    """Return the first quantity of one step that contains a NaN or Inf, checked in data-flow order.

    Call it after backward and before optimizer.step(). With DDP the gradients are already
    all-reduced, so a NaN from any rank shows up as "grad" on every other rank.
    """
    if not (_all_finite(inputs) and _all_finite(targets)):
        return "input"
    if not _all_finite(loss):
        return "loss"
    if any(p.grad is not None and not _all_finite(p.grad) for p in parameters):
        return "grad"
    return None


def any_rank_flagged(flagged: bool) -> bool:
    """Return True on every rank when at least one rank passes flagged=True. All ranks must call it."""
    flag = torch.tensor([int(flagged)], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def parameters_finite(model: nn.Module) -> bool:
    """Return True when no parameter of the model contains a NaN or Inf."""
    return all(_all_finite(p.detach()) for p in model.parameters())
