"""A plain training script with no nanwatch code: log-scaled digits pixels into an MLP.

The model takes log1p of each pixel in its own module. Option --bad-step N sets one
pixel of that step's batch to -1 (on --bad-rank only under torchrun), so log1p
gives -inf inside the model while the batch itself is finite.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from sklearn.datasets import load_digits
from torch import nn

BATCH_SIZE = 32

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=12)
parser.add_argument("--bad-step", type=int, default=-1)
parser.add_argument("--bad-rank", type=int, default=0)
args = parser.parse_args()

torch.manual_seed(0)
torch.set_num_threads(1)
distributed = "RANK" in os.environ
if distributed:
    dist.init_process_group("gloo")
rank = dist.get_rank() if distributed else 0


class LogPixels(nn.Module):
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return torch.log1p(pixels)


class PixelNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = LogPixels()
        self.mlp = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.scale(pixels))


digits = load_digits()
inputs_all = torch.tensor(digits.data, dtype=torch.float32)
targets_all = torch.tensor(digits.target)
net = PixelNet()
model = nn.parallel.DistributedDataParallel(net) if distributed else net
optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
criterion = nn.CrossEntropyLoss()

for step in range(args.steps):
    start = (step * BATCH_SIZE * (rank + 1)) % (len(inputs_all) - BATCH_SIZE)
    batch = inputs_all[start:start + BATCH_SIZE].clone()
    if step == args.bad_step and rank == args.bad_rank:
        batch[5, 10] = -1.0
    loss = criterion(model(batch), targets_all[start:start + BATCH_SIZE])
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()

if distributed:
    dist.destroy_process_group()
