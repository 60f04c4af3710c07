"""A class-balanced loss that guards empty classes with torch.where(count > 0, total / count, 0).

Iris in batches of 12: the loss averages the cross-entropy per class, then over classes. When a
class is missing from a batch, total / count is 0 / 0 = NaN in the branch that torch.where
discards, so the forward loss is finite. The backward pass still runs through that branch:
the gradient of total / count is 1 / count = inf, multiplied by the zero that where() routes
there, gives NaN in every gradient.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from sklearn.datasets import load_iris
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nonfinite_probe import NonfiniteProbe  # noqa: E402

MAX_STEPS = 300
NUM_CLASSES = 3


def class_balanced_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    per_sample = F.cross_entropy(logits, targets, reduction="none")
    one_hot = F.one_hot(targets, NUM_CLASSES).float()
    total = one_hot.T @ per_sample
    count = one_hot.sum(0)
    per_class = torch.where(count > 0, total / count, torch.zeros_like(total))
    return per_class.sum() / (count > 0).sum()


torch.manual_seed(0)
torch.set_num_threads(1)

iris = load_iris()
features = (iris.data - iris.data.mean(0)) / iris.data.std(0)
inputs = torch.tensor(features, dtype=torch.float32)
targets = torch.tensor(iris.target)
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(inputs, targets), batch_size=12,
                                     shuffle=True, generator=torch.Generator().manual_seed(0))

model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, NUM_CLASSES))
optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
probe = NonfiniteProbe()

step = 0
while not probe.tripped and step < MAX_STEPS:
    for xb, yb in loader:
        probe.check(step, "input", [xb])
        loss = class_balanced_cross_entropy(model(xb), yb)
        probe.check(step, "loss", [loss])
        optimizer.zero_grad()
        loss.backward()
        probe.check(step, "grad", [p.grad for p in model.parameters()])
        optimizer.step()
        probe.check(step, "param", model.parameters())
        step += 1
        if probe.tripped or step >= MAX_STEPS:
            break

probe.report()
