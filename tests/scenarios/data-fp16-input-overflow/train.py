"""Unscaled polynomial features cast to float16: squares of tumour areas exceed 65504.

Degree-2 polynomial features of the 10 breast_cancer mean features contain products like
mean_area**2 (up to 6.3e6). The model is trained in pure float16 (model.half()), and
casting the batch to float16 turns every value above 65504, the float16 maximum, into inf.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from sklearn.datasets import load_breast_cancer
from sklearn.preprocessing import PolynomialFeatures
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nonfinite_probe import NonfiniteProbe  # noqa: E402

MAX_STEPS = 200

torch.manual_seed(0)
torch.set_num_threads(1)

features, labels = load_breast_cancer(return_X_y=True)
expanded = PolynomialFeatures(degree=2, include_bias=False).fit_transform(features[:, :10])
inputs = torch.tensor(expanded, dtype=torch.float32)          # finite in float32, max 6.3e6
targets = torch.tensor(labels, dtype=torch.float32).unsqueeze(1)
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(inputs, targets), batch_size=16,
                                     shuffle=True, generator=torch.Generator().manual_seed(0))

model = nn.Sequential(nn.Linear(inputs.shape[1], 32), nn.ReLU(), nn.Linear(32, 1)).half()
optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
probe = NonfiniteProbe()

step = 0
while not probe.tripped and step < MAX_STEPS:
    for xb, yb in loader:
        xb, yb = xb.half(), yb.half()
        probe.check(step, "input", [xb, yb])
        loss = F.binary_cross_entropy_with_logits(model(xb).float(), yb.float())
        probe.check(step, "loss", [loss])
        optimizer.zero_grad()
        loss.backward()
        probe.check(step, "grad", [p.grad for p in model.parameters()])
        optimizer.step()
        probe.check(step, "param", model.parameters())
        step += 1
        if probe.tripped or step >= MAX_STEPS:
            break

probe.report(input_max_float32=float(inputs.max()))
