"""In-memory state of the runs being watched: connected ranks, their signal queues, and the bound on runs tracked.

All methods run on the service's event loop thread. Nothing here is persisted
(the store keeps what must survive a restart), so a run removed from this table
is still answered from the store.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from nanwatch.v1 import nanwatch_pb2 as pb

DEFAULT_MAX_LIVE_RUNS = 1000
DEFAULT_LIVE_RUN_TTL_S = 3600.0

REMOVED_IDLE = "idle"
REMOVED_CAP = "cap"


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
    dropped_reports: int = 0
    """The rank's running count of reports its client dropped, as last reported."""
    outbox: asyncio.Queue[pb.Signal | None] | None = None

    @property
    def connected(self) -> bool:
        return self.outbox is not None


@dataclass(slots=True)
class LiveRun:
    run_id: str
    world_size: int
    ranks: dict[int, LiveRank] = field(default_factory=dict)
    connected_ranks: int = 0
    """Ranks with an open Watch stream."""
    last_activity_s: float = 0.0
    """LiveRuns clock time of the last registration, stream change or report."""
    highest_step: int = -1
    """Maximum last_step over the ranks, kept up to date by LiveRuns.record_report and restart_rank."""
    persisted_progress: tuple[int, frozenset[str]] | None = None
    """The last step and evaluated codes last written to the store for this run, or None."""

    def rank(self, rank: int) -> LiveRank:
        state = self.ranks.get(rank)
        if state is None:
            state = self.ranks[rank] = LiveRank(rank=rank)
        return state

    def max_step(self) -> int:
        return self.highest_step

    def restart_rank(self, rank: int) -> None:
        """Reset the progress of a rank whose process started over (a new client id)."""
        state = self.rank(rank)
        state.last_step = -1
        state.dropped_reports = 0
        self.highest_step = max((other.last_step for other in self.ranks.values()), default=-1)


class LiveRunsFull(Exception):
    """Raised when a new run would exceed max_runs while every tracked run has a connected rank."""

    def __init__(self, run_id: str, max_runs: int) -> None:
        super().__init__(
            f"cannot track run {run_id!r}: the service holds max_live_runs={max_runs} runs and every one "
            f"has a connected rank; retry after a run finishes, or raise $NANWATCH_MAX_LIVE_RUNS of the service"
        )
        self.run_id = run_id
        self.max_runs = max_runs


RemoveCallback = Callable[[LiveRun, str], None]


class LiveRuns:
    """Runs with a registered rank, at most ``max_runs`` of them.

    A run is idle while none of its ranks has an open Watch stream. An idle run
    is removed ``idle_ttl_s`` after its last activity (registration, stream
    change or report). A new run at the cap takes the place of the idle run
    with the oldest activity. When no tracked run is idle, ensure() raises
    LiveRunsFull. Each removed run goes to ``on_remove`` with the reason
    (REMOVED_IDLE or REMOVED_CAP) before it leaves the table.

    Example:
        live = LiveRuns(max_runs=1000, idle_ttl_s=3600.0, on_remove=lambda run, reason: None)
        outbox = live.connect("run-1", rank=0, world_size=2)
    """

    def __init__(
        self, *, max_runs: int = DEFAULT_MAX_LIVE_RUNS, idle_ttl_s: float = DEFAULT_LIVE_RUN_TTL_S,
        on_remove: RemoveCallback | None = None, clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_runs < 1:
            raise ValueError(f"max_live_runs={max_runs} must be at least 1; it caps the runs held in memory")
        if not idle_ttl_s > 0:
            raise ValueError(f"live_run_ttl_s={idle_ttl_s} must be a positive number of seconds")
        self.max_runs = max_runs
        self.idle_ttl_s = idle_ttl_s
        self._on_remove = on_remove
        self._clock = clock
        self._runs: dict[str, LiveRun] = {}

    def __len__(self) -> int:
        return len(self._runs)

    def __contains__(self, run_id: str) -> bool:
        return run_id in self._runs

    def get(self, run_id: str) -> LiveRun | None:
        return self._runs.get(run_id)

    def ensure(self, run_id: str, world_size: int) -> LiveRun:
        """Return the tracked run, adding it when new; raise LiveRunsFull when no room can be made."""
        run = self._runs.get(run_id)
        if run is None:
            self.expire_idle()
            self._make_room(run_id)
            run = LiveRun(run_id=run_id, world_size=world_size)
            self._runs[run_id] = run
        run.last_activity_s = self._clock()
        return run

    def expire_idle(self) -> list[str]:
        """Remove the runs idle for idle_ttl_s or longer; return their ids."""
        deadline = self._clock() - self.idle_ttl_s
        expired = [run.run_id for run in self._runs.values()
                   if run.connected_ranks == 0 and run.last_activity_s <= deadline]
        for run_id in expired:
            self._remove(run_id, REMOVED_IDLE)
        return expired

    def _make_room(self, run_id: str) -> None:
        if len(self._runs) < self.max_runs:
            return
        idle = [run for run in self._runs.values() if run.connected_ranks == 0]
        if not idle:
            raise LiveRunsFull(run_id, self.max_runs)
        oldest = min(idle, key=lambda run: run.last_activity_s)
        self._remove(oldest.run_id, REMOVED_CAP)

    def _remove(self, run_id: str, reason: str) -> None:
        run = self._runs[run_id]
        if self._on_remove is not None:
            self._on_remove(run, reason)
        del self._runs[run_id]

    # ---- streams and reports ----

    def connect(self, run_id: str, rank: int, world_size: int) -> asyncio.Queue[pb.Signal | None]:
        """Open a signal queue for a rank's new Watch stream, replacing an older stream's."""
        run = self.ensure(run_id, world_size)
        state = run.rank(rank)
        if state.outbox is not None:
            state.outbox.put_nowait(None)  # ends the older stream of the same rank
        else:
            run.connected_ranks += 1
        state.outbox = asyncio.Queue()
        return state.outbox

    def disconnect(self, run_id: str, rank: int, outbox: asyncio.Queue[pb.Signal | None]) -> None:
        run = self._runs.get(run_id)
        if run is None:
            return
        state = run.ranks.get(rank)
        if state is not None and state.outbox is outbox:
            state.outbox = None
            run.connected_ranks -= 1
            run.last_activity_s = self._clock()

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
        step = report.step
        if step > state.last_step:
            state.last_step = step
            if step > run.highest_step:
                run.highest_step = step
        state.last_loss = report.loss
        state.last_grad_norm = report.grad_norm
        state.last_report_unix_s = time.time()
        run.last_activity_s = self._clock()

    def has_connected(self, run_id: str) -> bool:
        """Return True while at least one rank of run_id has an open Watch stream."""
        run = self._runs.get(run_id)
        return run is not None and run.connected_ranks > 0

    def connected_count(self) -> int:
        return sum(run.connected_ranks for run in self._runs.values())
