"""Unit tests of the client's pure parts: summaries, decisions, wire format, settings, backoff."""

from __future__ import annotations

import math

import pytest
import torch

from nanwatch.client import connection, local_checks, settings
from nanwatch.client.facts import build_optimizer_info, fan_in
from nanwatch.client.local_checks import Reason
from nanwatch.client.summaries import build_tensor_summary, foreach_norms, summarize_batch_tensor, total_norm
from nanwatch.client.transfer import fetch_to_host
from nanwatch.client.wire import to_wire_tensor


def summarize(name: str, tensor: torch.Tensor):  # type: ignore[no-untyped-def]
    entry = summarize_batch_tensor(name, tensor)
    stats, mask = fetch_to_host([entry.stats, entry.sample_mask])
    return build_tensor_summary(entry, stats, mask)


def test_summary_counts_nan_and_inf() -> None:
    x = torch.tensor([[1.0, math.nan], [3.0, 5.0], [math.inf, -math.inf]])
    summary = summarize("x", x)
    assert (summary.nan_count, summary.inf_count) == (1, 2)
    assert list(summary.nonfinite_sample_indices) == [0, 2]
    assert (summary.min, summary.max, summary.mean) == (1.0, 5.0, 3.0)
    assert summary.std == pytest.approx(2.0)


def test_summary_of_integer_tensor() -> None:
    summary = summarize("labels", torch.tensor([0, 2, 4]))
    assert (summary.dtype, summary.min, summary.max, summary.mean) == ("int64", 0.0, 4.0, 2.0)
    assert summary.nan_count == 0


def test_summary_without_finite_values_is_nan() -> None:
    summary = summarize("x", torch.full((2,), math.nan))
    assert math.isnan(summary.mean)
    assert summary.nan_count == 2


def test_summary_sample_indices_capped() -> None:
    summary = summarize("x", torch.full((100, 2), math.nan))
    assert list(summary.nonfinite_sample_indices) == list(range(64))


def test_total_norm_matches_clip_grad_norm() -> None:
    tensors = [torch.randn(3, 4), torch.randn(5), torch.randn(2, 2).half()]
    expected = torch.nn.utils.get_total_norm(tensors)
    assert total_norm(foreach_norms(tensors)).item() == pytest.approx(expected.item(), rel=1e-3)


@pytest.mark.parametrize(
    ("codes", "index", "source"),
    [([1, 0], 0, "local"), ([0, 1], 0, "agreed"), ([16, 0], 1, "service"), ([16 | 2, 0], 0, "local")],
)
def test_choose_source(codes: list[int], index: int, source: str) -> None:
    assert local_checks.choose_source(codes, index) == source


def test_halt_reason_names_ranks() -> None:
    reason = local_checks.build_halt_reason([0, int(Reason.DATA | Reason.LOSS)], 0, [0, 1], "")
    assert reason == "rank 1: non-finite batch data, non-finite loss"


@pytest.mark.parametrize(("halt_step", "step", "due"), [(None, 5, False), (3, 2, False), (3, 3, True), (3, 4, True)])
def test_service_halt_due(halt_step: int | None, step: int, due: bool) -> None:
    assert local_checks.service_halt_due(halt_step, step) is due


def test_wire_bfloat16_raw_bytes() -> None:
    tensor = to_wire_tensor("w", torch.tensor([1.0, -2.0], dtype=torch.bfloat16))
    assert (tensor.dtype, list(tensor.shape)) == ("bfloat16", [2])
    assert tensor.data == bytes([0x80, 0x3F, 0x00, 0xC0])


def test_fan_in() -> None:
    assert [fan_in([8, 4]), fan_in([16, 3, 3, 3]), fan_in([8])] == [4, 27, 0]


def test_optimizer_info_sgd() -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5, momentum=0.9)
    info = build_optimizer_info(optimizer)
    assert (info.type, info.lr, info.hyperparameters["momentum"]) == ("SGD", 0.5, 0.9)


def test_run_id_from_torchelastic(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NANWATCH_RUN_ID", raising=False)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "elastic-7")
    assert settings.resolve_run_id(None) == "elastic-7"


def test_run_id_skips_torchrun_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NANWATCH_RUN_ID", raising=False)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    assert settings.resolve_run_id(None).startswith("run-")


def test_invalid_env_run_id_names_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NANWATCH_RUN_ID", "bad id")
    with pytest.raises(ValueError, match="NANWATCH_RUN_ID"):
        settings.resolve_run_id(None)


def test_rank_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert settings.resolve_rank_and_world_size(None, None) == (2, 4)


@pytest.mark.parametrize("attempt", [0, 1, 5, 40])
def test_backoff_within_bounds(attempt: int) -> None:
    assert 0.2 <= connection.backoff_delay_s(attempt) <= 10.0
