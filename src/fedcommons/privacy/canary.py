"""One-run canary audit of DP-FedAvg (Steinke, Nasr & Jagielski 2023).

The method is that of "Privacy Auditing with One (1) Training Run".

The audit runs the real mechanism (:class:`~fedcommons.privacy.central.DPFedAvg`) once:

1. ``m`` canary clients, each with an update along its own random unit direction uᵢ in
   the model's parameter space (scaled to ``canary_norm``, by default 10·C so that
   clipping matters);
2. each canary is included independently with probability ½ (Sᵢ ∈ {+1, −1}), every
   included one folded into one DP-FedAvg round whose expected participants are m/2;
3. each canary is scored by the cosine between uᵢ and the noisy aggregate;
4. the auditor guesses "included" for the ``k_plus`` top scores and "excluded" for the
   ``k_minus`` bottom ones, abstaining on the rest;
5. with v correct out of r guesses, ε is rejected when, under (ε, δ)-DP, v or more
   correct guesses would have probability below 1 − confidence (the paper's Theorem 5.2
   bound, including its δ term). The largest rejected ε is the empirical lower bound.

A correct mechanism keeps the bound below the claimed ε (the accountant's ε of one
Gaussian step with the same z); a bug that weakens the mechanism (clipping skipped,
noise scaled for the wrong quantity) pushes it above.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from scipy import stats

from fedcommons.errors import PrivacyConfigError
from fedcommons.privacy.accounting import audit_epsilon
from fedcommons.privacy.central import DPFedAvg
from fedcommons.privacy.config import check_clip_norm, check_delta, check_noise_multiplier
from fedcommons.wire.update import ClientUpdate

#: Seeded bugs an audit can inject through the mechanism's own parameters.
SEEDED_BUGS = ("none", "skip-clipping", "noise-for-sum")


def p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """P[≥ v correct of r guesses] under (ε, δ)-DP with m canaries (Steinke et al. 2023)."""
    if not 0 <= v <= r <= m:
        raise PrivacyConfigError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    q = 1.0 / (1.0 + math.exp(-eps))
    beta = float(stats.binom.sf(v - 1, r, q))
    alpha, total = 0.0, 0.0
    for i in range(1, v + 1):
        total += float(stats.binom.pmf(v - i, r, q))
        alpha = max(alpha, total / i)
    return min(beta + alpha * delta * 2 * m, 1.0)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, confidence: float = 0.95) -> float:
    """The largest ε rejected at ``confidence`` given v correct of r guesses (bisection)."""
    p = 1.0 - confidence
    if not 0 < p < 1:
        raise PrivacyConfigError(f"confidence must be in (0, 1), got {confidence}")
    if p_value(m, r, v, 0.0, delta) >= p:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(m, r, v, hi, delta) < p and hi < 100:
        lo, hi = hi, hi * 2
    for _ in range(40):
        mid = (lo + hi) / 2
        if p_value(m, r, v, mid, delta) < p:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass(frozen=True)
class CanaryAuditResult:
    """The figures of one canary audit."""

    num_params: int
    canaries: int
    included: int
    guesses: int
    correct: int
    noise_multiplier: float
    clip_norm: float
    canary_norm: float
    delta: float
    confidence: float
    claimed_epsilon: float
    epsilon_lower_bound: float
    seeded_bug: str
    seed: int
    seconds: float

    @property
    def passed(self) -> bool:
        """Whether the empirical lower bound stays at or below the claimed ε."""
        return self.epsilon_lower_bound <= self.claimed_epsilon

    def to_dict(self) -> dict[str, Any]:
        """Fields plus the verdict."""
        return {**asdict(self), "passed": self.passed}


def run_canary_audit(
    *,
    num_params: int = 20_000,
    canaries: int = 1_000,
    noise_multiplier: float = 2.0,
    clip_norm: float = 1.0,
    canary_norm: float | None = None,
    delta: float = 1e-5,
    k_plus: int | None = None,
    k_minus: int | None = None,
    confidence: float = 0.95,
    seed: int = 0,
    seeded_bug: Literal["none", "skip-clipping", "noise-for-sum"] = "none",
) -> CanaryAuditResult:
    """Audit one DP-FedAvg round with canary clients (see the module docstring).

    ``k_plus``/``k_minus`` default to 15 % of the canaries each. ``seeded_bug`` sets the
    mechanism's own ``clip=False`` or ``noise_scale="sum"`` to show the audit catches them.
    """
    started = time.perf_counter()
    z = check_noise_multiplier("noise multiplier", noise_multiplier)
    c = check_clip_norm("clip norm", clip_norm)
    check_delta("delta", delta)
    if seeded_bug not in SEEDED_BUGS:
        raise PrivacyConfigError(f"seeded bug must be one of {SEEDED_BUGS}, got {seeded_bug!r}")
    if num_params < 1 or canaries < 2:
        raise PrivacyConfigError("need at least 1 parameter and 2 canaries")
    k_plus = int(0.15 * canaries) if k_plus is None else int(k_plus)
    k_minus = int(0.15 * canaries) if k_minus is None else int(k_minus)
    if k_plus < 0 or k_minus < 0 or k_plus + k_minus > canaries:
        raise PrivacyConfigError(
            f"guesses k+={k_plus}, k-={k_minus} must be >= 0 and sum to <= {canaries}"
        )
    norm = 10.0 * c if canary_norm is None else float(canary_norm)
    gen = torch.Generator().manual_seed(seed)
    directions = torch.randn(canaries, num_params, generator=gen, dtype=torch.float32)
    directions /= directions.norm(dim=1, keepdim=True)
    included = torch.rand(canaries, generator=gen) < 0.5

    mechanism = DPFedAvg(
        None,
        noise_multiplier=z,
        clip_norm=c,
        expected_participants=canaries / 2,
        clip=seeded_bug != "skip-clipping",
        noise_scale="sum" if seeded_bug == "noise-for-sum" else "mean",
        seed=seed + 1,
    )
    mechanism.begin({"w": torch.zeros(num_params, dtype=torch.float32)})
    for i in torch.nonzero(included).flatten().tolist():
        mechanism.fold(ClientUpdate({"w": directions[i] * norm}, 1))
    aggregate = mechanism.finalize()["w"].to(torch.float32)

    scores = directions @ (aggregate / aggregate.norm().clamp_min(1e-30))
    order = torch.argsort(scores, descending=True)
    top, bottom = order[:k_plus], order[canaries - k_minus :] if k_minus else order[:0]
    correct = int(included[top].sum()) + int((~included[bottom]).sum())
    guesses = k_plus + k_minus
    bound = epsilon_lower_bound(canaries, guesses, correct, delta, confidence)
    claimed = audit_epsilon([(z, 1.0, 1)], delta, "pld")
    return CanaryAuditResult(
        num_params=num_params,
        canaries=canaries,
        included=int(included.sum()),
        guesses=guesses,
        correct=correct,
        noise_multiplier=z,
        clip_norm=c,
        canary_norm=norm,
        delta=delta,
        confidence=confidence,
        claimed_epsilon=claimed,
        epsilon_lower_bound=bound,
        seeded_bug=seeded_bug,
        seed=seed,
        seconds=time.perf_counter() - started,
    )
