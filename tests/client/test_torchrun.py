"""Two gloo ranks under torchrun halt together when only one rank's batch contains a NaN."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

from conftest import free_port

WORKER = pathlib.Path(__file__).with_name("torchrun_worker.py")


def test_torchrun_ranks_halt_together(tmp_path, dead_endpoint) -> None:  # type: ignore[no-untyped-def]
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    env.pop("NANWATCH_HALT_EXIT_CODE", None)
    env.pop("NANWATCH_RUN_ID", None)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
        str(WORKER), str(tmp_path), dead_endpoint,
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]

    # torchrun exits 1 whatever exit code its workers had, and it stops the slower worker
    # when the first one exits, so each worker records its HaltError's exit code itself.
    assert result.returncode != 0, result.stderr[-2000:]
    assert [r["step"] for r in ranks] == [2, 2]
    assert [r["exit_code"] for r in ranks] == [42, 42]
    assert [r["source"] for r in ranks] == ["agreed", "local"]
    assert "rank 1: non-finite batch data" in ranks[0]["reason"]
    assert ranks[0]["names"] == ["weight", "bias"]
    assert ranks[0]["run_id"] == ranks[1]["run_id"]
