"""Worker script of the demo training job: one DDP rank on CPU with gloo, started by torchrun.

Example (two ranks, no nanwatch, data fault):
    GLOO_SOCKET_IFNAME=lo python -m torch.distributed.run --nproc-per-node 2 \
        --master-addr 127.0.0.1 --master-port 29511 -m nanwatch.demo.train \
        --fault data --no-watch --result-dir /tmp/demo
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from nanwatch.demo.data import DigitsSplit, build_sampler, iterate_batches, load_split, plant_nan_pixels
from nanwatch.demo.faults import FAULTS, FaultSettings, settings_for
from nanwatch.demo.model import build_criterion, build_model
from nanwatch.demo.nonfinite import any_rank_flagged, find_nonfinite, parameters_finite
from nanwatch.demo.result import RankResult
from nanwatch.endpoint import default_endpoint
from nanwatch.errors import HaltError
from nanwatch.run_id import RUN_ID_ENV, validate_run_id

if TYPE_CHECKING:
    from nanwatch.client.watcher import Watcher

logger = logging.getLogger(__name__)

SEED = 0
BATCH_SIZE = 32  # samples per rank and step
MOMENTUM = 0.9
DEFAULT_STEPS = 200
LOG_EVERY_STEPS = 20


@dataclass(kw_only=True, slots=True)
class Job:
    """Everything one rank trains with."""

    settings: FaultSettings
    rank: int
    world_size: int
    model: DistributedDataParallel
    optimizer: torch.optim.Optimizer
    criterion: nn.Module
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]]
    split: DigitsSplit


def emit(line: str) -> None:
    """Write one output line to stdout in a single write, so lines of ranks sharing a pipe do not interleave."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the worker's command line."""
    parser = argparse.ArgumentParser(prog="python -m nanwatch.demo.train", description=__doc__.splitlines()[0])
    parser.add_argument("--fault", choices=FAULTS, default="none", help="fault to plant (default: none)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="optimizer steps (default: %(default)s)")
    parser.add_argument(
        "--watch",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="attach nanwatch's Watcher; with --no-watch the script stops at its own first non-finite step",
    )
    parser.add_argument(
        "--endpoint", default=None, help="nanwatch service HOST:PORT (default: $NANWATCH_ENDPOINT or 127.0.0.1:50051)"
    )
    parser.add_argument(
        "--run-id", default=os.environ.get(RUN_ID_ENV), help=f"run id shared by all ranks (default: ${RUN_ID_ENV})"
    )
    parser.add_argument(
        "--result-dir", type=Path, default=None, help="folder for result-rank{R}.json files (default: none written)"
    )
    args = parser.parse_args(argv)

    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    if args.watch and not args.run_id:
        parser.error(f"--watch needs a run id: pass --run-id ID or set ${RUN_ID_ENV}")
    if args.run_id:
        try:
            validate_run_id(args.run_id)
        except ValueError as error:
            parser.error(f"--run-id: {error}")
    return args


def build_job(settings: FaultSettings, *, rank: int, world_size: int) -> Job:
    """Build this rank's data shard, DDP model, optimizer and loss for the fault."""
    split = load_split(one_hot=settings.loss == "naive_bce", seed=SEED)
    if settings.nan_batch_step is not None:
        plant_nan_pixels(
            split.train,
            step=settings.nan_batch_step,
            count=settings.nan_sample_count,
            world_size=world_size,
            batch_size=BATCH_SIZE,
            seed=SEED,
        )
    sampler = build_sampler(split.train, rank=rank, world_size=world_size, seed=SEED)

    torch.manual_seed(SEED)
    model = DistributedDataParallel(build_model(settings))
    optimizer = torch.optim.SGD(model.parameters(), lr=settings.learning_rate, momentum=MOMENTUM)
    return Job(
        settings=settings,
        rank=rank,
        world_size=world_size,
        model=model,
        optimizer=optimizer,
        criterion=build_criterion(settings),
        batches=iterate_batches(split.train, sampler, BATCH_SIZE),
        split=split,
    )


def build_watcher(job: Job, *, run_id: str, endpoint: str) -> Watcher:
    """Attach nanwatch to the DDP model, optimizer and loss; the client is imported only here."""
    from nanwatch import Watcher

    return Watcher(job.model, job.optimizer, loss_fn=job.criterion, run_id=run_id, endpoint=endpoint)


def run_steps(job: Job, result: RankResult, *, steps: int, watcher: Watcher | None) -> None:
    """Train for `steps` steps, recording the first non-finite step in result.

    Without a watcher every rank stops together at the first step where any rank's own
    check saw a NaN or Inf, before that step's update.
    """
    for step in range(steps):
        inputs, targets = next(job.batches)
        if watcher is not None:
            watcher.check_batch(inputs=inputs, targets=targets)

        job.optimizer.zero_grad(set_to_none=True)
        loss = job.criterion(job.model(inputs), targets)
        loss.backward()

        # The check runs after the DDP gradient all-reduce and before the update.
        quantity = find_nonfinite(inputs=inputs, targets=targets, loss=loss, parameters=job.model.parameters())
        if quantity is not None and result.first_nonfinite_step is None:
            result.first_nonfinite_step, result.first_nonfinite_what = step, quantity
        if watcher is None and any_rank_flagged(quantity is not None):
            seen = f"non-finite {quantity}" if quantity else "nothing, another rank saw a NaN or Inf"
            emit(f"rank {job.rank} stopped at step {step} before the update: own check saw {seen}")
            return

        job.optimizer.step()
        result.steps_run = step + 1
        result.record_loss(loss.item())
        if job.rank == 0 and (step % LOG_EVERY_STEPS == 0 or step == steps - 1):
            emit(f"step {step} loss {loss.item():.4f} (rank 0)")


def evaluate_accuracy(job: Job) -> float:
    """Return the fraction of the test set that the model classifies correctly."""
    with torch.no_grad():
        outputs = job.model.module(job.split.test_inputs)
    return float((outputs.argmax(dim=1) == job.split.test_labels).float().mean())


def record_halt(job: Job, result: RankResult, halt: HaltError) -> None:
    """Copy the halt into result and print the rank's halt line."""
    result.halted = True
    result.halt_step, result.halt_reason, result.halt_source = halt.step, halt.reason, halt.source
    result.params_finite = parameters_finite(job.model)
    emit(f"rank {job.rank} halted at step {halt.step}: {halt.reason}")


def train(args: argparse.Namespace, *, rank: int, world_size: int) -> RankResult:
    """Run the training job on this rank and write its result file.

    Raises:
        HaltError: nanwatch halted the run; the result file is written first.
    """
    job = build_job(settings_for(args.fault), rank=rank, world_size=world_size)
    result = RankResult(rank=rank, world_size=world_size, fault=args.fault)
    watcher = None
    if args.watch:
        watcher = build_watcher(job, run_id=args.run_id, endpoint=args.endpoint or default_endpoint())
    try:
        run_steps(job, result, steps=args.steps, watcher=watcher)
    except HaltError as halt:
        record_halt(job, result, halt)
        raise
    finally:
        # The result goes to disk before close() flushes the reports: once one rank exits with
        # the halt code, torchrun terminates the others.
        if result.params_finite is None:
            result.params_finite = parameters_finite(job.model)
        if args.result_dir is not None:
            result.write(args.result_dir)
        if watcher is not None:
            watcher.close()

    if result.steps_run == args.steps:
        result.accuracy = evaluate_accuracy(job)
        if rank == 0:
            emit(f"test accuracy {result.accuracy:.3f} after {result.steps_run} steps")
        if args.result_dir is not None:
            result.write(args.result_dir)
    return result


def main(argv: list[str] | None = None) -> int:
    """Entry point of one torchrun worker; returns 0, or the halt exit code (42 unless set) on a halt."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    torch.set_num_threads(1)
    dist.init_process_group(backend="gloo")
    exit_code = 0
    try:
        train(args, rank=dist.get_rank(), world_size=dist.get_world_size())
    except HaltError as halt:
        # Keep only the code, because the exception's traceback references train()'s frame and so the model.
        exit_code = halt.exit_code

    # The DDP wrapper is in reference cycles and outlives train(). Destroying the process group
    # while it is alive made 3 to 7 of 15 exits abort with "terminate called without an active
    # exception" (torch 2.13 CPU, gloo, 2 ranks), so it is collected first. Other exceptions
    # skip the cleanup because another rank may be blocked in a collective.
    gc.collect()
    dist.destroy_process_group()
    return exit_code


if __name__ == "__main__":
    raise SystemExit(main())
