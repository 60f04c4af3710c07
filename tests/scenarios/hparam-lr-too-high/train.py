"""SGD with lr=10 on a diabetes regression MLP: a learning rate 100 times the usual 0.1.

Each update moves the weights by far more than their own size, so the squared error grows by
orders of magnitude per step and overflows to inf, then NaN, within a few steps.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from sklearn.datasets import load_diabetes
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nonfinite_probe import NonfiniteProbe  # noqa: E402

MAX_STEPS = 300

torch.manual_seed(0)
torch.set_num_threads(1)

features, progression = load_diabetes(return_X_y=True)
inputs = torch.tensor((features - features.mean(0)) / features.std(0), dtype=torch.float32)
targets = torch.tensor((progression - progression.mean()) / progression.std(), dtype=torch.float32).unsqueeze(1)
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(inputs, targets), batch_size=32,
                                     shuffle=True, generator=torch.Generator().manual_seed(0))

model = nn.Sequential(nn.Linear(10, 64), nn.LeakyReLU(), nn.Linear(64, 64), nn.LeakyReLU(), nn.Linear(64, 1))
optimizer = torch.optim.SGD(model.parameters(), lr=10.0)
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

probe.report(losses=[float(f"{value:.3g}") for value in losses])
