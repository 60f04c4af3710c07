"""A bare gRPC streaming server on grpc.aio: the transport ceiling that nanwatch's Watch stream is compared with.

Two methods take raw bytes without protobuf parsing: Echo sends every message back,
and Sink only counts them, which is the direction of traffic on a Watch stream.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from nanwatch.service.server import DEFAULT_MAX_PENDING_REQUESTS

SERVICE = "nanwatch.bench.Echo"
ECHO_METHOD = f"/{SERVICE}/Echo"
SINK_METHOD = f"/{SERVICE}/Sink"


class MessageCounter:
    """Count of messages the server received; read from another thread."""

    def __init__(self) -> None:
        self.received = 0


def build_handler(counter: MessageCounter) -> grpc.GenericRpcHandler:
    """Return the generic handler of the Echo and Sink methods, counting into counter."""

    async def echo(requests: AsyncIterator[bytes], unused_context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        async for message in requests:
            counter.received += 1
            yield message

    async def sink(requests: AsyncIterator[bytes], unused_context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        async for unused_message in requests:
            counter.received += 1
        yield b""

    return grpc.method_handlers_generic_handler(SERVICE, {
        "Echo": grpc.stream_stream_rpc_method_handler(echo),
        "Sink": grpc.stream_stream_rpc_method_handler(sink),
    })


def server_options(max_pending_requests: int = DEFAULT_MAX_PENDING_REQUESTS) -> list[tuple[str, int]]:
    """Return the gRPC core limits on calls not yet accepted, set as the nanwatch service sets them.

    With gRPC's defaults, core rejects a random share of new calls once more than 1,000 wait
    for the event loop, so a burst of streams would fail here and not on the service.
    """
    return [("grpc.server.max_pending_requests", max_pending_requests),
            ("grpc.server.max_pending_requests_hard_limit", max_pending_requests)]


async def start_echo_server(counter: MessageCounter) -> tuple[grpc.aio.Server, int]:
    """Start the bare server on a free port of 127.0.0.1; return it and the port."""
    server = grpc.aio.server(options=server_options())
    server.add_generic_rpc_handlers((build_handler(counter),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port
