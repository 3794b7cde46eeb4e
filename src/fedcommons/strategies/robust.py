"""Robust aggregation: coordinate-wise median, trimmed mean, Multi-Krum (plus norm bounding).

Norm bounding is the ``clip_norm`` parameter every built-in strategy takes: each Δᵢ is
scaled to L2 norm ≤ C before it is folded (streaming, no extra state).

The median, the trimmed mean and Multi-Krum need every update of the round at once: they buffer
the deltas (K × model memory for K clients, ``streaming = False``) and compute the
statistic per tensor at :meth:`finalize`. Both are unweighted (each client counts once,
whatever its nᵢ) and ignore masks: over sparse (top-k) updates most coordinates are zero
for most clients, so their median is 0 — do not combine them with sparsifying
compression.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Mapping
from typing import Any

import torch

from fedcommons.errors import ConfigError, RoundFailedError
from fedcommons.strategies.base import Aggregator, check_clip_norm, check_server_lr, clip_update
from fedcommons.wire.update import ClientUpdate


class BufferedAggregator(Aggregator):
    """Base of rules that need every update: keeps a copy of each folded update.

    Subclasses implement :meth:`combine`. Memory is O(K × model): declared by
    ``streaming = False`` and reported by ``strategies list``.
    """

    streaming = False

    def __init__(self, clip_norm: float | None = None) -> None:
        super().__init__()
        self.clip_norm = check_clip_norm(getattr(self, "name", "strategy"), clip_norm)
        self._updates: list[ClientUpdate] = []
        self._base: dict[str, torch.Tensor] = {}

    def begin(self, base: Mapping[str, torch.Tensor]) -> None:
        """Forget the previous round's updates."""
        self._updates = []
        self._base = {k: v.detach() for k, v in base.items()}
        self.num_folded = 0

    def fold(self, update: ClientUpdate) -> None:
        """Keep a private copy of the (clipped) update."""
        update = clip_update(update, self.clip_norm)
        self._updates.append(
            ClientUpdate(
                delta={k: v.detach().clone() for k, v in update.delta.items()},
                num_examples=update.num_examples,
                node_id=update.node_id,
                metrics=dict(update.metrics),
                mask=None
                if update.mask is None
                else {k: v.clone() for k, v in update.mask.items()},
                fisher=None
                if update.fisher is None
                else {k: v.clone() for k, v in update.fisher.items()},
                weight=update.weight,
            )
        )
        self.num_folded += 1

    def finalize(self) -> dict[str, torch.Tensor]:
        """Combine the buffered updates, then free them."""
        if not self._updates:
            raise RoundFailedError(f"{self.name}: no update was folded in this round")
        try:
            return self.combine(self._updates, self._base)
        finally:
            self._updates = []

    @abstractmethod
    def combine(
        self, updates: list[ClientUpdate], base: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Return Δ* from all of the round's updates."""


class _Coordinatewise(BufferedAggregator):
    def __init__(self, server_lr: float = 1.0, clip_norm: float | None = None) -> None:
        super().__init__(clip_norm=clip_norm)
        self.server_lr = check_server_lr(self.name, server_lr)

    @abstractmethod
    def statistic(self, stacked: torch.Tensor) -> torch.Tensor:
        """The coordinate-wise statistic over the stacked updates (dim 0: clients)."""

    def combine(
        self, updates: list[ClientUpdate], base: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for name, ref in base.items():
            stacked = torch.stack([u.delta[name].to(torch.float32) for u in updates])
            out[name] = (self.statistic(stacked) * self.server_lr).to(ref.dtype)
        return out


class Median(_Coordinatewise):
    """Coordinate-wise median of the deltas (mean of the two middle values for even K)."""

    name = "median"
    reference = "Yin et al. 2018, Byzantine-Robust Distributed Learning (ICML)"
    description = "coordinate-wise median (buffers all updates; unweighted; dense only)"

    def params(self) -> dict[str, Any]:
        """Return ηs and the clip norm."""
        return {"server_lr": self.server_lr, "clip_norm": self.clip_norm}

    def statistic(self, stacked: torch.Tensor) -> torch.Tensor:
        """Median along the client axis."""
        k = stacked.shape[0]
        ordered = stacked.sort(dim=0).values
        if k % 2:
            return ordered[k // 2]
        return (ordered[k // 2 - 1] + ordered[k // 2]) / 2


class TrimmedMean(_Coordinatewise):
    """Coordinate-wise β-trimmed mean: drop the ⌊βK⌋ largest and smallest values."""

    name = "trimmed-mean"
    reference = "Yin et al. 2018, Byzantine-Robust Distributed Learning (ICML)"
    description = "coordinate-wise trimmed mean (buffers all updates; unweighted; dense only)"

    def __init__(
        self, beta: float = 0.1, server_lr: float = 1.0, clip_norm: float | None = None
    ) -> None:
        super().__init__(server_lr=server_lr, clip_norm=clip_norm)
        if not 0.0 <= beta < 0.5:
            raise ConfigError(f"trimmed-mean beta must be in [0, 0.5), got {beta}")
        self.beta = float(beta)

    def params(self) -> dict[str, Any]:
        """Return β, ηs and the clip norm."""
        return {"beta": self.beta, "server_lr": self.server_lr, "clip_norm": self.clip_norm}

    def statistic(self, stacked: torch.Tensor) -> torch.Tensor:
        """Mean of the values left after trimming ⌊βK⌋ from each end."""
        k = stacked.shape[0]
        cut = math.floor(self.beta * k)
        ordered = stacked.sort(dim=0).values
        return ordered[cut : k - cut].mean(dim=0)


class MultiKrum(BufferedAggregator):
    """Multi-Krum: the mean of the ``m`` updates closest to their neighbours.

    Each update i gets the Krum score s(i) = Σ ‖Δᵢ − Δⱼ‖² over its K − f − 2 nearest
    other updates (K updates in the round, ``f`` of them assumed Byzantine); the ``m``
    updates with the lowest scores (``m = 0``: K − f) are averaged, unweighted. An
    update far from every other (scaled, sign-flipped, noise) gets a high score and is
    left out. Blanchard et al. prove resilience for K > 2f + 2; with fewer updates the
    neighbour count is clamped to at least one (and ``m`` to at least one), so the rule
    still runs but its guarantee does not hold. ``m = 1`` is Krum.

    Distances come from one K × K Gram matrix accumulated tensor by tensor in float64,
    so the extra memory is one tensor's K stacked copies, not a flat copy of every
    update.
    """

    name = "multi-krum"
    reference = (
        "Blanchard et al. 2017, Machine Learning with Adversaries: Byzantine Tolerant "
        "Gradient Descent (NeurIPS)"
    )
    description = (
        "mean of the m updates with the lowest Krum scores (buffers all updates; "
        "unweighted; dense only)"
    )

    def __init__(
        self, f: int = 1, m: int = 0, server_lr: float = 1.0, clip_norm: float | None = None
    ) -> None:
        super().__init__(clip_norm=clip_norm)
        if isinstance(f, bool) or not isinstance(f, int) or f < 0:
            raise ConfigError(f"multi-krum f must be an integer >= 0, got {f!r}")
        if isinstance(m, bool) or not isinstance(m, int) or m < 0:
            raise ConfigError(f"multi-krum m must be an integer >= 0 (0: K - f), got {m!r}")
        self.f, self.m = f, m
        self.server_lr = check_server_lr(self.name, server_lr)
        #: Node ids the last round averaged (for logs and tests).
        self.selected: list[int] = []

    def params(self) -> dict[str, Any]:
        """Return f, m, ηs and the clip norm."""
        return {"f": self.f, "m": self.m, "server_lr": self.server_lr, "clip_norm": self.clip_norm}

    def scores(self, updates: list[ClientUpdate], base: Mapping[str, torch.Tensor]) -> list[float]:
        """The Krum score of each update (lower: closer to its neighbours)."""
        k = len(updates)
        gram = torch.zeros((k, k), dtype=torch.float64)
        for name in base:
            stacked = torch.stack([u.delta[name].reshape(-1).to(torch.float64) for u in updates])
            gram += stacked @ stacked.T
        sq = gram.diagonal()
        dist = (sq[:, None] + sq[None, :] - 2 * gram).clamp(min=0.0)
        neighbours = min(max(1, k - self.f - 2), k - 1)
        out = []
        for i in range(k):
            others = torch.cat([dist[i, :i], dist[i, i + 1 :]])
            out.append(float(others.sort().values[:neighbours].sum()) if neighbours else 0.0)
        return out

    def combine(
        self, updates: list[ClientUpdate], base: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Average the ``m`` best-scored updates (ties: lower node id first)."""
        k = len(updates)
        scores = self.scores(updates, base)
        keep = min(k, max(1, self.m or k - self.f))
        order = sorted(range(k), key=lambda i: (scores[i], updates[i].node_id))
        chosen = [updates[i] for i in order[:keep]]
        self.selected = sorted(u.node_id for u in chosen)
        out: dict[str, torch.Tensor] = {}
        for name, ref in base.items():
            stacked = torch.stack([u.delta[name].to(torch.float64) for u in chosen])
            out[name] = (stacked.mean(dim=0) * self.server_lr).to(ref.dtype)
        return out
