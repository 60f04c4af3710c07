"""Per-rank result of a demo run, written as result-rank{R}.json."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any


@dataclass(kw_only=True, slots=True)
class RankResult:
    """Measurements and outcome of one rank."""

    rank: int
    world_size: int
    fault: str
    # Optimizer steps whose update was applied.
    steps_run: int = 0
    # First step at which this rank's own check saw a NaN or Inf, and in what
    # ("input", "loss" or "grad"); None when it saw none.
    first_nonfinite_step: int | None = None
    first_nonfinite_what: str | None = None
    # Set from nanwatch's HaltError when the watcher halted the run.
    halted: bool = False
    halt_step: int | None = None
    halt_reason: str | None = None
    halt_source: str | None = None
    # Whether every parameter was finite when the run stopped.
    params_finite: bool | None = None
    # Loss of the last step whose update was applied, or None before the first update.
    final_loss: float | None = None
    # Test-set accuracy in [0, 1], measured only when the run completed all steps.
    accuracy: float | None = None

    def record_loss(self, loss: float) -> None:
        """Store loss as final_loss, or None when it is not finite (JSON has no NaN)."""
        self.final_loss = loss if math.isfinite(loss) else None

    def write(self, result_dir: Path) -> Path:
        """Write this result to result_dir/result-rank{rank}.json and return the path."""
        result_dir.mkdir(parents=True, exist_ok=True)
        path = result_path(result_dir, self.rank)
        path.write_text(json.dumps(asdict(self), indent=2, allow_nan=False) + "\n")
        return path


def result_path(result_dir: Path, rank: int) -> Path:
    """Return the path of rank's result file in result_dir."""
    return result_dir / f"result-rank{rank}.json"


def read_result(path: Path) -> RankResult:
    """Read one result file.

    Raises:
        ValueError: the file is not a JSON object with the fields of RankResult.
    """
    data: Any = json.loads(path.read_text())
    known = {field.name for field in fields(RankResult)}
    if not isinstance(data, dict) or not {"rank", "world_size", "fault"} <= data.keys():
        raise ValueError(f"{path} is not a demo result: expected a JSON object with rank, world_size and fault")
    unknown = data.keys() - known
    if unknown:
        raise ValueError(f"{path} has unknown result fields {sorted(unknown)}; expected only {sorted(known)}")
    return RankResult(**data)
