"""SGD with weight_decay=30 (a config meant to read 3e-4) and lr=0.1 on a wine MLP.

With L2 weight decay, plain SGD multiplies every weight by (1 - lr * weight_decay) = -2 each
step before the gradient term, so the weights flip sign and double every step until they
overflow float32.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from sklearn.datasets import load_wine
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nonfinite_probe import NonfiniteProbe  # noqa: E402

MAX_STEPS = 300

torch.manual_seed(0)
torch.set_num_threads(1)

features, cultivar = load_wine(return_X_y=True)
features = (features - features.mean(0)) / features.std(0)
inputs = torch.tensor(features, dtype=torch.float32)
targets = torch.tensor(cultivar)
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(inputs, targets), batch_size=16,
                                     shuffle=True, generator=torch.Generator().manual_seed(0))

model = nn.Sequential(nn.Linear(13, 32), nn.ReLU(), nn.Linear(32, 3))
criterion = nn.CrossEntropyLoss()
optimizer = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=30.0)
probe = NonfiniteProbe()

step = 0
while not probe.tripped and step < MAX_STEPS:
    for xb, yb in loader:
        probe.check(step, "input", [xb])
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
