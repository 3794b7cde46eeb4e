"""Geometric median of client updates (RFA), as a fedcommons strategy plugin."""

from __future__ import annotations

import torch

from fedcommons.strategies import strategy
from fedcommons.wire.update import ClientUpdate


@strategy(
    "geomed",
    reference="Pillutla, Kakade & Harchaoui 2022, Robust Aggregation for Federated Learning",
    description="geometric median of deltas (smoothed Weiszfeld; buffers all updates)",
)
def geometric_median(
    updates: list[ClientUpdate],
    base: dict[str, torch.Tensor],
    *,
    iterations: int = 8,
    smoothing: float = 1e-6,
) -> dict[str, torch.Tensor]:
    """Weighted geometric median of the deltas: argmin_z Σ αᵢ ‖Δᵢ − z‖₂, αᵢ ∝ nᵢ."""
    if iterations < 1 or not smoothing > 0:
        raise ValueError("geomed needs iterations >= 1 and smoothing > 0")
    names = list(base)
    points = torch.stack(
        [torch.cat([u.delta[k].reshape(-1).double() for k in names]) for u in updates]
    )
    alpha = torch.tensor([u.agg_weight for u in updates], dtype=torch.float64)
    alpha = alpha / alpha.sum()
    z = points.median(dim=0).values  # a robust start: Weiszfeld from the mean is slow
    for _ in range(iterations):
        dist = (points - z).norm(dim=1).clamp(min=smoothing)
        beta = alpha / dist
        z = (beta @ points) / beta.sum()
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for k in names:
        n = base[k].numel()
        out[k] = z[offset : offset + n].reshape(base[k].shape).to(base[k].dtype)
        offset += n
    return out
