"""Two-rank DDP training where rank 1's data shard was exported in other units.

Each rank reads its own shard of the diabetes regression data. Rank 0's shard contains
standardized features as the pipeline intends; rank 1's shard was written by an older export
that skipped the standardization step's division, so its features are 100 times too large.
Rank 1's loss is far above rank 0's from the first step, its gradients dominate the DDP
average, and the shared weights diverge until the loss overflows. No value in either shard is
NaN or Inf.

Run with: GLOO_SOCKET_IFNAME=lo python -m torch.distributed.run --nproc-per-node 2
--master-addr 127.0.0.1 --master-port PORT train.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from sklearn.datasets import load_diabetes
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nonfinite_probe import NonfiniteProbe  # noqa: E402

MAX_STEPS = 200
BATCH_SIZE = 16
BAD_RANK = 1

torch.manual_seed(0)
torch.set_num_threads(1)
dist.init_process_group("gloo")
rank = dist.get_rank()

features, progression = load_diabetes(return_X_y=True)
features = (features - features.mean(0)) / features.std(0)
progression = (progression - progression.mean()) / progression.std()
shard = slice(rank, None, dist.get_world_size())
inputs = torch.tensor(features[shard], dtype=torch.float32)
if rank == BAD_RANK:
    inputs = inputs * 100.0                       # the old export's unscaled features
targets = torch.tensor(progression[shard], dtype=torch.float32).unsqueeze(1)
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(inputs, targets), batch_size=BATCH_SIZE,
                                     shuffle=True, generator=torch.Generator().manual_seed(rank))

net = nn.Sequential(nn.Linear(10, 64), nn.LeakyReLU(), nn.Linear(64, 64), nn.LeakyReLU(), nn.Linear(64, 1))
model = nn.parallel.DistributedDataParallel(net)
optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
probe = NonfiniteProbe()

step = 0
rank_losses: list[list[float]] = []
while not probe.tripped and step < MAX_STEPS:
    for xb, yb in loader:
        probe.check(step, "input", [xb, yb])
        loss = F.mse_loss(model(xb), yb)
        probe.check(step, "loss", [loss])
        gathered = [torch.zeros(1) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, loss.detach().reshape(1))
        rank_losses.append([float(f"{float(value):.3g}") for value in gathered])
        optimizer.zero_grad()
        loss.backward()
        probe.check(step, "grad", [p.grad for p in model.parameters()])
        optimizer.step()
        probe.check(step, "param", model.parameters())
        step += 1
        if probe.tripped or step >= MAX_STEPS:
            break

probe.report(losses_per_rank_first_steps=rank_losses[:3], losses_per_rank_last_steps=rank_losses[-3:])
dist.destroy_process_group()
