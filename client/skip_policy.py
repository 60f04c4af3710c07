"""The skip policy: skip a non-finite update on every rank, as a GradScaler does, up to N times in a row."""

from __future__ import annotations

import logging

import torch

from nanwatch.bootstrap import max_consecutive_skips_from_env
from nanwatch.client.local_checks import Reason

logger = logging.getLogger(__name__)

# Causes whose update can be skipped: the batch and the weights are finite, only this step's
# loss or gradients are not. Bad data, poisoned weights and HALT signals always halt.
SKIPPABLE = int(Reason.LOSS) | int(Reason.GRADIENT)


def resolve_max_consecutive_skips(value: int | None) -> int:
    """Return value, else $NANWATCH_MAX_CONSECUTIVE_SKIPS, else 0; raise ValueError naming a bad value."""
    if value is None:
        return max_consecutive_skips_from_env()
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"max_consecutive_skips must be an integer >= 0, got {value!r}")
    return value


class SkipPolicy:
    """Counts consecutive skipped updates and decides, from the codes every rank agreed on, whether to skip.

    Every rank gets the same codes at the same step, so every rank makes the same
    decision: either all skip the update or all halt, and no rank waits alone in
    the next collective.
    """

    def __init__(self, max_consecutive: int) -> None:
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self.total = 0

    def should_skip(self, codes: list[int]) -> bool:
        """Return True when every non-zero code is skippable and the limit is not reached yet."""
        if not any(codes) or any(code & ~SKIPPABLE for code in codes):
            return False
        return self.consecutive < self.max_consecutive

    def on_healthy_step(self) -> None:
        self.consecutive = 0

    def skip(self, optimizer: torch.optim.Optimizer, step: int, rank: int) -> None:
        """Drop every gradient of the optimizer, so its step() leaves the parameters and their state as they are."""
        for group in optimizer.param_groups:
            for parameter in group["params"]:
                parameter.grad = None
        self.consecutive += 1
        self.total += 1
        logger.warning("nanwatch rank %d: skipped the non-finite update of step %d (%d of at most %d in a row)",
                       rank, step, self.consecutive, self.max_consecutive)
