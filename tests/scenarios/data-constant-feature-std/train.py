"""Per-batch standardization without an epsilon, on digits pixels that are constant in a batch.

The script drops the pixels that are 0 in every image, then standardizes each batch inside the
model as (x - mean) / std. Border pixels that are almost always 0 are still all 0 in most
batches of 32, so their batch std is 0 and 0 / 0 gives NaN in the first forward pass.
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


class BatchStandardize(nn.Module):
    """Standardizes each feature with the statistics of the current batch (no epsilon)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - x.mean(0)) / x.std(0)


torch.manual_seed(0)
torch.set_num_threads(1)

digits = load_digits()
pixels = torch.tensor(digits.data, dtype=torch.float32)
pixels = pixels[:, pixels.std(0) > 0]              # globally constant pixels removed
targets = torch.tensor(digits.target)
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(pixels, targets), batch_size=32,
                                     shuffle=True, generator=torch.Generator().manual_seed(0))

model = nn.Sequential(BatchStandardize(), nn.Linear(pixels.shape[1], 64), nn.ReLU(), nn.Linear(64, 10))
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

constant = int((xb.std(0) == 0).sum()) if probe.tripped else 0
probe.report(constant_features_in_failing_batch=constant)
