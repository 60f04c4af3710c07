"""Malformed and hostile requests: each gets the right status and a message naming the field.

After every rejection the service is still healthy and the data stored before it is intact.
"""

from __future__ import annotations

import math
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nanwatch.service.server import BackgroundService, ServiceConfig
from nanwatch.v1 import nanwatch_pb2 as pb
from nanwatch.v1 import nanwatch_pb2_grpc as pb_grpc
from tests.service.helpers import DEADLINE_S, WatchStream, registration, report, tensor

INVALID = grpc.StatusCode.INVALID_ARGUMENT
KEPT_RUN = "kept-run"
MAX_BATCH_BYTES = 4096


@pytest.fixture
def small_service(tmp_path: Path) -> Iterator[BackgroundService]:
    config = ServiceConfig(grpc_port=0, metrics_port=0, db_path=str(tmp_path / "bad.db"), grace_s=1.0,
                           max_batch_bytes=MAX_BATCH_BYTES)
    with BackgroundService(config) as running:
        yield running


@pytest.fixture
def stub(small_service: BackgroundService) -> Iterator[pb_grpc.NanwatchStub]:
    with grpc.insecure_channel(small_service.endpoint) as channel:
        stub = pb_grpc.NanwatchStub(channel)
        _store_kept_run(stub)
        yield stub
        _assert_kept_run_intact(stub, channel)


def _store_kept_run(stub: pb_grpc.NanwatchStub) -> None:
    """Store a halted run with a finding, to check after each test that bad input did not touch it."""
    stub.RegisterRank(registration(KEPT_RUN), timeout=DEADLINE_S)
    stream = WatchStream(stub, KEPT_RUN, 0)
    stream.send(report(0))
    stream.send(report(1, loss=float("nan")))
    assert stream.next_signal().kind == pb.SIGNAL_KIND_HALT
    stream.close()


def _assert_kept_run_intact(stub: pb_grpc.NanwatchStub, channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=DEADLINE_S)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    status = stub.GetRunStatus(pb.GetRunStatusRequest(run_id=KEPT_RUN), timeout=DEADLINE_S)
    assert status.summary.halted
    assert status.summary.halt_step == 1
    assert "LOSS_NONFINITE" in {finding.code for finding in status.findings}


def _rpc_error(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        call()
    return raised.value


def _registration_with(**changes: object) -> pb.RegisterRankRequest:
    request = registration("reg-bad")
    for path, value in changes.items():
        _set_field(request, path, value)
    return request


def _set_field(message: object, path: str, value: object) -> None:
    *parents, name = path.split(".")
    for parent in parents:
        message = message[int(parent)] if parent.isdigit() else getattr(message, parent)  # type: ignore[index]
    if isinstance(value, list):
        field = getattr(message, name)
        del field[:]
        field.extend(value)
    elif isinstance(value, dict):
        getattr(message, name).update(value)
    else:
        setattr(message, name, value)


# ---- RegisterRank ----

@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"run_id": ""}, "run_id"),
        ({"run_id": "x" * 129}, "run_id"),
        ({"run_id": "bad/../id"}, "run_id"),
        ({"world_size": -3}, "world_size"),
        ({"world_size": 1 << 21}, "world_size"),
        ({"rank": -1}, "rank -1"),
        ({"client_id": ""}, "client_id"),
        ({"client_id": "c" * 200}, "client_id"),
        ({"host": "h" * 5000}, "host"),
        ({"optimizer.lr": math.nan}, "optimizer.lr"),
        ({"optimizer.lr": math.inf}, "optimizer.lr"),
        ({"optimizer.lr": -0.1}, "optimizer.lr"),
        ({"optimizer.hyperparameters": {"eps": math.nan}}, "optimizer.hyperparameters['eps']"),
        ({"clipping.enabled": True, "clipping.max_norm": math.inf}, "clipping.max_norm"),
        ({"clipping.enabled": True, "clipping.max_norm": 1.0, "clipping.norm_type": math.nan}, "clipping.norm_type"),
        ({"parameters.0.shape": [-4, 2]}, "parameters[0].shape"),
        ({"parameters.0.shape": [1 << 41, 2]}, "parameters[0].shape"),
        ({"parameters.0.shape": [1 << 30] * 3}, "parameters[0].shape"),
        ({"parameters.0.shape": [1] * 9}, "parameters[0].shape"),
        ({"parameters.1.numel": -5}, "parameters[1].numel"),
        ({"parameters.1.nonfinite_count": -1}, "parameters[1].nonfinite_count"),
        ({"forward_trace.0.name": "n" * 2000}, "forward_trace[0].name"),
    ],
)
def test_register_bad_field_rejected(stub: pb_grpc.NanwatchStub, changes: dict[str, object], fragment: str) -> None:
    error = _rpc_error(lambda: stub.RegisterRank(_registration_with(**changes), timeout=DEADLINE_S))
    assert error.code() == INVALID
    assert fragment in error.details()


def test_register_nonfinite_parameter_stats_accepted(stub: pb_grpc.NanwatchStub) -> None:
    # NaN statistics describe a non-finite parameter, which is what stage 2 reports.
    request = _registration_with(**{"parameters.0.mean": math.nan, "parameters.0.nonfinite_count": 3})
    response = stub.RegisterRank(request, timeout=DEADLINE_S)
    assert response.halt.kind == pb.SIGNAL_KIND_HALT


def test_rank_taken_by_other_client_rejected(stub: pb_grpc.NanwatchStub) -> None:
    stub.RegisterRank(registration("twice", client_id="first"), timeout=DEADLINE_S)
    first = WatchStream(stub, "twice", 0, client_id="first")
    first.send(report(0))
    stub.GetRunStatus(pb.GetRunStatusRequest(run_id="twice"), timeout=DEADLINE_S)

    register_error = _rpc_error(
        lambda: stub.RegisterRank(registration("twice", client_id="second"), timeout=DEADLINE_S))
    start = pb.WatchRequest(start=pb.WatchStart(run_id="twice", rank=0, client_id="second"))
    watch_error = _rpc_error(lambda: list(stub.Watch(iter([start]), timeout=DEADLINE_S)))
    # The first client's stream still works: its NaN report halts it.
    first.send(report(1, loss=float("nan")))
    signal = first.next_signal()
    first.close()

    assert register_error.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "rank 0" in register_error.details()
    assert watch_error.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "already streaming" in watch_error.details()
    assert signal.kind == pb.SIGNAL_KIND_HALT


# ---- Watch ----

def _bad_report(**changes: object) -> pb.StepReport:
    step_report = report(0)
    for path, value in changes.items():
        _set_field(step_report, path, value)
    return step_report


@pytest.mark.parametrize(
    ("step_report", "fragment"),
    [
        (_bad_report(step=-1), "report.step"),
        (_bad_report(lr=math.nan), "report.lr"),
        (_bad_report(lr=math.inf), "report.lr"),
        (_bad_report(loss_scale=math.nan), "report.loss_scale"),
        (_bad_report(loss_scale=-1.0), "report.loss_scale"),
        (_bad_report(clip_max_norm=math.inf), "report.clip_max_norm"),
        (_bad_report(sent_unix_s=math.nan), "report.sent_unix_s"),
        (_bad_report(nonfinite_grad_count=-2), "report.nonfinite_grad_count"),
        (_bad_report(dropped_reports=-1), "report.dropped_reports"),
        (_bad_report(output_shape=[-1, 10]), "report.output_shape"),
        (_bad_report(output_shape=[1 << 45]), "report.output_shape"),
        (_bad_report(batch=[pb.TensorSummary(name="x", shape=[-8])]), "report.batch[0].shape"),
        (_bad_report(batch=[pb.TensorSummary(name="x", shape=[8], nan_count=-1)]), "report.batch[0].nan_count"),
        (_bad_report(batch=[pb.TensorSummary(name="x", shape=[8], nonfinite_sample_indices=[-3])]),
         "report.batch[0].nonfinite_sample_indices"),
        (_bad_report(batch=[pb.TensorSummary(name=f"t{i}", shape=[1]) for i in range(65)]), "report.batch"),
        (_bad_report(activations=[pb.LayerActivation(name="0", type="Linear", numel=-1)]),
         "report.activations[0].numel"),
    ],
)
def test_watch_bad_report_rejected(stub: pb_grpc.NanwatchStub, step_report: pb.StepReport, fragment: str) -> None:
    stub.RegisterRank(registration("watch-bad"), timeout=DEADLINE_S)
    messages = [pb.WatchRequest(start=pb.WatchStart(run_id="watch-bad", rank=0, client_id="client-0")),
                pb.WatchRequest(report=step_report)]
    error = _rpc_error(lambda: list(stub.Watch(iter(messages), timeout=DEADLINE_S)))
    assert error.code() == INVALID
    assert fragment in error.details()


def test_watch_nonfinite_loss_and_norms_accepted(stub: pb_grpc.NanwatchStub) -> None:
    # NaN and Inf in loss and norms are the evidence the checks look for, not bad input.
    stub.RegisterRank(registration("nan-ok"), timeout=DEADLINE_S)
    stream = WatchStream(stub, "nan-ok", 0)
    stream.send(report(0, loss=math.inf, grad_norm=math.nan, nonfinite_grads=2))
    signal = stream.next_signal()
    stream.close()
    assert signal.kind == pb.SIGNAL_KIND_HALT
    assert stream.error is None


@pytest.mark.parametrize(
    ("start", "code", "fragment"),
    [
        (pb.WatchStart(run_id="no-such-run", rank=0, client_id="c"), grpc.StatusCode.NOT_FOUND, "no-such-run"),
        (pb.WatchStart(run_id="bad id", rank=0, client_id="c"), INVALID, "start.run_id"),
        (pb.WatchStart(run_id=KEPT_RUN, rank=1, client_id="c"), INVALID, "rank 1"),
        (pb.WatchStart(run_id=KEPT_RUN, rank=0, client_id="c" * 500), INVALID, "start.client_id"),
    ],
)
def test_watch_bad_start_rejected(stub: pb_grpc.NanwatchStub, start: pb.WatchStart, code: grpc.StatusCode,
                                  fragment: str) -> None:
    error = _rpc_error(lambda: list(stub.Watch(iter([pb.WatchRequest(start=start)]), timeout=DEADLINE_S)))
    assert error.code() == code
    assert fragment in error.details()


def test_watch_second_start_rejected(stub: pb_grpc.NanwatchStub) -> None:
    start = pb.WatchRequest(start=pb.WatchStart(run_id=KEPT_RUN, rank=0, client_id="client-0"))
    error = _rpc_error(lambda: list(stub.Watch(iter([start, start]), timeout=DEADLINE_S)))
    assert error.code() == INVALID
    assert "first message" in error.details()


def test_bad_batch_keeps_earlier_reports(stub: pb_grpc.NanwatchStub) -> None:
    stub.RegisterRank(registration("batch-bad"), timeout=DEADLINE_S)
    reports = pb.ReportBatch(reports=[report(0), report(1, loss=2.5), _bad_report(step=-4), report(3)])
    messages = [pb.WatchRequest(start=pb.WatchStart(run_id="batch-bad", rank=0, client_id="client-0")),
                pb.WatchRequest(reports=reports)]
    error = _rpc_error(lambda: list(stub.Watch(iter(messages), timeout=DEADLINE_S)))
    assert error.code() == INVALID
    assert "report.step" in error.details()
    status = stub.GetRunStatus(pb.GetRunStatusRequest(run_id="batch-bad"), timeout=DEADLINE_S)
    assert status.summary.last_step == 1
    assert status.ranks[0].last_loss == 2.5


def test_watch_message_without_kind_rejected(stub: pb_grpc.NanwatchStub) -> None:
    stub.RegisterRank(registration("no-kind"), timeout=DEADLINE_S)
    messages = [pb.WatchRequest(start=pb.WatchStart(run_id="no-kind", rank=0, client_id="client-0")),
                pb.WatchRequest()]
    error = _rpc_error(lambda: list(stub.Watch(iter(messages), timeout=DEADLINE_S)))
    assert error.code() == INVALID
    assert "`report` or `reports`" in error.details()


# ---- CheckBatch ----

def _batch(*tensors: pb.Tensor, step: int = 0, run_id: str = KEPT_RUN) -> pb.CheckBatchRequest:
    return pb.CheckBatchRequest(run_id=run_id, rank=0, step=step, tensors=list(tensors))


@pytest.mark.parametrize(
    ("request_message", "code", "fragment"),
    [
        (_batch(pb.Tensor(name="x", dtype="float32", shape=[4], data=b"\0" * 15)), INVALID, "data"),
        (_batch(pb.Tensor(name="x", dtype="complex64", shape=[1], data=b"\0" * 8)), INVALID, "dtype"),
        (_batch(pb.Tensor(name="x", dtype="float32", shape=[-1], data=b"")), INVALID, "negative dim"),
        # A declared size that the data does not back is malformed, so INVALID_ARGUMENT.
        (_batch(pb.Tensor(name="x", dtype="float32", shape=[1 << 40, 1 << 40], data=b"")), INVALID, "limit"),
        (_batch(pb.Tensor(name="", dtype="float32", shape=[1], data=b"\0" * 4)), INVALID, "name"),
        (_batch(tensor("x", np.zeros(MAX_BATCH_BYTES // 4 + 1, np.float32))),
         grpc.StatusCode.RESOURCE_EXHAUSTED, "limit"),
        (_batch(tensor("x", np.zeros(2, np.float32)), tensor("x", np.ones(2, np.float32))), INVALID, "['x']"),
        (_batch(tensor("x", np.zeros(2, np.float32)), step=-1), INVALID, "step -1"),
        (_batch(tensor("x", np.zeros(2, np.float32)), run_id="no-such-run"), grpc.StatusCode.NOT_FOUND, "no-such-run"),
    ],
)
def test_check_batch_bad_input_rejected(stub: pb_grpc.NanwatchStub, request_message: pb.CheckBatchRequest,
                                        code: grpc.StatusCode, fragment: str) -> None:
    error = _rpc_error(lambda: stub.CheckBatch(request_message, timeout=DEADLINE_S))
    assert error.code() == code
    assert fragment in error.details()


def test_message_over_grpc_limit_rejected(stub: pb_grpc.NanwatchStub) -> None:
    # The gRPC receive limit is max_batch_bytes + 1 MiB; gRPC itself rejects a larger message.
    huge = pb.Tensor(name="x", dtype="uint8", shape=[2 << 20], data=b"\0" * (2 << 20))
    error = _rpc_error(lambda: stub.CheckBatch(_batch(huge), timeout=DEADLINE_S))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


# ---- HaltRun, GetRunStatus, ListRuns ----

@pytest.mark.parametrize(
    ("request_message", "code", "fragment"),
    [
        (pb.HaltRunRequest(run_id="no-such-run", reason="x"), grpc.StatusCode.NOT_FOUND, "no-such-run"),
        (pb.HaltRunRequest(run_id="", reason="x"), INVALID, "run_id"),
        (pb.HaltRunRequest(run_id=KEPT_RUN, reason="r" * 5000), INVALID, "reason"),
    ],
)
def test_halt_bad_input_rejected(stub: pb_grpc.NanwatchStub, request_message: pb.HaltRunRequest,
                                 code: grpc.StatusCode, fragment: str) -> None:
    error = _rpc_error(lambda: stub.HaltRun(request_message, timeout=DEADLINE_S))
    assert error.code() == code
    assert fragment in error.details()


def test_status_bad_run_id_rejected(stub: pb_grpc.NanwatchStub) -> None:
    error = _rpc_error(lambda: stub.GetRunStatus(pb.GetRunStatusRequest(run_id="a b"), timeout=DEADLINE_S))
    assert error.code() == INVALID
    assert "run_id" in error.details()


def test_list_runs_negative_limit_uses_default(stub: pb_grpc.NanwatchStub) -> None:
    runs = stub.ListRuns(pb.ListRunsRequest(limit=-7), timeout=DEADLINE_S)
    assert [run.run_id for run in runs.runs] == [KEPT_RUN]


@pytest.mark.parametrize("method", ["RegisterRank", "CheckBatch", "HaltRun"])
def test_unparsable_bytes_rejected(small_service: BackgroundService, stub: pb_grpc.NanwatchStub,
                                   method: str) -> None:
    with grpc.insecure_channel(small_service.endpoint) as channel:
        call = channel.unary_unary(f"/nanwatch.v1.Nanwatch/{method}")
        error = _rpc_error(lambda: call(b"\x00", timeout=DEADLINE_S))
    assert error.code() == INVALID
    assert f"{method}Request" in error.details()


def test_unparsable_bytes_counted(small_service: BackgroundService) -> None:
    with grpc.insecure_channel(small_service.endpoint) as channel:
        call = channel.unary_unary("/nanwatch.v1.Nanwatch/GetRunStatus")
        _rpc_error(lambda: call(b"\x00", timeout=DEADLINE_S))
    with urllib.request.urlopen(small_service.metrics_url, timeout=DEADLINE_S) as page:
        text = page.read().decode()
    assert 'nanwatch_rpc_errors_total{code="INVALID_ARGUMENT",method="GetRunStatus"} 1.0' in text


def test_unparsable_watch_bytes_rejected(small_service: BackgroundService, stub: pb_grpc.NanwatchStub) -> None:
    with grpc.insecure_channel(small_service.endpoint) as channel:
        call = channel.stream_stream("/nanwatch.v1.Nanwatch/Watch")
        error = _rpc_error(lambda: list(call(iter([b"\x00"]), timeout=DEADLINE_S)))
    assert error.code() == INVALID
    assert "WatchRequest" in error.details()
