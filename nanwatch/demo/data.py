"""The demo's data: scikit-learn's digits, split and sharded across ranks, with optional NaN pixels."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

logger = logging.getLogger(__name__)

NUM_CLASSES = 10
NUM_FEATURES = 64  # 8x8 pixels
# Pixel values in load_digits run from 0 to 16.
MAX_PIXEL_VALUE = 16.0
# Row 4, column 4 of the 8x8 image, nonzero in 85% of the digits.
NAN_PIXEL = 36
TEST_FRACTION = 0.2


@dataclass(frozen=True, kw_only=True, slots=True)
class DigitsSplit:
    """Train and test tensors; train targets are class indices or one-hot rows."""

    train: TensorDataset
    test_inputs: torch.Tensor
    test_labels: torch.Tensor


def load_split(*, one_hot: bool, seed: int) -> DigitsSplit:
    """Load digits (shipped with scikit-learn, no download), scale pixels to [0, 1] and split."""
    images, labels = load_digits(return_X_y=True)
    train_x, test_x, train_y, test_y = train_test_split(
        images, labels, test_size=TEST_FRACTION, random_state=seed, stratify=labels
    )
    train_inputs = torch.tensor(train_x / MAX_PIXEL_VALUE, dtype=torch.float32)
    train_labels = torch.tensor(train_y, dtype=torch.int64)
    train_targets = F.one_hot(train_labels, NUM_CLASSES).float() if one_hot else train_labels
    return DigitsSplit(
        train=TensorDataset(train_inputs, train_targets),
        test_inputs=torch.tensor(test_x / MAX_PIXEL_VALUE, dtype=torch.float32),
        test_labels=torch.tensor(test_y, dtype=torch.int64),
    )


def build_sampler(dataset: TensorDataset, *, rank: int, world_size: int, seed: int) -> DistributedSampler:
    """Return a shuffling sampler over this rank's shard of the dataset."""
    return DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)


def batches_per_epoch(sampler: DistributedSampler, batch_size: int) -> int:
    """Return the number of full batches in one epoch of the shard; the last partial batch is dropped."""
    return len(sampler) // batch_size


def iterate_batches(
    dataset: TensorDataset, sampler: DistributedSampler, batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (inputs, targets) batches without end, reshuffling the shard at each epoch."""
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True)
    for epoch in itertools.count():
        sampler.set_epoch(epoch)
        yield from loader


def _epoch_batches(
    dataset: TensorDataset, *, rank: int, world_size: int, batch_size: int, seed: int
) -> list[list[int]]:
    """Return the sample indices of each full batch that `rank` draws in epoch 0."""
    sampler = build_sampler(dataset, rank=rank, world_size=world_size, seed=seed)
    sampler.set_epoch(0)
    ids = list(sampler)
    starts = range(0, batches_per_epoch(sampler, batch_size) * batch_size, batch_size)
    return [ids[start : start + batch_size] for start in starts]


def plant_nan_pixels(
    dataset: TensorDataset, *, step: int, count: int, world_size: int, batch_size: int, seed: int
) -> list[int]:
    """Set NAN_PIXEL to NaN in `count` samples of the batch that rank 0 draws at `step`.

    Every rank calls this with the same arguments, so all ranks train on the same corrupted
    dataset. Returns the corrupted sample indices.

    Raises:
        ValueError: `step` is not in the first epoch, `count` is not in 1..batch_size, or a
            rank would draw a corrupted sample before `step`.
    """
    rank0_batches = _epoch_batches(dataset, rank=0, world_size=world_size, batch_size=batch_size, seed=seed)
    if not 0 <= step < len(rank0_batches):
        raise ValueError(
            f"NaN sample step {step} is outside the first epoch (steps 0-{len(rank0_batches) - 1} with "
            f"world size {world_size} and batch size {batch_size}); pick an earlier step or fewer ranks"
        )
    if not 1 <= count <= batch_size:
        raise ValueError(f"NaN sample count {count} is invalid; pick 1 to the batch size {batch_size}")

    stride = batch_size // count
    sample_ids = [rank0_batches[step][position * stride] for position in range(count)]
    _ensure_not_drawn_before(
        dataset, set(sample_ids), step=step, world_size=world_size, batch_size=batch_size, seed=seed
    )
    dataset.tensors[0][sample_ids, NAN_PIXEL] = float("nan")
    logger.debug("planted NaN in pixel %d of samples %s", NAN_PIXEL, sample_ids)
    return sample_ids


def _ensure_not_drawn_before(
    dataset: TensorDataset, sample_ids: set[int], *, step: int, world_size: int, batch_size: int, seed: int
) -> None:
    # DistributedSampler repeats a few samples to pad the shards to equal length, so a sample
    # can appear twice in one epoch. This check makes `step` the first step that draws one.
    for rank in range(world_size):
        batches = _epoch_batches(dataset, rank=rank, world_size=world_size, batch_size=batch_size, seed=seed)
        for earlier_step, batch in enumerate(batches[:step]):
            if sample_ids.intersection(batch):
                raise ValueError(
                    f"rank {rank} draws a NaN sample at step {earlier_step}, before NaN sample step {step}; "
                    "pick another step or seed"
                )
