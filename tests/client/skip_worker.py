"""Worker for the skip-policy torchrun test: chosen steps get a NaN loss on one rank; each rank writes its outcome.

Usage: skip_worker.py OUT_DIR ENDPOINT RUN_ID BAD_RANK BAD_STEPS MAX_SKIPS, where BAD_STEPS is a
comma-separated list of steps.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

from nanwatch import HaltError, Watcher

STEPS = 8


def main(out_dir: str, endpoint: str, run_id: str, bad_rank: str, bad_steps: str, max_skips: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    poisoned = {int(step) for step in bad_steps.split(",") if step}

    torch.manual_seed(0)
    net = torch.nn.Linear(4, 1)
    model = torch.nn.parallel.DistributedDataParallel(net)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    watcher = Watcher(model, optimizer, endpoint=endpoint, run_id=run_id, flush_timeout_s=10.0,
                      max_consecutive_skips=int(max_skips))
    outcome: dict[str, object] = {"rank": rank, "halt_step": None}
    try:
        for step in range(STEPS):
            x, y = torch.randn(8, 4), torch.randn(8, 1)
            loss = torch.nn.functional.mse_loss(model(x), y)
            if rank == int(bad_rank) and step in poisoned:
                loss = loss * float("nan")
            watcher.observe_loss(loss)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    except HaltError as halt:
        outcome["halt_step"] = halt.step
    outcome.update(steps=watcher.step, skipped=watcher.skipped_updates,
                   weights=[float(value) for value in torch.cat([p.detach().flatten() for p in net.parameters()])])
    watcher.close()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as file:
        json.dump(outcome, file)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
