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
from nanwatch.client.summaries import (
    BatchEntry, UpdateSnapshot, build_tensor_summary, count_nonfinite, foreach_norms, needs_count, nonfinite_flag,
    shows_nonfinite,
)
from nanwatch.client.trace import ForwardTrace
from nanwatch.client.transfer import fetch_to_host
from nanwatch.v1 import nanwatch_pb2 as pb

logger = logging.getLogger(__name__)

# Names of non-finite gradients or parameters shown in a halt reason.
MAX_NAMES_IN_REASON = 5
# The update norm ||delta w|| is measured on every this-many-th step, from a copy of the
# parameters (kept between those steps on the CPU only, see UpdateSnapshot.kept_cpu_buffers).
# The parameter norms are measured on step 0, on the step that reports each update norm
# (see params_due) and on any step that fails a check. On every step they added about 2%
# to the step of a 2M-parameter MLP on CPU, as much as the gradient norms.
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

    code: torch.Tensor | None
    """This rank's reason code, measured on the device only when the ranks exchange codes (else on the host)."""
    service_code: int
    parts: list[torch.Tensor] = field(default_factory=list)
    """The norms of norm_tensors, one BATCH_STAT_NAMES vector per entry, then the named values."""
    named: dict[str, int] = field(default_factory=dict)
    """Index in parts of each value present this step: "loss", "loss_bad", "data_bad", "scale",
    "output_extremes", "update_norm", "clip_total", "activations"."""
    grad_indices: list[int] = field(default_factory=list)
    norm_tensors: list[torch.Tensor] = field(default_factory=list)
    """The gradients, then the parameters when params_measured, whose float32 norms are parts[0]."""
    params_measured: bool = False
    entries: list[BatchEntry] = field(default_factory=list)
    loss: torch.Tensor | None = None
    loss_flag: torch.Tensor | None = None
    """StepState.loss_nonfinite: None when the loss value alone shows whether it is finite."""
    data_flag: torch.Tensor | None = None
    """StepState.data_nonfinite, which covers the batch tensors dropped from entries. Kept entries show their own."""

    def add(self, name: str, value: torch.Tensor | None, device: torch.device) -> None:
        """Append value under name, unless it is None."""
        if value is not None:
            self.named[name] = len(self.parts)
            self.parts.append(value.to(device))


@dataclass(kw_only=True)
class _HostValues:
    """The measured values of one step after the host transfer. The recheck of overflowed norms corrects them."""

    loss: float
    loss_bad: bool
    data_bad: bool
    grad_norms: list[float]
    param_norms: list[float]
    stats: list[list[float]]
    named: dict[str, list[float]]

    @property
    def grad_total(self) -> float:
        return _host_total(self.grad_norms)

    @property
    def param_total(self) -> float:
        return _host_total(self.param_norms)

    def code(self, service_code: int) -> int:
        """Return the reason code of these values, the host-side twin of StepChecker._device_code."""
        code = service_code
        code |= int(Reason.DATA) if self.data_bad else 0
        code |= int(Reason.LOSS) if self.loss_bad else 0
        code |= 0 if all(math.isfinite(value) for value in self.grad_norms) else int(Reason.GRADIENT)
        code |= 0 if all(math.isfinite(value) for value in self.param_norms) else int(Reason.PARAMETERS)
        return code


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
        self._snapshot: UpdateSnapshot | None = None
        self._snapshot_pool: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        self._step_index = 0
        self._update_norm: torch.Tensor | None = None
        self._clip: tuple[float, torch.Tensor] | None = None
        self._param_ids = {id(param.tensor) for param in context.parameters}
        self._param_names = [param.name for param in context.parameters]
        self._report_templates: dict[tuple[int, ...], pb.StepReport] = {}
        self._code_weights: dict[tuple[torch.device, tuple[Reason, ...]], torch.Tensor] = {}
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
        codes = self.context.agreement.exchange(measurement.code) if measurement.code is not None else None
        try:
            return self._decide(step, measurement, codes, halt_signal)
        except Exception:  # noqa: BLE001 - a nanwatch bug must not stop training
            self._log_failure("building the step report")
            return self._decide_from_codes(step, self._codes_after_failure(measurement, codes), halt_signal)

    def _codes_after_failure(self, measurement: _Measurement, codes: torch.Tensor | None) -> list[int]:
        """Return the exchanged codes, or else this rank's own code, to decide on when building the report failed."""
        if codes is not None:
            return [int(code) for code in codes.tolist()]
        try:
            return [int(self._device_code(measurement))]
        except Exception:  # noqa: BLE001 - a nanwatch bug must not stop training
            return [measurement.service_code]

    def after_update(self) -> None:
        """Measure the update norm on its steps and reset the step state.

        When an update's norm is measured, the parameter norms after that update are
        measured at the next step's check, in the same fused pass as the gradient norms.
        Between the two, only code that writes the parameters on purpose changes them,
        and that pass then sees its writes.
        """
        self.state.reset()
        self._clip = None
        try:
            self._measure_update()
        except Exception:  # noqa: BLE001 - a nanwatch bug must not stop training
            self._log_failure("measuring the update norm")
            self._snapshot = None

    def _measure_update(self) -> None:
        """Turn the pre-step copy of the parameters into ||delta w||, read at the next step."""
        snapshot, self._snapshot = self._snapshot, None
        if snapshot is None:
            return
        self._update_norm = snapshot.update_norm([param.tensor.detach() for param in self.context.parameters])
        # NOTE: on the CPU this keeps one more copy of the parameters (up to 1 GiB) between snapshots.
        self._snapshot_pool = snapshot.kept_cpu_buffers()

    def _take_snapshot(self, step: int) -> None:
        if step % UPDATE_NORM_EVERY == 0 and self.context.parameters:
            self._snapshot = UpdateSnapshot([param.tensor.detach() for param in self.context.parameters],
                                            pool=self._snapshot_pool)

    # ---- measure ----

    def _measure_safely(self, service_due: bool) -> _Measurement:
        service_code = int(Reason.SERVICE) if service_due else 0
        try:
            measurement = self._measure(service_code)
            self._take_snapshot(self._step_index)
            return measurement
        except Exception:  # noqa: BLE001 - a nanwatch bug must not stop training
            self._log_failure("measuring the step")
            return _Measurement(code=torch.tensor(service_code, dtype=torch.int64), service_code=service_code)

    def _measure(self, service_code: int) -> _Measurement:
        params = [param.tensor for param in self.context.parameters]
        device = params[0].device if params else torch.device("cpu")
        grad_indices = [index for index, param in enumerate(params) if param.grad is not None]

        # Norms per tensor in one fused float32 pass over the gradients and, on their steps,
        # the parameters (as they are after the previous update). The totals are taken on the host.
        params_measured = params_due(self._step_index)
        norm_tensors = [params[index].grad for index in grad_indices] + (params if params_measured else [])
        norms = foreach_norms(norm_tensors).to(device)

        state = self.state
        entries = list(state.batch)
        measurement = _Measurement(code=None, service_code=service_code, grad_indices=grad_indices,
                                   norm_tensors=norm_tensors, params_measured=params_measured, entries=entries,
                                   parts=[norms] + [entry.stats for entry in entries],
                                   loss=state.loss, loss_flag=state.loss_nonfinite, data_flag=state.data_nonfinite)
        measurement.add("loss", state.loss, device)
        measurement.add("loss_bad", state.loss_nonfinite, device)
        measurement.add("data_bad", state.data_nonfinite, device)
        measurement.add("scale", self._loss_scale(), device)
        self._add_extras(measurement, device)
        # A single rank computes its code on the host after the transfer. Ranks that exchange codes
        # need them on the device before the all-reduce.
        if self.context.agreement.is_collective:
            measurement.code = self._device_code(measurement)
        return measurement

    def _device_code(self, measurement: _Measurement) -> torch.Tensor:
        """Return this rank's reason code on the device, from the step's non-finite flags and norms.

        A total norm is non-finite exactly when one of its per-tensor float32 norms is,
        because float64 squares of finite float32 values cannot overflow.
        """
        norms = measurement.parts[0] if measurement.parts else torch.zeros(0)
        finite = torch.isfinite(norms)
        grad_count = len(measurement.grad_indices)
        flags = [~finite[:grad_count].all(), ~finite[grad_count:].all()]
        reasons = [Reason.GRADIENT, Reason.PARAMETERS]
        for flag, reason in ((_loss_flag(measurement), Reason.LOSS), (_data_flag(measurement), Reason.DATA)):
            if flag is not None:
                flags.append(flag.to(norms.device))
                reasons.append(reason)
        weights = self._reason_weights(tuple(reasons), norms.device)
        return (torch.stack(flags) * weights).sum() + measurement.service_code

    def _reason_weights(self, reasons: tuple[Reason, ...], device: torch.device) -> torch.Tensor:
        """Return the int64 values of reasons as a tensor on device, cached."""
        weights = self._code_weights.get((device, reasons))
        if weights is None:
            weights = torch.tensor([int(reason) for reason in reasons], dtype=torch.int64, device=device)
            self._code_weights[(device, reasons)] = weights
        return weights

    def _add_extras(self, measurement: _Measurement, device: torch.device) -> None:
        """Append the optional on-device values; they ride the same host transfer."""
        trace = self.context.trace
        measurement.add("output_extremes", trace.take_output_extremes() if trace is not None else None, device)
        measurement.add("update_norm", self._update_norm, device)
        measurement.add("clip_total", self._clip[1] if self._clip is not None else None, device)
        measurement.add("activations", self._pending_activations(), device)
        self._update_norm = None

    def _pending_activations(self) -> torch.Tensor | None:
        trace = self.context.trace
        if trace is None or not trace.finished or self._trace_sent:
            return None
        return trace.activation_stats()

    def _loss_scale(self) -> torch.Tensor | None:
        """Return the GradScaler scale as a tensor, or None without a scaler (given or seen in GradScaler.scale)."""
        scaler = self.context.grad_scaler if self.context.grad_scaler is not None else observers.last_grad_scaler()
        # NOTE: GradScaler keeps its scale in the private _scale tensor; reading it avoids
        # the host synchronization of get_scale(). Without that attribute the scale reads 0.
        scale = getattr(scaler, "_scale", None) if scaler is not None else None
        if isinstance(scale, torch.Tensor):
            return scale.detach().reshape(-1)[:1]
        return None

    # ---- decide ----

    def _decide(self, step: int, measurement: _Measurement, codes: torch.Tensor | None,
                halt_signal: pb.Signal | None) -> StepOutcome:
        host = fetch_to_host(measurement.parts + ([codes] if codes is not None else []))
        code_values = [int(value) for value in host.pop()] if codes is not None else []
        values = self._host_values(measurement, host) if measurement.parts else None
        if values is not None and codes is None:
            code_values = [values.code(measurement.service_code)]
        # Both conditions read only the exchanged codes and the step, so every rank takes this branch together.
        if any(code & NORM_REASONS for code in code_values) or (any(code_values) and not params_due(step)):
            code_values = self._recheck_norms(measurement, values, code_values)
        if values is None:
            return self._decide_from_codes(step, code_values, halt_signal)

        report = self._build_report(step, measurement, values)
        details = self._describe_details(report, values, measurement.grad_indices) if any(code_values) else ""
        halt = self._decide_halt(step, code_values, details, halt_signal, report)
        report.halted_locally = halt is not None
        return StepOutcome(report=report, halt=halt)

    @staticmethod
    def _host_values(measurement: _Measurement, host: list[list[float]]) -> _HostValues:
        named = {name: host[index] for name, index in measurement.named.items()}
        loss = named["loss"][0] if "loss" in named else math.nan
        # Without a separate flag the one recorded loss shows by its value whether it is finite.
        loss_bad = named["loss_bad"][0] > 0 if "loss_bad" in named else "loss" in named and not math.isfinite(loss)
        grad_count = len(measurement.grad_indices)
        stats = host[1 : 1 + len(measurement.entries)]
        return _HostValues(
            loss=loss, loss_bad=loss_bad, data_bad=_is_data_bad(named, stats),
            grad_norms=host[0][:grad_count], param_norms=host[0][grad_count:],
            stats=stats, named=named,
        )

    def _recheck_norms(self, measurement: _Measurement, values: _HostValues | None, codes: list[int]) -> list[int]:
        """Measure the parameters if this step skipped them, recompute inf float32 norms in float64,
        correct this rank's code and exchange the codes again.

        This is the rare path: some rank flagged a check. Every rank saw the same codes,
        so every rank runs this second exchange, which keeps the collectives in step.
        It costs a second host synchronization (a third for the norms on a rank that has
        inf norms) only on steps where a halt or a skip is likely anyway.
        """
        agreement = self.context.agreement
        own = codes[agreement.index] if agreement.index < len(codes) else max(codes)
        try:
            if values is not None:
                self._add_param_norms(measurement, values)
                own = self._recheck_own_code(measurement, values, own)
        except Exception:  # noqa: BLE001 - a nanwatch bug must not stop training
            self._log_failure("rechecking overflowed norms")
        return [int(code) for code in agreement.exchange(torch.tensor(own, dtype=torch.int64)).tolist()]

    def _add_param_norms(self, measurement: _Measurement, values: _HostValues) -> None:
        """Measure the parameter norms of a step whose fused pass left them out (one host synchronization)."""
        if measurement.params_measured:
            return
        params = [param.tensor for param in self.context.parameters]
        values.param_norms = foreach_norms(params).tolist() if params else []
        measurement.norm_tensors = measurement.norm_tensors + params
        measurement.params_measured = True

    def _recheck_own_code(self, measurement: _Measurement, values: _HostValues, own: int) -> int:
        """Replace inf norms in values by their float64 values and return own with GRADIENT/PARAMETERS updated."""
        grad_count = len(measurement.grad_indices)
        norms = values.grad_norms + values.param_norms
        # An inf (not NaN) norm comes from an inf element or from a float32 sum of squares that overflowed.
        suspects = [index for index, value in enumerate(norms) if math.isinf(value)]
        if suspects:
            exact = foreach_norms([measurement.norm_tensors[index] for index in suspects], exact=True).tolist()
            for index, value in zip(suspects, exact):
                norms[index] = value
            logger.info("nanwatch rank %d: %d norms overflowed float32; %d are finite in float64",
                        self.context.rank, len(suspects), sum(math.isfinite(value) for value in exact))
        values.grad_norms, values.param_norms = norms[:grad_count], norms[grad_count:]
        own &= ~NORM_REASONS
        own |= 0 if math.isfinite(values.grad_total) else int(Reason.GRADIENT)
        own |= 0 if math.isfinite(values.param_total) else int(Reason.PARAMETERS)
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

    def _build_report(self, step: int, measurement: _Measurement, values: _HostValues) -> pb.StepReport:
        report = self._report_template(measurement.grad_indices)
        for norm, value in zip(report.parameter_grad_norms, values.grad_norms):
            norm.grad_norm = value
        named = values.named
        report.step = step
        report.loss = values.loss
        report.loss_finite = not values.loss_bad
        report.grad_norm = values.grad_total
        report.param_norm = values.param_total
        report.update_norm = named["update_norm"][0] if "update_norm" in named else math.nan
        report.lr = _first_group_lr(self.context.optimizer)
        report.loss_scale = named["scale"][0] if "scale" in named else 0.0
        report.nonfinite_grad_count = sum(1 for value in values.grad_norms if not math.isfinite(value))
        report.batch.extend(_build_batch_summaries(measurement.entries, values.stats))
        self._attach_extras(report, named)
        self._attach_trace(report, named.get("activations"))
        return report

    def _report_template(self, grad_indices: list[int]) -> pb.StepReport:
        """Return a new StepReport with one ParameterGradNorm per gradient, named, copied from a cached template.

        Copying a template costs about a third of building the named entries anew.
        """
        key = tuple(grad_indices)
        template = self._report_templates.get(key)
        if template is None:
            names = [self._param_names[index] for index in grad_indices]
            template = pb.StepReport(parameter_grad_norms=[pb.ParameterGradNorm(name=name) for name in names])
            self._report_templates = {key: template}
        report = pb.StepReport()
        report.CopyFrom(template)
        return report

    def _describe_details(self, report: pb.StepReport, values: _HostValues, grad_indices: list[int]) -> str:
        grad_names = [self._param_names[index] for index in grad_indices]
        return _describe_details(report, values.loss_bad, grad_names, values.grad_norms, self._param_names,
                                 values.param_norms)

    def _attach_extras(self, report: pb.StepReport, extra: dict[str, list[float]]) -> None:
        if "output_extremes" in extra:
            report.output_checked = True
            report.output_finite = all(math.isfinite(value) for value in extra["output_extremes"])
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


def _build_batch_summaries(entries: Sequence[BatchEntry], stats: Sequence[Sequence[float]]) -> list[pb.TensorSummary]:
    """Return the TensorSummary of each entry. The entries with NaN or Inf are counted in one more host transfer."""
    flagged = [(entry, values) for entry, values in zip(entries, stats) if needs_count(entry, values)]
    if flagged:
        count_nonfinite([entry for entry, _ in flagged], [values for _, values in flagged])
    return [build_tensor_summary(entry, values) for entry, values in zip(entries, stats)]


def _loss_flag(measurement: _Measurement) -> torch.Tensor | None:
    """Return the on-device flag of a non-finite loss in the step, or None without a loss."""
    if measurement.loss_flag is None and measurement.loss is not None:
        return ~torch.isfinite(measurement.loss)
    return measurement.loss_flag


def _data_flag(measurement: _Measurement) -> torch.Tensor | None:
    """Return the on-device flag of a batch tensor with NaN or Inf in the step, or None without check_batch."""
    if not measurement.entries:
        return measurement.data_flag
    kept = nonfinite_flag([entry.stats for entry in measurement.entries])
    return kept if measurement.data_flag is None else measurement.data_flag.to(kept.device) | kept


def _is_data_bad(named: dict[str, list[float]], stats: Sequence[Sequence[float]]) -> bool:
    """Return whether a batch tensor of the step held NaN or Inf, a dropped one (data_bad) or a kept one."""
    return ("data_bad" in named and named["data_bad"][0] > 0) or any(shows_nonfinite(values) for values in stats)


def params_due(step: int) -> bool:
    """Return whether the step's fused norm pass includes the parameters: step 0 and the step after each snapshot."""
    return step == 0 or step % UPDATE_NORM_EVERY == 1


def _host_total(norms: Sequence[float]) -> float:
    """Return the 2-norm of norms on the host: NaN when one is NaN, inf only when one is inf or it overflows."""
    if any(math.isnan(value) for value in norms):
        return math.nan
    return math.hypot(*norms)


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
