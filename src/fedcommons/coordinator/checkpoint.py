"""Round checkpoints: the aggregate weights and the strategy's server state, one file.

A checkpoint is one safetensors file, ``<registry>/runs/<run-name>/round-<k>.safetensors``:
the weights after round ``k`` under ``weights/<name>`` and the strategy's cross-round
tensors (server momentum, Adam moments) under ``strategy/<attribute>/<name>``, streamed
by :func:`fedcommons.fileio.write_safetensors` (temporary file, fsync, rename, fsync dir)
*before* the index transaction that commits the round names it with its SHA-256. A
checkpoint whose bytes do not match that hash is refused (:class:`CheckpointError`).

Strategy state: an aggregator may define ``checkpoint_state() -> (tensors, meta)`` and
``load_checkpoint_state(tensors, meta)``; otherwise, when it declares
``cross_round_state``, every attribute holding a non-empty ``dict[str, Tensor]`` and every
private numeric scalar (``self._t``) is saved and restored. Aggregators without
cross-round state save nothing.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load

from fedcommons.errors import CheckpointError
from fedcommons.fileio import write_safetensors

WEIGHTS_PREFIX = "weights/"
STRATEGY_PREFIX = "strategy/"
FORMAT = "fedcommons-checkpoint/1"


def strategy_state(aggregator: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The aggregator's cross-round state as ``(tensors, JSON-able meta)``."""
    hook = getattr(aggregator, "checkpoint_state", None)
    if callable(hook):
        tensors, meta = hook()
        return dict(tensors), dict(meta)
    if not getattr(aggregator, "cross_round_state", False):
        return {}, {}
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {"scalars": {}}
    for attr, value in sorted(vars(aggregator).items()):
        if (
            isinstance(value, dict)
            and value
            and all(isinstance(v, torch.Tensor) for v in value.values())
            and all(v.numel() > 0 for v in value.values())
        ):
            for key, tensor in value.items():
                tensors[f"{attr}/{key}"] = tensor.detach().cpu().contiguous()
        elif attr.startswith("_") and isinstance(value, int | float) and not attr.startswith("__"):
            meta["scalars"][attr] = value
    return tensors, meta


def restore_strategy_state(
    aggregator: Any, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]
) -> None:
    """Put :func:`strategy_state` back into a freshly created aggregator."""
    hook = getattr(aggregator, "load_checkpoint_state", None)
    if callable(hook):
        hook(dict(tensors), dict(meta))
        return
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        attr, _, key = name.partition("/")
        grouped.setdefault(attr, {})[key] = tensor.clone()
    for attr, value in grouped.items():
        setattr(aggregator, attr, value)
    for attr, value in dict(meta.get("scalars", {})).items():
        setattr(aggregator, attr, value)


def write_checkpoint(
    path: Path,
    weights: Mapping[str, torch.Tensor],
    strategy_tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, Any],
) -> str:
    """Write the checkpoint atomically (mode 0600); return the SHA-256 of its bytes."""
    tensors = {f"{WEIGHTS_PREFIX}{k}": v for k, v in weights.items()}
    tensors.update({f"{STRATEGY_PREFIX}{k}": v for k, v in strategy_tensors.items()})
    try:  # streamed: no model-sized bytes in memory (see fileio.safetensors_parts)
        _, digest, _ = write_safetensors(
            path, tensors, {"format": FORMAT, "meta": json.dumps(dict(metadata))}, mode=0o600
        )
    except OSError as exc:
        raise CheckpointError(f"cannot write checkpoint {path}: {exc}") from exc
    return digest


def read_checkpoint(
    path: Path, sha256: str
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Read a checkpoint, checking its SHA-256; return ``(weights, strategy tensors)``."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise CheckpointError(f"checkpoint {path} of a committed round is missing: {exc}") from exc
    actual = hashlib.sha256(data).hexdigest()
    if actual != sha256:
        raise CheckpointError(
            f"checkpoint {path} does not match its commit (sha256 {actual[:12]}…, "
            f"committed {sha256[:12]}…): refusing to resume from it"
        )
    tensors = st_load(data)
    weights = {
        k.removeprefix(WEIGHTS_PREFIX): v
        for k, v in tensors.items()
        if k.startswith(WEIGHTS_PREFIX)
    }
    strategy = {
        k.removeprefix(STRATEGY_PREFIX): v
        for k, v in tensors.items()
        if k.startswith(STRATEGY_PREFIX)
    }
    return weights, strategy
