"""Builders of API messages and a Watch stream driver for service tests (no torch)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import numpy as np

from nanwatch.v1 import nanwatch_pb2 as pb
from nanwatch.v1 import nanwatch_pb2_grpc as pb_grpc

DEADLINE_S = 10.0


class FakeClock:
    """A clock for time-based limits that moves only when a test sets now."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def healthy_parameters() -> list[pb.ParameterInfo]:
    """Parameter facts of nn.Linear(64, 32) -> nn.Linear(32, 10) with PyTorch's default init."""
    rng = np.random.default_rng(0)
    infos = []
    for name, shape in (("0.weight", (32, 64)), ("0.bias", (32,)), ("2.weight", (10, 32)), ("2.bias", (10,))):
        fan_in = shape[1] if len(shape) > 1 else 64 if name == "0.bias" else 32
        bound = 1.0 / np.sqrt(fan_in)
        values = rng.uniform(-bound, bound, size=shape)
        infos.append(
            pb.ParameterInfo(
                name=name, shape=list(shape), dtype="float32", numel=values.size, mean=float(values.mean()),
                std=float(values.std()), min=float(values.min()), max=float(values.max()), nonfinite_count=0,
                fan_in=shape[1] if len(shape) > 1 else 0, module_type="Linear",
            )
        )
    return infos


def registration(run_id: str, rank: int = 0, world_size: int = 1, *, lr: float = 0.1,
                 optimizer: str = "SGD", client_id: str | None = None) -> pb.RegisterRankRequest:
    return pb.RegisterRankRequest(
        run_id=run_id, rank=rank, world_size=world_size, host="localhost", pid=1000 + rank,
        client_id=client_id or f"client-{rank}", parameters=healthy_parameters(),
        forward_trace=[pb.ModuleCall(name="0", type="Linear"), pb.ModuleCall(name="1", type="ReLU"),
                       pb.ModuleCall(name="2", type="Linear")],
        loss_function="CrossEntropyLoss",
        optimizer=pb.OptimizerInfo(type=optimizer, lr=lr, hyperparameters={"momentum": 0.0, "weight_decay": 0.0}),
        amp=pb.AmpInfo(enabled=False), clipping=pb.ClippingInfo(enabled=False),
    )


def report(step: int, *, loss: float = 1.0, grad_norm: float = 0.5, nonfinite_grads: int = 0) -> pb.StepReport:
    finite = bool(np.isfinite(loss))
    return pb.StepReport(
        step=step, loss=loss, loss_finite=finite, grad_norm=grad_norm,
        parameter_grad_norms=[pb.ParameterGradNorm(name="0.weight", grad_norm=grad_norm)],
        nonfinite_grad_count=nonfinite_grads, param_norm=3.0, update_norm=float("nan"), lr=0.1,
    )


def tensor(name: str, array: np.ndarray) -> pb.Tensor:
    array = np.ascontiguousarray(array)
    return pb.Tensor(name=name, dtype=str(array.dtype), shape=list(array.shape), data=array.tobytes())


class WatchStream:
    """One rank's Watch stream: send reports with ``send``, read signals from ``signals``."""

    def __init__(self, stub: pb_grpc.NanwatchStub, run_id: str, rank: int, client_id: str | None = None) -> None:
        self._outgoing: queue.Queue[pb.WatchRequest | None] = queue.Queue()
        self._outgoing.put(pb.WatchRequest(start=pb.WatchStart(run_id=run_id, rank=rank,
                                                               client_id=client_id or f"client-{rank}")))
        self.signals: queue.Queue[pb.Signal] = queue.Queue()
        self.error: Exception | None = None
        self._call = stub.Watch(self._requests())
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _requests(self) -> Iterator[pb.WatchRequest]:
        while True:
            message = self._outgoing.get()
            if message is None:
                return
            yield message

    def _read(self) -> None:
        try:
            for signal in self._call:
                self.signals.put(signal)
        except Exception as error:  # the test inspects it
            self.error = error

    def send(self, step_report: pb.StepReport) -> None:
        self._outgoing.put(pb.WatchRequest(report=step_report))

    def send_batch(self, step_reports: list[pb.StepReport]) -> None:
        self._outgoing.put(pb.WatchRequest(reports=pb.ReportBatch(reports=step_reports)))

    def next_signal(self, timeout_s: float = DEADLINE_S) -> pb.Signal:
        return self.signals.get(timeout=timeout_s)

    def close(self) -> None:
        self._outgoing.put(None)
        self._reader.join(timeout=DEADLINE_S)
