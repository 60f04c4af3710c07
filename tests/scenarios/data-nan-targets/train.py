"""Regression targets with missing values stored as NaN, fed straight into MSE.

Iris: predict petal width from the other three measurements. The petal widths come from a
second table joined on the sample id, and 4 ids had no row there, so the join wrote NaN.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_iris
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nonfinite_probe import NonfiniteProbe  # noqa: E402

MAX_STEPS = 200

torch.manual_seed(0)
torch.set_num_threads(1)

measurements = load_iris().data
petal_width = measurements[:, 3].copy()
petal_width[[23, 71, 88, 140]] = np.nan          # ids missing from the joined table
inputs = torch.tensor(measurements[:, :3], dtype=torch.float32)
targets = torch.tensor(petal_width, dtype=torch.float32).unsqueeze(1)
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(inputs, targets), batch_size=8,
                                     shuffle=True, generator=torch.Generator().manual_seed(1))

model = nn.Sequential(nn.Linear(3, 32), nn.ReLU(), nn.Linear(32, 1))
optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
probe = NonfiniteProbe()

step = 0
while not probe.tripped and step < MAX_STEPS:
    for xb, yb in loader:
        probe.check(step, "input", [xb, yb])
        loss = F.mse_loss(model(xb), yb)
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
