"""Client commands that call a running service: ``runs``, ``status``, ``halt``."""

from __future__ import annotations

import argparse
import json
import logging
import sys

import grpc

from nanwatch.cli.report import render_runs, render_status, status_to_json, summary_to_json
from nanwatch.endpoint import default_endpoint, validate_endpoint
from nanwatch.service.auth import AuthConfigError, bearer_metadata, read_client_tls, read_token
from nanwatch.v1 import nanwatch_pb2 as pb
from nanwatch.v1 import nanwatch_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

DEADLINE_S = 10.0
EXIT_RPC_ERROR = 1
EXIT_USAGE = 2


def run_remote_command(args: argparse.Namespace) -> int:
    try:
        endpoint = validate_endpoint(args.endpoint or default_endpoint())
    except ValueError as error:
        print(f"nanwatch {args.command}: {error}", file=sys.stderr)
        return EXIT_USAGE
    if args.command == "halt" and not args.reason.strip():
        print("nanwatch halt: --reason is empty; say why the run is halted (it is shown on every rank)",
              file=sys.stderr)
        return EXIT_USAGE
    try:
        tls = read_client_tls(args.tls_ca)
        metadata = bearer_metadata(read_token())
    except AuthConfigError as error:
        print(f"nanwatch {args.command}: {error}", file=sys.stderr)
        return EXIT_USAGE
    channel = grpc.secure_channel(endpoint, tls.credentials()) if tls else grpc.insecure_channel(endpoint)
    with channel:
        stub = pb_grpc.NanwatchStub(channel)
        try:
            return _dispatch(stub, args, metadata)
        except grpc.RpcError as error:
            print(_explain(error, endpoint), file=sys.stderr)
            return EXIT_RPC_ERROR


def _dispatch(stub: pb_grpc.NanwatchStub, args: argparse.Namespace, metadata: tuple[tuple[str, str], ...]) -> int:
    if args.command == "runs":
        response = stub.ListRuns(pb.ListRunsRequest(limit=args.limit), timeout=DEADLINE_S, metadata=metadata)
        if args.json:
            print(json.dumps([summary_to_json(run) for run in response.runs], indent=2))
        else:
            print(render_runs(list(response.runs)) if response.runs else "no runs")
        return 0
    if args.command == "status":
        status = stub.GetRunStatus(pb.GetRunStatusRequest(run_id=args.run_id), timeout=DEADLINE_S, metadata=metadata)
        print(json.dumps(status_to_json(status), indent=2) if args.json else render_status(status))
        return 0
    if args.command == "halt":
        response = stub.HaltRun(pb.HaltRunRequest(run_id=args.run_id, reason=args.reason), timeout=DEADLINE_S, metadata=metadata)
        halt = response.halt
        prefix = "run was already halted" if response.already_halted else "halted"
        print(f"{prefix}: run {halt.run_id} stops at step {halt.halt_step}: {halt.reason}")
        return 0
    raise ValueError(f"unknown command {args.command!r}")


def _explain(error: grpc.RpcError, endpoint: str) -> str:
    code = error.code()  # type: ignore[attr-defined]
    details = error.details()  # type: ignore[attr-defined]
    if code == grpc.StatusCode.UNAVAILABLE:
        return (f"cannot reach the nanwatch service at {endpoint}: {details}. "
                "Start it with `nanwatch serve` or pass --endpoint HOST:PORT.")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"the nanwatch service at {endpoint} did not answer within {DEADLINE_S:.0f} s"
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return f"{code.name}: {details}. Set NANWATCH_TOKEN_FILE or NANWATCH_TOKEN to the service's token."
    return f"{code.name}: {details}"
