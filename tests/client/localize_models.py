"""Models whose first NaN/Inf starts at a known module, operation or parameter, for the localization tests."""

from __future__ import annotations

import torch
from torch import nn


class LogFeatures(nn.Module):
    """Takes the log of its input; a ReLU before it makes zeros, so the log gives -inf."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(x)


class Block(nn.Module):
    def __init__(self, width: int, with_log: bool = False) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.act = nn.ReLU()
        self.features = LogFeatures() if with_log else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.fc(x))
        if self.features is not None:
            h = self.features(h)
        return h


class DeepNet(nn.Module):
    """Four blocks and a head; log_at puts a LogFeatures module into that block (-1: none)."""

    def __init__(self, log_at: int = -1, width: int = 16, classes: int = 3) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[Block(width, with_log=index == log_at) for index in range(4)])
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x))


class EdgeLength(nn.Module):
    """Length of each row: finite forward, but the backward of sqrt at 0 is infinite."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.pow(2).sum(-1, keepdim=True).sqrt()


class SqrtNet(nn.Module):
    """A finite forward pass whose backward makes NaN in EdgeLength when its input rows are 0."""

    def __init__(self, width: int = 16, classes: int = 3) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.length = EdgeLength()
        self.head = nn.Linear(width + 1, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x) * 0.0
        return self.head(torch.cat([h, self.length(h)], dim=-1))


class FlakyNet(nn.Module):
    """Returns NaN on its first forward pass only, as faulty hardware would; a replay stays finite."""

    def __init__(self, width: int = 16, classes: int = 3) -> None:
        super().__init__()
        self.head = nn.Linear(width, classes)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        out = self.head(x)
        return out * float("nan") if self.calls == 1 else out


class ProbabilityNLL(nn.Module):
    """A hand-written loss on sharpened softmax probabilities: the log of an underflowed 0 is -inf."""

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        probabilities = torch.softmax(logits * 1000.0, dim=-1)
        return -torch.log(probabilities.gather(1, targets[:, None])).mean()


class DistanceLoss(nn.Module):
    """Euclidean distance to the target: finite, but its backward is NaN where output equals target."""

    def forward(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return (outputs - targets).pow(2).sum(-1).sqrt().mean()


def exploding_net() -> DeepNet:
    """A DeepNet whose second block's weights are so large that its output overflows float32."""
    model = DeepNet()
    with torch.no_grad():
        model.blocks[1].fc.weight.mul_(1e38)
    return model
