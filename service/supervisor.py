"""The service's core: runs the staged checks on what ranks send, records findings, halts runs.

The gRPC servicer only translates between the wire and this class, so the
same logic serves the standalone service and the in-process one that
``nanwatch run`` and ``nanwatch demo`` start.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Sequence

import grpc
import numpy as np

from nanwatch.errors import skipped_before_halt
from nanwatch.service.checklist import build_checklist
from nanwatch.service.checks.catalog import spec_for
from nanwatch.service.diagnosis import choose_primary
from nanwatch.service.engine import CheckEngine
from nanwatch.service.live import (
    DEFAULT_LIVE_RUN_TTL_S, DEFAULT_MAX_LIVE_RUNS, REMOVED_CAP, LiveRun, LiveRuns, LiveRunsFull,
)
from nanwatch.service.metrics import ServiceMetrics
from nanwatch.service.store import HaltRecord, Store
from nanwatch.service.tensor_codec import TensorDecodeError, decode_tensor
from nanwatch.service.validation import (
    MAX_ID_CHARS, RequestError, check_batch_request, check_halt_request, check_rank, check_registration, check_report,
    check_run_id, check_text,
)
from nanwatch.v1 import nanwatch_pb2 as pb

logger = logging.getLogger(__name__)

HALT_SOURCE_FINDING = "finding"
HALT_SOURCE_CLIENT = "client"
HALT_SOURCE_OPERATOR = "operator"


class Supervisor:
    """Applies the check engine to registrations, reports and batches, and halts runs.

    Args:
        store: where runs, findings and halts persist.
        engine: the staged checks.
        metrics: the Prometheus metric families to update.
        max_batch_bytes: limit on the raw tensor bytes of one CheckBatch request.
        max_live_runs: maximum number of runs held in memory (connected ranks, check state); see LiveRuns.
        live_run_ttl_s: seconds after which a run with no connected rank and no report leaves memory.
        clock: monotonic clock of the live-run expiry, replaceable in tests.
    """

    def __init__(
        self, *, store: Store, engine: CheckEngine, metrics: ServiceMetrics, max_batch_bytes: int,
        max_live_runs: int = DEFAULT_MAX_LIVE_RUNS, live_run_ttl_s: float = DEFAULT_LIVE_RUN_TTL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.engine = engine
        self.metrics = metrics
        self.live = LiveRuns(max_runs=max_live_runs, idle_ttl_s=live_run_ttl_s, on_remove=self._forget_live_run,
                             clock=clock)
        self.max_batch_bytes = max_batch_bytes

    def restore_metrics(self, recent_runs: int = 1000) -> None:
        """Set the halted gauge of the most recent stored runs, so dashboards survive a restart.

        The runs count as finished, so their series expire like those of any finished run.
        """
        limit = min(recent_runs, self.metrics.budget.max_runs)
        # Oldest first, so that at the cap the newest runs keep their series.
        for run in reversed(self.store.list_runs(limit)):
            self.metrics.observe_run(run.run_id, halted=self.store.get_halt(run.run_id) is not None)

    # ---- registration ----

    def register(self, request: pb.RegisterRankRequest) -> pb.RegisterRankResponse:
        check_registration(request)
        stored = self.store.upsert_run(request.run_id, world_size=request.world_size)
        if stored.world_size != request.world_size:
            raise RequestError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"run {request.run_id!r} was registered with world_size {stored.world_size}, not "
                f"{request.world_size}; use a new run id for a job of another size",
            )
        try:
            run = self.live.ensure(request.run_id, request.world_size)
        except LiveRunsFull as error:
            return self._answer_untracked_registration(request, error)
        self._claim_rank(run, request)
        self.store.upsert_rank(request)
        self.metrics.observe_run(request.run_id, halted=self.store.get_halt(request.run_id) is not None)
        logger.info(
            "registered run=%s rank=%d/%d host=%s client=%s",
            request.run_id, request.rank, request.world_size, request.host, request.client_id,
        )

        findings = self.engine.check_registration(request)
        recorded = self._record_findings(findings)
        self._persist_progress(request.run_id)
        self._halt_on_critical(request.run_id, recorded, step=0)

        response = pb.RegisterRankResponse(findings=recorded)
        halt = self.store.get_halt(request.run_id)
        if halt is not None:
            response.halt.CopyFrom(_halt_signal(halt))
        return response

    def _answer_untracked_registration(
        self, request: pb.RegisterRankRequest, error: LiveRunsFull
    ) -> pb.RegisterRankResponse:
        """Return the stored halt of a run that cannot be tracked now, or reject the registration.

        A halted run needs no tracking: its rank only has to learn of the halt.
        """
        halt = self.store.get_halt(request.run_id)
        if halt is None:
            logger.warning("registration rejected run=%s rank=%d: %s", request.run_id, request.rank, error)
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(error))
        logger.info("registered halted run=%s rank=%d without tracking it: %s", request.run_id, request.rank, error)
        return pb.RegisterRankResponse(halt=_halt_signal(halt))

    def _claim_rank(self, run: LiveRun, request: pb.RegisterRankRequest) -> None:
        state = run.rank(request.rank)
        if state.connected and state.client_id and state.client_id != request.client_id:
            raise RequestError(
                grpc.StatusCode.ALREADY_EXISTS,
                f"rank {request.rank} of run {request.run_id!r} is already connected from client "
                f"{state.client_id}; each rank must use its own rank number",
            )
        if state.client_id == request.client_id:
            logger.info("rank reconnected run=%s rank=%d client=%s", request.run_id, request.rank, request.client_id)
        else:
            # A new process for this rank (for example after a restart) starts over.
            run.restart_rank(request.rank)
        state.client_id = request.client_id
        state.host = request.host

    # ---- step reports ----

    def open_stream(self, start: pb.WatchStart) -> tuple[LiveRun, asyncio.Queue[pb.Signal | None]]:
        """Validate a Watch stream's start message and return the run and the rank's signal queue."""
        check_run_id(start.run_id, "start.run_id")
        stored = self.store.get_run(start.run_id)
        if stored is None:
            raise RequestError(
                grpc.StatusCode.NOT_FOUND,
                f"run {start.run_id!r} is not registered; call RegisterRank before opening the Watch stream",
            )
        check_rank(start.rank, stored.world_size)
        check_text(start.client_id, "start.client_id", MAX_ID_CHARS)
        try:
            run = self.live.ensure(start.run_id, stored.world_size)
        except LiveRunsFull as error:
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(error)) from None
        _check_stream_owner(run, start)
        outbox = self.live.connect(start.run_id, start.rank, stored.world_size)
        run.rank(start.rank).client_id = start.client_id or run.rank(start.rank).client_id
        self.metrics.run_connected(start.run_id)
        self.metrics.active_streams.set(self.live.connected_count())
        halt = self.store.get_halt(start.run_id)
        if halt is not None:
            outbox.put_nowait(_halt_signal(halt))  # a rank reconnecting after the halt still gets it
        logger.info("stream opened run=%s rank=%d", start.run_id, start.rank)
        return run, outbox

    def close_stream(self, run_id: str, rank: int, outbox: asyncio.Queue[pb.Signal | None]) -> None:
        self.live.disconnect(run_id, rank, outbox)
        if not self.live.has_connected(run_id):
            self.metrics.run_finished(run_id)
        self._persist_progress(run_id)
        self.metrics.active_streams.set(self.live.connected_count())
        logger.info("stream closed run=%s rank=%d", run_id, rank)

    def process_report(self, run: LiveRun, rank: int, report: pb.StepReport) -> None:
        started = time.perf_counter()
        state = run.rank(rank)
        check_report(report, state.last_step)
        if report.dropped_reports > state.dropped_reports:
            self._count_client_drops(run, rank, report.dropped_reports)
        self.live.record_report(run.run_id, rank, report)
        self.metrics.observe_report(run.run_id, rank, report)

        findings = self.engine.check_report(run.run_id, rank, report)
        halted_locally = report.halted_locally
        if halted_locally and report.HasField("client_finding"):
            findings += _accepted_client_finding(run.run_id, rank, report)
        recorded = self._record_findings(findings)
        skips = skipped_before_halt(report.consecutive_skips) if halted_locally else ""
        if recorded:
            self._halt_on_critical(run.run_id, recorded, step=report.step, note=skips)
        if halted_locally:
            reason = f"rank {rank} stopped at step {report.step} on its own checks"
            self._halt(run.run_id, step=report.step, first_rank=rank, source=HALT_SOURCE_CLIENT,
                       reason=f"{reason} {skips}" if skips else reason)
            self._record_stop_step(run.run_id, report.step)
        if recorded or report.step % 50 == 0 or report.forward_trace:
            self._persist_progress(run.run_id)
        self.metrics.report_seconds.observe(time.perf_counter() - started)

    def _count_client_drops(self, run: LiveRun, rank: int, dropped_so_far: int) -> None:
        """Add the reports the rank's client dropped since its previous report to the dropped counter.

        StepReport.dropped_reports is the client's running count, so only its increase is new.
        """
        state = run.rank(rank)
        # NOTE: a rank whose run left memory while the rank was away starts again from 0 here,
        # so drops it reported before are counted a second time.
        previous = state.dropped_reports
        if dropped_so_far <= previous:
            return
        state.dropped_reports = dropped_so_far
        self.metrics.reports_dropped.inc(dropped_so_far - previous)
        if dropped_so_far.bit_length() > previous.bit_length():  # logs at 1, 2, 4, 8, ... drops
            logger.warning("client dropped reports run=%s rank=%d total=%d", run.run_id, rank, dropped_so_far)

    # ---- whole batches ----

    def check_batch(self, request: pb.CheckBatchRequest) -> pb.CheckBatchResponse:
        check_run_id(request.run_id)
        check_batch_request(request)
        stored = self.store.get_run(request.run_id)
        if stored is None:
            raise RequestError(
                grpc.StatusCode.NOT_FOUND,
                f"run {request.run_id!r} is not registered; call RegisterRank before CheckBatch",
            )
        check_rank(request.rank, stored.world_size)
        tensors = self._decode_batch(request)
        self.metrics.batches_checked.inc()

        findings = self.engine.check_batch(
            request.run_id, request.rank, request.step, tensors, list(request.sample_ids)
        )
        recorded = self._record_findings(findings)
        step = max(request.step, self._live_max_step(request.run_id) + 1)
        self._halt_on_critical(request.run_id, recorded, step=step)
        self._persist_progress(request.run_id)
        valid = all(finding.severity != pb.SEVERITY_CRITICAL for finding in recorded)
        return pb.CheckBatchResponse(valid=valid, findings=recorded)

    def _decode_batch(self, request: pb.CheckBatchRequest) -> dict[str, np.ndarray]:
        if not request.tensors:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "tensors is empty; send at least one tensor")
        total_bytes = sum(len(tensor.data) for tensor in request.tensors)
        if total_bytes > self.max_batch_bytes:
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"batch of {total_bytes} bytes is over the limit of {self.max_batch_bytes} bytes; "
                "send a summary in the step report or split the batch",
            )
        tensors: dict[str, np.ndarray] = {}
        for index, tensor in enumerate(request.tensors):
            try:
                tensors[tensor.name] = decode_tensor(tensor, max_bytes=self.max_batch_bytes)
            except TensorDecodeError as error:
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"tensors[{index}]: {error}") from None
        return tensors

    # ---- operator calls and queries ----

    def halt_by_operator(self, request: pb.HaltRunRequest) -> pb.HaltRunResponse:
        check_halt_request(request)
        stored = self.store.get_run(request.run_id)
        if stored is None:
            raise RequestError(grpc.StatusCode.NOT_FOUND, f"run {request.run_id!r} not found; see `nanwatch runs`")
        previous = self.store.get_halt(request.run_id)
        if previous is not None:
            return pb.HaltRunResponse(halt=_halt_signal(previous), already_halted=True)
        reason = request.reason.strip()
        if not reason:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               "reason is empty; say why the run is halted (it is shown on every rank)")
        step = max(self._live_max_step(request.run_id) + 1, stored.last_step + 1, 0)
        self._halt(request.run_id, step=step, first_rank=-1, source=HALT_SOURCE_OPERATOR,
                   reason=f"operator halt: {reason}")
        halt = self.store.get_halt(request.run_id)
        assert halt is not None
        return pb.HaltRunResponse(halt=_halt_signal(halt), already_halted=False)

    def run_status(self, run_id: str) -> pb.RunStatus:
        check_run_id(run_id)
        stored = self.store.get_run(run_id)
        if stored is None:
            raise RequestError(grpc.StatusCode.NOT_FOUND, f"run {run_id!r} not found; see `nanwatch runs`")
        findings = self.store.list_findings(run_id)
        halt = self.store.get_halt(run_id)
        evaluated = stored.evaluated_codes | self.engine.evaluated_codes(run_id)

        summary = self._summary(stored.run_id, stored.world_size, stored.created_unix_s, stored.last_step)
        status = pb.RunStatus(
            summary=summary,
            halt_reason=halt.reason if halt else "",
            checks=build_checklist(findings, evaluated),
            findings=findings,
            halt_first_rank=_first_rank(halt, summary.primary if summary.HasField("primary") else None),
        )
        status.ranks.extend(self._rank_infos(run_id))
        return status

    def list_runs(self, limit: int) -> pb.ListRunsResponse:
        limit = limit if limit > 0 else 100
        runs = self.store.list_runs(min(limit, 10_000))
        return pb.ListRunsResponse(
            runs=[self._summary(run.run_id, run.world_size, run.created_unix_s, run.last_step) for run in runs]
        )

    def _summary(self, run_id: str, world_size: int, created: float, last_step: int) -> pb.RunSummary:
        live = self.live.get(run_id)
        if live is not None:
            last_step = max(last_step, live.max_step())
        halt = self.store.get_halt(run_id)
        summary = pb.RunSummary(
            run_id=run_id,
            world_size=world_size,
            halted=halt is not None,
            halt_step=halt.step if halt else -1,
            last_step=last_step,
            finding_count=self.store.count_findings(run_id),
            created_unix_s=created,
        )
        primary = self._primary(run_id, halt)
        if primary is not None:
            summary.primary.CopyFrom(primary)
        return summary

    def _primary(self, run_id: str, halt: HaltRecord | None) -> pb.Finding | None:
        # Reports of one step arrive from every rank in any order, so the primary cause is
        # chosen again from all findings rather than frozen at the moment of the halt.
        return choose_primary(self.store.list_findings(run_id), halt.step if halt else None)

    def _rank_infos(self, run_id: str) -> list[pb.RankInfo]:
        live = self.live.get(run_id)
        infos = []
        for record in self.store.list_ranks(run_id):
            state = live.ranks.get(record.rank) if live else None
            infos.append(
                pb.RankInfo(
                    rank=record.rank,
                    host=record.host,
                    last_step=state.last_step if state else -1,
                    last_loss=state.last_loss if state else float("nan"),
                    last_grad_norm=state.last_grad_norm if state else float("nan"),
                    connected=bool(state and state.connected),
                )
            )
        return infos

    # ---- findings and halts ----

    def _record_findings(self, findings: Sequence[pb.Finding]) -> list[pb.Finding]:
        recorded = []
        for finding in findings:
            finding.id = uuid.uuid4().hex[:16]
            finding.created_unix_s = time.time()
            self.store.add_finding(finding)
            self.metrics.observe_finding(finding)
            recorded.append(finding)
            log = {pb.SEVERITY_CRITICAL: logger.error, pb.SEVERITY_WARNING: logger.warning}.get(
                finding.severity, logger.info)
            log(
                "finding run=%s rank=%d step=%d stage=%d code=%s: %s",
                finding.evidence.run_id, finding.evidence.rank, finding.evidence.step,
                finding.stage, finding.code, finding.message,
            )
        return recorded

    def _halt_on_critical(self, run_id: str, findings: Sequence[pb.Finding], *, step: int, note: str = "") -> None:
        """Halt the run on its first critical finding; note (such as the skipped updates before it) ends the reason."""
        critical = [finding for finding in findings if finding.severity == pb.SEVERITY_CRITICAL]
        if not critical:
            return
        first = critical[0]
        reason = f"{first.code} on rank {first.evidence.rank}: {first.message}"
        self._halt(run_id, step=step, first_rank=first.evidence.rank, source=HALT_SOURCE_FINDING,
                   reason=f"{reason} ({note})" if note else reason)

    def _halt(self, run_id: str, *, step: int, first_rank: int, source: str, reason: str) -> None:
        """Record the run's halt (the first one wins) and send HALT to every connected rank.

        The halt is stored, so a rank of a run that is not in memory gets it when it registers
        or opens its Watch stream.
        """
        if self.store.get_halt(run_id) is not None:
            return
        primary = choose_primary(self.store.list_findings(run_id), step)
        record = HaltRecord(run_id, step, reason, source, first_rank, time.time(), primary)
        if not self.store.add_halt(record):
            return
        self.metrics.observe_halt(run_id, source)
        sent = self.live.broadcast(run_id, _halt_signal(record))
        self._persist_progress(run_id)
        log = logger.warning if source == HALT_SOURCE_OPERATOR else logger.error
        log(
            "halt run=%s step=%d source=%s first_rank=%d ranks_signalled=%d: %s",
            run_id, step, source, first_rank, sent, reason,
        )

    def _record_stop_step(self, run_id: str, step: int) -> None:
        """Move a service or operator halt to the step at which the ranks actually stopped.

        Such a halt requests the ranks to stop at the first step they reach at or after the
        requested one, and reports lag behind training, so a rank may stop a step or two later.
        """
        halt = self.store.get_halt(run_id)
        if halt is not None and step > halt.step:
            self.store.update_halt_step(run_id, step)
            logger.info("halt run=%s: ranks stopped at step %d (requested %d)", run_id, step, halt.step)

    def _persist_progress(self, run_id: str, live: LiveRun | None = None) -> None:
        """Write the run's last step and evaluated codes to the store, unless they are what the run last wrote.

        The store keeps the maximum step and the union of the codes written, and only this
        method writes them, so repeating the run's previous write would change nothing.
        Every rank of a run reports step 50, 100, ..., so most of these calls repeat one.
        """
        live = live if live is not None else self.live.get(run_id)
        last_step = live.max_step() if live else -1
        codes = self.engine.evaluated_codes(run_id)
        if live is not None and live.persisted_progress == (last_step, codes):
            return
        stored = self.store.get_run(run_id)
        evaluated = codes | (stored.evaluated_codes if stored else set())
        self.store.update_run_progress(run_id, last_step=last_step, evaluated_codes=evaluated)
        if live is not None:
            live.persisted_progress = (last_step, frozenset(codes))

    def _live_max_step(self, run_id: str) -> int:
        live = self.live.get(run_id)
        return live.max_step() if live is not None else -1

    # ---- runs leaving memory ----

    def expire_idle_runs(self) -> list[str]:
        """Remove from memory the runs idle for live_run_ttl_s; return their ids. The store keeps them."""
        return self.live.expire_idle()

    def _forget_live_run(self, run: LiveRun, reason: str) -> None:
        """Save the progress of a run that leaves memory, then drop its check state.

        The store keeps the run, its findings and its halt, so GetRunStatus, ListRuns and
        a rank that registers again get the same responses as before. The check engine starts the
        run's histories afresh if a rank reports again.
        """
        self._persist_progress(run.run_id, run)
        self.engine.forget_run(run.run_id)
        if reason == REMOVED_CAP:
            removal = f"evicted from memory, max_live_runs={self.live.max_runs} reached"
        else:
            removal = f"expired from memory after {self.live.idle_ttl_s:g} s without a connected rank or report"
        logger.info("run %s run=%s ranks=%d last_step=%d; the store keeps it",
                    removal, run.run_id, len(run.ranks), run.max_step())


def _accepted_client_finding(run_id: str, rank: int, report: pb.StepReport) -> list[pb.Finding]:
    """Return the rank's own finding when its code and stage are ones the service defines, else nothing."""
    finding = pb.Finding()
    finding.CopyFrom(report.client_finding)
    try:
        spec = spec_for(finding.code)
    except KeyError:
        logger.warning("ignored client finding with unknown code run=%s rank=%d code=%r", run_id, rank, finding.code)
        return []
    if finding.stage != spec.stage or finding.severity not in (pb.SEVERITY_WARNING, pb.SEVERITY_CRITICAL):
        logger.warning("ignored client finding with wrong stage or severity run=%s rank=%d code=%s",
                       run_id, rank, finding.code)
        return []
    finding.evidence.run_id = run_id
    finding.evidence.rank = rank
    finding.evidence.step = report.step
    return [finding]


def _check_stream_owner(run: LiveRun, start: pb.WatchStart) -> None:
    """Reject a Watch stream for a rank that another client has connected; the older stream stays."""
    state = run.rank(start.rank)
    if state.connected and state.client_id and start.client_id != state.client_id:
        raise RequestError(
            grpc.StatusCode.ALREADY_EXISTS,
            f"rank {start.rank} of run {start.run_id!r} is already streaming from client {state.client_id}; "
            "each rank must use its own rank number",
        )


def _first_rank(halt: HaltRecord | None, primary: pb.Finding | None) -> int:
    """Return the rank that showed the primary cause during the run, else the rank that triggered the halt."""
    if halt is None:
        return -1
    if primary is not None and 0 <= primary.evidence.step <= halt.step:
        return primary.evidence.rank
    return halt.first_rank


def _halt_signal(halt: HaltRecord) -> pb.Signal:
    signal = pb.Signal(kind=pb.SIGNAL_KIND_HALT, run_id=halt.run_id, halt_step=halt.step, reason=halt.reason)
    if halt.finding is not None:
        signal.finding.CopyFrom(halt.finding)
    return signal

