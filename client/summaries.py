"""Tensor summaries computed on the tensor's device: batch statistics and norms."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from nanwatch.v1 import nanwatch_pb2 as pb

# Layout of the vector that measure_tensor returns.
STAT_NAMES = ("nan_count", "inf_count", "finite_count", "min", "max", "mean", "std")
MAX_SAMPLE_INDICES = 64


def stats_dtype(device: torch.device) -> torch.dtype:
    """Return the dtype for statistics on device: float64, or float32 where float64 is missing (MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


def dtype_name(dtype: torch.dtype) -> str:
    """Return the numpy-style name of a torch dtype, such as "float32" or "bfloat16"."""
    return str(dtype).removeprefix("torch.")


def _as_real(tensor: torch.Tensor) -> torch.Tensor:
    """Return tensor detached, with complex values split into real pairs and bools as 0/1."""
    tensor = tensor.detach()
    if tensor.is_complex():
        return torch.view_as_real(tensor)
    return tensor


def measure_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """Return the STAT_NAMES vector of tensor, on its device, without a host synchronization.

    min, max, mean and std cover the finite elements only; std is the sample standard deviation.
    """
    dtype = stats_dtype(tensor.device)
    values = _as_real(tensor).to(dtype)
    if values.numel() == 0:
        return torch.tensor([0, 0, 0, math.nan, math.nan, math.nan, math.nan], dtype=dtype, device=tensor.device)

    finite = torch.isfinite(values)
    finite_count = finite.sum().to(dtype)
    nan_count = torch.isnan(values).sum().to(dtype)
    inf_count = torch.isinf(values).sum().to(dtype)

    minimum = torch.where(finite, values, math.inf).amin()
    maximum = torch.where(finite, values, -math.inf).amax()
    mean = torch.where(finite, values, 0.0).sum() / finite_count.clamp(min=1)
    squares = torch.where(finite, (values - mean) ** 2, 0.0).sum()
    std = (squares / (finite_count - 1).clamp(min=1)).sqrt()
    return torch.stack([nan_count, inf_count, finite_count, minimum, maximum, mean, std])


def sample_nonfinite_mask(tensor: torch.Tensor) -> torch.Tensor:
    """Return a bool vector over dim 0 that is True for samples holding a NaN or Inf."""
    if tensor.ndim == 0:
        return torch.zeros(0, dtype=torch.bool, device=tensor.device)
    if tensor.numel() == 0 or not (tensor.is_floating_point() or tensor.is_complex()):
        return torch.zeros(tensor.shape[0], dtype=torch.bool, device=tensor.device)
    bad = ~torch.isfinite(tensor.detach())
    return bad.reshape(tensor.shape[0], -1).any(dim=1)


@dataclass(slots=True)
class BatchEntry:
    """One tensor given to check_batch: its metadata and on-device statistics."""

    name: str
    dtype: str
    shape: list[int]
    stats: torch.Tensor
    sample_mask: torch.Tensor
    nonfinite: torch.Tensor


def summarize_batch_tensor(name: str, tensor: torch.Tensor) -> BatchEntry:
    """Return the BatchEntry of one batch tensor; no host synchronization happens here."""
    stats = measure_tensor(tensor)
    return BatchEntry(
        name=name,
        dtype=dtype_name(tensor.dtype),
        shape=list(tensor.shape),
        stats=stats,
        sample_mask=sample_nonfinite_mask(tensor),
        nonfinite=(stats[0] + stats[1]) > 0,
    )


def _finite_stat(value: float, finite_count: float) -> float:
    """Return value, or NaN when the tensor had no finite element to compute it from."""
    return value if finite_count > 0 else math.nan


def build_tensor_summary(entry: BatchEntry, stats: Sequence[float], sample_mask: Sequence[float]) -> pb.TensorSummary:
    """Return the TensorSummary of entry from its statistics after the host transfer."""
    nan_count, inf_count, finite_count, minimum, maximum, mean, std = stats
    indices = [index for index, bad in enumerate(sample_mask) if bad][:MAX_SAMPLE_INDICES]
    return pb.TensorSummary(
        name=entry.name,
        dtype=entry.dtype,
        shape=entry.shape,
        nan_count=int(nan_count),
        inf_count=int(inf_count),
        min=_finite_stat(minimum, finite_count),
        max=_finite_stat(maximum, finite_count),
        mean=_finite_stat(mean, finite_count),
        std=_finite_stat(std, finite_count),
        nonfinite_sample_indices=indices,
    )


def foreach_norms(tensors: Sequence[torch.Tensor], norm_type: float = 2.0) -> torch.Tensor:
    """Return the norm of each tensor in float64, in input order, on the first tensor's device.

    torch._foreach_norm runs once per (device, dtype) group, as clip_grad_norm_ does.
    Accumulating in float64 makes a norm non-finite only when an element is: the
    squares of finite float32 gradients above about 1.8e19 overflow a float32 sum.
    NOTE: MPS has no float64, so there a norm can overflow while every element is finite.
    """
    if not tensors:
        return torch.zeros(0, dtype=torch.float64)
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for index, tensor in enumerate(tensors):
        groups.setdefault((tensor.device, tensor.dtype), []).append(index)

    target = tensors[0].device
    norms: list[torch.Tensor] = [torch.empty(0)] * len(tensors)
    for indices in groups.values():
        group = [_dense(tensors[index]) for index in indices]
        accumulate = stats_dtype(group[0].device)
        for index, norm in zip(indices, torch._foreach_norm(group, norm_type, dtype=accumulate)):
            norms[index] = norm.to(target)
    return torch.stack(norms)


def _dense(tensor: torch.Tensor) -> torch.Tensor:
    """Return the stored values of a sparse tensor, or tensor itself when it is dense."""
    return tensor.coalesce().values() if tensor.is_sparse else tensor.detach()


def total_norm(norms: torch.Tensor, norm_type: float = 2.0) -> torch.Tensor:
    """Return the norm of per-tensor norms, which equals the norm over all their elements."""
    if norms.numel() == 0:
        return torch.zeros((), dtype=torch.float64, device=norms.device)
    return torch.linalg.vector_norm(norms, norm_type)
