"""Deterministic partitioners that split one labelled data set among N institutions."""

from __future__ import annotations

import numpy as np

from fedcommons.errors import ConfigError


def iid_partition(num_examples: int, num_partitions: int, seed: int) -> list[np.ndarray]:
    """Shuffle ``range(num_examples)`` with ``seed`` and cut it into near-equal parts."""
    _check_counts(num_examples, num_partitions)
    order = np.random.default_rng(seed).permutation(num_examples)
    return [np.sort(part) for part in np.array_split(order, num_partitions)]


def dirichlet_partition(
    labels: np.ndarray,
    num_partitions: int,
    alpha: float,
    seed: int,
    min_size: int | None = None,
    max_draws: int = 100,
) -> list[np.ndarray]:
    """Label-skewed split: each class is divided among partitions by ``Dir(alpha)``.

    Small ``alpha`` gives each institution few classes (strongly non-IID); large ``alpha``
    approaches IID. Draws are repeated (at most ``max_draws`` times) until every partition
    holds at least ``min_size`` examples (default ``min(10, n // num_partitions)``); if no
    draw does, the last one is repaired by moving examples from the largest partitions,
    so the result is always usable and always the same for the same inputs.
    """
    labels = np.asarray(labels)
    _check_counts(len(labels), num_partitions)
    if not alpha > 0:
        raise ConfigError(f"Dirichlet alpha must be > 0, got {alpha}")
    if min_size is None:
        min_size = min(10, len(labels) // num_partitions)
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    by_class = [np.flatnonzero(labels == c) for c in classes]
    parts: list[list[int]] = []
    for _ in range(max_draws):
        parts = [[] for _ in range(num_partitions)]
        for idx in by_class:
            idx = rng.permutation(idx)
            shares = rng.dirichlet(np.full(num_partitions, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for part, chunk in zip(parts, np.split(idx, cuts), strict=True):
                part.extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            break
    else:
        _repair(parts, min_size)
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def _repair(parts: list[list[int]], min_size: int) -> None:
    for part in parts:
        while len(part) < min_size:
            donor = max(parts, key=len)
            part.append(donor.pop())


def _check_counts(num_examples: int, num_partitions: int) -> None:
    if num_partitions < 1:
        raise ConfigError(f"number of institutions must be >= 1, got {num_partitions}")
    if num_partitions > num_examples:
        raise ConfigError(
            f"{num_partitions} institutions but only {num_examples} training examples: "
            "every institution needs at least one example"
        )
