"""The demo's model and losses: a small MLP with a softmax or a sigmoid output, and a hand-written BCE."""

from __future__ import annotations

import torch
from torch import nn

from nanwatch.demo.data import NUM_CLASSES, NUM_FEATURES
from nanwatch.demo.faults import FaultSettings

HIDDEN_WIDTH = 64
# LeakyReLU keeps units alive when a too-high learning rate throws weights far off, so the
# lr fault diverges to inf/NaN instead of stalling on dead ReLUs.
LEAKY_SLOPE = 0.1


class LogitScale(nn.Module):
    """Multiply logits by a fixed factor, as a temperature of 1/scale does."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return logits * self.scale

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


class NaiveBCELoss(nn.Module):
    """Binary cross-entropy on probabilities, written out by hand without clamping.

    Unlike torch.nn.BCELoss, which clamps each log term at -100, this returns inf when a
    probability is exactly 0.0 or 1.0 on the wrong side and NaN when it is exactly 1.0 with
    target 1 (0 * log(0)). The demo uses it to reproduce a common hand-written loss that fails.
    """

    def forward(self, probabilities: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        positive = targets * torch.log(probabilities)
        negative = (1 - targets) * torch.log(1 - probabilities)
        return -(positive + negative).mean()


def build_model(settings: FaultSettings) -> nn.Sequential:
    """Return the MLP for the fault; with the naive BCE loss its last leaf module is nn.Sigmoid."""
    layers: list[nn.Module] = [
        nn.Linear(NUM_FEATURES, HIDDEN_WIDTH),
        nn.LeakyReLU(LEAKY_SLOPE),
        nn.Linear(HIDDEN_WIDTH, HIDDEN_WIDTH),
        nn.LeakyReLU(LEAKY_SLOPE),
        nn.Linear(HIDDEN_WIDTH, NUM_CLASSES),
    ]
    if settings.loss == "naive_bce":
        layers += [LogitScale(settings.logit_scale), nn.Sigmoid()]
    return nn.Sequential(*layers)


def build_criterion(settings: FaultSettings) -> nn.Module:
    """Return the loss module for the fault."""
    if settings.loss == "naive_bce":
        return NaiveBCELoss()
    return nn.CrossEntropyLoss()
