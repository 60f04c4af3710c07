"""Healthy control: a noisy loss from batches of 2 on diabetes regression with SGD.

Diabetes progression is noisy (a linear model explains about half its variance), so with two
patients per batch the loss of single steps ranges from near 0 to about 6 times its median,
while its 100-step mean falls. Nothing here is a fault: a check must not call this a spike
or a divergence.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from sklearn.datasets import load_diabetes
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nonfinite_probe import NonfiniteProbe  # noqa: E402

MAX_STEPS = 400

torch.manual_seed(0)
torch.set_num_threads(1)

features, progression = load_diabetes(return_X_y=True)
inputs = torch.tensor((features - features.mean(0)) / features.std(0), dtype=torch.float32)
targets = torch.tensor((progression - progression.mean()) / progression.std(), dtype=torch.float32).unsqueeze(1)
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(inputs, targets), batch_size=2,
                                     shuffle=True, generator=torch.Generator().manual_seed(0))

model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 1))
optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
probe = NonfiniteProbe()

step = 0
losses: list[float] = []
while not probe.tripped and step < MAX_STEPS:
    for xb, yb in loader:
        probe.check(step, "input", [xb, yb])
        loss = F.mse_loss(model(xb), yb)
        probe.check(step, "loss", [loss])
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        probe.check(step, "grad", [p.grad for p in model.parameters()])
        optimizer.step()
        probe.check(step, "param", model.parameters())
        step += 1
        if probe.tripped or step >= MAX_STEPS:
            break

probe.report(steps=step, first_100_mean=round(statistics.mean(losses[:100]), 3),
             last_100_mean=round(statistics.mean(losses[-100:]), 3), max_loss=round(max(losses), 3), min_loss=round(min(losses), 5),
             median_loss=round(statistics.median(losses), 3))
