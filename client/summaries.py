"""Tensor summaries computed on the tensor's device: batch statistics and norms."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from nanwatch.v1 import nanwatch_pb2 as pb

logger = logging.getLogger(__name__)

# Layout of the vector that measure_tensor returns.
STAT_NAMES = ("nan_count", "inf_count", "finite_count", "min", "max", "mean", "std")
# Layout of the vector that measure_batch_tensor returns.
BATCH_STAT_NAMES = ("min", "max", "mean", "std")
MAX_SAMPLE_INDICES = 64
# On the CPU, torch.std_mean is one call but runs a slower kernel than mean() and std() together.
# Measured with torch 2.13 on one thread of a 2-core x86 VM, it was faster up to about 2,000
# elements and 6x slower at 32,768.
FUSED_STD_MEAN_MAX_NUMEL = 1024


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


def measure_batch_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """Return the BATCH_STAT_NAMES vector of tensor, on its device, without a host synchronization.

    The reductions are aminmax, then mean and std (one std_mean call for small tensors),
    in the tensor's own dtype. Float16 and bfloat16 go through float32, and integers and
    bools through the statistics dtype. measure_tensor instead makes a float64 copy and
    about ten passes. The values here
    cover every element, so they equal the statistics of the finite elements only when
    min and max are finite. That is also the test for NaN and Inf, because amin and
    amax return NaN when an element is NaN. A tensor with NaN or Inf is measured again
    with measure_tensor after the step's host transfer (count_nonfinite).
    """
    values = _as_real(tensor)
    if values.numel() == 0:
        # min and max are 0 so that an empty tensor never shows as non-finite. Its summary reports NaN.
        return torch.tensor([0.0, 0.0, math.nan, math.nan], dtype=stats_dtype(tensor.device), device=tensor.device)
    if values.dtype in (torch.float16, torch.bfloat16):
        values = values.float()
    elif not values.is_floating_point():
        values = values.to(stats_dtype(tensor.device))
    # The sample variance of one element is 0, as measure_tensor computes it.
    correction = 1 if values.numel() > 1 else 0
    minimum, maximum = torch.aminmax(values)
    if values.numel() <= FUSED_STD_MEAN_MAX_NUMEL:
        std, mean = torch.std_mean(values, correction=correction)
    else:
        mean, std = values.mean(), values.std(correction=correction)
    return torch.stack([minimum, maximum, mean, std])


def shows_nonfinite(stats: Sequence[float]) -> bool:
    """Return whether BATCH_STAT_NAMES values on the host show a NaN or Inf element: min or max is not finite."""
    return not (math.isfinite(stats[0]) and math.isfinite(stats[1]))


def nonfinite_flag(stats: Sequence[torch.Tensor]) -> torch.Tensor:
    """Return an on-device flag, True when any of the BATCH_STAT_NAMES vectors shows a NaN or Inf element."""
    device = stats[0].device
    extremes = torch.cat([vector.to(device) for vector in stats]).view(-1, len(BATCH_STAT_NAMES))[:, :2]
    return ~torch.isfinite(extremes).all()


def needs_count(entry: BatchEntry, stats: Sequence[float]) -> bool:
    """Return whether entry's BATCH_STAT_NAMES values show NaN or Inf that count_nonfinite has not counted yet."""
    return entry.exact is None and shows_nonfinite(stats)


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
    """One tensor given to check_batch: its metadata, on-device statistics and a reference to the tensor.

    The reference (no copy) lives until the optimizer step resets the step state, so
    that a tensor with NaN or Inf can be counted exactly after the host transfer.
    """

    name: str
    dtype: str
    shape: list[int]
    stats: torch.Tensor
    """The BATCH_STAT_NAMES vector."""
    sample_mask: torch.Tensor
    """Empty: the per-sample flags are measured only for a tensor with NaN or Inf (see count_nonfinite)."""
    tensor: torch.Tensor
    version: int | None
    """The tensor's version counter when it was checked; a later in-place write changes it."""
    exact: tuple[list[float], list[float]] | None = None
    """STAT_NAMES values and sample flags on the host, set by count_nonfinite."""


def summarize_batch_tensor(name: str, tensor: torch.Tensor) -> BatchEntry:
    """Return the BatchEntry of one batch tensor; no host synchronization happens here."""
    detached = tensor.detach()
    return BatchEntry(
        name=name,
        dtype=dtype_name(tensor.dtype),
        shape=list(tensor.shape),
        stats=measure_batch_tensor(detached),
        sample_mask=_no_samples(tensor.device),
        tensor=detached,
        version=_version_of(detached),
    )


def count_nonfinite(entries: Sequence[BatchEntry], stats: Sequence[Sequence[float]]) -> None:
    """Measure the entries with measure_tensor and their per-sample flags, in one host transfer; set entry.exact.

    Meant for the entries whose BATCH_STAT_NAMES values on the host (stats, one list
    per entry) showed NaN or Inf, on a step that halts. An entry whose tensor was
    written in place after check_batch, so that the new measurement finds no NaN or
    Inf, gets lower bounds instead: the NaN and Inf that its min and max show, with
    no statistics or samples.
    """
    # Imported here because transfer imports this module for stats_dtype.
    from nanwatch.client.transfer import fetch_to_host

    current = [entry for entry in entries if _version_of(entry.tensor) == entry.version]
    parts = []
    for entry in current:
        parts += [measure_tensor(entry.tensor), sample_nonfinite_mask(entry.tensor)]
    host = fetch_to_host(parts) if parts else []
    for index, entry in enumerate(current):
        exact_stats, sample_mask = host[2 * index], host[2 * index + 1]
        if exact_stats[0] + exact_stats[1] > 0:
            entry.exact = (exact_stats, sample_mask)
    for entry, values in zip(entries, stats):
        if entry.exact is None:
            logger.warning("nanwatch: batch tensor %r changed in place after check_batch, so its NaN and Inf "
                           "counts are lower bounds; call check_batch after the in-place write", entry.name)
            entry.exact = (_lower_bounds(values), [])


def _lower_bounds(stats: Sequence[float]) -> list[float]:
    """Return STAT_NAMES values that count the NaN and Inf shown by a BATCH_STAT_NAMES min and max."""
    minimum, maximum = stats[0], stats[1]
    nan_count = 1 if math.isnan(minimum) or math.isnan(maximum) else 0
    inf_count = 0 if nan_count else int(math.isinf(minimum)) + int(math.isinf(maximum))
    return [nan_count, inf_count, 0, math.nan, math.nan, math.nan, math.nan]


def _version_of(tensor: torch.Tensor) -> int | None:
    """Return the tensor's version counter, or None for inference tensors, which have none."""
    try:
        return tensor._version
    except RuntimeError:
        return None


def _no_samples(device: torch.device) -> torch.Tensor:
    """Return an empty bool tensor on device, shared between calls on the CPU."""
    if device.type == "cpu":
        return _EMPTY_CPU_MASK
    return torch.zeros(0, dtype=torch.bool, device=device)


_EMPTY_CPU_MASK = torch.zeros(0, dtype=torch.bool)


def _finite_stat(value: float, finite_count: float) -> float:
    """Return value, or NaN when the tensor had no finite element to compute it from."""
    return value if finite_count > 0 else math.nan


def build_tensor_summary(
    entry: BatchEntry, stats: Sequence[float], sample_mask: Sequence[float] = ()
) -> pb.TensorSummary:
    """Return the TensorSummary of entry from its BATCH_STAT_NAMES values after the host transfer.

    When the values show NaN or Inf and count_nonfinite has not run for entry, this
    runs it, which costs a second host synchronization. sample_mask is unused: the
    per-sample flags come from count_nonfinite.
    """
    if needs_count(entry, stats):
        count_nonfinite([entry], [stats])
    if entry.exact is not None:
        return _summary_from_exact(entry, *entry.exact)
    if math.prod(entry.shape) == 0:
        return pb.TensorSummary(name=entry.name, dtype=entry.dtype, shape=entry.shape,
                                min=math.nan, max=math.nan, mean=math.nan, std=math.nan)
    minimum, maximum, mean, std = stats
    return pb.TensorSummary(name=entry.name, dtype=entry.dtype, shape=entry.shape,
                            nan_count=0, inf_count=0, min=minimum, max=maximum, mean=mean, std=std)


def _summary_from_exact(entry: BatchEntry, stats: Sequence[float], sample_mask: Sequence[float]) -> pb.TensorSummary:
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


def foreach_norms(tensors: Sequence[torch.Tensor], norm_type: float = 2.0, *, exact: bool = False) -> torch.Tensor:
    """Return the norm of each tensor, in input order, on the first tensor's device.

    torch._foreach_norm runs once per (device, dtype) group, as clip_grad_norm_ does.
    By default float32 and float64 tensors accumulate in their own dtype and half
    types in float32: one fused pass, 4-6x faster on the CPU than float64. A float32
    norm is NaN only when an element is NaN, but it is inf when an element is inf or
    when the sum of squares overflows (finite elements above about 1.8e19). Callers
    recompute such inf norms with exact=True, which accumulates in float64 (float32
    on MPS, which has no float64) as the norms of the reference check did.
    The result is float64 when any norm is, else float32.
    """
    if not tensors:
        return torch.zeros(0, dtype=torch.float64)
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for index, tensor in enumerate(tensors):
        groups.setdefault((tensor.device, tensor.dtype), []).append(index)
    dense = [_dense(tensor) for tensor in tensors] if any(tensor.is_sparse for tensor in tensors) else list(tensors)

    # One no_grad block replaces a detach per tensor, because the norms of parameters must not record
    # autograd history.
    with torch.no_grad():
        if len(groups) == 1:
            (device, dtype), = groups
            return torch.stack(torch._foreach_norm(dense, norm_type, dtype=_accumulate_dtype(device, dtype, exact)))
        norms: list[torch.Tensor] = [torch.empty(0)] * len(tensors)
        for (device, dtype), indices in groups.items():
            group = [dense[index] for index in indices]
            group_norms = torch._foreach_norm(group, norm_type, dtype=_accumulate_dtype(device, dtype, exact))
            for index, norm in zip(indices, group_norms):
                norms[index] = norm
        target = tensors[0].device
        result_dtype = torch.float64 if any(norm.dtype == torch.float64 for norm in norms) else torch.float32
        return torch.stack([norm.to(device=target, dtype=result_dtype) for norm in norms])


def _accumulate_dtype(device: torch.device, dtype: torch.dtype, exact: bool) -> torch.dtype | None:
    """Return the dtype in which torch._foreach_norm accumulates a group, or None for the tensors' own dtype."""
    return stats_dtype(device) if exact else _fast_accumulate_dtype(dtype)


def _fast_accumulate_dtype(dtype: torch.dtype) -> torch.dtype | None:
    """Return None (the tensor's own dtype) for float32, float64 and complex tensors, else float32."""
    if dtype in (torch.float32, torch.float64) or dtype.is_complex:
        return None
    return torch.float32


def _dense(tensor: torch.Tensor) -> torch.Tensor:
    """Return the stored values of a sparse tensor, or tensor itself when it is dense."""
    return tensor.coalesce().values() if tensor.is_sparse else tensor


# On the CPU a snapshot's flat buffers are kept for the next snapshot up to this many bytes.
KEPT_SNAPSHOT_MAX_BYTES = 1 << 30


class UpdateSnapshot:
    """A copy of tensors, for the norm of their change ||delta w|| after an optimizer update.

    Dense tensors are copied into one flat buffer per (device, dtype): one
    allocation instead of one per tensor, which on the CPU saves most of the cost,
    since each fresh allocation of a large tensor pays page faults. Other tensors
    (sparse, or subclasses such as DTensor) get a clone each. A flat buffer of the
    right size in pool (from kept_cpu_buffers of an earlier snapshot) is written
    over instead of allocated.
    """

    def __init__(self, tensors: Sequence[torch.Tensor],
                 pool: dict[tuple[torch.device, torch.dtype], torch.Tensor] | None = None) -> None:
        self._copies: list[torch.Tensor] = [torch.empty(0)] * len(tensors)
        self._buffers: list[torch.Tensor] = []
        self._flat: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        self._pool = pool or {}
        groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for index, tensor in enumerate(tensors):
            if type(tensor) is torch.Tensor and tensor.layout == torch.strided:
                groups.setdefault((tensor.device, tensor.dtype), []).append(index)
            else:
                self._copies[index] = tensor.clone()
                self._buffers.append(self._copies[index])
        for (device, dtype), indices in groups.items():
            self._buffers.append(self._flat_copy(tensors, indices, device, dtype))

    def _flat_copy(self, tensors: Sequence[torch.Tensor], indices: list[int], device: torch.device,
                   dtype: torch.dtype) -> torch.Tensor:
        numel = sum(tensors[index].numel() for index in indices)
        buffer = self._pool.get((device, dtype))
        if buffer is None or buffer.numel() != numel:
            buffer = torch.empty(numel, dtype=dtype, device=device)
        self._flat[(device, dtype)] = buffer
        offset = 0
        for index in indices:
            numel = tensors[index].numel()
            self._copies[index] = buffer[offset : offset + numel].view(tensors[index].shape)
            offset += numel
        torch._foreach_copy_([self._copies[index] for index in indices], [tensors[index] for index in indices])
        return buffer

    def update_norm(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """Return the 2-norm of (tensors now - the copy) over all elements; this overwrites the copy."""
        torch._foreach_sub_(self._copies, list(tensors))
        return total_norm(foreach_norms(self._buffers))

    def kept_cpu_buffers(self, max_bytes: int = KEPT_SNAPSHOT_MAX_BYTES) -> dict[tuple[torch.device, torch.dtype],
                                                                                  torch.Tensor]:
        """Return the CPU flat buffers to reuse in the next snapshot, or {} when they exceed max_bytes together.

        Each fresh allocation of a large CPU buffer pays a page fault per memory page:
        a 200 MB snapshot took about 100 ms into a fresh buffer and 14 ms into a
        reused one on the benchmark machine (1 thread). The CUDA caching allocator reuses freed blocks already, so
        GPU buffers are not kept.
        """
        reusable = {key: buffer for key, buffer in self._flat.items() if buffer.device.type == "cpu"}
        size = sum(buffer.numel() * buffer.element_size() for buffer in reusable.values())
        return reusable if size <= max_bytes else {}


def total_norm(norms: torch.Tensor, norm_type: float = 2.0) -> torch.Tensor:
    """Return the norm of per-tensor norms, which equals the norm over all their elements."""
    dtype = stats_dtype(norms.device)
    if norms.numel() == 0:
        return torch.zeros((), dtype=dtype, device=norms.device)
    # One value per tensor: float64 here is cheap, and finite float32 norms cannot overflow it.
    return torch.linalg.vector_norm(norms, norm_type, dtype=dtype)
