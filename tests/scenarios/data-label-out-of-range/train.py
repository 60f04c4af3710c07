"""Class labels numbered from 1: the wine CSV export codes the cultivars 1, 2, 3.

The model has 3 outputs, so valid targets are 0, 1, 2. Label 3 is out of range: on CPU
CrossEntropyLoss raises "Target 3 is out of bounds" at the first batch that contains one, and on
CUDA the same batch triggers a device-side assert. The probe records that batch as bad input.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from sklearn.datasets import load_wine
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nonfinite_probe import NonfiniteProbe  # noqa: E402

MAX_STEPS = 200
NUM_CLASSES = 3

torch.manual_seed(0)
torch.set_num_threads(1)

features, cultivar = load_wine(return_X_y=True)
features = (features - features.mean(0)) / features.std(0)
inputs = torch.tensor(features, dtype=torch.float32)
targets = torch.tensor(cultivar + 1)                # the export's 1-based cultivar codes
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(inputs, targets), batch_size=4,
                                     shuffle=True, generator=torch.Generator().manual_seed(0))

model = nn.Sequential(nn.Linear(13, 32), nn.ReLU(), nn.Linear(32, NUM_CLASSES))
criterion = nn.CrossEntropyLoss()
optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
probe = NonfiniteProbe()

step = 0
while not probe.tripped and step < MAX_STEPS:
    for xb, yb in loader:
        probe.check(step, "input", [xb])
        probe.check_labels(step, yb, NUM_CLASSES)
        loss = criterion(model(xb), yb)
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
