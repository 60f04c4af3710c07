"""Profile the missed hot spots with py-spy: the Watcher's step summaries, a watched training step, the service.

Writes flame graphs (SVG), collapsed stacks and a top-functions summary under
benchmarks/profiles/. Needs py-spy on PATH or next to the Python executable
(pip install py-spy). The client profiles attach to the loop after its set-up
and warm-up, so imports and model building are not in them.

    python -m benchmarks.profile [--seconds 8] [--only client|service]
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
    client = collections.Counter({frame: n for frame, n in inclusive.items() if "(client/" in frame})
    lines += ["", "nanwatch client frames, inclusive:"]
    lines += [f"{100 * n / total:5.1f}%  {frame}" for frame, n in client.most_common(TOP_FUNCTIONS)]
    (PROFILES / f"{name}-top.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


# Each loop runs in a child process. It prints "ready" after its warm-up and runs until its time is up.
_HOT_PATH_LOOP = """
import logging, time, torch
torch.set_num_threads(1)
logging.getLogger("nanwatch").setLevel(logging.ERROR)
from benchmarks.models import mlp_workload
from benchmarks import hot_path
setup = hot_path.prepare(mlp_workload())
for _ in range(20):
    hot_path._all_summaries(setup)
print("ready", flush=True)
end = time.monotonic() + {seconds}
while time.monotonic() < end:
    hot_path._all_summaries(setup)
setup.watcher.close()
"""
_TRAINING_STEP_LOOP = """
import logging, time, torch
torch.set_num_threads(1)
logging.getLogger("nanwatch").setLevel(logging.ERROR)
from benchmarks.client_overhead import WATCHER_CHECK_BATCH, build_variant, free_loopback_port, train_step
from benchmarks.models import mlp_workload
workload = mlp_workload()
variant = build_variant(workload, WATCHER_CHECK_BATCH, f"127.0.0.1:{{free_loopback_port()}}", run_id="profile")
for _ in range(20):
    train_step(variant, workload)
print("ready", flush=True)
end = time.monotonic() + {seconds}
while time.monotonic() < end:
    train_step(variant, workload)
variant.watcher.close()
"""


def profile_loop(name: str, loop: str, seconds: float) -> None:
    """Record a child process running loop (formatted with its run time) once it prints "ready"."""
    child = subprocess.Popen([sys.executable, "-c", loop.format(seconds=seconds + 5)], cwd=REPO_ROOT,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        if child.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the {name} loop exited before its warm-up ended; run it by hand to see why")
        record(["--pid", str(child.pid)], name, seconds)
    finally:
        child.kill()
        child.wait()
    summarize(name)


def profile_hot_path(seconds: float) -> None:
    """Profile a process that calls the Watcher's per-step summaries in a loop on the 2M-parameter MLP."""
    profile_loop("client-hot-path", _HOT_PATH_LOOP, seconds)


def profile_training_step(seconds: float) -> None:
    """Profile training steps of the 2M-parameter MLP with a Watcher and check_batch, and no service."""
    profile_loop("client-training-step", _TRAINING_STEP_LOOP, seconds)


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
    parser.add_argument("--only", choices=("client", "service"), help="record only the client or the service profiles")
    args = parser.parse_args()
    PROFILES.mkdir(exist_ok=True)
    if args.only != "service":
        profile_hot_path(args.seconds)
        profile_training_step(args.seconds)
    if args.only != "client":
        profile_service(args.seconds, args.ranks)


if __name__ == "__main__":
    main()
