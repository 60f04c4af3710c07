"""Entry point of the ``nanwatch`` command: parses arguments and dispatches to a subcommand."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from nanwatch.cli import remote
from nanwatch.cli.run import add_run_parser
from nanwatch.cli.serve import add_memory_limit_arguments
from nanwatch.endpoint import ENDPOINT_ENV, default_endpoint

EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nanwatch",
        description="Training-run health checks for PyTorch: catch NaN before the update, diagnose it, halt every rank.",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (DEBUG, INFO, WARNING, ERROR)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the service (gRPC + Prometheus /metrics)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 in a container (default 127.0.0.1)")
    serve.add_argument("--grpc-port", type=int, default=50051, help="gRPC port (default 50051)")
    serve.add_argument("--metrics-port", type=int, default=9400, help="Prometheus port, path /metrics (default 9400)")
    serve.add_argument("--db", default="nanwatch.db", help="SQLite store path (default ./nanwatch.db)")
    serve.add_argument("--thresholds", default=None, help="JSON file of check thresholds (default: built-in)")
    serve.add_argument(
        "--no-rank-label", action="store_true",
        help="one series per run instead of per rank for loss, grad norm and step gauges",
    )
    serve.add_argument("--grace-seconds", type=float, default=5.0, help="drain time on SIGTERM (default 5)")
    serve.add_argument("--tls-cert", default=None, help="PEM server certificate chain; with --tls-key the gRPC port uses TLS")
    serve.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    serve.add_argument("--tls-client-ca", default=None,
                       help="PEM CA bundle; clients must present a certificate it signed (mutual TLS)")
    serve.add_argument("--token-file", default=None,
                       help="file holding the API token (default $NANWATCH_TOKEN_FILE, else $NANWATCH_TOKEN)")
    serve.add_argument("--auth", choices=["all", "operator", "none"], default=None,
                       help="calls that need the token: all (except health checks), operator (HaltRun) or none; "
                            "default operator when a token is configured, else none")
    serve.add_argument("--health-port", type=int, default=None,
                       help="extra plaintext port serving only grpc.health.v1, for Kubernetes probes of a TLS port")
    serve.add_argument("--max-runs-in-metrics", type=int, default=1000,
                       help="most runs with per-run metric series; the earliest finished run gives way (default 1000)")
    serve.add_argument("--metrics-run-ttl-seconds", type=float, default=3600.0,
                       help="remove a run's metric series this long after its last rank disconnected (default 3600)")
    add_memory_limit_arguments(serve)

    endpoint_help = f"service address HOST:PORT (default ${ENDPOINT_ENV} or {default_endpoint()})"
    tls_ca_help = "PEM CA that signed the service's TLS certificate (default $NANWATCH_TLS_CA; unset: plaintext)"
    runs = commands.add_parser("runs", help="list runs, newest first")
    runs.add_argument("--endpoint", default=None, help=endpoint_help)
    runs.add_argument("--tls-ca", default=None, help=tls_ca_help)
    runs.add_argument("--limit", type=int, default=50, help="maximum number of runs (default 50)")
    runs.add_argument("--json", action="store_true", help="print JSON instead of a table")

    status = commands.add_parser("status", help="the staged checklist and findings of a run")
    status.add_argument("run_id", metavar="RUN_ID")
    status.add_argument("--endpoint", default=None, help=endpoint_help)
    status.add_argument("--tls-ca", default=None, help=tls_ca_help)
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")

    halt = commands.add_parser("halt", help="halt every rank of a run at its next step")
    halt.add_argument("run_id", metavar="RUN_ID")
    halt.add_argument("--reason", required=True, help="why the run is halted; shown on every rank")
    halt.add_argument("--endpoint", default=None, help=endpoint_help)
    halt.add_argument("--tls-ca", default=None, help=tls_ca_help)

    add_run_parser(commands)

    demo = commands.add_parser("demo", help="train on scikit-learn digits under torchrun with a planted fault")
    demo.add_argument("--fault", choices=["none", "data", "lr", "loss"], default="lr",
                      help="fault to plant: none, a NaN pixel (data), a far too high learning rate (lr), "
                           "sigmoid with a hand-written BCE (loss); default lr")
    demo.add_argument("--steps", type=int, default=200, help="training steps (default 200)")
    demo.add_argument("--nproc", type=int, default=2, help="torchrun processes (default 2)")
    demo.add_argument("--endpoint", default=None, help="use this service instead of starting a local one")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:
        # The reader of stdout went away (as with `| head`); stop quietly like other Unix tools.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    if args.command == "serve":
        from nanwatch.cli.serve import run_serve

        return run_serve(args)
    if args.command == "run":
        from nanwatch.cli.run import run_command

        return run_command(args)
    if args.command == "demo":
        from nanwatch.cli.demo import run_demo_command

        return run_demo_command(args)
    return remote.run_remote_command(args)


if __name__ == "__main__":
    sys.exit(main())
