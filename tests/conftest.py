"""Shared fixtures: a real nanwatch service on a loopback port."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from nanwatch.v1 import nanwatch_pb2_grpc as pb_grpc


@pytest.fixture
def service(tmp_path: Path) -> Iterator[object]:
    from nanwatch.service.server import BackgroundService, ServiceConfig

    config = ServiceConfig(grpc_port=0, metrics_port=0, db_path=str(tmp_path / "nanwatch.db"), grace_s=1.0)
    with BackgroundService(config) as running:
        yield running


@pytest.fixture
def channel(service: object) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(service.endpoint) as opened:  # type: ignore[attr-defined]
        yield opened


@pytest.fixture
def stub(channel: grpc.Channel) -> pb_grpc.NanwatchStub:
    return pb_grpc.NanwatchStub(channel)
