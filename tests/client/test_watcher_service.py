"""Watcher against a minimal real gRPC server, and against endpoints that never respond."""

from __future__ import annotations

import pytest
import torch

from conftest import batch, wait_until
from nanwatch import HaltError, Watcher
from nanwatch.v1 import nanwatch_pb2 as pb


def run_steps(watcher: Watcher, net: torch.nn.Module, optimizer: torch.optim.Optimizer, count: int) -> None:
    criterion = torch.nn.MSELoss()
    for _ in range(count):
        x, y = batch()
        watcher.check_batch(inputs=x, targets=y)
        loss = criterion(net(x), y)
        watcher.observe_loss(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_reports_arrive_with_fields(net, tiny_server) -> None:  # type: ignore[no-untyped-def]
    servicer, endpoint = tiny_server
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    with Watcher(net, optimizer, "mse_loss", endpoint=endpoint, run_id="io-run", clip_max_norm=1.0) as watcher:
        run_steps(watcher, net, optimizer, 3)
    assert servicer.wait_for(lambda: len(servicer.reports) >= 3)

    registration = servicer.registrations[0]
    assert registration.run_id == "io-run"
    assert [p.name for p in registration.parameters] == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    assert registration.parameters[0].fan_in == 4
    assert registration.parameters[0].module_type == "Linear"
    assert registration.optimizer.type == "Adam"
    assert registration.optimizer.hyperparameters["beta2"] == pytest.approx(0.999)
    assert registration.loss_function == "mse_loss"
    assert registration.clipping.enabled
    assert servicer.starts[0].client_id == registration.client_id

    first = servicer.reports[0]
    assert [r.step for r in servicer.reports] == [0, 1, 2]
    assert [(c.name, c.type) for c in first.forward_trace] == [("fc1", "Linear"), ("act", "ReLU"), ("fc2", "Linear")]
    assert not servicer.reports[1].forward_trace
    assert len(first.parameter_grad_norms) == 4
    assert first.grad_norm > 0
    assert first.loss_finite
    assert first.lr == pytest.approx(1e-3)
    assert [s.name for s in first.batch] == ["inputs", "targets"]
    assert list(first.batch[0].shape) == [8, 4]
    assert not first.halted_locally


def test_halt_signal_halts_at_halt_step(net, tiny_server) -> None:  # type: ignore[no-untyped-def]
    servicer, endpoint = tiny_server
    servicer.halt_after_step, servicer.halt_step = 1, 3
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    watcher = Watcher(net, optimizer, endpoint=endpoint, run_id="halt-run", flush_timeout_s=1.0)
    run_steps(watcher, net, optimizer, 2)
    # The test waits for the signal, so that step 2 runs after its arrival, as in a slow training step.
    # private: the signal's arrival is not public API
    assert wait_until(lambda: watcher._sender.halt_signal is not None)
    run_steps(watcher, net, optimizer, 1)
    with pytest.raises(HaltError) as caught:
        run_steps(watcher, net, optimizer, 1)
    watcher.close()

    assert caught.value.step == 3
    assert caught.value.source == "service"
    assert "operator halt" in caught.value.reason


def test_halt_report_reaches_server(net, tiny_server) -> None:  # type: ignore[no-untyped-def]
    servicer, endpoint = tiny_server
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    watcher = Watcher(net, optimizer, endpoint=endpoint, run_id="halt-report", flush_timeout_s=0.5)
    run_steps(watcher, net, optimizer, 1)
    assert servicer.wait_for(lambda: len(servicer.reports) >= 1)
    x, y = batch(nan_at=(3, 0))
    watcher.check_batch(inputs=x)
    with pytest.raises(HaltError):
        run_steps(watcher, net, optimizer, 1)
    watcher.close()

    assert servicer.wait_for(lambda: len(servicer.reports) >= 2)
    last = servicer.reports[-1]
    assert last.halted_locally
    assert last.step == 1
    assert list(last.batch[0].nonfinite_sample_indices) == [3]


def test_fast_steps_share_messages_in_order(net, tiny_server) -> None:  # type: ignore[no-untyped-def]
    servicer, endpoint = tiny_server
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    with Watcher(net, optimizer, endpoint=endpoint, run_id="batched", max_report_delay_s=0.5) as watcher:
        run_steps(watcher, net, optimizer, 20)
    assert servicer.wait_for(lambda: len(servicer.reports) >= 20)
    assert [report.step for report in servicer.reports] == list(range(20))
    assert servicer.messages_with_reports <= 4


def test_halt_report_sent_without_delay(net, tiny_server) -> None:  # type: ignore[no-untyped-def]
    servicer, endpoint = tiny_server
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    # Healthy reports wait up to 60 s; the halt report must not, nor the reports queued before it.
    watcher = Watcher(net, optimizer, endpoint=endpoint, run_id="urgent", max_report_delay_s=60.0,
                      flush_timeout_s=0.5)
    run_steps(watcher, net, optimizer, 3)
    x, _ = batch(nan_at=(0, 1))
    watcher.check_batch(inputs=x)
    with pytest.raises(HaltError):
        run_steps(watcher, net, optimizer, 1)
    assert servicer.wait_for(lambda: len(servicer.reports) >= 4)
    assert [report.step for report in servicer.reports] == [0, 1, 2, 3]
    assert servicer.reports[-1].halted_locally
    watcher.close()


def test_send_batches_sends_bfloat16(net, tiny_server) -> None:  # type: ignore[no-untyped-def]
    servicer, endpoint = tiny_server
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    with Watcher(net, optimizer, endpoint=endpoint, run_id="batch-run", send_batches=True) as watcher:
        watcher.check_batch(tokens=torch.arange(6).reshape(2, 3), weights=torch.ones(2, dtype=torch.bfloat16))
    assert servicer.wait_for(lambda: len(servicer.batches) >= 1)

    tokens, weights = servicer.batches[0].tensors
    assert (tokens.dtype, list(tokens.shape), len(tokens.data)) == ("int64", [2, 3], 48)
    assert (weights.dtype, len(weights.data)) == ("bfloat16", 4)
    assert weights.data == bytes([0x80, 0x3F, 0x80, 0x3F])


def test_silent_listener_does_not_block(net, silent_endpoint) -> None:  # type: ignore[no-untyped-def]
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    watcher = Watcher(net, optimizer, endpoint=silent_endpoint, run_id="silent", flush_timeout_s=0.2)
    run_steps(watcher, net, optimizer, 3)
    with pytest.raises(HaltError):
        x, y = batch(nan_at=(0, 0))
        watcher.check_batch(inputs=x)
        run_steps(watcher, net, optimizer, 1)
    watcher.close()
    assert watcher.step == 3
    assert not watcher.connected


def test_full_buffer_drops_oldest(net, dead_endpoint) -> None:  # type: ignore[no-untyped-def]
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    watcher = Watcher(net, optimizer, endpoint=dead_endpoint, run_id="drops", max_queued_reports=2, flush_timeout_s=0)
    run_steps(watcher, net, optimizer, 5)
    watcher.close()
    assert watcher.dropped_reports == 3


def test_register_halt_due_at_first_step(net, tiny_server) -> None:  # type: ignore[no-untyped-def]
    servicer, endpoint = tiny_server
    servicer.register_halt = pb.Signal(kind=pb.SIGNAL_KIND_HALT, run_id="late-run", halt_step=14, reason="halted")
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    watcher = Watcher(net, optimizer, endpoint=endpoint, run_id="late-run", flush_timeout_s=0.2)
    assert wait_until(lambda: watcher._sender.halt_signal is not None)  # private, as above
    before = [param.detach().clone() for param in net.parameters()]
    with pytest.raises(HaltError) as caught:
        run_steps(watcher, net, optimizer, 3)
    watcher.close()
    assert caught.value.step == 0
    assert all(torch.equal(old, new) for old, new in zip(before, net.parameters()))


def test_register_halt_is_stored(net, tiny_server) -> None:  # type: ignore[no-untyped-def]
    servicer, endpoint = tiny_server
    servicer.register_halt = pb.Signal(kind=pb.SIGNAL_KIND_HALT, run_id="halted-run", halt_step=0, reason="halted earlier")
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    watcher = Watcher(net, optimizer, endpoint=endpoint, run_id="halted-run", flush_timeout_s=0.2)
    assert wait_until(lambda: watcher._sender.halt_signal is not None)  # private, as above
    with pytest.raises(HaltError) as caught:
        run_steps(watcher, net, optimizer, 1)
    watcher.close()
    assert caught.value.source == "service"
    assert caught.value.step == 0
