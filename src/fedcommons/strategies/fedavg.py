"""Federated averaging over deltas, streamed (McMahan et al., 2017)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from fedcommons.errors import ConfigError, RoundFailedError
from fedcommons.strategies.base import Aggregator
from fedcommons.wire.update import ClientUpdate


class FedAvg(Aggregator):
    """Δ* = ηs · Σ nᵢ Δᵢ / Σ nᵢ, folded one update at a time.

    The running sum is kept in float64, so the result does not depend on the order in
    which replies arrive (to the float32 precision of the output) and memory is one
    float64 copy of the model, whatever the number of clients.
    """

    name = "fedavg"
    reference = "McMahan et al. 2017, Communication-Efficient Learning of Deep Networks"

    def __init__(self, server_lr: float = 1.0) -> None:
        super().__init__()
        if not server_lr > 0:
            raise ConfigError(f"fedavg server_lr must be > 0, got {server_lr}")
        self.server_lr = float(server_lr)
        self._sum: dict[str, torch.Tensor] = {}
        self._dtypes: dict[str, torch.dtype] = {}
        self._weight = 0.0

    def params(self) -> dict[str, Any]:
        """Return ``{"server_lr": ηs}``."""
        return {"server_lr": self.server_lr}

    def begin(self, base: Mapping[str, torch.Tensor]) -> None:
        """Allocate zeroed float64 accumulators shaped like θ0."""
        self._sum = {
            k: torch.zeros(v.shape, dtype=torch.float64, device=v.device) for k, v in base.items()
        }
        self._dtypes = {k: v.dtype for k, v in base.items()}
        self._weight = 0.0
        self.num_folded = 0

    def fold(self, update: ClientUpdate) -> None:
        """Add nᵢ Δᵢ to the running sum."""
        n = float(update.num_examples)
        for name, acc in self._sum.items():
            acc.add_(update.delta[name].to(device=acc.device, dtype=torch.float64), alpha=n)
        self._weight += n
        self.num_folded += 1

    def finalize(self) -> dict[str, torch.Tensor]:
        """Return ηs times the weighted mean delta."""
        if self._weight <= 0:
            raise RoundFailedError("fedavg: no update was folded in this round")
        scale = self.server_lr / self._weight
        return {k: (acc * scale).to(self._dtypes[k]) for k, acc in self._sum.items()}
