"""TLS, mutual TLS and token authentication of the service, over real gRPC on loopback."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nanwatch.cli.main import main
from nanwatch.service.auth import AuthConfigError, read_token, resolve_auth_mode
from nanwatch.service.server import BackgroundService, ServiceConfig
from nanwatch.v1 import nanwatch_pb2 as pb
from nanwatch.v1 import nanwatch_pb2_grpc as pb_grpc
from tests.reliability.certs import CertFiles, TestCA
from tests.service.helpers import DEADLINE_S, registration

TOKEN = "s3cret-token-7f1c9a"
WRONG_TOKEN = "wrong-token-02bd44"


def _config(tmp_path: Path, **settings: object) -> ServiceConfig:
    return ServiceConfig(grpc_port=0, metrics_port=0, db_path=str(tmp_path / "auth.db"), grace_s=1.0,
                         **settings)  # type: ignore[arg-type]


def _bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def _halt(stub: pb_grpc.NanwatchStub, metadata: tuple[tuple[str, str], ...] = ()) -> pb.HaltRunResponse:
    return stub.HaltRun(pb.HaltRunRequest(run_id="auth-run", reason="test"), timeout=DEADLINE_S, metadata=metadata)


def _rpc_error(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        call()
    return raised.value


@pytest.fixture
def ca(tmp_path: Path) -> TestCA:
    return TestCA(tmp_path, "nanwatch-test-ca")


@pytest.fixture
def server_cert(ca: TestCA) -> CertFiles:
    return ca.issue("server", server=True)


@pytest.fixture
def token_service(tmp_path: Path) -> Iterator[BackgroundService]:
    with BackgroundService(_config(tmp_path, token=TOKEN)) as running:
        with grpc.insecure_channel(running.endpoint) as channel:
            pb_grpc.NanwatchStub(channel).RegisterRank(registration("auth-run"), timeout=DEADLINE_S)
        yield running


# ---- tokens ----

def test_halt_without_token_unauthenticated(token_service: BackgroundService) -> None:
    with grpc.insecure_channel(token_service.endpoint) as channel:
        stub = pb_grpc.NanwatchStub(channel)
        error = _rpc_error(lambda: _halt(stub))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "missing" in error.details()
        status = stub.GetRunStatus(pb.GetRunStatusRequest(run_id="auth-run"), timeout=DEADLINE_S)
    assert not status.summary.halted


def test_halt_wrong_token_unauthenticated(token_service: BackgroundService) -> None:
    # A wrong shared token identifies nobody, so it is UNAUTHENTICATED, not PERMISSION_DENIED.
    with grpc.insecure_channel(token_service.endpoint) as channel:
        stub = pb_grpc.NanwatchStub(channel)
        error = _rpc_error(lambda: _halt(stub, _bearer(WRONG_TOKEN)))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "invalid token" in error.details()
        assert WRONG_TOKEN not in error.details()
        status = stub.GetRunStatus(pb.GetRunStatusRequest(run_id="auth-run"), timeout=DEADLINE_S)
    assert not status.summary.halted


def test_halt_not_bearer_unauthenticated(token_service: BackgroundService) -> None:
    with grpc.insecure_channel(token_service.endpoint) as channel:
        stub = pb_grpc.NanwatchStub(channel)
        error = _rpc_error(lambda: _halt(stub, (("authorization", f"Basic {TOKEN}"),)))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "Bearer" in error.details()


def test_halt_right_token_halts(token_service: BackgroundService) -> None:
    with grpc.insecure_channel(token_service.endpoint) as channel:
        response = _halt(pb_grpc.NanwatchStub(channel), _bearer(TOKEN))
    assert response.halt.kind == pb.SIGNAL_KIND_HALT
    assert not response.already_halted


def test_operator_mode_leaves_reads_open(token_service: BackgroundService) -> None:
    with grpc.insecure_channel(token_service.endpoint) as channel:
        runs = pb_grpc.NanwatchStub(channel).ListRuns(pb.ListRunsRequest(), timeout=DEADLINE_S)
    assert [run.run_id for run in runs.runs] == ["auth-run"]


def test_auth_all_guards_every_call(tmp_path: Path) -> None:
    with BackgroundService(_config(tmp_path, token=TOKEN, auth_mode="all")) as running:
        with grpc.insecure_channel(running.endpoint) as channel:
            stub = pb_grpc.NanwatchStub(channel)
            register_error = _rpc_error(lambda: stub.RegisterRank(registration("all-run"), timeout=DEADLINE_S))
            list_error = _rpc_error(lambda: stub.ListRuns(pb.ListRunsRequest(), timeout=DEADLINE_S))
            watch_error = _rpc_error(lambda: list(stub.Watch(iter([]), timeout=DEADLINE_S)))
            stub.RegisterRank(registration("all-run"), timeout=DEADLINE_S, metadata=_bearer(TOKEN))
            runs = stub.ListRuns(pb.ListRunsRequest(), timeout=DEADLINE_S, metadata=_bearer(TOKEN))
    assert register_error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert list_error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert watch_error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert [run.run_id for run in runs.runs] == ["all-run"]


def test_auth_all_health_needs_no_token(tmp_path: Path) -> None:
    with BackgroundService(_config(tmp_path, token=TOKEN, auth_mode="all")) as running:
        with grpc.insecure_channel(running.endpoint) as channel:
            response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=DEADLINE_S)
    assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_auth_rejection_counted_in_metrics(token_service: BackgroundService) -> None:
    with grpc.insecure_channel(token_service.endpoint) as channel:
        _rpc_error(lambda: _halt(pb_grpc.NanwatchStub(channel)))
    registry = token_service.running.supervisor.metrics.registry
    labels = {"method": "HaltRun", "code": "UNAUTHENTICATED"}
    assert registry.get_sample_value("nanwatch_rpc_errors_total", labels) == 1


def test_token_never_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with BackgroundService(_config(tmp_path, token=TOKEN, auth_mode="all")) as running:
        with grpc.insecure_channel(running.endpoint) as channel:
            stub = pb_grpc.NanwatchStub(channel)
            stub.RegisterRank(registration("log-run"), timeout=DEADLINE_S, metadata=_bearer(TOKEN))
            for _ in range(3):
                _rpc_error(lambda: _halt(stub, _bearer(WRONG_TOKEN)))
            stub.HaltRun(pb.HaltRunRequest(run_id="log-run", reason="test"), timeout=DEADLINE_S,
                         metadata=_bearer(TOKEN))
        config_repr = repr(running.config)
    assert "rejected /nanwatch.v1.Nanwatch/HaltRun" in caplog.text
    assert TOKEN not in caplog.text
    assert WRONG_TOKEN not in caplog.text
    assert TOKEN not in config_repr


# ---- token and mode settings ----

def test_read_token_file_strips_newline(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text(f"{TOKEN}\n")
    assert read_token(str(path), environ={}) == TOKEN


def test_read_token_env_file_before_env(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text(TOKEN)
    environ = {"NANWATCH_TOKEN_FILE": str(path), "NANWATCH_TOKEN": "other"}
    assert read_token(None, environ=environ) == TOKEN


def test_read_token_env_variable() -> None:
    assert read_token(None, environ={"NANWATCH_TOKEN": TOKEN}) == TOKEN
    assert read_token(None, environ={}) is None


def test_read_token_empty_file_rejected(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("\n")
    with pytest.raises(AuthConfigError, match="empty"):
        read_token(str(path), environ={})


def test_read_token_missing_file_rejected(tmp_path: Path) -> None:
    with pytest.raises(AuthConfigError, match="cannot read the token file"):
        read_token(str(tmp_path / "absent"), environ={})


def test_auth_mode_defaults() -> None:
    assert resolve_auth_mode(None, TOKEN) == "operator"
    assert resolve_auth_mode(None, None) == "none"


def test_auth_mode_without_token_rejected() -> None:
    with pytest.raises(AuthConfigError, match="needs a token"):
        resolve_auth_mode("all", None)


# ---- TLS ----

def test_tls_trusted_client_works(tmp_path: Path, ca: TestCA, server_cert: CertFiles) -> None:
    config = _config(tmp_path, tls_cert_path=str(server_cert.cert), tls_key_path=str(server_cert.key))
    credentials = grpc.ssl_channel_credentials(ca.files.cert.read_bytes())
    with BackgroundService(config) as running, grpc.secure_channel(running.endpoint, credentials) as channel:
        runs = pb_grpc.NanwatchStub(channel).ListRuns(pb.ListRunsRequest(), timeout=DEADLINE_S)
    assert list(runs.runs) == []


def test_tls_untrusted_client_refused(tmp_path: Path, server_cert: CertFiles) -> None:
    other_ca = TestCA(tmp_path, "other-ca")
    config = _config(tmp_path, tls_cert_path=str(server_cert.cert), tls_key_path=str(server_cert.key))
    credentials = grpc.ssl_channel_credentials(other_ca.files.cert.read_bytes())
    with BackgroundService(config) as running, grpc.secure_channel(running.endpoint, credentials) as channel:
        error = _rpc_error(lambda: pb_grpc.NanwatchStub(channel).ListRuns(pb.ListRunsRequest(), timeout=DEADLINE_S))
    assert error.code() == grpc.StatusCode.UNAVAILABLE


def test_tls_plaintext_client_refused(tmp_path: Path, server_cert: CertFiles) -> None:
    config = _config(tmp_path, tls_cert_path=str(server_cert.cert), tls_key_path=str(server_cert.key))
    with BackgroundService(config) as running, grpc.insecure_channel(running.endpoint) as channel:
        error = _rpc_error(lambda: pb_grpc.NanwatchStub(channel).ListRuns(pb.ListRunsRequest(), timeout=DEADLINE_S))
    assert error.code() == grpc.StatusCode.UNAVAILABLE


def test_mtls_without_client_cert_refused(tmp_path: Path, ca: TestCA, server_cert: CertFiles) -> None:
    config = _config(tmp_path, tls_cert_path=str(server_cert.cert), tls_key_path=str(server_cert.key),
                     tls_client_ca_path=str(ca.files.cert))
    credentials = grpc.ssl_channel_credentials(ca.files.cert.read_bytes())
    with BackgroundService(config) as running, grpc.secure_channel(running.endpoint, credentials) as channel:
        error = _rpc_error(lambda: pb_grpc.NanwatchStub(channel).ListRuns(pb.ListRunsRequest(), timeout=DEADLINE_S))
    assert error.code() == grpc.StatusCode.UNAVAILABLE


def test_mtls_foreign_client_cert_refused(tmp_path: Path, ca: TestCA, server_cert: CertFiles) -> None:
    foreign = TestCA(tmp_path, "foreign-ca").issue("foreign-client", server=False)
    config = _config(tmp_path, tls_cert_path=str(server_cert.cert), tls_key_path=str(server_cert.key),
                     tls_client_ca_path=str(ca.files.cert))
    credentials = grpc.ssl_channel_credentials(ca.files.cert.read_bytes(), foreign.key.read_bytes(),
                                               foreign.cert.read_bytes())
    with BackgroundService(config) as running, grpc.secure_channel(running.endpoint, credentials) as channel:
        error = _rpc_error(lambda: pb_grpc.NanwatchStub(channel).ListRuns(pb.ListRunsRequest(), timeout=DEADLINE_S))
    assert error.code() == grpc.StatusCode.UNAVAILABLE


def test_mtls_with_client_cert_works(tmp_path: Path, ca: TestCA, server_cert: CertFiles) -> None:
    client = ca.issue("client", server=False)
    config = _config(tmp_path, tls_cert_path=str(server_cert.cert), tls_key_path=str(server_cert.key),
                     tls_client_ca_path=str(ca.files.cert))
    credentials = grpc.ssl_channel_credentials(ca.files.cert.read_bytes(), client.key.read_bytes(),
                                               client.cert.read_bytes())
    with BackgroundService(config) as running, grpc.secure_channel(running.endpoint, credentials) as channel:
        runs = pb_grpc.NanwatchStub(channel).ListRuns(pb.ListRunsRequest(), timeout=DEADLINE_S)
    assert list(runs.runs) == []


def test_health_port_plaintext_beside_tls(tmp_path: Path, server_cert: CertFiles) -> None:
    config = _config(tmp_path, tls_cert_path=str(server_cert.cert), tls_key_path=str(server_cert.key),
                     health_port=0)
    with BackgroundService(config) as running:
        with grpc.insecure_channel(f"127.0.0.1:{running.running.health_port}") as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="nanwatch.v1.Nanwatch"), timeout=DEADLINE_S)
            list_error = _rpc_error(
                lambda: pb_grpc.NanwatchStub(channel).ListRuns(pb.ListRunsRequest(), timeout=DEADLINE_S))
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert list_error.code() == grpc.StatusCode.UNIMPLEMENTED


def test_tls_key_without_cert_rejected(tmp_path: Path, server_cert: CertFiles) -> None:
    with pytest.raises(ValueError, match="tls_cert_path and tls_key_path"):
        _config(tmp_path, tls_key_path=str(server_cert.key))


# ---- clients: the Watcher's sender and the CLI ----

def test_sender_tls_and_token_registers(tmp_path: Path, ca: TestCA, server_cert: CertFiles) -> None:
    from nanwatch.client.connection import resolve_channel_security
    from nanwatch.client.sender import ReportSender

    config = _config(tmp_path, tls_cert_path=str(server_cert.cert), tls_key_path=str(server_cert.key),
                     token=TOKEN, auth_mode="all")
    with BackgroundService(config) as running:
        security = resolve_channel_security(tls_ca=str(ca.files.cert), token=TOKEN)
        sender = ReportSender(endpoint=f"localhost:{running.running.grpc_port}",
                              register_request=registration("sender-run"), max_queued_reports=8, security=security)
        sender.start()
        deadline = time.monotonic() + DEADLINE_S
        while not sender.connected and time.monotonic() < deadline:
            time.sleep(0.05)
        connected = sender.connected
        sender.close(1.0)
    assert connected
    assert TOKEN not in repr(security)


def test_cli_halt_with_token_and_tls(tmp_path: Path, ca: TestCA, server_cert: CertFiles,
                                     monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(f"{TOKEN}\n")
    config = _config(tmp_path, tls_cert_path=str(server_cert.cert), tls_key_path=str(server_cert.key), token=TOKEN)
    with BackgroundService(config) as running:
        endpoint = f"localhost:{running.running.grpc_port}"
        credentials = grpc.ssl_channel_credentials(ca.files.cert.read_bytes())
        with grpc.secure_channel(endpoint, credentials) as channel:
            pb_grpc.NanwatchStub(channel).RegisterRank(registration("cli-run"), timeout=DEADLINE_S)
        monkeypatch.delenv("NANWATCH_TOKEN", raising=False)
        monkeypatch.delenv("NANWATCH_TOKEN_FILE", raising=False)
        halt_args = ["halt", "cli-run", "--reason", "test", "--endpoint", endpoint, "--tls-ca", str(ca.files.cert)]
        without_token = main(halt_args)
        monkeypatch.setenv("NANWATCH_TOKEN_FILE", str(token_file))
        with_token = main(halt_args)
    output = capsys.readouterr()
    assert without_token == 1
    assert "UNAUTHENTICATED" in output.err
    assert with_token == 0
    assert "halted: run cli-run" in output.out
