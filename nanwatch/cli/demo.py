"""``nanwatch demo``: a local service watching a 2-rank torchrun job on scikit-learn digits."""

from __future__ import annotations

import argparse
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import TextIO

import grpc

from nanwatch.cli.report import render_status
from nanwatch.v1 import nanwatch_pb2 as pb
from nanwatch.v1 import nanwatch_pb2_grpc as pb_grpc

DEADLINE_S = 10.0
EXIT_DEMO_FAILED = 1


def run_demo_command(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    """Run the demo; return 0 when the job behaved as its fault predicts (halt or clean finish)."""
    from nanwatch.demo.launcher import run_demo

    if args.endpoint:
        return _report(run_demo(args.fault, steps=args.steps, nproc=args.nproc, endpoint=args.endpoint, out=out),
                       args.endpoint, metrics_url=None, out=out)

    from nanwatch.service.server import BackgroundService, ServiceConfig

    with tempfile.TemporaryDirectory(prefix="nanwatch-demo-") as folder:
        config = ServiceConfig(grpc_port=0, metrics_port=0, db_path=str(Path(folder) / "demo.db"), grace_s=1.0)
        with BackgroundService(config) as service:
            print(f"nanwatch service on {service.endpoint}, metrics at {service.metrics_url}", file=out)
            print(f"training on digits with torchrun, {args.nproc} processes, fault={args.fault}", file=out)
            result = run_demo(args.fault, steps=args.steps, nproc=args.nproc, endpoint=service.endpoint, out=out)
            return _report(result, service.endpoint, metrics_url=service.metrics_url, out=out)


def _report(result: object, endpoint: str, *, metrics_url: str | None, out: TextIO) -> int:
    from nanwatch.demo.launcher import DemoResult

    assert isinstance(result, DemoResult)
    _section("ranks", out)
    for rank, outcome in enumerate(result.ranks):
        if outcome is None:
            print(f"rank {rank}: wrote no result (stopped by torchrun)", file=out)
        elif outcome.halted:
            print(f"rank {rank}: halted at step {outcome.halt_step} ({outcome.halt_source}); "
                  f"parameters finite: {outcome.params_finite}", file=out)
        else:
            print(f"rank {rank}: finished {outcome.steps_run} steps, test accuracy {outcome.accuracy}", file=out)

    _section(f"staged report of run {result.run_id}", out)
    with grpc.insecure_channel(endpoint) as channel:
        status = pb_grpc.NanwatchStub(channel).GetRunStatus(
            pb.GetRunStatusRequest(run_id=result.run_id), timeout=DEADLINE_S
        )
    print(render_status(status), file=out)

    if metrics_url is not None:
        _section(f"/metrics lines of run {result.run_id}", out)
        for line in _metric_lines(metrics_url, result.run_id):
            print(line, file=out)

    expected_halt = result.fault != "none"
    behaved = result.halted == expected_halt and (result.halted or result.torchrun_exit_code == 0)
    if not behaved:
        print(f"\nthe demo did not behave as expected: halted={result.halted}, "
              f"torchrun exit code {result.torchrun_exit_code}", file=out)
    return 0 if behaved else EXIT_DEMO_FAILED


def _metric_lines(metrics_url: str, run_id: str) -> list[str]:
    with urllib.request.urlopen(metrics_url, timeout=DEADLINE_S) as response:
        text = response.read().decode()
    # The *_created samples of counters only repeat creation times, so the demo leaves them out.
    return [
        line for line in text.splitlines()
        if f'run_id="{run_id}"' in line and not line.startswith("#") and "_created{" not in line
    ]


def _section(title: str, out: TextIO) -> None:
    print(f"\n== {title} ==", file=out)
