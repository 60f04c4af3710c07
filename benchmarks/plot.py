"""PNG plots for BENCHMARKS.md; skipped when matplotlib is not installed."""

from __future__ import annotations

import logging
from pathlib import Path

from benchmarks.scaling import SizePoint
from benchmarks.service_throughput import ThroughputSample, median_of

logger = logging.getLogger(__name__)


def plot_scaling(points: list[SizePoint], throughput: dict[tuple[str, int], list[ThroughputSample]],
                 path: Path) -> bool:
    """Draw the overhead against model size and the throughput against rank count into path; False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed; skipping %s (pip install matplotlib)", path)
        return False
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    millions = [point.parameters / 1e6 for point in points]
    left.plot(millions, [1e3 * point.watched.median_added_s for point in points], "o-", label="nanwatch added time")
    left.plot(millions, [1e3 * point.plain.median_s for point in points], "s--", label="plain step")
    left.set(xscale="log", yscale="log", xlabel="MLP parameters (millions)", ylabel="ms per step",
             title="Client: time per step")
    left.legend()
    kinds = sorted({kind for kind, _ in throughput})
    for kind in kinds:
        counts = sorted(ranks for other, ranks in throughput
                        if other == kind and not any(sample.failure for sample in throughput[(other, ranks)]))
        right.plot(counts, [median_of(throughput[(kind, ranks)], "reports_per_s") for ranks in counts], "o-", label=kind)
    right.set(xscale="log", xlabel="simulated ranks (streams)", ylabel="messages per second",
              title="Service: sustained throughput")
    right.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True
