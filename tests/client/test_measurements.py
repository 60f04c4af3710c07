"""Tests of the first-forward activation statistics, the output flag, update norms and the observers."""

from __future__ import annotations

import math

import torch
from torch import nn

from nanwatch.client import observers
from nanwatch.client.trace import ForwardTrace, measure_activation


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))


def test_activation_row_values() -> None:
    row = measure_activation("Sigmoid", (torch.tensor([0.0, 10.0, -10.0, 1.0]),), torch.tensor([1.0, 2.0, math.inf]))
    numel, std, max_abs, nonfinite, saturated, input_nan, input_inf = row.tolist()
    assert numel == 3
    assert max_abs == 2.0
    assert nonfinite == 1
    assert saturated == 0.5
    assert input_nan == 0
    assert std == 0.5


def test_activation_row_not_saturating() -> None:
    row = measure_activation("Linear", (torch.ones(3),), torch.ones(3))
    assert math.isnan(row[4].item())


def test_trace_first_pass_only() -> None:
    model = _model()
    trace = ForwardTrace(model)
    model(torch.randn(5, 4))
    model(torch.randn(5, 4))
    assert [call.type for call in trace.calls] == ["Linear", "Tanh", "Linear"]
    assert trace.activation_stats().shape == (3, 7)
    assert trace.output_shape == [5, 3]
    assert trace.autocast_dtype == ""
    trace.remove()


def test_trace_autocast_seen() -> None:
    model = _model()
    trace = ForwardTrace(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randn(2, 4))
    assert trace.autocast_dtype == "bfloat16"
    trace.remove()


def test_output_flag_per_step() -> None:
    model = _model()
    trace = ForwardTrace(model)
    assert trace.take_output_flag() is None
    model(torch.randn(2, 4))
    assert not bool(trace.take_output_flag())
    model(torch.full((2, 4), math.nan))
    assert bool(trace.take_output_flag())
    assert trace.take_output_flag() is None
    trace.remove()


def test_build_activations() -> None:
    model = _model()
    trace = ForwardTrace(model)
    model(torch.randn(2, 4))
    rows = trace.activation_stats().tolist()
    layers = trace.build_activations(rows)
    assert [layer.name for layer in layers] == ["0", "1", "2"]
    assert layers[0].numel == 16
    assert 0.0 <= layers[1].saturated_fraction <= 1.0
    trace.remove()


class _Listener:
    def __init__(self) -> None:
        self.calls: list[tuple[float, float]] = []

    def on_clip(self, tensors: list[torch.Tensor], max_norm: float, total: torch.Tensor) -> None:
        self.calls.append((max_norm, float(total)))


def test_clip_observed() -> None:
    observers.install()
    listener = _Listener()
    observers.add_clip_listener(listener)
    param = nn.Parameter(torch.ones(4))
    param.grad = torch.full((4,), 3.0)
    total = torch.nn.utils.clip_grad_norm_(iter([param]), max_norm=1.0)
    assert listener.calls == [(1.0, float(total))]
    assert float(total) == 6.0


def test_scaler_observed() -> None:
    observers.install()
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(torch.tensor(1.0))
    assert observers.last_grad_scaler() is scaler


def _checker(model: nn.Module, optimizer: torch.optim.Optimizer, trace: ForwardTrace):  # noqa: ANN202
    from nanwatch.client.agreement import Agreement
    from nanwatch.client.facts import collect_parameters
    from nanwatch.client.step_check import StepChecker, StepContext

    return StepChecker(StepContext(run_id="r", rank=0, parameters=collect_parameters(model, optimizer),
                                   optimizer=optimizer, grad_scaler=None, agreement=Agreement(), trace=trace))


def test_step_reports_carry_measurements() -> None:
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    trace = ForwardTrace(model)
    checker = _checker(model, optimizer, trace)
    reports = []
    for step in range(2):
        loss = model(torch.randn(5, 4)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.5)
        reports.append(checker.check(step, None).report)
        optimizer.step()
        checker.after_update()
    first, second = reports
    assert len(first.activations) == 3
    assert list(first.output_shape) == [5, 3]
    assert first.output_checked and first.output_finite
    assert first.clip_max_norm == 0.5
    assert math.isnan(first.update_norm)
    assert second.update_norm > 0.0
    assert len(second.activations) == 0
    trace.remove()
