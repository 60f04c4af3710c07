"""Settings of the demo's planted faults: which loss, learning rate and data corruption each uses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

FAULTS: tuple[str, ...] = ("none", "data", "lr", "loss")

# SGD with momentum 0.9 trains the demo model cleanly at this learning rate.
BASE_LEARNING_RATE = 0.05


@dataclass(frozen=True, kw_only=True, slots=True)
class FaultSettings:
    """Changes that one fault makes to the clean training setup."""

    name: str
    learning_rate: float = BASE_LEARNING_RATE
    # "cross_entropy": a linear output layer and torch's cross_entropy.
    # "naive_bce": sigmoid output layer and a hand-written binary cross-entropy on one-hot targets.
    loss: Literal["cross_entropy", "naive_bce"] = "cross_entropy"
    # Factor applied to the logits before the sigmoid, used only with "naive_bce".
    logit_scale: float = 1.0
    # Step at which rank 0 draws the batch whose samples get a NaN pixel, or None for clean data.
    nan_batch_step: int | None = None
    # Number of samples in that batch that get a NaN pixel.
    nan_sample_count: int = 3


_SETTINGS: dict[str, FaultSettings] = {
    "none": FaultSettings(name="none"),
    # Three corrupted samples, all in the batch that rank 0 draws at step 20.
    "data": FaultSettings(name="data", nan_batch_step=20),
    # 240 times the clean rate and 12 times the usual upper lr of SGD (1.0). With 2 ranks
    # the loss is non-finite at step 6.
    "lr": FaultSettings(name="lr", learning_rate=12.0),
    # The sharp logit scale drives the sigmoid to exactly 1.0 in float32 once training makes the
    # model confident. For a target of 1 the term 0 * log(1 - 1.0) is NaN (step 44 with 2 ranks).
    # The step is sensitive to the scale: 40 gave step 84 and 50 gave step 8.
    "loss": FaultSettings(name="loss", loss="naive_bce", logit_scale=45.0),
}


def settings_for(fault: str) -> FaultSettings:
    """Return the settings of the named fault.

    Raises:
        ValueError: fault is not one of FAULTS.
    """
    try:
        return _SETTINGS[fault]
    except KeyError:
        raise ValueError(f"unknown fault {fault!r}; choose one of {', '.join(FAULTS)}") from None
