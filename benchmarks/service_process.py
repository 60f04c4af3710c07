"""A server in its own process for the throughput benchmark: nanwatch or the bare echo server.

It prints {"port": N} on stdout, then replies to each "usage" line on stdin with one
JSON line of its CPU seconds (in all and per thread), resident memory and received
message count, and stops on "quit" or at the end of stdin. Its own CPU time comes
from resource.getrusage, so the load generator's work is not counted. Under load the
busiest thread is the event loop that runs the Python handlers, so its CPU share
shows how close one process is to its limit while gRPC core's threads use other cores.

    python -m benchmarks.service_process --kind nanwatch --db /tmp/x/nanwatch.db

With --source DIR, the nanwatch package is imported from DIR (a tree that
benchmarks.service_throughput.export_revision laid out from a git revision), so
an older service runs under the same benchmark.
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
CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def resident_bytes() -> int:
    """Return this process's current resident set size in bytes (Linux /proc)."""
    with open("/proc/self/statm", encoding="ascii") as statm:
        return int(statm.read().split()[1]) * PAGE_BYTES


def thread_cpu_seconds() -> dict[str, float]:
    """Return the CPU seconds (user + system) of each thread of this process by thread id (Linux /proc)."""
    seconds = {}
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/stat", encoding="ascii") as stat:
                # Fields after the parenthesized name; utime and stime are fields 14 and 15 of the line.
                fields = stat.read().rpartition(")")[2].split()
        except FileNotFoundError:
            continue  # the thread ended meanwhile
        seconds[task] = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS_PER_S
    return seconds


def usage(messages: Callable[[], float]) -> dict[str, object]:
    """Return CPU seconds (user + system, in all and per thread), resident bytes and received messages."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    return {"cpu_s": own.ru_utime + own.ru_stime, "thread_cpu_s": thread_cpu_seconds(),
            "rss_bytes": resident_bytes(), "messages": messages()}


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
    parser.add_argument("--source", default="", help="folder to import the nanwatch package from (default: installed)")
    args = parser.parse_args()
    if args.source:
        # Nothing of nanwatch is imported yet, so the package and all its modules come from there.
        sys.path.insert(0, args.source)
    port, messages, stop = start_nanwatch(args.db) if args.kind == "nanwatch" else start_echo()
    print(json.dumps({"port": port}), flush=True)
    for line in sys.stdin:
        if line.strip() == "quit":
            break
        print(json.dumps(usage(messages)), flush=True)
    stop()


if __name__ == "__main__":
    main()
