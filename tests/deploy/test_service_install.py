"""The service installed as the Dockerfile installs it, in a fresh virtual environment without torch.

The build context is what the Dockerfile's build stage copies; the install runs
the same deploy/docker/install-service.sh. The installed `nanwatch serve` must
return SERVING to the gRPC health check and drain on SIGTERM.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.deploy.dockerfile import read_stages
from tests.deploy.tools import DOCKERFILE, REPO

INSTALL_TIMEOUT_S = 600
START_TIMEOUT_S = 60
RPC_DEADLINE_S = 10
SERVING_LINE = re.compile(r"serving gRPC .*?on 127\.0\.0\.1:(\d+), metrics on http://127\.0\.0\.1:(\d+)/metrics")


def _copy_build_context(context: Path) -> None:
    """Copy into context what the build stage's COPY instructions take from the repository."""
    build = read_stages(DOCKERFILE)[0]
    for instruction in build.all("COPY"):
        for source in instruction.argument.split()[:-1]:
            origin = REPO / source
            target = context / source
            target.parent.mkdir(parents=True, exist_ok=True)
            if origin.is_dir():
                shutil.copytree(origin, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                shutil.copy2(origin, target)


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    context = tmp_path_factory.mktemp("context")
    _copy_build_context(context)
    venv_dir = tmp_path_factory.mktemp("image") / "venv"
    result = subprocess.run(
        ["sh", str(context / "deploy" / "docker" / "install-service.sh"), str(venv_dir), str(context)],
        capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S, check=False,
    )
    assert result.returncode == 0, f"install-service.sh failed:\n{result.stdout}\n{result.stderr}"
    return venv_dir


class ServeProcess:
    """`nanwatch serve` from the installed venv, on free loopback ports, with its log collected."""

    def __init__(self, venv_dir: Path, db_path: Path) -> None:
        self.process = subprocess.Popen(
            [str(venv_dir / "bin" / "nanwatch"), "serve", "--host", "127.0.0.1", "--grpc-port", "0",
             "--metrics-port", "0", "--db", str(db_path), "--grace-seconds", "1"],
            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
        )
        self.log: list[str] = []
        self.ports = threading.Event()
        self.grpc_port = self.metrics_port = 0
        self._reader = threading.Thread(target=self._read_log, daemon=True)
        self._reader.start()

    def _read_log(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.log.append(line)
            match = SERVING_LINE.search(line)
            if match:
                self.grpc_port, self.metrics_port = int(match[1]), int(match[2])
                self.ports.set()

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=30)
        self._reader.join(timeout=10)
        return code


@pytest.fixture
def served(venv: Path, tmp_path: Path) -> Iterator[ServeProcess]:
    server = ServeProcess(venv, tmp_path / "nanwatch.db")
    try:
        assert server.ports.wait(START_TIMEOUT_S), "nanwatch serve did not log its ports:\n" + "".join(server.log)
        yield server
    finally:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait(timeout=30)


def test_install_has_no_torch(venv: Path) -> None:
    result = subprocess.run([str(venv / "bin" / "python"), "-c", "import torch"], capture_output=True, text=True)
    assert result.returncode != 0
    assert "No module named 'torch'" in result.stderr


@pytest.mark.parametrize("service_name", ["", "nanwatch.v1.Nanwatch"])
def test_install_health_serving(service_name: str, served: ServeProcess) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{served.grpc_port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = stub.Check(health_pb2.HealthCheckRequest(service=service_name), timeout=RPC_DEADLINE_S)
    assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_install_metrics_served(served: ServeProcess) -> None:
    with urllib.request.urlopen(f"http://127.0.0.1:{served.metrics_port}/metrics", timeout=RPC_DEADLINE_S) as page:
        text = page.read().decode()
    assert "nanwatch_reports_total" in text


def test_install_sigterm_drains(served: ServeProcess) -> None:
    code = served.stop()
    log = "".join(served.log)
    assert code == 0, log
    assert "received SIGTERM" in log
    assert "health NOT_SERVING, draining" in log
    assert log.rstrip().endswith("stopped"), log
