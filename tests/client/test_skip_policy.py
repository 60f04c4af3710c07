"""The skip policy: non-finite updates skipped on every rank up to N in a row, then a halt."""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys
import time

import grpc
import pytest
import torch

from conftest import free_port
from nanwatch import HaltError, Watcher
from nanwatch.client.skip_policy import resolve_max_consecutive_skips
from nanwatch.v1 import nanwatch_pb2 as pb
from nanwatch.v1 import nanwatch_pb2_grpc as pb_grpc

WORKER = pathlib.Path(__file__).with_name("skip_worker.py")
JOB_TIMEOUT_S = 120


def _train(watcher: Watcher, model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int,
           bad_steps: set[int], nan_input: bool = False) -> list[torch.Tensor]:
    """Train steps steps; return a copy of the weights after each step."""
    weights = []
    for step in range(steps):
        x, y = torch.randn(8, 4), torch.randn(8, 1)
        if nan_input and step in bad_steps:
            x[0, 0] = float("nan")
            watcher.check_batch(inputs=x)
        loss = torch.nn.functional.mse_loss(model(torch.nan_to_num(x)), y)
        if not nan_input and step in bad_steps:
            loss = loss * float("nan")
        watcher.observe_loss(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        weights.append(model.weight.detach().clone())
    return weights


def _watched(dead_endpoint: str, max_skips: int) -> tuple[torch.nn.Module, torch.optim.Optimizer, Watcher]:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    return model, optimizer, Watcher(model, optimizer, endpoint=dead_endpoint, flush_timeout_s=0.2,
                                     max_consecutive_skips=max_skips)


def test_skip_within_limit_trains_on(dead_endpoint: str) -> None:
    model, optimizer, watcher = _watched(dead_endpoint, 2)
    with watcher:
        weights = _train(watcher, model, optimizer, 8, {3, 4})
    assert watcher.skipped_updates == 2
    assert watcher.step == 8
    assert not watcher.halted
    assert bool(torch.isfinite(model.weight).all())
    assert torch.equal(weights[3], weights[2])
    assert torch.equal(weights[4], weights[2])
    assert not torch.equal(weights[5], weights[4])


def test_skip_keeps_optimizer_state(dead_endpoint: str) -> None:
    model, optimizer, watcher = _watched(dead_endpoint, 1)
    with watcher:
        _train(watcher, model, optimizer, 3, set())
        before = optimizer.state[model.weight]["exp_avg"].clone()
        _train(watcher, model, optimizer, 1, {0})
    assert torch.equal(optimizer.state[model.weight]["exp_avg"], before)


def test_skip_limit_reached_halts(dead_endpoint: str) -> None:
    model, optimizer, watcher = _watched(dead_endpoint, 2)
    with watcher, pytest.raises(HaltError) as caught:
        _train(watcher, model, optimizer, 8, {2, 3, 4})
    assert caught.value.step == 4
    assert "after 2 skipped updates in a row" in caught.value.reason
    assert bool(torch.isfinite(model.weight).all())


def test_count_resets_after_healthy_step(dead_endpoint: str) -> None:
    model, optimizer, watcher = _watched(dead_endpoint, 1)
    with watcher:
        _train(watcher, model, optimizer, 6, {1, 3, 5})
    assert watcher.skipped_updates == 3
    assert not watcher.halted


def test_bad_data_never_skipped(dead_endpoint: str) -> None:
    model, optimizer, watcher = _watched(dead_endpoint, 5)
    with watcher, pytest.raises(HaltError) as caught:
        _train(watcher, model, optimizer, 4, {1}, nan_input=True)
    assert caught.value.step == 1
    assert watcher.skipped_updates == 0


def test_default_is_no_skip(dead_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NANWATCH_MAX_CONSECUTIVE_SKIPS", raising=False)
    model, optimizer, watcher = _watched(dead_endpoint, None)  # type: ignore[arg-type]
    with watcher, pytest.raises(HaltError) as caught:
        _train(watcher, model, optimizer, 3, {1})
    assert caught.value.step == 1


def test_limit_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NANWATCH_MAX_CONSECUTIVE_SKIPS", "3")
    assert resolve_max_consecutive_skips(None) == 3


@pytest.mark.parametrize("value", [-1, 1.5, True, "2"])
def test_invalid_limit_rejected(value: object) -> None:
    with pytest.raises(ValueError, match="max_consecutive_skips"):
        resolve_max_consecutive_skips(value)  # type: ignore[arg-type]


def test_invalid_environment_limit_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NANWATCH_MAX_CONSECUTIVE_SKIPS", "many")
    with pytest.raises(ValueError, match="NANWATCH_MAX_CONSECUTIVE_SKIPS"):
        resolve_max_consecutive_skips(None)


def _torchrun(tmp_path: pathlib.Path, endpoint: str, run_id: str, bad_steps: str,
              max_skips: int) -> tuple[subprocess.CompletedProcess[str], list[dict[str, object]]]:
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
               str(WORKER), str(tmp_path), endpoint, run_id, "1", bad_steps, str(max_skips)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    outcomes = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    return result, outcomes


def _metric(service: object, name: str, run_id: str) -> float:
    import urllib.request

    with urllib.request.urlopen(service.metrics_url, timeout=10) as page:  # type: ignore[attr-defined]
        for line in page.read().decode().splitlines():
            if line.startswith(name) and f'run_id="{run_id}"' in line:
                return float(line.rsplit(" ", 1)[1])
    return math.nan


def test_torchrun_ranks_skip_together(tmp_path: pathlib.Path, service: object) -> None:
    result, outcomes = _torchrun(tmp_path, service.endpoint, "skip-run", "3,4", 2)  # type: ignore[attr-defined]

    assert result.returncode == 0, result.stderr[-3000:]
    assert [outcome["halt_step"] for outcome in outcomes] == [None, None]
    assert [outcome["skipped"] for outcome in outcomes] == [2, 2]
    assert [outcome["steps"] for outcome in outcomes] == [8, 8]
    assert outcomes[0]["weights"] == outcomes[1]["weights"]
    assert all(math.isfinite(value) for value in outcomes[0]["weights"])
    deadline = time.monotonic() + 20
    while _metric(service, "nanwatch_skipped_updates_total", "skip-run") != 4.0 and time.monotonic() < deadline:
        time.sleep(0.2)
    with grpc.insecure_channel(service.endpoint) as channel:  # type: ignore[attr-defined]
        status = pb_grpc.NanwatchStub(channel).GetRunStatus(pb.GetRunStatusRequest(run_id="skip-run"))
    assert not status.summary.halted
    at_bad_steps = [finding for finding in status.findings if finding.evidence.step in (3, 4)]
    assert at_bad_steps
    assert all(finding.severity != pb.SEVERITY_CRITICAL for finding in at_bad_steps)
    assert _metric(service, "nanwatch_skipped_updates_total", "skip-run") == 4.0


def test_torchrun_ranks_halt_after_limit(tmp_path: pathlib.Path, service: object) -> None:
    result, outcomes = _torchrun(tmp_path, service.endpoint, "skip-halt", "2,3,4", 2)  # type: ignore[attr-defined]

    assert [outcome["halt_step"] for outcome in outcomes] == [4, 4]
    assert [outcome["skipped"] for outcome in outcomes] == [2, 2]
    assert outcomes[0]["weights"] == outcomes[1]["weights"]
    with grpc.insecure_channel(service.endpoint) as channel:  # type: ignore[attr-defined]
        status = pb_grpc.NanwatchStub(channel).GetRunStatus(pb.GetRunStatusRequest(run_id="skip-halt"))
    assert status.summary.halted
    assert status.summary.halt_step == 4
    assert "after 2 skipped updates in a row" in status.halt_reason
