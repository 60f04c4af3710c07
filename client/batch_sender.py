"""Background sender of whole batches to the CheckBatch RPC."""

from __future__ import annotations

import collections
import logging
import threading
from dataclasses import dataclass

import grpc
import torch

from nanwatch.client.connection import ChannelSecurity, OutageLog, backoff_delay_s, open_channel
from nanwatch.client.sender import log_finding
from nanwatch.client.wire import to_wire_tensor
from nanwatch.v1 import nanwatch_pb2 as pb
from nanwatch.v1 import nanwatch_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

CHECK_BATCH_TIMEOUT_S = 10.0
# Batches can be large, so fewer of them wait than step reports.
MAX_QUEUED_BATCHES = 16


@dataclass(slots=True)
class PendingBatch:
    """Host copies of one check_batch call's tensors, waiting to be sent."""

    step: int
    tensors: dict[str, torch.Tensor]


class BatchSender:
    """Sends CheckBatch calls from its own daemon thread and bounded queue.

    When the queue is full the oldest batch is dropped and counted. A failed call
    drops its batch, logs one warning per outage and waits with backoff.
    """

    def __init__(self, *, endpoint: str, run_id: str, rank: int, security: ChannelSecurity | None = None) -> None:
        self.endpoint = endpoint
        self._security = security
        self.dropped_batches = 0
        self._run_id = run_id
        self._rank = rank
        self._queue: collections.deque[PendingBatch] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._logged_codes: set[str] = set()
        self._outage = OutageLog(what="CheckBatch", endpoint=endpoint, run_id=run_id, rank=rank)
        self._thread = threading.Thread(target=self._run, name="nanwatch-batches", daemon=True)

    def start(self) -> None:
        """Start the daemon thread."""
        self._thread.start()

    def enqueue(self, step: int, tensors: dict[str, torch.Tensor]) -> None:
        """Buffer host copies of tensors for sending; drops the oldest batch when the queue is full."""
        with self._cond:
            if len(self._queue) >= MAX_QUEUED_BATCHES:
                self._queue.popleft()
                self.dropped_batches += 1
            self._queue.append(PendingBatch(step=step, tensors=tensors))
            self._cond.notify_all()

    def close(self, timeout_s: float) -> None:
        """Send what is queued for up to timeout_s, then stop the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if not self._outage.in_outage:
            self._thread.join(timeout_s)

    def _run(self) -> None:
        channel = open_channel(self.endpoint, self._security)
        stub = pb_grpc.NanwatchStub(channel)
        attempt = 0
        try:
            while (batch := self._next_batch()) is not None:
                if self._send(stub, batch):
                    attempt = 0
                    continue
                with self._cond:
                    self._cond.wait_for(lambda: self._stopping, backoff_delay_s(attempt))
                attempt += 1
        finally:
            channel.close()

    def _next_batch(self) -> PendingBatch | None:
        with self._cond:
            self._cond.wait_for(lambda: self._queue or self._stopping)
            if self._stopping and (not self._queue or self._outage.in_outage):
                return None
            return self._queue.popleft()

    def _send(self, stub: pb_grpc.NanwatchStub, batch: PendingBatch) -> bool:
        """Send one batch; returns False when the call failed."""
        try:
            request = pb.CheckBatchRequest(
                run_id=self._run_id,
                rank=self._rank,
                step=batch.step,
                tensors=[to_wire_tensor(name, tensor) for name, tensor in batch.tensors.items()],
            )
            response = stub.CheckBatch(request, timeout=CHECK_BATCH_TIMEOUT_S)
        except grpc.RpcError as error:
            self._outage.failed(error)
            return False
        self._outage.succeeded()
        self._log_new_findings(response)
        return True

    def _log_new_findings(self, response: pb.CheckBatchResponse) -> None:
        """Log each finding code once per Watcher, so a bad data source does not flood the log."""
        for finding in response.findings:
            if finding.code not in self._logged_codes and finding.severity >= pb.SEVERITY_WARNING:
                self._logged_codes.add(finding.code)
                log_finding(finding)
