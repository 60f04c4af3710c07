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

    lr_far_above_factor: float = 5.0
    """LR_TOO_HIGH fires when lr > this factor x the usual upper lr of the optimizer type.

    5 keeps large-batch SGD recipes silent (linear scaling reaches lr 3.2 at batch 8192)
    while SGD at lr 10 or Adam at lr 0.1 is flagged."""

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

    grad_spike_patience: int = 3
    """GRAD_EXPLODING is info on the first step above the limit and a warning once the norm stays
    above it this many steps in a row. A single spike that recovers is common in healthy runs."""

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

    update_ratio_max: float = 0.5
    """UPDATE_RATIO_HIGH fires when ||delta w|| / ||w|| of one measured update is above this.

    Usual training sits near 1e-3, but Adam's first steps move every element by
    about lr, so a small net with lr 1e-2 reaches ratios near 0.1 (an estimate from
    lr / RMS of the weights). NOTE: 0.5 kept the digits MLP (64-128-128-10, CPU)
    silent with SGD lr 0.1 momentum 0.9, Adam lr 1e-3 and AdamW lr 1e-2 over 400
    steps; the ratios themselves were not recorded, so the margin is unknown.
    """

    activation_growth_factor: float = 1000.0
    """ACT_SCALE_GROWTH fires when a Linear/Conv output std in the first forward pass is this many
    times the std of the first Linear/Conv output (activations grow with depth)."""

    activation_vanish_factor: float = 1e-4
    """ACT_SCALE_VANISH (info) fires when the last Linear/Conv output std is below this x the first one."""

    saturated_fraction_max: float = 0.5
    """ACT_SATURATED fires when more than this fraction of a Sigmoid/Tanh input is in its flat tails."""

    input_abs_max: float = 1000.0
    """DATA_NOT_NORMALIZED fires when a float input tensor (not a target) contains values above this in magnitude."""

    loss_history: int = 100
    """Number of recent finite losses per rank that the loss median and MAD are taken over."""

    loss_warmup_steps: int = 20
    """Finite losses a rank must have reported before LOSS_SPIKE or LOSS_DIVERGING can fire."""

    loss_spike_mads: float = 20.0
    """LOSS_SPIKE fires when loss > median + this x the scaled MAD of the recent losses (and > 2x median)."""

    loss_diverge_patience: int = 10
    """LOSS_DIVERGING fires when the loss stays above the spike limit for this many reports in a row."""

    grad_growth_window: int = 8
    """GRAD_GROWTH looks at this many recent finite gradient norms for a steady exponential rise."""

    grad_growth_factor: float = 100.0
    """GRAD_GROWTH fires when the norm rose every step of the window and by more than this factor in total."""

    layer_grad_ratio_max: float = 1e4
    """GRAD_LAYER_RATIO fires when the first Linear/Conv weight's grad norm is this many times the last one's."""

    rank_outlier_factor: float = 10.0
    """LOSS_RANK_OUTLIER fires when a rank's loss is this many times the typical spread away from the other ranks' median."""

    rank_outlier_patience: int = 5
    """Reports in a row that a rank's loss must be an outlier before LOSS_RANK_OUTLIER fires."""

    loss_scale_min: float = 1.0
    """LOSS_SCALE_COLLAPSE fires when the GradScaler scale falls below this (its default start is 65536)."""

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
        _require(self, "grad_spike_patience", self.grad_spike_patience >= 1, ">= 1")
        _require(self, "grad_scaler_skip_limit", self.grad_scaler_skip_limit >= 1, ">= 1")
        _require(self, "init_scale_max_ratio", self.init_scale_max_ratio >= 1.0, ">= 1")
        _require(self, "init_scale_min_ratio", 0.0 < self.init_scale_min_ratio <= 1.0, "in (0, 1]")
        _require(self, "init_scale_min_numel", self.init_scale_min_numel >= 1, ">= 1")
        _require(self, "fp16_eps_min", self.fp16_eps_min > 0.0, "> 0")
        _require(self, "update_ratio_max", self.update_ratio_max > 0.0, "> 0")
        _require(self, "activation_growth_factor", self.activation_growth_factor > 1.0, "> 1")
        _require(self, "activation_vanish_factor", 0.0 < self.activation_vanish_factor < 1.0, "in (0, 1)")
        _require(self, "saturated_fraction_max", 0.0 < self.saturated_fraction_max <= 1.0, "in (0, 1]")
        _require(self, "input_abs_max", self.input_abs_max > 0.0, "> 0")
        _require(self, "loss_history", self.loss_history >= 3, ">= 3")
        _require(self, "loss_warmup_steps", 1 <= self.loss_warmup_steps <= self.loss_history,
                 f"between 1 and loss_history ({self.loss_history})")
        _require(self, "loss_spike_mads", self.loss_spike_mads > 0.0, "> 0")
        _require(self, "loss_diverge_patience", self.loss_diverge_patience >= 1, ">= 1")
        _require(self, "grad_growth_window", self.grad_growth_window >= 3, ">= 3")
        _require(self, "grad_growth_factor", self.grad_growth_factor > 1.0, "> 1")
        _require(self, "layer_grad_ratio_max", self.layer_grad_ratio_max > 1.0, "> 1")
        _require(self, "rank_outlier_factor", self.rank_outlier_factor > 1.0, "> 1")
        _require(self, "rank_outlier_patience", self.rank_outlier_patience >= 1, ">= 1")
        _require(self, "loss_scale_min", self.loss_scale_min > 0.0, "> 0")
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
