"""A plain training script that knows nothing of nanwatch: an MLP on scikit-learn digits.

Options: --nan-step N plants a NaN pixel in the batch of step N (on --nan-rank only
under torchrun); --exit-code C exits with C after training. At exit the script
writes, per rank, the steps it completed and whether its weights are finite.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from sklearn.datasets import load_digits
from torch import nn

BATCH_SIZE = 32

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=30)
parser.add_argument("--nan-step", type=int, default=-1)
parser.add_argument("--nan-rank", type=int, default=0)
parser.add_argument("--exit-code", type=int, default=0)
parser.add_argument("--out", type=Path, required=True)
args = parser.parse_args()

torch.manual_seed(0)
torch.set_num_threads(1)
distributed = "RANK" in os.environ
if distributed:
    dist.init_process_group("gloo")
rank = dist.get_rank() if distributed else 0

digits = load_digits()
inputs_all = torch.tensor(digits.data / 16.0, dtype=torch.float32)
targets_all = torch.tensor(digits.target)
net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
model = nn.parallel.DistributedDataParallel(net) if distributed else net
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
criterion = nn.CrossEntropyLoss()
completed = {"steps": 0}


def write_outcome() -> None:
    finite = all(bool(torch.isfinite(param).all()) for param in net.parameters())
    path = args.out / f"outcome-rank{rank}.json"
    path.write_text(json.dumps({"rank": rank, "steps_completed": completed["steps"], "params_finite": finite}))


atexit.register(write_outcome)

for step in range(args.steps):
    start = (step * BATCH_SIZE * (rank + 1)) % (len(inputs_all) - BATCH_SIZE)
    batch = inputs_all[start:start + BATCH_SIZE].clone()
    if step == args.nan_step and rank == args.nan_rank:
        batch[3, 10] = float("nan")
    loss = criterion(model(batch), targets_all[start:start + BATCH_SIZE])
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    completed["steps"] = step + 1

if distributed:
    dist.destroy_process_group()
sys.exit(args.exit_code)
