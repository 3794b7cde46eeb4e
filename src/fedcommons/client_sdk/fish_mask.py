"""FISH fixed sparse masks (Sung, Nair & Raffel 2021).

From "Training Neural Networks with Fixed Sparse Masks" (NeurIPS 2021).

The empirical Fisher information of each parameter is the mean, over N training
examples, of its squared per-example gradient at the base weights,
``F̂_θ = (1/N) Σ_i (∂ℓ(x_i, y_i)/∂θ)²``; the mask keeps the ``density`` fraction of
parameters with the largest ``F̂`` over the whole model (global top-k). Per-example
gradients come from ``torch.func`` (``vmap`` over ``grad``), one batch at a time.

The client computes the mask once, at the base weights of the first round it joins, on
its own private examples, and keeps it fixed for the run (see
:mod:`fedcommons.client_sdk.compression`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import torch
from torch.func import functional_call, grad, vmap

from fedcommons.errors import EncodingError
from fedcommons.tasks.base import Task
from fedcommons.wire.codec import topk_indices


def empirical_fisher(
    task: Task,
    base: Mapping[str, torch.Tensor],
    num_examples: int,
    *,
    seed: int = 0,
    batch_size: int = 64,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> dict[str, torch.Tensor]:
    """Mean squared per-example gradient of ``task.loss`` at ``base``, per parameter.

    Uses the first ``num_examples`` examples of ``loader``, by default the site's
    (seed-shuffled) training loader, ``batch_size`` examples per vectorised pass — fewer
    for large models (about 64 MiB of per-example gradients per pass), and at most the
    task's ``per_example_chunk`` when it sets one (transformer activations). Returns
    float32 tensors for every trainable parameter; buffers (e.g. batch norm statistics)
    get no entry.
    """
    device = task.device()
    model = task.build_model()
    model.load_state_dict(dict(base), strict=True)
    model.to(device).eval()
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    buffers.update({k: v.detach() for k, v in model.named_parameters() if not v.requires_grad})

    def example_loss(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, (p, buffers), (x.unsqueeze(0),))
        return task.loss(out, y.unsqueeze(0))

    per_example_grads = vmap(grad(example_loss), in_dims=(None, 0, 0))
    numel = max(1, sum(v.numel() for v in params.values()))
    batch_size = max(1, min(batch_size, (16 * 2**20) // numel))
    batch_size = min(batch_size, getattr(task, "per_example_chunk", None) or batch_size)
    fisher = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in params.items()}
    seen = 0
    if loader is None:
        loader = task.train_loader(batch_size=batch_size, seed=seed)
    for batch_inputs, batch_targets in loader:
        for inputs, targets in zip(
            batch_inputs.split(batch_size), batch_targets.split(batch_size), strict=True
        ):
            take = min(len(targets), num_examples - seen)
            if take <= 0:
                break
            x, y = inputs[:take].to(device), targets[:take].to(device)
            for name, g in per_example_grads(params, x, y).items():
                fisher[name] += g.detach().float().pow(2).sum(dim=0)
            seen += take
        if seen >= num_examples:
            break
    if seen == 0:
        raise EncodingError("FISH mask: the loader yielded no examples")
    return {k: (v / seen).cpu() for k, v in fisher.items()}


def fish_mask(
    task: Task,
    base: Mapping[str, torch.Tensor],
    density: float,
    num_examples: int,
    *,
    seed: int = 0,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> np.ndarray:
    """The flat boolean FISH mask over ``base``'s tensors (in ``base``'s order).

    Keeps the ``density`` fraction of parameters with the largest empirical Fisher (global
    top-k over every parameter). Floating buffers, which have no Fisher, are always kept:
    they are few and their deltas (e.g. running statistics) are not gradient steps.
    """
    fisher = empirical_fisher(task, base, num_examples, seed=seed, loader=loader)
    param_sizes = sum(v.numel() for v in fisher.values())
    k = min(param_sizes, max(1, round(density * param_sizes)))
    scores = []
    for name, value in base.items():
        if name in fisher:
            scores.append(fisher[name].reshape(-1).numpy())
        else:  # buffers: always in the mask
            scores.append(np.full(value.numel(), np.inf, dtype=np.float32))
    flat = np.concatenate(scores) if scores else np.zeros(0, dtype=np.float32)
    n_buffers = int(np.isinf(flat).sum())
    mask = np.zeros(flat.size, dtype=bool)
    mask[topk_indices(flat, k + n_buffers)] = True
    return mask
