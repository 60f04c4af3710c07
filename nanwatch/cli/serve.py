"""``nanwatch serve``: run the service in the foreground."""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable

logger = logging.getLogger(__name__)

MAX_LIVE_RUNS_ENV = "NANWATCH_MAX_LIVE_RUNS"
LIVE_RUN_TTL_ENV = "NANWATCH_LIVE_RUN_TTL_SECONDS"
MAX_PENDING_REQUESTS_ENV = "NANWATCH_MAX_PENDING_REQUESTS"


def add_memory_limit_arguments(serve: argparse.ArgumentParser) -> None:
    """Add the options that bound the runs held in memory and the queue of calls not yet accepted.

    Each option defaults to its environment variable, else to the ServiceConfig default.
    """
    serve.add_argument("--max-live-runs", type=int, default=None,
                       help=f"maximum number of runs held in memory; the idle run with the oldest activity gives way "
                            f"(default ${MAX_LIVE_RUNS_ENV}, else 1000)")
    serve.add_argument("--live-run-ttl-seconds", type=float, default=None,
                       help=f"remove a run from memory, not from the store, after this many seconds without a "
                            f"connected rank or report (default ${LIVE_RUN_TTL_ENV}, else 3600)")
    serve.add_argument("--max-pending-requests", type=int, default=None,
                       help=f"maximum number of incoming calls queued before the service accepts them; at least "
                            f"the largest number of ranks that start at once "
                            f"(default ${MAX_PENDING_REQUESTS_ENV}, else 16384)")


def run_serve(args: argparse.Namespace) -> int:
    try:
        from nanwatch.service.auth import read_token
        from nanwatch.service.server import ServiceConfig, serve
    except ImportError as error:
        logger.error("the service dependencies are missing (%s); install them with: pip install 'nanwatch[service]'", error)
        return 2
    try:
        config = ServiceConfig(
            host=args.host,
            grpc_port=args.grpc_port,
            metrics_port=args.metrics_port,
            db_path=args.db,
            thresholds_path=args.thresholds,
            rank_label=not args.no_rank_label,
            grace_s=args.grace_seconds,
            tls_cert_path=args.tls_cert,
            tls_key_path=args.tls_key,
            tls_client_ca_path=args.tls_client_ca,
            token=read_token(args.token_file),
            auth_mode=args.auth,
            health_port=args.health_port,
            max_runs_in_metrics=args.max_runs_in_metrics,
            metrics_run_ttl_s=args.metrics_run_ttl_seconds,
            **memory_limits(args),
        )
        config.load_thresholds()
        config.server_credentials()  # reads the TLS files now, so a bad path fails before binding
    except ValueError as error:
        logger.error("invalid setting: %s%s", error, setting_hint(str(error)))
        return 2
    try:
        serve(config)
    except (OSError, ValueError) as error:
        logger.error("cannot start the service: %s", error)
        return 2
    return 0


# ServiceConfig fields whose validation errors name the field, and where a user sets them.
_SETTING_SOURCES = {
    "max_live_runs": f"--max-live-runs or ${MAX_LIVE_RUNS_ENV}",
    "live_run_ttl_s": f"--live-run-ttl-seconds or ${LIVE_RUN_TTL_ENV}",
    "max_pending_requests": f"--max-pending-requests or ${MAX_PENDING_REQUESTS_ENV}",
    "max_runs_in_metrics": "--max-runs-in-metrics",
    "metrics_run_ttl_s": "--metrics-run-ttl-seconds",
    "grace_s": "--grace-seconds",
}


def setting_hint(message: str) -> str:
    """Return " (set by --flag or $VARIABLE)" for the first ServiceConfig field that message names, else ""."""
    for field_name, source in _SETTING_SOURCES.items():
        if message.startswith(f"{field_name}=") or f" {field_name}=" in message:
            return f" (set by {source})"
    return ""


def memory_limits(args: argparse.Namespace) -> dict[str, int | float]:
    """Return the ServiceConfig memory limits set by an option or environment variable; unset ones are left out.

    Raises:
        ValueError: an environment variable does not hold a number.
    """
    limits: dict[str, int | float] = {}
    settings: list[tuple[str, str, str, Callable[[str], int | float]]] = [
        ("max_live_runs", "max_live_runs", MAX_LIVE_RUNS_ENV, int),
        ("live_run_ttl_s", "live_run_ttl_seconds", LIVE_RUN_TTL_ENV, float),
        ("max_pending_requests", "max_pending_requests", MAX_PENDING_REQUESTS_ENV, int),
    ]
    for field_name, option, variable, parse in settings:
        value = _option_or_env(args, option, variable, parse)
        if value is not None:
            limits[field_name] = value
    return limits


def _option_or_env(
    args: argparse.Namespace, option: str, variable: str, parse: Callable[[str], int | float]
) -> int | float | None:
    # The parser may lack the option (it is added by add_memory_limit_arguments), so a missing
    # attribute means "not given on the command line".
    from_option = getattr(args, option, None)
    if from_option is not None:
        return from_option  # type: ignore[no-any-return]
    text = os.environ.get(variable, "").strip()
    if not text:
        return None
    try:
        return parse(text)
    except ValueError:
        kind = "an integer" if parse is int else "a number"
        raise ValueError(f"${variable}={text!r} is not {kind}; set {kind} or unset it") from None
