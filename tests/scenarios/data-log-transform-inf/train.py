"""Log-transformed skewed features on breast_cancer: a feature that is exactly 0 becomes -inf.

Concavity features are 0 for 13 tumours, so np.log(X) writes -inf into those rows, and the
first batch that contains one carries -inf into the network.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_breast_cancer
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nonfinite_probe import NonfiniteProbe  # noqa: E402

MAX_STEPS = 200

torch.manual_seed(0)
torch.set_num_threads(1)

features, labels = load_breast_cancer(return_X_y=True)
with np.errstate(divide="ignore"):
    features = np.log(features)       # meant to tame skewed features; log(0) = -inf
inputs = torch.tensor(features, dtype=torch.float32)
targets = torch.tensor(labels, dtype=torch.float32).unsqueeze(1)
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(inputs, targets), batch_size=16,
                                     shuffle=True, generator=torch.Generator().manual_seed(0))

model = nn.Sequential(nn.Linear(30, 32), nn.ReLU(), nn.Linear(32, 1))
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
probe = NonfiniteProbe()

step = 0
while not probe.tripped and step < MAX_STEPS:
    for xb, yb in loader:
        probe.check(step, "input", [xb, yb])
        loss = F.binary_cross_entropy_with_logits(model(xb), yb)
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
