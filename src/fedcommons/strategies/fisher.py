"""Fisher-weighted merge (Matena & Raffel 2022), streamed with two accumulators.

Δ*ⱼ = Σᵢ λᵢ F̃ᵢⱼ Δᵢⱼ / Σᵢ λᵢ F̃ᵢⱼ with F̃ᵢ = max(Fᵢ / ‖Fᵢ‖₂, ε) inside client i's mask
and 0 outside, λᵢ = nᵢ / Σn (or uniform). ‖Fᵢ‖₂ is the L2 norm of the whole diagonal
Fisher (all tensors together). A coordinate whose total weight is zero (no client's mask
covers it) keeps its base value. State: the numerator and denominator, two float32
copies of the model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from fedcommons.errors import ConfigError, RoundFailedError
from fedcommons.strategies.base import (
    Aggregator,
    check_clip_norm,
    check_server_lr,
    clip_update,
    update_norm,
)
from fedcommons.wire.update import CHUNK_ELEMENTS, ClientUpdate


class FisherMerge(Aggregator):
    """Fisher-weighted averaging of deltas (needs each client's diagonal Fisher)."""

    name = "fisher"
    reference = "Matena & Raffel 2022, Merging Models with Fisher-Weighted Averaging (NeurIPS)"
    description = "per-coordinate mean weighted by each client's normalised diagonal Fisher"
    needs_fisher = True
    uses_mask = True

    def __init__(
        self,
        epsilon: float = 1e-6,
        uniform: bool = False,
        server_lr: float = 1.0,
        clip_norm: float | None = None,
        fisher_samples: int = 256,
    ) -> None:
        super().__init__()
        if fisher_samples < 1:
            raise ConfigError(f"fisher fisher_samples must be >= 1, got {fisher_samples}")
        #: N: clients estimate their Fisher on min(|D|, N) examples (sent in the round config).
        self.fisher_samples = int(fisher_samples)
        if not (math.isfinite(epsilon) and epsilon > 0):
            raise ConfigError(f"fisher epsilon must be > 0, got {epsilon}")
        self.epsilon = float(epsilon)
        self.uniform = bool(uniform)
        self.server_lr = check_server_lr(self.name, server_lr)
        self.clip_norm = check_clip_norm(self.name, clip_norm)
        self._num: dict[str, torch.Tensor] = {}
        self._den: dict[str, torch.Tensor] = {}
        self._dtypes: dict[str, torch.dtype] = {}

    def params(self) -> dict[str, Any]:
        """Return ε, whether λ is uniform, ηs, the clip norm and N."""
        return {
            "epsilon": self.epsilon,
            "uniform": self.uniform,
            "server_lr": self.server_lr,
            "clip_norm": self.clip_norm,
            "fisher_samples": self.fisher_samples,
        }

    def begin(self, base: Mapping[str, torch.Tensor]) -> None:
        """Zero the numerator Σ λF̃Δ and denominator Σ λF̃ (float32, shaped like θ0)."""
        self._num = {k: torch.zeros(v.shape, dtype=torch.float32) for k, v in base.items()}
        self._den = {k: torch.zeros(v.shape, dtype=torch.float32) for k, v in base.items()}
        self._dtypes = {k: v.dtype for k, v in base.items()}
        self.num_folded = 0

    def fold(self, update: ClientUpdate) -> None:
        """Add λᵢF̃ᵢΔᵢ and λᵢF̃ᵢ to the accumulators."""
        if update.fisher is None:
            raise ValueError(f"update from node {update.node_id} carries no Fisher")
        update = clip_update(update, self.clip_norm)
        lam = 1.0 if self.uniform else update.agg_weight
        norm = update_norm(update.fisher)  # ‖F‖₂ over all tensors
        for name, num in self._num.items():
            fisher = update.fisher[name].reshape(-1)
            delta = update.delta[name].reshape(-1)
            mask = update.mask[name].reshape(-1) if update.mask is not None else None
            flat_num, flat_den = num.view(-1), self._den[name].view(-1)
            for start in range(0, flat_num.numel(), CHUNK_ELEMENTS):  # temporaries: one chunk
                part = slice(start, start + CHUNK_ELEMENTS)
                if norm > 0:
                    f_tilde = fisher[part].to(torch.float32).div(norm).clamp_(min=self.epsilon)
                else:  # ‖F‖ = 0 (a model with zero gradients): every coordinate gets ε.
                    f_tilde = torch.full(fisher[part].shape, self.epsilon)
                if mask is not None:
                    f_tilde.mul_(mask[part])
                f_tilde.mul_(lam)
                flat_num[part].addcmul_(f_tilde, delta[part].to(torch.float32))
                flat_den[part].add_(f_tilde)
        self.num_folded += 1

    def finalize(self) -> dict[str, torch.Tensor]:
        """Return ηs · num / den, and 0 where den is 0 (those coordinates keep θ0)."""
        if self.num_folded == 0:
            raise RoundFailedError("fisher: no update was folded in this round")
        tiny = torch.finfo(torch.float32).tiny
        out: dict[str, torch.Tensor] = {}
        for name in list(self._num):
            num, den = self._num[name].view(-1), self._den[name].view(-1)
            step = torch.empty(num.numel(), dtype=self._dtypes[name])
            for start in range(0, num.numel(), CHUNK_ELEMENTS):  # temporaries: one chunk
                part = slice(start, start + CHUNK_ELEMENTS)
                d = den[part]
                value = torch.where(d > 0, num[part] / d.clamp(min=tiny), 0.0)
                step[part] = value.mul_(self.server_lr)
            out[name] = step.reshape(self._num[name].shape)
            del self._num[name], self._den[name]  # free the accumulators as we go
        return out
