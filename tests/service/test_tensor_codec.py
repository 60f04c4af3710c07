"""Tests of decode_tensor: supported dtypes and the validation of wire tensors."""

from __future__ import annotations

import math

import numpy as np
import pytest

from nanwatch.service.tensor_codec import TensorDecodeError, decode_tensor
from nanwatch.v1 import nanwatch_pb2 as pb

LIMIT = 1 << 20


def _wire(name: str, array: np.ndarray, dtype: str | None = None) -> pb.Tensor:
    little = array.astype(array.dtype.newbyteorder("<"))
    return pb.Tensor(name=name, dtype=dtype or str(array.dtype), shape=list(array.shape), data=little.tobytes())


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool"])
def test_round_trip(dtype: str) -> None:
    array = (np.arange(24).reshape(2, 3, 4) % 5).astype(dtype)
    decoded = decode_tensor(_wire("inputs", array), max_bytes=LIMIT)
    assert decoded.dtype == np.dtype(dtype)
    assert np.array_equal(decoded, array)


@pytest.mark.parametrize("value", [1.5, -2.0, 0.0, math.inf, -math.inf])
def test_bfloat16_to_float32(value: float) -> None:
    bits = np.array([value], dtype=np.float32).view(np.uint32) >> 16  # exact for these values
    tensor = pb.Tensor(name="x", dtype="bfloat16", shape=[1], data=bits.astype("<u2").tobytes())
    decoded = decode_tensor(tensor, max_bytes=LIMIT)
    assert decoded.dtype == np.float32
    assert decoded[0] == value


def test_bfloat16_nan_kept() -> None:
    tensor = pb.Tensor(name="x", dtype="bfloat16", shape=[1], data=np.array([0x7FC0], dtype="<u2").tobytes())
    assert np.isnan(decode_tensor(tensor, max_bytes=LIMIT)[0])


def test_nan_float32_kept() -> None:
    decoded = decode_tensor(_wire("x", np.array([np.nan, 1.0], dtype=np.float32)), max_bytes=LIMIT)
    assert np.isnan(decoded[0])


def test_empty_name_rejected() -> None:
    with pytest.raises(TensorDecodeError, match="Tensor.name is empty") as error:
        decode_tensor(_wire("", np.zeros(2, dtype=np.float32)), max_bytes=LIMIT)
    assert error.value.field == "name"


@pytest.mark.parametrize("dtype", ["torch.float32", "complex64", "float", ""])
def test_unknown_dtype_rejected(dtype: str) -> None:
    with pytest.raises(TensorDecodeError, match="dtype") as error:
        decode_tensor(pb.Tensor(name="inputs", dtype=dtype, shape=[2], data=bytes(8)), max_bytes=LIMIT)
    assert error.value.field == "dtype"
    assert "'inputs'" in str(error.value)
    assert "float32" in str(error.value)


def test_negative_dim_rejected() -> None:
    tensor = pb.Tensor(name="inputs", dtype="float32", shape=[2, -1], data=b"")
    with pytest.raises(TensorDecodeError, match="negative dim") as error:
        decode_tensor(tensor, max_bytes=LIMIT)
    assert error.value.field == "shape"


def test_too_many_dims_rejected() -> None:
    tensor = pb.Tensor(name="inputs", dtype="uint8", shape=[1] * 9, data=b"\x00")
    with pytest.raises(TensorDecodeError, match="9 dims"):
        decode_tensor(tensor, max_bytes=LIMIT)


def test_eight_dims_accepted() -> None:
    tensor = pb.Tensor(name="inputs", dtype="uint8", shape=[1] * 8, data=b"\x07")
    assert decode_tensor(tensor, max_bytes=LIMIT).shape == (1,) * 8


def test_huge_shape_no_overflow() -> None:
    tensor = pb.Tensor(name="inputs", dtype="float64", shape=[2**62, 2**62], data=b"")
    with pytest.raises(TensorDecodeError, match="exceed the limit") as error:
        decode_tensor(tensor, max_bytes=LIMIT)
    assert error.value.field == "data"


def test_over_limit_rejected() -> None:
    with pytest.raises(TensorDecodeError, match="exceed the limit of 16 bytes"):
        decode_tensor(_wire("inputs", np.zeros(8, dtype=np.float32)), max_bytes=16)


def test_length_mismatch_rejected() -> None:
    tensor = _wire("targets", np.zeros(4, dtype=np.float32))
    tensor.shape[:] = [5]
    with pytest.raises(TensorDecodeError, match="contains 16 bytes but dtype float32 and shape \\[5\\] need 20") as error:
        decode_tensor(tensor, max_bytes=LIMIT)
    assert error.value.tensor_name == "targets"


def test_zero_size_tensor() -> None:
    tensor = pb.Tensor(name="inputs", dtype="float32", shape=[0, 3], data=b"")
    assert decode_tensor(tensor, max_bytes=LIMIT).shape == (0, 3)


def test_scalar_tensor() -> None:
    decoded = decode_tensor(_wire("loss_weight", np.array(3.0, dtype=np.float32)), max_bytes=LIMIT)
    assert decoded.shape == ()


def test_error_is_value_error() -> None:
    assert issubclass(TensorDecodeError, ValueError)
