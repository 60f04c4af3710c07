"""``nanwatch run`` on unmodified training scripts, alone and under a 2-process torchrun."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from nanwatch.errors import DEFAULT_HALT_EXIT_CODE
from nanwatch.v1 import nanwatch_pb2 as pb
from nanwatch.v1 import nanwatch_pb2_grpc as pb_grpc
from tests.service.helpers import DEADLINE_S

SCRIPTS = Path(__file__).resolve().parent / "scripts"
NANWATCH_RUN = [sys.executable, "-m", "nanwatch.cli.main", "run"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _run(options: list[str], command: list[str], tmp_path: Path) -> tuple[subprocess.CompletedProcess[str], dict]:
    report = tmp_path / "report.json"
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([*NANWATCH_RUN, "--report-json", str(report), *options, "--", *command],
                            capture_output=True, text=True, timeout=240, env=env)
    document = json.loads(report.read_text()) if report.exists() else {}
    return result, document


def _outcomes(tmp_path: Path) -> dict[int, dict]:
    return {int(path.stem.removeprefix("outcome-rank")): json.loads(path.read_text())
            for path in tmp_path.glob("outcome-rank*.json")}


def _training(tmp_path: Path, *extra: str) -> list[str]:
    return [sys.executable, str(SCRIPTS / "digits_training.py"), "--out", str(tmp_path), *extra]


def test_run_halts_nan_batch_before_update(tmp_path: Path) -> None:
    result, report = _run([], _training(tmp_path, "--nan-step", "7"), tmp_path)

    assert result.returncode == DEFAULT_HALT_EXIT_CODE, result.stderr[-3000:]
    assert report["halted"] is True
    assert report["halt_step"] == 7
    assert report["primary"]["stage"] == 1
    assert report["primary"]["code"] == "DATA_NONFINITE"
    assert report["primary"]["evidence"]["tensor"] == "inputs"
    outcome = _outcomes(tmp_path)[0]
    assert outcome["steps_completed"] == 7
    assert outcome["params_finite"] is True


def test_run_healthy_script_exits_zero(tmp_path: Path) -> None:
    result, report = _run([], _training(tmp_path), tmp_path)

    assert result.returncode == 0, result.stderr[-3000:]
    assert report["halted"] is False
    assert report["last_step"] == 29
    assert all(finding["severity"] == "info" for finding in report["findings"])


def test_run_passes_script_exit_code(tmp_path: Path) -> None:
    result, _ = _run([], _training(tmp_path, "--steps", "3", "--exit-code", "3"), tmp_path)
    assert result.returncode == 3


def test_run_script_without_torch(tmp_path: Path) -> None:
    result, report = _run([], [sys.executable, str(SCRIPTS / "no_torch.py"), "5"], tmp_path)
    assert result.returncode == 5
    assert "plain python ran" in result.stdout
    assert report == {}


def test_run_custom_halt_exit_code(tmp_path: Path) -> None:
    result, _ = _run(["--halt-exit-code", "77"], _training(tmp_path, "--nan-step", "2"), tmp_path)
    assert result.returncode == 77


def test_run_torchrun_one_rank_nan(tmp_path: Path) -> None:
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
                "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "--max-restarts", "0"]
    command = [*torchrun, str(SCRIPTS / "digits_training.py"), "--out", str(tmp_path),
               "--nan-step", "5", "--nan-rank", "1"]
    result, report = _run([], command, tmp_path)

    assert result.returncode == DEFAULT_HALT_EXIT_CODE, result.stderr[-3000:]
    assert report["halted"] is True
    assert report["halt_step"] == 5
    assert report["world_size"] == 2
    assert report["primary"]["code"] == "DATA_NONFINITE"
    assert report["primary"]["evidence"]["rank"] == 1
    assert report["halt_first_rank"] == 1
    outcomes = _outcomes(tmp_path)
    for rank in (0, 1):
        assert outcomes[rank]["steps_completed"] == 5, outcomes
        assert outcomes[rank]["params_finite"] is True


def test_run_reports_to_given_endpoint(tmp_path: Path, service: object, stub: pb_grpc.NanwatchStub) -> None:
    options = ["--endpoint", service.endpoint, "--run-id", "zero-code-1"]  # type: ignore[attr-defined]
    result, _ = _run(options, _training(tmp_path, "--nan-step", "4"), tmp_path)

    assert result.returncode == DEFAULT_HALT_EXIT_CODE, result.stderr[-3000:]
    status = stub.GetRunStatus(pb.GetRunStatusRequest(run_id="zero-code-1"), timeout=DEADLINE_S)
    assert status.summary.halted
    assert status.summary.halt_step == 4


def test_run_without_command_is_usage_error() -> None:
    result = subprocess.run([*NANWATCH_RUN], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "missing COMMAND" in result.stderr
