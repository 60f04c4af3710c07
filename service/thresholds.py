"""Tunable limits of the staged checks, loadable from a JSON or YAML mapping."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(kw_only=True, slots=True)
class Thresholds:
    """Limits that decide when a check warns.

    Every field has a default that keeps a healthy run silent: an MLP on the
    scikit-learn digits with SGD (lr 0.1) or Adam (lr 1e-3), default init and
    CrossEntropyLoss. Construction validates every field and raises ValueError
    naming it.

    Example:
        thresholds = Thresholds.from_mapping(json.load(open("thresholds.json")))
        engine = CheckEngine(thresholds)
    """

    lr_far_above_factor: float = 10.0
    """LR_TOO_HIGH fires when lr > this factor x the usual upper lr of the optimizer type."""

    grad_explode_factor: float = 20.0
    """GRAD_EXPLODING fires when grad_norm > this factor x the median of the recent finite norms.

    Measured on the digits MLP (64-128-10, CPU) over 2000 steps and 3 seeds. The
    largest ratio of a norm to the median of the 50 before it was 3.2 (SGD lr
    0.1, batch 64), 4.1 (Adam lr 1e-3, batch 64), 6.1 (SGD, batch 16) and 8.2
    (Adam, batch 8).
    """

    grad_history: int = 50
    """Number of recent finite gradient norms per rank that the median is taken over."""

    grad_warmup_steps: int = 10
    """Finite gradient norms a rank must have reported before GRAD_EXPLODING can fire."""

    grad_scaler_skip_limit: int = 10
    """Consecutive steps with non-finite gradients that a GradScaler may skip before GRAD_NONFINITE.

    With a GradScaler (StepReport.loss_scale > 0) an occasional non-finite
    gradient only skips the step and halves the scale; this many in a row means
    the gradients are non-finite at every scale tried.
    """

    init_scale_max_ratio: float = 4.0
    """INIT_SCALE fires when std x sqrt(fan_in) of a Linear/Conv weight > this x sqrt(2) (Kaiming normal, ReLU gain)."""

    init_scale_min_ratio: float = 0.1
    """INIT_SCALE fires when std x sqrt(fan_in) of a Linear/Conv weight < this x 1/sqrt(3) (nn.Linear default)."""

    init_scale_min_numel: int = 32
    """Weights with fewer elements than this are left out of INIT_SCALE, because their std is too noisy."""

    fp16_eps_min: float = 6.1e-05
    """OPTIMIZER_EPS_FP16 fires when float16 parameters train with an optimizer eps below this.

    The default is the smallest normal float16 number (2**-14); below it eps is
    subnormal in float16, and below 2**-25 it rounds to 0.
    """

    max_listed: int = 5
    """Maximum number of parameter names, sample indices or positions quoted in one message."""

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            _validate_type(field.name, getattr(self, field.name), field.type)
        _require(self, "lr_far_above_factor", self.lr_far_above_factor >= 1.0, ">= 1")
        _require(self, "grad_explode_factor", self.grad_explode_factor > 1.0, "> 1")
        _require(self, "grad_history", self.grad_history >= 3, ">= 3")
        _require(
            self,
            "grad_warmup_steps",
            1 <= self.grad_warmup_steps <= self.grad_history,
            f"between 1 and grad_history ({self.grad_history})",
        )
        _require(self, "grad_scaler_skip_limit", self.grad_scaler_skip_limit >= 1, ">= 1")
        _require(self, "init_scale_max_ratio", self.init_scale_max_ratio >= 1.0, ">= 1")
        _require(self, "init_scale_min_ratio", 0.0 < self.init_scale_min_ratio <= 1.0, "in (0, 1]")
        _require(self, "init_scale_min_numel", self.init_scale_min_numel >= 1, ">= 1")
        _require(self, "fp16_eps_min", self.fp16_eps_min > 0.0, "> 0")
        _require(self, "max_listed", self.max_listed >= 1, ">= 1")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> Thresholds:
        """Build Thresholds from a mapping such as a parsed JSON or YAML file.

        Keys left out keep their defaults.

        Raises:
            ValueError: a key is not a field (the message lists the valid keys),
                or a value has the wrong type or range (the message names the key).
        """
        valid = [field.name for field in dataclasses.fields(cls)]
        unknown = sorted(str(key) for key in values if key not in valid)
        if unknown:
            raise ValueError(
                f"unknown threshold key(s) {', '.join(unknown)}; valid keys are: {', '.join(valid)}"
            )
        return cls(**dict(values))


def _validate_type(name: str, value: Any, annotation: Any) -> None:
    """Raise ValueError unless value fits the field's annotation ("float" or "int")."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        hint = ""
        if isinstance(value, str):
            hint = " (YAML reads 1e-4 as a string: write 1.0e-4)"
        raise ValueError(f"threshold {name} must be a number, got {value!r}{hint}")
    if annotation in ("int", int) and not isinstance(value, int):
        raise ValueError(f"threshold {name} must be an integer, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"threshold {name} must be finite, got {value!r}")


def _require(thresholds: Thresholds, name: str, is_valid: bool, expected: str) -> None:
    if not is_valid:
        raise ValueError(f"threshold {name} must be {expected}, got {getattr(thresholds, name)!r}")
