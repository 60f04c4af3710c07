"""Output biases initialised to the log-odds of the class prior, with one class absent.

A one-vs-rest digits classifier (10 sigmoid outputs) sets each output bias to
log(p / (1 - p)), p being the class frequency in the labelled data, so training starts at the
prior. The labelled subset contains no 9s yet, so p = 0 for that output and its bias is -inf
before the first step. BCE-with-logits then computes -inf * 0 = NaN.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nonfinite_probe import NonfiniteProbe  # noqa: E402

MAX_STEPS = 200

torch.manual_seed(0)
torch.set_num_threads(1)

digits = load_digits()
labelled = digits.target < 9                        # no 9s labelled so far
pixels = torch.tensor(digits.data[labelled] / 16.0, dtype=torch.float32)
one_hot = torch.tensor(np.eye(10)[digits.target[labelled]], dtype=torch.float32)
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(pixels, one_hot), batch_size=32,
                                     shuffle=True, generator=torch.Generator().manual_seed(0))

model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
prior = one_hot.mean(0)
with torch.no_grad():
    model[2].bias.copy_(torch.log(prior / (1 - prior)))    # log(0) = -inf for class 9
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
