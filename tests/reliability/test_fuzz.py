"""Property-based tests: generated requests against a live service, which must stay up with its data intact."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nanwatch.service.server import BackgroundService, ServiceConfig
from nanwatch.service.tensor_codec import SUPPORTED_DTYPES
from nanwatch.v1 import nanwatch_pb2 as pb
from nanwatch.v1 import nanwatch_pb2_grpc as pb_grpc
from tests.service.helpers import DEADLINE_S, WatchStream, registration, report

KEPT_RUN = "kept-run"
FUZZ_RUN = "fuzz-run"
# INTERNAL or UNKNOWN would mean a handler failed on the input instead of rejecting it.
SERVICE_BUG_CODES = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
FUZZ_SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

int32s = st.integers(-(2**31), 2**31 - 1)
int64s = st.integers(-(2**63), 2**63 - 1)
small_ints = st.one_of(st.integers(-3, 70), int64s)
floats = st.floats(allow_nan=True, allow_infinity=True)
texts = st.one_of(st.text(max_size=40), st.text(alphabet="ab-._/ ", max_size=300))
run_ids = st.one_of(st.sampled_from([KEPT_RUN, FUZZ_RUN, "", "x" * 129]), texts)
shapes = st.lists(small_ints, max_size=10)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[BackgroundService, grpc.Channel]]:
    path: Path = tmp_path_factory.mktemp("fuzz") / "fuzz.db"
    config = ServiceConfig(grpc_port=0, metrics_port=0, db_path=str(path), grace_s=1.0, max_batch_bytes=1 << 16)
    with BackgroundService(config) as running, grpc.insecure_channel(running.endpoint) as channel:
        stub = pb_grpc.NanwatchStub(channel)
        stub.RegisterRank(registration(KEPT_RUN), timeout=DEADLINE_S)
        stream = WatchStream(stub, KEPT_RUN, 0)
        stream.send(report(0))
        stream.send(report(1, loss=float("nan")))
        assert stream.next_signal().kind == pb.SIGNAL_KIND_HALT
        stream.close()
        stub.RegisterRank(registration(FUZZ_RUN, world_size=4), timeout=DEADLINE_S)
        yield running, channel
        _assert_intact(channel)


def _assert_intact(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=DEADLINE_S)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    status = pb_grpc.NanwatchStub(channel).GetRunStatus(pb.GetRunStatusRequest(run_id=KEPT_RUN), timeout=DEADLINE_S)
    assert status.summary.halted
    assert status.summary.halt_step == 1
    assert "LOSS_NONFINITE" in {finding.code for finding in status.findings}


def _call_checked(call: object, *args: object, **kwargs: object) -> None:
    """Make the call; a rejection is fine unless its status means a handler failed."""
    try:
        result = call(*args, timeout=DEADLINE_S, **kwargs)  # type: ignore[operator]
        if not isinstance(result, Message):
            list(result)  # type: ignore[call-overload]  # drains a stream
    except grpc.RpcError as error:
        assert error.code() not in SERVICE_BUG_CODES, error.details()


parameters = st.builds(
    pb.ParameterInfo, name=texts, shape=shapes, dtype=texts, numel=int64s, mean=floats, std=floats, min=floats,
    max=floats, nonfinite_count=int64s, fan_in=int64s, module_type=texts,
)
registrations = st.builds(
    pb.RegisterRankRequest, run_id=run_ids, rank=st.one_of(st.integers(-1, 5), int32s),
    world_size=st.one_of(st.integers(-1, 5), int32s), host=texts, pid=int64s, client_id=texts,
    parameters=st.lists(parameters, max_size=4),
    forward_trace=st.lists(st.builds(pb.ModuleCall, name=texts, type=texts), max_size=4), loss_function=texts,
    optimizer=st.builds(pb.OptimizerInfo, type=texts, lr=floats,
                        hyperparameters=st.dictionaries(texts, floats, max_size=3)),
    clipping=st.builds(pb.ClippingInfo, enabled=st.booleans(), max_norm=floats, norm_type=floats),
)
summaries = st.builds(
    pb.TensorSummary, name=texts, dtype=texts, shape=shapes, nan_count=small_ints, inf_count=small_ints,
    min=floats, max=floats, mean=floats, std=floats, nonfinite_sample_indices=st.lists(small_ints, max_size=5),
)
step_reports = st.builds(
    pb.StepReport, step=small_ints, loss=floats, loss_finite=st.booleans(), grad_norm=floats,
    parameter_grad_norms=st.lists(st.builds(pb.ParameterGradNorm, name=texts, grad_norm=floats), max_size=3),
    nonfinite_grad_count=small_ints, param_norm=floats, update_norm=floats, lr=floats, loss_scale=floats,
    batch=st.lists(summaries, max_size=3), halted_locally=st.booleans(), dropped_reports=small_ints,
    sent_unix_s=floats, output_shape=shapes, output_checked=st.booleans(), output_finite=st.booleans(),
    clip_max_norm=floats, clip_total_norm=floats,
    activations=st.lists(st.builds(pb.LayerActivation, name=texts, type=texts, numel=small_ints, std=floats,
                                   max_abs=floats, nonfinite_count=small_ints, saturated_fraction=floats),
                         max_size=3),
)
wire_tensors = st.builds(
    pb.Tensor, name=texts, dtype=st.one_of(st.sampled_from(SUPPORTED_DTYPES), texts), shape=shapes,
    data=st.binary(max_size=256),
)
batches = st.builds(
    pb.CheckBatchRequest, run_id=run_ids, rank=st.integers(-1, 5), step=small_ints,
    tensors=st.lists(wire_tensors, max_size=3), sample_ids=st.lists(small_ints, max_size=5),
)


@FUZZ_SETTINGS
@given(request=registrations)
def test_fuzz_register(live: tuple[BackgroundService, grpc.Channel], request: pb.RegisterRankRequest) -> None:
    _call_checked(pb_grpc.NanwatchStub(live[1]).RegisterRank, request)
    _assert_intact(live[1])


@FUZZ_SETTINGS
@given(rank=st.integers(-1, 4), reports=st.lists(step_reports, min_size=1, max_size=4))
def test_fuzz_watch(live: tuple[BackgroundService, grpc.Channel], rank: int, reports: list[pb.StepReport]) -> None:
    stub = pb_grpc.NanwatchStub(live[1])
    messages = [pb.WatchRequest(start=pb.WatchStart(run_id=FUZZ_RUN, rank=rank, client_id=f"client-{rank}"))]
    messages += [pb.WatchRequest(report=step_report) for step_report in reports]
    _call_checked(stub.Watch, iter(messages))
    _assert_intact(live[1])


@FUZZ_SETTINGS
@given(request=batches)
def test_fuzz_check_batch(live: tuple[BackgroundService, grpc.Channel], request: pb.CheckBatchRequest) -> None:
    _call_checked(pb_grpc.NanwatchStub(live[1]).CheckBatch, request)
    _assert_intact(live[1])


@FUZZ_SETTINGS
@given(run_id=run_ids, reason=texts, limit=int32s)
def test_fuzz_queries_and_halt(live: tuple[BackgroundService, grpc.Channel], run_id: str, reason: str,
                               limit: int) -> None:
    stub = pb_grpc.NanwatchStub(live[1])
    if run_id not in (KEPT_RUN, FUZZ_RUN):
        _call_checked(stub.HaltRun, pb.HaltRunRequest(run_id=run_id, reason=reason))
    _call_checked(stub.GetRunStatus, pb.GetRunStatusRequest(run_id=run_id))
    _call_checked(stub.ListRuns, pb.ListRunsRequest(limit=limit))
    _assert_intact(live[1])


@FUZZ_SETTINGS
@given(method=st.sampled_from(["RegisterRank", "CheckBatch", "GetRunStatus", "ListRuns", "HaltRun"]),
       payload=st.binary(max_size=512))
def test_fuzz_raw_bytes(live: tuple[BackgroundService, grpc.Channel], method: str, payload: bytes) -> None:
    call = live[1].unary_unary(f"/nanwatch.v1.Nanwatch/{method}", request_serializer=None,
                               response_deserializer=None)
    _call_checked(call, payload)
    _assert_intact(live[1])


@FUZZ_SETTINGS
@given(payload=st.binary(min_size=1, max_size=256))
def test_fuzz_raw_watch_bytes(live: tuple[BackgroundService, grpc.Channel], payload: bytes) -> None:
    call = live[1].stream_stream("/nanwatch.v1.Nanwatch/Watch", request_serializer=None,
                                 response_deserializer=None)
    _call_checked(call, iter([payload]))
    _assert_intact(live[1])
