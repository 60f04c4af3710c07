"""The asyncio gRPC servicer of nanwatch.v1.Nanwatch: wire format in, Supervisor calls out."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError

from nanwatch.service.live import LiveRun
from nanwatch.service.supervisor import Supervisor
from nanwatch.service.validation import RequestError
from nanwatch.v1 import nanwatch_pb2 as pb
from nanwatch.v1 import nanwatch_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

ResponseT = TypeVar("ResponseT")


class NanwatchServicer(pb_grpc.NanwatchServicer):
    """Serves the Nanwatch API over one Supervisor.

    Every handler turns a RequestError into its gRPC status and any other
    exception into INTERNAL, so a bad request never stops the service.
    """

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor

    async def RegisterRank(
        self, request: pb.RegisterRankRequest, context: grpc.aio.ServicerContext
    ) -> pb.RegisterRankResponse:
        return await self._answer("RegisterRank", context, lambda: self.supervisor.register(request))

    async def CheckBatch(
        self, request: pb.CheckBatchRequest, context: grpc.aio.ServicerContext
    ) -> pb.CheckBatchResponse:
        return await self._answer("CheckBatch", context, lambda: self.supervisor.check_batch(request))

    async def GetRunStatus(self, request: pb.GetRunStatusRequest, context: grpc.aio.ServicerContext) -> pb.RunStatus:
        return await self._answer("GetRunStatus", context, lambda: self.supervisor.run_status(request.run_id))

    async def ListRuns(self, request: pb.ListRunsRequest, context: grpc.aio.ServicerContext) -> pb.ListRunsResponse:
        return await self._answer("ListRuns", context, lambda: self.supervisor.list_runs(request.limit))

    async def HaltRun(self, request: pb.HaltRunRequest, context: grpc.aio.ServicerContext) -> pb.HaltRunResponse:
        return await self._answer("HaltRun", context, lambda: self.supervisor.halt_by_operator(request))

    async def Watch(
        self, request_iterator: AsyncIterator[pb.WatchRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.Signal]:
        first = await _first_message(request_iterator)
        if isinstance(first, MalformedRequest):
            await self._abort(context, "Watch", first.error())
            return
        if first is None or first.WhichOneof("kind") != "start":
            await self._abort(context, "Watch", RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                "the first message on a Watch stream must be `start` (run_id, rank, client_id)",
            ))
            return
        start = first.start
        try:
            run, outbox = self.supervisor.open_stream(start)
        except RequestError as error:
            await self._abort(context, "Watch", error)
            return

        reader = asyncio.create_task(self._read_reports(request_iterator, run, start.rank, outbox))
        try:
            while True:
                signal = await outbox.get()
                if signal is None:
                    break
                yield signal
        finally:
            reader.cancel()
            self.supervisor.close_stream(start.run_id, start.rank, outbox)
        error = reader.exception() if reader.done() and not reader.cancelled() else None
        if isinstance(error, RequestError):
            await self._abort(context, "Watch", error)

    async def _read_reports(
        self,
        request_iterator: AsyncIterator[pb.WatchRequest],
        run: LiveRun,
        rank: int,
        outbox: asyncio.Queue[pb.Signal | None],
    ) -> None:
        """Check every report of one stream; end the stream when the client half-closes or errs."""
        try:
            async for message in request_iterator:
                if isinstance(message, MalformedRequest):
                    raise message.error()
                kind = message.WhichOneof("kind")
                if kind == "report":
                    self.supervisor.process_report(run, rank, message.report)
                elif kind == "reports":
                    # In order, so that a bad report ends the stream after the good ones before it are kept.
                    for report in message.reports.reports:
                        self.supervisor.process_report(run, rank, report)
                elif kind == "start":
                    raise RequestError(
                        grpc.StatusCode.INVALID_ARGUMENT, "only the first message on a Watch stream may be `start`"
                    )
                else:
                    raise RequestError(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        "a Watch message after `start` must set `report` or `reports`; this one sets neither "
                        "(a client newer than this service may send kinds it does not know; upgrade the service)",
                    )
        except RequestError as error:
            self.supervisor.metrics.rpc_errors.labels("Watch", error.code.name).inc()
            logger.warning("Watch stream rejected a report rank=%d: %s", rank, error.message)
            outbox.put_nowait(None)
            raise
        except Exception:
            logger.exception("Watch stream failed rank=%d", rank)
            outbox.put_nowait(None)
            raise
        outbox.put_nowait(None)

    async def _answer(
        self, method: str, context: grpc.aio.ServicerContext, call: Callable[[], ResponseT]
    ) -> ResponseT:
        try:
            return call()
        except RequestError as error:
            await self._abort(context, method, error)
        except Exception:
            logger.exception("%s failed", method)
            self.supervisor.metrics.rpc_errors.labels(method, "INTERNAL").inc()
            await context.abort(grpc.StatusCode.INTERNAL, f"{method} failed inside the service; see its log")
        raise AssertionError("context.abort returned")  # pragma: no cover

    async def _abort(self, context: grpc.aio.ServicerContext, method: str, error: RequestError) -> None:
        self.supervisor.metrics.rpc_errors.labels(method, error.code.name).inc()
        logger.info("%s rejected with %s: %s", method, error.code.name, error.message)
        await context.abort(error.code, error.message)


async def _first_message(
    request_iterator: AsyncIterator[pb.WatchRequest],
) -> pb.WatchRequest | MalformedRequest | None:
    try:
        return await request_iterator.__anext__()
    except StopAsyncIteration:
        return None



class MalformedRequest:
    """Stands in for a request message whose bytes did not parse, so the handler can reject it."""

    def __init__(self, type_name: str, error: DecodeError) -> None:
        self.type_name = type_name
        self.reason = str(error)

    def error(self) -> RequestError:
        return RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                            f"request is not a valid {self.type_name}: {self.reason}; send a serialized {self.type_name}")


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):
    """Rejects requests whose bytes do not parse with INVALID_ARGUMENT instead of gRPC's UNKNOWN.

    Only the Nanwatch service's methods are wrapped; health and reflection keep gRPC's handling.
    on_reject, when given, is called with the method and status of each rejected unary call.
    """

    def __init__(self, on_reject: Callable[[str, grpc.StatusCode], None] | None = None) -> None:
        self._on_reject = on_reject

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith("/nanwatch.v1.Nanwatch/"):
            return handler
        return _tolerant_handler(handler, handler_call_details.method.rsplit("/", 1)[-1], self._on_reject)


def _tolerant_handler(handler: grpc.RpcMethodHandler, method: str,
                      on_reject: Callable[[str, grpc.StatusCode], None] | None) -> grpc.RpcMethodHandler:
    """Return handler with a deserializer that yields MalformedRequest instead of raising."""
    parse = handler.request_deserializer
    type_name = f"{method}Request" if method != "Watch" else "WatchRequest"

    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError as error:
            return MalformedRequest(type_name, error)

    if handler.request_streaming:
        # Watch checks each message for MalformedRequest itself.
        return grpc.stream_stream_rpc_method_handler(handler.stream_stream, request_deserializer=deserialize,
                                                     response_serializer=handler.response_serializer)

    behavior = handler.unary_unary

    async def reject_malformed(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, MalformedRequest):
            error = request.error()
            logger.info("%s rejected with %s: %s", method, error.code.name, error.message)
            if on_reject is not None:
                on_reject(method, error.code)
            await context.abort(error.code, error.message)
        return await behavior(request, context)

    return grpc.unary_unary_rpc_method_handler(reject_malformed, request_deserializer=deserialize,
                                               response_serializer=handler.response_serializer)
