"""Local training from base weights to a delta."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from fedcommons.tasks.base import Task


@dataclass
class LocalResult:
    """Outcome of one local training job."""

    delta: dict[str, torch.Tensor]
    num_examples: int
    loss: float
    accuracy: float
    seconds: float


def train_local(
    task: Task,
    base: Mapping[str, torch.Tensor],
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    grad_mask: Mapping[str, torch.Tensor] | None = None,
) -> LocalResult:
    """Train ``task``'s model from ``base`` on the site's partition; return θ − θ0.

    Deterministic for a given ``seed`` on a given device. The delta is returned on the
    CPU in the base weights' dtypes. ``grad_mask`` (parameter name -> 0/1 tensor) trains
    only the masked parameters, as FISH does (gradients are multiplied by the mask).
    """
    started = time.perf_counter()
    device = task.device()
    model = task.build_model()
    model.load_state_dict(base, strict=True)
    model.to(device).train()
    loader = task.train_loader(batch_size=batch_size, seed=seed)
    optimizer = task.optimizer(model.parameters(), lr)
    masks = _param_masks(model, grad_mask or {})
    loss_sum, correct, seen = 0.0, 0, 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in range(epochs):
            for inputs, targets in loader:
                inputs, targets = inputs.to(device), targets.to(device)
                optimizer.zero_grad(set_to_none=True)
                outputs = model(inputs)
                loss = task.loss(outputs, targets)
                loss.backward()
                for param, mask in masks:
                    if param.grad is not None:
                        param.grad.mul_(mask)
                optimizer.step()
                loss_sum += float(loss.detach()) * len(targets)
                correct += int((outputs.detach().argmax(dim=1) == targets).sum())
                seen += len(targets)
    trained = model.state_dict()
    delta = {k: (trained[k].detach().cpu() - v.cpu()).to(v.dtype) for k, v in base.items()}
    num_examples = len(loader.dataset)  # type: ignore[arg-type]
    return LocalResult(
        delta=delta,
        num_examples=num_examples,
        loss=loss_sum / max(seen, 1),
        accuracy=correct / max(seen, 1),
        seconds=time.perf_counter() - started,
    )


def _param_masks(
    model: torch.nn.Module, grad_mask: Mapping[str, torch.Tensor]
) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
    """Each masked parameter with its mask, moved to its device and dtype once (not per step)."""
    return [
        (param, grad_mask[name].to(param.device, param.dtype))
        for name, param in model.named_parameters()
        if name in grad_mask
    ]
