"""Worker for the torchrun tests: chosen ranks get a NaN in their batch; every rank writes its halt to JSON.

Usage: torchrun_worker.py OUT_DIR ENDPOINT [NAN_RANKS], where NAN_RANKS is a comma-separated
list of ranks or "all" (default "1").
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

from nanwatch import HaltError, Watcher
from nanwatch.client.facts import collect_parameters

NAN_STEP = 2
STEPS = 5


def parse_nan_ranks(text: str, world_size: int) -> set[int]:
    """Return the ranks whose batch gets a NaN: "all" or a comma-separated list of ranks."""
    if text == "all":
        return set(range(world_size))
    return {int(part) for part in text.split(",") if part}


def write_result(out_dir: str, rank: int, result: dict[str, object]) -> None:
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


def main(out_dir: str, endpoint: str, nan_ranks_text: str = "1") -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    nan_ranks = parse_nan_ranks(nan_ranks_text, dist.get_world_size())

    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    watcher = Watcher(model, optimizer, endpoint=endpoint, flush_timeout_s=0.5)
    result: dict[str, object] = {
        "rank": rank, "names": [p.name for p in collect_parameters(model, optimizer)], "run_id": watcher.run_id,
    }

    try:
        for step in range(STEPS):
            x, y = torch.randn(8, 4), torch.randn(8, 1)
            if rank in nan_ranks and step == NAN_STEP:
                x[3, 0] = float("nan")
            watcher.check_batch(inputs=x)
            # The model sees a cleaned batch, so the other ranks learn of the NaN only through the agreement.
            loss = torch.nn.functional.mse_loss(model(torch.nan_to_num(x)), y)
            watcher.observe_loss(loss)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    except HaltError as halt:
        result.update(step=halt.step, source=halt.source, reason=halt.reason, exit_code=halt.exit_code)
        write_result(out_dir, rank, result)
        watcher.close()
        # Every rank wrote its result and flushed its reports before any exits and torchrun stops the others.
        dist.barrier()
        raise
    result.update(step=STEPS, source="", reason="", exit_code=0)
    write_result(out_dir, rank, result)
    watcher.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
