"""``nanwatch run -- COMMAND...``: watch an unmodified training command.

The command runs with nanwatch's sitecustomize first on PYTHONPATH, so every
Python process it starts (torchrun's workers too) installs the zero-code hooks
once it imports torch. Settings reach those processes through the environment.
Without --endpoint an in-process service with the same check engine runs for
the duration of the command.

torchrun exits 1 whatever its workers' exit codes were, so each halted worker
leaves a marker file and this command exits with the halt exit code itself.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import TextIO

import grpc

from nanwatch.bootstrap import (
    AUTOWATCH_ENV, BOOTSTRAP_DIR, MAX_CONSECUTIVE_SKIPS_ENV, RUN_DIR_ENV, max_consecutive_skips_from_env,
)
from nanwatch.cli.report import render_status, status_to_json
from nanwatch.endpoint import ENDPOINT_ENV, validate_endpoint
from nanwatch.errors import HALT_EXIT_CODE_ENV, halt_exit_code
from nanwatch.run_id import RUN_ID_ENV, validate_run_id
from nanwatch.service.auth import AuthConfigError, bearer_metadata, read_client_tls, read_token
from nanwatch.v1 import nanwatch_pb2 as pb
from nanwatch.v1 import nanwatch_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

DEADLINE_S = 10.0
EXIT_USAGE = 2


def add_run_parser(commands: argparse._SubParsersAction) -> None:
    run = commands.add_parser(
        "run", help="run an unmodified training command with every module and optimizer watched",
        description="Run COMMAND (python train.py ... or torchrun ... train.py ...) with nanwatch's "
                    "zero-code hooks. Exits with the halt exit code when the run was halted.",
    )
    run.add_argument("--endpoint", default=None,
                     help="service HOST:PORT; default: start an in-process service for this command")
    run.add_argument("--run-id", default=None, help=f"run id (default ${RUN_ID_ENV} or a generated one)")
    run.add_argument("--halt-exit-code", type=int, default=None,
                     help=f"exit code when the run was halted (default ${HALT_EXIT_CODE_ENV} or 42)")
    run.add_argument("--report-json", default=None,
                     help="write the run's status as JSON to this file when the command ends")
    run.add_argument("--quiet", action="store_true", help="do not print the staged report at the end")
    run.add_argument("--max-consecutive-skips", type=int, default=None, metavar="N",
                     help="skip the update of a step whose loss or gradients are non-finite on any rank, up to N "
                          f"steps in a row, then halt (default ${MAX_CONSECUTIVE_SKIPS_ENV} or 0: halt at once)")
    run.add_argument("training_command", nargs=argparse.REMAINDER, metavar="-- COMMAND...")


def run_command(args: argparse.Namespace, out: TextIO = sys.stderr) -> int:
    command = list(args.training_command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        print("nanwatch run: missing COMMAND; usage: nanwatch run [options] -- python train.py ...", file=out)
        return EXIT_USAGE
    try:
        run_id = validate_run_id(args.run_id or os.environ.get(RUN_ID_ENV) or _new_run_id())
        exit_code = args.halt_exit_code if args.halt_exit_code is not None else halt_exit_code()
        if args.endpoint:
            validate_endpoint(args.endpoint)
    except ValueError as error:
        print(f"nanwatch run: {error}", file=out)
        return EXIT_USAGE
    if not 1 <= exit_code <= 255:
        print(f"nanwatch run: --halt-exit-code {exit_code} is outside 1..255", file=out)
        return EXIT_USAGE
    if args.max_consecutive_skips is not None and args.max_consecutive_skips < 0:
        print(f"nanwatch run: --max-consecutive-skips {args.max_consecutive_skips} is negative; give 0 or more",
              file=out)
        return EXIT_USAGE
    try:
        if args.max_consecutive_skips is None:
            max_consecutive_skips_from_env()
    except ValueError as error:
        print(f"nanwatch run: {error}, or use --max-consecutive-skips", file=out)
        return EXIT_USAGE

    with tempfile.TemporaryDirectory(prefix="nanwatch-run-") as folder:
        run_dir = Path(folder)
        if args.endpoint:
            return _run_watched(command, args, run_id, args.endpoint, run_dir, exit_code, out)
        from nanwatch.service.server import BackgroundService, ServiceConfig

        config = ServiceConfig(grpc_port=0, metrics_port=0, db_path=str(run_dir / "nanwatch.db"), grace_s=1.0)
        with BackgroundService(config) as service:
            logger.info("in-process nanwatch service on %s for run %s", service.endpoint, run_id)
            return _run_watched(command, args, run_id, service.endpoint, run_dir, exit_code, out)


def _run_watched(command: list[str], args: argparse.Namespace, run_id: str, endpoint: str, run_dir: Path,
                 exit_code: int, out: TextIO) -> int:
    environment = _child_environment(run_id, endpoint, run_dir, exit_code)
    if args.max_consecutive_skips is not None:
        environment[MAX_CONSECUTIVE_SKIPS_ENV] = str(args.max_consecutive_skips)
    child_exit = _run_child(command, environment)
    halts = _read_halt_markers(run_dir)
    status = _fetch_status(endpoint, run_id)
    halted = bool(halts) or (status is not None and status.summary.halted)

    if status is not None and args.report_json:
        Path(args.report_json).write_text(json.dumps(status_to_json(status), indent=2))
    if status is not None and not args.quiet:
        print(f"\n== nanwatch: run {run_id} ==\n{render_status(status)}", file=out)
    if halted:
        step = halts[0]["step"] if halts else status.summary.halt_step  # type: ignore[union-attr]
        print(f"nanwatch run: run {run_id} halted at step {step}; exit code {exit_code}", file=out)
        return exit_code
    return child_exit


def _child_environment(run_id: str, endpoint: str, run_dir: Path, exit_code: int) -> dict[str, str]:
    environment = dict(os.environ)
    python_path = environment.get("PYTHONPATH", "")
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(BOOTSTRAP_DIR), python_path]))
    environment[AUTOWATCH_ENV] = "1"
    environment[RUN_ID_ENV] = run_id
    environment[ENDPOINT_ENV] = endpoint
    environment[RUN_DIR_ENV] = str(run_dir)
    environment[HALT_EXIT_CODE_ENV] = str(exit_code)
    return environment


def _run_child(command: list[str], environment: dict[str, str]) -> int:
    """Run the command, passing SIGTERM and SIGINT on to it; return its exit code."""
    try:
        process = subprocess.Popen(command, env=environment)
    except OSError as error:
        logger.error("cannot start %s: %s", command[0], error)
        return 127

    def forward(signum: int, unused_frame: object) -> None:
        process.send_signal(signum)

    previous = {signum: signal.signal(signum, forward) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        return process.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _read_halt_markers(run_dir: Path) -> list[dict[str, object]]:
    markers = []
    for path in sorted(run_dir.glob("halt-*.json")):
        try:
            markers.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as error:
            logger.warning("unreadable halt marker %s: %s", path, error)
    return markers


def _fetch_status(endpoint: str, run_id: str) -> pb.RunStatus | None:
    """Return the run's status, or None when the service is unreachable or never saw the run.

    TLS and the token come from the same environment variables the training processes read.
    """
    try:
        tls = read_client_tls(None)
        metadata = bearer_metadata(read_token())
    except AuthConfigError as error:
        logger.warning("no status for run %s: %s", run_id, error)
        return None
    channel = grpc.secure_channel(endpoint, tls.credentials()) if tls else grpc.insecure_channel(endpoint)
    with channel:
        try:
            return pb_grpc.NanwatchStub(channel).GetRunStatus(pb.GetRunStatusRequest(run_id=run_id),
                                                              timeout=DEADLINE_S, metadata=metadata)
        except grpc.RpcError as error:
            logger.warning("no status for run %s from %s: %s", run_id, endpoint, error.details())  # type: ignore[attr-defined]
            return None


def _new_run_id() -> str:
    return f"run-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:6]}"
