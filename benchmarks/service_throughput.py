"""Service throughput, CPU and memory per rank, and HALT fan-out latency, over real gRPC on loopback.

The server and the load generator run in separate processes, so the server's CPU
time (resource.getrusage in its own process) excludes the simulated ranks' work.

Run on its own, it compares the service of a git revision with the working tree's,
both against the bare echo and sink servers, in interleaved rounds:

    python -m benchmarks.service_throughput --before HEAD --ranks 64 1024 4096
    python -m benchmarks.service_throughput --before HEAD --ranks 16384 --rate-per-rank 1
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.trials import percentile

REPO_ROOT = Path(__file__).resolve().parent.parent
KINDS = ("nanwatch", "sink", "echo")
"""nanwatch's Watch stream, and the bare server that only reads (sink) or sends every message back (echo)."""
PROCESS_TIMEOUT_S = 600


class ServerProcess:
    """A server started by benchmarks.service_process, queried over its stdin and stdout.

    source is a folder to import the nanwatch package from (see export_revision); "" runs the installed one.
    """

    def __init__(self, kind: str, directory: str, source: str = "") -> None:
        server_kind = "nanwatch" if kind == "nanwatch" else "echo"
        self.stderr = open(Path(directory) / f"{kind}-server.log", "w", encoding="utf-8")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.service_process", "--kind", server_kind,
             "--db", str(Path(directory) / f"{kind}-{time.time_ns()}.db"), "--source", source],
            cwd=REPO_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True,
        )
        self.port = int(self._read()["port"])

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _read(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the server process exited with code {self.process.wait()}; see {self.stderr.name}")
        return json.loads(line)

    def usage(self) -> dict[str, Any]:
        """Return the server's CPU seconds (in all and per thread), resident bytes and received messages now."""
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
    sent_per_s: float = float("nan")
    """Reports the load process wrote per second in the window; more than reports_per_s when they queue."""
    cpu_share: float = float("nan")
    """Server CPU seconds per second of the window: 1.0 is one fully busy core."""
    busiest_thread_share: float = float("nan")
    """CPU seconds per second of the server's busiest thread (its event loop); 1.0 is the limit of one process."""

    @property
    def reports_per_cpu_s(self) -> float:
        """Reports one fully busy server process would take per second, from its CPU cost per report."""
        return 1000.0 / self.cpu_s_per_1000 if self.cpu_s_per_1000 > 0 else float("inf")


def measure_stream(kind: str, ranks: int, *, warmup_s: float, measure_s: float, directory: str,
                   source: str = "", rate_per_rank: float = 0.0, first_step: int = 1) -> ThroughputSample:
    """Stream reports from ranks simulated ranks to a fresh server of kind; return the window's numbers.

    rate_per_rank > 0 paces each rank to that many reports per second; 0 writes as fast as flow control allows.
    first_step is the step number of each rank's first report.
    """
    server = ServerProcess(kind, directory, source)
    try:
        idle = server.usage()
        loader = start_loader(server.endpoint, kind, ["--ranks", str(ranks), "--warmup-s", str(warmup_s),
                                                      "--measure-s", str(measure_s),
                                                      "--rate-per-rank", str(rate_per_rank),
                                                      "--first-step", str(first_step)])
        samples: dict[str, tuple[float, dict[str, Any], dict[str, Any]]] = {}
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


def _sample(kind: str, ranks: int, idle: dict[str, Any],
            samples: dict[str, tuple[float, dict[str, Any], dict[str, Any]]]) -> ThroughputSample:
    start_t, start, start_event = samples["measure-start"]
    end_t, end, end_event = samples["measure-end"]
    reports = end["messages"] - start["messages"]
    cpu_s = end["cpu_s"] - start["cpu_s"]
    window_s = end_t - start_t
    return ThroughputSample(
        kind=kind, ranks=ranks, reports_per_s=reports / window_s,
        cpu_s_per_1000=1000.0 * cpu_s / reports if reports else float("nan"),
        rss_per_rank_bytes=(end["rss_bytes"] - idle["rss_bytes"]) / ranks,
        setup_s=samples["ready"][2]["setup_s"],
        sent_per_s=(end_event["sent"] - start_event["sent"]) / window_s,
        cpu_share=cpu_s / window_s,
        busiest_thread_share=_busiest_thread_s(start, end) / window_s,
    )


def _busiest_thread_s(start: dict[str, Any], end: dict[str, Any]) -> float:
    """Return the largest CPU time any one server thread used between two usage samples."""
    before, after = start.get("thread_cpu_s", {}), end.get("thread_cpu_s", {})
    return max((seconds - before.get(thread, 0.0) for thread, seconds in after.items()), default=float("nan"))


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


# ---- before/after comparison of the service of a git revision ----

@dataclass(frozen=True)
class Variant:
    """One server in a comparison: a label for the table, the server kind, and where nanwatch is imported from."""

    label: str
    kind: str
    source: str = ""


def export_revision(revision: str, directory: str) -> str:
    """Lay out the nanwatch package of a git revision under directory; return the folder to import it from.

    pyproject.toml maps nanwatch.service to service/ and nanwatch.client to client/, so
    both are copied into the exported package folder.
    """
    root = Path(directory) / f"revision-{revision.replace('/', '_')}"
    archive = subprocess.run(["git", "archive", revision, "nanwatch", "service", "client"], cwd=REPO_ROOT,
                             check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(root / "tree", filter="data")
    package = root / "import" / "nanwatch"
    shutil.copytree(root / "tree" / "nanwatch", package)
    for part in ("service", "client"):
        shutil.copytree(root / "tree" / part, package / part)
    return str(root / "import")


def compare_variants(variants: list[Variant], rank_counts: tuple[int, ...], *, rounds: int, warmup_s: float,
                     measure_s: float, rate_per_rank: float, first_step: int,
                     directory: str) -> dict[tuple[str, int], list[ThroughputSample]]:
    """Return samples per (label, ranks); each round runs every variant at every count, in rotating order."""
    results: dict[tuple[str, int], list[ThroughputSample]] = {}
    for round_index in range(rounds):
        for ranks in rank_counts:
            offset = round_index % len(variants)
            for variant in variants[offset:] + variants[:offset]:
                sample = measure_stream(variant.kind, ranks, warmup_s=warmup_s, measure_s=measure_s,
                                        directory=directory, source=variant.source, rate_per_rank=rate_per_rank,
                                        first_step=first_step)
                results.setdefault((variant.label, ranks), []).append(sample)
    return results


def _round_ratio(samples: list[ThroughputSample], baseline: list[ThroughputSample]) -> float:
    """Return the median over rounds of samples' reports/s divided by the baseline's of the same round."""
    return statistics.median(sample.reports_per_s / base.reports_per_s for sample, base in zip(samples, baseline))


def comparison_rows(results: dict[tuple[str, int], list[ThroughputSample]], variants: list[Variant],
                    rank_counts: tuple[int, ...]) -> list[str]:
    """Return Markdown table lines of a comparison: medians over rounds, ratios to echo and sink per round."""
    lines = ["| server | ranks | reports/s | sent/s | server CPU s per 1,000 | server CPU share | "
             "busiest thread's CPU share | ratio to echo | ratio to sink | RSS per rank |", "| --- " * 10 + "|"]
    for ranks in rank_counts:
        for variant in variants:
            samples = results[(variant.label, ranks)]
            failure = next((sample.failure for sample in samples if sample.failure), "")
            if failure:
                lines.append(f"| {variant.label} | {ranks} | failed: {failure} |" + " - |" * 7)
                continue
            echo, sink = results.get(("echo", ranks)), results.get(("sink", ranks))
            ratios = [f"{_round_ratio(samples, base):.3f}x" if base and not any(s.failure for s in base) else "-"
                      for base in (echo, sink)]
            lines.append(
                f"| {variant.label} | {ranks} | {median_of(samples, 'reports_per_s'):,.0f} | "
                f"{median_of(samples, 'sent_per_s'):,.0f} | {median_of(samples, 'cpu_s_per_1000'):.3f} | "
                f"{median_of(samples, 'cpu_share'):.2f} | {median_of(samples, 'busiest_thread_share'):.2f} | "
                f"{ratios[0]} | {ratios[1]} | "
                f"{median_of(samples, 'rss_per_rank_bytes') / 1024:.1f} KiB |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description="Compare the service of a git revision with the working tree's "
                                                 "and with the bare echo and sink servers.")
    parser.add_argument("--before", default="", help="git revision of the 'before' service (default: none)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[64, 1024, 4096], help="simulated rank counts")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--warmup-s", type=float, default=1.0)
    parser.add_argument("--measure-s", type=float, default=2.0)
    parser.add_argument("--rate-per-rank", type=float, default=0.0,
                        help="reports per second per rank; 0 writes as fast as flow control allows")
    parser.add_argument("--first-step", type=int, default=1,
                        help="step of each rank's first report; the service persists progress at every 50th step")
    parser.add_argument("--no-bare", action="store_true", help="leave out the echo and sink servers")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="nanwatch-bench-") as directory:
        variants = [Variant("nanwatch", "nanwatch")]
        if args.before:
            variants.insert(0, Variant(f"nanwatch {args.before}", "nanwatch", export_revision(args.before, directory)))
        if not args.no_bare:
            variants += [Variant("echo", "echo"), Variant("sink", "sink")]
        counts = tuple(args.ranks)
        results = compare_variants(variants, counts, rounds=args.rounds, warmup_s=args.warmup_s,
                                   measure_s=args.measure_s, rate_per_rank=args.rate_per_rank,
                                   first_step=args.first_step, directory=directory)
    print("\n".join(comparison_rows(results, variants, counts)))


if __name__ == "__main__":
    main()
