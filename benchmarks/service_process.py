"""A server in its own process for the throughput benchmark: nanwatch or the bare echo server.

It prints {"port": N} on stdout, then replies to each "usage" line on stdin with one
JSON line of its CPU seconds, resident memory and received message count, and
stops on "quit" or at the end of stdin. Its own CPU time comes from
resource.getrusage, so the load generator's work is not counted.

    python -m benchmarks.service_process --kind nanwatch --db /tmp/x/nanwatch.db
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys
import threading
from collections.abc import Callable

PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


def resident_bytes() -> int:
    """Return this process's current resident set size in bytes (Linux /proc)."""
    with open("/proc/self/statm", encoding="ascii") as statm:
        return int(statm.read().split()[1]) * PAGE_BYTES


def usage(messages: Callable[[], float]) -> dict[str, float]:
    """Return CPU seconds (user + system), resident bytes and received messages of this process."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    return {"cpu_s": own.ru_utime + own.ru_stime, "rss_bytes": resident_bytes(), "messages": messages()}


def start_nanwatch(db_path: str) -> tuple[int, Callable[[], float], Callable[[], None]]:
    """Start the nanwatch service on a free loopback port; return the port, a report counter and a stop."""
    from nanwatch.service.server import BackgroundService, ServiceConfig

    config = ServiceConfig(grpc_port=0, metrics_port=0, db_path=db_path, grace_s=0.5)
    service = BackgroundService(config).start()
    registry = service.running.supervisor.metrics.registry

    def reports() -> float:
        return registry.get_sample_value("nanwatch_reports_total") or 0.0

    return service.running.grpc_port, reports, service.stop


def start_echo() -> tuple[int, Callable[[], float], Callable[[], None]]:
    """Start the bare echo server on its own event-loop thread; return the port, a counter and a stop."""
    from benchmarks.echo_server import MessageCounter, start_echo_server

    counter = MessageCounter()
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, name="echo-server", daemon=True).start()
    server, port = asyncio.run_coroutine_threadsafe(start_echo_server(counter), loop).result(timeout=30)

    def stop() -> None:
        asyncio.run_coroutine_threadsafe(server.stop(0.5), loop).result(timeout=10)

    return port, lambda: float(counter.received), stop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=("nanwatch", "echo"), required=True, help="which server to run")
    parser.add_argument("--db", default=":memory:", help="SQLite store of the nanwatch service")
    args = parser.parse_args()
    port, messages, stop = start_nanwatch(args.db) if args.kind == "nanwatch" else start_echo()
    print(json.dumps({"port": port}), flush=True)
    for line in sys.stdin:
        if line.strip() == "quit":
            break
        print(json.dumps(usage(messages)), flush=True)
    stop()


if __name__ == "__main__":
    main()
