"""Hand-rolled fp16 loss scaling with clip_grad_norm_: clipping cannot repair an overflowed gradient.

A digits MLP is trained in pure float16 (model.half()) with a hand-written loss scaler: backward
on loss * scale, divide the gradients by scale, clip to max_norm=1, step. The scale starts at
1024 and doubles every 10 steps, and the scaler never checks for overflow because the author
counts on the clipping. Once a scaled gradient exceeds 65504 it is inf in float16, the total
norm is inf, and clip_grad_norm_ multiplies every gradient by
1 / inf = 0: the finite ones become 0 and the inf ones become NaN, which the optimizer then
writes into the weights. error_if_nonfinite is off by default, so nothing is raised.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nonfinite_probe import NonfiniteProbe  # noqa: E402

MAX_STEPS = 300
INITIAL_LOSS_SCALE = 1024.0
SCALE_GROWTH_INTERVAL = 10
MAX_NORM = 1.0

torch.manual_seed(0)
torch.set_num_threads(1)

digits = load_digits()
pixels = torch.tensor(digits.data / 16.0, dtype=torch.float16)
targets = torch.tensor(digits.target)
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(pixels, targets), batch_size=32,
                                     shuffle=True, generator=torch.Generator().manual_seed(0))

model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)).half()
optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
probe = NonfiniteProbe()

step = 0
loss_scale = INITIAL_LOSS_SCALE
total_norm = torch.tensor(0.0)
while not probe.tripped and step < MAX_STEPS:
    for xb, yb in loader:
        probe.check(step, "input", [xb])
        loss = F.cross_entropy(model(xb).float(), yb)
        probe.check(step, "loss", [loss])
        optimizer.zero_grad()
        loss_scale = INITIAL_LOSS_SCALE * 2 ** (step // SCALE_GROWTH_INTERVAL)
        (loss * loss_scale).backward()
        for param in model.parameters():
            param.grad /= loss_scale
        probe.check(step, "grad", [p.grad for p in model.parameters()])
        total_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
        optimizer.step()
        probe.check(step, "param", model.parameters())
        step += 1
        if probe.tripped or step >= MAX_STEPS:
            break

probe.report(loss_scale=loss_scale, total_norm_after_overflow=float(total_norm))
