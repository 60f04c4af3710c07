"""Where clients find the service."""

from __future__ import annotations

import os

ENDPOINT_ENV = "NANWATCH_ENDPOINT"
DEFAULT_ENDPOINT = "127.0.0.1:50051"


def default_endpoint() -> str:
    """Return $NANWATCH_ENDPOINT, or 127.0.0.1:50051 when it is unset."""
    return os.environ.get(ENDPOINT_ENV) or DEFAULT_ENDPOINT
