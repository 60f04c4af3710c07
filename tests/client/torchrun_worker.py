"""Worker for the torchrun test: only rank 1's batch contains a NaN; every rank writes its halt to JSON."""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

from nanwatch import HaltError, Watcher
from nanwatch.client.facts import collect_parameters

NAN_STEP = 2


def main(out_dir: str, endpoint: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    watcher = Watcher(model, optimizer, endpoint=endpoint, flush_timeout_s=0.2)
    result = {"rank": rank, "names": [p.name for p in collect_parameters(model, optimizer)], "run_id": watcher.run_id}
    try:
        for step in range(5):
            x, y = torch.randn(8, 4), torch.randn(8, 1)
            if rank == 1 and step == NAN_STEP:
                x[3, 0] = float("nan")
            watcher.check_batch(inputs=x)
            # The model sees a cleaned batch, so rank 0 learns of the NaN only through the agreement.
            loss = torch.nn.functional.mse_loss(model(torch.nan_to_num(x)), y)
            watcher.observe_loss(loss)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    except HaltError as halt:
        result.update(step=halt.step, source=halt.source, reason=halt.reason, exit_code=halt.exit_code)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
        # Both ranks wrote their result before either exits and torchrun stops the other.
        dist.barrier()
        watcher.close()
        raise
    watcher.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
