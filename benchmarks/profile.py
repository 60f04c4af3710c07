"""Profile the two missed hot spots with py-spy: the Watcher's step summaries and the service under load.

Writes flame graphs (SVG), collapsed stacks and a top-functions summary under
benchmarks/profiles/. Needs py-spy on PATH or next to the Python executable
(pip install py-spy).

    python -m benchmarks.profile [--seconds 8]
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.service_throughput import REPO_ROOT, ServerProcess, start_loader

PROFILES = Path(__file__).with_name("profiles")
TOP_FUNCTIONS = 25


def py_spy() -> str:
    """Return the py-spy executable; raise FileNotFoundError with the install command when it is missing."""
    found = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if found is None:
        raise FileNotFoundError("py-spy not found; install it with `pip install py-spy`")
    return found


def record(target: list[str], name: str, seconds: float) -> None:
    """Record target (a py-spy target: ["--pid", N] or ["--", cmd...]) as SVG and collapsed stacks."""
    for fmt, suffix in (("flamegraph", "svg"), ("raw", "txt")):
        subprocess.run([py_spy(), "record", "--rate", "200", "--duration", str(int(seconds)), "--format", fmt,
                        "--output", str(PROFILES / f"{name}.{suffix}"), "--nonblocking", *target],
                       check=True, cwd=REPO_ROOT, stdout=subprocess.DEVNULL)


def summarize(name: str) -> None:
    """Write <name>-top.txt: the functions with the most samples, inclusive and as the innermost frame."""
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in (PROFILES / f"{name}.txt").read_text(encoding="utf-8").splitlines():
        stack, _, samples = line.rpartition(" ")
        frames = stack.split(";")
        total += int(samples)
        own[frames[-1]] += int(samples)
        for frame in set(frames):
            inclusive[frame] += int(samples)
    lines = [f"{name}: {total} samples", "", "inclusive (frame anywhere on the stack):"]
    lines += [f"{100 * n / total:5.1f}%  {frame}" for frame, n in inclusive.most_common(TOP_FUNCTIONS)]
    lines += ["", "own (innermost frame):"]
    lines += [f"{100 * n / total:5.1f}%  {frame}" for frame, n in own.most_common(TOP_FUNCTIONS)]
    (PROFILES / f"{name}-top.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def profile_hot_path(seconds: float) -> None:
    """Profile a process that calls the Watcher's per-step summaries in a loop on the 2M-parameter MLP."""
    loop = ("import time, torch; torch.set_num_threads(1);"
            "from benchmarks.models import mlp_workload; from benchmarks import hot_path;"
            "s = hot_path.prepare(mlp_workload()); end = time.monotonic() + %f\n"
            "while time.monotonic() < end: hot_path._all_summaries(s)\n"
            "s.watcher.close()") % (seconds + 5)
    record(["--", sys.executable, "-c", loop], "client-hot-path", seconds)
    summarize("client-hot-path")


def profile_service(seconds: float, ranks: int) -> None:
    """Profile the nanwatch server process while ranks simulated ranks stream reports to it."""
    with tempfile.TemporaryDirectory(prefix="nanwatch-bench-") as directory:
        server = ServerProcess("nanwatch", directory)
        try:
            loader = start_loader(server.endpoint, "nanwatch", ["--ranks", str(ranks), "--warmup-s", "1",
                                                                "--measure-s", str(seconds + 3)])
            assert loader.stdout is not None
            json.loads(loader.stdout.readline())  # "ready": every rank is registered and streaming
            time.sleep(1.0)
            record(["--pid", str(server.process.pid)], "service-under-load", seconds)
            loader.communicate(timeout=120)
        finally:
            server.stop()
    summarize("service-under-load")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="recording time per profile")
    parser.add_argument("--ranks", type=int, default=1024, help="simulated ranks for the service profile")
    args = parser.parse_args()
    PROFILES.mkdir(exist_ok=True)
    profile_hot_path(args.seconds)
    profile_service(args.seconds, args.ranks)


if __name__ == "__main__":
    main()
