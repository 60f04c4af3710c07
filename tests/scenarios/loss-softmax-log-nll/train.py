"""nn.Softmax at the end of the model, then torch.log and NLLLoss.

On raw digits pixels (0-16) the logits spread quickly. Once a logit sits about 104 below the
largest one in its row, softmax returns exactly 0 for it and log gives -inf. NLLLoss only
reads the target entry, so the loss stays finite, but the backward pass of log divides the
zero upstream gradient by p = 0: 0 / 0 = NaN in every gradient. log_softmax (or
CrossEntropyLoss on the logits) never forms p and has no such failure.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from sklearn.datasets import load_digits
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nonfinite_probe import NonfiniteProbe  # noqa: E402

MAX_STEPS = 300

torch.manual_seed(0)
torch.set_num_threads(1)

digits = load_digits()
pixels = torch.tensor(digits.data, dtype=torch.float32)      # raw intensities 0-16
targets = torch.tensor(digits.target)
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(pixels, targets), batch_size=32,
                                     shuffle=True, generator=torch.Generator().manual_seed(0))

model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10), nn.Softmax(dim=1))
criterion = nn.NLLLoss()
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
probe = NonfiniteProbe()

step = 0
while not probe.tripped and step < MAX_STEPS:
    for xb, yb in loader:
        probe.check(step, "input", [xb])
        loss = criterion(torch.log(model(xb)), yb)
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
