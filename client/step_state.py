"""Per-step record of check_batch and observe_loss results, kept on the device."""

from __future__ import annotations

import torch

from nanwatch.client.summaries import BatchEntry

# Gradient accumulation calls check_batch several times per optimizer step; beyond this
# many entries the oldest summaries go, but the non-finite flag keeps what they saw.
MAX_BATCH_ENTRIES = 64


def _accumulate(flag: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
    """Return flag OR new, on flag's device."""
    if flag is None:
        return new
    return torch.logical_or(flag, new.to(flag.device))


class StepState:
    """Per-step accumulators, reset by the optimizer step post-hook.

    The non-finite flags stay set until an optimizer step runs, so a NaN seen in
    an iteration whose step GradScaler skipped still halts the next step.
    """

    def __init__(self) -> None:
        self.batch: list[BatchEntry] = []
        self.data_nonfinite: torch.Tensor | None = None
        self.loss: torch.Tensor | None = None
        self.loss_nonfinite: torch.Tensor | None = None

    def add_batch(self, entry: BatchEntry) -> None:
        """Record one check_batch tensor."""
        self.batch.append(entry)
        del self.batch[:-MAX_BATCH_ENTRIES]
        self.data_nonfinite = _accumulate(self.data_nonfinite, entry.nonfinite)

    def add_loss(self, loss: torch.Tensor) -> None:
        """Record a loss value; a loss with several elements (reduction="none") counts as its mean."""
        loss = loss.detach()
        self.loss = loss.float().mean() if loss.numel() != 1 else loss.float().reshape(())
        self.loss_nonfinite = _accumulate(self.loss_nonfinite, ~torch.isfinite(loss).all())

    def reset(self) -> None:
        """Forget everything; called after each optimizer update."""
        self.__init__()
