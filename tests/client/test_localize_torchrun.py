"""Localization under torchrun with embedded Watchers: the rank whose values went non-finite replays the step."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import grpc

from conftest import free_port
from nanwatch.v1 import nanwatch_pb2 as pb
from nanwatch.v1 import nanwatch_pb2_grpc as pb_grpc

WORKER = pathlib.Path(__file__).with_name("skip_worker.py")
JOB_TIMEOUT_S = 120


def test_torchrun_location_names_bad_rank(tmp_path: pathlib.Path, service: object) -> None:
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
               str(WORKER), str(tmp_path), service.endpoint, "located-ddp", "1", "2", "0"]  # type: ignore[attr-defined]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-3000:]

    with grpc.insecure_channel(service.endpoint) as channel:  # type: ignore[attr-defined]
        status = pb_grpc.NanwatchStub(channel).GetRunStatus(pb.GetRunStatusRequest(run_id="located-ddp"))
    located = [finding.evidence.location for finding in status.findings if finding.evidence.HasField("location")]
    assert status.summary.halt_step == 2
    assert located
    assert {location.rank for location in located} == {1}
    assert located[0].phase == pb.LOCATION_PHASE_LOSS_FORWARD
