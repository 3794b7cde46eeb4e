"""A decoded update that stays encoded until something needs the dense tensors.

:func:`fedcommons.wire.codec.decode_update` validates every byte of a payload but
keeps the values as they travelled (views of the payload: int8/int4 codes with their
chunk scales, or fp32/fp16/bf16 values) plus the support mask of a sparse update (one
byte a parameter). :class:`LazyDelta` is the update's ``delta`` mapping: reading a
tensor decodes the whole update once into one dense float32 vector (cached);
:meth:`LazyDelta.fold_into` / :meth:`LazyDelta.fold_range` instead add ``w · Δ``
straight into a float64 accumulator in one pass over the codes, without the dense
temporary. Both use the same float32 values, bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedcommons.wire import kernels

_BLOCK = 1 << 16  # values converted per step for fp16/bf16 (a 256 KiB float32 block)


@dataclass(frozen=True)
class EncodedValues:
    """The value section of a payload, validated, as views of the payload's bytes.

    ``kind`` is ``fp32``, ``fp16``, ``bf16``, ``int8`` or ``int4``; ``data`` holds the
    float32 values, the raw 16-bit patterns, the int8 codes or the packed int4 bytes;
    ``scales`` the per-chunk float32 scales of the quantized kinds.
    """

    kind: str
    count: int
    data: np.ndarray
    scales: np.ndarray | None = None
    chunk: int = 0
    levels: int = 0

    def block(self, j0: int, j1: int) -> np.ndarray:
        """Values ``j0 … j1-1`` as float32 (a view for fp32, else a fresh block)."""
        if self.kind == "fp32":
            return self.data[j0:j1]
        if self.kind == "fp16":
            return self.data[j0:j1].view(np.float16).astype(np.float32)
        if self.kind == "bf16":  # bfloat16 is the top half of a float32
            return (self.data[j0:j1].astype(np.uint32) << np.uint32(16)).view(np.float32)
        out = np.empty(j1 - j0, dtype=np.float32)
        self.write(out, j0)
        return out

    def write(self, out: np.ndarray, j0: int) -> None:
        """``out[:] =`` values ``j0 … j0 + out.size - 1`` (float32)."""
        if self.kind == "int8":
            kernels.dequantize8(self.data, self.scales, self.chunk, self.levels, j0, out)
        elif self.kind == "int4":
            kernels.dequantize4(self.data, self.scales, self.chunk, self.levels, j0, out)
        else:
            for s in range(0, out.size, _BLOCK):
                e = min(s + _BLOCK, out.size)
                out[s:e] = self.block(j0 + s, j0 + e)

    def scatter(self, out: np.ndarray, support: np.ndarray, j0: int) -> None:
        """Write values ``j0, j0+1, …`` to ``out`` where ``support`` is set, in order."""
        args = (self.data, self.scales, self.chunk, self.levels, j0, support, out)
        if self.kind == "int8":
            kernels.scatter8(*args)
        elif self.kind == "int4":
            kernels.scatter4(*args)
        else:
            for s, e, j, k in _blocks(support, j0):
                out[s:e][support[s:e]] = self.block(j, k)

    def fold(self, acc: np.ndarray, j0: int, weight: float) -> None:
        """``acc += weight ·`` values ``j0 … j0 + acc.size - 1`` (float64 ``acc``)."""
        if self.kind == "int8":
            kernels.fold8(self.data, self.scales, self.chunk, self.levels, j0, weight, acc)
        elif self.kind == "int4":
            kernels.fold4(self.data, self.scales, self.chunk, self.levels, j0, weight, acc)
        elif self.kind == "fp32":
            kernels.fold_values(self.data[j0 : j0 + acc.size], weight, acc)
        else:
            for s in range(0, acc.size, _BLOCK):
                e = min(s + _BLOCK, acc.size)
                kernels.fold_values(self.block(j0 + s, j0 + e), weight, acc[s:e])

    def scatter_fold(self, acc: np.ndarray, support: np.ndarray, j0: int, weight: float) -> None:
        """``acc += weight ·`` values ``j0, j0+1, …`` where ``support`` is set, in order."""
        args = (self.data, self.scales, self.chunk, self.levels, j0, support, weight, acc)
        if self.kind == "int8":
            kernels.scatter_fold8(*args)
        elif self.kind == "int4":
            kernels.scatter_fold4(*args)
        else:
            for s, e, j, k in _blocks(support, j0):
                kernels.scatter_fold_values(self.block(j, k), support[s:e], weight, acc[s:e])


def _blocks(support: np.ndarray, j0: int) -> Iterator[tuple[int, int, int, int]]:
    """Split ``support`` into blocks: (start, stop, first value, end value) each."""
    j = j0
    for s in range(0, support.size, _BLOCK):
        e = min(s + _BLOCK, support.size)
        k = j + int(np.count_nonzero(support[s:e]))
        yield s, e, j, k
        j = k


def unflatten(flat: np.ndarray, layout: list[Any]) -> dict[str, torch.Tensor]:
    """Split a flat float32 vector back into tensors of ``layout`` (shapes and dtypes)."""
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for info in layout:
        n = info.numel
        tensor = torch.from_numpy(flat[offset : offset + n].reshape(info.shape))
        out[info.name] = tensor if info.dtype == torch.float32 else tensor.to(info.dtype)
        offset += n
    return out


class LazyDelta(Mapping[str, torch.Tensor]):
    """The delta of a decoded update: a read-only mapping name → tensor, decoded on use.

    ``layout`` is the list of :class:`~fedcommons.wire.codec.TensorInfo` in payload
    order; ``support`` the flat bool mask of the coordinates a sparse update sent
    (``None``: dense). Values are consumed in flat order: the ``j``-th value belongs to
    the ``j``-th set entry of ``support``.
    """

    def __init__(self, layout: list, source: EncodedValues, support: np.ndarray | None) -> None:
        self.layout = layout
        self.source = source
        self.support = support
        # name -> (flat offset, numel, first value index)
        self._offsets: dict[str, tuple[int, int, int]] = {}
        offset = first = 0
        for info in layout:
            self._offsets[info.name] = (offset, info.numel, first)
            if support is None:
                first += info.numel
            else:
                first += int(np.count_nonzero(support[offset : offset + info.numel]))
            offset += info.numel
        self.size = offset
        self._tensors: dict[str, torch.Tensor] | None = None
        self._cursor: dict[str, tuple[int, int]] = {}  # name -> (position, value index)

    @property
    def materialized(self) -> bool:
        """Whether the dense tensors were built (a later fold reads them instead)."""
        return self._tensors is not None

    def sent_values(self, name: str) -> np.ndarray:
        """The float32 values sent for tensor ``name`` (all of them when dense)."""
        offset, numel, first = self._offsets[name]
        if self.support is None:
            return self.source.block(first, first + numel)
        sent = int(np.count_nonzero(self.support[offset : offset + numel]))
        return self.source.block(first, first + sent)

    def check_range(self) -> str | None:
        """Name of a tensor whose values overflow its (narrower) dtype, else None.

        A float16 or bfloat16 tensor of the base release must not receive a float32
        value its dtype rounds to ±Inf (e.g. a valid-looking quantization scale of
        1e38): that would put an Inf into the aggregate.
        """
        for info in self.layout:
            if info.dtype in (torch.float32, torch.float64):
                continue
            values = self.sent_values(info.name)
            limit = float(torch.finfo(info.dtype).max)
            if values.size and float(np.abs(values).max()) > limit:
                return info.name
        return None

    def flat(self) -> np.ndarray:
        """The whole update as one fresh dense float32 vector (payload order)."""
        if self.support is None:
            out = np.empty(self.size, dtype=np.float32)
            self.source.write(out, 0)
        else:
            out = np.zeros(self.size, dtype=np.float32)
            self.source.scatter(out, self.support, 0)
        return out

    def _dense(self) -> dict[str, torch.Tensor]:
        if self._tensors is None:
            self._tensors = unflatten(self.flat(), self.layout)
        return self._tensors

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._dense()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._offsets)

    def __len__(self) -> int:
        return len(self._offsets)

    def __contains__(self, name: object) -> bool:
        return name in self._offsets

    def foldable(self, name: str) -> bool:
        """Whether :meth:`fold_range` reads tensor ``name`` straight from the payload."""
        return self._tensors is None and self.layout_dtype(name) == torch.float32

    def layout_dtype(self, name: str) -> torch.dtype:
        """The dtype tensor ``name`` decodes to."""
        return next(info.dtype for info in self.layout if info.name == name)

    def fold_range(self, name: str, start: int, stop: int, weight: float, acc: np.ndarray) -> None:
        """``acc += weight · Δ[name].flat[start:stop]`` (``acc`` holds ``stop - start``).

        For float32 tensors (see :meth:`foldable`). Calls for consecutive ranges of a
        tensor cost O(range) each (a cursor remembers where the last one ended).
        """
        offset, _, first = self._offsets[name]
        if self.support is None:
            self.source.fold(acc, first + start, weight)
            return
        position, j = self._cursor.get(name, (0, first))
        if position != start:
            j = first + int(np.count_nonzero(self.support[offset : offset + start]))
        segment = self.support[offset + start : offset + stop]
        self.source.scatter_fold(acc, segment, j, weight)
        self._cursor[name] = (stop, j + int(np.count_nonzero(segment)))

    def fold_into(self, acc: Mapping[str, np.ndarray], weight: float) -> None:
        """``acc[name] += weight · Δ[name]`` for every tensor, in one pass over the codes.

        ``acc`` maps each name to a flat, contiguous float64 array. Gives the same
        bits as adding ``weight · float64(self[name])``; tensors whose dtype is not
        float32 (their dense values are rounded to that dtype) take that path.
        """
        w = float(weight)
        for info in self.layout:
            target = acc[info.name]
            if self._tensors is not None or info.dtype != torch.float32:
                dense = self[info.name].reshape(-1)
                if dense.dtype not in (torch.float32, torch.float64):
                    dense = dense.double()
                kernels.fold_values(dense.numpy(), w, target)
                continue
            offset, numel, first = self._offsets[info.name]
            if self.support is None:
                self.source.fold(target, first, w)
            else:
                segment = self.support[offset : offset + numel]
                self.source.scatter_fold(target, segment, first, w)
