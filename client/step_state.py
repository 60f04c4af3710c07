"""Per-step record of check_batch and observe_loss results, kept on the device."""

from __future__ import annotations

import torch

from nanwatch.client.summaries import BatchEntry, nonfinite_flag

# Gradient accumulation calls check_batch several times per optimizer step; beyond this
# many entries the oldest summaries go, but data_nonfinite keeps what they saw.
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
        # Whether a batch tensor dropped from batch held NaN or Inf. The kept entries' statistics show their own.
        self.data_nonfinite: torch.Tensor | None = None
        self.loss: torch.Tensor | None = None
        self.loss_nonfinite: torch.Tensor | None = None

    def add_batch(self, entry: BatchEntry) -> None:
        """Record one check_batch tensor."""
        self.batch.append(entry)
        if len(self.batch) > MAX_BATCH_ENTRIES:
            dropped = self.batch[:-MAX_BATCH_ENTRIES]
            del self.batch[:-MAX_BATCH_ENTRIES]
            self.data_nonfinite = _accumulate(self.data_nonfinite, nonfinite_flag([old.stats for old in dropped]))

    def add_loss(self, loss: torch.Tensor) -> None:
        """Record a loss value; a loss with several elements (reduction="none") counts as its mean.

        loss_nonfinite stays None while the step has one floating-point scalar loss,
        because the value shows by itself whether it is finite, which saves device work
        on every step. A second loss in the step, or a loss of several elements, sets it.
        """
        loss = loss.detach()
        if self.loss is not None and self.loss_nonfinite is None:
            self.loss_nonfinite = ~torch.isfinite(self.loss)
        if loss.numel() == 1 and loss.is_floating_point():
            self.loss = loss.reshape(())
            if self.loss_nonfinite is not None:
                self.loss_nonfinite = _accumulate(self.loss_nonfinite, ~torch.isfinite(self.loss))
            return
        self.loss = loss.float().mean() if loss.numel() != 1 else loss.float().reshape(())
        self.loss_nonfinite = _accumulate(self.loss_nonfinite, ~torch.isfinite(loss).all())

    def reset(self) -> None:
        """Forget everything; called after each optimizer update."""
        self.__init__()
