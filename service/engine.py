"""The check engine: runs the six staged checks on registrations, step reports and batches."""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from nanwatch.service.checks import (
    activations, data, data_ranks, data_values, gradient_trends, gradients, hyperparameters, initialization,
    localization, loss, loss_trends, loss_values, monitoring, updates,
)
from nanwatch.service.checks.catalog import Where, format_number
from nanwatch.service.rank_state import RankState, RunState
from nanwatch.service.thresholds import Thresholds
from nanwatch.v1 import nanwatch_pb2 as pb

logger = logging.getLogger(__name__)

_INIT_CODES = ("INIT_NONFINITE", "INIT_ALL_ZERO", "INIT_CONSTANT", "INIT_SCALE")
_LOSS_CODES = ("LOSS_SIGMOID_BCE", "LOSS_SOFTMAX_LOG", "LOSS_DOUBLE_SOFTMAX")
_FIRST_FORWARD_CODES = ("ACT_SCALE_GROWTH", "ACT_SCALE_VANISH", "ACT_SATURATED", "FORWARD_NONFINITE",
                        "LOSS_MASKED_SOFTMAX")
_STEP_VALUE_CODES = ("LOSS_LOG_ZERO", "LOSS_UNDEFINED", "LOSS_BACKWARD_NONFINITE")


class CheckEngine:
    """Runs the six staged checks (1 data, 2 initialization, 3 loss/activation, 4 hyperparameters, 5 gradients/clipping, 6 monitoring) and keeps per-run state in memory.

    Static findings (stages 2-4, and those of the first forward pass) come back
    once per run, code, tensor and layer, whichever rank reports them first.
    Dynamic findings come back at most once per step, rank and tensor; trend
    findings (spikes, growth, update ratio, scale collapse, advice) once per
    rank or once per spike. Findings are ordered by stage; their id and
    created_unix_s are left for the service to set. Methods are thread-safe.

    Example:
        engine = CheckEngine(Thresholds(grad_explode_factor=50.0))
        findings = engine.check_registration(register_request)
        findings += engine.check_report("run-1", 0, step_report)
        checklist = build_checklist(findings, engine.evaluated_codes("run-1"))
    """

    def __init__(self, thresholds: Thresholds | None = None) -> None:
        self._thresholds = thresholds if thresholds is not None else Thresholds()
        self._runs: dict[str, RunState] = {}
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
            run = self._runs.setdefault(request.run_id, RunState())
            if run.comparer is None and request.world_size > 0:
                run.comparer = loss_trends.RankLossComparer(world_size=request.world_size)
                run.scale_comparer = data_ranks.InputScaleComparer(world_size=request.world_size)
            rank = self._rank_state(run, request.rank)
            rank.register(request)
            findings = self._check_initialization(run, request.parameters, where)
            findings += self._check_trace(run, rank, request.forward_trace, where)
            findings += self._check_hyperparameters(run, request, where)
            findings += loss.check_bce_float16(rank.loss_function, rank.float16_source, where)
            return self._keep_new_static(run, findings)

    def check_report(self, run_id: str, rank: int, report: pb.StepReport) -> list[pb.Finding]:
        """Run every stage on one step report; see the module docstring for what each stage uses."""
        where = Where(run_id=run_id, rank=rank, step=report.step)
        # Every access of report.batch builds a new container, so the checks share one list.
        batch = list(report.batch)
        with self._lock:
            run = self._run_state(run_id)
            state = self._rank_state(run, rank)
            if report.loss_function and not state.loss_function:
                state.loss_function = report.loss_function
            findings = self._check_static_parts(run, state, report, where)
            findings += self._check_summaries(run, state, batch, where)
            if run.scale_comparer is not None and batch:
                run.evaluated.add("DATA_RANK_SCALE")
                findings += run.scale_comparer.observe(rank, report.step, batch, where)
            findings += self._check_gradients(run, state, report, where)
            findings += self._check_parameters_after_update(run, state, report, where)
            findings += self._check_step_values(run, state, report, batch, where)
            findings += self._check_updates(run, state, report, where)
            findings += self._check_scheduled_lr(run, state, report, where)
            findings += self._check_loss(run, state, report, where)
            findings += self._check_incident(run, state, report, batch, where)
            if report.HasField("location"):
                run.evaluated.add("REPLAY_NOT_REPRODUCED")
                findings = localization.apply_location(report, findings, where)
            if report.update_skipped:
                _soften_skipped(findings, report)
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
                self._runs.setdefault(run_id, RunState()).evaluated.add("DATA_NONFINITE")
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

    def _run_state(self, run_id: str) -> RunState:
        run = self._runs.get(run_id)
        if run is None:
            run = self._runs[run_id] = RunState()
        return run

    def _rank_state(self, run: RunState, rank: int) -> RankState:
        state = run.ranks.get(rank)
        if state is None:
            state = run.ranks[rank] = RankState.create(self._thresholds)
        return state

    # ---- static stages ----

    def _check_static_parts(self, run: RunState, rank: RankState, report: pb.StepReport,
                            where: Where) -> list[pb.Finding]:
        """Run the static checks that a report can carry (the trace, the first forward pass) while one is due.

        Both checks return nothing and change nothing when they are not due, so most reports skip them.
        """
        trace = report.forward_trace
        is_trace_due = bool(trace) or (bool(rank.trace) and not rank.is_trace_checked)
        is_first_forward_due = not rank.is_first_forward_checked and bool(
            trace or report.activations or report.output_shape)
        if not (is_trace_due or is_first_forward_due):
            return []
        # Static findings belong to no step.
        static_where = Where(run_id=where.run_id, rank=where.rank)
        static = self._check_trace(run, rank, trace, static_where)
        static += self._check_first_forward(run, rank, report, static_where)
        return self._keep_new_static(run, static)

    def _check_initialization(
        self, run: RunState, parameters: Sequence[pb.ParameterInfo], where: Where
    ) -> list[pb.Finding]:
        if not parameters:
            return []
        run.evaluated.update(_INIT_CODES)
        return initialization.check_parameters(parameters, where, self._thresholds)

    def _check_trace(
        self, run: RunState, rank: RankState, trace: Sequence[pb.ModuleCall], where: Where
    ) -> list[pb.Finding]:
        if trace and not rank.layer_order:
            rank.layer_order = [call.name for call in trace]
            rank.trace = list(trace)
        # The loss function and the trace may each come with registration or a later report.
        if rank.is_trace_checked or not rank.trace or not rank.loss_function:
            return []
        rank.is_trace_checked = True
        run.evaluated.update(_LOSS_CODES)
        return loss.check_output_activation(rank.trace, rank.loss_function, where)

    def _check_first_forward(
        self, run: RunState, rank: RankState, report: pb.StepReport, where: Where
    ) -> list[pb.Finding]:
        """Check what the client measured in the first forward pass; it rides the report with the trace."""
        if rank.is_first_forward_checked or not (report.forward_trace or report.activations or report.output_shape):
            return []
        rank.is_first_forward_checked = True
        rank.autocast_dtype = report.autocast_dtype or rank.autocast_dtype
        # Classes sit on dimension 1 of batched logits and on dimension 0 of a single sample.
        shape = list(report.output_shape)
        if len(shape) >= 2:
            rank.num_classes = int(shape[1])
        elif shape:
            rank.num_classes = int(shape[0])
        else:
            rank.num_classes = 0
        findings: list[pb.Finding] = []
        if report.activations:
            run.evaluated.update(_FIRST_FORWARD_CODES)
            leaf = loss.last_leaf(report.forward_trace)
            parameters_finite = report.param_norm == 0.0 or math.isfinite(report.param_norm)
            findings += activations.check_activations(report.activations, leaf.name if leaf else None,
                                                      where, self._thresholds, parameters_finite=parameters_finite)
        if report.forward_trace:
            run.evaluated.update(("AMP_NO_SCALER", "LOSS_BCE_FP16"))
            has_scaler = bool(rank.amp is not None and rank.amp.grad_scaler) or report.loss_scale > 0.0
            findings += hyperparameters.check_autocast_scaler(rank.autocast_dtype, has_scaler, where)
            findings += loss.check_bce_float16(rank.loss_function, rank.float16_source, where)
        return findings

    def _check_scheduled_lr(self, run: RunState, rank: RankState, report: pb.StepReport,
                            where: Where) -> list[pb.Finding]:
        """Return LR_TOO_HIGH once when a schedule raised the lr far above the usual range after registration."""
        registered = rank.optimizer
        if registered is None or report.lr <= registered.lr or not hyperparameters.is_lr_checked(registered):
            return []
        run.evaluated.add("LR_TOO_HIGH")
        current = pb.OptimizerInfo(type=registered.type, lr=report.lr)
        findings = hyperparameters.check_learning_rate(current, where, self._thresholds)
        if not findings or not rank.first_time("LR_TOO_HIGH scheduled"):
            return []
        finding = findings[0]
        finding.message += (f" It started at lr {format_number(registered.lr)}: the learning-rate schedule "
                            f"raised it to {format_number(report.lr)} by step {where.step}.")
        finding.fix += " Check the scheduler (a warm-up without a cap, or a factor applied every epoch)."
        return [finding]

    def _check_hyperparameters(
        self, run: RunState, request: pb.RegisterRankRequest, where: Where
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
        if optimizer.type:
            run.evaluated.update(("WEIGHT_DECAY_EXTREME", "MOMENTUM_EXTREME"))
            findings += hyperparameters.check_weight_decay(optimizer, where)
            findings += hyperparameters.check_momentum(optimizer, where, self._thresholds)
        return findings

    def _keep_new_static(self, run: RunState, findings: Iterable[pb.Finding]) -> list[pb.Finding]:
        kept = []
        for finding in findings:
            key = (finding.code, finding.evidence.tensor, finding.evidence.layer)
            if key not in run.static_keys:
                run.static_keys.add(key)
                kept.append(finding)
        return _by_stage(kept)

    # ---- dynamic stages ----

    def _check_summaries(self, run: RunState, rank: RankState, batch: Sequence[pb.TensorSummary],
                         where: Where) -> list[pb.Finding]:
        if not batch:
            return []
        run.evaluated.update(("DATA_NONFINITE", "DATA_NOT_NORMALIZED"))
        findings = data.check_batch_summaries(batch, where, self._thresholds)
        context = data_values.DataContext(num_classes=rank.num_classes, loss_function=rank.loss_function,
                                          trains_in_float16=bool(rank.float16_source))
        if rank.num_classes:
            run.evaluated.add("DATA_TARGET_RANGE")
        ranged = data_values.check_value_ranges(batch, context, where, self._thresholds)
        if not ranged:
            return findings
        # Range warnings repeat on every batch of the same source, so each comes once per tensor name.
        findings += [f for f in ranged if f.severity == pb.SEVERITY_CRITICAL]
        findings += self._keep_new_static(run, [f for f in ranged if f.severity != pb.SEVERITY_CRITICAL])
        return findings

    def _check_gradients(
        self, run: RunState, rank: RankState, report: pb.StepReport, where: Where
    ) -> list[pb.Finding]:
        run.evaluated.add("GRAD_NONFINITE")
        if report.clip_max_norm > 0.0:
            rank.observed_clip_max_norm = report.clip_max_norm
        if not gradients.has_nonfinite_gradient(report):
            rank.scaler_skips = 0
            findings = self._check_spike(run, rank, report, where)
            return findings + self._check_gradient_trends(run, rank, report, where)
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
        self, run: RunState, rank: RankState, report: pb.StepReport, where: Where
    ) -> list[pb.Finding]:
        limit = gradients.exploding_limit(rank.grad_norms, self._thresholds)
        rank.grad_norms.append(report.grad_norm)
        if limit is None:
            return []
        run.evaluated.add("GRAD_EXPLODING")
        if report.grad_norm <= limit:
            rank.spike_streak = 0
            return []
        rank.spike_streak += 1
        patience = self._thresholds.grad_spike_patience
        if rank.spike_streak not in (1, patience):
            return []
        severity = pb.SEVERITY_WARNING if rank.spike_streak >= patience else pb.SEVERITY_INFO
        return [gradients.exploding_finding(report, limit, rank.clipping, where, self._thresholds,
                                            severity=severity, streak=rank.spike_streak)]

    def _check_gradient_trends(
        self, run: RunState, rank: RankState, report: pb.StepReport, where: Where
    ) -> list[pb.Finding]:
        findings = []
        run.evaluated.add("GRAD_GROWTH")
        if gradient_trends.is_growing(rank.grad_norms, self._thresholds) and rank.first_time("GRAD_GROWTH"):
            findings.append(gradient_trends.growth_finding(rank.grad_norms, where, self._thresholds))
        if len(rank.grad_norms) == self._thresholds.grad_warmup_steps and rank.weight_names:
            run.evaluated.add("GRAD_LAYER_RATIO")
            findings += gradient_trends.check_layer_ratio(report, rank.weight_names, where, self._thresholds)
        return findings

    def _check_parameters_after_update(
        self, run: RunState, rank: RankState, report: pb.StepReport, where: Where
    ) -> list[pb.Finding]:
        if report.param_norm == 0.0:
            return []  # the proto default: the client did not measure it
        run.evaluated.add("PARAM_NONFINITE")
        if not gradients.has_nonfinite_parameters(report) or gradients.has_nonfinite_gradient(report):
            return []  # GRAD_NONFINITE already explains non-finite parameters with non-finite gradients
        if not rank.first_time("PARAM_NONFINITE"):
            return []
        return [gradients.nonfinite_parameters_finding(report, where)]

    def _check_step_values(
        self, run: RunState, rank: RankState, report: pb.StepReport, batch: Sequence[pb.TensorSummary], where: Where
    ) -> list[pb.Finding]:
        if not report.output_checked:
            return []
        run.evaluated.update(_STEP_VALUE_CODES)
        if rank.spike_streak > 0 or "GRAD_GROWTH" in rank.reported:
            return []  # a gradient that was already exploding explains the non-finite step better
        if not (monitoring.has_nonfinite_loss(report) or gradients.has_nonfinite_gradient(report)):
            return []  # check_step_values locates only a non-finite loss or gradient
        targets_checked = any(data_values.is_target_name(summary.name) for summary in batch)
        leaf = loss.last_leaf(rank.trace)
        facts = loss_values.StepFacts(batch_finite=_is_batch_finite(batch), loss_function=rank.loss_function,
                                      layer_order=rank.layer_order, clipping_enabled=rank.is_clipping,
                                      targets_checked=targets_checked, output_module=leaf.type if leaf else "",
                                      world_size=run.comparer.world_size if run.comparer is not None else 1)
        return loss_values.check_step_values(report, facts, where, self._thresholds)

    def _check_updates(self, run: RunState, rank: RankState, report: pb.StepReport, where: Where) -> list[pb.Finding]:
        findings = []
        if updates.update_ratio(report) is not None:
            run.evaluated.add("UPDATE_RATIO_HIGH")
            ratio = updates.check_update_ratio(report, where, self._thresholds)
            if ratio and rank.first_time("UPDATE_RATIO_HIGH"):
                findings += ratio
        if report.loss_scale > 0.0:
            run.evaluated.add("LOSS_SCALE_COLLAPSE")
            collapse = updates.check_loss_scale(report, where, self._thresholds)
            if collapse and rank.first_time("LOSS_SCALE_COLLAPSE"):
                findings += collapse
        return findings

    def _check_loss(self, run: RunState, rank: RankState, report: pb.StepReport, where: Where) -> list[pb.Finding]:
        run.evaluated.update(("LOSS_NONFINITE", "LOSS_SPIKE", "LOSS_DIVERGING"))
        findings = monitoring.check_loss(report, where)
        findings += rank.loss_tracker.check(report, where, self._thresholds)
        if run.comparer is not None and run.comparer.world_size >= 3:
            run.evaluated.add("LOSS_RANK_OUTLIER")
            findings += run.comparer.add(where.run_id, where.rank, report, self._thresholds)
        return findings

    def _check_incident(self, run: RunState, rank: RankState, report: pb.StepReport,
                        batch: Sequence[pb.TensorSummary], where: Where) -> list[pb.Finding]:
        """Add the context of a non-finite step: constant batch tensors, the order of non-finite values, advice."""
        if not report.output_checked:
            return []  # a client that predates the output check sends too little to order the values
        order = loss_trends.nonfinite_order(report, not _is_batch_finite(batch))
        gradient_bad = gradients.has_nonfinite_gradient(report) and report.loss_scale <= 0.0
        if not order or (order == ["gradients"] and not gradient_bad):
            return []  # nothing non-finite, or a GradScaler skip
        findings = [data_values.constant_finding(summary, where)
                    for summary in data_values.constant_tensors(batch)]
        if not run.is_order_reported:
            run.is_order_reported = True
            findings.append(loss_trends.order_finding(order, where))
        if gradient_bad and rank.is_clipping and rank.first_time("GRAD_CLIP_NONFINITE"):
            findings.append(gradient_trends.clip_nonfinite_finding(report, rank.clip_max_norm, where))
        if gradient_bad and not rank.is_clipping and rank.first_time("GRAD_NO_CLIPPING"):
            findings.append(gradient_trends.no_clipping_finding(list(rank.grad_norms), "non-finite gradients", where))
        return findings


def _soften_skipped(findings: list[pb.Finding], report: pb.StepReport) -> None:
    """Turn the critical findings of a step whose update every rank skipped into warnings: they must not halt."""
    for finding in findings:
        if finding.severity == pb.SEVERITY_CRITICAL and finding.evidence.step == report.step:
            finding.severity = pb.SEVERITY_WARNING
            finding.message += (f" Every rank skipped this update under the skip policy "
                                f"({report.consecutive_skips} in a row so far).")


def _is_batch_finite(batch: Sequence[pb.TensorSummary]) -> bool:
    return all(summary.nan_count == 0 and summary.inf_count == 0 for summary in batch)


def _by_stage(findings: list[pb.Finding]) -> list[pb.Finding]:
    """Return findings sorted by stage; a list of fewer than two comes back as it is."""
    if len(findings) < 2:
        return findings
    return sorted(findings, key=_stage_of)


def _stage_of(finding: pb.Finding) -> int:
    return finding.stage
