"""Exact aggregation of LoRA patches: average the products BᵢAᵢ, not the factors.

A LoRA patch changes a weight by ``s·B·A`` (B: d_out×r, A: r×d_in, s = α/r). FedAvg on
the factors gives ``(Σλᵢ Bᵢ)(Σλᵢ Aᵢ)``, which is not ``Σλᵢ BᵢAᵢ``: the cross terms
between clients are wrong whenever clients moved both factors (Sun et al. 2024,
"Improving LoRA in Privacy-preserving Federated Learning", ICLR; Wang et al. 2024,
"FLoRA", NeurIPS). ``lora-exact`` aggregates the products:

    M = Σᵢ λᵢ BᵢAᵢ / Σᵢ λᵢ,  target = B₀A₀ + ηs (M − B₀A₀)

and re-factorises ``target`` to rank r by truncated SVD, ``U S Vᵀ``: the best rank-r
approximation (Eckart–Young), exact whenever the clients' products span rank ≤ r.
The new factors are ``A = c·V_rᵀ`` and ``B = U_r S_r / c`` with ``c`` the RMS row norm of
A₀: the product is the same for any ``c``, and keeping A at its initial scale (B
carrying the magnitude, as LoRA's own initialisation does) keeps local training away
from the slow saddle of two small factors. Every other tensor of the patch (the
classification head) is FedAvg's weighted mean.

Factor pairs are found by name: ``…lora_A[.<adapter>].weight`` with the matching
``…lora_B[.<adapter>].weight`` (``peft``'s naming). State: FedAvg's sum plus one float64
d_out×d_in product sum per pair — O(model of the merged weights), whatever the number
of clients. Error feedback on factor deltas is approximate under re-factorisation (the
factor basis changes between rounds; the product it encodes does not).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from fedcommons.strategies.base import clip_update
from fedcommons.strategies.fedavg import FedAvg
from fedcommons.wire.update import ClientUpdate

_LORA_A = re.compile(r"^(?P<stem>.*)\.lora_A(?P<adapter>(\.[^.]+)?)\.weight$")


@dataclass(frozen=True)
class LoraPair:
    """Names of one adapted layer's factors: ``a`` (r×d_in) and ``b`` (d_out×r)."""

    a: str
    b: str


def lora_pairs(tensors: Mapping[str, torch.Tensor] | Iterable[str]) -> list[LoraPair]:
    """The LoRA factor pairs among ``tensors``' names (peft naming), in name order."""
    names = set(tensors)
    pairs = []
    for name in sorted(names):
        match = _LORA_A.match(name)
        if match is None:
            continue
        b = f"{match['stem']}.lora_B{match['adapter']}.weight"
        if b in names:
            pairs.append(LoraPair(name, b))
    return pairs


def refactorise(
    product: torch.Tensor, rank: int, a_scale: float
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-``rank`` factors ``(B, A)`` of ``product`` with A's rows of norm ``a_scale``.

    Returns B, A (float64) and the relative Frobenius norm of what truncation dropped.
    """
    u, s, vh = torch.linalg.svd(product, full_matrices=False)
    scale = a_scale if a_scale > 0 else 1.0
    a = vh[:rank] * scale
    b = u[:, :rank] * (s[:rank] / scale)
    total = float(torch.linalg.vector_norm(s))
    dropped = float(torch.linalg.vector_norm(s[rank:])) / total if total > 0 else 0.0
    return b, a, dropped


class LoraExact(FedAvg):
    """FedAvg in which LoRA factor pairs are merged as products, then re-factorised."""

    name = "lora-exact"
    reference = (
        "Sun et al. 2024, Improving LoRA in Privacy-preserving Federated Learning (ICLR); "
        "Wang et al. 2024, FLoRA (NeurIPS): the mean of the products BᵢAᵢ, re-factorised"
    )
    description = "LoRA pairs averaged as products Σλ BᵢAᵢ, truncated SVD to rank r; FedAvg rest"
    single_update_identity = False  # one update's product comes back in a rotated basis

    def __init__(
        self,
        server_lr: float = 1.0,
        clip_norm: float | None = None,
        accumulate: str = "float64",
    ) -> None:
        super().__init__(server_lr=server_lr, clip_norm=clip_norm, accumulate=accumulate)
        self._pairs: list[LoraPair] = []
        self._base: dict[str, torch.Tensor] = {}
        self._products: dict[str, torch.Tensor] = {}
        #: Relative Frobenius norm dropped by the last round's truncation, per pair (A name).
        self.truncation: dict[str, float] = {}

    def params(self) -> dict[str, Any]:
        """Return the server learning rate, clip norm and accumulator dtype."""
        return {
            "server_lr": self.server_lr,
            "clip_norm": self.clip_norm,
            "accumulate": self.accumulate,
        }

    def begin(self, base: Mapping[str, torch.Tensor]) -> None:
        """Zero FedAvg's sum and one float64 product sum per LoRA pair."""
        super().begin(base)
        self._pairs = lora_pairs(base)
        self._base = {}
        self._products = {}
        for pair in self._pairs:
            a0, b0 = base[pair.a].double(), base[pair.b].double()
            self._base[pair.a], self._base[pair.b] = a0, b0
            self._products[pair.a] = torch.zeros(
                (b0.shape[0], a0.shape[1]), dtype=torch.float64, device=a0.device
            )

    def fold(self, update: ClientUpdate) -> None:
        """Add nᵢΔᵢ to FedAvg's sum and nᵢ BᵢAᵢ to each pair's product sum."""
        update = clip_update(update, self.clip_norm)
        super().fold(update)
        n = update.agg_weight
        for pair in self._pairs:
            a = self._base[pair.a] + update.delta[pair.a].double()
            b = self._base[pair.b] + update.delta[pair.b].double()
            self._products[pair.a].addmm_(b, a, alpha=n)

    def finalize(self) -> dict[str, torch.Tensor]:
        """FedAvg's step, with each LoRA pair's step taken from its re-factorised mean product."""
        self._check_folded()
        weight = self._weight
        step = super().finalize()
        self.truncation = {}
        for pair in self._pairs:
            a0, b0 = self._base[pair.a], self._base[pair.b]
            start = b0 @ a0
            mean = self._products.pop(pair.a).div_(weight)
            target = start.add_(mean.sub_(start), alpha=self.server_lr)
            rank = a0.shape[0]
            a_scale = float(torch.linalg.vector_norm(a0)) / math.sqrt(rank)
            b, a, dropped = refactorise(target, rank, a_scale)
            step[pair.a] = (a - a0).to(step[pair.a].dtype)
            step[pair.b] = (b - b0).to(step[pair.b].dtype)
            self.truncation[pair.a] = dropped
        return step
