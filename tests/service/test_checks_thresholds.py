"""Tests of Thresholds validation and from_mapping."""

from __future__ import annotations

import math

import pytest

from nanwatch.service.thresholds import Thresholds


def test_defaults_valid() -> None:
    assert Thresholds().grad_explode_factor > 1.0


def test_from_mapping_overrides() -> None:
    thresholds = Thresholds.from_mapping({"grad_explode_factor": 50, "grad_history": 100})
    assert thresholds.grad_explode_factor == 50
    assert thresholds.grad_history == 100
    assert thresholds.lr_far_above_factor == Thresholds().lr_far_above_factor


def test_unknown_key_lists_valid() -> None:
    with pytest.raises(ValueError, match="grad_explode_factr") as error:
        Thresholds.from_mapping({"grad_explode_factr": 5.0})
    assert "grad_explode_factor" in str(error.value)
    assert "init_scale_max_ratio" in str(error.value)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 0.0, 0.5])
def test_bad_explode_factor(value: float) -> None:
    with pytest.raises(ValueError, match="grad_explode_factor"):
        Thresholds(grad_explode_factor=value)


def test_string_value_hint() -> None:
    with pytest.raises(ValueError, match="YAML reads 1e-4 as a string"):
        Thresholds.from_mapping({"fp16_eps_min": "1e-4"})


@pytest.mark.parametrize("value", [2.5, True])
def test_int_field_type(value: object) -> None:
    with pytest.raises(ValueError, match="grad_history"):
        Thresholds(grad_history=value)  # type: ignore[arg-type]


def test_warmup_within_history() -> None:
    with pytest.raises(ValueError, match="grad_warmup_steps must be between 1 and grad_history \\(20\\)"):
        Thresholds(grad_history=20, grad_warmup_steps=30)


@pytest.mark.parametrize("value", [0.0, 1.5])
def test_min_ratio_range(value: float) -> None:
    with pytest.raises(ValueError, match="init_scale_min_ratio"):
        Thresholds(init_scale_min_ratio=value)
