"""Service endpoints: the default HOST:PORT clients use, and its validation."""

from __future__ import annotations

import os
import re

ENDPOINT_ENV = "NANWATCH_ENDPOINT"
DEFAULT_ENDPOINT = "127.0.0.1:50051"

# host:port, [ipv6]:port; the host part may also be a DNS name.
_ENDPOINT_PATTERN = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):(\d{1,5})$")


def default_endpoint() -> str:
    """Return $NANWATCH_ENDPOINT, or 127.0.0.1:50051 when it is unset."""
    return os.environ.get(ENDPOINT_ENV) or DEFAULT_ENDPOINT


def validate_endpoint(endpoint: str) -> str:
    """Return endpoint unchanged, or raise ValueError when it is not HOST:PORT."""
    match = _ENDPOINT_PATTERN.match(endpoint)
    if match is None or not 1 <= int(match.group(2)) <= 65535:
        raise ValueError(
            f"invalid endpoint {endpoint!r}; use HOST:PORT such as 127.0.0.1:50051 (no scheme, port 1-65535)"
        )
    return endpoint
