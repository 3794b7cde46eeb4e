"""Compact wire encoding of a diagonal Fisher: int8 codes in the log domain.

A diagonal Fisher spans many orders of magnitude and only its relative size matters to
the Fisher-weighted merge, so each tensor is sent as int8 codes on a linear grid over
``[log_lo, log_hi]`` (254 levels) plus those two float32 bounds. Code ``-128`` means an
exact zero. Values below ``floor_rel × ‖F‖₂`` (global L2 norm over all tensors) are
clamped up to that floor before encoding: the merge floors normalised Fisher values at
ε = 1e-6 anyway, and the clamp keeps the grid fine (a range of at most ~18.4 nats for
the default ``floor_rel = 1e-8``, i.e. a relative error of at most ±3.7 %).

When the update carries a mask, only the entries inside the mask are sent (flattened in
row-major order), so a top-k update's Fisher costs k bytes, not one byte per parameter.
This is one byte per sent coordinate, a quarter of a float32 delta.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch

from fedcommons.errors import UpdateRejectedError
from fedcommons.wire.update import squared_norm

ZERO_CODE = -128
LEVELS = 254  # codes -127 .. 127
_BLOCK = 1 << 16  # decode in blocks: float64 temporaries stay at 512 KiB, not 2x the model


def encode_fisher(
    fisher: Mapping[str, torch.Tensor],
    mask: Mapping[str, torch.Tensor] | None = None,
    *,
    floor_rel: float = 1e-8,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Encode a non-negative diagonal Fisher; return ``(codes, ranges)``.

    ``codes[name]`` is a 1-D int8 array (the masked entries, or all of them);
    ``ranges[name]`` is float32 ``[log_lo, log_hi]``.
    """
    norm = math.sqrt(squared_norm(fisher.values()))
    floor = math.log(norm * floor_rel) if norm > 0 else 0.0
    codes: dict[str, np.ndarray] = {}
    ranges: dict[str, np.ndarray] = {}
    for name, value in fisher.items():
        flat = value.detach().double().reshape(-1)
        if mask is not None:
            flat = flat[mask[name].reshape(-1).bool()]
        arr = flat.cpu().numpy()
        if np.any(arr < 0) or not np.all(np.isfinite(arr)):
            raise ValueError(f"Fisher {name}: values must be finite and >= 0")
        out = np.full(arr.shape, ZERO_CODE, dtype=np.int8)
        pos = arr > 0
        lo = hi = 0.0
        if pos.any():
            logs = np.maximum(np.log(arr[pos]), floor)
            lo, hi = float(logs.min()), float(logs.max())
            span = hi - lo
            scaled = (logs - lo) / span * LEVELS if span > 0 else np.full(logs.shape, LEVELS)
            out[pos] = (np.rint(scaled) - 127).astype(np.int8)
        codes[name] = out
        ranges[name] = np.asarray([lo, hi], dtype=np.float32)
    return codes, ranges


def decode_fisher(
    codes: Mapping[str, np.ndarray],
    ranges: Mapping[str, np.ndarray],
    reference: Mapping[str, torch.Tensor],
    mask: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Decode :func:`encode_fisher` output into dense float32 tensors shaped like ``reference``.

    Rejects (:class:`UpdateRejectedError` ``bad-fisher``) missing or extra tensors, codes
    that are not int8 or have the wrong length, and non-finite or inverted ranges.
    """
    names = set(reference)
    if set(codes) != names or set(ranges) != names:
        missing = sorted(names - set(codes))
        extra = sorted(set(codes) - names)
        raise UpdateRejectedError(
            "bad-fisher", f"Fisher tensors: missing {missing[:5]}, unexpected {extra[:5]}"
        )
    out: dict[str, torch.Tensor] = {}
    for name, ref in reference.items():
        code = np.asarray(codes[name])
        rng = np.asarray(ranges[name], dtype=np.float64).reshape(-1)
        if code.dtype != np.int8 or code.ndim != 1:
            raise UpdateRejectedError(
                "bad-fisher", f"Fisher {name}: codes must be 1-D int8, got {code.dtype}"
            )
        selected = mask[name].reshape(-1).bool() if mask is not None else None
        expected = int(selected.sum()) if selected is not None else ref.numel()
        if code.size != expected:
            raise UpdateRejectedError(
                "bad-fisher", f"Fisher {name}: {code.size} codes, expected {expected}"
            )
        if rng.size != 2 or not np.all(np.isfinite(rng)) or rng[0] > rng[1]:
            raise UpdateRejectedError("bad-fisher", f"Fisher {name}: bad range {rng.tolist()}")
        lo, hi = rng
        values = np.empty(code.size, dtype=np.float32)
        for start in range(0, code.size, _BLOCK):  # float64 math a block at a time
            block = code[start : start + _BLOCK]
            exact = np.exp(lo + (block.astype(np.float64) + 127) / LEVELS * (hi - lo))
            exact[block == ZERO_CODE] = 0.0
            values[start : start + block.size] = exact
            if not np.all(np.isfinite(values[start : start + block.size])):  # float32 Inf too
                raise UpdateRejectedError("bad-fisher", f"Fisher {name}: decodes to Inf")
        dense = torch.from_numpy(values)
        if selected is not None:
            full = torch.zeros(ref.numel(), dtype=torch.float32)
            full[selected] = dense
            dense = full
        out[name] = dense.reshape(ref.shape)
    return out


def encoded_nbytes(codes: Mapping[str, np.ndarray], ranges: Mapping[str, np.ndarray]) -> int:
    """Payload bytes of an encoded Fisher (codes plus ranges)."""
    return sum(int(c.nbytes) for c in codes.values()) + sum(int(r.nbytes) for r in ranges.values())
