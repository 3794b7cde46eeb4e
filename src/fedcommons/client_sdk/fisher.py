"""Diagonal Fisher information of a classifier, as the Fisher-weighted merge defines it.

Fⱼ = (1/N) Σₓ Σ_y p_θ(y|x) (∂ log p_θ(y|x) / ∂θⱼ)², evaluated at the client's final
weights on N = min(|D|, 256) of its own examples: the exact expectation over the
model's predicted label distribution (not the empirical Fisher, which uses the true
labels). With more than 100 classes the inner sum is estimated by one y ~ p_θ(·|x) per
example. Per-example gradients come from ``torch.func`` (``vmap`` over ``grad``), in
chunks, so memory is O(chunk × model) and the cost is C vectorised backward passes.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from fedcommons.errors import ConfigError
from fedcommons.tasks.base import Task

DEFAULT_SAMPLES = 256
EXACT_MAX_CLASSES = 100


def diagonal_fisher(
    model: nn.Module,
    inputs: torch.Tensor,
    *,
    exact_max_classes: int = EXACT_MAX_CLASSES,
    chunk: int | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Diagonal Fisher of ``model`` (logits out) on ``inputs``, keyed like its state_dict.

    ``chunk`` examples share one vectorised backward pass (default: as many as fit in
    about 64 MiB of per-example gradients, at most 256). Only trainable parameters get a
    Fisher: frozen ones (a pinned pretrained base under a LoRA patch) are constants here,
    so the Fisher of a patch is over the patch's own parameters. Entries of the state
    dict that are not trainable parameters (buffers) get zeros. Raises
    :class:`ConfigError` if the model does not return ``(batch, classes)`` logits.
    """
    was_training = model.training
    model.eval()
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    buffers.update({k: v.detach() for k, v in model.named_parameters() if not v.requires_grad})
    fisher = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in params.items()}
    if chunk is None:
        numel = max(1, sum(v.numel() for v in params.values()))
        chunk = int(min(256, max(1, (16 * 2**20) // numel)))

    def log_prob(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, (p, buffers), (x.unsqueeze(0),))
        return torch.log_softmax(logits, dim=-1)[0].gather(0, y.reshape(1)).squeeze(0)

    per_example_grad = vmap(grad(log_prob), in_dims=(None, 0, 0))
    total = 0
    try:
        for start in range(0, len(inputs), chunk):
            x = inputs[start : start + chunk]
            with torch.no_grad():
                logits = functional_call(model, (params, buffers), (x,))
            if logits.dim() != 2:
                raise ConfigError(
                    "Fisher needs (batch, classes) logits; the model returned "
                    f"{tuple(logits.shape)}"
                )
            probs = torch.softmax(logits.double(), dim=-1)
            num_classes = probs.shape[1]
            if num_classes <= exact_max_classes:
                for c in range(num_classes):
                    y = torch.full((len(x),), c, dtype=torch.long, device=x.device)
                    grads = per_example_grad(params, x, y)
                    w = probs[:, c].to(torch.float32)
                    for k, g in grads.items():
                        fisher[k] += torch.einsum("b,b...->...", w, g.pow(2)).cpu()
            else:
                y = torch.multinomial(probs, 1, generator=generator).squeeze(1)
                grads = per_example_grad(params, x, y.to(x.device))
                for k, g in grads.items():
                    fisher[k] += g.pow(2).sum(0).cpu()
            total += len(x)
    finally:
        model.train(was_training)
    if total == 0:
        raise ConfigError("Fisher needs at least one example")
    state = model.state_dict()
    return {
        k: (fisher[k] / total) if k in fisher else torch.zeros(v.shape, dtype=torch.float32)
        for k, v in state.items()
    }


def fisher_inputs(task: Task, num_samples: int, seed: int) -> torch.Tensor:
    """N = min(|D|, ``num_samples``) inputs from the task's training data (seeded order).

    One batch of N: a task's collate may shape each batch its own way (text tasks trim
    padding per batch), so batches are not concatenated.
    """
    loader = task.train_loader(batch_size=num_samples, seed=seed)
    for batch in loader:
        return batch[0] if isinstance(batch, list | tuple) else batch
    raise ConfigError(f"task {task.name!r} has no training examples for the Fisher")


def estimate_fisher(
    task: Task,
    weights: Mapping[str, torch.Tensor],
    *,
    num_samples: int = DEFAULT_SAMPLES,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Diagonal Fisher of ``task``'s model at ``weights`` on its own training data."""
    if num_samples < 1:
        raise ConfigError(f"fisher-samples must be >= 1, got {num_samples}")
    device = task.device()
    model = task.build_model()
    model.load_state_dict(dict(weights), strict=True)
    model.to(device)
    inputs = fisher_inputs(task, num_samples, seed).to(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    return diagonal_fisher(
        model, inputs, generator=gen, chunk=getattr(task, "per_example_chunk", None)
    )
