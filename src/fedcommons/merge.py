"""Offline merges of released models or checkpoints with the federation's strategies.

The mergekit use case: ``fedcommons merge --strategy fisher A B C -o OUT``. Each input is
a safetensors file or a release in the registry; θ0 is ``--base`` (a file or release),
else the inputs' common parent release, else zeros (a merge of absolute weights: fine
for ``fedavg`` and ``fisher``, which then average parameters; sign election and trimming
are meant for deltas from a shared base). Each model becomes one
:class:`~fedcommons.wire.update.ClientUpdate` with Δᵢ = θᵢ − θ0, so the aggregators are
exactly the ones a round uses.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fedcommons.errors import FedcommonsError, MergeError, RegistryError
from fedcommons.fileio import atomic_write
from fedcommons.strategies import Aggregator, guarded_finalize, guarded_fold
from fedcommons.wire.update import ClientUpdate, all_finite

Weights = dict[str, torch.Tensor]


@dataclass
class Checkpoint:
    """One merge input (or base): its weights and where they came from."""

    ref: str
    weights: Weights
    sha256: str
    parent: str | None = None  # "name@version" of the parent release, if a release


def load_checkpoint(ref: str, registry: Path | None = None, line: str | None = None) -> Checkpoint:
    """Load ``ref``: a ``.safetensors`` path, or a release ``VERSION`` / ``NAME@VERSION``.

    Raises :class:`MergeError` naming ``ref`` when it is neither.
    """
    path = Path(ref).expanduser()
    if path.is_file():
        data = path.read_bytes()
        try:
            weights = st_load(data)
        except (SafetensorError, Exception) as exc:
            raise MergeError(f"{ref}: not a readable safetensors file ({exc})") from exc
        return Checkpoint(ref, dict(weights), hashlib.sha256(data).hexdigest())
    if registry is None:
        raise MergeError(f"{ref}: no such file (and no --registry to look it up as a release)")
    from fedcommons.releases.registry import Registry

    name, _, version = ref.rpartition("@")
    try:
        reg = Registry(registry, create=False)
        release = reg.get(version, name=name or line)
        weights = reg.load_weights(release)
    except RegistryError as exc:
        raise MergeError(f"{ref}: not a file and not a release: {exc}") from exc
    parent = f"{release.name}@{release.parent_version}" if release.parent_version else None
    return Checkpoint(f"{release.name}@{release.version}", weights, release.weights_sha256, parent)


def check_compatible(checkpoints: Sequence[Checkpoint]) -> None:
    """Raise :class:`MergeError` unless every checkpoint has the same names and shapes."""
    first = checkpoints[0]
    shapes = {k: tuple(v.shape) for k, v in first.weights.items()}
    for cp in checkpoints[1:]:
        other = {k: tuple(v.shape) for k, v in cp.weights.items()}
        if other != shapes:
            missing = sorted(set(shapes) - set(other))[:3]
            extra = sorted(set(other) - set(shapes))[:3]
            differ = sorted(k for k in set(shapes) & set(other) if shapes[k] != other[k])[:3]
            raise MergeError(
                f"{cp.ref} does not fit {first.ref}: missing {missing}, unexpected {extra}, "
                f"different shapes {differ}"
            )
        for k, v in cp.weights.items():
            if not v.dtype.is_floating_point:
                raise MergeError(f"{cp.ref}: tensor {k} has dtype {v.dtype}, not floating point")
            if not all_finite(v):
                raise MergeError(f"{cp.ref}: tensor {k} contains NaN or Inf")


def merge_weights(
    strategy: Aggregator,
    models: Sequence[Mapping[str, torch.Tensor]],
    base: Mapping[str, torch.Tensor],
    *,
    fishers: Sequence[Mapping[str, torch.Tensor]] | None = None,
    weights: Sequence[float] | None = None,
    num_examples: Sequence[int] | None = None,
) -> Weights:
    """θ0 + Δ* where Δ* is ``strategy`` folded over Δᵢ = θᵢ − θ0 (one update per model).

    ``weights`` sets λᵢ (else ``num_examples``, else 1 each); ``fishers`` are the models'
    diagonal Fishers (needed by Fisher-weighted strategies).
    """
    if strategy.needs_fisher and fishers is None:
        raise MergeError(f"strategy {strategy.name!r} needs a Fisher per model: name a data set")
    for seq, what in ((fishers, "fishers"), (weights, "weights"), (num_examples, "example counts")):
        if seq is not None and len(seq) != len(models):
            raise MergeError(f"{len(seq)} {what} for {len(models)} models")
    if weights is not None and any(not (w >= 0) for w in weights):
        raise MergeError(f"merge weights must be >= 0, got {list(weights)}")
    strategy.begin(base)
    for i, model in enumerate(models):
        update = ClientUpdate(
            delta={k: (model[k].to(base[k].dtype) - base[k]) for k in base},
            num_examples=int(num_examples[i]) if num_examples is not None else 1,
            node_id=i,
            fisher=dict(fishers[i]) if fishers is not None else None,
            weight=float(weights[i]) if weights is not None else None,
        )
        guarded_fold(strategy, update)
    step = guarded_finalize(strategy, base)
    return {k: base[k] + step[k] for k in base}


def save_weights(
    path: Path, weights: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]
) -> str:
    """Write ``weights`` as safetensors with string ``metadata``, atomically; return SHA-256."""
    data = st_save(
        {k: v.detach().cpu().contiguous() for k, v in weights.items()},
        metadata={k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()},
    )
    atomic_write(path, data, mode=0o644)
    return hashlib.sha256(data).hexdigest()


def parse_data_ref(text: str) -> tuple[str, dict[str, Any]]:
    """Parse ``TASK`` or ``TASK,key=value,...`` into the task ref and its options."""
    ref, *pairs = [p.strip() for p in text.split(",") if p.strip()]
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep:
            raise MergeError(f"data set {text!r}: {pair!r} is not key=value")
        try:
            options[key] = json.loads(raw)
        except json.JSONDecodeError:
            options[key] = raw
    return ref, options


def fisher_for(
    task_text: str,
    weights: Mapping[str, torch.Tensor],
    common_options: Mapping[str, Any],
    *,
    num_samples: int,
    seed: int,
) -> Weights:
    """Diagonal Fisher of ``weights`` on the data set ``task_text`` names."""
    from fedcommons.client_sdk.fisher import estimate_fisher
    from fedcommons.tasks import load_task

    ref, options = parse_data_ref(task_text)
    task = load_task(ref, {**common_options, **options})
    try:
        return estimate_fisher(task, weights, num_samples=num_samples, seed=seed)
    except RuntimeError as exc:  # load_state_dict: the task's model does not fit
        raise MergeError(
            f"data set {task_text!r}: its model does not fit the weights: {exc}"
        ) from exc


__all__ = [
    "Checkpoint",
    "FedcommonsError",
    "check_compatible",
    "fisher_for",
    "load_checkpoint",
    "merge_weights",
    "parse_data_ref",
    "save_weights",
]
