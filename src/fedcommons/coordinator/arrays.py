"""Zero-copy views of the arrays in a Flower reply.

A Flower ``Array`` carries a serialized ``.npy`` file (``stype == "numpy.ndarray"``);
``Array.numpy()`` parses it with ``np.load``, which copies every byte of every update
before the coordinator has even looked at it. For the dense float updates that make up
most of a round's input, :func:`array_view` instead reads the ``.npy`` header and
returns a read-only tensor over the message's own bytes: decoding an update costs
nothing, and validation plus the aggregator's fold are the only passes over its data.

The view is read-only by contract: nothing on the coordinator's path writes into an
update's tensors (aggregators fold them into their own state; ``strategies.testing``
checks that inputs are left untouched). Anything the fast path does not cover —
big-endian, Fortran-ordered or non-numeric dtypes, other serialization types — falls
back to ``Array.numpy()`` and a private copy.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from numpy.lib import format as npy_format

_HEADER_READERS = {
    (1, 0): npy_format.read_array_header_1_0,
    (2, 0): npy_format.read_array_header_2_0,
}
_VIEWABLE_KINDS = frozenset("fiub")  # float, signed, unsigned, bool


def _npy_view(data: bytes) -> np.ndarray | None:
    """A read-only ndarray over ``data`` (a ``.npy`` file), or None if not viewable."""
    stream = io.BytesIO(data)
    try:
        version = npy_format.read_magic(stream)
        reader = _HEADER_READERS.get(version)
        if reader is None:
            return None
        shape, fortran_order, dtype = reader(stream)
    except ValueError:
        return None
    if fortran_order or dtype.kind not in _VIEWABLE_KINDS or not dtype.isnative:
        return None
    count = int(np.prod(shape, dtype=np.int64))
    offset = stream.tell()
    if offset + count * dtype.itemsize != len(data):
        return None  # truncated or trailing bytes: let np.load raise its own error
    return np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape)


def array_view(array: Array) -> torch.Tensor:
    """The tensor in ``array``: a zero-copy read-only view when possible, else a copy."""
    view = _npy_view(array.data) if array.stype == "numpy.ndarray" else None
    if view is None:
        copy = array.numpy()
        if copy.dtype.kind in _VIEWABLE_KINDS and not copy.dtype.isnative:
            copy = copy.astype(copy.dtype.newbyteorder("="))  # torch needs native order
        copy = np.ascontiguousarray(copy)
        return torch.from_numpy(copy if copy.flags.writeable else copy.copy())
    with warnings.catch_warnings():  # torch warns that the buffer is not writable
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(view)


def record_tensors(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """Every array of ``record`` as a tensor (see :func:`array_view`)."""
    return {name: array_view(array) for name, array in record.items()}
