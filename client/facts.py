"""Static facts of a rank for RegisterRankRequest: parameters, optimizer, loss, AMP, clipping."""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from nanwatch.client.summaries import dtype_name, measure_tensor
from nanwatch.client.transfer import fetch_to_host
from nanwatch.v1 import nanwatch_pb2 as pb

# Hyperparameters of param_groups[0] that the service checks; Adam's betas split into beta1/beta2.
OPTIMIZER_HYPERPARAMETERS = ("eps", "momentum", "weight_decay")


@dataclass(slots=True)
class NamedParameter:
    """A parameter the optimizer updates, with its name in the model and its owner's class."""

    name: str
    module_type: str
    tensor: torch.Tensor


def unwrap_model(model: nn.Module) -> nn.Module:
    """Return the module inside DistributedDataParallel / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def collect_parameters(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[NamedParameter]:
    """Return the optimizer's parameters in param-group order, named after the unwrapped model."""
    owners: dict[int, tuple[str, str]] = {}
    for module_name, module in unwrap_model(model).named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            full_name = f"{module_name}.{param_name}" if module_name else param_name
            owners.setdefault(id(param), (full_name, type(module).__name__))

    collected: list[NamedParameter] = []
    for group_index, group in enumerate(optimizer.param_groups):
        for param_index, param in enumerate(group["params"]):
            fallback = (f"param_groups.{group_index}.{param_index}", "")
            name, module_type = owners.get(id(param), fallback)
            collected.append(NamedParameter(name=name, module_type=module_type, tensor=param))
    return collected


def fan_in(shape: Sequence[int]) -> int:
    """Return the input features feeding one output unit: prod(shape[1:]) for ndim >= 2, else 0."""
    return math.prod(shape[1:]) if len(shape) >= 2 else 0


def build_parameter_infos(parameters: Sequence[NamedParameter]) -> list[pb.ParameterInfo]:
    """Return one ParameterInfo per parameter; all statistics come to the host in one transfer."""
    if not parameters:
        return []
    stats = fetch_to_host([measure_tensor(param.tensor) for param in parameters])
    infos = []
    for param, values in zip(parameters, stats):
        nan_count, inf_count, _, minimum, maximum, mean, std = values
        shape = list(param.tensor.shape)
        infos.append(
            pb.ParameterInfo(
                name=param.name,
                shape=shape,
                dtype=dtype_name(param.tensor.dtype),
                numel=param.tensor.numel(),
                mean=mean,
                std=std,
                min=minimum,
                max=maximum,
                nonfinite_count=int(nan_count + inf_count),
                fan_in=fan_in(shape),
                module_type=param.module_type,
            )
        )
    return infos


def as_float(value: object) -> float | None:
    """Return value as a float when it is a real number or a one-element tensor, else None."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value.item())
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def build_optimizer_info(optimizer: torch.optim.Optimizer) -> pb.OptimizerInfo:
    """Return the optimizer class, lr and numeric hyperparameters of param_groups[0]."""
    info = pb.OptimizerInfo(type=type(optimizer).__name__)
    if not optimizer.param_groups:
        return info
    group = optimizer.param_groups[0]
    info.lr = as_float(group.get("lr")) or 0.0
    for key in OPTIMIZER_HYPERPARAMETERS:
        value = as_float(group.get(key))
        if value is not None:
            info.hyperparameters[key] = value
    betas = group.get("betas")
    if isinstance(betas, (tuple, list)) and len(betas) == 2:
        for key, beta in zip(("beta1", "beta2"), betas):
            value = as_float(beta)
            if value is not None:
                info.hyperparameters[key] = value
    return info


def loss_function_name(loss_fn: nn.Module | str | None) -> str:
    """Return the class name of a loss module, the given name of a loss function, or ""."""
    if loss_fn is None:
        return ""
    if isinstance(loss_fn, str):
        return loss_fn
    return type(loss_fn).__name__


def build_amp_info(amp_dtype: torch.dtype | None, grad_scaler: object | None) -> pb.AmpInfo:
    """Return the autocast dtype and whether an enabled GradScaler is in use."""
    scaler_enabled = grad_scaler is not None and bool(getattr(grad_scaler, "is_enabled", lambda: True)())
    return pb.AmpInfo(
        enabled=amp_dtype is not None,
        dtype=dtype_name(amp_dtype) if amp_dtype is not None else "",
        grad_scaler=scaler_enabled,
    )


def build_clipping_info(max_norm: float | None, norm_type: float) -> pb.ClippingInfo:
    """Return the gradient clipping the training script applies."""
    if max_norm is None:
        return pb.ClippingInfo(enabled=False, norm_type=norm_type)
    return pb.ClippingInfo(enabled=True, max_norm=max_norm, norm_type=norm_type)


@dataclass(kw_only=True, slots=True)
class RankIdentity:
    """Identity of a registering rank: run id, rank, world size and this Watcher's client id."""

    run_id: str
    rank: int
    world_size: int
    client_id: str


def build_register_request(
    *,
    identity: RankIdentity,
    parameters: Sequence[NamedParameter],
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module | str | None,
    amp: pb.AmpInfo,
    clipping: pb.ClippingInfo,
) -> pb.RegisterRankRequest:
    """Return the RegisterRankRequest of this rank; the forward trace follows in a StepReport."""
    return pb.RegisterRankRequest(
        run_id=identity.run_id,
        rank=identity.rank,
        world_size=identity.world_size,
        host=socket.gethostname(),
        pid=os.getpid(),
        client_id=identity.client_id,
        parameters=build_parameter_infos(parameters),
        loss_function=loss_function_name(loss_fn),
        optimizer=build_optimizer_info(optimizer),
        amp=amp,
        clipping=clipping,
    )
