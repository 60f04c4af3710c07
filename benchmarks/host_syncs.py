"""Count the host synchronizations of a training step by wrapping the Tensor methods that read values."""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

# Tensor methods that copy values to Python and so wait for the device on an accelerator.
# On the CPU they cost little, but each one is a stall of the launch queue on a GPU.
SYNC_METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


@contextmanager
def count_host_syncs() -> Iterator[collections.Counter[str]]:
    """Count calls of SYNC_METHODS on any tensor inside the block, by method name.

    A method that calls another one (tolist inside __bool__, say) counts both. Only
    calls from Python are counted, so syncs made inside C++ kernels are not seen.
    """
    counts: collections.Counter[str] = collections.Counter()
    originals = {name: getattr(torch.Tensor, name) for name in SYNC_METHODS if hasattr(torch.Tensor, name)}
    for name, original in originals.items():
        setattr(torch.Tensor, name, _counting(original, name, counts))
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def _counting(original: Callable[..., Any], name: str, counts: collections.Counter[str]) -> Callable[..., Any]:
    @functools.wraps(original)
    def wrapper(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        counts[name] += 1
        return original(self, *args, **kwargs)
    return wrapper
