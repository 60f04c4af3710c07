"""A hand-written Gaussian negative log-likelihood whose variance head can output exactly 0.

Heteroscedastic regression on diabetes: the model predicts a mean and a variance per patient,
the variance as ReLU(linear) with its bias started at 1. The loss 0.5 * log(var) +
(y - mu)**2 / (2 * var) has no lower bound as var shrinks on well-fit patients, so training
drives one pre-activation below 0: var = 0, log(0) = -inf, and the loss turns NaN while mu
and the pre-activations stay finite. A softplus head plus a floor (var + 1e-6) or
nn.GaussianNLLLoss (which clamps var at eps) avoids it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from sklearn.datasets import load_diabetes
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nonfinite_probe import NonfiniteProbe  # noqa: E402

MAX_STEPS = 300


class MeanVariance(nn.Module):
    """Shared body with a mean head and a ReLU variance head."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(10, 32), nn.ReLU())
        self.mean = nn.Linear(32, 1)
        self.variance = nn.Sequential(nn.Linear(32, 1), nn.ReLU())
        nn.init.constant_(self.variance[0].bias, 1.0)       # start near unit variance

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.body(x)
        return self.mean(hidden), self.variance(hidden)


def gaussian_nll(mean: torch.Tensor, variance: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return (0.5 * torch.log(variance) + (targets - mean) ** 2 / (2 * variance)).mean()


torch.manual_seed(0)
torch.set_num_threads(1)

features, progression = load_diabetes(return_X_y=True)
inputs = torch.tensor(features / features.std(0), dtype=torch.float32)
targets = torch.tensor((progression - progression.mean()) / progression.std(), dtype=torch.float32).unsqueeze(1)
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(inputs, targets), batch_size=32,
                                     shuffle=True, generator=torch.Generator().manual_seed(0))

model = MeanVariance()
optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
probe = NonfiniteProbe()

step = 0
while not probe.tripped and step < MAX_STEPS:
    for xb, yb in loader:
        probe.check(step, "input", [xb, yb])
        mean, variance = model(xb)
        loss = gaussian_nll(mean, variance, yb)
        probe.check(step, "loss", [loss])
        optimizer.zero_grad()
        loss.backward()
        probe.check(step, "grad", [p.grad for p in model.parameters()])
        optimizer.step()
        probe.check(step, "param", model.parameters())
        step += 1
        if probe.tripped or step >= MAX_STEPS:
            break

zero_variances = int((variance == 0).sum()) if probe.tripped else 0
probe.report(zero_variances_in_failing_batch=zero_variances)
