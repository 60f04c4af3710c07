"""Attention pooling over padded bags, where one bag is empty and its softmax row fully masked.

Multiple-instance learning on digits: each bag contains a Poisson(4) number of digit images
(at most 8), and the label says
whether the bag contains a 7. Bags are padded to 8 and pooled by nn.MultiheadAttention with a
learned query and key_padding_mask. An empty bag masks every key, so its softmax row is
softmax([-inf, ..., -inf]) = NaN, and the loss of that batch is NaN.
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
MAX_BAG = 8
MEAN_BAG = 4.0
BAGS_PER_BATCH = 8
EMBED = 32


class AttentionPool(nn.Module):
    """Embeds each instance, pools a bag with one learned query, and classifies the bag."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(64, EMBED), nn.ReLU())
        self.query = nn.Parameter(torch.randn(1, 1, EMBED) * 0.1)
        self.attention = nn.MultiheadAttention(EMBED, num_heads=4, batch_first=True)
        self.head = nn.Linear(EMBED, 1)

    def forward(self, bags: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        keys = self.embed(bags)
        query = self.query.expand(len(bags), -1, -1)
        pooled, _ = self.attention(query, keys, keys, key_padding_mask=padding)
        return self.head(pooled.squeeze(1))


torch.manual_seed(0)
torch.set_num_threads(1)

digits = load_digits()
pixels = torch.tensor(digits.data / 16.0, dtype=torch.float32)
is_seven = torch.tensor(digits.target == 7)
generator = torch.Generator().manual_seed(0)


def draw_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw bags of Poisson(MEAN_BAG) images, padded with zeros; True in the mask marks padding."""
    sizes = torch.poisson(torch.full((BAGS_PER_BATCH,), MEAN_BAG), generator=generator).clamp(max=MAX_BAG)
    indices = torch.randint(len(pixels), (BAGS_PER_BATCH, MAX_BAG), generator=generator)
    padding = torch.arange(MAX_BAG).expand(BAGS_PER_BATCH, -1) >= sizes.unsqueeze(1)
    bags = pixels[indices].masked_fill(padding.unsqueeze(2), 0.0)
    labels = (is_seven[indices] & ~padding).any(dim=1).float().unsqueeze(1)
    return bags, padding, labels


model = AttentionPool()
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
probe = NonfiniteProbe()

for step in range(MAX_STEPS):
    bags, padding, labels = draw_batch()
    probe.check(step, "input", [bags, labels])
    loss = F.binary_cross_entropy_with_logits(model(bags, padding), labels)
    probe.check(step, "loss", [loss])
    optimizer.zero_grad()
    loss.backward()
    probe.check(step, "grad", [p.grad for p in model.parameters()])
    optimizer.step()
    probe.check(step, "param", model.parameters())
    if probe.tripped:
        break

probe.report(empty_bags_in_failing_batch=int(padding.all(dim=1).sum()) if probe.tripped else 0)
