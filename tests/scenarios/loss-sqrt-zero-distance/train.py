"""A triplet loss whose Euclidean distance is sqrt(sum(d**2)) and whose positive can be the anchor.

Metric learning on digits: for every anchor the script draws a positive of the same class from
the whole training set, with no check that it differs from the anchor. When the draw returns
the anchor itself, the distance is sqrt(0) = 0: the forward pass is finite, but the gradient
of sqrt at 0 is inf, and inf * 0 = NaN lands in every gradient.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nonfinite_probe import NonfiniteProbe  # noqa: E402

MAX_STEPS = 300
BATCH_SIZE = 32
MARGIN = 1.0


def euclidean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((a - b) ** 2).sum(dim=1).sqrt()


torch.manual_seed(0)
torch.set_num_threads(1)

digits = load_digits()
pixels = torch.tensor(digits.data / 16.0, dtype=torch.float32)
labels = torch.tensor(digits.target)
members = [torch.nonzero(labels == c).squeeze(1) for c in range(10)]
generator = torch.Generator().manual_seed(0)


def draw_same_class(anchors: torch.Tensor) -> torch.Tensor:
    """Draw one index of the same class per anchor (the anchor itself is not excluded)."""
    picks = [members[int(labels[a])][torch.randint(len(members[int(labels[a])]), (1,), generator=generator)]
             for a in anchors]
    return torch.cat(picks)


model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 16))
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
probe = NonfiniteProbe()

for step in range(MAX_STEPS):
    anchors = torch.randint(len(pixels), (BATCH_SIZE,), generator=generator)
    positives = draw_same_class(anchors)
    negatives = torch.randint(len(pixels), (BATCH_SIZE,), generator=generator)
    batch = torch.cat([pixels[anchors], pixels[positives], pixels[negatives]])
    probe.check(step, "input", [batch])
    anchor, positive, negative = model(batch).chunk(3)
    loss = F.relu(euclidean(anchor, positive) - euclidean(anchor, negative) + MARGIN).mean()
    probe.check(step, "loss", [loss])
    optimizer.zero_grad()
    loss.backward()
    probe.check(step, "grad", [p.grad for p in model.parameters()])
    optimizer.step()
    probe.check(step, "param", model.parameters())
    if probe.tripped:
        break

probe.report()
