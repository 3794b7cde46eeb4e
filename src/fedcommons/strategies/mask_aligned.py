"""Mask-aligned merge of sparse updates, with optional TIES sign election and ``min_votes``.

Δ*ⱼ = Σᵢ nᵢ mᵢⱼ Δᵢⱼ / Σᵢ nᵢ mᵢⱼ: a coordinate is averaged only over the clients that sent
it, instead of being diluted by the zeros of the others (as FedAvg does).

TIES-style sign election (Yadav et al. 2023): sⱼ = sign Σᵢ nᵢ mᵢⱼ Δᵢⱼ and only entries
whose sign agrees with sⱼ count. The elected sign needs every update before it is
known, so the state keeps the positive and negative parts apart — four float32
accumulators P = Σ nmΔ⁺, Wp = Σ nm[Δ>0], N = Σ nmΔ⁻, Wn = Σ nm[Δ<0] — and finalize picks
P/Wp where P + N > 0 and N/Wn where it is < 0. That is exact, streaming and O(model)
whatever the number of clients (4 float32 copies of the model, plus one int32 copy of
vote counts when ``min_votes`` > 1). Entries equal
to 0 inside a mask have no sign and do not count under sign election.

``density`` < 1 is TIES' "trim" step for dense updates: each update keeps only its
largest-magnitude fraction per tensor (inside its mask) before it is folded.
``min_votes``: a coordinate fewer than ``min_votes`` clients sent keeps its base value.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from fedcommons.errors import ConfigError, RoundFailedError
from fedcommons.strategies.base import Aggregator, check_clip_norm, check_server_lr, clip_update
from fedcommons.wire.update import CHUNK_ELEMENTS, ClientUpdate


def effective_mask(
    update: ClientUpdate, name: str, *, nonzero_mask: bool = False, density: float = 1.0
) -> torch.Tensor:
    """The bool mask of tensor ``name``: the sent mask (or all ones / Δ ≠ 0), trimmed."""
    delta = update.delta[name]
    if update.mask is not None:
        mask = update.mask[name].bool()
    elif nonzero_mask:
        mask = delta != 0
    else:
        mask = torch.ones(delta.shape, dtype=torch.bool)
    if density < 1.0:
        count = int(mask.sum())
        keep = math.ceil(density * count)
        if 0 < keep < count:
            mags = torch.where(mask, delta.abs().to(torch.float32), -1.0).reshape(-1)
            idx = torch.topk(mags, keep, sorted=False).indices
            trimmed = torch.zeros(mags.shape, dtype=torch.bool)
            trimmed[idx] = True
            mask = trimmed.reshape(delta.shape)
    return mask


class MaskAligned(Aggregator):
    """Average each coordinate over the clients whose mask includes it."""

    name = "mask-aligned"
    reference = (
        "Yadav et al. 2023, TIES-Merging: Resolving Interference When Merging Models "
        "(NeurIPS) for sign election and trimming"
    )
    description = "mean inside masks; optional TIES sign election, trim density, min_votes"
    uses_mask = True

    def __init__(
        self,
        sign_election: bool = False,
        min_votes: int = 1,
        density: float = 1.0,
        nonzero_mask: bool = False,
        server_lr: float = 1.0,
        clip_norm: float | None = None,
    ) -> None:
        super().__init__()
        if min_votes < 1:
            raise ConfigError(f"mask-aligned min_votes must be >= 1, got {min_votes}")
        if not 0.0 < density <= 1.0:
            raise ConfigError(f"mask-aligned density must be in (0, 1], got {density}")
        self.sign_election = bool(sign_election)
        self.min_votes = int(min_votes)
        self.single_update_identity = self.min_votes == 1 and density == 1.0
        self.density = float(density)
        self.nonzero_mask = bool(nonzero_mask)
        self.server_lr = check_server_lr(self.name, server_lr)
        self.clip_norm = check_clip_norm(self.name, clip_norm)
        self._acc: dict[str, list[torch.Tensor]] = {}
        self._votes: dict[str, torch.Tensor] = {}
        self._dtypes: dict[str, torch.dtype] = {}

    def params(self) -> dict[str, Any]:
        """Return every parameter."""
        return {
            "sign_election": self.sign_election,
            "min_votes": self.min_votes,
            "density": self.density,
            "nonzero_mask": self.nonzero_mask,
            "server_lr": self.server_lr,
            "clip_norm": self.clip_norm,
        }

    def begin(self, base: Mapping[str, torch.Tensor]) -> None:
        """Zero the accumulators: (sum, weight), or (P, Wp, N, Wn) with sign election."""
        parts = 4 if self.sign_election else 2
        self._acc = {
            k: [torch.zeros(v.shape, dtype=torch.float32) for _ in range(parts)]
            for k, v in base.items()
        }
        # Vote counts only matter with min_votes > 1 (one int32 copy of the model).
        self._votes = (
            {k: torch.zeros(v.shape, dtype=torch.int32) for k, v in base.items()}
            if self.min_votes > 1
            else {}
        )
        self._dtypes = {k: v.dtype for k, v in base.items()}
        self.num_folded = 0

    def fold(self, update: ClientUpdate) -> None:
        """Fold nᵢmᵢΔᵢ (split by sign when electing) and nᵢmᵢ into the accumulators."""
        update = clip_update(update, self.clip_norm)
        n = update.agg_weight
        for name, acc in self._acc.items():
            if self.density < 1.0 or (update.mask is None and self.nonzero_mask):
                full_mask: torch.Tensor | None = effective_mask(
                    update, name, nonzero_mask=self.nonzero_mask, density=self.density
                ).reshape(-1)
            elif update.mask is not None:
                full_mask = update.mask[name].reshape(-1)
            else:
                full_mask = None  # dense: all ones
            delta = update.delta[name].reshape(-1)
            flats = [a.view(-1) for a in acc]
            votes = self._votes[name].view(-1) if self._votes else None
            for start in range(0, delta.numel(), CHUNK_ELEMENTS):  # temporaries: one chunk
                part = slice(start, start + CHUNK_ELEMENTS)
                d = delta[part].to(torch.float32)
                m = (
                    full_mask[part].bool()
                    if full_mask is not None
                    else torch.ones(d.shape, dtype=torch.bool)
                )
                if votes is not None:
                    votes[part].add_(m.to(torch.int32))
                if self.sign_election:
                    pos = m & (d > 0)
                    neg = m & (d < 0)
                    flats[0][part].add_(torch.where(pos, d, 0.0), alpha=n)
                    flats[1][part].add_(pos.to(torch.float32), alpha=n)
                    flats[2][part].add_(torch.where(neg, d, 0.0), alpha=n)
                    flats[3][part].add_(neg.to(torch.float32), alpha=n)
                else:
                    flats[0][part].add_(torch.where(m, d, 0.0), alpha=n)
                    flats[1][part].add_(m.to(torch.float32), alpha=n)
        self.num_folded += 1

    def finalize(self) -> dict[str, torch.Tensor]:
        """Return the aligned mean; coordinates with too few votes keep θ0."""
        if self.num_folded == 0:
            raise RoundFailedError("mask-aligned: no update was folded in this round")
        tiny = torch.finfo(torch.float32).tiny
        out: dict[str, torch.Tensor] = {}
        for name in list(self._acc):
            acc = [a.view(-1) for a in self._acc[name]]
            votes = self._votes[name].view(-1) if self._votes else None
            step = torch.empty(acc[0].numel(), dtype=self._dtypes[name])
            for start in range(0, step.numel(), CHUNK_ELEMENTS):  # temporaries: one chunk
                part = slice(start, start + CHUNK_ELEMENTS)
                if self.sign_election:
                    p, wp, q, wq = (a[part] for a in acc)
                    total = p + q
                    value = torch.where(
                        total > 0,
                        p / wp.clamp(min=tiny),
                        torch.where(total < 0, q / wq.clamp(min=tiny), 0.0),
                    )
                else:
                    s_, w = acc[0][part], acc[1][part]
                    value = torch.where(w > 0, s_ / w.clamp(min=tiny), 0.0)
                if votes is not None:
                    value = torch.where(votes[part] >= self.min_votes, value, 0.0)
                step[part] = value.mul_(self.server_lr)
            out[name] = step.reshape(self._acc[name][0].shape)
            del self._acc[name]  # free the accumulators as we go
            self._votes.pop(name, None)
        return out
