"""Service throughput, CPU and memory per rank, and HALT fan-out latency, over real gRPC on loopback.

The server and the load generator run in separate processes, so the server's CPU
time (resource.getrusage in its own process) excludes the simulated ranks' work.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.trials import percentile

REPO_ROOT = Path(__file__).resolve().parent.parent
KINDS = ("nanwatch", "sink", "echo")
"""nanwatch's Watch stream, and the bare server that only reads (sink) or sends every message back (echo)."""
PROCESS_TIMEOUT_S = 600


class ServerProcess:
    """A server started by benchmarks.service_process, queried over its stdin and stdout."""

    def __init__(self, kind: str, directory: str) -> None:
        server_kind = "nanwatch" if kind == "nanwatch" else "echo"
        self.stderr = open(Path(directory) / f"{kind}-server.log", "w", encoding="utf-8")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.service_process", "--kind", server_kind,
             "--db", str(Path(directory) / f"{kind}-{time.time_ns()}.db")],
            cwd=REPO_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True,
        )
        self.port = int(self._read()["port"])

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _read(self) -> dict[str, float]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the server process exited with code {self.process.wait()}; see {self.stderr.name}")
        return json.loads(line)

    def usage(self) -> dict[str, float]:
        """Return the server's CPU seconds, resident bytes and received messages now."""
        assert self.process.stdin is not None
        self.process.stdin.write("usage\n")
        self.process.stdin.flush()
        return self._read()

    def stop(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write("quit\n")
        self.process.stdin.close()
        self.process.wait(timeout=30)
        self.stderr.close()


def start_loader(endpoint: str, kind: str, extra: list[str]) -> subprocess.Popen[str]:
    """Start benchmarks.rank_load against endpoint with extra arguments."""
    return subprocess.Popen(
        [sys.executable, "-m", "benchmarks.rank_load", "--endpoint", endpoint, "--kind", kind, *extra],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True,
    )


@dataclass(kw_only=True)
class ThroughputSample:
    """One measured window of one server kind at one rank count."""

    kind: str
    ranks: int
    reports_per_s: float
    cpu_s_per_1000: float
    rss_per_rank_bytes: float
    setup_s: float
    failure: str = ""
    """The reason the window was not measured (a stream that failed to open), or ""."""

    @property
    def reports_per_cpu_s(self) -> float:
        """Reports one fully busy server process would take per second, from its CPU cost per report."""
        return 1000.0 / self.cpu_s_per_1000 if self.cpu_s_per_1000 > 0 else float("inf")


def measure_stream(kind: str, ranks: int, *, warmup_s: float, measure_s: float, directory: str) -> ThroughputSample:
    """Stream reports from ranks simulated ranks to a fresh server of kind; return the window's numbers."""
    server = ServerProcess(kind, directory)
    try:
        idle = server.usage()
        loader = start_loader(server.endpoint, kind, ["--ranks", str(ranks), "--warmup-s", str(warmup_s),
                                                      "--measure-s", str(measure_s)])
        samples: dict[str, tuple[float, dict[str, float], dict[str, float]]] = {}
        assert loader.stdout is not None
        for line in loader.stdout:
            event = json.loads(line)
            samples[event["event"]] = (time.perf_counter(), server.usage(), event)
        loader.wait(timeout=PROCESS_TIMEOUT_S)
        if "failed" in samples:
            failed = samples["failed"][2]
            return _failed_sample(kind, ranks, f"stream {failed['opened'] + 1} of {ranks} failed with {failed['code']}")
        if loader.returncode != 0 or "measure-end" not in samples:
            raise RuntimeError(f"the load generator for {kind} with {ranks} ranks failed (exit {loader.returncode})")
        return _sample(kind, ranks, idle, samples)
    finally:
        server.stop()


def _failed_sample(kind: str, ranks: int, failure: str) -> ThroughputSample:
    nan = float("nan")
    return ThroughputSample(kind=kind, ranks=ranks, reports_per_s=nan, cpu_s_per_1000=nan, rss_per_rank_bytes=nan,
                            setup_s=nan, failure=failure)


def _sample(kind: str, ranks: int, idle: dict[str, float],
            samples: dict[str, tuple[float, dict[str, float], dict[str, float]]]) -> ThroughputSample:
    start_t, start, _ = samples["measure-start"]
    end_t, end, _ = samples["measure-end"]
    reports = end["messages"] - start["messages"]
    cpu_s = end["cpu_s"] - start["cpu_s"]
    return ThroughputSample(
        kind=kind, ranks=ranks, reports_per_s=reports / (end_t - start_t),
        cpu_s_per_1000=1000.0 * cpu_s / reports if reports else float("nan"),
        rss_per_rank_bytes=(end["rss_bytes"] - idle["rss_bytes"]) / ranks,
        setup_s=samples["ready"][2]["setup_s"],
    )


def measure_throughput(rank_counts: tuple[int, ...], *, rounds: int, warmup_s: float,
                       measure_s: float) -> dict[tuple[str, int], list[ThroughputSample]]:
    """Return samples per (kind, ranks); each round runs every kind at every count, in rotating order."""
    results: dict[tuple[str, int], list[ThroughputSample]] = {}
    with tempfile.TemporaryDirectory(prefix="nanwatch-bench-") as directory:
        for round_index in range(rounds):
            for ranks in rank_counts:
                offset = round_index % len(KINDS)
                for kind in KINDS[offset:] + KINDS[:offset]:
                    sample = measure_stream(kind, ranks, warmup_s=warmup_s, measure_s=measure_s, directory=directory)
                    results.setdefault((kind, ranks), []).append(sample)
    return results


def median_of(samples: list[ThroughputSample], field: str) -> float:
    return statistics.median(getattr(sample, field) for sample in samples)


@dataclass(kw_only=True)
class HaltLatency:
    """Latencies from a NaN report on one rank to the HALT on every rank, one per trial."""

    ranks: int
    all_ranks_s: list[float]
    first_rank_s: list[float]

    def quantile(self, fraction: float, *, first: bool = False) -> float:
        return percentile(self.first_rank_s if first else self.all_ranks_s, fraction)


def measure_halt_latency(*, ranks: int, trials: int) -> HaltLatency:
    """Run trials halts of a ranks-rank run against a fresh nanwatch server; return the latencies."""
    with tempfile.TemporaryDirectory(prefix="nanwatch-bench-") as directory:
        server = ServerProcess("nanwatch", directory)
        try:
            loader = start_loader(server.endpoint, "nanwatch",
                                  ["--mode", "halt", "--ranks", str(ranks), "--trials", str(trials)])
            output, _ = loader.communicate(timeout=PROCESS_TIMEOUT_S)
            if loader.returncode != 0:
                raise RuntimeError(f"the halt-latency load generator failed (exit {loader.returncode})")
        finally:
            server.stop()
    result = json.loads(output.strip().splitlines()[-1])
    return HaltLatency(ranks=ranks, all_ranks_s=result["latencies_s"], first_rank_s=result["first_latencies_s"])
