"""In-memory state of the runs being watched: connected ranks and their signal queues.

All methods run on the service's event loop thread; nothing here is persisted
(the store keeps what must survive a restart).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from nanwatch.v1 import nanwatch_pb2 as pb


@dataclass(slots=True)
class LiveRank:
    """Progress of one rank and the queue of signals for its Watch stream."""

    rank: int
    host: str = ""
    client_id: str = ""
    last_step: int = -1
    last_loss: float = float("nan")
    last_grad_norm: float = float("nan")
    last_report_unix_s: float = 0.0
    outbox: asyncio.Queue[pb.Signal | None] | None = None

    @property
    def connected(self) -> bool:
        return self.outbox is not None


@dataclass(slots=True)
class LiveRun:
    run_id: str
    world_size: int
    ranks: dict[int, LiveRank] = field(default_factory=dict)

    def rank(self, rank: int) -> LiveRank:
        if rank not in self.ranks:
            self.ranks[rank] = LiveRank(rank=rank)
        return self.ranks[rank]

    def max_step(self) -> int:
        return max((state.last_step for state in self.ranks.values()), default=-1)


class LiveRuns:
    """Runs with at least one registered rank since the service started."""

    def __init__(self) -> None:
        self._runs: dict[str, LiveRun] = {}

    def get(self, run_id: str) -> LiveRun | None:
        return self._runs.get(run_id)

    def ensure(self, run_id: str, world_size: int) -> LiveRun:
        run = self._runs.get(run_id)
        if run is None:
            run = LiveRun(run_id=run_id, world_size=world_size)
            self._runs[run_id] = run
        return run

    def connect(self, run_id: str, rank: int, world_size: int) -> asyncio.Queue[pb.Signal | None]:
        """Open a signal queue for a rank's new Watch stream, replacing an older stream's."""
        state = self.ensure(run_id, world_size).rank(rank)
        if state.outbox is not None:
            state.outbox.put_nowait(None)  # ends the older stream of the same rank
        state.outbox = asyncio.Queue()
        return state.outbox

    def disconnect(self, run_id: str, rank: int, outbox: asyncio.Queue[pb.Signal | None]) -> None:
        run = self._runs.get(run_id)
        if run is None:
            return
        state = run.ranks.get(rank)
        if state is not None and state.outbox is outbox:
            state.outbox = None

    def broadcast(self, run_id: str, signal: pb.Signal) -> int:
        """Queue the signal on every connected rank of the run; return how many got it."""
        run = self._runs.get(run_id)
        if run is None:
            return 0
        sent = 0
        for state in run.ranks.values():
            if state.outbox is not None:
                state.outbox.put_nowait(signal)
                sent += 1
        return sent

    def record_report(self, run_id: str, rank: int, report: pb.StepReport) -> None:
        run = self._runs.get(run_id)
        if run is None:
            return
        state = run.rank(rank)
        state.last_step = max(state.last_step, report.step)
        state.last_loss = report.loss
        state.last_grad_norm = report.grad_norm
        state.last_report_unix_s = time.time()

    def has_connected(self, run_id: str) -> bool:
        """Return True while at least one rank of run_id has an open Watch stream."""
        run = self._runs.get(run_id)
        return run is not None and any(state.connected for state in run.ranks.values())

    def connected_count(self) -> int:
        return sum(1 for run in self._runs.values() for state in run.ranks.values() if state.connected)
