"""A deep ReLU MLP initialised with std 1 instead of the fan-in scale sqrt(2 / fan_in).

With 40 layers of width 256, every layer multiplies the activation scale by about
sqrt(256 / 2) = 11, so the first forward pass overflows float32 (3.4e38) before the output.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from sklearn.datasets import load_digits
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nonfinite_probe import NonfiniteProbe  # noqa: E402

MAX_STEPS = 200
DEPTH = 40
WIDTH = 256

torch.manual_seed(0)
torch.set_num_threads(1)

digits = load_digits()
pixels = torch.tensor(digits.data / 16.0, dtype=torch.float32)
targets = torch.tensor(digits.target)
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(pixels, targets), batch_size=32,
                                     shuffle=True, generator=torch.Generator().manual_seed(0))

layers: list[nn.Module] = [nn.Linear(64, WIDTH), nn.ReLU()]
for _ in range(DEPTH - 2):
    layers += [nn.Linear(WIDTH, WIDTH), nn.ReLU()]
layers.append(nn.Linear(WIDTH, 10))
model = nn.Sequential(*layers)
for module in model.modules():
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=1.0)     # should be std = sqrt(2 / fan_in)
        nn.init.zeros_(module.bias)
criterion = nn.CrossEntropyLoss()
optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
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
