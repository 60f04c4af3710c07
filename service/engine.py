"""The check engine: runs the six staged checks on registrations, step reports and batches."""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from nanwatch.service.checks import data, gradients, hyperparameters, initialization, loss, monitoring
from nanwatch.service.checks.catalog import Where
from nanwatch.service.thresholds import Thresholds
from nanwatch.v1 import nanwatch_pb2 as pb

logger = logging.getLogger(__name__)

_INIT_CODES = ("INIT_NONFINITE", "INIT_ALL_ZERO", "INIT_CONSTANT", "INIT_SCALE")
_LOSS_CODES = ("LOSS_SIGMOID_BCE", "LOSS_SOFTMAX_LOG")


@dataclass
class _RankState:
    """Per-rank state kept between calls: loss function, clipping, gradient-norm history, flags."""

    grad_norms: deque[float]
    loss_function: str = ""
    clipping: pb.ClippingInfo | None = None
    is_trace_checked: bool = False
    is_spike_reported: bool = False  # a GRAD_EXPLODING is out and the norm has not come back down
    scaler_skips: int = 0  # consecutive steps with non-finite gradients under a GradScaler
    is_param_nonfinite_reported: bool = False


@dataclass
class _RunState:
    ranks: dict[int, _RankState] = field(default_factory=dict)
    static_keys: set[tuple[str, str, str]] = field(default_factory=set)  # (code, tensor, layer)
    evaluated: set[str] = field(default_factory=set)


class CheckEngine:
    """Runs the six staged checks (1 data, 2 initialization, 3 loss/activation, 4 hyperparameters, 5 gradients/clipping, 6 monitoring) and keeps per-run state in memory.

    Static findings (stages 2-4) come back once per run, code, tensor and
    layer, whichever rank reports them first. Dynamic findings come back at
    most once per step, rank and tensor (a batch tensor checked both from its
    summary and whole gives two). GRAD_EXPLODING comes back only on the first
    step of a spike and PARAM_NONFINITE once per rank. Findings are ordered by stage; their id and created_unix_s are
    left for the service to set. Methods are thread-safe.

    Example:
        engine = CheckEngine(Thresholds(grad_explode_factor=50.0))
        findings = engine.check_registration(register_request)
        findings += engine.check_report("run-1", 0, step_report)
        checklist = build_checklist(findings, engine.evaluated_codes("run-1"))
    """

    def __init__(self, thresholds: Thresholds | None = None) -> None:
        self._thresholds = thresholds if thresholds is not None else Thresholds()
        self._runs: dict[str, _RunState] = {}
        # One lock for all runs: every check is cheap next to the RPC that carries it,
        # and check_batch scans its arrays outside the lock.
        self._lock = threading.Lock()

    @property
    def thresholds(self) -> Thresholds:
        return self._thresholds

    def check_registration(self, request: pb.RegisterRankRequest) -> list[pb.Finding]:
        """Run the static stages 2 and 4, and 3 when the request carries a forward trace."""
        where = Where(run_id=request.run_id, rank=request.rank)
        with self._lock:
            run = self._runs.setdefault(request.run_id, _RunState())
            rank = self._rank_state(run, request.rank)
            rank.loss_function = request.loss_function
            rank.clipping = request.clipping if request.HasField("clipping") else None
            findings = self._check_initialization(run, request.parameters, where)
            findings += self._check_trace(run, rank, request.forward_trace, where)
            findings += self._check_hyperparameters(run, request, where)
            return self._keep_new_static(run, findings)

    def check_report(self, run_id: str, rank: int, report: pb.StepReport) -> list[pb.Finding]:
        """Run stage 1 on the batch summaries, 3 on a first forward trace, and stages 5 and 6."""
        where = Where(run_id=run_id, rank=rank, step=report.step)
        with self._lock:
            run = self._runs.setdefault(run_id, _RunState())
            state = self._rank_state(run, rank)
            findings = self._check_summaries(run, report, where)
            static_where = Where(run_id=run_id, rank=rank)
            findings += self._keep_new_static(run, self._check_trace(run, state, report.forward_trace, static_where))
            findings += self._check_gradients(run, state, report, where)
            findings += self._check_parameters_after_update(run, state, report, where)
            findings += self._check_loss(run, report, where)
            return _by_stage(findings)

    def check_batch(
        self,
        run_id: str,
        rank: int,
        step: int,
        tensors: Mapping[str, np.ndarray],
        sample_ids: Sequence[int],
    ) -> list[pb.Finding]:
        """Run stage 1 on whole batch tensors; findings name sample_ids when there is one per sample."""
        where = Where(run_id=run_id, rank=rank, step=step)
        findings = data.check_batch_arrays(tensors, sample_ids, where, self._thresholds)
        if tensors:
            with self._lock:
                self._runs.setdefault(run_id, _RunState()).evaluated.add("DATA_NONFINITE")
        return findings

    def evaluated_codes(self, run_id: str) -> set[str]:
        """Return the codes whose check has had input for this run (PASS versus NOT_RUN)."""
        with self._lock:
            run = self._runs.get(run_id)
            return set(run.evaluated) if run is not None else set()

    def forget_run(self, run_id: str) -> None:
        """Drop all state of a run; an unknown run_id is ignored."""
        with self._lock:
            self._runs.pop(run_id, None)

    def _rank_state(self, run: _RunState, rank: int) -> _RankState:
        if rank not in run.ranks:
            run.ranks[rank] = _RankState(grad_norms=deque(maxlen=self._thresholds.grad_history))
        return run.ranks[rank]

    # ---- static stages ----

    def _check_initialization(
        self, run: _RunState, parameters: Sequence[pb.ParameterInfo], where: Where
    ) -> list[pb.Finding]:
        if not parameters:
            return []
        run.evaluated.update(_INIT_CODES)
        return initialization.check_parameters(parameters, where, self._thresholds)

    def _check_trace(
        self, run: _RunState, rank: _RankState, trace: Sequence[pb.ModuleCall], where: Where
    ) -> list[pb.Finding]:
        # The loss function comes with registration and the trace may come later.
        if rank.is_trace_checked or not trace or not rank.loss_function:
            return []
        rank.is_trace_checked = True
        run.evaluated.update(_LOSS_CODES)
        return loss.check_output_activation(trace, rank.loss_function, where)

    def _check_hyperparameters(
        self, run: _RunState, request: pb.RegisterRankRequest, where: Where
    ) -> list[pb.Finding]:
        optimizer = request.optimizer
        findings = []
        if hyperparameters.is_lr_checked(optimizer):
            run.evaluated.add("LR_TOO_HIGH")
            findings += hyperparameters.check_learning_rate(optimizer, where, self._thresholds)
        if hyperparameters.is_eps_checked(optimizer) and request.parameters:
            run.evaluated.add("OPTIMIZER_EPS_FP16")
            findings += hyperparameters.check_eps_for_float16(
                optimizer, request.parameters, where, self._thresholds
            )
        return findings

    def _keep_new_static(self, run: _RunState, findings: Iterable[pb.Finding]) -> list[pb.Finding]:
        kept = []
        for finding in findings:
            key = (finding.code, finding.evidence.tensor, finding.evidence.layer)
            if key not in run.static_keys:
                run.static_keys.add(key)
                kept.append(finding)
        return _by_stage(kept)

    # ---- dynamic stages ----

    def _check_summaries(self, run: _RunState, report: pb.StepReport, where: Where) -> list[pb.Finding]:
        if not report.batch:
            return []
        run.evaluated.add("DATA_NONFINITE")
        return data.check_batch_summaries(report.batch, where, self._thresholds)

    def _check_gradients(
        self, run: _RunState, rank: _RankState, report: pb.StepReport, where: Where
    ) -> list[pb.Finding]:
        run.evaluated.add("GRAD_NONFINITE")
        if not gradients.has_nonfinite_gradient(report):
            rank.scaler_skips = 0
            return self._check_spike(run, rank, report, where)
        if report.loss_scale <= 0.0:
            return [gradients.nonfinite_gradient_finding(report, where, self._thresholds)]

        # A GradScaler skips such a step and halves its scale; only a long run of skips is an incident.
        rank.scaler_skips += 1
        logger.debug("run %s rank %d step %d: GradScaler skip %d in a row",
                     where.run_id, where.rank, where.step, rank.scaler_skips)
        if rank.scaler_skips < self._thresholds.grad_scaler_skip_limit:
            return []
        return [gradients.nonfinite_gradient_finding(
            report, where, self._thresholds, scaler_skips=rank.scaler_skips)]

    def _check_spike(
        self, run: _RunState, rank: _RankState, report: pb.StepReport, where: Where
    ) -> list[pb.Finding]:
        limit = gradients.exploding_limit(rank.grad_norms, self._thresholds)
        rank.grad_norms.append(report.grad_norm)
        if limit is None:
            return []
        run.evaluated.add("GRAD_EXPLODING")
        if report.grad_norm <= limit:
            rank.is_spike_reported = False
            return []
        if rank.is_spike_reported:
            return []
        rank.is_spike_reported = True
        return [gradients.exploding_finding(report, limit, rank.clipping, where, self._thresholds)]

    def _check_parameters_after_update(
        self, run: _RunState, rank: _RankState, report: pb.StepReport, where: Where
    ) -> list[pb.Finding]:
        if report.param_norm == 0.0:
            return []  # the proto default: the client did not measure it
        run.evaluated.add("PARAM_NONFINITE")
        is_new = not rank.is_param_nonfinite_reported
        if not (is_new and gradients.has_nonfinite_parameters(report)):
            return []
        if gradients.has_nonfinite_gradient(report):
            return []  # GRAD_NONFINITE already explains it
        rank.is_param_nonfinite_reported = True
        return [gradients.nonfinite_parameters_finding(report, where)]

    def _check_loss(self, run: _RunState, report: pb.StepReport, where: Where) -> list[pb.Finding]:
        run.evaluated.add("LOSS_NONFINITE")
        return monitoring.check_loss(report, where)


def _by_stage(findings: list[pb.Finding]) -> list[pb.Finding]:
    return sorted(findings, key=lambda finding: finding.stage)
