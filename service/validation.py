"""Validation of incoming requests. Each failure carries the gRPC status code to return."""

from __future__ import annotations

import math
from collections.abc import Sequence

import grpc

from nanwatch.run_id import validate_run_id
from nanwatch.v1 import nanwatch_pb2 as pb

MAX_WORLD_SIZE = 1 << 20
# Bounds that keep hostile messages from costing the checks unbounded memory or time.
MAX_ID_CHARS = 128
MAX_NAME_CHARS = 1024
MAX_REASON_CHARS = 4096
MAX_DIMS = 8
MAX_DIM = 1 << 40
MAX_ELEMENTS = 1 << 50
MAX_PARAMETERS = 1 << 20
MAX_TRACE_MODULES = 1 << 16
MAX_BATCH_TENSORS = 64
_MAX_DROPPED = 1 << 62


class RequestError(Exception):
    """A request the service rejects, with the status code and a message that names the field."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def check_run_id(run_id: str, field_name: str = "run_id") -> None:
    try:
        validate_run_id(run_id)
    except ValueError as error:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"{field_name}: {error}") from None


def check_rank(rank: int, world_size: int) -> None:
    if not 0 <= rank < world_size:
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"rank {rank} is outside the world size {world_size}; send a rank in 0..{world_size - 1}",
        )


def check_registration(request: pb.RegisterRankRequest) -> None:
    check_run_id(request.run_id)
    if not 1 <= request.world_size <= MAX_WORLD_SIZE:
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"world_size {request.world_size} is invalid; send the number of ranks, 1..{MAX_WORLD_SIZE}",
        )
    check_rank(request.rank, request.world_size)
    if not request.client_id:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "client_id is empty; send a random id per client process")
    check_text(request.client_id, "client_id", MAX_ID_CHARS)
    check_text(request.host, "host", MAX_NAME_CHARS)
    check_text(request.loss_function, "loss_function", MAX_NAME_CHARS)
    check_count(len(request.parameters), "parameters", MAX_PARAMETERS)
    for index, parameter in enumerate(request.parameters):
        _check_parameter(parameter, f"parameters[{index}]")
    _check_modules(request.forward_trace, "forward_trace")
    _check_optimizer(request.optimizer)
    _check_clipping(request.clipping)


def _check_parameter(parameter: pb.ParameterInfo, field_name: str) -> None:
    # mean, std, min and max may be NaN or Inf: non-finite parameters are what stage 2 looks for.
    check_text(parameter.name, f"{field_name}.name", MAX_NAME_CHARS)
    check_shape(parameter.shape, f"{field_name}.shape")
    for name in ("numel", "nonfinite_count", "fan_in"):
        check_count(getattr(parameter, name), f"{field_name}.{name}", MAX_ELEMENTS)


def _check_modules(modules: Sequence[pb.ModuleCall], field_name: str) -> None:
    check_count(len(modules), field_name, MAX_TRACE_MODULES)
    for index, module in enumerate(modules):
        check_text(module.name, f"{field_name}[{index}].name", MAX_NAME_CHARS)
        check_text(module.type, f"{field_name}[{index}].type", MAX_NAME_CHARS)


def _check_optimizer(optimizer: pb.OptimizerInfo) -> None:
    check_text(optimizer.type, "optimizer.type", MAX_NAME_CHARS)
    check_finite(optimizer.lr, "optimizer.lr", "send the learning rate of the first param group", minimum=0.0)
    for name, value in optimizer.hyperparameters.items():
        check_text(name, "optimizer.hyperparameters key", MAX_NAME_CHARS)
        check_finite(value, f"optimizer.hyperparameters[{name!r}]", "send the optimizer's setting as a number")


def _check_clipping(clipping: pb.ClippingInfo) -> None:
    if not clipping.enabled:
        return
    check_finite(clipping.max_norm, "clipping.max_norm", "send the max_norm given to clip_grad_norm_", minimum=0.0)
    # norm_type may be inf (the max norm), but not NaN.
    if math.isnan(clipping.norm_type) or clipping.norm_type <= 0:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"clipping.norm_type {clipping.norm_type} is invalid; send a positive number or inf")


def check_text(value: str, field_name: str, max_chars: int) -> None:
    """Reject a string field longer than max_chars."""
    if len(value) > max_chars:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"{field_name} is {len(value)} characters long; the maximum is {max_chars}")


def check_count(value: int, field_name: str, maximum: int) -> None:
    """Reject a count (or the length of a repeated field) that is negative or above maximum."""
    if not 0 <= value <= maximum:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"{field_name} is {value}; send a count in 0..{maximum}")


def check_shape(shape: Sequence[int], field_name: str) -> None:
    """Reject a shape with more than MAX_DIMS dims, a negative or huge dim, or too many elements."""
    dims = [int(dim) for dim in shape]
    if len(dims) > MAX_DIMS:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"{field_name} {dims} has {len(dims)} dims; the maximum is {MAX_DIMS}")
    if any(not 0 <= dim <= MAX_DIM for dim in dims) or math.prod(dims) > MAX_ELEMENTS:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"{field_name} {dims} is invalid; send list(tensor.shape): dims in 0..{MAX_DIM}, "
                           f"at most {MAX_ELEMENTS} elements")


def check_finite(value: float, field_name: str, hint: str, *, minimum: float | None = None) -> None:
    """Reject a number that is NaN or Inf, or below minimum when one is given."""
    if not math.isfinite(value) or (minimum is not None and value < minimum):
        bound = "a finite number" if minimum is None else f"a finite number >= {minimum:g}"
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"{field_name} {value} is invalid; {hint} ({bound})")


def check_report(report: pb.StepReport, last_step: int) -> None:
    """Reject a report whose step is negative or behind the rank's last step, or whose fields are out of range."""
    if _is_plain_valid_report(report, last_step):
        return
    _check_report_fields(report, last_step)


def _is_plain_valid_report(report: pb.StepReport, last_step: int) -> bool:
    """Return True for a valid report without a trace, activations or output shape (most of them).

    It tests the conditions of _check_report_fields in fewer operations. False means
    "not known valid": _check_report_fields then raises the error of the first invalid field.
    A comparison with NaN is false, so 0.0 <= x < inf holds only for finite x >= 0.
    """
    step = report.step
    if not (0 <= step and last_step <= step):
        return False
    if not (0.0 <= report.lr < math.inf and 0.0 <= report.loss_scale < math.inf
            and 0.0 <= report.clip_max_norm < math.inf and 0.0 <= report.sent_unix_s < math.inf):
        return False
    if not (0 <= report.nonfinite_grad_count <= MAX_PARAMETERS and 0 <= report.dropped_reports <= _MAX_DROPPED):
        return False
    if report.output_shape or report.forward_trace or report.activations:
        return False
    if len(report.autocast_dtype) > MAX_NAME_CHARS or len(report.parameter_grad_norms) > MAX_PARAMETERS:
        return False
    batch = report.batch
    return len(batch) <= MAX_BATCH_TENSORS and all(_is_valid_summary(summary) for summary in batch)


def _is_valid_summary(summary: pb.TensorSummary) -> bool:
    """Return True when _check_summary accepts summary; False means "not known valid"."""
    dims = list(summary.shape)
    indices = summary.nonfinite_sample_indices
    return (len(dims) <= MAX_DIMS and len(summary.name) <= MAX_NAME_CHARS and len(summary.dtype) <= MAX_NAME_CHARS
            and 0 <= summary.nan_count <= MAX_ELEMENTS and 0 <= summary.inf_count <= MAX_ELEMENTS
            and (not dims or (min(dims) >= 0 and max(dims) <= MAX_DIM and math.prod(dims) <= MAX_ELEMENTS))
            and (not indices or min(indices) >= 0))


def _check_report_fields(report: pb.StepReport, last_step: int) -> None:
    if report.step < 0:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"report.step {report.step} is negative")
    if report.step < last_step:
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"report.step {report.step} goes backwards (last step {last_step}); send steps in order",
        )
    # NaN and Inf are legitimate in loss and norms (that is what the checks look for),
    # but settings of the script and counts must be finite, non-negative numbers.
    check_finite(report.lr, "report.lr", "send the optimizer's current lr", minimum=0.0)
    check_finite(report.loss_scale, "report.loss_scale", "send the GradScaler scale, or 0 without one", minimum=0.0)
    check_finite(report.clip_max_norm, "report.clip_max_norm", "send clip_grad_norm_'s max_norm, or 0", minimum=0.0)
    check_finite(report.sent_unix_s, "report.sent_unix_s", "send time.time()", minimum=0.0)
    check_count(report.nonfinite_grad_count, "report.nonfinite_grad_count", MAX_PARAMETERS)
    check_count(report.dropped_reports, "report.dropped_reports", _MAX_DROPPED)
    check_count(len(report.parameter_grad_norms), "report.parameter_grad_norms", MAX_PARAMETERS)
    check_shape(report.output_shape, "report.output_shape")
    _check_modules(report.forward_trace, "report.forward_trace")
    check_text(report.autocast_dtype, "report.autocast_dtype", MAX_NAME_CHARS)
    check_count(len(report.batch), "report.batch", MAX_BATCH_TENSORS)
    for index, summary in enumerate(report.batch):
        _check_summary(summary, f"report.batch[{index}]")
    check_count(len(report.activations), "report.activations", MAX_TRACE_MODULES)
    for index, layer in enumerate(report.activations):
        _check_activation(layer, f"report.activations[{index}]")


def _check_summary(summary: pb.TensorSummary, field_name: str) -> None:
    # min, max, mean and std are over the finite elements: NaN when there is none.
    check_text(summary.name, f"{field_name}.name", MAX_NAME_CHARS)
    check_text(summary.dtype, f"{field_name}.dtype", MAX_NAME_CHARS)
    check_shape(summary.shape, f"{field_name}.shape")
    check_count(summary.nan_count, f"{field_name}.nan_count", MAX_ELEMENTS)
    check_count(summary.inf_count, f"{field_name}.inf_count", MAX_ELEMENTS)
    if any(index < 0 for index in summary.nonfinite_sample_indices):
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"{field_name}.nonfinite_sample_indices has a negative index; send batch indices")


def _check_activation(layer: pb.LayerActivation, field_name: str) -> None:
    check_text(layer.name, f"{field_name}.name", MAX_NAME_CHARS)
    check_text(layer.type, f"{field_name}.type", MAX_NAME_CHARS)
    check_count(layer.numel, f"{field_name}.numel", MAX_ELEMENTS)
    check_count(layer.nonfinite_count, f"{field_name}.nonfinite_count", MAX_ELEMENTS)
    for name in ("input_nan_count", "input_inf_count"):
        check_count(getattr(layer, name), f"{field_name}.{name}", MAX_ELEMENTS)


def check_batch_request(request: pb.CheckBatchRequest) -> None:
    """Reject a CheckBatch request whose step, tensor count or tensor names are invalid."""
    if request.step < 0:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"step {request.step} is negative")
    check_count(len(request.tensors), "tensors", MAX_BATCH_TENSORS)
    names = [tensor.name for tensor in request.tensors]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"tensors: names {duplicates} appear more than once; give each tensor its own name")


def check_halt_request(request: pb.HaltRunRequest) -> None:
    check_run_id(request.run_id)
    check_text(request.reason, "reason", MAX_REASON_CHARS)
