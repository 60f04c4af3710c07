"""Client overhead against model size: the plain step against nanwatch on MLPs of 1M to 50M parameters."""

from __future__ import annotations

from dataclasses import dataclass

from benchmarks.client_overhead import PLAIN, WATCHER_SERVICE, measure_client_overhead
from benchmarks.models import count_parameters, mlp_workload
from benchmarks.trials import VariantResult


@dataclass(kw_only=True)
class SizePoint:
    """Interleaved results of the plain and the watched step at one model size."""

    parameters: int
    plain: VariantResult
    watched: VariantResult


def measure_model_sizes(sizes: tuple[int, ...], *, rounds: int, steps: int, batch: int = 32) -> list[SizePoint]:
    """Return one SizePoint per requested parameter count, smallest first."""
    points = []
    for size in sorted(sizes):
        workload = mlp_workload(parameter_count=size, batch=batch)
        results = measure_client_overhead(workload, rounds=rounds, steps=steps, variants=(PLAIN, WATCHER_SERVICE),
                                          warmup_steps=1)
        points.append(SizePoint(parameters=count_parameters(workload.model), plain=results[PLAIN],
                                watched=results[WATCHER_SERVICE]))
    return points
