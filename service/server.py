"""Start and stop the nanwatch service: gRPC server, health, reflection and /metrics."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from nanwatch.service.auth import TokenAuthInterceptor, read_pem, resolve_auth_mode
from nanwatch.service.engine import CheckEngine
from nanwatch.service.live import DEFAULT_LIVE_RUN_TTL_S, DEFAULT_MAX_LIVE_RUNS
from nanwatch.service.metrics import DEFAULT_MAX_RUNS, DEFAULT_RUN_TTL_S, ServiceMetrics
from nanwatch.service.servicer import MalformedRequestInterceptor, NanwatchServicer
from nanwatch.service.store import Store
from nanwatch.service.supervisor import Supervisor
from nanwatch.service.thresholds import Thresholds
from nanwatch.v1 import nanwatch_pb2 as pb
from nanwatch.v1 import nanwatch_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Nanwatch"].full_name
MiB = 1 << 20
DEFAULT_MAX_PENDING_REQUESTS = 16_384
MIN_SWEEP_INTERVAL_S = 0.05
MAX_SWEEP_INTERVAL_S = 60.0


@dataclass(kw_only=True, slots=True)
class ServiceConfig:
    """Settings of one service process."""

    host: str = "127.0.0.1"
    """Address the gRPC and metrics ports bind to; 0.0.0.0 or :: inside a container."""
    grpc_port: int = 50051
    """gRPC port; 0 picks a free one."""
    metrics_port: int = 9400
    """Prometheus /metrics port; 0 picks a free one."""
    db_path: str = "nanwatch.db"
    """SQLite file that keeps runs, findings and halts across restarts; ":memory:" keeps nothing."""
    thresholds_path: str | None = None
    """JSON file of check thresholds (see service/thresholds.py); None uses the defaults."""
    rank_label: bool = True
    """Label per-step gauges with the rank; False keeps one series per run (rank 0)."""
    max_batch_bytes: int = 64 * MiB
    """Maximum raw tensor bytes in one CheckBatch request."""
    grace_s: float = 5.0
    """Seconds that open calls get to finish on shutdown."""
    tls_cert_path: str | None = None
    """PEM server certificate chain; with tls_key_path the gRPC port speaks TLS only."""
    tls_key_path: str | None = None
    """PEM private key of tls_cert_path."""
    tls_client_ca_path: str | None = None
    """PEM CA bundle; when set, clients must present a certificate it signed (mutual TLS)."""
    token: str | None = field(default=None, repr=False)
    """Shared token that clients send as `authorization: Bearer <token>`; never logged."""
    auth_mode: str | None = None
    """"all", "operator" (HaltRun only) or "none"; None means "operator" with a token, else "none"."""
    health_port: int | None = None
    """Extra plaintext port that serves only grpc.health.v1, for Kubernetes probes of a TLS port."""
    max_runs_in_metrics: int = DEFAULT_MAX_RUNS
    """Most runs that have series labelled with their run id; at the cap the earliest finished run gives way."""
    metrics_run_ttl_s: float = DEFAULT_RUN_TTL_S
    """Seconds after its last rank disconnected that a run's labelled series are removed."""
    max_live_runs: int = DEFAULT_MAX_LIVE_RUNS
    """Maximum number of runs held in memory; at the cap the idle run with the oldest activity gives way.

    When every tracked run has a connected rank, a new run's RegisterRank gets RESOURCE_EXHAUSTED.
    """
    live_run_ttl_s: float = DEFAULT_LIVE_RUN_TTL_S
    """Seconds without a connected rank or a report after which a run leaves memory (the store keeps it)."""
    max_pending_requests: int = DEFAULT_MAX_PENDING_REQUESTS
    """Maximum number of incoming calls that gRPC core queues before the event loop accepts them.

    Calls beyond it are cancelled. All ranks of a job open their streams at once, so
    this should be at least the largest number of ranks that start together. Without it, gRPC core (grpcio 1.85)
    rejects a growing random share of calls beyond a queue of 1,000 and every call
    beyond 3,000 (the server arguments grpc.server.max_pending_requests and
    grpc.server.max_pending_requests_hard_limit).
    """

    def __post_init__(self) -> None:
        for name in ("grpc_port", "metrics_port"):
            port = getattr(self, name)
            if not 0 <= port <= 65535:
                raise ValueError(f"{name}={port} is not a TCP port; use 0..65535 (0 picks a free port)")
        if self.max_batch_bytes <= 0:
            raise ValueError(f"max_batch_bytes={self.max_batch_bytes} must be positive")
        if self.max_runs_in_metrics < 1:
            raise ValueError(f"max_runs_in_metrics={self.max_runs_in_metrics} must be at least 1")
        if not self.metrics_run_ttl_s > 0:
            raise ValueError(f"metrics_run_ttl_s={self.metrics_run_ttl_s} must be a positive number of seconds")
        if self.max_live_runs < 1:
            raise ValueError(f"max_live_runs={self.max_live_runs} must be at least 1")
        if not self.live_run_ttl_s > 0:
            raise ValueError(f"live_run_ttl_s={self.live_run_ttl_s} must be a positive number of seconds")
        if self.max_pending_requests < 1:
            raise ValueError(f"max_pending_requests={self.max_pending_requests} must be at least 1")
        if self.health_port is not None and not 0 <= self.health_port <= 65535:
            raise ValueError(f"health_port={self.health_port} is not a TCP port; use 0..65535")
        if (self.tls_cert_path is None) != (self.tls_key_path is None):
            raise ValueError("tls_cert_path and tls_key_path go together; set both for TLS, or neither")
        if self.tls_client_ca_path is not None and self.tls_cert_path is None:
            raise ValueError("tls_client_ca_path (mutual TLS) needs tls_cert_path and tls_key_path")
        self.auth_mode = resolve_auth_mode(self.auth_mode, self.token)

    @property
    def tls_enabled(self) -> bool:
        return self.tls_cert_path is not None

    def server_credentials(self) -> grpc.ServerCredentials | None:
        """Return the TLS credentials of the gRPC port, or None for plaintext."""
        if self.tls_cert_path is None or self.tls_key_path is None:
            return None
        pair = (read_pem(self.tls_key_path, "TLS key"), read_pem(self.tls_cert_path, "TLS certificate"))
        client_ca = read_pem(self.tls_client_ca_path, "TLS client CA") if self.tls_client_ca_path else None
        return grpc.ssl_server_credentials([pair], root_certificates=client_ca, require_client_auth=client_ca is not None)

    def load_thresholds(self) -> Thresholds:
        if self.thresholds_path is None:
            return Thresholds()
        path = Path(self.thresholds_path)
        try:
            values = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"cannot read thresholds file {path}: {error}") from error
        return Thresholds.from_mapping(values)


class RunningService:
    """A started service; ``stop()`` drains it (health NOT_SERVING first, then a graceful stop)."""

    def __init__(
        self, *, server: grpc.aio.Server, health_servicer: health.aio.HealthServicer, supervisor: Supervisor,
        grpc_port: int, metrics_port: int, metrics_http: object, host: str, grace_s: float,
    ) -> None:
        self.server = server
        self.health_servicer = health_servicer
        self.supervisor = supervisor
        self.grpc_port = grpc_port
        self.metrics_port = metrics_port
        self._metrics_http = metrics_http
        self.host = host
        self.grace_s = grace_s
        self.health_server: grpc.aio.Server | None = None
        """The plaintext health-only server, when ServiceConfig.health_port is set."""
        self.health_port: int | None = None
        self.sweeper: asyncio.Task[None] | None = None
        """The task that removes idle runs from memory."""

    async def stop(self) -> None:
        logger.info("stopping: health NOT_SERVING, draining for up to %.1f s", self.grace_s)
        await self.health_servicer.enter_graceful_shutdown()
        await self.server.stop(self.grace_s)
        if self.sweeper is not None:
            self.sweeper.cancel()
        if self.health_server is not None:
            await self.health_server.stop(None)
        self._metrics_http.shutdown()  # type: ignore[attr-defined]
        self.supervisor.store.close()
        logger.info("stopped")


async def start_service(config: ServiceConfig) -> RunningService:
    """Open the store, bind both ports and start serving; return the running service."""
    store = Store(config.db_path)
    metrics = ServiceMetrics(rank_label=config.rank_label, max_runs=config.max_runs_in_metrics,
                             run_ttl_s=config.metrics_run_ttl_s)
    supervisor = Supervisor(
        store=store, engine=CheckEngine(config.load_thresholds()), metrics=metrics,
        max_batch_bytes=config.max_batch_bytes, max_live_runs=config.max_live_runs,
        live_run_ttl_s=config.live_run_ttl_s,
    )

    server = grpc.aio.server(options=_server_options(config), interceptors=_interceptors(config, metrics))
    pb_grpc.add_NanwatchServicer_to_server(NanwatchServicer(supervisor), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    try:
        grpc_port = _bind(server, config.host, config.grpc_port, config.server_credentials())
    except (OSError, ValueError):
        store.close()
        raise
    await server.start()
    health_server, health_port = await _start_health_server(config, health_servicer, store, server)

    try:
        metrics_http, _ = start_http_server(config.metrics_port, addr=config.host, registry=metrics.registry)
    except OSError as error:
        await server.stop(None)
        if health_server is not None:
            await health_server.stop(None)
        store.close()
        raise OSError(
            f"cannot bind the metrics port {config.host}:{config.metrics_port}: {error.strerror}; "
            "pick another --metrics-port"
        ) from None
    metrics_port = metrics_http.server_port
    supervisor.restore_metrics()
    for name in (health.OVERALL_HEALTH, SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    logger.info(
        "serving gRPC (%s, auth %s) on %s:%d, metrics on http://%s:%d/metrics, store %s",
        "TLS" if config.tls_enabled else "plaintext", config.auth_mode,
        config.host, grpc_port, config.host, metrics_port, config.db_path,
    )
    if config.token and not config.tls_enabled:
        logger.warning("a token is configured but the gRPC port is plaintext, so clients send it unencrypted; "
                       "add --tls-cert and --tls-key")
    running = RunningService(
        server=server, health_servicer=health_servicer, supervisor=supervisor, grpc_port=grpc_port,
        metrics_port=metrics_port, metrics_http=metrics_http, host=config.host, grace_s=config.grace_s,
    )
    logger.info("holding up to %d runs in memory; a run leaves it after %g s without a connected rank or report",
                config.max_live_runs, config.live_run_ttl_s)
    running.health_server, running.health_port = health_server, health_port
    running.sweeper = asyncio.create_task(_sweep_idle_runs(supervisor, config.live_run_ttl_s))
    return running


async def _sweep_idle_runs(supervisor: Supervisor, ttl_s: float) -> None:
    """Remove idle runs from memory every ttl_s / 2 seconds (within 0.05-60 s) until cancelled."""
    interval_s = min(max(ttl_s / 2, MIN_SWEEP_INTERVAL_S), MAX_SWEEP_INTERVAL_S)
    while True:
        await asyncio.sleep(interval_s)
        try:
            supervisor.expire_idle_runs()
        except Exception:  # noqa: BLE001 - a failed sweep must not end the sweeps that follow
            logger.exception("removing idle runs from memory failed; retrying in %.1f s", interval_s)


def _server_options(config: ServiceConfig) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", config.max_batch_bytes + MiB),
        # Clients ping every 30 s to keep their Watch stream alive through idle proxies.
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_pings_without_data", 0),
        # Without this, Linux lets a second service bind the same port and the two
        # split the clients between their stores.
        ("grpc.so_reuseport", 0),
        # Calls wait in gRPC core until the event loop accepts them. Past the soft limit
        # core rejects a random share of new calls, past the hard limit all of them, so
        # both are set to one limit: a job's burst of streams is queued, not cut at random.
        ("grpc.server.max_pending_requests", config.max_pending_requests),
        ("grpc.server.max_pending_requests_hard_limit", config.max_pending_requests),
    ]


def _interceptors(config: ServiceConfig, metrics: ServiceMetrics) -> list[grpc.aio.ServerInterceptor]:
    """Return the token check (when enabled) followed by the malformed-request handling."""

    def count_rejection(method: str, code: grpc.StatusCode) -> None:
        metrics.rpc_errors.labels(method, code.name).inc()

    malformed = MalformedRequestInterceptor(on_reject=count_rejection)
    if config.auth_mode == "none" or config.token is None:
        if config.token is not None:
            logger.warning("a token is configured but --auth is none: no call checks it")
        return [malformed]
    token_check = TokenAuthInterceptor(token=config.token, mode=config.auth_mode, on_reject=count_rejection)  # type: ignore[arg-type]
    return [token_check, malformed]


def _bind(server: grpc.aio.Server, host: str, port: int, credentials: grpc.ServerCredentials | None) -> int:
    """Add the port to server (TLS when credentials are given) and return the bound port number."""
    address = f"{_bracket(host)}:{port}"
    try:
        if credentials is None:
            return server.add_insecure_port(address)
        return server.add_secure_port(address, credentials)
    except RuntimeError as error:
        raise OSError(f"cannot bind the gRPC port {address}: {error}; is another service using it?") from None


async def _start_health_server(
    config: ServiceConfig, health_servicer: health.aio.HealthServicer, store: Store, main_server: grpc.aio.Server,
) -> tuple[grpc.aio.Server | None, int | None]:
    """Start the plaintext health-only port, if configured; return the server and its port.

    It serves the same health states as the main port.
    """
    if config.health_port is None:
        return None, None
    # NOTE: Kubernetes native gRPC probes speak plaintext only, so a TLS gRPC port needs
    # this second port for them. It serves grpc.health.v1 and nothing else.
    health_server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, health_server)
    try:
        port = _bind(health_server, config.host, config.health_port, None)
    except OSError:
        await main_server.stop(None)
        store.close()
        raise
    await health_server.start()
    return health_server, port


def serve(config: ServiceConfig) -> None:
    """Run the service in the foreground until SIGTERM or SIGINT, then drain and return."""
    asyncio.run(_serve(config))


async def _serve(config: ServiceConfig) -> None:
    # The handlers go in first: a SIGTERM that arrives while the ports open still drains.
    stop_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, _on_signal, signum, stop_requested)
    service = await start_service(config)
    await stop_requested.wait()
    await service.stop()


def _on_signal(signum: int, stop_requested: asyncio.Event) -> None:
    logger.info("received %s", signal.Signals(signum).name)
    stop_requested.set()


class BackgroundService:
    """A service on its own event-loop thread, for tests, ``nanwatch demo`` and ``nanwatch run``.

    Example:
        with BackgroundService(ServiceConfig(grpc_port=0, metrics_port=0, db_path=":memory:")) as service:
            print(service.endpoint, service.metrics_url)
    """

    def __init__(self, config: ServiceConfig) -> None:
        self.config = config
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="nanwatch-service", daemon=True)
        self._service: RunningService | None = None

    def start(self) -> BackgroundService:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(start_service(self.config), self._loop)
        self._service = future.result(timeout=30)
        return self

    def stop(self) -> None:
        if self._service is None:
            return
        asyncio.run_coroutine_threadsafe(self._service.stop(), self._loop).result(timeout=self.config.grace_s + 10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._service = None

    def __enter__(self) -> BackgroundService:
        return self.start()

    def __exit__(self, *unused_exc: object) -> None:
        self.stop()

    @property
    def running(self) -> RunningService:
        if self._service is None:
            raise RuntimeError("the service is not running; call start() first")
        return self._service

    @property
    def endpoint(self) -> str:
        return f"{_bracket(self.config.host)}:{self.running.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{_bracket(self.config.host)}:{self.running.metrics_port}/metrics"


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
