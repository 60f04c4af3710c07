"""Localization end to end: the first module and operation of a NaN, named by nanwatch run and by an embedded Watcher."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from nanwatch import HaltError, Watcher
from nanwatch.cli.report import render_status, status_to_json
from nanwatch.errors import DEFAULT_HALT_EXIT_CODE
from nanwatch.v1 import nanwatch_pb2 as pb
from nanwatch.v1 import nanwatch_pb2_grpc as pb_grpc

SCRIPT = Path(__file__).resolve().parent / "scripts" / "log_pixels_training.py"
LOG_LINE = next(number for number, line in enumerate(SCRIPT.read_text().splitlines(), start=1)
                if "torch.log1p(pixels)" in line)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _run(command: list[str], tmp_path: Path) -> tuple[subprocess.CompletedProcess[str], dict]:
    report = tmp_path / "report.json"
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "nanwatch.cli.main", "run", "--report-json", str(report), "--",
                             *command], capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    return result, json.loads(report.read_text()) if report.exists() else {}


def test_run_names_module_and_line(tmp_path: Path) -> None:
    result, report = _run([sys.executable, str(SCRIPT), "--bad-step", "4"], tmp_path)

    assert result.returncode == DEFAULT_HALT_EXIT_CODE, result.stderr[-3000:]
    assert report["halt_step"] == 4
    primary = report["primary"]
    assert (primary["stage"], primary["code"]) == (3, "FORWARD_NONFINITE")
    location = primary["location"]
    assert location["phase"] == "forward"
    assert location["module"] == "scale"
    assert location["module_type"] == "LogPixels"
    assert location["op"] == "torch.log1p"
    assert location["source_line"].endswith(f"log_pixels_training.py:{LOG_LINE}")
    assert location["rank"] == 0


def test_run_prints_location_line(tmp_path: Path) -> None:
    result, _ = _run([sys.executable, str(SCRIPT), "--bad-step", "2"], tmp_path)

    assert "location: forward; module 'scale' (LogPixels); op torch.log1p" in result.stdout + result.stderr


def test_torchrun_location_names_bad_rank(tmp_path: Path) -> None:
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
                "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "--max-restarts", "0"]
    result, report = _run([*torchrun, str(SCRIPT), "--bad-step", "3", "--bad-rank", "1"], tmp_path)

    assert result.returncode == DEFAULT_HALT_EXIT_CODE, result.stderr[-3000:]
    assert report["halt_step"] == 3
    assert report["halt_first_rank"] == 1
    location = report["primary"]["location"]
    assert location["rank"] == 1
    assert location["module"] == "scale"
    assert location["op"] == "torch.log1p"


class _Shifted(nn.Module):
    """Divides by a learned shift that starts at exactly 0."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.shift = nn.Parameter(torch.zeros(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) / self.shift


def test_embedded_watcher_status_json(service: object, stub: pb_grpc.NanwatchStub) -> None:
    model = nn.Sequential(nn.Linear(4, 4), _Shifted(), nn.Linear(4, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    watcher = Watcher(model, optimizer, nn.CrossEntropyLoss(), run_id="located-run",
                      endpoint=service.endpoint, flush_timeout_s=5.0)  # type: ignore[attr-defined]
    with watcher, pytest.raises(HaltError):
        nn.CrossEntropyLoss()(model(x), y).backward()
        optimizer.step()

    deadline = time.monotonic() + 20
    status = stub.GetRunStatus(pb.GetRunStatusRequest(run_id="located-run"))
    while not status.summary.halted and time.monotonic() < deadline:
        time.sleep(0.1)
        status = stub.GetRunStatus(pb.GetRunStatusRequest(run_id="located-run"))
    location = status_to_json(status)["primary"]["location"]
    assert location["module"] == "1"
    assert location["module_type"] == "_Shifted"
    assert location["op"] == "Tensor.div"
    assert "self.fc(x) / self.shift" in location["code"]
    assert "location: forward; module '1' (_Shifted); op Tensor.div" in render_status(status)


def test_run_skip_flag_trains_past_bad_step(tmp_path: Path) -> None:
    report_path = tmp_path / "report.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "nanwatch.cli.main", "run", "--max-consecutive-skips", "1", "--report-json",
         str(report_path), "--", sys.executable, str(SCRIPT), "--bad-step", "4"],
        capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    report = json.loads(report_path.read_text())

    assert result.returncode == 0, result.stderr[-3000:]
    assert report["halted"] is False
    assert "skipped the non-finite update of step 4" in result.stderr


HAND_WRITTEN_LOSS = '''
import torch
from torch import nn

torch.manual_seed(0)
torch.set_num_threads(1)


class HandBCE(nn.Module):
    def forward(self, logits, targets):
        probabilities = torch.sigmoid(logits * 1000)
        return -(targets * torch.log(probabilities) + (1 - targets) * torch.log(1 - probabilities)).mean()


model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
criterion = HandBCE()
for step in range(5):
    x, y = torch.randn(32, 8), (torch.rand(32, 1) > 0.5).float()
    loss = criterion(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
'''


def test_run_names_op_in_custom_loss_module(tmp_path: Path) -> None:
    script = tmp_path / "hand_bce.py"
    script.write_text(HAND_WRITTEN_LOSS)
    result, report = _run([sys.executable, str(script)], tmp_path)

    assert result.returncode == DEFAULT_HALT_EXIT_CODE, result.stderr[-3000:]
    primary = report["primary"]
    assert primary["code"] == "LOSS_LOG_ZERO"
    assert primary["location"]["phase"] == "loss_forward"
    assert primary["location"]["op"] == "torch.log"
    assert primary["location"]["source_line"] == "hand_bce.py:12"
