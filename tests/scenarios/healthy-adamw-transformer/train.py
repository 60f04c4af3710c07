"""Healthy control: one Transformer encoder block on digits rows, AdamW, warmup, clipping.

Each 8x8 digit is a sequence of 8 row tokens. The model is a pre-norm nn.TransformerEncoderLayer
with a learned position embedding and mean pooling, trained with AdamW (lr 1e-3, weight decay
0.01), a 20-step linear warmup capped at 1, and clip_grad_norm_(max_norm=1.0).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from sklearn.datasets import load_digits
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nonfinite_probe import NonfiniteProbe  # noqa: E402

MAX_STEPS = 120
WARMUP_STEPS = 20
D_MODEL = 32


class RowTransformer(nn.Module):
    """Classifies a digit from its 8 pixel rows with one pre-norm encoder block."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, D_MODEL)
        self.position = nn.Parameter(torch.zeros(1, 8, D_MODEL))
        self.block = nn.TransformerEncoderLayer(D_MODEL, nhead=4, dim_feedforward=64, dropout=0.0,
                                                batch_first=True, norm_first=True)
        self.head = nn.Linear(D_MODEL, 10)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.embed(rows) + self.position).mean(dim=1))


torch.manual_seed(0)
torch.set_num_threads(1)

digits = load_digits()
rows = torch.tensor(digits.images / 16.0, dtype=torch.float32)
targets = torch.tensor(digits.target)
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(rows, targets), batch_size=32,
                                     shuffle=True, generator=torch.Generator().manual_seed(0))

model = RowTransformer()
criterion = nn.CrossEntropyLoss()
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / WARMUP_STEPS))
probe = NonfiniteProbe()

step = 0
losses: list[float] = []
while not probe.tripped and step < MAX_STEPS:
    for xb, yb in loader:
        probe.check(step, "input", [xb])
        loss = criterion(model(xb), yb)
        probe.check(step, "loss", [loss])
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        probe.check(step, "grad", [p.grad for p in model.parameters()])
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
        optimizer.step()
        scheduler.step()
        probe.check(step, "param", model.parameters())
        step += 1
        if probe.tripped or step >= MAX_STEPS:
            break

probe.report(steps=step, first_loss=round(losses[0], 3), last_loss=round(losses[-1], 3))
