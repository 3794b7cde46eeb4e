"""The coordinator reads dense reply arrays as zero-copy views of the message bytes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from fedcommons.coordinator.intake import array_view, record_tensors


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16, np.int64, np.bool_])
def test_view_equals_numpy_for_native_dtypes(dtype: type) -> None:
    values = (np.arange(24).reshape(2, 3, 4) % 5).astype(dtype)
    array = Array(values)
    got = array_view(array)
    assert got.shape == (2, 3, 4)
    assert np.array_equal(got.numpy(), array.numpy())


def test_float_view_shares_the_message_bytes() -> None:
    array = Array(np.linspace(-1, 1, 1000, dtype=np.float32))
    view = array_view(array)
    buffer = np.frombuffer(array.data, dtype=np.uint8)
    start = buffer.ctypes.data
    assert start <= view.data_ptr() < start + len(array.data)  # no copy was made


def test_big_endian_and_fortran_arrays_fall_back_to_a_copy() -> None:
    """Input tried: a big-endian float32 array and a Fortran-ordered float64 matrix."""
    big = np.arange(6, dtype=">f4")
    fortran = np.asfortranarray(np.arange(6, dtype=np.float64).reshape(2, 3))
    for values in (big, fortran):
        got = array_view(Array(values))
        assert np.array_equal(got.numpy(), values)
        assert got.numpy().flags.writeable


def test_record_tensors_keeps_every_name() -> None:
    record = ArrayRecord({"a": Array(np.ones(3, np.float32)), "b": Array(np.zeros((2, 2)))})
    tensors = record_tensors(record)
    assert list(tensors) == ["a", "b"]
    assert torch.equal(tensors["b"], torch.zeros(2, 2, dtype=torch.float64))
