"""The optimizer step check: measure on the device, agree across ranks, decide, build the report."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from nanwatch.client import local_checks, observers
from nanwatch.client.agreement import Agreement
from nanwatch.client.facts import NamedParameter, as_float
from nanwatch.client.local_checks import Reason
from nanwatch.client.step_state import StepState
from nanwatch.client.summaries import BatchEntry, build_tensor_summary, foreach_norms, total_norm
from nanwatch.client.trace import ForwardTrace
from nanwatch.client.transfer import fetch_to_host
from nanwatch.v1 import nanwatch_pb2 as pb

logger = logging.getLogger(__name__)

# Names of non-finite gradients or parameters shown in a halt reason.
MAX_NAMES_IN_REASON = 5
# The update norm ||delta w|| is measured on every this-many-th step: a copy of the
# parameters exists only during those steps.
UPDATE_NORM_EVERY = 10
# The code bits that the float64 recheck of overflowed norms can clear.
NORM_REASONS = int(Reason.GRADIENT) | int(Reason.PARAMETERS)


@dataclass(kw_only=True)
class HaltDecision:
    """A halt decision: the step, reason, source and finding of a future HaltError."""

    step: int
    reason: str
    source: str
    finding: pb.Finding | None
    codes: list[int]


@dataclass(kw_only=True)
class StepOutcome:
    """The StepReport of a step and the halt decision, if the step is poisoned."""

    report: pb.StepReport
    halt: HaltDecision | None


@dataclass(kw_only=True)
class _Measurement:
    """On-device values of one step, in the order they are copied to the host."""

    code: torch.Tensor
    parts: list[torch.Tensor] = field(default_factory=list)
    grad_indices: list[int] = field(default_factory=list)
    norm_tensors: list[torch.Tensor] = field(default_factory=list)
    """The gradients, then the parameters, whose float32 norms are parts[4] and parts[5]."""
    entries: list[BatchEntry] = field(default_factory=list)
    extras: dict[str, int] = field(default_factory=dict)
    """Index in parts of each optional value: "output_bad", "update_norm", "clip_total", "activations"."""


@dataclass(kw_only=True)
class StepContext:
    """Inputs of the step check besides the step state."""

    run_id: str
    rank: int
    parameters: list[NamedParameter]
    optimizer: torch.optim.Optimizer
    grad_scaler: object | None
    agreement: Agreement
    trace: ForwardTrace | None


class StepChecker:
    """Runs in the optimizer step pre-hook: one host transfer and, with several ranks, one all-reduce.

    Every rank reaches the all-reduce every step, even when its own measurement
    fails, because a rank that skipped it would leave the others blocked.
    """

    def __init__(self, context: StepContext) -> None:
        self.context = context
        self.state = StepState()
        self._trace_sent = False
        self._logged_failure = False
        self._snapshot: list[torch.Tensor] | None = None
        self._step_index = 0
        self._update_norm: torch.Tensor | None = None
        self._clip: tuple[float, torch.Tensor] | None = None
        self._param_ids = {id(param.tensor) for param in context.parameters}
        observers.install()
        observers.add_clip_listener(self)

    def on_clip(self, tensors: Sequence[torch.Tensor], max_norm: float, total: torch.Tensor) -> None:
        """Record a clip_grad_norm_ call on this model's parameters (called by the observer)."""
        if tensors and id(tensors[0]) in self._param_ids:
            self._clip = (max_norm, total.detach())

    def check(self, step: int, halt_signal: pb.Signal | None) -> StepOutcome:
        """Return the report of step and, if any rank's checks fired, the halt decision."""
        halt_step = halt_signal.halt_step if halt_signal is not None else None
        self._step_index = step
        service_due = local_checks.service_halt_due(halt_step, step)
        measurement = self._measure_safely(service_due)
        codes = self.context.agreement.exchange(measurement.code)
        try:
            return self._decide(step, measurement, codes, halt_signal)
        except Exception:  # noqa: BLE001 - a nanwatch bug must not stop training
            self._log_failure("building the step report")
            return self._decide_from_codes(step, [int(c) for c in codes.tolist()], halt_signal)

    def after_update(self) -> None:
        """Measure the update norm on its steps and reset the step state.

        The parameter norms after this update are measured at the next step's check,
        in the same fused pass as the gradient norms: nothing between the two changes
        the parameters except code that writes them on purpose, which that pass then sees.
        """
        self.state.reset()
        self._clip = None
        try:
            self._measure_update([param.tensor for param in self.context.parameters])
        except Exception:  # noqa: BLE001 - a nanwatch bug must not stop training
            self._log_failure("measuring the update norm")
            self._snapshot = None

    def _measure_update(self, params: list[torch.Tensor]) -> None:
        """Turn the pre-step copy of the parameters into ||delta w||, read at the next step."""
        snapshot, self._snapshot = self._snapshot, None
        if snapshot is None:
            return
        deltas = torch._foreach_sub([param.detach() for param in params], snapshot)
        self._update_norm = total_norm(foreach_norms(deltas))

    def _take_snapshot(self, step: int, params: list[torch.Tensor]) -> None:
        if step % UPDATE_NORM_EVERY == 0 and params:
            self._snapshot = [param.detach().clone() for param in params]

    # ---- measure ----

    def _measure_safely(self, service_due: bool) -> _Measurement:
        service_code = int(Reason.SERVICE) if service_due else 0
        try:
            measurement = self._measure(service_code)
            self._take_snapshot(self._step_index, [param.tensor for param in self.context.parameters])
            return measurement
        except Exception:  # noqa: BLE001 - a nanwatch bug must not stop training
            self._log_failure("measuring the step")
            return _Measurement(code=torch.tensor(service_code, dtype=torch.int64))

    def _measure(self, service_code: int) -> _Measurement:
        params = [param.tensor for param in self.context.parameters]
        device = params[0].device if params else torch.device("cpu")
        grad_indices = [index for index, param in enumerate(params) if param.grad is not None]

        # Norms per tensor in one fused float32 pass over the gradients and the parameters
        # (as they are after the previous update), then the totals as clip_grad_norm_ computes them.
        norm_tensors = [params[index].grad for index in grad_indices] + params
        norms = foreach_norms(norm_tensors).to(device)
        grad_norms, param_norms = norms[: len(grad_indices)], norms[len(grad_indices) :]
        grad_total = total_norm(grad_norms)
        param_total = total_norm(param_norms)

        state = self.state
        loss = state.loss.to(device) if state.loss is not None else torch.tensor(math.nan, device=device)
        loss_bad = _flag(state.loss_nonfinite, device)
        data_bad = _flag(state.data_nonfinite, device)
        code = (
            data_bad.to(torch.int64) * int(Reason.DATA)
            + loss_bad.to(torch.int64) * int(Reason.LOSS)
            + (~torch.isfinite(grad_total)).to(torch.int64) * int(Reason.GRADIENT)
            + (~torch.isfinite(param_total)).to(torch.int64) * int(Reason.PARAMETERS)
            + service_code
        )

        entries = list(state.batch)
        parts = [loss, loss_bad, grad_total, param_total, grad_norms, param_norms, self._loss_scale(device)]
        parts += [entry.stats for entry in entries] + [entry.sample_mask for entry in entries]
        measurement = _Measurement(code=code, parts=parts, grad_indices=grad_indices, entries=entries,
                                   norm_tensors=norm_tensors)
        self._add_extras(measurement, device)
        return measurement

    def _add_extras(self, measurement: _Measurement, device: torch.device) -> None:
        """Append the optional on-device values; they ride the same host transfer."""
        extras: dict[str, torch.Tensor | None] = {
            "output_bad": self.context.trace.take_output_flag() if self.context.trace is not None else None,
            "update_norm": self._update_norm,
            "clip_total": self._clip[1] if self._clip is not None else None,
            "activations": self._pending_activations(),
        }
        self._update_norm = None
        for name, value in extras.items():
            if value is not None:
                measurement.extras[name] = len(measurement.parts)
                measurement.parts.append(value.to(device))

    def _pending_activations(self) -> torch.Tensor | None:
        trace = self.context.trace
        if trace is None or not trace.finished or self._trace_sent:
            return None
        return trace.activation_stats()

    def _loss_scale(self, device: torch.device) -> torch.Tensor:
        """Return the GradScaler scale as a tensor, or 0 without a scaler (given or seen in GradScaler.scale)."""
        scaler = self.context.grad_scaler if self.context.grad_scaler is not None else observers.last_grad_scaler()
        # NOTE: GradScaler keeps its scale in the private _scale tensor; reading it avoids
        # the host synchronization of get_scale(). Without that attribute the scale reads 0.
        scale = getattr(scaler, "_scale", None) if scaler is not None else None
        if isinstance(scale, torch.Tensor):
            return scale.detach().reshape(-1)[:1].to(device)
        return torch.zeros(1, device=device)

    # ---- decide ----

    def _decide(self, step: int, measurement: _Measurement, codes: torch.Tensor, halt_signal: pb.Signal | None) -> StepOutcome:
        host = fetch_to_host([*measurement.parts, codes])
        code_values = [int(value) for value in host[-1]]
        if any(code & NORM_REASONS for code in code_values):
            code_values = self._recheck_norms(measurement, host, code_values)
        if not measurement.parts:
            return self._decide_from_codes(step, code_values, halt_signal)

        report, details = self._build_report(step, measurement, host[:-1])
        halt = self._decide_halt(step, code_values, details, halt_signal, report)
        report.halted_locally = halt is not None
        return StepOutcome(report=report, halt=halt)

    def _recheck_norms(self, measurement: _Measurement, host: list[list[float]], codes: list[int]) -> list[int]:
        """Recompute inf float32 norms in float64, correct this rank's code and exchange the codes again.

        This is the rare path: some rank flagged its gradients or parameters. Every rank
        saw the same codes, so every rank runs this second exchange, which keeps the
        collectives in step. It costs a second host synchronization (a third for the
        norms on a rank that has inf norms) only on steps where a halt is likely anyway.
        """
        agreement = self.context.agreement
        own = codes[agreement.index] if agreement.index < len(codes) else max(codes)
        try:
            if measurement.parts:
                own = self._recheck_own_code(measurement, host, own)
        except Exception:  # noqa: BLE001 - a nanwatch bug must not stop training
            self._log_failure("rechecking overflowed norms")
        return [int(code) for code in agreement.exchange(torch.tensor(own, dtype=torch.int64)).tolist()]

    def _recheck_own_code(self, measurement: _Measurement, host: list[list[float]], own: int) -> int:
        """Replace inf norms in host by their float64 values and return own with GRADIENT/PARAMETERS updated."""
        grad_count = len(measurement.grad_indices)
        values = host[4] + host[5]
        # An inf (not NaN) norm comes from an inf element or from a float32 sum of squares that overflowed.
        suspects = [index for index, value in enumerate(values) if math.isinf(value)]
        if suspects:
            exact = foreach_norms([measurement.norm_tensors[index] for index in suspects], exact=True).tolist()
            for index, value in zip(suspects, exact):
                values[index] = value
            logger.info("nanwatch rank %d: %d norms overflowed float32; %d are finite in float64",
                        self.context.rank, len(suspects), sum(math.isfinite(value) for value in exact))
        host[4], host[5] = values[:grad_count], values[grad_count:]
        host[2], host[3] = [_host_total(host[4])], [_host_total(host[5])]
        own &= ~NORM_REASONS
        own |= 0 if math.isfinite(host[2][0]) else int(Reason.GRADIENT)
        own |= 0 if math.isfinite(host[3][0]) else int(Reason.PARAMETERS)
        return own

    def _decide_from_codes(self, step: int, codes: list[int], halt_signal: pb.Signal | None) -> StepOutcome:
        report = pb.StepReport(step=step, loss=math.nan, loss_finite=True, update_norm=math.nan)
        halt = self._decide_halt(step, codes, "", halt_signal, report)
        report.halted_locally = halt is not None
        return StepOutcome(report=report, halt=halt)

    def _decide_halt(
        self, step: int, codes: list[int], details: str, halt_signal: pb.Signal | None, report: pb.StepReport
    ) -> HaltDecision | None:
        if not any(codes):
            return None
        agreement = self.context.agreement
        source = local_checks.choose_source(codes, agreement.index)
        if codes[agreement.index] & Reason.SERVICE and halt_signal is not None and halt_signal.reason:
            details = "; ".join(filter(None, [details, f"service: {halt_signal.reason}"]))
        reason = local_checks.build_halt_reason(codes, agreement.index, agreement.global_ranks, details)
        return HaltDecision(
            step=step, reason=reason, source=source, codes=codes,
            finding=self._halt_finding(step, codes, source, reason, halt_signal, report),
        )

    def _halt_finding(
        self, step: int, codes: list[int], source: str, reason: str, halt_signal: pb.Signal | None, report: pb.StepReport
    ) -> pb.Finding | None:
        if source == "service":
            return halt_signal.finding if halt_signal is not None and halt_signal.HasField("finding") else None
        index = self.context.agreement.index if source == "local" else next(i for i, c in enumerate(codes) if c)
        evidence = _data_evidence(report) if source == "local" else None
        return local_checks.build_local_finding(
            code=codes[index], run_id=self.context.run_id, rank=self.context.agreement.global_ranks[index],
            step=step, message=reason, evidence=evidence,
        )

    # ---- report ----

    def _build_report(self, step: int, measurement: _Measurement, host: list[list[float]]) -> tuple[pb.StepReport, str]:
        (loss,), (loss_bad,), (grad_total,), (param_total,), grad_norms, param_norms, (scale,) = host[:7]
        entry_count = len(measurement.entries)
        stats, masks = host[7 : 7 + entry_count], host[7 + entry_count : 7 + 2 * entry_count]
        names = [self.context.parameters[index].name for index in measurement.grad_indices]

        extra = {name: host[index] for name, index in measurement.extras.items()}
        report = pb.StepReport(
            step=step, loss=loss, loss_finite=not loss_bad, grad_norm=grad_total, param_norm=param_total,
            update_norm=extra["update_norm"][0] if "update_norm" in extra else math.nan,
            lr=_first_group_lr(self.context.optimizer), loss_scale=scale,
            parameter_grad_norms=[pb.ParameterGradNorm(name=n, grad_norm=v) for n, v in zip(names, grad_norms)],
            nonfinite_grad_count=sum(1 for value in grad_norms if not math.isfinite(value)),
            batch=[build_tensor_summary(e, s, m) for e, s, m in zip(measurement.entries, stats, masks)],
        )
        self._attach_extras(report, extra)
        self._attach_trace(report, extra.get("activations"))
        all_names = [param.name for param in self.context.parameters]
        return report, _describe_details(report, loss_bad > 0, names, grad_norms, all_names, param_norms)

    def _attach_extras(self, report: pb.StepReport, extra: dict[str, list[float]]) -> None:
        if "output_bad" in extra:
            report.output_checked = True
            report.output_finite = not extra["output_bad"][0]
        if "clip_total" in extra and self._clip is not None:
            report.clip_max_norm = self._clip[0]
            report.clip_total_norm = extra["clip_total"][0]

    def _attach_trace(self, report: pb.StepReport, activation_values: list[float] | None) -> None:
        trace = self.context.trace
        if trace is None or not trace.finished or self._trace_sent:
            return
        report.forward_trace.extend(trace.calls)
        report.autocast_dtype = trace.autocast_dtype
        report.output_shape.extend(trace.output_shape)
        if activation_values:
            width = len(activation_values) // max(len(trace.activation_rows), 1)
            rows = [activation_values[i : i + width] for i in range(0, len(activation_values), width)]
            report.activations.extend(trace.build_activations(rows))
        self._trace_sent = True

    def _log_failure(self, what: str) -> None:
        if not self._logged_failure:
            self._logged_failure = True
            logger.exception("nanwatch rank %d: %s failed; training continues with fewer checks",
                             self.context.rank, what)


def _host_total(norms: Sequence[float]) -> float:
    """Return the 2-norm of norms on the host: NaN when one is NaN, inf only when one is inf or it overflows."""
    if any(math.isnan(value) for value in norms):
        return math.nan
    return math.hypot(*norms)


def _flag(flag: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    return flag.to(device) if flag is not None else torch.zeros((), dtype=torch.bool, device=device)


def _first_group_lr(optimizer: torch.optim.Optimizer) -> float:
    if not optimizer.param_groups:
        return 0.0
    return as_float(optimizer.param_groups[0].get("lr")) or 0.0


def _nonfinite_names(names: Sequence[str], norms: Sequence[float]) -> list[str]:
    return [name for name, value in zip(names, norms) if not math.isfinite(value)]


def _describe_details(
    report: pb.StepReport, loss_bad: bool, grad_names: Sequence[str], grad_norms: Sequence[float],
    param_names: Sequence[str], param_norms: Sequence[float],
) -> str:
    """Return this rank's evidence: bad batch tensors and samples, the loss, bad gradients and parameters."""
    details = []
    for summary in report.batch:
        if summary.nan_count or summary.inf_count:
            samples = list(summary.nonfinite_sample_indices)
            details.append(f"batch tensor {summary.name!r} has {summary.nan_count} NaN and "
                           f"{summary.inf_count} Inf values in samples {samples}")
    if loss_bad:
        details.append(f"loss={report.loss}")
    bad_grads = _nonfinite_names(grad_names, grad_norms)
    if bad_grads:
        details.append(f"{len(bad_grads)} non-finite gradients: {', '.join(bad_grads[:MAX_NAMES_IN_REASON])}")
    bad_params = _nonfinite_names(param_names, param_norms)
    if bad_params:
        details.append(f"{len(bad_params)} non-finite parameters: {', '.join(bad_params[:MAX_NAMES_IN_REASON])}")
    return "; ".join(details)


def _data_evidence(report: pb.StepReport) -> pb.Evidence:
    """Return evidence naming the first bad batch tensor and its samples, or the first bad gradient."""
    evidence = pb.Evidence()
    for summary in report.batch:
        if summary.nan_count or summary.inf_count:
            evidence.tensor = summary.name
            evidence.sample_indices.extend(summary.nonfinite_sample_indices)
            evidence.values["nan_count"] = str(summary.nan_count)
            evidence.values["inf_count"] = str(summary.inf_count)
            return evidence
    evidence.values["loss"] = str(report.loss)
    evidence.values["grad_norm"] = str(report.grad_norm)
    for norm in report.parameter_grad_norms:
        if not math.isfinite(norm.grad_norm):
            evidence.tensor = norm.name
            break
    return evidence
