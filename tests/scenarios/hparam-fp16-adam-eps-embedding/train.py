"""Pure float16 embeddings trained with Adam's default eps=1e-8, which rounds to 0 in float16.

The wine features are binned into 16 quantile bins each and every (feature, bin) pair gets an
embedding row. The whole model is cast with model.half(), so the Adam state is float16 too.
Rows whose bin is absent from a batch get a zero gradient, their second moment is 0, and the
update m / (sqrt(v) + eps) is 0 / (0 + 0) = NaN. The gradients are finite, and the weights turn
NaN in the first optimizer step.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_wine
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nonfinite_probe import NonfiniteProbe  # noqa: E402

MAX_STEPS = 200
BINS = 16
EMBED = 8


class BinnedEmbeddingClassifier(nn.Module):
    """Sums one embedding per (feature, bin) pair and classifies the sum."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_features * BINS, EMBED)
        self.head = nn.Linear(EMBED, 3)
        self.register_buffer("offsets", torch.arange(num_features) * BINS)

    def forward(self, bins: torch.Tensor) -> torch.Tensor:
        return self.head(self.embedding(bins + self.offsets).sum(dim=1))


torch.manual_seed(0)
torch.set_num_threads(1)

features, cultivar = load_wine(return_X_y=True)
edges = np.quantile(features, np.linspace(0, 1, BINS + 1)[1:-1], axis=0)
binned = np.stack([np.searchsorted(edges[:, j], features[:, j]) for j in range(features.shape[1])], axis=1)
inputs = torch.tensor(binned)
targets = torch.tensor(cultivar)
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(inputs, targets), batch_size=16,
                                     shuffle=True, generator=torch.Generator().manual_seed(0))

model = BinnedEmbeddingClassifier(features.shape[1]).half()
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)       # eps left at 1e-8
probe = NonfiniteProbe()

step = 0
while not probe.tripped and step < MAX_STEPS:
    for xb, yb in loader:
        probe.check(step, "input", [xb])
        loss = F.cross_entropy(model(xb).float(), yb)
        probe.check(step, "loss", [loss])
        optimizer.zero_grad()
        loss.backward()
        probe.check(step, "grad", [p.grad for p in model.parameters()])
        optimizer.step()
        probe.check(step, "param", model.parameters())
        step += 1
        if probe.tripped or step >= MAX_STEPS:
            break

probe.report(nonfinite_weights=sum(int((~torch.isfinite(p)).sum()) for p in model.parameters()))
