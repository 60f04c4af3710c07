"""Stage 1 across ranks: one rank's batches on another scale than the others' (a bad data shard)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

from nanwatch.service.checks.catalog import Where, format_number, new_finding
from nanwatch.v1 import nanwatch_pb2 as pb

# Ranks draw batches from one distribution, so their batch std differs by a few percent to a
# few times at small batch sizes. A factor this large means a shard is in other units.
SCALE_RATIO = 10.0
# Steps in a row the ratio must hold, so that one odd batch is not reported.
PATIENCE_STEPS = 3


@dataclass
class InputScaleComparer:
    """Compares the std of each float batch tensor across the ranks of a run, step by step."""

    world_size: int
    _stds: dict[tuple[str, int], dict[int, float]] = field(default_factory=dict)
    _streaks: dict[str, int] = field(default_factory=dict)
    _reported: set[str] = field(default_factory=set)

    def observe(self, rank: int, step: int, batch: Sequence[pb.TensorSummary], where: Where) -> list[pb.Finding]:
        """Record this rank's batch stds of one step; return DATA_RANK_SCALE once a tensor's ranks stay far apart."""
        if self.world_size < 2:
            return []
        findings = []
        for summary in batch:
            if not summary.dtype.startswith(("float", "bfloat")) or not summary.std > 0.0:
                continue
            by_rank = self._stds.setdefault((summary.name, step), {})
            by_rank[rank] = summary.std
            if len(by_rank) == self.world_size:
                del self._stds[(summary.name, step)]
                finding = self._compare(summary.name, by_rank, where)
                if finding is not None:
                    findings.append(finding)
        self._drop_old(step)
        return findings

    def _compare(self, name: str, by_rank: dict[int, float], where: Where) -> pb.Finding | None:
        stds = list(by_rank.values())
        if max(stds) < SCALE_RATIO * min(stds):
            self._streaks[name] = 0
            return None
        self._streaks[name] = self._streaks.get(name, 0) + 1
        if self._streaks[name] < PATIENCE_STEPS or name in self._reported:
            return None
        self._reported.add(name)
        return _scale_finding(name, by_rank, where)

    def _drop_old(self, step: int) -> None:
        for key in [key for key in self._stds if key[1] < step - 2 * PATIENCE_STEPS]:
            del self._stds[key]


def _scale_finding(name: str, by_rank: dict[int, float], where: Where) -> pb.Finding:
    # The outlier is the rank farthest from the others in log scale; with two ranks, the larger scale.
    center = statistics.median(math.log(std) for std in by_rank.values())
    outlier = max(by_rank, key=lambda rank: (abs(math.log(by_rank[rank]) - center), by_rank[rank]))
    others = [std for rank, std in by_rank.items() if rank != outlier]
    ratio = by_rank[outlier] / statistics.median(others)
    message = (
        f"Batch tensor '{name}' on rank {outlier} has std {format_number(by_rank[outlier])}, "
        f"{format_number(ratio)}x the other ranks' ({format_number(statistics.median(others))}) for "
        f"{PATIENCE_STEPS} steps in a row up to step {where.step}: that rank's data shard is on another "
        f"scale (unnormalized or in other units), and its gradients dominate the all-reduce."
    )
    fix = (
        f"Check how rank {outlier}'s shard was produced: apply the same normalization as the other "
        f"shards (compare the mean and std of '{name}' per shard) before training."
    )
    values = {f"std_rank{rank}": format_number(std) for rank, std in sorted(by_rank.items())}
    values["ratio"] = format_number(ratio)
    at = Where(run_id=where.run_id, rank=outlier, step=where.step)
    return new_finding("DATA_RANK_SCALE", pb.SEVERITY_WARNING, at, message=message, fix=fix, tensor=name,
                       values=values)
