"""Local training from base weights to a delta."""

from __future__ import annotations

import time
from collections import Counter
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

    Memory stays near two copies of the model besides ``base``: the model and its
    gradients, which are dropped before the delta is taken; the delta is computed in the
    trained parameters' own storage.
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
    del optimizer, masks
    model.zero_grad(set_to_none=True)  # gradients: one model's worth, no longer needed
    delta = _delta_in_place(model.state_dict(), base)
    del model
    num_examples = len(loader.dataset)  # type: ignore[arg-type]
    return LocalResult(
        delta=delta,
        num_examples=num_examples,
        loss=loss_sum / max(seen, 1),
        accuracy=correct / max(seen, 1),
        seconds=time.perf_counter() - started,
    )


def _delta_in_place(
    trained: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """θ − θ0 on the CPU in ``base``'s dtypes, mostly written into the trained storage.

    ``trained`` is the state dict of a model nobody uses again. A CPU tensor of
    ``base``'s dtype whose storage no other entry shares becomes its own delta in place;
    the others (tied weights, another device or dtype) are computed into fresh tensors
    first, while every storage still holds the trained values.
    """
    values = {k: trained[k].detach() for k in base}
    owners = Counter(v.untyped_storage().data_ptr() for v in values.values())
    in_place = {
        k
        for k, v in values.items()
        if v.device.type == "cpu"
        and v.dtype == base[k].dtype
        and owners[v.untyped_storage().data_ptr()] == 1
    }
    delta = {
        k: (v.cpu() - base[k].cpu()).to(base[k].dtype)
        for k, v in values.items()
        if k not in in_place
    }
    for k in in_place:
        delta[k] = values[k].sub_(base[k])
    return {k: delta[k] for k in base}


def _param_masks(
    model: torch.nn.Module, grad_mask: Mapping[str, torch.Tensor]
) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
    """Each masked parameter with its mask, moved to its device and dtype once (not per step)."""
    return [
        (param, grad_mask[name].to(param.device, param.dtype))
        for name, param in model.named_parameters()
        if name in grad_mask
    ]
