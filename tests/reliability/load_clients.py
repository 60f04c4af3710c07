"""Simulated training ranks for the load tests: grpc.aio clients in one process, run as a subprocess.

Each rank makes the calls that nanwatch's report sender makes: RegisterRank, then
one Watch stream that starts with WatchStart and carries StepReports. Reports go
through a bounded buffer with the sender's rule (when full, the oldest report is
dropped and counted, and the running count goes out in StepReport.dropped_reports).

    python -m tests.reliability.load_clients reports --endpoint 127.0.0.1:50051 --run-prefix wave1 --runs 3
    python -m tests.reliability.load_clients burst --endpoint 127.0.0.1:50051 --run-id burst --ranks 3500

Each mode prints one JSON line of totals on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import time
from dataclasses import asdict, dataclass, field

import grpc

from nanwatch.v1 import nanwatch_pb2 as pb
from nanwatch.v1 import nanwatch_pb2_grpc as pb_grpc
from tests.service.helpers import registration, report

RPC_TIMEOUT_S = 60.0
REGISTER_CONCURRENCY = 64
CONNECTED_POLL_S = 0.2
# Each simulated rank gets its own TCP connection, as each training process has.
CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1)]


@dataclass(kw_only=True)
class LoadPlan:
    """What each rank sends: rounds of `burst` reports into a buffer of `buffer` reports, drained after each round."""

    rounds: int
    burst: int
    buffer: int
    deadline_s: float
    """Seconds after which no rank starts another round."""


@dataclass
class Totals:
    """Counts over every rank of this process."""

    produced: int = 0
    """Reports the simulated training loops created."""
    written: int = 0
    """Reports written to a Watch stream."""
    dropped: int = 0
    """Reports the buffers dropped, as sent to the service in the last written report of each rank."""
    signals: int = 0
    stream_codes: dict[str, int] = field(default_factory=dict)
    """Final status of each Watch stream, by code name."""
    errors: dict[str, int] = field(default_factory=dict)
    """RPC errors that ended a rank before its stream finished, by code name."""

    def count(self, table: dict[str, int], code: grpc.StatusCode) -> None:
        table[code.name] = table.get(code.name, 0) + 1


class ReportBuffer:
    """A rank's bounded report buffer with the report sender's drop rule."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.dropped = 0
        self._reports: collections.deque[pb.StepReport] = collections.deque()

    def enqueue(self, step_report: pb.StepReport) -> None:
        if len(self._reports) >= self.capacity:
            self._reports.popleft()
            self.dropped += 1
        self._reports.append(step_report)

    def take(self) -> pb.StepReport | None:
        """Return the oldest buffered report with the running drop count set, or None when empty."""
        if not self._reports:
            return None
        step_report = self._reports.popleft()
        step_report.dropped_reports = self.dropped
        return step_report


async def count_signals(call: grpc.aio.StreamStreamCall, totals: Totals) -> None:
    async for unused_signal in call:
        totals.signals += 1


async def open_watch(stub: pb_grpc.NanwatchStub, run_id: str, rank: int) -> grpc.aio.StreamStreamCall:
    """Open a Watch stream and write its WatchStart message."""
    call = stub.Watch()
    start = pb.WatchStart(run_id=run_id, rank=rank, client_id=f"client-{rank}")
    await call.write(pb.WatchRequest(start=start))
    return call


async def stream_reports(call: grpc.aio.StreamStreamCall, plan: LoadPlan, totals: Totals) -> None:
    """Produce rounds of reports into the buffer and write each round out; the last report carries the drop count."""
    buffer = ReportBuffer(plan.buffer)
    deadline = time.monotonic() + plan.deadline_s
    step = 0
    for _ in range(plan.rounds):
        if time.monotonic() > deadline:
            break
        for _ in range(plan.burst):
            buffer.enqueue(report(step))
            step += 1
            totals.produced += 1
        while (step_report := buffer.take()) is not None:
            await call.write(pb.WatchRequest(report=step_report))
            totals.written += 1
    totals.dropped += buffer.dropped


async def drive_rank(endpoint: str, run_id: str, rank: int, world_size: int, plan: LoadPlan,
                     totals: Totals, register_slots: asyncio.Semaphore) -> None:
    """Register one rank, stream its reports, half-close the stream and record its final status."""
    async with grpc.aio.insecure_channel(endpoint, options=CHANNEL_OPTIONS) as channel:
        stub = pb_grpc.NanwatchStub(channel)
        try:
            async with register_slots:
                await stub.RegisterRank(registration(run_id, rank, world_size), timeout=RPC_TIMEOUT_S)
            call = await open_watch(stub, run_id, rank)
            reader = asyncio.create_task(count_signals(call, totals))
            await stream_reports(call, plan, totals)
            await call.done_writing()
            totals.count(totals.stream_codes, await call.code())
            await reader
        except grpc.aio.AioRpcError as error:
            totals.count(totals.errors, error.code())


async def run_reports(args: argparse.Namespace) -> Totals:
    """Drive args.runs runs of args.ranks_per_run ranks at the same time."""
    plan = LoadPlan(rounds=args.rounds, burst=args.burst, buffer=args.buffer, deadline_s=args.deadline_s)
    totals = Totals()
    register_slots = asyncio.Semaphore(REGISTER_CONCURRENCY)
    ranks = [
        drive_rank(args.endpoint, f"{args.run_prefix}-run{index}", rank, args.ranks_per_run, plan, totals,
                   register_slots)
        for index in range(args.runs) for rank in range(args.ranks_per_run)
    ]
    await asyncio.gather(*ranks)
    return totals


@dataclass
class BurstResult:
    """Outcome of opening many Watch streams at once."""

    ranks: int
    connected: int = 0
    """Ranks the service listed as connected in GetRunStatus."""
    open_errors: dict[str, int] = field(default_factory=dict)


async def run_burst(args: argparse.Namespace) -> BurstResult:
    """Register args.ranks ranks of one run, open all their Watch streams back to back, then count them."""
    result = BurstResult(ranks=args.ranks)
    channels = [grpc.aio.insecure_channel(args.endpoint, options=CHANNEL_OPTIONS)
                for _ in range(args.channels)]
    stubs = [pb_grpc.NanwatchStub(channel) for channel in channels]
    register_slots = asyncio.Semaphore(REGISTER_CONCURRENCY)

    async def register(rank: int) -> None:
        async with register_slots:
            request = registration(args.run_id, rank, args.ranks)
            await stubs[rank % len(stubs)].RegisterRank(request, timeout=RPC_TIMEOUT_S)

    await asyncio.gather(*(register(rank) for rank in range(args.ranks)))
    calls = []
    for rank in range(args.ranks):
        try:
            calls.append(await open_watch(stubs[rank % len(stubs)], args.run_id, rank))
        except grpc.aio.AioRpcError as error:
            result.open_errors[error.code().name] = result.open_errors.get(error.code().name, 0) + 1
    result.connected = await wait_connected(stubs[0], args.run_id, args.ranks, args.deadline_s)
    for call in calls:
        call.cancel()
    await asyncio.gather(*(channel.close() for channel in channels))
    return result


async def wait_connected(stub: pb_grpc.NanwatchStub, run_id: str, ranks: int, timeout_s: float) -> int:
    """Poll GetRunStatus until every rank is connected or timeout_s passes; return the connected count."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = await stub.GetRunStatus(pb.GetRunStatusRequest(run_id=run_id), timeout=RPC_TIMEOUT_S)
        connected = sum(1 for info in status.ranks if info.connected)
        if connected == ranks or time.monotonic() > deadline:
            return connected
        await asyncio.sleep(CONNECTED_POLL_S)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    modes = parser.add_subparsers(dest="mode", required=True)
    reports = modes.add_parser("reports", help="register ranks, stream reports, half-close")
    reports.add_argument("--endpoint", required=True, help="HOST:PORT of the service (loopback only)")
    reports.add_argument("--run-prefix", required=True, help="run ids are PREFIX-run0, PREFIX-run1, ...")
    reports.add_argument("--runs", type=int, default=3)
    reports.add_argument("--ranks-per-run", type=int, default=50)
    reports.add_argument("--rounds", type=int, default=8, help="rounds of reports per rank")
    reports.add_argument("--burst", type=int, default=6, help="reports produced per round")
    reports.add_argument("--buffer", type=int, default=4, help="report buffer size; a burst above it drops reports")
    reports.add_argument("--deadline-s", type=float, default=20.0, help="no rank starts a round after this")
    burst = modes.add_parser("burst", help="open many Watch streams back to back and count them on the service")
    burst.add_argument("--endpoint", required=True, help="HOST:PORT of the service (loopback only)")
    burst.add_argument("--run-id", required=True)
    burst.add_argument("--ranks", type=int, default=3500)
    burst.add_argument("--channels", type=int, default=16, help="TCP connections the streams share")
    burst.add_argument("--deadline-s", type=float, default=30.0, help="how long to wait for every stream")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.mode == "reports":
        print(json.dumps(asdict(asyncio.run(run_reports(args)))), flush=True)
    else:
        print(json.dumps(asdict(asyncio.run(run_burst(args)))), flush=True)


if __name__ == "__main__":
    main()
