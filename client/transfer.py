"""One device-to-host copy for many small tensors."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from nanwatch.client.summaries import stats_dtype

# Dtypes whose values survive any type promotion among them.
_FLOAT_DTYPES = frozenset({torch.bool, torch.float16, torch.bfloat16, torch.float32, torch.float64})


def fetch_to_host(parts: Sequence[torch.Tensor]) -> list[list[float]]:
    """Return the values of each tensor in parts as a flat list, after one host transfer.

    Every part is flattened and joined on the first part's device, so the training
    step pays for one synchronization, not one per value. Bool and float parts join
    as they are, in one torch.hstack, whose promoted dtype represents every value of
    each part exactly. Other parts are converted to the statistics dtype first, since
    a promotion of int64 to float32 would round large values.
    """
    if not parts:
        return []
    device = parts[0].device
    dtype = stats_dtype(device)
    flat = [_joinable(part, device, dtype) for part in parts]
    joined = torch.hstack(flat)
    if joined.dtype == torch.bool:
        joined = joined.to(dtype)
    values = joined.tolist()

    result: list[list[float]] = []
    start = 0
    for part in flat:
        end = start + part.numel()
        result.append(values[start:end])
        start = end
    return result


def _joinable(part: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Return part as a tensor of at most one dimension on device, in a dtype that hstack promotes exactly."""
    if part.ndim <= 1 and part.device == device and part.dtype in _FLOAT_DTYPES:
        return part.detach()
    return part.detach().reshape(-1).to(device=device, dtype=dtype)
