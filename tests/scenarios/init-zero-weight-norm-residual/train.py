"""Zero-initialised residual branches under weight normalization.

A residual MLP on digits starts each residual branch at zero (the "zero-init the last layer of
every block" trick) and wraps every Linear in weight_norm. Weight normalization computes
W = g * v / ||v||; with v = 0 that is 0 / 0, so the first forward pass is already NaN.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nonfinite_probe import NonfiniteProbe  # noqa: E402

MAX_STEPS = 200
WIDTH = 64


class ResidualBlock(nn.Module):
    """x + W2 relu(W1 x), with W2 starting at zero so the block starts as the identity."""

    def __init__(self, width: int) -> None:
        super().__init__()
        second = nn.Linear(width, width)
        nn.init.zeros_(second.weight)
        nn.init.zeros_(second.bias)
        self.branch = nn.Sequential(weight_norm(nn.Linear(width, width)), nn.ReLU(), weight_norm(second))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.branch(x)


torch.manual_seed(0)
torch.set_num_threads(1)

digits = load_digits()
pixels = torch.tensor(digits.data / 16.0, dtype=torch.float32)
targets = torch.tensor(digits.target)
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(pixels, targets), batch_size=32,
                                     shuffle=True, generator=torch.Generator().manual_seed(0))

model = nn.Sequential(weight_norm(nn.Linear(64, WIDTH)), ResidualBlock(WIDTH), ResidualBlock(WIDTH),
                      nn.Linear(WIDTH, 10))
criterion = nn.CrossEntropyLoss()
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
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
