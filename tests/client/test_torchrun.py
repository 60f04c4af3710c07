"""Gloo ranks under torchrun halt together at one step, whether one rank or every rank saw the NaN."""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys

import grpc
import pytest

from conftest import free_port
from nanwatch.v1 import nanwatch_pb2 as pb
from nanwatch.v1 import nanwatch_pb2_grpc as pb_grpc

WORKER = pathlib.Path(__file__).with_name("torchrun_worker.py")
NAN_STEP = 2
HALT_CODE = 42
# A hang guard, not a measurement: four ranks start and halt in about 15 s on two cores.
JOB_TIMEOUT_S = 120


def run_torchrun(out_dir: pathlib.Path, endpoint: str, nproc: int, nan_ranks: str,
                 run_id: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run the worker under torchrun on the loopback interface and return the finished process."""
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    env.pop("NANWATCH_HALT_EXIT_CODE", None)
    env.pop("NANWATCH_RUN_ID", None)
    if run_id is not None:
        env["NANWATCH_RUN_ID"] = run_id
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
        str(WORKER), str(out_dir), endpoint, nan_ranks,
    ]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S)


def read_results(out_dir: pathlib.Path, nproc: int) -> list[dict[str, object]]:
    return [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in range(nproc)]


def worker_exit_codes(stderr: str) -> set[int]:
    """Return the worker exit codes that torchrun's failure summary lists."""
    return {int(code) for code in re.findall(r"exitcode\s*:\s*(-?\d+)", stderr)}


def test_torchrun_ranks_halt_together(tmp_path, dead_endpoint) -> None:  # type: ignore[no-untyped-def]
    result = run_torchrun(tmp_path, dead_endpoint, 2, "1")
    ranks = read_results(tmp_path, 2)

    # torchrun exits 1 whatever exit code its workers had, and it stops the slower worker
    # when the first one exits, so each worker records its HaltError's exit code itself.
    assert result.returncode != 0, result.stderr[-2000:]
    assert [r["step"] for r in ranks] == [2, 2]
    assert [r["exit_code"] for r in ranks] == [42, 42]
    assert [r["source"] for r in ranks] == ["agreed", "local"]
    assert "rank 1: non-finite batch data" in ranks[0]["reason"]
    assert ranks[0]["names"] == ["weight", "bias"]
    assert ranks[0]["run_id"] == ranks[1]["run_id"]


@pytest.mark.parametrize(
    ("nproc", "nan_ranks", "first_rank"),
    [(4, "2", 2), (2, "all", 0), (4, "all", 0)],
    ids=["4-ranks-one-bad", "2-ranks-all-bad", "4-ranks-all-bad"],
)
def test_torchrun_halt_reaches_service(tmp_path, nproc: int, nan_ranks: str, first_rank: int) -> None:  # type: ignore[no-untyped-def]
    from nanwatch.service.server import BackgroundService, ServiceConfig

    run_id = f"torchrun-{nproc}-{nan_ranks}"
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    config = ServiceConfig(grpc_port=0, metrics_port=0, db_path=str(tmp_path / "nanwatch.db"), grace_s=1.0)
    with BackgroundService(config) as service:
        result = run_torchrun(out_dir, service.endpoint, nproc, nan_ranks, run_id=run_id)
        with grpc.insecure_channel(service.endpoint) as channel:
            status = pb_grpc.NanwatchStub(channel).GetRunStatus(pb.GetRunStatusRequest(run_id=run_id), timeout=10)
    ranks = read_results(out_dir, nproc)
    bad = set(range(nproc)) if nan_ranks == "all" else {int(nan_ranks)}

    assert result.returncode != 0, result.stderr[-2000:]
    assert [r["step"] for r in ranks] == [NAN_STEP] * nproc
    assert [r["exit_code"] for r in ranks] == [HALT_CODE] * nproc
    assert [r["source"] for r in ranks] == ["local" if rank in bad else "agreed" for rank in range(nproc)]
    assert worker_exit_codes(result.stderr) <= {HALT_CODE, -15}, result.stderr[-2000:]
    assert HALT_CODE in worker_exit_codes(result.stderr), result.stderr[-2000:]
    assert status.summary.halted
    assert status.summary.halt_step == NAN_STEP
    assert status.halt_first_rank == first_rank
    assert status.summary.primary.code == "DATA_NONFINITE"
    assert status.summary.primary.evidence.rank == first_rank
    assert status.summary.primary.evidence.step == NAN_STEP
