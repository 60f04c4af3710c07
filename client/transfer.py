"""One device-to-host copy for many small tensors."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from nanwatch.client.summaries import stats_dtype


def fetch_to_host(parts: Sequence[torch.Tensor]) -> list[list[float]]:
    """Return the values of each tensor in parts as a flat list, after one host transfer.

    Every part is flattened and moved to the first part's device and a common
    dtype there, so the training step pays for one synchronization, not one per value.
    """
    if not parts:
        return []
    device = parts[0].device
    dtype = stats_dtype(device)
    flat = [part.detach().reshape(-1).to(device=device, dtype=dtype) for part in parts]
    values = torch.cat(flat).tolist()

    result: list[list[float]] = []
    start = 0
    for part in flat:
        result.append(values[start : start + part.numel()])
        start += part.numel()
    return result
