"""A sigmoid output with a hand-written binary cross-entropy.

-(y log p + (1 - y) log(1 - p)) breaks once the classifier is confident: in float32
sigmoid(z) rounds to exactly 1.0 for z above about 17, so log(1 - p) = -inf and
(1 - y) * -inf = 0 * -inf = NaN. nn.BCELoss clamps the log at -100 and
BCEWithLogitsLoss never forms p, so neither has this failure.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from sklearn.datasets import load_breast_cancer
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nonfinite_probe import NonfiniteProbe  # noqa: E402

MAX_STEPS = 300


def binary_cross_entropy(probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -(targets * torch.log(probs) + (1 - targets) * torch.log(1 - probs)).mean()


torch.manual_seed(0)
torch.set_num_threads(1)

features, labels = load_breast_cancer(return_X_y=True)
features = (features - features.mean(0)) / features.std(0)
inputs = torch.tensor(features, dtype=torch.float32)
targets = torch.tensor(labels, dtype=torch.float32).unsqueeze(1)
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(inputs, targets), batch_size=32,
                                     shuffle=True, generator=torch.Generator().manual_seed(0))

model = nn.Sequential(nn.Linear(30, 64), nn.ReLU(), nn.Linear(64, 1), nn.Sigmoid())
optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
probe = NonfiniteProbe()

step = 0
while not probe.tripped and step < MAX_STEPS:
    for xb, yb in loader:
        probe.check(step, "input", [xb, yb])
        loss = binary_cross_entropy(model(xb), yb)
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
