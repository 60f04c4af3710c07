"""Load generator: N simulated ranks, each a Watch stream (or a bare stream) on grpc.aio, in this process.

Modes:
  stream  every rank writes step reports as fast as flow control lets it, or --rate-per-rank
          reports per second each; prints JSON
          lines {"event": "ready"}, {"event": "measure-start"}, {"event": "measure-end", "sent": n}
          so that the parent samples the server's CPU and memory between them. A stream that
          fails, while opening or later, ends the output with {"event": "failed", "opened": n,
          "code": name}, where n counts the streams that stayed open.
  halt    per trial a new run of N ranks; rank 0 sends a report with a NaN loss and the
          time until every rank's stream delivers the HALT is measured; prints one JSON
          line {"latencies_s": [...], "first_latencies_s": [...]}.

    python -m benchmarks.rank_load --endpoint 127.0.0.1:50051 --kind nanwatch --ranks 64 --mode stream
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from benchmarks.echo_server import ECHO_METHOD, SINK_METHOD
from nanwatch.v1 import nanwatch_pb2 as pb
from nanwatch.v1 import nanwatch_pb2_grpc as pb_grpc

WATCH_METHOD = "/nanwatch.v1.Nanwatch/Watch"
REGISTER_CONCURRENCY = 64
HALT_WAIT_S = 10.0
CONNECTED_WAIT_S = 30.0
# Added to CONNECTED_WAIT_S per rank: the service accepts a burst of 16,384 streams in tens of seconds.
CONNECTED_WAIT_PER_RANK_S = 0.005
PUMP_STOP_WAIT_S = 10.0
# Parameter tensors of the simulated model (a 4-layer transformer has about this many).
SIMULATED_PARAMETERS = 36


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def parameter_names() -> list[str]:
    """Return parameter names shaped like those of a 4-layer transformer encoder."""
    per_layer = ("self_attn.in_proj_weight", "self_attn.in_proj_bias", "self_attn.out_proj.weight",
                 "self_attn.out_proj.bias", "linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias")
    names = ["embed.weight", "position"]
    names += [f"encoder.layers.{layer}.{name}" for layer in range(4) for name in per_layer]
    return (names + ["head.weight", "head.bias"])[:SIMULATED_PARAMETERS]


def report_template() -> pb.StepReport:
    """Return a healthy step report of the size a Watcher sends for the 4M-parameter transformer."""
    report = pb.StepReport(loss=2.3, loss_finite=True, grad_norm=1.5, param_norm=60.0, update_norm=math.nan,
                           lr=1e-4, loss_scale=0.0, output_checked=True, output_finite=True)
    report.parameter_grad_norms.extend(pb.ParameterGradNorm(name=name, grad_norm=0.25) for name in parameter_names())
    for name, shape in (("inputs", [8, 64]), ("targets", [512])):
        report.batch.add(name=name, dtype="int64", shape=shape, min=0.0, max=1999.0, mean=1000.0, std=577.0)
    return report


class ReportBytes:
    """Serialized WatchRequest messages of the template report at a given step, built without protobuf calls.

    A scalar field appended to a serialized message overrides the earlier value, so
    the step is appended to the template's bytes and the outer length is recomputed.
    """

    def __init__(self, template: pb.StepReport) -> None:
        template.step = 0
        self._report = template.SerializeToString()

    def at_step(self, step: int) -> bytes:
        report = self._report + b"\x08" + _varint(step)
        return b"\x12" + _varint(len(report)) + report


def register_request(run_id: str, rank: int, world_size: int) -> pb.RegisterRankRequest:
    """Return the registration of one simulated rank, with a few well-scaled parameters."""
    request = pb.RegisterRankRequest(run_id=run_id, rank=rank, world_size=world_size, host="bench",
                                     pid=rank, client_id=uuid.uuid4().hex, loss_function="CrossEntropyLoss")
    request.optimizer.type = "AdamW"
    request.optimizer.lr = 1e-4
    for index in range(4):
        request.parameters.add(name=f"encoder.layers.{index}.linear1.weight", shape=[1024, 256], dtype="float32",
                               numel=1024 * 256, mean=0.0, std=1 / 16, min=-0.2, max=0.2, fan_in=256,
                               module_type="Linear")
    return request


@dataclass(kw_only=True)
class Ranks:
    """Open streams of the simulated ranks and the channels they share."""

    channels: list[grpc.aio.Channel]
    calls: list[grpc.aio.StreamStreamCall]


def open_channels(endpoint: str, ranks: int, ranks_per_channel: int) -> list[grpc.aio.Channel]:
    """Return one channel (one TCP connection) per ranks_per_channel ranks."""
    count = max(1, math.ceil(ranks / ranks_per_channel))
    return [grpc.aio.insecure_channel(endpoint, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(count)]


async def register_all(channels: list[grpc.aio.Channel], run_id: str, ranks: range, world_size: int) -> None:
    """Register the ranks of run_id, at most REGISTER_CONCURRENCY calls at a time."""
    limit = asyncio.Semaphore(REGISTER_CONCURRENCY)

    async def register(rank: int) -> None:
        async with limit:
            stub = pb_grpc.NanwatchStub(channels[rank % len(channels)])
            await stub.RegisterRank(register_request(run_id, rank, world_size), timeout=60)

    await asyncio.gather(*(register(rank) for rank in ranks))


async def open_streams(channels: list[grpc.aio.Channel], kind: str, run_id: str, ranks: range) -> list[grpc.aio.StreamStreamCall]:
    """Open one stream per rank; a Watch stream starts with its WatchStart message."""
    method = {"nanwatch": WATCH_METHOD, "echo": ECHO_METHOD, "sink": SINK_METHOD}[kind]
    deserializer = pb.Signal.FromString if kind == "nanwatch" else None
    calls = []
    for rank in ranks:
        call = channels[rank % len(channels)].stream_stream(method, response_deserializer=deserializer)()
        calls.append(call)
        if kind == "nanwatch":
            start = pb.WatchRequest(start=pb.WatchStart(run_id=run_id, rank=rank, client_id=f"bench-{rank}"))
            try:
                await call.write(start.SerializeToString())
            except grpc.aio.AioRpcError as error:
                raise StreamsFailed(opened=len(calls) - 1, code=error.code().name) from error
    return calls


class StreamsFailed(Exception):
    """A Watch stream failed while the streams were being opened."""

    def __init__(self, *, opened: int, code: str) -> None:
        super().__init__(f"stream {opened} failed with {code}")
        self.opened = opened
        self.code = code


async def drain(call: grpc.aio.StreamStreamCall) -> None:
    """Read and drop every response of a stream until it ends."""
    try:
        async for unused_response in call:
            pass
    except (grpc.aio.AioRpcError, asyncio.CancelledError):
        return


async def pump(call: grpc.aio.StreamStreamCall, payloads: ReportBytes, stop: asyncio.Event, sent: list[int],
               interval_s: float = 0.0, first_step: int = 1) -> str:
    """Write reports with rising steps on one stream until stop is set; return "" or the code that ended it.

    With interval_s > 0 the stream writes one report per interval, starting at a random
    point of the first one so that the ranks' writes spread over time. A write that flow
    control held back is followed by the next one at once, so the schedule catches up.
    """
    step = first_step
    loop = asyncio.get_running_loop()
    next_write = loop.time() + random.uniform(0.0, interval_s)
    try:
        while not stop.is_set():
            if interval_s > 0.0:
                await asyncio.sleep(max(0.0, next_write - loop.time()))
                next_write += interval_s
            await call.write(payloads.at_step(step))
            step += 1
            sent[0] += 1
    except grpc.aio.AioRpcError as error:
        return error.code().name
    except asyncio.InvalidStateError:
        return "FINISHED"  # grpc.aio raises this on a write after the server ended the call
    return ""


def emit(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


async def run_stream(args: argparse.Namespace) -> None:
    """Stream reports from args.ranks ranks for warm-up plus the measured window."""
    ranks = range(args.first_rank, args.first_rank + args.ranks)
    channels = open_channels(args.endpoint, args.ranks, args.ranks_per_channel)
    started = time.perf_counter()
    if args.kind == "nanwatch":
        await register_all(channels, args.run_id, ranks, args.world_size or args.ranks)
    registered_s = time.perf_counter() - started
    try:
        calls = await open_streams(channels, args.kind, args.run_id, ranks)
    except StreamsFailed as failure:
        emit(event="failed", opened=failure.opened, code=failure.code)
        return
    if args.kind == "nanwatch":
        # A stream that the server's backlog limit rejected can still take its first write,
        # so the service's own count of connected ranks is the check.
        connected = await wait_connected(channels[0], args.run_id, ranks)
        if connected < len(ranks):
            emit(event="failed", opened=connected, code="NOT_CONNECTED")
            await _close(calls, [], channels)
            return
    drains = [asyncio.create_task(drain(call)) for call in calls]
    emit(event="ready", register_s=registered_s, setup_s=time.perf_counter() - started)

    stop, sent = asyncio.Event(), [0]
    payloads = ReportBytes(report_template())
    interval_s = 1.0 / args.rate_per_rank if args.rate_per_rank > 0 else 0.0
    pumps = [asyncio.create_task(pump(call, payloads, stop, sent, interval_s, args.first_step)) for call in calls]
    await asyncio.sleep(args.warmup_s)
    emit(event="measure-start", sent=sent[0])
    await asyncio.sleep(args.measure_s)
    emit(event="measure-end", sent=sent[0])
    stop.set()
    await _report_failed_pumps(pumps)
    await _close(calls, [*pumps, *drains], channels)


async def _report_failed_pumps(pumps: list[asyncio.Task[str]]) -> None:
    """Emit a failed event when a stream ended with an error during the run; streams fail silently otherwise."""
    done, _ = await asyncio.wait(pumps, timeout=PUMP_STOP_WAIT_S)
    codes = [task.result() for task in done if task.result()]
    if codes:
        emit(event="failed", opened=len(pumps) - len(codes), code=codes[0])


async def _close(calls: list[grpc.aio.StreamStreamCall], tasks: Sequence[asyncio.Task[Any]],
                 channels: list[grpc.aio.Channel]) -> None:
    for call in calls:
        call.cancel()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.gather(*(channel.close() for channel in channels))


async def wait_connected(channel: grpc.aio.Channel, run_id: str, ranks: range) -> int:
    """Poll GetRunStatus until every rank in ranks has an open Watch stream, or CONNECTED_WAIT_S passes.

    Returns how many of them the service lists as connected.
    """
    stub = pb_grpc.NanwatchStub(channel)
    deadline = time.perf_counter() + CONNECTED_WAIT_S + CONNECTED_WAIT_PER_RANK_S * len(ranks)
    # A status lists every rank, so polls of a large run are spaced out to leave the service time.
    poll_s = 0.005 + 1e-5 * len(ranks)
    while True:
        status = await stub.GetRunStatus(pb.GetRunStatusRequest(run_id=run_id), timeout=60)
        connected = sum(1 for info in status.ranks if info.connected and info.rank in ranks)
        if connected == len(ranks) or time.perf_counter() > deadline:
            return connected
        await asyncio.sleep(poll_s)


async def first_halt(call: grpc.aio.StreamStreamCall) -> float:
    """Return the perf_counter time at which the stream delivered its first HALT signal."""
    async for signal in call:
        if signal.kind == pb.SIGNAL_KIND_HALT:
            return time.perf_counter()
    raise RuntimeError("the Watch stream ended without a HALT signal")


async def halt_trial(args: argparse.Namespace, channels: list[grpc.aio.Channel], trial: int) -> list[float]:
    """Run one halt trial on a new run; return each rank's latency from the NaN report to its HALT."""
    run_id = f"bench-halt-{uuid.uuid4().hex[:8]}-{trial}"
    ranks = range(args.ranks)
    await register_all(channels, run_id, ranks, args.ranks)
    calls = await open_streams(channels, "nanwatch", run_id, ranks)
    connected = await wait_connected(channels[0], run_id, ranks)
    if connected < args.ranks:
        raise RuntimeError(f"run {run_id}: {connected} of {args.ranks} Watch streams were open after "
                           f"{CONNECTED_WAIT_S:g} s")
    waits = [asyncio.create_task(first_halt(call)) for call in calls]

    poisoned = report_template()
    poisoned.step, poisoned.loss, poisoned.loss_finite = 1, math.nan, False
    sent_at = time.perf_counter()
    await calls[0].write(pb.WatchRequest(report=poisoned).SerializeToString())
    arrivals = await asyncio.wait_for(asyncio.gather(*waits), HALT_WAIT_S)
    await _close(calls, [], [])
    return [arrival - sent_at for arrival in arrivals]


async def run_halt(args: argparse.Namespace) -> None:
    channels = open_channels(args.endpoint, args.ranks, args.ranks_per_channel)
    latencies, first = [], []
    for trial in range(args.trials):
        per_rank = await halt_trial(args, channels, trial)
        latencies.append(max(per_rank))
        first.append(min(per_rank))
    await asyncio.gather(*(channel.close() for channel in channels))
    emit(latencies_s=latencies, first_latencies_s=first)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--endpoint", required=True, help="host:port of the server (loopback only)")
    parser.add_argument("--kind", choices=("nanwatch", "echo", "sink"), default="nanwatch")
    parser.add_argument("--mode", choices=("stream", "halt"), default="stream")
    parser.add_argument("--ranks", type=int, default=64, help="simulated ranks in this process")
    parser.add_argument("--first-rank", type=int, default=0, help="rank number of this process's first rank")
    parser.add_argument("--world-size", type=int, default=0, help="ranks of the run over all load processes")
    parser.add_argument("--run-id", default=f"bench-{uuid.uuid4().hex[:8]}")
    parser.add_argument("--ranks-per-channel", type=int, default=64, help="streams sharing one TCP connection")
    parser.add_argument("--warmup-s", type=float, default=1.0)
    parser.add_argument("--measure-s", type=float, default=3.0)
    parser.add_argument("--rate-per-rank", type=float, default=0.0,
                        help="reports per second per rank in mode stream; 0 writes as fast as flow control allows")
    parser.add_argument("--first-step", type=int, default=1,
                        help="step of each rank's first report in mode stream (the service persists at every 50th)")
    parser.add_argument("--trials", type=int, default=10, help="halt trials (mode halt)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    asyncio.run(run_halt(args) if args.mode == "halt" else run_stream(args))


if __name__ == "__main__":
    main()
