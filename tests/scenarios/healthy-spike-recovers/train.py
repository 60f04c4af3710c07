"""Healthy control: a short loss spike from two mislabelled batches, then recovery.

The digits loader is not shuffled, and a labelling bug shifted the labels of samples 960-1023
by one class, which are batches 30 and 31 of the epoch. The loss jumps several-fold for those
two steps and falls back within a few steps; all values stay finite and the run ends
normally. A check must treat this as a transient spike, not as divergence, and must not halt.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from sklearn.datasets import load_digits
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nonfinite_probe import NonfiniteProbe  # noqa: E402

MAX_STEPS = 55
BATCH_SIZE = 32
MISLABELLED = slice(960, 1024)

torch.manual_seed(0)
torch.set_num_threads(1)

digits = load_digits()
pixels = torch.tensor(digits.data / 16.0, dtype=torch.float32)
targets = torch.tensor(digits.target)
targets[MISLABELLED] = (targets[MISLABELLED] + 1) % 10
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(pixels, targets), batch_size=BATCH_SIZE)

model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
criterion = nn.CrossEntropyLoss()
optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
probe = NonfiniteProbe()

step = 0
losses: list[float] = []
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

probe.report(steps=step, losses_steps_26_to_40=[round(value, 2) for value in losses[26:41]],
             last_loss=round(losses[-1], 3))
