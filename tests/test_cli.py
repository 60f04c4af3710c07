"""The ``nanwatch`` command against a real service: serve, runs, status, halt."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nanwatch.cli.main import main
from nanwatch.v1 import nanwatch_pb2 as pb
from nanwatch.v1 import nanwatch_pb2_grpc as pb_grpc
from tests.service.helpers import DEADLINE_S, WatchStream, registration, report

NANWATCH = [sys.executable, "-m", "nanwatch.cli.main"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_serving(endpoint: str) -> None:
    deadline = time.monotonic() + 30
    with grpc.insecure_channel(endpoint) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                response = health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if response.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                time.sleep(0.1)
    raise AssertionError(f"service at {endpoint} never became SERVING")


def test_serve_stops_on_sigterm(tmp_path: Path) -> None:
    grpc_port, metrics_port = _free_port(), _free_port()
    process = subprocess.Popen(
        [*NANWATCH, "serve", "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port),
         "--db", str(tmp_path / "serve.db"), "--grace-seconds", "1"],
        stderr=subprocess.PIPE, text=True,
    )
    try:
        _wait_serving(f"127.0.0.1:{grpc_port}")
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 0
    assert "received SIGTERM" in stderr
    assert "stopped" in stderr
    assert (tmp_path / "serve.db").exists()


def test_serve_rejects_bad_port(tmp_path: Path) -> None:
    result = subprocess.run([*NANWATCH, "serve", "--grpc-port", "70000", "--db", str(tmp_path / "x.db")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "grpc_port=70000" in result.stderr


def test_serve_error_names_flag_and_variable(tmp_path: Path) -> None:
    env = {**os.environ, "NANWATCH_MAX_PENDING_REQUESTS": "-4"}
    result = subprocess.run([*NANWATCH, "serve", "--grpc-port", "0", "--metrics-port", "0",
                             "--db", str(tmp_path / "x.db")], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 2
    assert "--max-pending-requests or $NANWATCH_MAX_PENDING_REQUESTS" in result.stderr


def test_run_rejects_bad_skip_variable() -> None:
    env = {**os.environ, "NANWATCH_MAX_CONSECUTIVE_SKIPS": "abc"}
    result = subprocess.run([*NANWATCH, "run", "--", sys.executable, "-c", "pass"],
                            capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 2
    assert "$NANWATCH_MAX_CONSECUTIVE_SKIPS='abc' is invalid" in result.stderr


def test_status_json_fields(service: object, stub: pb_grpc.NanwatchStub, capsys) -> None:
    stub.RegisterRank(registration("cli-1", lr=50.0), timeout=DEADLINE_S)
    stream = WatchStream(stub, "cli-1", 0)
    stream.send(report(0))
    stream.send(report(1, loss=float("nan"), grad_norm=float("nan"), nonfinite_grads=1))
    stream.next_signal()
    stream.close()

    assert main(["status", "cli-1", "--json", "--endpoint", service.endpoint]) == 0  # type: ignore[attr-defined]
    document = json.loads(capsys.readouterr().out)
    assert document["halted"] is True
    assert document["halt_step"] == 1
    assert document["primary"]["stage"] == 4
    assert document["primary"]["code"] == "LR_TOO_HIGH"
    assert [stage["stage"] for stage in document["stages"]] == [1, 2, 3, 4, 5, 6]
    assert {finding["code"] for finding in document["findings"]} >= {"LR_TOO_HIGH", "LOSS_NONFINITE"}


def test_status_table_shows_stages(service: object, stub: pb_grpc.NanwatchStub, capsys) -> None:
    stub.RegisterRank(registration("cli-2"), timeout=DEADLINE_S)
    assert main(["status", "cli-2", "--endpoint", service.endpoint]) == 0  # type: ignore[attr-defined]
    out = capsys.readouterr().out
    assert "STAGE" in out
    assert "EVIDENCE" in out
    assert "FIX" in out
    for stage in ("1 data", "2 initialization", "3 loss/activation", "4 hyperparameters", "5 gradients", "6 monitoring"):
        assert stage in out


def test_runs_and_halt(service: object, stub: pb_grpc.NanwatchStub, capsys) -> None:
    endpoint = service.endpoint  # type: ignore[attr-defined]
    stub.RegisterRank(registration("cli-3"), timeout=DEADLINE_S)
    assert main(["halt", "cli-3", "--reason", "manual stop", "--endpoint", endpoint]) == 0
    assert "manual stop" in capsys.readouterr().out
    assert main(["runs", "--endpoint", endpoint]) == 0
    out = capsys.readouterr().out
    assert "cli-3" in out
    assert "halted at 0" in out


def test_endpoint_from_environment(service: object, stub: pb_grpc.NanwatchStub) -> None:
    stub.RegisterRank(registration("cli-4"), timeout=DEADLINE_S)
    env = {**os.environ, "NANWATCH_ENDPOINT": service.endpoint}  # type: ignore[attr-defined]
    result = subprocess.run([*NANWATCH, "runs", "--json"], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "cli-4" in [run["run_id"] for run in json.loads(result.stdout)]


def test_unreachable_service_message() -> None:
    port = _free_port()
    result = subprocess.run([*NANWATCH, "runs", "--endpoint", f"127.0.0.1:{port}"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "cannot reach the nanwatch service" in result.stderr


def test_invalid_endpoint_usage_error() -> None:
    result = subprocess.run([*NANWATCH, "runs", "--endpoint", "http://127.0.0.1:1"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "invalid endpoint" in result.stderr
    assert "HOST:PORT" in result.stderr


def test_halt_empty_reason_usage_error(service: object) -> None:
    result = subprocess.run([*NANWATCH, "halt", "some-run", "--reason", "", "--endpoint",
                             service.endpoint],  # type: ignore[attr-defined]
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "--reason is empty" in result.stderr


def test_serve_metrics_port_in_use(service: object, tmp_path: Path) -> None:
    port = service.running.metrics_port  # type: ignore[attr-defined]
    result = subprocess.run([*NANWATCH, "serve", "--grpc-port", "0", "--metrics-port", str(port),
                             "--db", str(tmp_path / "busy.db")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert f"cannot bind the metrics port 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_runs_table_shows_dash_before_first_step() -> None:
    from nanwatch.cli.report import render_runs

    table = render_runs([pb.RunSummary(run_id="fresh-run", world_size=2, last_step=-1)])
    row = next(line for line in table.splitlines() if line.startswith("fresh-run"))
    assert row.split()[2] == "-"
