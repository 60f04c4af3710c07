"""Forward-pass facts: the leaf-module trace and layer statistics of the first pass, and model-output finiteness."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from nanwatch.client.localize.guard import replaying
from nanwatch.client.localize.origins import float_tensors
from nanwatch.client.summaries import dtype_name, stats_dtype
from nanwatch.v1 import nanwatch_pb2 as pb

# A model that loops over a leaf module many times per forward pass would otherwise grow
# the trace without bound.
MAX_TRACE_CALLS = 10_000
# Output minima and maxima kept between two optimizer steps before they fold into one pair.
MAX_KEPT_EXTREMES = 64
# Layout of one row of ForwardTrace.activation_stats.
ACTIVATION_STAT_NAMES = ("numel", "std", "max_abs", "nonfinite_count", "saturated_fraction",
                         "input_nan_count", "input_inf_count")
# |x| beyond which Sigmoid and Tanh have a derivative below 0.01 (sigmoid'(6) = 0.0025, tanh'(3) = 0.0099).
SATURATION_ABS = {"Sigmoid": 6.0, "Tanh": 3.0}


def first_tensor(value: Any) -> torch.Tensor | None:
    """Return the first floating-point tensor in a module output (a tensor, tuple, list or mapping)."""
    found = float_tensors(value, limit=1)
    return found[0] if found else None


def measure_activation(module_type: str, inputs: Sequence[Any], output: torch.Tensor) -> torch.Tensor:
    """Return the ACTIVATION_STAT_NAMES row of one layer call, on the output's device, without a host sync."""
    dtype = stats_dtype(output.device)
    values = output.detach().to(dtype)
    finite = torch.isfinite(values)
    count = finite.sum().clamp(min=1)
    mean = torch.where(finite, values, 0.0).sum() / count
    std = (torch.where(finite, (values - mean) ** 2, 0.0).sum() / count).sqrt()
    max_abs = torch.where(finite, values.abs(), 0.0).amax() if values.numel() else torch.zeros((), dtype=dtype, device=values.device)
    nonfinite = (~finite).sum().to(dtype)
    saturated, input_nan, input_inf = _input_stats(module_type, inputs, values.device, dtype)
    numel = torch.tensor(float(values.numel()), dtype=dtype, device=values.device)
    return torch.stack([numel, std, max_abs, nonfinite, saturated, input_nan, input_inf])


def _input_stats(
    module_type: str, inputs: Sequence[Any], device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return the saturated fraction (NaN unless Sigmoid/Tanh) and NaN and Inf counts of the first input."""
    nan = torch.tensor(math.nan, dtype=dtype, device=device)
    zero = torch.zeros((), dtype=dtype, device=device)
    tensor = first_tensor(list(inputs))
    if tensor is None or tensor.numel() == 0:
        return nan, zero, zero
    values = tensor.detach().to(device=device, dtype=dtype)
    input_nan = torch.isnan(values).sum().to(dtype)
    input_inf = torch.isinf(values).sum().to(dtype)
    limit = SATURATION_ABS.get(module_type)
    if limit is None:
        return nan, input_nan, input_inf
    return (values.abs() > limit).to(dtype).mean(), input_nan, input_inf


class ForwardTrace:
    """Records the first forward pass and checks every model output for NaN/Inf.

    First pass only (one-shot hooks removed when the root module returns): the
    order of leaf modules (modules without children), one ACTIVATION_STAT_NAMES
    row per leaf call, the autocast dtype and the output shape. Every pass: the
    minimum and maximum of the model output, kept on the device and read and
    cleared once per optimizer step by take_output_extremes(). They are non-finite
    exactly when the output contains NaN or Inf, since amin and amax propagate NaN.
    """

    def __init__(self, model: nn.Module) -> None:
        self.calls: list[pb.ModuleCall] = []
        self.finished = False
        self.autocast_dtype = ""
        self.output_shape: list[int] = []
        self.activation_rows: list[torch.Tensor] = []
        self._output_extremes: list[torch.Tensor] = []
        self._first_handles: list[RemovableHandle] = []
        for name, module in model.named_modules():
            if next(module.children(), None) is None:
                self._first_handles.append(module.register_forward_pre_hook(self._make_recorder(name)))
                self._first_handles.append(module.register_forward_hook(self._make_measurer(type(module).__name__)))
        self._first_handles.append(model.register_forward_hook(self._on_root_done))
        self._output_handle: RemovableHandle | None = model.register_forward_hook(self._on_output)

    def _make_recorder(self, name: str) -> Any:
        def record(module: nn.Module, unused_args: Any) -> None:
            if len(self.calls) < MAX_TRACE_CALLS:
                self.calls.append(pb.ModuleCall(name=name, type=type(module).__name__))

        return record

    def _make_measurer(self, module_type: str) -> Any:
        def measure(unused_module: nn.Module, args: Any, output: Any) -> None:
            tensor = first_tensor(output)
            if tensor is not None and len(self.activation_rows) < len(self.calls) <= MAX_TRACE_CALLS:
                self.activation_rows.append(measure_activation(module_type, args, tensor))
            elif len(self.activation_rows) < len(self.calls):
                self.activation_rows.append(torch.full((len(ACTIVATION_STAT_NAMES),), math.nan, dtype=torch.float64))

        return measure

    def _on_root_done(self, unused_module: nn.Module, unused_args: Any, output: Any) -> None:
        tensor = first_tensor(output)
        if tensor is not None:
            self.output_shape = list(tensor.shape)
            device_type = tensor.device.type
            if torch.is_autocast_enabled(device_type):
                self.autocast_dtype = dtype_name(torch.get_autocast_dtype(device_type))
        self.finished = True
        self._remove_first_pass()

    def _on_output(self, unused_module: nn.Module, unused_args: Any, output: Any) -> None:
        tensor = first_tensor(output)
        if tensor is None or replaying():
            return
        if tensor.numel() == 0:
            return
        # One reduction and no device-side flag: the host reads the extremes with the step's other values.
        self._output_extremes += torch.aminmax(tensor.detach())
        if len(self._output_extremes) > MAX_KEPT_EXTREMES:
            # Forward passes without an optimizer step (evaluation) fold into one pair.
            self._output_extremes = list(torch.aminmax(_join(self._output_extremes)))

    def take_output_extremes(self) -> torch.Tensor | None:
        """Return the minima and maxima of this step's model outputs as one device vector and clear them.

        None without a forward pass since the last call. A value is non-finite exactly
        when an output contained NaN or Inf.
        """
        extremes, self._output_extremes = self._output_extremes, []
        return _join(extremes) if extremes else None

    def activation_stats(self) -> torch.Tensor | None:
        """Return the activation rows stacked on the first row's device, or None when there are none."""
        if not self.activation_rows:
            return None
        device = self.activation_rows[0].device
        return torch.stack([row.to(device=device, dtype=self.activation_rows[0].dtype) for row in self.activation_rows])

    def build_activations(self, rows: Sequence[Sequence[float]]) -> list[pb.LayerActivation]:
        """Return one LayerActivation per measured call from the host copy of activation_stats()."""
        layers = []
        for call, row in zip(self.calls, rows):
            numel, std, max_abs, nonfinite, saturated, input_nan, input_inf = row
            layers.append(pb.LayerActivation(
                name=call.name, type=call.type, numel=_as_count(numel), std=std, max_abs=max_abs,
                nonfinite_count=_as_count(nonfinite), saturated_fraction=saturated,
                input_nan_count=_as_count(input_nan), input_inf_count=_as_count(input_inf)))
        return layers

    def _remove_first_pass(self) -> None:
        for handle in self._first_handles:
            handle.remove()
        self._first_handles.clear()

    def remove(self) -> None:
        """Remove every hook this trace installed; safe to call more than once."""
        self._remove_first_pass()
        if self._output_handle is not None:
            self._output_handle.remove()
            self._output_handle = None


def _join(values: list[torch.Tensor]) -> torch.Tensor:
    """Return the 0-d tensors in values as one vector on the first one's device, in a common dtype."""
    device, dtype = values[0].device, values[0].dtype
    if any(value.device != device or value.dtype != dtype for value in values):
        values = [value.to(device=device, dtype=torch.float32) for value in values]
    return torch.stack(values)


def _as_count(value: float) -> int:
    return int(value) if math.isfinite(value) else 0
