"""Tests of the step measurements: activations, output flag, update norms, observers, batch summaries, host syncs."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from benchmarks.host_syncs import count_host_syncs
from nanwatch.client import observers
from nanwatch.client.agreement import Agreement
from nanwatch.client.facts import collect_parameters
from nanwatch.client.step_check import StepChecker, StepContext, StepOutcome
from nanwatch.client.step_state import MAX_BATCH_ENTRIES
from nanwatch.client.summaries import (
    UpdateSnapshot, build_tensor_summary, measure_batch_tensor, measure_tensor, summarize_batch_tensor,
)
from nanwatch.client.trace import ForwardTrace, measure_activation
from nanwatch.client.transfer import fetch_to_host


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


def _output_finite(trace: ForwardTrace) -> bool | None:
    extremes = trace.take_output_extremes()
    return None if extremes is None else bool(torch.isfinite(extremes).all())


def test_output_extremes_per_step() -> None:
    model = _model()
    trace = ForwardTrace(model)
    assert _output_finite(trace) is None
    model(torch.randn(2, 4))
    assert _output_finite(trace)
    model(torch.full((2, 4), math.nan))
    model(torch.randn(2, 4))
    assert not _output_finite(trace)
    assert _output_finite(trace) is None
    trace.remove()


def test_output_extremes_fold_over_many_passes() -> None:
    model = _model()
    trace = ForwardTrace(model)
    with torch.no_grad():
        model(torch.full((2, 4), math.inf))
        for _ in range(200):
            model(torch.randn(2, 4))
    extremes = trace.take_output_extremes()
    assert extremes is not None and extremes.numel() <= 66
    assert not bool(torch.isfinite(extremes).all())
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


# ---- batch summaries, the step code and the host transfer ----


class _Exchanging(Agreement):
    """An Agreement that takes the collective path (device code, exchange) without a process group."""

    @property
    def is_collective(self) -> bool:
        return True

    def exchange(self, local_code: torch.Tensor) -> torch.Tensor:
        return local_code.reshape(1).to(torch.int64)


def _step_checker(model: nn.Module, agreement: Agreement | None = None) -> tuple[StepChecker, torch.optim.Optimizer]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    context = StepContext(run_id="r", rank=0, parameters=collect_parameters(model, optimizer), optimizer=optimizer,
                          grad_scaler=None, agreement=agreement or Agreement(), trace=None)
    return StepChecker(context), optimizer


def _checked_step(checker: StepChecker, model: nn.Module, step: int = 0, **batch: torch.Tensor) -> StepOutcome:
    """Record batch and a loss, run backward and return the step check's outcome (no update)."""
    for name, tensor in batch.items():
        checker.state.add_batch(summarize_batch_tensor(name, tensor))
    loss = model(torch.ones(2, 4)).square().mean()
    checker.state.add_loss(loss)
    model.zero_grad()
    loss.backward()
    return checker.check(step, None)


def test_batch_summary_matches_full_measure() -> None:
    tensor = torch.randn(16, 5, generator=torch.Generator().manual_seed(1)) * 3 + 7
    summary = build_tensor_summary(summarize_batch_tensor("x", tensor), measure_batch_tensor(tensor).tolist())
    _, _, _, minimum, maximum, mean, std = measure_tensor(tensor).tolist()
    assert (summary.nan_count, summary.inf_count) == (0, 0)
    assert (summary.min, summary.max) == (minimum, maximum)
    assert summary.mean == pytest.approx(mean, rel=1e-6)
    assert summary.std == pytest.approx(std, rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.bool])
def test_batch_summary_dtypes(dtype: torch.dtype) -> None:
    tensor = torch.tensor([[0, 1], [1, 1]]).to(dtype)
    summary = build_tensor_summary(summarize_batch_tensor("x", tensor), measure_batch_tensor(tensor).tolist())
    assert (summary.min, summary.max, summary.mean) == (0.0, 1.0, 0.75)
    assert summary.std == pytest.approx(0.5)


def test_batch_summary_one_element_std_zero() -> None:
    summary = build_tensor_summary(summarize_batch_tensor("x", torch.tensor([2.5])), [2.5, 2.5, 2.5, 0.0])
    assert summary.std == 0.0


def test_batch_nan_counted_in_report() -> None:
    checker, _ = _step_checker(_model())
    inputs = torch.ones(6, 3)
    inputs[1, 0], inputs[4, 2], inputs[4, 1] = math.nan, math.inf, -math.inf
    outcome = _checked_step(checker, _model(), inputs=inputs, targets=torch.arange(6))
    bad, labels = outcome.report.batch
    assert (bad.nan_count, bad.inf_count) == (1, 2)
    assert list(bad.nonfinite_sample_indices) == [1, 4]
    assert (bad.min, bad.max, bad.mean) == (1.0, 1.0, 1.0)
    assert (labels.nan_count, labels.inf_count, labels.max) == (0, 0, 5.0)
    assert outcome.halt is not None
    assert "has 1 NaN and 2 Inf values in samples [1, 4]" in outcome.halt.reason


def test_batch_written_in_place_lower_bounds() -> None:
    checker, _ = _step_checker(_model())
    inputs = torch.ones(4, 3)
    inputs[2, 2] = math.nan
    checker.state.add_batch(summarize_batch_tensor("inputs", inputs))
    inputs.nan_to_num_()
    outcome = _checked_step(checker, _model())
    assert outcome.report.batch[0].nan_count == 1
    assert outcome.halt is not None


def test_batch_written_through_data_lower_bounds() -> None:
    checker, _ = _step_checker(_model())
    inputs = torch.ones(4, 3)
    inputs[2, 2] = math.inf
    checker.state.add_batch(summarize_batch_tensor("inputs", inputs))
    inputs.data[2, 2] = 0.0
    outcome = _checked_step(checker, _model())
    assert (outcome.report.batch[0].nan_count, outcome.report.batch[0].inf_count) == (0, 1)
    assert outcome.halt is not None


def test_batch_empty_no_halt() -> None:
    checker, _ = _step_checker(_model())
    outcome = _checked_step(checker, _model(), inputs=torch.zeros(0, 3))
    assert outcome.halt is None
    assert math.isnan(outcome.report.batch[0].mean)


def test_batch_dropped_entry_still_halts() -> None:
    checker, _ = _step_checker(_model())
    checker.state.add_batch(summarize_batch_tensor("first", torch.tensor([math.nan])))
    for index in range(MAX_BATCH_ENTRIES):
        checker.state.add_batch(summarize_batch_tensor(f"later{index}", torch.ones(2)))
    outcome = _checked_step(checker, _model())
    assert len(outcome.report.batch) == MAX_BATCH_ENTRIES
    assert outcome.halt is not None
    assert "non-finite batch data" in outcome.halt.reason


@pytest.mark.parametrize("agreement", [Agreement(), _Exchanging()], ids=["host", "device"])
@pytest.mark.parametrize(("case", "reason"), [
    ("healthy", None), ("data", "non-finite batch data"), ("loss", "non-finite loss"),
    ("gradient", "non-finite gradient"), ("parameter", "non-finite parameters"),
])
def test_step_code_paths(agreement: Agreement, case: str, reason: str | None) -> None:
    model = _model()
    checker, _ = _step_checker(model, agreement)
    inputs = torch.tensor([[math.nan, 1.0]]) if case == "data" else torch.ones(1, 2)
    checker.state.add_batch(summarize_batch_tensor("inputs", inputs))
    loss = model(torch.ones(2, 4)).square().mean()
    checker.state.add_loss(loss * math.inf if case == "loss" else loss)
    loss.backward()
    with torch.no_grad():
        if case == "gradient":
            model[0].weight.grad[0, 0] = math.nan
        if case == "parameter":
            model[2].bias[0] = math.inf
    outcome = checker.check(0, None)
    if reason is None:
        assert outcome.halt is None
    else:
        assert outcome.halt is not None
        assert reason in outcome.halt.reason


def test_loss_nan_then_finite_halts() -> None:
    model = _model()
    checker, _ = _step_checker(model)
    checker.state.add_loss(torch.tensor(math.nan))
    outcome = _checked_step(checker, model)
    assert outcome.halt is not None
    assert "non-finite loss" in outcome.halt.reason


def test_loss_large_float64_finite() -> None:
    model = _model()
    checker, _ = _step_checker(model)
    checker.state.add_loss(torch.tensor(1e300, dtype=torch.float64))
    outcome = checker.check(0, None)
    assert outcome.halt is None
    assert outcome.report.loss == 1e300


def test_update_snapshot_norm() -> None:
    tensors = [torch.randn(3, 4), torch.randn(5, dtype=torch.float64), torch.randn(2, 2).half(), torch.randn(())]
    snapshot = UpdateSnapshot(tensors)
    moved = [tensor + 0.5 for tensor in tensors]
    expected = math.sqrt(sum(0.25 * tensor.numel() for tensor in tensors))
    assert snapshot.update_norm(moved).item() == pytest.approx(expected, rel=1e-3)


def test_fetch_keeps_int64_exact() -> None:
    assert fetch_to_host([torch.tensor([1.5]), torch.tensor([2**53 - 1])]) == [[1.5], [float(2**53 - 1)]]


def test_fetch_bool_only_numbers() -> None:
    assert fetch_to_host([torch.tensor(True)]) == [[1.0]]


def test_step_one_host_sync() -> None:
    model = _model()
    checker, optimizer = _step_checker(model)
    counts = []
    for step in range(12):
        with count_host_syncs() as counted:
            _checked_step(checker, model, step, inputs=torch.randn(4, 3), targets=torch.arange(4))
            optimizer.step()
            checker.after_update()
        counts.append(sum(counted.values()))
    assert max(counts) == 1


def test_parameter_norms_measured_on_their_steps() -> None:
    model = _model()
    checker, optimizer = _step_checker(model)
    measured = []
    for step in range(12):
        outcome = _checked_step(checker, model, step)
        optimizer.step()
        checker.after_update()
        measured.append(outcome.report.param_norm > 0.0)
    # Step 0, then the step after each update-norm snapshot; 0 is "not measured" in the API.
    assert [step for step, yes in enumerate(measured) if yes] == [0, 1, 11]


@pytest.mark.parametrize("agreement", [Agreement(), _Exchanging()], ids=["host", "device"])
def test_failing_step_measures_the_parameters(agreement: Agreement) -> None:
    model = _model()
    checker, _ = _step_checker(model, agreement)
    with torch.no_grad():
        model[2].bias[0] = math.inf
    outcome = _checked_step(checker, model, step=5)
    assert outcome.halt is not None
    assert "non-finite parameters" in outcome.halt.reason
    assert "2.bias" in outcome.halt.reason
    assert math.isinf(outcome.report.param_norm)


def test_poisoned_parameters_found_at_the_next_step() -> None:
    model = _model()
    checker, optimizer = _step_checker(model)
    for step in range(5):
        assert _checked_step(checker, model, step).halt is None
        optimizer.step()
        checker.after_update()
    with torch.no_grad():
        model[0].weight[1, 2] = math.nan  # an update that poisoned the weights, as Adam with eps=0 can
    outcome = _checked_step(checker, model, 5)
    assert outcome.halt is not None
    assert "non-finite parameters" in outcome.halt.reason
    assert "0.weight" in outcome.halt.reason


def test_update_snapshot_reuses_cpu_buffer() -> None:
    tensors = [torch.randn(3, 4), torch.randn(5)]
    first = UpdateSnapshot(tensors)
    first.update_norm([tensor + 1.0 for tensor in tensors])
    pool = first.kept_cpu_buffers()
    (buffer,) = pool.values()
    second = UpdateSnapshot(tensors, pool=pool)
    assert second.kept_cpu_buffers()[(torch.device("cpu"), torch.float32)] is buffer
    assert second.update_norm([tensor + 2.0 for tensor in tensors]).item() == pytest.approx(2.0 * math.sqrt(17))


def test_update_snapshot_large_buffer_not_kept() -> None:
    snapshot = UpdateSnapshot([torch.randn(1000)])
    assert snapshot.kept_cpu_buffers(max_bytes=100) == {}
