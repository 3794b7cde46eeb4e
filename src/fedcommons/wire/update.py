"""Decoded client updates and the validation every update passes before aggregation."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from fedcommons.errors import UpdateRejectedError


@dataclass
class ClientUpdate:
    """One client's decoded contribution to a round.

    ``delta`` holds θ_local − θ0 per tensor, with the base release's names, shapes and
    dtypes. ``num_examples`` is the client's FedAvg weight.
    """

    delta: dict[str, torch.Tensor]
    num_examples: int
    node_id: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    #: Bytes of the update as received (encoded payload, or the dense arrays' data).
    upload_bytes: int = 0


def decode_dense_delta(
    arrays: Mapping[str, np.ndarray | torch.Tensor],
    reference: Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Check a dense delta against the base weights and return it as tensors.

    Rejects (:class:`UpdateRejectedError`) missing or unexpected tensor names, wrong
    shapes, non-floating dtypes and NaN/Inf values. Returns tensors in the reference's
    dtype, so nothing downstream sees foreign dtypes.
    """
    missing = sorted(set(reference) - set(arrays))
    extra = sorted(set(arrays) - set(reference))
    if missing or extra:
        raise UpdateRejectedError(
            "wrong-tensors", f"missing {missing[:5]}, unexpected {extra[:5]} for the base release"
        )
    out: dict[str, torch.Tensor] = {}
    for name, ref in reference.items():
        value = arrays[name]
        tensor = torch.as_tensor(value) if isinstance(value, np.ndarray) else value
        if tuple(tensor.shape) != tuple(ref.shape):
            raise UpdateRejectedError(
                "wrong-shape",
                f"{name}: shape {tuple(tensor.shape)}, base release has {tuple(ref.shape)}",
            )
        if not tensor.dtype.is_floating_point:
            raise UpdateRejectedError("wrong-dtype", f"{name}: dtype {tensor.dtype} is not float")
        if not bool(torch.isfinite(tensor).all()):
            raise UpdateRejectedError("non-finite", f"{name}: contains NaN or Inf")
        out[name] = tensor.to(ref.dtype)
    return out


def check_num_examples(value: object) -> int:
    """Validate a reply's example count (a positive integer)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise UpdateRejectedError("bad-num-examples", f"num-examples is {value!r}, not a number")
    if not math.isfinite(value) or value <= 0 or value != int(value):
        raise UpdateRejectedError(
            "bad-num-examples", f"num-examples {value!r} is not a positive int"
        )
    return int(value)
