"""Decoding of wire tensors (nanwatch.v1.Tensor) into numpy arrays, with input validation."""

from __future__ import annotations

import math

import numpy as np

from nanwatch.v1 import nanwatch_pb2 as pb

MAX_DIMS = 8

# Wire dtype name -> little-endian numpy dtype of one element. bfloat16 has no numpy
# dtype: it travels as 2-byte elements and decodes to float32.
_WIRE_DTYPES: dict[str, np.dtype] = {
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype("<u2"),
    "float32": np.dtype("<f4"),
    "float64": np.dtype("<f8"),
    "int8": np.dtype("i1"),
    "int16": np.dtype("<i2"),
    "int32": np.dtype("<i4"),
    "int64": np.dtype("<i8"),
    "uint8": np.dtype("u1"),
    "bool": np.dtype("?"),
}
SUPPORTED_DTYPES: tuple[str, ...] = tuple(_WIRE_DTYPES)


class TensorDecodeError(ValueError):
    """A wire tensor is invalid; the message names the tensor and the field.

    Attributes:
        tensor_name: name of the invalid tensor ("" when the name itself is missing).
        field: the Tensor field at fault: "name", "dtype", "shape" or "data".
    """

    def __init__(self, tensor_name: str, field: str, message: str) -> None:
        super().__init__(message)
        self.tensor_name = tensor_name
        self.field = field


def decode_tensor(tensor: pb.Tensor, *, max_bytes: int) -> np.ndarray:
    """Decode a wire tensor into a numpy array of its shape.

    The array of a numpy-native dtype is a read-only view of the message bytes;
    bfloat16 decodes to a new float32 array.

    Raises:
        TensorDecodeError: the name is empty, the dtype is not supported, the shape
            has a negative dim or more than MAX_DIMS dims, the element bytes exceed
            max_bytes, or the data length does not match dtype and shape.
    """
    if not tensor.name:
        raise TensorDecodeError("", "name", "Tensor.name is empty; send the batch input's name, such as 'inputs'")
    element = _element_dtype(tensor)
    shape = _validated_shape(tensor)
    _validate_data_size(tensor, element.itemsize * math.prod(shape), max_bytes)
    array = np.frombuffer(tensor.data, dtype=element).reshape(shape)
    if tensor.dtype == "bfloat16":
        return _bfloat16_to_float32(array)
    return array


def _element_dtype(tensor: pb.Tensor) -> np.dtype:
    element = _WIRE_DTYPES.get(tensor.dtype)
    if element is None:
        raise TensorDecodeError(
            tensor.name,
            "dtype",
            f"tensor '{tensor.name}': dtype {tensor.dtype!r} is not supported; send one of "
            f"{', '.join(SUPPORTED_DTYPES)} (torch names without the 'torch.' prefix), or cast the "
            f"tensor to float32 first",
        )
    return element


def _validated_shape(tensor: pb.Tensor) -> tuple[int, ...]:
    shape = tuple(int(dim) for dim in tensor.shape)
    if len(shape) > MAX_DIMS:
        raise TensorDecodeError(
            tensor.name,
            "shape",
            f"tensor '{tensor.name}': shape {list(shape)} has {len(shape)} dims, more than {MAX_DIMS}; "
            f"reshape it to at most {MAX_DIMS} dims (the first dim must stay the batch dim)",
        )
    if any(dim < 0 for dim in shape):
        raise TensorDecodeError(
            tensor.name,
            "shape",
            f"tensor '{tensor.name}': shape {list(shape)} has a negative dim; send list(tensor.shape)",
        )
    return shape


def _validate_data_size(tensor: pb.Tensor, expected_bytes: int, max_bytes: int) -> None:
    # expected_bytes is a Python int, so a huge shape cannot overflow it.
    if expected_bytes > max_bytes or len(tensor.data) > max_bytes:
        size = max(expected_bytes, len(tensor.data))
        raise TensorDecodeError(
            tensor.name,
            "data",
            f"tensor '{tensor.name}': {size} bytes exceed the limit of {max_bytes} bytes; send a "
            f"subset of the samples or split the batch over several CheckBatch calls",
        )
    if len(tensor.data) != expected_bytes:
        raise TensorDecodeError(
            tensor.name,
            "data",
            f"tensor '{tensor.name}': data contains {len(tensor.data)} bytes but dtype {tensor.dtype} "
            f"and shape {list(tensor.shape)} need {expected_bytes}; send the C-contiguous "
            f"little-endian bytes of exactly that tensor (tensor.contiguous().numpy().tobytes())",
        )


def _bfloat16_to_float32(raw: np.ndarray) -> np.ndarray:
    """Widen bfloat16 bit patterns (uint16) to float32: bfloat16 is the top half of a float32."""
    return (raw.astype(np.uint32) << 16).view(np.float32)
