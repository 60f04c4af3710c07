"""The service over real gRPC on a loopback port: health, reflection, streams, halts, store, metrics."""

from __future__ import annotations

import math
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from nanwatch.service.server import BackgroundService, ServiceConfig
from nanwatch.v1 import nanwatch_pb2 as pb
from nanwatch.v1 import nanwatch_pb2_grpc as pb_grpc
from tests.service.helpers import DEADLINE_S, WatchStream, registration, report, tensor


def test_health_serving(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", "nanwatch.v1.Nanwatch"):
        response = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=DEADLINE_S)
        assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_services(channel: grpc.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                          timeout=DEADLINE_S)
    names = {service.name for response in responses for service in response.list_services_response.service}
    assert "nanwatch.v1.Nanwatch" in names
    assert "grpc.health.v1.Health" in names


def test_register_healthy_has_no_warnings(stub: pb_grpc.NanwatchStub) -> None:
    response = stub.RegisterRank(registration("healthy-1"), timeout=DEADLINE_S)
    assert [finding.code for finding in response.findings] == []
    assert not response.HasField("halt")


def test_register_high_lr_warns(stub: pb_grpc.NanwatchStub) -> None:
    response = stub.RegisterRank(registration("lr-1", lr=50.0), timeout=DEADLINE_S)
    codes = [finding.code for finding in response.findings]
    assert "LR_TOO_HIGH" in codes
    finding = response.findings[codes.index("LR_TOO_HIGH")]
    assert finding.stage == pb.STAGE_HYPERPARAMETERS
    assert finding.severity == pb.SEVERITY_WARNING
    assert finding.fix


def test_nonfinite_loss_halts_every_rank(stub: pb_grpc.NanwatchStub) -> None:
    for rank in (0, 1):
        stub.RegisterRank(registration("nan-1", rank, 2), timeout=DEADLINE_S)
    streams = [WatchStream(stub, "nan-1", rank) for rank in (0, 1)]
    for step in range(3):
        for stream in streams:
            stream.send(report(step))
    streams[1].send(report(3, loss=float("nan"), grad_norm=float("nan"), nonfinite_grads=4))

    signals = [stream.next_signal() for stream in streams]
    for signal in signals:
        assert signal.kind == pb.SIGNAL_KIND_HALT
        assert signal.halt_step == 3
    status = stub.GetRunStatus(pb.GetRunStatusRequest(run_id="nan-1"), timeout=DEADLINE_S)
    assert status.summary.halted
    assert status.summary.halt_step == 3
    assert status.halt_first_rank == 1
    codes = {finding.code for finding in status.findings}
    assert {"LOSS_NONFINITE", "GRAD_NONFINITE"} <= codes
    assert status.summary.primary.code in codes
    for stream in streams:
        stream.close()


def test_report_batch_checked_in_order(stub: pb_grpc.NanwatchStub) -> None:
    stub.RegisterRank(registration("batched"), timeout=DEADLINE_S)
    stream = WatchStream(stub, "batched", 0)
    stream.send_batch([report(0), report(1), report(2, loss=float("nan")), report(3)])
    signal = stream.next_signal()
    assert signal.kind == pb.SIGNAL_KIND_HALT
    assert signal.halt_step == 2
    stream.close()
    assert stream.error is None
    status = stub.GetRunStatus(pb.GetRunStatusRequest(run_id="batched"), timeout=DEADLINE_S)
    assert status.summary.halt_step == 2
    assert status.summary.last_step == 3
    assert "LOSS_NONFINITE" in {finding.code for finding in status.findings}


def test_check_batch_nan_names_tensor_and_samples(stub: pb_grpc.NanwatchStub) -> None:
    stub.RegisterRank(registration("batch-1"), timeout=DEADLINE_S)
    inputs = np.random.default_rng(0).normal(size=(16, 64)).astype(np.float32)
    inputs[3, 10] = np.nan
    inputs[11, 0] = np.inf
    targets = np.arange(16, dtype=np.int64) % 10
    response = stub.CheckBatch(
        pb.CheckBatchRequest(run_id="batch-1", rank=0, step=7,
                             tensors=[tensor("inputs", inputs), tensor("targets", targets)]),
        timeout=DEADLINE_S,
    )
    assert not response.valid
    finding = next(finding for finding in response.findings if finding.code == "DATA_NONFINITE")
    assert finding.stage == pb.STAGE_DATA
    assert finding.severity == pb.SEVERITY_CRITICAL
    assert finding.evidence.tensor == "inputs"
    assert list(finding.evidence.sample_indices) == [3, 11]
    assert finding.evidence.step == 7


def test_check_batch_healthy_is_valid(stub: pb_grpc.NanwatchStub) -> None:
    stub.RegisterRank(registration("batch-2"), timeout=DEADLINE_S)
    inputs = np.random.default_rng(1).normal(size=(8, 64)).astype(np.float32)
    response = stub.CheckBatch(
        pb.CheckBatchRequest(run_id="batch-2", rank=0, step=0, tensors=[tensor("inputs", inputs)]),
        timeout=DEADLINE_S,
    )
    assert response.valid
    assert [finding.code for finding in response.findings] == []


def test_check_batch_nan_halts_streams(stub: pb_grpc.NanwatchStub) -> None:
    stub.RegisterRank(registration("batch-3"), timeout=DEADLINE_S)
    stream = WatchStream(stub, "batch-3", 0)
    stream.send(report(0))
    inputs = np.zeros((4, 64), dtype=np.float32)
    inputs[2, 5] = np.nan
    stub.CheckBatch(pb.CheckBatchRequest(run_id="batch-3", rank=0, step=1, tensors=[tensor("inputs", inputs)]),
                    timeout=DEADLINE_S)
    signal = stream.next_signal()
    assert signal.kind == pb.SIGNAL_KIND_HALT
    assert signal.finding.code == "DATA_NONFINITE"
    stream.close()


def test_operator_halt_reaches_ranks(stub: pb_grpc.NanwatchStub) -> None:
    for rank in (0, 1):
        stub.RegisterRank(registration("op-1", rank, 2), timeout=DEADLINE_S)
    streams = [WatchStream(stub, "op-1", rank) for rank in (0, 1)]
    for stream in streams:
        stream.send(report(0))
        stream.send(report(1))
    # The reports travel on their own streams; the status call shows when both arrived.
    _wait_for_step(stub, "op-1", 1)
    response = stub.HaltRun(pb.HaltRunRequest(run_id="op-1", reason="loss curve looks wrong"), timeout=DEADLINE_S)
    assert not response.already_halted
    assert response.halt.halt_step == 2
    for stream in streams:
        signal = stream.next_signal()
        assert signal.kind == pb.SIGNAL_KIND_HALT
        assert "loss curve looks wrong" in signal.reason
        stream.close()
    again = stub.HaltRun(pb.HaltRunRequest(run_id="op-1", reason="second"), timeout=DEADLINE_S)
    assert again.already_halted


def test_restart_keeps_runs_findings_halts(tmp_path: Path) -> None:
    config = ServiceConfig(grpc_port=0, metrics_port=0, db_path=str(tmp_path / "store.db"), grace_s=0.5)
    with BackgroundService(config) as first, grpc.insecure_channel(first.endpoint) as channel:
        stub = pb_grpc.NanwatchStub(channel)
        stub.RegisterRank(registration("keep-1", lr=50.0), timeout=DEADLINE_S)
        stream = WatchStream(stub, "keep-1", 0)
        stream.send(report(0))
        stream.send(report(1, loss=float("inf")))
        assert stream.next_signal().kind == pb.SIGNAL_KIND_HALT
        before = stub.GetRunStatus(pb.GetRunStatusRequest(run_id="keep-1"), timeout=DEADLINE_S)
        stream.close()

    with BackgroundService(config) as second, grpc.insecure_channel(second.endpoint) as channel:
        stub = pb_grpc.NanwatchStub(channel)
        after = stub.GetRunStatus(pb.GetRunStatusRequest(run_id="keep-1"), timeout=DEADLINE_S)
        assert after.summary.halted
        assert after.summary.halt_step == 1
        assert after.summary.last_step == 1
        assert [finding.id for finding in after.findings] == [finding.id for finding in before.findings]
        assert after.summary.primary.code == before.summary.primary.code
        listed = stub.ListRuns(pb.ListRunsRequest(), timeout=DEADLINE_S)
        assert "keep-1" in [run.run_id for run in listed.runs]
        # A rank that reconnects after the restart still receives the halt.
        stream = WatchStream(stub, "keep-1", 0)
        assert stream.next_signal().halt_step == 1
        stream.close()


def test_metrics_show_loss_grad_nonfinite_halts(service: object, stub: pb_grpc.NanwatchStub) -> None:
    stub.RegisterRank(registration("metrics-1"), timeout=DEADLINE_S)
    stream = WatchStream(stub, "metrics-1", 0)
    stream.send(report(0, loss=2.5, grad_norm=1.25))
    stream.send(report(1, loss=float("nan"), grad_norm=float("nan"), nonfinite_grads=2))
    stream.next_signal()
    stream.close()
    with urllib.request.urlopen(service.metrics_url, timeout=DEADLINE_S) as response:  # type: ignore[attr-defined]
        text = response.read().decode()
    assert 'nanwatch_grad_norm{rank="0",run_id="metrics-1"}' in text
    assert 'nanwatch_loss{rank="0",run_id="metrics-1"}' in text
    assert 'nanwatch_nonfinite_loss_total{run_id="metrics-1"} 1.0' in text
    assert 'nanwatch_nonfinite_grads_total{run_id="metrics-1"} 1.0' in text
    assert 'nanwatch_halts_total{run_id="metrics-1",source="finding"} 1.0' in text
    assert 'nanwatch_run_halted{run_id="metrics-1"} 1.0' in text


@pytest.mark.parametrize(
    ("request_message", "code", "fragment"),
    [
        (pb.CheckBatchRequest(run_id="bad-1", rank=0, tensors=[pb.Tensor(name="x", dtype="float32", shape=[4],
                                                                          data=b"\x00" * 15)]),
         grpc.StatusCode.INVALID_ARGUMENT, "data"),
        (pb.CheckBatchRequest(run_id="bad-1", rank=0, tensors=[pb.Tensor(name="x", dtype="complex64", shape=[1],
                                                                          data=b"\x00" * 8)]),
         grpc.StatusCode.INVALID_ARGUMENT, "dtype"),
        (pb.CheckBatchRequest(run_id="bad-1", rank=0, tensors=[pb.Tensor(name="x", dtype="float32", shape=[-1],
                                                                          data=b"")]),
         grpc.StatusCode.INVALID_ARGUMENT, "shape"),
        (pb.CheckBatchRequest(run_id="no-such-run", rank=0, tensors=[tensor("x", np.zeros(2, np.float32))]),
         grpc.StatusCode.NOT_FOUND, "RegisterRank"),
        (pb.CheckBatchRequest(run_id="bad id!", rank=0), grpc.StatusCode.INVALID_ARGUMENT, "run_id"),
        (pb.CheckBatchRequest(run_id="bad-1", rank=5, tensors=[tensor("x", np.zeros(2, np.float32))]),
         grpc.StatusCode.INVALID_ARGUMENT, "rank 5"),
    ],
)
def test_check_batch_rejects_bad_input(stub: pb_grpc.NanwatchStub, request_message: pb.CheckBatchRequest,
                                       code: grpc.StatusCode, fragment: str) -> None:
    stub.RegisterRank(registration("bad-1"), timeout=DEADLINE_S)
    with pytest.raises(grpc.RpcError) as raised:
        stub.CheckBatch(request_message, timeout=DEADLINE_S)
    assert raised.value.code() == code
    assert fragment in raised.value.details()
    # The service is still up and the run is intact.
    status = stub.GetRunStatus(pb.GetRunStatusRequest(run_id="bad-1"), timeout=DEADLINE_S)
    assert status.summary.run_id == "bad-1"


@pytest.mark.parametrize(
    ("request_message", "code", "fragment"),
    [
        (registration("reg-1", rank=2, world_size=2), grpc.StatusCode.INVALID_ARGUMENT, "rank 2"),
        (registration("x" * 200), grpc.StatusCode.INVALID_ARGUMENT, "run_id"),
        (registration("reg-2", world_size=0), grpc.StatusCode.INVALID_ARGUMENT, "world_size"),
    ],
)
def test_register_rejects_bad_input(stub: pb_grpc.NanwatchStub, request_message: pb.RegisterRankRequest,
                                    code: grpc.StatusCode, fragment: str) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        stub.RegisterRank(request_message, timeout=DEADLINE_S)
    assert raised.value.code() == code
    assert fragment in raised.value.details()


def test_register_other_world_size_rejected(stub: pb_grpc.NanwatchStub) -> None:
    stub.RegisterRank(registration("size-1", 0, 2), timeout=DEADLINE_S)
    with pytest.raises(grpc.RpcError) as raised:
        stub.RegisterRank(registration("size-1", 0, 4), timeout=DEADLINE_S)
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_watch_without_start_rejected(stub: pb_grpc.NanwatchStub) -> None:
    call = stub.Watch(iter([pb.WatchRequest(report=report(0))]), timeout=DEADLINE_S)
    with pytest.raises(grpc.RpcError) as raised:
        list(call)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "start" in raised.value.details()


def test_watch_steps_backwards_rejected(stub: pb_grpc.NanwatchStub) -> None:
    stub.RegisterRank(registration("back-1"), timeout=DEADLINE_S)
    messages = [pb.WatchRequest(start=pb.WatchStart(run_id="back-1", rank=0, client_id="client-0")),
                pb.WatchRequest(report=report(5)), pb.WatchRequest(report=report(2))]
    call = stub.Watch(iter(messages), timeout=DEADLINE_S)
    with pytest.raises(grpc.RpcError) as raised:
        list(call)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "backwards" in raised.value.details()


def test_status_unknown_run_not_found(stub: pb_grpc.NanwatchStub) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        stub.GetRunStatus(pb.GetRunStatusRequest(run_id="missing"), timeout=DEADLINE_S)
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


def test_status_checklist_has_six_stages(stub: pb_grpc.NanwatchStub) -> None:
    stub.RegisterRank(registration("list-1"), timeout=DEADLINE_S)
    status = stub.GetRunStatus(pb.GetRunStatusRequest(run_id="list-1"), timeout=DEADLINE_S)
    stages = [check.stage for check in status.checks]
    assert sorted(set(stages)) == [1, 2, 3, 4, 5, 6]
    assert stages == sorted(stages)
    assert not any(check.state == pb.CHECK_STATE_FAIL for check in status.checks)
    assert math.isnan(status.ranks[0].last_loss)


def _wait_for_step(stub: pb_grpc.NanwatchStub, run_id: str, step: int) -> None:
    import time

    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        status = stub.GetRunStatus(pb.GetRunStatusRequest(run_id=run_id), timeout=DEADLINE_S)
        if status.ranks and all(rank.last_step >= step for rank in status.ranks):
            return
        time.sleep(0.02)
    raise AssertionError(f"run {run_id} did not reach step {step}")


def test_operator_halt_records_actual_stop_step(stub: pb_grpc.NanwatchStub) -> None:
    stub.RegisterRank(registration("op-2"), timeout=DEADLINE_S)
    stream = WatchStream(stub, "op-2", 0)
    stream.send(report(0))
    _wait_for_step(stub, "op-2", 0)
    requested = stub.HaltRun(pb.HaltRunRequest(run_id="op-2", reason="stop"), timeout=DEADLINE_S).halt.halt_step
    assert requested == 1
    stream.next_signal()
    # The rank was already further on when the signal arrived and stopped at step 3.
    stopped = report(3)
    stopped.halted_locally = True
    stream.send(stopped)
    stream.close()
    status = stub.GetRunStatus(pb.GetRunStatusRequest(run_id="op-2"), timeout=DEADLINE_S)
    assert status.summary.halt_step == 3


def test_operator_halt_empty_reason_rejected(stub: pb_grpc.NanwatchStub) -> None:
    stub.RegisterRank(registration("op-3"), timeout=DEADLINE_S)
    with pytest.raises(grpc.RpcError) as raised:
        stub.HaltRun(pb.HaltRunRequest(run_id="op-3", reason="  "), timeout=DEADLINE_S)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "reason" in raised.value.details()


def test_second_service_same_port_fails(service: object, tmp_path: Path) -> None:
    port = service.running.grpc_port  # type: ignore[attr-defined]
    config = ServiceConfig(grpc_port=port, metrics_port=0, db_path=str(tmp_path / "other.db"))
    with pytest.raises(OSError, match=f"gRPC port 127.0.0.1:{port}"):
        BackgroundService(config).start()


def test_metrics_port_in_use_fails(service: object, tmp_path: Path) -> None:
    port = service.running.metrics_port  # type: ignore[attr-defined]
    config = ServiceConfig(grpc_port=0, metrics_port=port, db_path=str(tmp_path / "other.db"))
    with pytest.raises(OSError, match=f"metrics port 127.0.0.1:{port}"):
        BackgroundService(config).start()


def test_restart_restores_halted_gauge(tmp_path: Path) -> None:
    config = ServiceConfig(grpc_port=0, metrics_port=0, db_path=str(tmp_path / "gauge.db"), grace_s=0.5)
    with BackgroundService(config) as first, grpc.insecure_channel(first.endpoint) as channel:
        stub = pb_grpc.NanwatchStub(channel)
        stub.RegisterRank(registration("gauge-1"), timeout=DEADLINE_S)
        stub.HaltRun(pb.HaltRunRequest(run_id="gauge-1", reason="stop"), timeout=DEADLINE_S)
    with BackgroundService(config) as second:
        with urllib.request.urlopen(second.metrics_url, timeout=DEADLINE_S) as response:
            text = response.read().decode()
    assert 'nanwatch_run_halted{run_id="gauge-1"} 1.0' in text
