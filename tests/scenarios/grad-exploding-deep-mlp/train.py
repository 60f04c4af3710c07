"""An 8-layer ReLU MLP without normalization or gradient clipping, SGD lr=0.04, momentum 0.9.

Diabetes regression: the learning rate is ordinary, but the deep unnormalized network is sharp
enough that momentum SGD overshoots. The gradient norm grows by orders of magnitude from step
to step (about 4 at step 3, 1.5e9 at step 7) until the forward pass overflows. No
clip_grad_norm_ is configured to bound the updates.
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
DEPTH = 8
WIDTH = 64

torch.manual_seed(0)
torch.set_num_threads(1)

features, progression = load_diabetes(return_X_y=True)
inputs = torch.tensor((features - features.mean(0)) / features.std(0), dtype=torch.float32)
targets = torch.tensor((progression - progression.mean()) / progression.std(), dtype=torch.float32).unsqueeze(1)
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(inputs, targets), batch_size=32,
                                     shuffle=True, generator=torch.Generator().manual_seed(0))

layers: list[nn.Module] = [nn.Linear(10, WIDTH), nn.ReLU()]
for _ in range(DEPTH - 2):
    layers += [nn.Linear(WIDTH, WIDTH), nn.ReLU()]
layers.append(nn.Linear(WIDTH, 1))
model = nn.Sequential(*layers)
for module in model.modules():
    if isinstance(module, nn.Linear):
        nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        nn.init.zeros_(module.bias)
optimizer = torch.optim.SGD(model.parameters(), lr=0.04, momentum=0.9)
probe = NonfiniteProbe()

step = 0
grad_norms: list[float] = []
while not probe.tripped and step < MAX_STEPS:
    for xb, yb in loader:
        probe.check(step, "input", [xb, yb])
        loss = F.mse_loss(model(xb), yb)
        probe.check(step, "loss", [loss])
        optimizer.zero_grad()
        loss.backward()
        probe.check(step, "grad", [p.grad for p in model.parameters()])
        grad_norms.append(float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))))
        optimizer.step()
        probe.check(step, "param", model.parameters())
        step += 1
        if probe.tripped or step >= MAX_STEPS:
            break

probe.report(grad_norms=[float(f"{norm:.3g}") for norm in grad_norms])
