"""Watcher halts on local checks, with no service reachable."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import batch
from nanwatch import HaltError, Watcher


def make_watcher(net: torch.nn.Module, endpoint: str, loss_fn: object = None, **kwargs: object) -> tuple[Watcher, torch.optim.Optimizer]:
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    watcher = Watcher(net, optimizer, loss_fn, endpoint=endpoint, run_id="test-run", flush_timeout_s=0.2, **kwargs)
    return watcher, optimizer


def train_step(net, optimizer, watcher, x, y, criterion=torch.nn.MSELoss()) -> None:  # type: ignore[no-untyped-def]
    watcher.check_batch(inputs=x, targets=y)
    loss = criterion(net(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def test_training_without_service_finishes(net, dead_endpoint) -> None:  # type: ignore[no-untyped-def]
    criterion = torch.nn.MSELoss()
    watcher, optimizer = make_watcher(net, dead_endpoint, criterion)
    with watcher:
        for _ in range(5):
            train_step(net, optimizer, watcher, *batch(), criterion=criterion)
    assert watcher.step == 5
    assert not watcher.halted
    assert not watcher.connected


def test_nan_loss_halts_before_update(net, dead_endpoint) -> None:  # type: ignore[no-untyped-def]
    watcher, optimizer = make_watcher(net, dead_endpoint)
    train_step(net, optimizer, watcher, *batch())
    before = copy.deepcopy(net.state_dict())

    x, y = batch()
    loss = torch.nn.functional.mse_loss(net(x), y) * float("nan")
    watcher.observe_loss(loss)
    optimizer.zero_grad()
    loss.backward()
    with pytest.raises(HaltError) as caught:
        optimizer.step()
    watcher.close()

    assert caught.value.step == 1
    assert "non-finite loss" in caught.value.reason
    assert caught.value.source == "local"
    for name, value in net.state_dict().items():
        assert torch.equal(value, before[name]), name
        assert torch.isfinite(value).all(), name


def test_nan_gradient_with_finite_loss_halts(net, dead_endpoint) -> None:  # type: ignore[no-untyped-def]
    watcher, optimizer = make_watcher(net, dead_endpoint)
    x, y = batch()
    # sqrt at 0 is finite in the forward pass, but its derivative is inf, and inf * 0 is NaN.
    loss = torch.nn.functional.mse_loss(net(x), y) + torch.sqrt(net(x) * 0).sum()
    watcher.observe_loss(loss)
    optimizer.zero_grad()
    loss.backward()
    with pytest.raises(HaltError) as caught:
        optimizer.step()
    watcher.close()

    assert torch.isfinite(loss)
    assert "non-finite gradient" in caught.value.reason
    assert "non-finite loss" not in caught.value.reason


def test_data_nan_halts_at_that_step(net, dead_endpoint) -> None:  # type: ignore[no-untyped-def]
    watcher, optimizer = make_watcher(net, dead_endpoint, torch.nn.MSELoss())
    for _ in range(2):
        train_step(net, optimizer, watcher, *batch())
    with pytest.raises(HaltError) as caught:
        train_step(net, optimizer, watcher, *batch(nan_at=(5, 2)))
    watcher.close()

    assert caught.value.step == 2
    assert "non-finite batch data" in caught.value.reason
    assert "samples [5]" in caught.value.reason
    assert caught.value.finding.evidence.tensor == "inputs"


def test_halt_repeats_on_later_steps(net, dead_endpoint) -> None:  # type: ignore[no-untyped-def]
    watcher, optimizer = make_watcher(net, dead_endpoint, torch.nn.MSELoss())
    with pytest.raises(HaltError):
        train_step(net, optimizer, watcher, *batch(nan_at=(0, 0)))
    with pytest.raises(HaltError) as again:
        train_step(net, optimizer, watcher, *batch())
    watcher.close()

    assert watcher.halted
    assert again.value.step == 0


def test_nonfinite_parameters_after_update_halt(dead_endpoint) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2).half()
    # In float16 eps=1e-8 rounds to 0, so a parameter with zero gradient gets 0/0 = NaN from Adam.
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, eps=1e-8)
    watcher = Watcher(model, optimizer, endpoint=dead_endpoint, run_id="test-run", flush_timeout_s=0.2)
    for step in range(2):
        loss = model(torch.randn(3, 4).half()).float().pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        model.bias.grad.zero_()
        if step == 0:
            optimizer.step()
            continue
        with pytest.raises(HaltError) as caught:
            optimizer.step()
    watcher.close()

    assert caught.value.step == 1
    assert "non-finite parameters" in caught.value.reason


def test_check_batch_rejects_non_tensor(net, dead_endpoint) -> None:  # type: ignore[no-untyped-def]
    watcher, _ = make_watcher(net, dead_endpoint)
    with pytest.raises(TypeError, match="inputs"):
        watcher.check_batch(inputs=[1.0, 2.0])
    watcher.close()


@pytest.mark.parametrize("run_id", ["", "has space", "x" * 129])
def test_invalid_run_id_rejected(net, dead_endpoint, run_id) -> None:  # type: ignore[no-untyped-def]
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="run_id"):
        Watcher(net, optimizer, run_id=run_id, endpoint=dead_endpoint)


@pytest.mark.parametrize("delay_s", [-0.1, 61.0, float("nan")])
def test_invalid_report_delay_rejected(net, dead_endpoint, delay_s) -> None:  # type: ignore[no-untyped-def]
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="max_report_delay_s"):
        Watcher(net, optimizer, endpoint=dead_endpoint, max_report_delay_s=delay_s)


def test_loss_module_hook_removed_on_close(net, dead_endpoint) -> None:  # type: ignore[no-untyped-def]
    criterion = torch.nn.MSELoss()
    watcher, optimizer = make_watcher(net, dead_endpoint, criterion)
    watcher.close()
    x, y = batch()
    loss = criterion(net(x), y) * float("nan")
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    assert not watcher.halted


HALT_SCRIPT = textwrap.dedent("""
    import torch
    from nanwatch import Watcher
    torch.set_num_threads(1)
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    watcher = Watcher(model, optimizer, endpoint="{endpoint}", run_id="exit-test", flush_timeout_s=0.1)
    loss = model(torch.ones(1, 2)).sum() * float("nan")
    watcher.observe_loss(loss)
    loss.backward()
    optimizer.step()
""")


@pytest.mark.parametrize(("env_code", "expected"), [(None, 42), ("7", 7)])
def test_uncaught_halt_exit_code(dead_endpoint, env_code, expected) -> None:  # type: ignore[no-untyped-def]
    env = {key: value for key, value in os.environ.items() if key != "NANWATCH_HALT_EXIT_CODE"}
    if env_code is not None:
        env["NANWATCH_HALT_EXIT_CODE"] = env_code
    script = HALT_SCRIPT.format(endpoint=dead_endpoint)
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == expected, result.stderr
