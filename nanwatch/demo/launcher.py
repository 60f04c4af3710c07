"""Launch the demo training job under torchrun on this machine and collect each rank's result."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from nanwatch.demo.faults import FAULTS
from nanwatch.demo.result import RankResult, read_result, result_path
from nanwatch.errors import halt_exit_code
from nanwatch.run_id import validate_run_id

logger = logging.getLogger(__name__)

LOOPBACK_HOST = "127.0.0.1"
# GLOO_SOCKET_IFNAME selects gloo's network interface, and "lo" keeps its traffic on loopback.
LOOPBACK_INTERFACE = "lo"
DEFAULT_TIMEOUT_SECONDS = 300.0



@dataclass(frozen=True, kw_only=True, slots=True)
class DemoResult:
    """Outcome of one demo run: torchrun's exit code and each rank's result."""

    fault: str
    run_id: str
    # torchrun exits 1 when any worker fails, whatever the worker's own exit code was.
    torchrun_exit_code: int
    # Indexed by rank; None for a rank that wrote no result file, such as one torchrun
    # terminated after another rank had exited.
    ranks: list[RankResult | None]
    result_dir: Path | None

    @property
    def halted(self) -> bool:
        """Whether any rank reported a nanwatch halt."""
        return any(rank is not None and rank.halted for rank in self.ranks)

    @property
    def exit_code(self) -> int:
        """Return the halt exit code when a rank halted, else torchrun's exit code."""
        return halt_exit_code() if self.halted else self.torchrun_exit_code


def find_free_port(host: str = LOOPBACK_HOST) -> int:
    """Return a TCP port on host that was free a moment ago.

    NOTE: another process can take the port before torchrun binds it. A run that loses this
    race fails at rendezvous and can be retried.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def new_run_id(fault: str) -> str:
    """Return a fresh run id such as "demo-data-3f2a9c1e"."""
    return validate_run_id(f"demo-{fault}-{uuid.uuid4().hex[:8]}")


def build_command(
    fault: str, *, steps: int, nproc: int, master_port: int, run_id: str, endpoint: str | None, result_dir: Path
) -> list[str]:
    """Return the torchrun command line for the demo worker; without an endpoint it runs --no-watch."""
    command = [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes", "1",
        "--nproc-per-node", str(nproc),
        "--master-addr", LOOPBACK_HOST,
        "--master-port", str(master_port),
        "--max-restarts", "0",
        "-m", "nanwatch.demo.train",
        "--fault", fault,
        "--steps", str(steps),
        "--run-id", run_id,
        "--result-dir", str(result_dir),
    ]  # fmt: skip
    command += ["--watch", "--endpoint", endpoint] if endpoint else ["--no-watch"]
    return command


def build_environment() -> dict[str, str]:
    """Return this process's environment with gloo on loopback and one OpenMP thread per worker."""
    environment = dict(os.environ)
    environment["GLOO_SOCKET_IFNAME"] = LOOPBACK_INTERFACE
    environment["OMP_NUM_THREADS"] = "1"
    return environment


def read_rank_results(result_dir: Path, nproc: int) -> list[RankResult | None]:
    """Read result-rank{R}.json for every rank, with None where a rank wrote none."""
    results: list[RankResult | None] = []
    for rank in range(nproc):
        path = result_path(result_dir, rank)
        results.append(read_result(path) if path.exists() else None)
    return results


def _copy_lines(source: TextIO, out: TextIO) -> None:
    for line in source:
        out.write(line)
        out.flush()


def run_torchrun(command: list[str], *, out: TextIO, timeout_seconds: float) -> int:
    """Run the torchrun command, copying its output to out, and return its exit code.

    Raises:
        TimeoutError: torchrun ran longer than timeout_seconds; it and its workers were terminated.
    """
    logger.info("starting %s", " ".join(command))
    # A new session lets a timeout terminate torchrun together with its workers.
    process = subprocess.Popen(
        command, env=build_environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )  # fmt: skip
    assert process.stdout is not None
    copier = threading.Thread(target=_copy_lines, args=(process.stdout, out), daemon=True)
    copier.start()
    try:
        exit_code = process.wait(timeout=timeout_seconds)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait()
        raise TimeoutError(
            f"demo run did not finish within {timeout_seconds:g} s and was terminated; "
            "pass a larger timeout_seconds or fewer steps"
        ) from None
    finally:
        copier.join(timeout=5)
    return exit_code


def run_demo(
    fault: str,
    *,
    steps: int,
    nproc: int = 2,
    endpoint: str | None = None,
    result_dir: Path | None = None,
    out: TextIO = sys.stdout,
    timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
) -> DemoResult:
    """Run the demo training job with `nproc` CPU ranks under torchrun and return its results.

    Args:
        fault: one of FAULTS ("none", "data", "lr", "loss").
        steps: optimizer steps to run when nothing stops the run early.
        nproc: number of ranks, all on this machine.
        endpoint: HOST:PORT of a running nanwatch service; None runs without nanwatch, and each
            rank then stops at the first step where its own check finds a NaN or Inf.
        result_dir: folder for the result-rank{R}.json files; None uses a temporary folder that
            is removed after reading.
        out: stream that receives torchrun's output.
        timeout_seconds: time limit for the whole torchrun run.

    Raises:
        ValueError: fault, steps or nproc is invalid.
        TimeoutError: the run exceeded timeout_seconds.
    """
    if fault not in FAULTS:
        raise ValueError(f"unknown fault {fault!r}; choose one of {', '.join(FAULTS)}")
    if steps < 1 or nproc < 1:
        raise ValueError(f"steps ({steps}) and nproc ({nproc}) must both be at least 1")

    if result_dir is not None:
        return _run_in(fault, steps=steps, nproc=nproc, endpoint=endpoint, result_dir=result_dir, out=out,
                       timeout_seconds=timeout_seconds, keep_dir=True)  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="nanwatch-demo-") as temporary:
        return _run_in(fault, steps=steps, nproc=nproc, endpoint=endpoint, result_dir=Path(temporary), out=out,
                       timeout_seconds=timeout_seconds, keep_dir=False)  # fmt: skip


def _run_in(
    fault: str, *, steps: int, nproc: int, endpoint: str | None, result_dir: Path, out: TextIO,
    timeout_seconds: float, keep_dir: bool,
) -> DemoResult:  # fmt: skip
    run_id = new_run_id(fault)
    command = build_command(
        fault, steps=steps, nproc=nproc, master_port=find_free_port(), run_id=run_id, endpoint=endpoint,
        result_dir=result_dir,
    )  # fmt: skip
    exit_code = run_torchrun(command, out=out, timeout_seconds=timeout_seconds)
    result = DemoResult(
        fault=fault,
        run_id=run_id,
        torchrun_exit_code=exit_code,
        ranks=read_rank_results(result_dir, nproc),
        result_dir=result_dir if keep_dir else None,
    )
    if result.halted and exit_code != 0:
        out.write(f"(torchrun reports the ranks as failed, with a ChildFailedError above, because they exited "
                  f"with {halt_exit_code()}, nanwatch's halt exit code: the halt this demo expects.)\n")
    return result
