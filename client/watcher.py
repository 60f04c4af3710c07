"""The public Watcher: wires nanwatch's checks into a PyTorch training loop."""

from __future__ import annotations

import logging
import math
import uuid
from types import TracebackType
from typing import Any, NoReturn

import torch
from torch import nn

from nanwatch.client.agreement import Agreement
from nanwatch.client.batch_sender import BatchSender
from nanwatch.client.connection import resolve_channel_security
from nanwatch.client.local_checks import Reason
from nanwatch.client.localize import Localizer, StepCapture, replaying
from nanwatch.client.facts import (
    RankIdentity, build_amp_info, build_clipping_info, build_register_request, collect_parameters, unwrap_model,
)
from nanwatch.client.sender import ReportSender
from nanwatch.client.skip_policy import SkipPolicy, resolve_max_consecutive_skips
from nanwatch.client.settings import (
    resolve_amp_dtype, resolve_rank_and_world_size, resolve_run_id, validate_limits,
)
from nanwatch.client.step_check import HaltDecision, StepChecker, StepContext, StepOutcome
from nanwatch.client.summaries import summarize_batch_tensor
from nanwatch.client.trace import ForwardTrace
from nanwatch.endpoint import default_endpoint, validate_endpoint
from nanwatch.errors import HaltError, skipped_before_halt
from nanwatch.errors import halt_exit_code as env_halt_exit_code
from nanwatch.v1 import nanwatch_pb2 as pb

logger = logging.getLogger(__name__)


class Watcher:
    """Catches NaN and Inf in a training run and stops every rank before the optimizer applies it.

    The Watcher hooks optimizer.step(): before each update it checks the batch
    tensors given to check_batch, the loss, the gradients and the parameters. If
    any rank finds a non-finite value, or the nanwatch service sent a HALT, every
    rank raises HaltError at the same step and the update is not applied. Step
    reports go to the service from a background thread, so training does not wait
    for the network. When the service is down, training runs on with local checks.

    Example:
        watcher = Watcher(model, optimizer, loss_fn=criterion)
        for x, y in loader:
            watcher.check_batch(inputs=x, targets=y)
            loss = criterion(model(x), y)   # a loss nn.Module is hooked; else watcher.observe_loss(loss)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()                # raises nanwatch.HaltError before a poisoned update
        watcher.close()

    Args:
        model: the model, optionally wrapped in DistributedDataParallel; parameters are
            named after the wrapped module, without the "module." prefix.
        optimizer: the optimizer whose step() is hooked.
        loss_fn: a loss nn.Module (hooked to observe every loss), a loss function name
            such as "cross_entropy", or None.
        run_id: 1-128 characters of [A-Za-z0-9._-], starting with a letter or digit. Default: $NANWATCH_RUN_ID, else
            $TORCHELASTIC_RUN_ID, else "run-<UTC timestamp>-<pid>" (broadcast from rank 0
            when a process group is initialized, which makes the constructor a collective).
        endpoint: host:port of the service; default $NANWATCH_ENDPOINT or 127.0.0.1:50051.
        rank, world_size: default from torch.distributed, else $RANK/$WORLD_SIZE, else 0/1.
        process_group: the group whose ranks agree on a halt; None is the default group.
        clip_max_norm, clip_norm_type: the gradient clipping the script applies. Facts
            for the service only: the Watcher does not clip.
        amp_dtype: the autocast dtype (torch.float16 or torch.bfloat16), or None.
        grad_scaler: the torch.amp.GradScaler in use, or None.
        send_batches: also send whole batches to the service's CheckBatch call. This
            copies every checked tensor to host memory on the training thread.
        max_queued_reports: step reports buffered while the service is slow or down;
            the oldest are dropped beyond this.
        halt_exit_code: exit code of an uncaught HaltError; default
            $NANWATCH_HALT_EXIT_CODE or 42.
        flush_timeout_s: how long a halt waits for the service's acknowledgement, and
            how long close() waits to send the buffered reports.
        install_hooks: register the optimizer step hooks and the loss-module hook. False
            when the caller forwards torch's global hooks to step_pre_hook and
            step_post_hook itself, as ``nanwatch run`` does.
        tls_ca: PEM file of the CA that signed the service's TLS certificate; default
            $NANWATCH_TLS_CA, unset means plaintext. $NANWATCH_TLS_CLIENT_CERT and
            $NANWATCH_TLS_CLIENT_KEY add a client certificate for mutual TLS.
        token: API token sent as ``authorization: Bearer <token>``; default the file
            named by $NANWATCH_TOKEN_FILE, else $NANWATCH_TOKEN, else none.
        fail_closed_after_s: halt every rank once the service has been unreachable for
            this many seconds, counted from the constructor or the last lost stream.
            None (the default) fails open: training runs on with local checks only.
        max_consecutive_skips: the skip policy. When a step's loss or gradients are
            non-finite on any rank while its batch and weights are finite, every rank
            skips that update (its gradients are dropped before optimizer.step(), as
            a GradScaler skips a step) up to this many times in a row, then halts.
            Default $NANWATCH_MAX_CONSECUTIVE_SKIPS, else 0: halt at once.
        localize: on a step that halts on this rank's own checks, replay the step to name
            the first module, parameter and operation that made NaN/Inf. Healthy steps
            pay for references to the model inputs, a copy of the CPU RNG state, and
            the gradient of the model output or, for a large output with a traced loss,
            a device flag of its finiteness, all kept until the optimizer update.
        max_report_delay_s: how long a healthy step's report may wait so that it goes
            to the service in one message with the next ones (default 0.1). The
            reports of a halt or a skipped update go at once. 0 sends every report
            at once, which costs about 0.3 ms of gRPC work per step.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: nn.Module | str | None = None,
        *,
        run_id: str | None = None,
        endpoint: str | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        process_group: Any = None,
        clip_max_norm: float | None = None,
        clip_norm_type: float = 2.0,
        amp_dtype: torch.dtype | str | None = None,
        grad_scaler: object | None = None,
        send_batches: bool = False,
        max_queued_reports: int = 1024,
        halt_exit_code: int | None = None,
        flush_timeout_s: float = 3.0,
        install_hooks: bool = True,
        tls_ca: str | None = None,
        token: str | None = None,
        fail_closed_after_s: float | None = None,
        max_consecutive_skips: int | None = None,
        localize: bool = True,
        max_report_delay_s: float = 0.1,
    ) -> None:
        # Validate everything before installing any hook or thread.
        _check_types(model, optimizer, loss_fn)
        validate_limits(max_queued_reports=max_queued_reports, flush_timeout_s=flush_timeout_s,
                        halt_exit_code=halt_exit_code, fail_closed_after_s=fail_closed_after_s,
                        max_report_delay_s=max_report_delay_s)
        security = resolve_channel_security(tls_ca=tls_ca, token=token)
        self._skips = SkipPolicy(resolve_max_consecutive_skips(max_consecutive_skips))
        self._optimizer = optimizer
        self._exit_code = halt_exit_code if halt_exit_code is not None else env_halt_exit_code()
        self._flush_timeout_s = flush_timeout_s
        self._rank, world_size = resolve_rank_and_world_size(rank, world_size, process_group)
        self._run_id = resolve_run_id(run_id, process_group)
        self._endpoint = validate_endpoint(endpoint or default_endpoint())
        amp = build_amp_info(resolve_amp_dtype(amp_dtype), grad_scaler)

        # Facts for registration.
        parameters = collect_parameters(model, optimizer)
        identity = RankIdentity(run_id=self._run_id, rank=self._rank, world_size=world_size,
                                client_id=str(uuid.uuid4()))
        request = build_register_request(identity=identity, parameters=parameters, optimizer=optimizer,
                                         loss_fn=loss_fn, amp=amp,
                                         clipping=build_clipping_info(clip_max_norm, clip_norm_type))
        request.max_consecutive_skips = self._skips.max_consecutive

        # The step check and the hooks that feed it.
        self._trace = ForwardTrace(unwrap_model(model))
        self._capture = StepCapture(unwrap_model(model)) if localize else None
        self._localizer = Localizer(unwrap_model(model), self._capture) if self._capture is not None else None
        agreement = Agreement.from_process_group(process_group, fallback_rank=self._rank)
        self._checker = StepChecker(StepContext(
            run_id=self._run_id, rank=self._rank, parameters=parameters, optimizer=optimizer,
            grad_scaler=grad_scaler, agreement=agreement, trace=self._trace,
        ))
        self._step = 0
        self._late_loss_function = ""
        self._halt: HaltDecision | None = None
        self._closed = False
        self._handles = []
        if install_hooks:
            self._handles += [
                optimizer.register_step_pre_hook(self.step_pre_hook),
                optimizer.register_step_post_hook(self.step_post_hook),
            ]
            if isinstance(loss_fn, nn.Module):
                self._handles.append(loss_fn.register_forward_hook(self._on_loss_forward, with_kwargs=True))

        # Background senders.
        self._sender = ReportSender(endpoint=self._endpoint, register_request=request,
                                    max_queued_reports=max_queued_reports, security=security,
                                    fail_closed_after_s=fail_closed_after_s, max_report_delay_s=max_report_delay_s)
        self._sender.start()
        self._batch_sender: BatchSender | None = None
        if send_batches:
            self._batch_sender = BatchSender(endpoint=self._endpoint, run_id=self._run_id, rank=self._rank,
                                             security=security)
            self._batch_sender.start()
        logger.info("nanwatch rank %d: watching run %s, reporting to %s", self._rank, self._run_id, self._endpoint)

    # ---- public state ----

    @property
    def step(self) -> int:
        """Index of the current optimizer step (0-based): the count of completed steps."""
        return self._step

    @property
    def halted(self) -> bool:
        """True once this Watcher raised HaltError."""
        return self._halt is not None

    @property
    def dropped_reports(self) -> int:
        """Count of step reports dropped because the send buffer was full."""
        return self._sender.dropped_reports

    @property
    def skipped_updates(self) -> int:
        """Count of non-finite updates skipped under the skip policy."""
        return self._skips.total

    @property
    def connected(self) -> bool:
        """True while the service has this rank registered and its report stream is open."""
        return self._sender.connected

    @property
    def run_id(self) -> str:
        """The run id under which this rank reports."""
        return self._run_id

    # ---- training-loop calls ----

    def check_batch(self, **tensors: torch.Tensor) -> None:
        """Check batch tensors for NaN and Inf and summarize them for the current step's report.

        The keyword is the tensor's name, as in check_batch(inputs=x, targets=y). The
        check runs on the tensor's device; a non-finite value halts this step at optimizer.step().
        """
        for name, tensor in tensors.items():
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"check_batch({name}=...) got {type(tensor).__name__}; pass a torch.Tensor")
        try:
            for name, tensor in tensors.items():
                self._checker.state.add_batch(summarize_batch_tensor(name, tensor))
            if self._batch_sender is not None:
                copies = {name: tensor.detach().to("cpu", copy=True) for name, tensor in tensors.items()}
                self._batch_sender.enqueue(self._step, copies)
        except Exception:  # noqa: BLE001 - a nanwatch bug must not stop training
            logger.exception("nanwatch rank %d: check_batch failed at step %d; training continues",
                             self._rank, self._step)

    def observe_loss(self, loss: torch.Tensor | float) -> None:
        """Record the loss of the current step; a loss nn.Module given as loss_fn is recorded without this."""
        try:
            self._checker.state.add_loss(torch.as_tensor(loss))
        except Exception:  # noqa: BLE001 - a nanwatch bug must not stop training
            logger.exception("nanwatch rank %d: observe_loss failed at step %d", self._rank, self._step)

    def observe_forward_start(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Record the inputs of a model forward pass that began before this Watcher existed, for the replay."""
        if self._capture is not None:
            self._capture.begin_call(args, kwargs)

    def observe_loss_call(self, fn: Any, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], *,
                          only_on_output: bool = False, output: Any = None) -> None:
        """Record a loss computation (a loss module or function and its arguments) for the replay of a failing step.

        With only_on_output the call is kept only when it takes an output of the model's last forward pass.
        output is the loss value the call returned, when known: a replay compares it with the loss
        passed to backward().
        """
        if self._capture is None:
            return
        try:
            self._capture.capture_loss(fn, name, args, kwargs, only_on_output=only_on_output, output=output)
        except Exception:  # noqa: BLE001 - a nanwatch bug must not stop training
            logger.exception("nanwatch rank %d: recording the loss call failed at step %d", self._rank, self._step)

    def set_loss_function(self, name: str) -> None:
        """Name the loss function when it became known after construction; the next report carries it."""
        self._late_loss_function = name

    def halt_now(self, *, reason: str, finding: pb.Finding) -> NoReturn:
        """Halt this rank at the current step from outside the optimizer step, with a cause named by the caller.

        Used when a step cannot reach optimizer.step(), such as a loss that raises on class
        targets out of range. The finding travels with the final report to the service.

        Raises:
            HaltError: always.
        """
        report = pb.StepReport(step=self._step, loss=math.nan, loss_finite=True, update_norm=math.nan,
                               halted_locally=True)
        report.client_finding.CopyFrom(finding)
        report.loss_function = self._late_loss_function
        self._sender.enqueue(report, urgent=True)
        self._stop(HaltDecision(step=self._step, reason=reason, source="local", finding=finding, codes=[]))

    def close(self) -> None:
        """Remove the hooks, send the buffered reports (up to flush_timeout_s) and stop the senders."""
        if self._closed:
            return
        self._closed = True
        for handle in self._handles:
            handle.remove()
        self._trace.remove()
        if self._capture is not None:
            self._capture.remove()
        self._sender.close(self._flush_timeout_s)
        if self._batch_sender is not None:
            self._batch_sender.close(self._flush_timeout_s)

    def __enter__(self) -> Watcher:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    # ---- hooks ----

    def _on_loss_forward(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        if replaying():
            return
        if isinstance(output, torch.Tensor):
            self.observe_loss(output)
        self.observe_loss_call(module, type(module).__name__, args, kwargs, output=output)

    def step_pre_hook(self, unused_optimizer: torch.optim.Optimizer, unused_args: Any, unused_kwargs: Any) -> None:
        """Check the step before the update; raise HaltError when it is poisoned (an optimizer step pre-hook)."""
        if self._halt is not None:
            raise self._halt_error(self._halt)
        outcome = self._checker.check(self._step, self._sender.halt_signal)
        if self._late_loss_function:
            outcome.report.loss_function = self._late_loss_function
            self._late_loss_function = ""
        if outcome.halt is None:
            self._skips.on_healthy_step()
        elif self._skips.should_skip(outcome.halt.codes):
            if self._own_values_nonfinite(outcome.halt):
                self._localize(outcome)
            self._skip_update(outcome)
            return
        elif self._skips.consecutive:
            count = self._skips.consecutive
            outcome.halt.reason += f" {skipped_before_halt(count)}"
            outcome.report.consecutive_skips = count
        if outcome.halt is not None and self._own_values_nonfinite(outcome.halt):
            self._localize(outcome)
        self._sender.enqueue(outcome.report, urgent=outcome.halt is not None)
        if outcome.halt is not None:
            self._stop(outcome.halt)

    def _skip_update(self, outcome: StepOutcome) -> None:
        """Skip this step's update on this rank and report it; every rank reached the same decision."""
        self._skips.skip(self._optimizer, self._step, self._rank)
        outcome.report.halted_locally = False
        outcome.report.update_skipped = True
        outcome.report.consecutive_skips = self._skips.consecutive
        self._sender.enqueue(outcome.report, urgent=True)

    def step_post_hook(self, unused_optimizer: torch.optim.Optimizer, unused_args: Any, unused_kwargs: Any) -> None:
        """Count the applied update and measure the parameters after it (an optimizer step post-hook)."""
        self._step += 1
        self._checker.after_update()
        if self._capture is not None:
            self._capture.clear()

    def _own_values_nonfinite(self, decision: HaltDecision) -> bool:
        """Return True when this rank's own loss or gradients were non-finite: only then is a replay worth it.

        A batch that check_batch found non-finite is located by its name already, and
        the model may have seen a cleaned copy of it.
        """
        index = self._checker.context.agreement.index
        own = decision.codes[index] if index < len(decision.codes) else 0
        if decision.source != "local" or not own & (Reason.LOSS | Reason.GRADIENT):
            return False
        # Gradients are all-reduced: with a non-finite loss on another rank, this rank's
        # non-finite gradients arrived from there, and that rank replays the step.
        other_loss = any(code & Reason.LOSS for position, code in enumerate(decision.codes) if position != index)
        return bool(own & Reason.LOSS) or not other_loss

    def _localize(self, outcome: StepOutcome) -> None:
        """Replay the halting step and add where its first NaN/Inf was born to the report, finding and reason."""
        if self._localizer is None or outcome.halt is None:
            return
        try:
            location = self._localizer.localize(
                step=self._step, rank=self._rank, loss_finite=outcome.report.loss_finite,
                may_be_remote=len(outcome.halt.codes) > 1 and outcome.report.loss_finite)
        except Exception:  # noqa: BLE001 - the halt goes on without a location
            logger.exception("nanwatch rank %d: replaying step %d to localize the NaN failed", self._rank, self._step)
            return
        if location is None:
            return
        outcome.report.location.CopyFrom(location)
        if outcome.halt.finding is not None:
            outcome.halt.finding.evidence.location.CopyFrom(location)
        outcome.halt.reason = f"{outcome.halt.reason}. Localized on rank {self._rank}: {location.detail}"

    def _stop(self, decision: HaltDecision) -> None:
        """Wait briefly for the service's acknowledgement, log the halt and raise HaltError."""
        self._halt = decision
        if decision.source != "service":
            self._sender.wait_for_halt(self._flush_timeout_s)
        logger.error("nanwatch rank %d: halted at step %d before the optimizer update (%s): %s",
                     self._rank, decision.step, decision.source, decision.reason)
        raise self._halt_error(decision)

    def _halt_error(self, decision: HaltDecision) -> HaltError:
        return HaltError(step=decision.step, reason=decision.reason, finding=decision.finding,
                         source=decision.source, exit_code=self._exit_code)


def _check_types(model: object, optimizer: object, loss_fn: object) -> None:
    """Raise TypeError naming the first Watcher argument of the wrong type."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if loss_fn is not None and not isinstance(loss_fn, (nn.Module, str)):
        raise TypeError(f"loss_fn must be an nn.Module, a loss function name or None, got {type(loss_fn).__name__}")
