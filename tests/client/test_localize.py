"""Localization of a halting step: the replay names the module, parameter and operation where NaN/Inf began."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from localize_models import (
    DeepNet, DistanceLoss, FlakyNet, ProbabilityNLL, SqrtNet, exploding_net,
)
from nanwatch import HaltError, Watcher
from nanwatch.v1 import nanwatch_pb2 as pb

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seeded() -> None:
    """Seed the weights of every model built in a test: some failures need a finite first step."""
    torch.manual_seed(0)


def _batch(rows: int = 8, width: int = 16, classes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(rows, width, generator=generator), torch.randint(0, classes, (rows,), generator=generator)


def _halt(model: nn.Module, loss_fn: nn.Module, x: torch.Tensor, y: torch.Tensor, endpoint: str,
          steps: int = 3, micro_batches: int = 1) -> HaltError:
    """Train until the Watcher halts; return the HaltError."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with Watcher(model, optimizer, loss_fn=loss_fn, endpoint=endpoint, flush_timeout_s=0.2) as watcher:
        with pytest.raises(HaltError) as caught:
            for _ in range(steps):
                optimizer.zero_grad()
                for index in range(micro_batches):
                    rows = x if index == micro_batches - 1 else x.nan_to_num()
                    loss_fn(model(rows), y).backward()
                optimizer.step()
        assert watcher.halted
    return caught.value


def _location(error: HaltError) -> pb.Location:
    assert error.finding is not None
    assert error.finding.evidence.HasField("location")
    return error.finding.evidence.location


def test_forward_log_deep_inside_model(dead_endpoint: str) -> None:
    x, y = _batch()
    location = _location(_halt(DeepNet(log_at=2), nn.CrossEntropyLoss(), x, y, dead_endpoint))
    assert location.phase == pb.LOCATION_PHASE_FORWARD
    assert location.module == "blocks.2.features"
    assert location.module_type == "LogFeatures"
    assert location.op == "torch.log"
    assert "return torch.log(x)" in location.code
    assert location.source.endswith("localize_models.py:13")
    assert location.produced == "-inf"
    assert location.reproduced


def test_forward_log_names_no_parameter(dead_endpoint: str) -> None:
    x, y = _batch()
    location = _location(_halt(DeepNet(log_at=2), nn.CrossEntropyLoss(), x, y, dead_endpoint))
    # LogFeatures owns no parameter, and every gradient after a forward NaN is NaN.
    assert location.parameter == ""


def test_exploding_layer_names_its_parameter(dead_endpoint: str) -> None:
    x, y = _batch()
    location = _location(_halt(exploding_net(), nn.CrossEntropyLoss(), x, y, dead_endpoint))
    assert location.parameter.startswith("blocks.1.fc.")


def test_backward_only_nan(dead_endpoint: str) -> None:
    x, y = _batch()
    location = _location(_halt(SqrtNet(), nn.CrossEntropyLoss(), x, y, dead_endpoint))
    assert location.phase == pb.LOCATION_PHASE_BACKWARD
    assert location.op == "SqrtBackward0"
    assert location.module == "length"
    assert ".sqrt()" in location.code
    assert location.parameter == "fc.bias"


def test_layer_exploding_from_finite_inputs(dead_endpoint: str) -> None:
    x, y = _batch()
    location = _location(_halt(exploding_net(), nn.CrossEntropyLoss(), x, y, dead_endpoint))
    assert location.phase == pb.LOCATION_PHASE_FORWARD
    assert location.module == "blocks.1.fc"
    assert location.module_type == "Linear"
    assert location.op == "torch.nn.functional.linear"
    assert "inf" in location.produced


def test_nan_through_the_input(dead_endpoint: str) -> None:
    x, y = _batch()
    x[3, 5] = float("nan")
    location = _location(_halt(DeepNet(), nn.CrossEntropyLoss(), x, y, dead_endpoint))
    assert location.phase == pb.LOCATION_PHASE_INPUT
    assert location.tensor == "args[0]"
    assert location.module == "blocks.0.fc"


def test_nan_born_in_loss_outside_model(dead_endpoint: str) -> None:
    x, y = _batch()
    location = _location(_halt(DeepNet(), ProbabilityNLL(), x, y, dead_endpoint))
    assert location.phase == pb.LOCATION_PHASE_LOSS_FORWARD
    assert location.op == "torch.log"
    assert "torch.log(probabilities" in location.code
    assert location.module == ""


def test_nan_born_in_loss_backward(dead_endpoint: str) -> None:
    x, _ = _batch()
    model = DeepNet(classes=16)
    with torch.no_grad():
        targets = model(x).detach().clone()
    location = _location(_halt(model, DistanceLoss(), x, targets, dead_endpoint))
    assert location.phase == pb.LOCATION_PHASE_LOSS_BACKWARD
    assert location.op == "SqrtBackward0"
    assert ".sqrt()" in location.code


@pytest.mark.parametrize(("observed", "phase"), [(False, pb.LOCATION_PHASE_LOSS_BACKWARD),
                                                  (True, pb.LOCATION_PHASE_LOSS_FORWARD)])
def test_nan_made_after_loss_module(dead_endpoint: str, observed: bool, phase: int) -> None:
    x, y = _batch()
    model, criterion = DeepNet(), nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with Watcher(model, optimizer, loss_fn=criterion, endpoint=dead_endpoint, flush_timeout_s=0.2) as watcher:
        with pytest.raises(HaltError) as caught:
            loss = criterion(model(x), y) * float("nan")  # code after the loss module
            if observed:
                watcher.observe_loss(loss)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    location = _location(caught.value)
    assert location.after_loss == "CrossEntropyLoss"
    assert location.phase == phase
    assert "code after CrossEntropyLoss" in location.detail


def test_replay_that_stays_finite(dead_endpoint: str) -> None:
    x, y = _batch()
    location = _location(_halt(FlakyNet(), nn.CrossEntropyLoss(), x, y, dead_endpoint))
    assert location.phase == pb.LOCATION_PHASE_NOT_REPRODUCED
    assert not location.reproduced


def test_bad_micro_batch_among_several(dead_endpoint: str) -> None:
    x, y = _batch()
    x[0, 0] = float("inf")
    location = _location(_halt(DeepNet(), nn.CrossEntropyLoss(), x, y, dead_endpoint, micro_batches=3))
    assert location.phase == pb.LOCATION_PHASE_INPUT


def test_reason_names_location(dead_endpoint: str) -> None:
    x, y = _batch()
    error = _halt(DeepNet(log_at=1), nn.CrossEntropyLoss(), x, y, dead_endpoint)
    assert "blocks.1.features" in error.reason
    assert "torch.log" in error.reason


def _train_steps(model: nn.Module, watcher_factory: Callable[[nn.Module, torch.optim.Optimizer], Watcher],
                 steps: int) -> Watcher:
    x, y = _batch()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    watcher = watcher_factory(model, optimizer)
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return watcher


def test_capture_cleared_after_each_update(dead_endpoint: str) -> None:
    watcher = _train_steps(DeepNet(), lambda m, o: Watcher(m, o, endpoint=dead_endpoint, flush_timeout_s=0.2), 3)
    try:
        assert len(watcher._capture.calls) == 0
    finally:
        watcher.close()


def test_localize_false_installs_no_capture(dead_endpoint: str) -> None:
    watcher = _train_steps(
        DeepNet(), lambda m, o: Watcher(m, o, endpoint=dead_endpoint, flush_timeout_s=0.2, localize=False), 1)
    try:
        assert watcher._capture is None
    finally:
        watcher.close()


class _Dropped(nn.Module):
    """Dropout then BatchNorm then a log: the replay must consume RNG and update running statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.5)
        self.norm = nn.BatchNorm1d(16)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.log(torch.relu(self.norm(self.drop(x)))))


def test_replay_restores_rng_and_buffers(dead_endpoint: str) -> None:
    x, y = _batch()
    model = _Dropped()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with Watcher(model, optimizer, endpoint=dead_endpoint, flush_timeout_s=0.2) as watcher:
        nn.functional.cross_entropy(model(x), y).backward()
        rng_before = torch.get_rng_state()
        mean_before = model.norm.running_mean.clone()
        with pytest.raises(HaltError):
            optimizer.step()
        assert watcher.halted
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert torch.equal(model.norm.running_mean, mean_before)
    assert model.norm.num_batches_tracked.item() == 1


def test_watched_step_one_host_sync(dead_endpoint: str) -> None:
    from benchmarks.host_syncs import count_host_syncs

    x, y = _batch()
    model = DeepNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    criterion = nn.CrossEntropyLoss()

    def step() -> None:
        optimizer.zero_grad()
        criterion(model(x), y).backward()
        optimizer.step()

    counts = []
    with Watcher(model, optimizer, loss_fn=criterion, endpoint=dead_endpoint, flush_timeout_s=0.2):
        step()  # the first step also sends the forward trace
        for _ in range(12):
            with count_host_syncs() as counted:
                step()
            counts.append(sum(counted.values()))
    assert max(counts) == 1


def test_detail_without_user_line(dead_endpoint: str) -> None:
    x, y = _batch()
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    with torch.no_grad():
        model[2].weight.mul_(1e38)
    location = _location(_halt(model, nn.CrossEntropyLoss(), x, y, dead_endpoint))
    assert location.source == ""
    assert location.module == "2"
    assert "  " not in location.detail
    assert " at " not in location.detail
