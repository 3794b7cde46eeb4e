"""The ``Task`` interface an institution implements to plug in its model and data."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from fedcommons.errors import ConfigError

#: Task options as they travel in Flower's run/node config: flat scalar values.
TaskOptions = Mapping[str, Any]


def select_device(preferred: str | None = None) -> torch.device:
    """Return ``preferred`` if given, else CUDA when available, else CPU."""
    if preferred:
        device = torch.device(preferred)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {preferred!r} requested but CUDA is not available")
        return device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Task(ABC):
    """A model architecture plus the data one site holds for it.

    Subclass it in your own package and point the client at it with
    ``task = "my_pkg.my_module:MyTask"``. The constructor receives the merged options of
    the run config and the site's node config (node config wins), so one class serves
    every institution: each reads its private data from wherever its options say.

    Required: :meth:`build_model` and :meth:`train_loader`. Override the rest as needed.
    The coordinator calls :meth:`validation_loader` / :meth:`test_loader` on its own copy
    of the task to score candidates; an institution's copy may leave them empty.
    """

    #: Short name shown in logs and manifests.
    name: str = "task"

    def __init__(self, options: TaskOptions | None = None) -> None:
        self.options: dict[str, Any] = dict(options or {})

    # -- model --------------------------------------------------------------------
    @abstractmethod
    def build_model(self) -> nn.Module:
        """Return a freshly initialised model (deterministic for the task's seed)."""

    # -- data ---------------------------------------------------------------------
    @abstractmethod
    def train_loader(self, batch_size: int, seed: int) -> DataLoader:
        """Return a loader over this site's private training partition.

        ``seed`` fixes the shuffling order so that a round can be replayed.
        """

    def num_train_examples(self) -> int:
        """Number of examples in this site's training partition (the FedAvg weight)."""
        return len(self.train_loader(batch_size=1, seed=0).dataset)  # type: ignore[arg-type]

    def validation_loader(self) -> DataLoader | None:
        """Loader the coordinator scores every round's candidate on (``None``: skip)."""
        return None

    def test_loader(self) -> DataLoader | None:
        """Held-out loader scored once on the final candidate (``None``: skip)."""
        return None

    # -- optimisation -------------------------------------------------------------
    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Training loss; cross entropy by default."""
        return nn.functional.cross_entropy(outputs, targets)

    def optimizer(self, params: Any, lr: float) -> torch.optim.Optimizer:
        """Local optimiser; SGD with momentum by default."""
        return torch.optim.SGD(params, lr=lr, momentum=0.9)

    def device(self) -> torch.device:
        """Device to train and evaluate on: option ``device``, else CUDA, else CPU."""
        return select_device(self.options.get("device"))

    # -- evaluation ---------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: DataLoader) -> dict[str, float]:
        """Return ``loss`` and ``accuracy`` of ``model`` on ``loader`` (classification)."""
        device = next(model.parameters()).device
        model.eval()
        total, correct, loss_sum = 0, 0, 0.0
        for inputs, targets in loader:
            inputs, targets = inputs.to(device), targets.to(device)
            outputs = model(inputs)
            loss_sum += float(self.loss(outputs, targets)) * len(targets)
            correct += int((outputs.argmax(dim=1) == targets).sum())
            total += len(targets)
        if total == 0:
            return {"loss": float("nan"), "accuracy": float("nan"), "examples": 0.0}
        return {"loss": loss_sum / total, "accuracy": correct / total, "examples": float(total)}
