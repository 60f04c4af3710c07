"""The bound on runs held in memory: the cap, the expiry of idle runs, and what the store returns afterwards."""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from nanwatch.cli.serve import add_memory_limit_arguments, memory_limits
from nanwatch.service.live import REMOVED_CAP, REMOVED_IDLE, LiveRun, LiveRuns, LiveRunsFull
from nanwatch.service.server import BackgroundService, ServiceConfig
from nanwatch.v1 import nanwatch_pb2 as pb
from nanwatch.v1 import nanwatch_pb2_grpc as pb_grpc
from tests.service.helpers import DEADLINE_S, FakeClock, WatchStream, registration, report

SHORT_TTL_S = 0.3
WAIT_S = 20.0



def _wait_until(predicate: Callable[[], bool], timeout_s: float = WAIT_S) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def _live_runs(max_runs: int = 10, ttl_s: float = 60.0) -> tuple[LiveRuns, FakeClock, list[tuple[str, str]]]:
    clock = FakeClock()
    removed: list[tuple[str, str]] = []

    def on_remove(run: LiveRun, reason: str) -> None:
        removed.append((run.run_id, reason))

    return LiveRuns(max_runs=max_runs, idle_ttl_s=ttl_s, on_remove=on_remove, clock=clock), clock, removed


def _connect(live: LiveRuns, run_id: str, rank: int = 0) -> asyncio.Queue[pb.Signal | None]:
    return live.connect(run_id, rank, world_size=2)


# ---- LiveRuns on a fake clock ----

def test_idle_run_expires_after_ttl() -> None:
    live, clock, removed = _live_runs(ttl_s=60.0)
    live.ensure("run-a", 2)
    clock.now += 59.0
    assert live.expire_idle() == []
    clock.now += 1.0
    assert live.expire_idle() == ["run-a"]
    assert "run-a" not in live
    assert removed == [("run-a", REMOVED_IDLE)]


def test_connected_run_never_expires() -> None:
    live, clock, removed = _live_runs(ttl_s=60.0)
    _connect(live, "run-a")
    clock.now += 3600.0
    assert live.expire_idle() == []
    assert "run-a" in live
    assert removed == []


def test_disconnect_restarts_idle_clock() -> None:
    live, clock, _ = _live_runs(ttl_s=60.0)
    outbox = _connect(live, "run-a")
    clock.now += 3600.0
    live.disconnect("run-a", 0, outbox)
    clock.now += 59.0
    assert live.expire_idle() == []
    clock.now += 1.0
    assert live.expire_idle() == ["run-a"]


def test_report_restarts_idle_clock() -> None:
    live, clock, _ = _live_runs(ttl_s=60.0)
    live.ensure("run-a", 2)
    clock.now += 50.0
    live.record_report("run-a", 0, pb.StepReport(step=0))
    clock.now += 50.0
    assert live.expire_idle() == []


def test_replaced_stream_counts_once() -> None:
    live, _, _ = _live_runs()
    first = _connect(live, "run-a")
    second = _connect(live, "run-a")
    live.disconnect("run-a", 0, first)  # the replaced stream ending later changes nothing
    assert live.has_connected("run-a")
    live.disconnect("run-a", 0, second)
    assert not live.has_connected("run-a")
    assert live.connected_count() == 0


def test_cap_evicts_oldest_idle_run() -> None:
    live, clock, removed = _live_runs(max_runs=2, ttl_s=3600.0)
    live.ensure("run-a", 2)
    clock.now += 1.0
    live.ensure("run-b", 2)
    clock.now += 1.0
    live.ensure("run-a", 2)  # a new registration makes run-a the more recent one
    live.ensure("run-c", 2)
    assert removed == [("run-b", REMOVED_CAP)]
    assert len(live) == 2


def test_cap_spares_connected_runs() -> None:
    live, clock, removed = _live_runs(max_runs=2, ttl_s=3600.0)
    _connect(live, "run-a")
    clock.now += 1.0
    live.ensure("run-b", 2)
    live.ensure("run-c", 2)
    assert removed == [("run-b", REMOVED_CAP)]
    assert "run-a" in live


def test_cap_full_of_connected_raises() -> None:
    live, _, removed = _live_runs(max_runs=2, ttl_s=3600.0)
    _connect(live, "run-a")
    _connect(live, "run-b")
    with pytest.raises(LiveRunsFull, match="max_live_runs=2"):
        live.ensure("run-c", 2)
    assert "run-c" not in live
    assert removed == []


@pytest.mark.parametrize(("max_runs", "ttl_s", "message"), [
    (0, 60.0, "max_live_runs=0"),
    (1, 0.0, "live_run_ttl_s=0"),
    (1, float("nan"), "live_run_ttl_s=nan"),
])
def test_live_runs_reject_bad_limits(max_runs: int, ttl_s: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LiveRuns(max_runs=max_runs, idle_ttl_s=ttl_s)


# ---- the service over gRPC ----

@pytest.fixture
def short_ttl_service(tmp_path: Path) -> Iterator[BackgroundService]:
    config = ServiceConfig(grpc_port=0, metrics_port=0, db_path=str(tmp_path / "live.db"), grace_s=1.0,
                           live_run_ttl_s=SHORT_TTL_S)
    with BackgroundService(config) as service:
        yield service


@pytest.fixture
def one_run_service(tmp_path: Path) -> Iterator[BackgroundService]:
    config = ServiceConfig(grpc_port=0, metrics_port=0, db_path=str(tmp_path / "cap.db"), grace_s=1.0,
                           max_live_runs=1)
    with BackgroundService(config) as service:
        yield service


def _stub(service: BackgroundService) -> Iterator[pb_grpc.NanwatchStub]:
    with grpc.insecure_channel(service.endpoint) as channel:
        yield pb_grpc.NanwatchStub(channel)


@pytest.fixture
def short_ttl_stub(short_ttl_service: BackgroundService) -> Iterator[pb_grpc.NanwatchStub]:
    yield from _stub(short_ttl_service)


@pytest.fixture
def one_run_stub(one_run_service: BackgroundService) -> Iterator[pb_grpc.NanwatchStub]:
    yield from _stub(one_run_service)


def _in_memory(service: BackgroundService, run_id: str) -> bool:
    return run_id in service.running.supervisor.live


def _stream_steps(stub: pb_grpc.NanwatchStub, run_id: str, ranks: int, steps: int) -> None:
    """Register ranks of run_id, send steps reports on each rank's stream, and close the streams."""
    for rank in range(ranks):
        stub.RegisterRank(registration(run_id, rank, ranks), timeout=DEADLINE_S)
    streams = [WatchStream(stub, run_id, rank) for rank in range(ranks)]
    for step in range(steps):
        for stream in streams:
            stream.send(report(step))
    for stream in streams:
        stream.close()


def _check_states(status: pb.RunStatus) -> list[tuple[int, str, int]]:
    return [(check.stage, check.code, check.state) for check in status.checks]


def test_expired_run_status_unchanged(short_ttl_service: BackgroundService, short_ttl_stub: pb_grpc.NanwatchStub,
                                      caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="nanwatch.service.supervisor")
    _stream_steps(short_ttl_stub, "expiring-run", ranks=2, steps=5)
    before = short_ttl_stub.GetRunStatus(pb.GetRunStatusRequest(run_id="expiring-run"), timeout=DEADLINE_S)
    left = _wait_until(lambda: not _in_memory(short_ttl_service, "expiring-run"))
    after = short_ttl_stub.GetRunStatus(pb.GetRunStatusRequest(run_id="expiring-run"), timeout=DEADLINE_S)
    listed = short_ttl_stub.ListRuns(pb.ListRunsRequest(), timeout=DEADLINE_S)

    assert left
    assert "expired from memory" in caplog.text
    assert "run=expiring-run" in caplog.text
    assert after.summary.last_step == 4
    assert after.summary.world_size == 2
    assert [info.rank for info in after.ranks] == [0, 1]
    assert _check_states(after) == _check_states(before)
    assert pb.CHECK_STATE_PASS in [state for _, _, state in _check_states(after)]
    assert "expiring-run" in [summary.run_id for summary in listed.runs]


def test_halt_reaches_rank_after_expiry(short_ttl_service: BackgroundService,
                                        short_ttl_stub: pb_grpc.NanwatchStub) -> None:
    _stream_steps(short_ttl_stub, "halted-then-idle", ranks=2, steps=3)
    short_ttl_stub.HaltRun(pb.HaltRunRequest(run_id="halted-then-idle", reason="stop it"), timeout=DEADLINE_S)
    left = _wait_until(lambda: not _in_memory(short_ttl_service, "halted-then-idle"))

    restarted = registration("halted-then-idle", 1, 2, client_id="client-1-restarted")
    response = short_ttl_stub.RegisterRank(restarted, timeout=DEADLINE_S)
    stream = WatchStream(short_ttl_stub, "halted-then-idle", 1, client_id="client-1-restarted")
    signal = stream.next_signal()
    stream.close()

    assert left
    assert response.halt.kind == pb.SIGNAL_KIND_HALT
    assert "stop it" in response.halt.reason
    assert signal.kind == pb.SIGNAL_KIND_HALT
    assert signal.halt_step == response.halt.halt_step


def test_cap_rejects_run_while_all_connected(one_run_service: BackgroundService,
                                              one_run_stub: pb_grpc.NanwatchStub) -> None:
    one_run_stub.RegisterRank(registration("first-run"), timeout=DEADLINE_S)
    stream = WatchStream(one_run_stub, "first-run", 0)
    assert _wait_until(lambda: one_run_service.running.supervisor.live.has_connected("first-run"))
    with pytest.raises(grpc.RpcError) as rejected:
        one_run_stub.RegisterRank(registration("second-run"), timeout=DEADLINE_S)
    stream.close()

    assert rejected.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_live_runs=1" in rejected.value.details()


def test_cap_evicts_finished_run(one_run_service: BackgroundService, one_run_stub: pb_grpc.NanwatchStub,
                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="nanwatch.service.supervisor")
    _stream_steps(one_run_stub, "finished-run", ranks=1, steps=3)
    one_run_stub.RegisterRank(registration("next-run"), timeout=DEADLINE_S)
    status = one_run_stub.GetRunStatus(pb.GetRunStatusRequest(run_id="finished-run"), timeout=DEADLINE_S)

    assert not _in_memory(one_run_service, "finished-run")
    assert _in_memory(one_run_service, "next-run")
    assert "evicted from memory" in caplog.text
    assert "run=finished-run" in caplog.text
    assert status.summary.last_step == 2


def test_cap_still_sends_halt(one_run_service: BackgroundService, one_run_stub: pb_grpc.NanwatchStub) -> None:
    one_run_stub.RegisterRank(registration("halted-run"), timeout=DEADLINE_S)
    one_run_stub.HaltRun(pb.HaltRunRequest(run_id="halted-run", reason="bad data"), timeout=DEADLINE_S)
    one_run_stub.RegisterRank(registration("busy-run"), timeout=DEADLINE_S)
    stream = WatchStream(one_run_stub, "busy-run", 0)
    assert _wait_until(lambda: one_run_service.running.supervisor.live.has_connected("busy-run"))
    response = one_run_stub.RegisterRank(registration("halted-run", client_id="client-0-again"), timeout=DEADLINE_S)
    stream.close()

    assert not _in_memory(one_run_service, "halted-run")
    assert response.halt.kind == pb.SIGNAL_KIND_HALT
    assert "bad data" in response.halt.reason


def test_dropped_reports_counted_once(service: BackgroundService, stub: pb_grpc.NanwatchStub) -> None:
    stub.RegisterRank(registration("dropping-run"), timeout=DEADLINE_S)
    stream = WatchStream(stub, "dropping-run", 0)
    for step, dropped_so_far in enumerate((0, 3, 3, 5)):
        step_report = report(step)
        step_report.dropped_reports = dropped_so_far
        stream.send(step_report)
    stream.close()
    counted = service.running.supervisor.metrics.registry.get_sample_value("nanwatch_client_reports_dropped_total")
    assert counted == 5.0


# ---- settings ----

@pytest.mark.parametrize(("setting", "value"), [
    ("max_live_runs", 0), ("live_run_ttl_s", 0.0), ("live_run_ttl_s", -1.0), ("max_pending_requests", 0),
])
def test_config_rejects_bad_memory_limit(setting: str, value: float) -> None:
    with pytest.raises(ValueError, match=setting):
        ServiceConfig(**{setting: value})  # type: ignore[arg-type]


def test_serve_memory_options_parse() -> None:
    parser = argparse.ArgumentParser()
    add_memory_limit_arguments(parser)
    args = parser.parse_args(["--max-live-runs", "7", "--live-run-ttl-seconds", "2.5", "--max-pending-requests", "9"])
    assert memory_limits(args) == {"max_live_runs": 7, "live_run_ttl_s": 2.5, "max_pending_requests": 9}


def test_serve_memory_limits_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NANWATCH_MAX_LIVE_RUNS", "12")
    monkeypatch.setenv("NANWATCH_LIVE_RUN_TTL_SECONDS", "30")
    monkeypatch.delenv("NANWATCH_MAX_PENDING_REQUESTS", raising=False)
    assert memory_limits(argparse.Namespace()) == {"max_live_runs": 12, "live_run_ttl_s": 30.0}


def test_serve_option_overrides_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NANWATCH_MAX_LIVE_RUNS", "12")
    assert memory_limits(argparse.Namespace(max_live_runs=3))["max_live_runs"] == 3


def test_serve_env_not_a_number(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NANWATCH_MAX_LIVE_RUNS", "lots")
    with pytest.raises(ValueError, match="NANWATCH_MAX_LIVE_RUNS='lots' is not an integer"):
        memory_limits(argparse.Namespace())
