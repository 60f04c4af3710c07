"""Channel settings, reconnect backoff and outage logging shared by the client's senders."""

from __future__ import annotations

import logging
import random

import grpc

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


def open_channel(endpoint: str) -> grpc.Channel:
    """Return a plaintext channel to endpoint with keepalive enabled."""
    return grpc.insecure_channel(endpoint, options=CHANNEL_OPTIONS)


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
