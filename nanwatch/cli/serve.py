"""``nanwatch serve``: run the service in the foreground."""

from __future__ import annotations

import argparse
import logging

logger = logging.getLogger(__name__)


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
        )
        config.load_thresholds()
        config.server_credentials()  # reads the TLS files now, so a bad path fails before binding
    except ValueError as error:
        logger.error("invalid setting: %s", error)
        return 2
    try:
        serve(config)
    except (OSError, ValueError) as error:
        logger.error("cannot start the service: %s", error)
        return 2
    return 0
