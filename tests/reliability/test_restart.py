"""Service crashes and outages: a real `nanwatch serve` killed with SIGKILL and started again on the same store."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nanwatch import HaltError, Watcher
from nanwatch.client.sender import ReportSender
from nanwatch.v1 import nanwatch_pb2 as pb
from nanwatch.v1 import nanwatch_pb2_grpc as pb_grpc
from tests.service.helpers import DEADLINE_S, registration, report

torch.set_num_threads(1)
NANWATCH = [sys.executable, "-m", "nanwatch.cli.main"]
WAIT_S = 30.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_until(predicate: Callable[[], bool], timeout_s: float = WAIT_S) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


class ServeProcess:
    """`nanwatch serve` in a subprocess, on fixed ports and one store, that can be killed and started again."""

    def __init__(self, db_path: Path) -> None:
        self.db_path = db_path
        self.grpc_port = _free_port()
        self.metrics_port = _free_port()
        self.endpoint = f"127.0.0.1:{self.grpc_port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [*NANWATCH, "serve", "--grpc-port", str(self.grpc_port), "--metrics-port", str(self.metrics_port),
             "--db", str(self.db_path), "--grace-seconds", "1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        assert _wait_until(self._serving), f"nanwatch serve on {self.endpoint} never became SERVING"

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=WAIT_S)

    def reports_received(self) -> int:
        """Return nanwatch_reports_total of the running process (it starts at 0 with each process)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=DEADLINE_S) as page:
            text = page.read().decode()
        match = re.search(r"^nanwatch_reports_total (\S+)$", text, re.MULTILINE)
        return int(float(match.group(1))) if match else 0

    def _serving(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"nanwatch serve exited with {self.process.returncode}")
        with grpc.insecure_channel(self.endpoint) as channel:
            try:
                response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
            except grpc.RpcError:
                return False
        return response.status == health_pb2.HealthCheckResponse.SERVING

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=WAIT_S)


@pytest.fixture
def serve_process(tmp_path: Path) -> Iterator[ServeProcess]:
    process = ServeProcess(tmp_path / "restart.db")
    process.start()
    yield process
    process.stop()


def _sender(endpoint: str, run_id: str, rank: int = 0, world_size: int = 1, *,
            client_id: str | None = None) -> ReportSender:
    request = registration(run_id, rank, world_size, client_id=client_id)
    sender = ReportSender(endpoint=endpoint, register_request=request, max_queued_reports=1024)
    sender.start()
    return sender


def test_buffered_reports_arrive_after_sigkill(serve_process: ServeProcess) -> None:
    sender = _sender(serve_process.endpoint, "restart-run")
    assert _wait_until(lambda: sender.connected)
    for step in range(10):
        sender.enqueue(report(step))
    assert _wait_until(lambda: serve_process.reports_received() == 10)
    received_before = serve_process.reports_received()

    serve_process.kill()
    assert _wait_until(lambda: not sender.connected)
    for step in range(10, 30):
        sender.enqueue(report(step))
    serve_process.start()
    reconnected = _wait_until(lambda: sender.connected)
    arrived = _wait_until(lambda: serve_process.reports_received() == 20)
    received_after = serve_process.reports_received()
    sender.close(1.0)

    assert reconnected
    assert arrived
    assert received_before + received_after == 30
    assert sender.dropped_reports == 0


def test_halt_survives_sigkill(serve_process: ServeProcess) -> None:
    senders = [_sender(serve_process.endpoint, "halted-run", rank, 2) for rank in (0, 1)]
    assert _wait_until(lambda: all(sender.connected for sender in senders))
    with grpc.insecure_channel(serve_process.endpoint) as channel:
        halt = pb_grpc.NanwatchStub(channel).HaltRun(
            pb.HaltRunRequest(run_id="halted-run", reason="before the crash"), timeout=DEADLINE_S).halt
    assert _wait_until(lambda: all(sender.halt_signal is not None for sender in senders))

    serve_process.kill()
    serve_process.start()
    # Rank 0 reconnects with its old client id; rank 1 comes back as a new process.
    senders[1].close(0.0)
    restarted = _sender(serve_process.endpoint, "halted-run", 1, 2, client_id="client-1-restarted")
    got_halt = _wait_until(lambda: restarted.halt_signal is not None)
    reconnected = _wait_until(lambda: senders[0].connected)
    with grpc.insecure_channel(serve_process.endpoint) as channel:
        status = pb_grpc.NanwatchStub(channel).GetRunStatus(
            pb.GetRunStatusRequest(run_id="halted-run"), timeout=DEADLINE_S)
    restarted.close(0.0)
    senders[0].close(0.0)

    assert got_halt
    assert restarted.halt_signal.halt_step == halt.halt_step  # type: ignore[union-attr]
    assert "before the crash" in restarted.halt_signal.reason  # type: ignore[union-attr]
    assert reconnected
    assert status.summary.halted
    assert status.summary.halt_step == halt.halt_step


def test_reconnected_stream_receives_halt(serve_process: ServeProcess) -> None:
    sender = _sender(serve_process.endpoint, "late-halt-run")
    assert _wait_until(lambda: sender.connected)
    serve_process.kill()
    serve_process.start()
    assert _wait_until(lambda: sender.connected)
    with grpc.insecure_channel(serve_process.endpoint) as channel:
        pb_grpc.NanwatchStub(channel).HaltRun(
            pb.HaltRunRequest(run_id="late-halt-run", reason="after the restart"), timeout=DEADLINE_S)
    got_halt = _wait_until(lambda: sender.halt_signal is not None)
    sender.close(0.0)
    assert got_halt


# ---- fail open and fail closed, with a Watcher ----

class TinyNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def _train_step(watcher: Watcher, net: TinyNet, optimizer: torch.optim.Optimizer) -> None:
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    watcher.check_batch(inputs=x, targets=y)
    loss = torch.nn.functional.mse_loss(net(x), y)
    watcher.observe_loss(loss)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def _train_until_halt(watcher: Watcher, net: TinyNet, optimizer: torch.optim.Optimizer,
                      timeout_s: float) -> HaltError | None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            _train_step(watcher, net, optimizer)
        except HaltError as error:
            return error
        time.sleep(0.05)
    return None


def test_fail_open_trains_through_outage(serve_process: ServeProcess) -> None:
    net = TinyNet()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    watcher = Watcher(net, optimizer, endpoint=serve_process.endpoint, run_id="fail-open", flush_timeout_s=0.2)
    assert _wait_until(lambda: watcher.connected)
    serve_process.kill()
    halt = _train_until_halt(watcher, net, optimizer, timeout_s=2.0)
    steps = watcher.step
    watcher.close()
    assert halt is None
    assert steps > 0


def test_fail_closed_halts_after_outage(serve_process: ServeProcess) -> None:
    net = TinyNet()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    watcher = Watcher(net, optimizer, endpoint=serve_process.endpoint, run_id="fail-closed", flush_timeout_s=0.2,
                      fail_closed_after_s=1.0)
    assert _wait_until(lambda: watcher.connected)
    for _ in range(3):
        _train_step(watcher, net, optimizer)
    serve_process.kill()
    halt = _train_until_halt(watcher, net, optimizer, timeout_s=WAIT_S)
    watcher.close()
    assert halt is not None
    assert "unreachable" in halt.reason
    assert halt.step >= 3


def test_fail_closed_never_connected_halts(tmp_path: Path) -> None:
    net = TinyNet()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    dead_endpoint = f"127.0.0.1:{_free_port()}"
    watcher = Watcher(net, optimizer, endpoint=dead_endpoint, run_id="fail-closed-dead", flush_timeout_s=0.0,
                      fail_closed_after_s=0.5)
    halt = _train_until_halt(watcher, net, optimizer, timeout_s=WAIT_S)
    watcher.close()
    assert halt is not None
    assert "fail_closed_after_s=0.5" in halt.reason


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan")])
def test_fail_closed_invalid_rejected(value: float) -> None:
    net = TinyNet()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    with pytest.raises(ValueError, match="fail_closed_after_s"):
        Watcher(net, optimizer, endpoint="127.0.0.1:1", run_id="bad-option", fail_closed_after_s=value)
