"""Float32 norms that overflow on finite elements do not halt; an inf element still does, on one rank or two."""

from __future__ import annotations

import math
import os
import pathlib

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import free_port
from nanwatch import HaltError, Watcher
from nanwatch.client.summaries import foreach_norms

# Squares of 1e20 overflow a float32 sum (float32 max is about 3.4e38); the values themselves are finite.
LARGE = 1e20


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(8, 4)


def _step_with_grad(watcher: Watcher, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    grad_value: float) -> None:
    """Run one step whose weight gradient is grad_value everywhere except one element set to 1e20."""
    loss = model(torch.randn(3, 8)).mean()
    watcher.observe_loss(loss)
    optimizer.zero_grad()
    loss.backward()
    with torch.no_grad():
        model.weight.grad.fill_(LARGE)
        model.weight.grad[0, 0] = grad_value
    optimizer.step()


def _watched(endpoint: str) -> tuple[Watcher, torch.nn.Module, torch.optim.Optimizer]:
    model = _model()
    # lr keeps the parameters small after a 1e20 gradient.
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-22)
    watcher = Watcher(model, optimizer, endpoint=endpoint, run_id="test-overflow", flush_timeout_s=0.2)
    return watcher, model, optimizer


def test_norms_float32_overflow() -> None:
    grad = torch.full((16,), LARGE)
    assert math.isinf(foreach_norms([grad])[0].item())


def test_norms_exact_finite() -> None:
    grad = torch.full((16,), LARGE)
    assert foreach_norms([grad], exact=True)[0].item() == pytest.approx(4 * LARGE)


def test_norms_dtype_float32() -> None:
    assert foreach_norms([torch.ones(3), torch.ones(2, dtype=torch.bfloat16)]).dtype == torch.float32


def test_large_grad_no_halt(dead_endpoint) -> None:  # type: ignore[no-untyped-def]
    watcher, model, optimizer = _watched(dead_endpoint)
    for _ in range(2):
        _step_with_grad(watcher, model, optimizer, LARGE)
    watcher.close()
    assert not watcher.halted


def test_inf_grad_halts(dead_endpoint) -> None:  # type: ignore[no-untyped-def]
    watcher, model, optimizer = _watched(dead_endpoint)
    with pytest.raises(HaltError) as caught:
        _step_with_grad(watcher, model, optimizer, math.inf)
    watcher.close()
    assert "non-finite gradient" in caught.value.reason


def test_large_params_no_halt(dead_endpoint) -> None:  # type: ignore[no-untyped-def]
    watcher, model, optimizer = _watched(dead_endpoint)
    with torch.no_grad():
        model.bias.fill_(LARGE)
    for _ in range(2):
        _step_with_grad(watcher, model, optimizer, 1.0)
    watcher.close()
    assert not watcher.halted


def _rank_main(rank: int, init_file: str, out_dir: str, endpoint: str) -> None:
    """Rank 1 has an overflowing but finite gradient at step 0 and an inf one at step 1."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    watcher, model, optimizer = _watched(endpoint)
    outcome = "finished"
    try:
        for step in range(3):
            value = {0: LARGE, 1: math.inf}.get(step, 1.0) if rank == 1 else 1.0
            _step_with_grad(watcher, model, optimizer, value)
    except HaltError as error:
        outcome = f"halt at {error.step}"
    watcher.close()
    pathlib.Path(out_dir, f"rank{rank}.txt").write_text(outcome)
    dist.barrier()
    # Skips interpreter teardown, where gloo's threads sometimes abort ("terminate called").
    os._exit(0)


def test_two_ranks_recheck_in_step(tmp_path: pathlib.Path) -> None:
    endpoint = f"127.0.0.1:{free_port()}"
    mp.spawn(_rank_main, args=(str(tmp_path / "init"), str(tmp_path), endpoint), nprocs=2, join=True)
    outcomes = [(tmp_path / f"rank{rank}.txt").read_text() for rank in range(2)]
    assert outcomes == ["halt at 1", "halt at 1"]
