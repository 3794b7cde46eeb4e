"""Distributed DP under secure aggregation: the Skellam mechanism (Agarwal, Kairouz & Liu 2021).

With central DP the coordinator adds the noise after unmasking, so it sees the exact sum.
With distributed DP every client adds its share of *integer* noise before masking, and the
coordinator only ever sees a noised sum. Skellam noise — ``Poisson(μ/2) − Poisson(μ/2)``,
variance μ — suits secure aggregation: it is an integer (it goes through the ring's
modular arithmetic exactly) and a sum of independent Skellam variables is Skellam with
the summed variance. So when ``m`` clients each add variance ``μ_c``, the sum carries
exactly ``Sk(m·μ_c)`` noise, however many dropped: the accounting of a round with
dropouts is exact, not a bound on a mixture (the distributed discrete Gaussian of
Kairouz, Liu & Steinke 2021 is only close to a discrete Gaussian after summation).

Per round, with clip norm C, the ring's L quantization levels (step γ = C / L) and d
coordinates, each client

1. clips its update to L2 norm C and each coordinate to ±C;
2. rounds ``x / γ`` to integers stochastically, redrawing while the integer vector's L2
   norm exceeds Δ₂ (conditional randomized rounding, Kairouz et al. 2021 §4.1; after
   :data:`ROUNDING_TRIES` draws it rounds toward zero, norm ≤ L ≤ Δ₂), where
   ``Δ₂ = √(L² + d/4 + √(2 ln(1/β))·(L + √d/2))`` with β = :data:`ROUNDING_BETA` (the
   probability that one draw exceeds it);
3. adds Skellam noise of variance ``μ_c`` to every coordinate (numpy's Poisson sampler,
   seeded from the OS's entropy);
4. masks and sends the vector (SecAgg+).

Sensitivity (user level: adding or removing one institution's whole contribution):
``‖q‖₂ ≤ Δ₂`` and ``‖q‖₁ ≤ Δ₁ = min(√d·Δ₂, Δ₂²)`` (integers: |qᵢ| ≤ qᵢ²).

Privacy of one round (Agarwal et al. 2021, Theorem 3.5 as implemented by its authors in
``google-research/federated/distributed_dp``), for integer orders α ≥ 2 and total noise
variance μ in the sum::

    ε(α) = α·Δ₂²/(2μ) + min( ((2α − 1)·Δ₂² + 6·Δ₁)/(4μ²),  3·Δ₁/(2μ) )

The first term is the Gaussian mechanism's RDP at noise multiplier √μ/Δ₂; the second is
the price of discreteness (negligible at fp32 resolution, L = 2²³ − 1). Rounds compose
by adding RDP; (ε, δ) comes from dp-accounting's RDP conversion
(``dp_accounting.rdp.rdp_privacy_accountant.compute_epsilon``), the same orders 2–256
as the central accountant.

*Calibration.* The operator sets a noise multiplier z: the sum must carry variance at
least ``μ* = (z·Δ₂)²``. The coordinator asks each client for ``μ_c = μ* / m_min``, with
``m_min`` the fewest inputs a completed round can contain (the SecAgg threshold, or
``min-clients`` when larger): SecAgg+ aborts below it, so a round that completes always
carries at least μ*, whatever the dropouts. The ledger accounts the noise actually in
the sum, ``m·μ_c`` for m survivors (no less than μ*).

*No amplification by sampling.* The coordinator chooses the sample, so against it — the
party distributed DP protects against — there is no amplification: every round is
accounted with q = 1.

*Modular wrap-around.* The coordinator reads ``(Σ qᵢ + noise) mod 2^b``, a function of
the noised sum: post-processing, no privacy cost. For utility the ring is sized
(:func:`ring_bits_for`) so that a coordinate wraps with probability at most
:data:`WRAP_BETA` per round (Chernoff bound on the Skellam tail, plus the largest
possible sum of the clipped inputs).

*Trust.* The guarantee assumes the survivors add their noise. A coordinator colluding
with c clients knows their noise: against it the sum carries ``(m − c)·μ_c``; the ledger
holds what is needed to recompute ε for any c. A site can refuse rounds whose noise, at
the threshold, is below its own floor (node config ``dp-min-noise-multiplier``).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from fedcommons.errors import PrivacyConfigError, RoundFailedError
from fedcommons.privacy.accounting import RDP_ORDERS
from fedcommons.privacy.central import step_from_mean
from fedcommons.strategies.base import Aggregator
from fedcommons.wire.update import ClientUpdate

MECHANISM = "skellam"
#: Probability that one conditional-rounding draw exceeds Δ₂ (Kairouz et al.'s β).
ROUNDING_BETA = 1e-3
#: Draws of conditional rounding before the deterministic fallback (rounding toward zero).
ROUNDING_TRIES = 8
#: Probability, per round, that some coordinate of the noised sum wraps around the ring.
WRAP_BETA = 2.0**-40
#: Where the published bound comes from (recorded in ledger entries).
REFERENCE = (
    "Agarwal, Kairouz & Liu 2021, The Skellam Mechanism for Differentially Private "
    "Federated Learning, Thm 3.5"
)


def norm_bound(levels: int, dim: int, beta: float = ROUNDING_BETA) -> float:
    """Δ₂: the L2 bound of one client's rounded integer vector (conditional rounding)."""
    if levels < 1 or dim < 1 or not 0 < beta < 1:
        raise PrivacyConfigError("norm bound needs levels >= 1, dim >= 1 and 0 < beta < 1")
    slack = math.sqrt(2 * math.log(1 / beta)) * (levels + math.sqrt(dim) / 2)
    return math.sqrt(levels**2 + dim / 4 + slack)


def l1_bound(delta2: float, dim: int) -> float:
    """Δ₁ = min(√d·Δ₂, Δ₂²): an integer vector's L1 norm is at most its squared L2 norm."""
    return min(math.sqrt(dim) * delta2, delta2**2)


def skellam_rdp(
    delta2: float, delta1: float, variance: float, orders: Sequence[int] = RDP_ORDERS
) -> np.ndarray:
    """RDP ε(α) of one Skellam release of total variance ``variance`` (module docstring)."""
    if variance <= 0:
        return np.full(len(orders), math.inf)
    a = np.asarray(orders, dtype=np.float64)
    mu = float(variance)
    gaussian = a * delta2**2 / (2 * mu)
    discrete = np.minimum(
        ((2 * a - 1) * delta2**2 + 6 * delta1) / (4 * mu**2), 3 * delta1 / (2 * mu)
    )
    return gaussian + discrete


@dataclass(frozen=True)
class SkellamRound:
    """What an auditor needs to recompute one round's privacy (aggregate figures only)."""

    noise_multiplier: float
    clip_norm: float
    levels: int
    dim: int
    norm_bound: float
    l1_bound: float
    local_variance: float
    min_contributors: int
    #: Inputs in the sum, each with its noise: the total variance is their product.
    contributors: int

    @property
    def variance(self) -> float:
        """Integer-domain noise variance in the released sum."""
        return self.contributors * self.local_variance

    def rdp(self, orders: Sequence[int] = RDP_ORDERS) -> np.ndarray:
        """RDP of this round at ``orders``."""
        return skellam_rdp(self.norm_bound, self.l1_bound, self.variance, orders)

    def to_dict(self) -> dict[str, Any]:
        """Ledger fields."""
        return {**asdict(self), "noise_variance": self.variance}

    @classmethod
    def from_entry(cls, entry: Mapping[str, Any]) -> SkellamRound:
        """Read back a ledger entry's fields."""
        return cls(**{k: entry[k] for k in cls.__dataclass_fields__})


def calibrate(
    noise_multiplier: float, clip_norm: float, levels: int, dim: int, min_contributors: int
) -> SkellamRound:
    """Local variance so that ``min_contributors`` noise shares give variance (z·Δ₂)²."""
    if min_contributors < 1:
        raise PrivacyConfigError(f"distributed DP needs >= 1 contributor, got {min_contributors}")
    delta2 = norm_bound(levels, dim)
    local = (noise_multiplier * delta2) ** 2 / min_contributors
    return SkellamRound(
        noise_multiplier=float(noise_multiplier),
        clip_norm=float(clip_norm),
        levels=int(levels),
        dim=int(dim),
        norm_bound=delta2,
        l1_bound=l1_bound(delta2, dim),
        local_variance=local,
        min_contributors=int(min_contributors),
        contributors=int(min_contributors),
    )


def epsilon_from_rdp(rdp: Sequence[float], delta: float, orders: Sequence[int] = RDP_ORDERS):
    """(ε, best order) from an RDP curve, with dp-accounting's conversion."""
    from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon

    values = np.asarray(rdp, dtype=np.float64)
    if not np.isfinite(values).any():
        return math.inf, None
    eps, order = compute_epsilon(list(orders), values, delta)
    return float(eps), order


def skellam_noise(size: int, variance: float, rng: np.random.Generator | None = None):
    """Skellam noise ``Poisson(μ/2) − Poisson(μ/2)`` of variance ``variance`` (int64)."""
    if variance < 0 or not math.isfinite(variance):
        raise PrivacyConfigError(f"noise variance must be finite and >= 0, got {variance}")
    rng = rng or np.random.default_rng(secrets.randbits(128))
    if variance == 0:
        return np.zeros(size, dtype=np.int64)
    lam = variance / 2
    return rng.poisson(lam, size).astype(np.int64) - rng.poisson(lam, size).astype(np.int64)


def skellam_tail(variance: float, probability: float) -> float:
    """A t with P(|Sk(variance)| > t) ≤ ``probability``.

    Chernoff: the Skellam MGF is ``exp(μ(cosh λ − 1))``; at the optimal λ = asinh(t/μ)
    each tail is at most ``exp(μ(√(1 + (t/μ)²) − 1) − t·asinh(t/μ))``.
    """
    if variance <= 0:
        return 0.0
    mu = variance

    def log_bound(t: float) -> float:  # log of one tail's bound
        return mu * (math.sqrt(1 + (t / mu) ** 2) - 1) - t * math.asinh(t / mu)

    target = math.log(probability / 2)
    lo, hi = 0.0, max(1.0, math.sqrt(mu))
    while log_bound(hi) > target:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        if log_bound(mid) > target:
            lo = mid
        else:
            hi = mid
    return hi


def ring_bits_for(n: int, levels: int, dim: int, local_variance: float) -> int:
    """Ring size for ``n`` noised inputs: no wrap-around except with probability WRAP_BETA.

    Each input is within ±levels per coordinate; the noise of all n (at most n·μ_c)
    exceeds the Chernoff tail t in some coordinate with probability ≤ WRAP_BETA.
    """
    tail = skellam_tail(n * local_variance, WRAP_BETA / max(dim, 1))
    bound = n * levels + math.ceil(tail)
    return max(2, int(bound).bit_length() + 1)


@dataclass(frozen=True)
class DistributedStats:
    """What one distributed-DP round did (the coordinator's view: aggregates only)."""

    participants: int
    expected_participants: float
    denominator: float
    round: SkellamRound


class SkellamMean(Aggregator):
    """Turns the noised secure sum into the server step (noise is already in the sum).

    ``fold_sum`` takes ``Σ (qᵢ + noiseᵢ)·γ`` over the m survivors (the dequantized ring
    sum); the released mean divides it by W, the expected number of participants fixed
    before the round (as DP-FedAvg does: the denominator never depends on who replied),
    and ``inner`` receives that mean as one update. No noise is added here.
    """

    name = "skellam-mean"
    reference = REFERENCE

    def __init__(
        self, inner: Aggregator | None, *, calibration: SkellamRound, expected_participants: float
    ) -> None:
        super().__init__()
        if not (expected_participants > 0 and math.isfinite(expected_participants)):
            raise PrivacyConfigError(
                f"expected participants must be > 0, got {expected_participants}"
            )
        self.inner = inner
        self.calibration = calibration
        self.expected_participants = float(expected_participants)
        self._base: Mapping[str, torch.Tensor] = {}
        self._sum: dict[str, torch.Tensor] = {}
        self.stats: DistributedStats | None = None

    def params(self) -> dict[str, Any]:
        """Mechanism parameters (and the inner strategy's)."""
        out: dict[str, Any] = {
            "mechanism": MECHANISM,
            "noise_multiplier": self.calibration.noise_multiplier,
            "clip_norm": self.calibration.clip_norm,
            "expected_participants": self.expected_participants,
        }
        if self.inner is not None:
            out["inner"] = {"name": self.inner.name, **self.inner.params()}
        return out

    def begin(self, base: Mapping[str, torch.Tensor]) -> None:
        """Start a round."""
        self._base = base
        self._sum = {}
        self.num_folded = 0
        self.stats = None

    def fold(self, update: ClientUpdate) -> None:
        """Individual updates never reach this aggregator: only the secure sum does."""
        raise RoundFailedError("distributed DP folds only the secure sum (fold_sum)")

    def fold_sum(self, noised_sum: Mapping[str, torch.Tensor], participants: int) -> None:
        """Take the dequantized, noised sum of ``participants`` inputs."""
        if participants < self.calibration.min_contributors:
            raise RoundFailedError(
                f"distributed DP: {participants} input(s) in the sum, the noise is calibrated "
                f"for at least {self.calibration.min_contributors}"
            )
        self._sum = {k: v.to(torch.float64) for k, v in noised_sum.items()}
        self.num_folded = int(participants)

    def finalize(self) -> dict[str, torch.Tensor]:
        """The server step: the inner strategy applied to the noised mean."""
        if not self._sum:
            raise RoundFailedError("distributed DP: no secure sum folded")
        denom = self.expected_participants
        mean = {k: v / denom for k, v in self._sum.items()}
        done = SkellamRound(**{**asdict(self.calibration), "contributors": self.num_folded})
        self.stats = DistributedStats(self.num_folded, denom, denom, done)
        self._sum = {}
        return step_from_mean(self.inner, self._base, mean)


def line_rdp(entries: Iterable[Mapping[str, Any]], orders: Sequence[int] = RDP_ORDERS):
    """Summed RDP of the Skellam rounds among a ledger's ``entries``."""
    total = np.zeros(len(orders))
    for e in entries:
        if e.get("mechanism") == MECHANISM:
            total += SkellamRound.from_entry(e).rdp(orders)
    return total


def recompute_epsilons(entries: Iterable[Mapping[str, Any]], delta: float) -> list[float]:
    """An auditor's cumulative ε after each Skellam entry, from the entries' fields alone.

    Independent of the runtime path where independent code exists: the Gaussian term of
    each round's RDP comes from dp-accounting's RDP accountant (``GaussianDpEvent`` at
    noise multiplier √μ/Δ₂), the discreteness term from the published formula, and the
    (ε, δ) conversion from Opacus (``get_privacy_spent``) instead of dp-accounting.
    """
    import warnings

    import dp_accounting as dpa
    from dp_accounting import rdp
    from opacus.accountants.analysis.rdp import get_privacy_spent

    orders = list(RDP_ORDERS)
    total = np.zeros(len(orders))
    out = []
    for e in entries:
        if e.get("mechanism") != MECHANISM:
            continue
        r = SkellamRound.from_entry(e)
        acc = rdp.RdpAccountant(
            orders=orders, neighboring_relation=dpa.NeighboringRelation.ADD_OR_REMOVE_ONE
        )
        acc.compose(dpa.GaussianDpEvent(math.sqrt(r.variance) / r.norm_bound), 1)
        a = np.asarray(orders, dtype=np.float64)
        discrete = np.minimum(
            ((2 * a - 1) * r.norm_bound**2 + 6 * r.l1_bound) / (4 * r.variance**2),
            3 * r.l1_bound / (2 * r.variance),
        )
        total += np.asarray(acc.rdp) + discrete
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            eps, _ = get_privacy_spent(orders=orders, rdp=total, delta=delta)
        out.append(float(eps))
    return out
