"""Healthy control: a clean digits MLP with Adam, scaled inputs and default initialization."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from sklearn.datasets import load_digits
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nonfinite_probe import NonfiniteProbe  # noqa: E402

MAX_STEPS = 150

torch.manual_seed(0)
torch.set_num_threads(1)

digits = load_digits()
pixels = torch.tensor(digits.data / 16.0, dtype=torch.float32)
targets = torch.tensor(digits.target)
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(pixels, targets), batch_size=32,
                                     shuffle=True, generator=torch.Generator().manual_seed(0))

model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
criterion = nn.CrossEntropyLoss()
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
probe = NonfiniteProbe()

step = 0
losses: list[float] = []
while not probe.tripped and step < MAX_STEPS:
    for xb, yb in loader:
        probe.check(step, "input", [xb])
        loss = criterion(model(xb), yb)
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

probe.report(steps=step, first_loss=round(losses[0], 3), last_loss=round(losses[-1], 3))
