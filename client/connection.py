"""Channel settings, reconnect backoff and outage logging shared by the client's senders."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from nanwatch.service.auth import ClientTls, bearer_metadata, read_client_tls, read_token

logger = logging.getLogger(__name__)

# Keepalive pings find a dead long-lived Watch stream; the service must allow this ping
# interval (its min_ping_interval) or it closes the connection.
CHANNEL_OPTIONS: list[tuple[str, int]] = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
]
BACKOFF_INITIAL_S = 0.2
BACKOFF_MAX_S = 10.0


@dataclass(frozen=True, slots=True)
class ChannelSecurity:
    """Client transport security: TLS files (None: plaintext) and the API token (None: no token)."""

    tls: ClientTls | None = None
    token: str | None = None

    def __repr__(self) -> str:
        # The token must not reach a log through a repr.
        return f"ChannelSecurity(tls={self.tls is not None}, token={'set' if self.token else None})"


def resolve_channel_security(*, tls_ca: str | None = None, token: str | None = None) -> ChannelSecurity:
    """Return the channel security from the arguments, else $NANWATCH_TLS_CA and $NANWATCH_TOKEN(_FILE)."""
    return ChannelSecurity(tls=read_client_tls(tls_ca), token=token if token is not None else read_token())


def open_channel(endpoint: str, security: ChannelSecurity | None = None) -> grpc.Channel:
    """Return a channel to endpoint with keepalive enabled, and with the TLS and token that security sets."""
    security = security or ChannelSecurity()
    if security.tls is None:
        channel = grpc.insecure_channel(endpoint, options=CHANNEL_OPTIONS)
    else:
        channel = grpc.secure_channel(endpoint, security.tls.credentials(), options=CHANNEL_OPTIONS)
    if security.token is None:
        return channel
    return grpc.intercept_channel(channel, _TokenInterceptor(bearer_metadata(security.token)))


class _TokenInterceptor(
    grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor,
):
    """Adds the authorization metadata to every call, on plaintext channels too.

    grpc.metadata_call_credentials would attach the token only on TLS channels.
    """

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    def _with_token(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return _CallDetails(details.method, details.timeout, tuple(details.metadata or ()) + self._metadata,
                            details.credentials, details.wait_for_ready, details.compression)

    def intercept_unary_unary(self, continuation: Callable[..., Any], details: grpc.ClientCallDetails,
                              request: Any) -> Any:
        return continuation(self._with_token(details), request)

    def intercept_unary_stream(self, continuation: Callable[..., Any], details: grpc.ClientCallDetails,
                               request: Any) -> Any:
        return continuation(self._with_token(details), request)

    def intercept_stream_unary(self, continuation: Callable[..., Any], details: grpc.ClientCallDetails,
                               request_iterator: Any) -> Any:
        return continuation(self._with_token(details), request_iterator)

    def intercept_stream_stream(self, continuation: Callable[..., Any], details: grpc.ClientCallDetails,
                                request_iterator: Any) -> Any:
        return continuation(self._with_token(details), request_iterator)


@dataclass(frozen=True, slots=True)
class _CallDetails(grpc.ClientCallDetails):
    method: str
    timeout: float | None
    metadata: tuple[tuple[str, str], ...] | None = field(repr=False)
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: grpc.Compression | None


def backoff_delay_s(attempt: int) -> float:
    """Return the wait before reconnect attempt number attempt (0-based): exponential, jittered, 0.2-10 s."""
    ceiling = min(BACKOFF_MAX_S, BACKOFF_INITIAL_S * 2 ** min(attempt, 16))
    return max(BACKOFF_INITIAL_S, random.uniform(ceiling / 2, ceiling))


class OutageLog:
    """Logs one WARNING when the service becomes unreachable and one INFO when it is back."""

    def __init__(self, *, what: str, endpoint: str, run_id: str, rank: int) -> None:
        self.in_outage = False
        self._what = what
        self._endpoint = endpoint
        self._run_id = run_id
        self._rank = rank

    def failed(self, error: grpc.RpcError) -> None:
        """Record a failed call; logs only the first failure of an outage."""
        if self.in_outage:
            return
        self.in_outage = True
        code = error.code() if isinstance(error, grpc.Call) else None
        details = error.details() if isinstance(error, grpc.Call) else str(error)
        logger.warning(
            "nanwatch rank %d: %s to the service at %s failed for run %s (%s: %s); "
            "retrying with backoff, training continues",
            self._rank, self._what, self._endpoint, self._run_id, code, details,
        )

    def succeeded(self) -> None:
        """Record a successful call; logs the end of an outage."""
        if self.in_outage:
            logger.info("nanwatch rank %d: %s to the service at %s works again for run %s",
                        self._rank, self._what, self._endpoint, self._run_id)
        self.in_outage = False
