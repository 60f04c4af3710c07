"""Fixtures for the client tests: small models, loopback endpoints and a minimal nanwatch server."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
import torch

from nanwatch.v1 import nanwatch_pb2 as pb
from nanwatch.v1 import nanwatch_pb2_grpc as pb_grpc

torch.set_num_threads(1)
WAIT_S = 20.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def dead_endpoint() -> str:
    """A loopback port where nothing listens."""
    return f"127.0.0.1:{free_port()}"


@pytest.fixture
def silent_endpoint() -> Iterator[str]:
    """A loopback TCP listener that accepts connections and never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    accepted: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    yield f"127.0.0.1:{listener.getsockname()[1]}"
    listener.close()
    for conn in accepted:
        conn.close()


class TinyServicer(pb_grpc.NanwatchServicer):
    """Records what clients send; sends a HALT on the Watch stream when halt_after_step is reached."""

    def __init__(self) -> None:
        self.registrations: list[pb.RegisterRankRequest] = []
        self.starts: list[pb.WatchStart] = []
        self.reports: list[pb.StepReport] = []
        self.messages_with_reports = 0
        self.batches: list[pb.CheckBatchRequest] = []
        self.halt_after_step: int | None = None
        self.halt_step = 0
        self.register_halt: pb.Signal | None = None
        self.report_seen = threading.Condition()

    def RegisterRank(self, request: pb.RegisterRankRequest, unused_context: grpc.ServicerContext) -> pb.RegisterRankResponse:
        self.registrations.append(request)
        return pb.RegisterRankResponse(halt=self.register_halt)

    def CheckBatch(self, request: pb.CheckBatchRequest, unused_context: grpc.ServicerContext) -> pb.CheckBatchResponse:
        self.batches.append(request)
        with self.report_seen:
            self.report_seen.notify_all()
        return pb.CheckBatchResponse(valid=True)

    def Watch(self, request_iterator, unused_context):  # type: ignore[no-untyped-def]
        for request in request_iterator:
            if request.HasField("start"):
                self.starts.append(request.start)
                continue
            reports = [request.report] if request.HasField("report") else list(request.reports.reports)
            with self.report_seen:
                self.reports += reports
                self.messages_with_reports += 1
                self.report_seen.notify_all()
            if self.halt_after_step is not None and reports[-1].step >= self.halt_after_step:
                self.halt_after_step = None
                yield pb.Signal(kind=pb.SIGNAL_KIND_HALT, run_id="t", halt_step=self.halt_step, reason="operator halt")

    def wait_for(self, predicate) -> bool:  # type: ignore[no-untyped-def]
        with self.report_seen:
            return self.report_seen.wait_for(predicate, WAIT_S)


@pytest.fixture
def tiny_server() -> Iterator[tuple[TinyServicer, str]]:
    """A real gRPC server on 127.0.0.1:0 with TinyServicer."""
    servicer = TinyServicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    pb_grpc.add_NanwatchServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(0)


class TinyNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(4, 8)
        self.act = torch.nn.ReLU()
        self.fc2 = torch.nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


@pytest.fixture
def net() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet()


def batch(nan_at: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    if nan_at is not None:
        x[nan_at] = float("nan")
    return x, y


def wait_until(predicate) -> bool:  # type: ignore[no-untyped-def]
    """Poll predicate every 10 ms for up to WAIT_S; returns its last value."""
    import time

    deadline = time.monotonic() + WAIT_S
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.01)
    return bool(predicate())
