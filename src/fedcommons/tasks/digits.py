"""Built-in ``digits`` task: scikit-learn's bundled 8×8 digits, split among N institutions.

- A fixed stratified split (60 % train / 20 % validation / 20 % test, seed
  :data:`SPLIT_SEED`) that no run option changes, so every release line is scored on the
  same validation and test examples.
- The training split is divided among ``num-partitions`` institutions by a deterministic
  partitioner: Dirichlet label skew with ``alpha`` (default) or ``partition = "iid"``.
- An MLP ``64 → hidden… → 10`` (``hidden = "64"`` gives the 4,810-parameter demo model).

Options (flat, as in Flower's run/node config): ``partition-id``, ``num-partitions``,
``partition`` (``dirichlet`` | ``iid``), ``alpha``, ``seed``, ``hidden``, ``device``.
Same options, same split, same partition, same initial weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedcommons.errors import ConfigError
from fedcommons.tasks.base import Task, TaskOptions
from fedcommons.tasks.partition import dirichlet_partition, iid_partition

SPLIT_SEED = 1797
NUM_FEATURES = 64
NUM_CLASSES = 10


@dataclass(frozen=True)
class DigitsSplit:
    """The fixed train/validation/test split as float32 features and int64 labels."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


@cache
def digits_split() -> DigitsSplit:
    """Load digits once per process and split it (stratified, :data:`SPLIT_SEED`)."""
    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    y = data.target.astype(np.int64)
    x_train, x_rest, y_train, y_rest = train_test_split(
        x, y, test_size=0.4, stratify=y, random_state=SPLIT_SEED
    )
    x_val, x_test, y_val, y_test = train_test_split(
        x_rest, y_rest, test_size=0.5, stratify=y_rest, random_state=SPLIT_SEED
    )
    return DigitsSplit(x_train, y_train, x_val, y_val, x_test, y_test)


def parse_hidden(value: Any) -> tuple[int, ...]:
    """Parse ``"256,128"`` (or an int, or a list) into layer widths."""
    if isinstance(value, int):
        widths: tuple[int, ...] = (value,)
    elif isinstance(value, str):
        try:
            widths = tuple(int(v) for v in value.replace(" ", "").split(",") if v)
        except ValueError as exc:
            raise ConfigError(f"hidden must be comma-separated integers, got {value!r}") from exc
    else:
        widths = tuple(int(v) for v in value)
    if any(w < 1 for w in widths):
        raise ConfigError(f"hidden layer widths must be >= 1, got {value!r}")
    return widths


class MLP(nn.Module):
    """A plain ReLU multilayer perceptron."""

    def __init__(self, in_features: int, hidden: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return class logits."""
        return self.net(x)


class DigitsTask(Task):
    """scikit-learn digits split among institutions, classified by an MLP."""

    name = "digits"

    def __init__(self, options: TaskOptions | None = None) -> None:
        super().__init__(options)
        opts = self.options
        self.num_partitions = int(opts.get("num-partitions", 10))
        self.partition_id = opts.get("partition-id")
        self.partitioning = str(opts.get("partition", "dirichlet"))
        self.alpha = float(opts.get("alpha", 0.5))
        self.seed = int(opts.get("seed", 0))
        self.hidden = parse_hidden(opts.get("hidden", "64"))
        n_train = len(digits_split().y_train)
        if self.partitioning not in {"dirichlet", "iid"}:
            raise ConfigError(f"partition must be 'dirichlet' or 'iid', got {self.partitioning!r}")
        if self.partitioning == "dirichlet" and not self.alpha > 0:
            raise ConfigError(f"Dirichlet alpha must be > 0, got {self.alpha}")
        if self.num_partitions < 1:
            raise ConfigError(f"num-partitions must be >= 1, got {self.num_partitions}")
        if self.num_partitions > n_train:
            raise ConfigError(
                f"{self.num_partitions} institutions but only {n_train} digits training "
                "examples: every institution needs at least one example"
            )
        if self.partition_id is not None:
            self.partition_id = int(self.partition_id)
            if not 0 <= self.partition_id < self.num_partitions:
                raise ConfigError(
                    f"partition-id {self.partition_id} outside [0, {self.num_partitions})"
                )

    def build_model(self) -> nn.Module:
        """MLP initialised from the task seed (same seed, same initial weights)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return MLP(NUM_FEATURES, self.hidden, NUM_CLASSES)

    def partitions(self) -> list[np.ndarray]:
        """Indices into the training split, one array per institution."""
        return _partitions(self.partitioning, self.num_partitions, self.alpha, self.seed)

    def partition_indices(self) -> np.ndarray:
        """This institution's indices (all training data when no ``partition-id``)."""
        if self.partition_id is None:
            return np.arange(len(digits_split().y_train))
        return self.partitions()[self.partition_id]

    def train_loader(self, batch_size: int, seed: int) -> DataLoader:
        """Shuffled loader over this institution's partition."""
        split = digits_split()
        idx = self.partition_indices()
        dataset = TensorDataset(
            torch.from_numpy(split.x_train[idx]), torch.from_numpy(split.y_train[idx])
        )
        generator = torch.Generator().manual_seed(seed)
        return DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator)

    def num_train_examples(self) -> int:
        """Size of this institution's partition."""
        return len(self.partition_indices())

    def validation_loader(self) -> DataLoader:
        """The fixed validation split (the built-in validation suite)."""
        split = digits_split()
        return _loader(split.x_val, split.y_val)

    def test_loader(self) -> DataLoader:
        """The fixed test split."""
        split = digits_split()
        return _loader(split.x_test, split.y_test)


@cache
def _partitions(kind: str, num_partitions: int, alpha: float, seed: int) -> list[np.ndarray]:
    labels = digits_split().y_train
    if kind == "iid":
        return iid_partition(len(labels), num_partitions, seed)
    return dirichlet_partition(labels, num_partitions, alpha, seed)


def _loader(x: np.ndarray, y: np.ndarray) -> DataLoader:
    return DataLoader(TensorDataset(torch.from_numpy(x), torch.from_numpy(y)), batch_size=512)
