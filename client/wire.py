"""Conversion of torch tensors to the nanwatch.v1.Tensor wire message."""

from __future__ import annotations

import sys

import torch

from nanwatch.client.summaries import dtype_name
from nanwatch.v1 import nanwatch_pb2 as pb


def to_wire_tensor(name: str, tensor: torch.Tensor) -> pb.Tensor:
    """Return tensor as little-endian, C-contiguous element bytes with its numpy-style dtype name.

    Raw bytes work for every dtype, including bfloat16, which numpy lacks: its
    elements go out as 2-byte values under the name "bfloat16".
    """
    host = tensor.detach().to("cpu").contiguous()
    raw = host.reshape(-1).view(torch.uint8)
    if sys.byteorder == "big" and host.element_size() > 1:
        raw = raw.reshape(-1, host.element_size()).flip(1).reshape(-1)
    data = raw.numpy().tobytes()
    return pb.Tensor(name=name, dtype=dtype_name(tensor.dtype), shape=list(tensor.shape), data=data)
