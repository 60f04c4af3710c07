"""Metric cardinality: per-run series exist for at most max_runs runs and vanish when a finished run expires."""

from __future__ import annotations

import re
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from prometheus_client import generate_latest

from nanwatch.cli.main import build_parser
from nanwatch.service.metrics import ServiceMetrics
from nanwatch.service.server import BackgroundService, ServiceConfig
from nanwatch.v1 import nanwatch_pb2 as pb
from nanwatch.v1 import nanwatch_pb2_grpc as pb_grpc
from tests.service.helpers import DEADLINE_S, FakeClock, WatchStream, registration, report

WAIT_S = 20.0



def run_ids_in(text: str) -> set[str]:
    """Return the run ids that label at least one series of a Prometheus exposition."""
    return set(re.findall(r'run_id="([^"]+)"', text))


def exposition(metrics: ServiceMetrics) -> str:
    return generate_latest(metrics.registry).decode()


def observe_everything(metrics: ServiceMetrics, run_id: str) -> None:
    """Write a series of every run-labelled family for run_id."""
    metrics.observe_run(run_id, halted=False)
    step = pb.StepReport(step=3, loss=float("nan"), loss_finite=False, grad_norm=float("inf"),
                         nonfinite_grad_count=1, loss_scale=1024.0)
    metrics.observe_report(run_id, 0, step)
    finding = pb.Finding(stage=pb.STAGE_DATA, severity=pb.SEVERITY_CRITICAL, code="DATA_NONFINITE")
    finding.evidence.run_id = run_id
    metrics.observe_finding(finding)
    metrics.observe_halt(run_id, "finding")


def test_expiry_removes_every_series() -> None:
    clock = FakeClock()
    metrics = ServiceMetrics(max_runs=10, run_ttl_s=60.0, clock=clock)
    metrics.run_connected("run-a")
    observe_everything(metrics, "run-a")
    metrics.run_finished("run-a")
    clock.now += 59.0
    assert run_ids_in(exposition(metrics)) == {"run-a"}
    clock.now += 2.0
    text = exposition(metrics)
    assert "run-a" not in text
    assert "nanwatch_runs_in_metrics 0.0" in text


def test_expiry_spares_connected_run() -> None:
    clock = FakeClock()
    metrics = ServiceMetrics(max_runs=10, run_ttl_s=60.0, clock=clock)
    metrics.run_connected("run-a")
    observe_everything(metrics, "run-a")
    clock.now += 3600.0
    assert run_ids_in(exposition(metrics)) == {"run-a"}


def test_cap_evicts_earliest_finished() -> None:
    clock = FakeClock()
    metrics = ServiceMetrics(max_runs=3, run_ttl_s=3600.0, clock=clock)
    for index in range(6):
        run_id = f"run-{index}"
        metrics.run_connected(run_id)
        observe_everything(metrics, run_id)
        metrics.run_finished(run_id)
        clock.now += 1.0
        assert len(run_ids_in(exposition(metrics))) <= 3
    assert run_ids_in(exposition(metrics)) == {"run-3", "run-4", "run-5"}


def test_cap_rejects_when_all_connected() -> None:
    metrics = ServiceMetrics(max_runs=2, run_ttl_s=60.0, clock=FakeClock())
    for run_id in ("run-a", "run-b", "run-c"):
        metrics.run_connected(run_id)
        observe_everything(metrics, run_id)
    text = exposition(metrics)
    assert run_ids_in(text) == {"run-a", "run-b"}
    assert re.search(r"^nanwatch_runs_rejected_from_metrics_total [1-9]", text, re.MULTILINE)


def test_budget_rejects_bad_limits() -> None:
    with pytest.raises(ValueError, match="max_runs=0"):
        ServiceMetrics(max_runs=0)
    with pytest.raises(ValueError, match="run_ttl_s=0"):
        ServiceMetrics(run_ttl_s=0)


def test_serve_flags_parse() -> None:
    args = build_parser().parse_args(["serve", "--max-runs-in-metrics", "7", "--metrics-run-ttl-seconds", "2.5"])
    assert (args.max_runs_in_metrics, args.metrics_run_ttl_seconds) == (7, 2.5)


def test_config_rejects_zero_ttl() -> None:
    with pytest.raises(ValueError, match="metrics_run_ttl_s"):
        ServiceConfig(metrics_run_ttl_s=0)


def _scrape(service: BackgroundService) -> str:
    with urllib.request.urlopen(service.metrics_url, timeout=DEADLINE_S) as response:
        return response.read().decode()


def _sample(text: str, name: str) -> float:
    """Return the value of an unlabelled sample in a Prometheus exposition, 0 when absent."""
    found = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def _wait_until(predicate: Callable[[], bool]) -> bool:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_service_caps_and_expires_runs(tmp_path: Path) -> None:
    config = ServiceConfig(grpc_port=0, metrics_port=0, db_path=str(tmp_path / "nanwatch.db"), grace_s=1.0,
                           max_runs_in_metrics=2, metrics_run_ttl_s=0.5)
    with BackgroundService(config) as service, grpc.insecure_channel(service.endpoint) as channel:
        stub = pb_grpc.NanwatchStub(channel)
        streams = []
        for index in range(4):
            run_id = f"cap-{index}"
            stub.RegisterRank(registration(run_id), timeout=DEADLINE_S)
            stream = WatchStream(stub, run_id, 0)
            stream.send(report(0))
            streams.append(stream)
            # The next run registers only once this one is connected, so it cannot count as finished.
            assert _wait_until(lambda: _sample(_scrape(service), "nanwatch_active_streams") == index + 1)
        rejected = _wait_until(lambda: _sample(_scrape(service), "nanwatch_runs_rejected_from_metrics_total") >= 2)
        during = run_ids_in(_scrape(service))
        for stream in streams:
            stream.close()
        expired = _wait_until(lambda: not run_ids_in(_scrape(service)))
        after = _scrape(service)
    assert rejected
    assert during == {"cap-0", "cap-1"}
    assert expired, after
    assert run_ids_in(after) == set()
