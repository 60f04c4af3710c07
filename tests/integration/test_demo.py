"""The demo end to end: a 2-rank torchrun job on digits, watched by a real service on loopback.

Each planted fault is first run without nanwatch to measure, with the job's own
plain-torch check, the first step where an input, the loss or a gradient is
non-finite. The watched run must halt both ranks at exactly that step.
"""

from __future__ import annotations

import io
import subprocess
import sys

import pytest

from nanwatch.demo.launcher import DemoResult, run_demo
from nanwatch.errors import DEFAULT_HALT_EXIT_CODE
from nanwatch.v1 import nanwatch_pb2 as pb
from nanwatch.v1 import nanwatch_pb2_grpc as pb_grpc
from tests.service.helpers import DEADLINE_S

STEPS = 60
PLANTED_STAGE = {"data": pb.STAGE_DATA, "lr": pb.STAGE_HYPERPARAMETERS, "loss": pb.STAGE_LOSS}


def _first_nonfinite_step(reference: DemoResult) -> int:
    steps = [rank.first_nonfinite_step for rank in reference.ranks if rank and rank.first_nonfinite_step is not None]
    assert steps, f"the unwatched {reference.fault} run never went non-finite in {STEPS} steps"
    return min(steps)


@pytest.mark.parametrize("fault", ["data", "lr", "loss"])
def test_fault_halts_ranks_at_first_nonfinite(fault: str, service: object, stub: pb_grpc.NanwatchStub) -> None:
    expected_step = _first_nonfinite_step(run_demo(fault, steps=STEPS, out=io.StringIO()))

    output = io.StringIO()
    watched = run_demo(fault, steps=STEPS, endpoint=service.endpoint, out=output)  # type: ignore[attr-defined]

    assert watched.exit_code == DEFAULT_HALT_EXIT_CODE
    assert "nanwatch's halt exit code" in output.getvalue()
    for rank, outcome in enumerate(watched.ranks):
        assert outcome is not None, f"rank {rank} wrote no result"
        assert outcome.halted, f"rank {rank} was not halted"
        assert outcome.halt_step == expected_step, f"rank {rank} halted at {outcome.halt_step}"
        assert outcome.params_finite, f"rank {rank} has non-finite parameters after the halt"
    status = stub.GetRunStatus(pb.GetRunStatusRequest(run_id=watched.run_id), timeout=DEADLINE_S)
    assert status.summary.halted
    assert status.summary.halt_step == expected_step
    assert status.summary.primary.stage == PLANTED_STAGE[fault], status.summary.primary
    if fault == "data":
        # Only rank 0's shard contains the NaN samples. Rank 1 gets NaN gradients from the all-reduce.
        assert status.halt_first_rank == 0


def test_fault_none_trains_without_halt(service: object, stub: pb_grpc.NanwatchStub) -> None:
    output = io.StringIO()
    result = run_demo("none", steps=STEPS, endpoint=service.endpoint, out=output)  # type: ignore[attr-defined]

    assert result.torchrun_exit_code == 0
    assert "halt exit code" not in output.getvalue()
    assert not result.halted
    for outcome in result.ranks:
        assert outcome is not None
        assert outcome.steps_run == STEPS
        assert outcome.first_nonfinite_step is None
    status = stub.GetRunStatus(pb.GetRunStatusRequest(run_id=result.run_id), timeout=DEADLINE_S)
    assert not status.summary.halted
    assert status.summary.last_step == STEPS - 1
    severities = [finding.severity for finding in status.findings]
    assert pb.SEVERITY_CRITICAL not in severities
    assert pb.SEVERITY_WARNING not in severities


def test_demo_command_prints_halts_report_metrics() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "nanwatch.cli.main", "demo", "--fault", "data", "--steps", "40"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    out = result.stdout
    assert "rank 0: halted at step 20" in out
    assert "rank 1: halted at step 20" in out
    assert "primary cause: stage 1 (data) DATA_NONFINITE" in out
    assert "nanwatch_run_halted{" in out
    assert "nanwatch_halts_total{" in out
