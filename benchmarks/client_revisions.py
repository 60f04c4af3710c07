"""Training-step overhead of the client at two git revisions, side by side.

    python -m benchmarks.client_revisions --before REV [--workload mlp transformer] [--rounds 12]

Each revision runs in a worker process that imports the nanwatch package (client and
service) of that revision and starts that revision's service in a process of its own.
The working tree is "after". The workers take turns: each round runs one trial of the
plain step and one of the watched step in every worker, in rotating order, so both
revisions share the machine's load. A ratio is the watched step over the plain step
of the same worker and round; the table gives medians over the rounds.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from benchmarks.service_throughput import REPO_ROOT, export_revision

STEPS_PER_TRIAL = 10
"""A multiple of the Watcher's 10-step cadence of update and parameter norms."""
WARMUP_STEPS = 3
AFTER = "working tree"


@dataclass(kw_only=True)
class RevisionTimes:
    """Seconds per step of the plain and the watched step of one revision, one value per round."""

    label: str
    plain_s: list[float] = field(default_factory=list)
    watched_s: list[float] = field(default_factory=list)

    def ratios(self) -> list[float]:
        return [watched / plain for plain, watched in zip(self.plain_s, self.watched_s)]

    def added_s(self) -> list[float]:
        return [watched - plain for plain, watched in zip(self.plain_s, self.watched_s)]


class Worker:
    """A worker process of one revision; trial() runs steps there and returns seconds per step."""

    def __init__(self, label: str, source: str, workload: str, *, tiny: bool = False) -> None:
        self.label = label
        self.process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.client_revisions", "--worker", "--source", source,
             "--workload", workload, *(["--tiny"] if tiny else [])],
            cwd=REPO_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        self._read()  # "ready" after the model, the Watcher and the service are up and warm

    def _read(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.label} worker exited with code {self.process.wait()}; "
                               "its traceback is printed above")
        return json.loads(line)

    def trial(self, variant: str) -> float:
        assert self.process.stdin is not None
        self.process.stdin.write(f"{variant}\n")
        self.process.stdin.flush()
        return float(self._read()["seconds_per_step"])

    def stop(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        self.process.wait(timeout=60)


def compare(before: str, workload: str, rounds: int, *, tiny: bool = False) -> list[RevisionTimes]:
    """Return the per-round times of the revision before and of the working tree on one workload.

    tiny replaces the workload by a model of a few thousand parameters, for a smoke test.
    """
    with tempfile.TemporaryDirectory(prefix="nanwatch-revisions-") as directory:
        sources = {f"{before} (before)": export_revision(before, directory), AFTER: ""}
        workers = [Worker(label, source, workload, tiny=tiny) for label, source in sources.items()]
        try:
            times = {worker.label: RevisionTimes(label=worker.label) for worker in workers}
            for round_index in range(rounds):
                order = workers[round_index % 2:] + workers[:round_index % 2]
                for worker in order:
                    variants = ("plain", "watched") if round_index % 4 < 2 else ("watched", "plain")
                    measured = {variant: worker.trial(variant) for variant in variants}
                    times[worker.label].plain_s.append(measured["plain"])
                    times[worker.label].watched_s.append(measured["watched"])
            return list(times.values())
        finally:
            for worker in workers:
                worker.stop()


def render_table(workload: str, results: list[RevisionTimes], rounds: int) -> str:
    """Return the Markdown table of one workload's comparison, with its title and notes."""
    lines = [f"### Training step with nanwatch at two revisions: {workload}", "",
             "| revision | plain step | watched step | ratio (median of rounds) | added per step |",
             "| --- | --- | --- | --- | --- |"]
    for times in results:
        lines.append(f"| {times.label} | {statistics.median(times.plain_s) * 1e3:.2f} ms "
                     f"| {statistics.median(times.watched_s) * 1e3:.2f} ms | {statistics.median(times.ratios()):.3f}x "
                     f"| {statistics.median(times.added_s()) * 1e3:.3f} ms |")
    lines += ["", f"{rounds} rounds x {STEPS_PER_TRIAL} steps per trial, AdamW, cross-entropy, "
              "torch.set_num_threads(1); the watched step reports every step to that revision's service in its "
              "own process on 127.0.0.1.", ""]
    return "\n".join(lines)


def run_worker(source: str, workload_name: str, tiny: bool) -> None:
    """Serve trials on stdin ("plain" or "watched") until stdin ends; print seconds per step as JSON lines."""
    if source:
        # Nothing of nanwatch is imported yet, so the package and all its modules come from there.
        sys.path.insert(0, source)
    import torch

    from benchmarks.client_overhead import PLAIN, WATCHER_SERVICE, build_variant, train_step
    from benchmarks.models import mlp_workload, transformer_workload
    from benchmarks.service_throughput import ServerProcess

    torch.set_num_threads(1)
    logging.getLogger("nanwatch").setLevel(logging.ERROR)
    if tiny:
        workload = mlp_workload(parameter_count=5_000, batch=4) if workload_name == "mlp" else \
            transformer_workload(width=16, layers=1, seq_len=8, batch=2, vocab=50)
    else:
        workload = mlp_workload() if workload_name == "mlp" else transformer_workload()
    with tempfile.TemporaryDirectory(prefix="nanwatch-worker-") as directory:
        server = ServerProcess("nanwatch", directory, source=source)
        variants = {"plain": build_variant(workload, PLAIN, None, run_id="plain"),
                    "watched": build_variant(workload, WATCHER_SERVICE, server.endpoint,
                                             run_id=f"revisions-{time.time_ns()}")}
        try:
            for variant in variants.values():
                for _ in range(WARMUP_STEPS):
                    train_step(variant, workload)
            print(json.dumps({"ready": True}), flush=True)
            for line in sys.stdin:
                variant = variants[line.strip()]
                started = time.perf_counter()
                for _ in range(STEPS_PER_TRIAL):
                    train_step(variant, workload)
                seconds = (time.perf_counter() - started) / STEPS_PER_TRIAL
                print(json.dumps({"seconds_per_step": seconds}), flush=True)
        finally:
            watcher = variants["watched"].watcher
            if watcher is not None:
                watcher.close()
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", help="git revision to compare the working tree with")
    parser.add_argument("--workload", nargs="+", default=["mlp", "transformer"], choices=("mlp", "transformer"))
    parser.add_argument("--rounds", type=int, default=12, help="rounds of interleaved trials per workload")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--source", default="", help=argparse.SUPPRESS)
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run_worker(args.source, args.workload[0], args.tiny)
        return
    if not args.before:
        parser.error("--before REV is required")
    for workload in args.workload:
        print(render_table(workload, compare(args.before, workload, args.rounds, tiny=args.tiny), args.rounds))


if __name__ == "__main__":
    main()
