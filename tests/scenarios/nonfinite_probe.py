"""First non-finite value of a training loop, measured by the scenario scripts themselves.

The scenario scripts do not import nanwatch. Each one calls this probe after every part of a
step (input, loss, gradients, parameters after the update). The probe only records: the step
still runs to the end (backward, clipping, optimizer.step()), so a watcher hooked into the
loss, the gradients or the optimizer sees the failing step, and the script stops after that
step, so it ends within its step limit even when nothing halts it. The last line a script
prints is the probe's JSON measurement; it is also printed when the script dies of an
exception (an out-of-range class label raises in the loss on CPU).

A step is the number of optimizer steps completed before the checked iteration, counted from 0.
"""

from __future__ import annotations

import atexit
import json
from collections.abc import Iterable
from typing import Any, Literal

import torch
import torch.distributed as dist

What = Literal["input", "loss", "grad", "param"]


class NonfiniteProbe:
    """Records the first step and quantity that held a NaN or Inf (or an invalid class label).

    Under torch.distributed every check is a collective: all ranks agree on the verdict, so they
    stop at the same point and none is left waiting in a gradient all-reduce. Every rank must
    therefore make the same sequence of checks.

    Example:
        probe = NonfiniteProbe()
        for step in range(MAX_STEPS):
            probe.check(step, "input", [xb, yb])
            ...
            probe.check(step, "param", model.parameters())
            if probe.tripped:
                break
        probe.report()
    """

    def __init__(self) -> None:
        self.step: int | None = None
        self.what: What | None = None
        self.ranks: list[int] = []
        self._rank = dist.get_rank() if dist.is_initialized() else 0
        self._distributed = dist.is_initialized()
        self._reported = False
        self._last_step = -1
        atexit.register(self.report)

    @property
    def tripped(self) -> bool:
        """Whether the script should stop: a non-finite value has been seen.

        Parameters that turned non-finite in an update are flagged one step later, so
        that a watcher in the optimizer step of the next iteration sees them.
        """
        if self.step is None:
            return False
        return self.what != "param" or self._last_step > self.step

    def check(self, step: int, what: What, tensors: Iterable[torch.Tensor | None]) -> bool:
        """Return True if any tensor (or an earlier check) held a NaN or Inf."""
        self._last_step = step
        bad = any(t is not None and not bool(torch.isfinite(t).all()) for t in tensors)
        return self._record(step, what, bad)

    def check_labels(self, step: int, labels: torch.Tensor, num_classes: int) -> bool:
        """Return True if a class label lies outside [0, num_classes): recorded as bad input."""
        self._last_step = step
        bad = bool(((labels < 0) | (labels >= num_classes)).any())
        return self._record(step, "input", bad)

    def report(self, **extra: Any) -> None:
        """Print the measurement once as one JSON line (rank 0 only under torch.distributed)."""
        if self._reported or self._rank != 0:
            return
        self._reported = True
        result: dict[str, Any] = {"first_nonfinite_step": self.step, "what": self.what}
        if self._distributed:
            result["ranks"] = self.ranks
        result.update(extra)
        print(json.dumps(result), flush=True)

    def _record(self, step: int, what: What, bad: bool) -> bool:
        if self.step is not None:
            return True
        bad_ranks = _gather_flags(bad)
        if bad_ranks:
            self.step, self.what, self.ranks = step, what, bad_ranks
        return self.tripped


def _gather_flags(bad: bool) -> list[int]:
    """Return the ranks whose local flag is set (only rank 0 without torch.distributed)."""
    if not dist.is_initialized():
        return [0] if bad else []
    flags = torch.zeros(dist.get_world_size())
    flags[dist.get_rank()] = float(bad)
    dist.all_reduce(flags)
    return [rank for rank, flag in enumerate(flags.tolist()) if flag > 0]
