"""Statistics of the one-run canary audit: guesses, the f-DP test, empirical ε.

The audit itself (canary institutions through the real coordinator) is
:mod:`fedcommons.engines.canary_audit`; this module is the pure statistics it applies to
the canaries' scores, Flower-free:

- :func:`guesses`: the auditor ranks canaries by score, guesses "included" for the top
  ``k/2`` and "excluded" for the bottom ``k/2`` and abstains on the rest; for each
  pre-registered guess fraction it counts the correct guesses v of k.
- :func:`fdp_falsified`: the test of Mahloujifar, Melis & Chaudhuri (2024), "Auditing
  f-Differential Privacy in One Run" (the recursion their ``audit_rh_with_cap`` uses):
  could a mechanism satisfying the tradeoff curve f produce v or more correct guesses of
  k with m canaries, with probability above the significance level? The curve is the
  *claimed* one: the privacy profile δ(ε) of the ledger's own history (dp-accounting's
  PLD), turned into f through f(α) = sup_ε max(0, 1 − δ(ε) − e^ε α, e^{−ε}(1 − δ(ε) − α))
  on a grid of ε (a finite grid only weakens f, so the test stays valid).
- :func:`steinke_epsilon_bound`: the ε-DP bound of Steinke, Nasr & Jagielski (2023),
  Theorem 5.2 with its δ term, for comparison (it is much looser for Gaussian noise).

Using several guess fractions is paid for with a Bonferroni correction.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Sequence

import numpy as np
from scipy import stats

from fedcommons.errors import PrivacyConfigError
from fedcommons.privacy.accounting import Step, merge_history

#: Guess fractions (of the canaries) the auditor commits to before seeing any score.
GUESS_FRACTIONS = (0.1, 0.2, 0.3)
#: ε grid of the claimed privacy profile (step 0.02 up to 40).
EPS_GRID = np.linspace(0.0, 40.0, 2001)
PLD_INTERVAL = 5e-3


def guesses(
    scores: Sequence[float], included: Sequence[bool], fractions: Sequence[float]
) -> list[tuple[float, int, int]]:
    """``(fraction, k guesses, v correct)`` for each guess fraction (see module doc)."""
    s = np.asarray(scores, dtype=np.float64)
    inc = np.asarray(included, dtype=bool)
    m = len(s)
    if m < 2 or len(inc) != m:
        raise PrivacyConfigError("need >= 2 canaries, one inclusion bit each")
    order = np.argsort(-s, kind="stable")
    out = []
    for f in fractions:
        half = max(1, int(f * m / 2))
        top, bottom = order[:half], order[m - half :]
        correct = int(inc[top].sum()) + int((~inc[bottom]).sum())
        out.append((float(f), 2 * half, correct))
    return out


def fdp_falsified(
    m: int, k: int, v: int, blow_up_inverse: Callable[[float], float], significance: float
) -> bool:
    """Whether v correct of k guesses on m canaries rejects the curve (at ``significance``).

    ``blow_up_inverse(y)`` is the smallest probability x of an event under one neighbour
    that the curve lets reach probability y under the other.
    """
    if not 0 <= v <= k <= m or k == 0:
        raise PrivacyConfigError(f"need 0 <= v <= k <= m and k > 0, got v={v}, k={k}, m={m}")
    r = significance * v / m
    h = significance * (k - v) / m
    for i in range(v - 1, -1, -1):
        h_new = max(h, blow_up_inverse(r))
        if h_new == h:
            break
        r = min(r + (i / (k - i)) * (h_new - h), 1.0)
        h = h_new
    return r + h > k / m


def profile_blow_up_inverse(epsilons: np.ndarray, deltas: np.ndarray) -> Callable[[float], float]:
    """The curve's blow-up inverse from a privacy profile δ(ε) on a grid (see module doc)."""
    eps = np.asarray(epsilons, dtype=np.float64)
    dlt = np.minimum(np.asarray(deltas, dtype=np.float64), 1.0)
    e_pos, e_neg = np.exp(eps), np.exp(-eps)

    def inverse(y: float) -> float:
        if y <= 0:
            return 0.0
        if y >= 1:
            return 1.0
        a = (y - dlt) * e_neg
        b = 1.0 - dlt - e_pos * (1.0 - y)
        return float(max(0.0, np.max(np.maximum(a, b))))

    return inverse


@functools.lru_cache(maxsize=64)
def claimed_blow_up_inverse(history: tuple[Step, ...]) -> Callable[[float], float]:
    """The blow-up inverse of the curve a history of (z, q, steps) claims (dp-accounting PLD)."""
    from dp_accounting.pld import privacy_loss_distribution as pld_lib

    logging.getLogger("absl").setLevel(logging.ERROR)
    pld = None
    for z, q, n in merge_history(history):
        if z <= 0:
            return lambda y: 0.0  # no noise: the claim allows anything, nothing is falsified
        step = pld_lib.from_gaussian_mechanism(
            standard_deviation=z,
            sampling_prob=min(q, 1.0),
            value_discretization_interval=PLD_INTERVAL,
            use_connect_dots=True,
        ).self_compose(n)
        pld = step if pld is None else pld.compose(step)
    if pld is None:
        return lambda y: y  # no step: the identity curve (perfect privacy)
    deltas = np.asarray(pld.get_delta_for_epsilon(EPS_GRID), dtype=np.float64)
    return profile_blow_up_inverse(EPS_GRID, deltas)


def claim_falsified(
    m: int,
    counts: Sequence[tuple[float, int, int]],
    history: Sequence[Step],
    confidence: float = 0.95,
) -> bool:
    """Whether any guess fraction's count rejects the history's claimed curve (Bonferroni)."""
    alpha = (1.0 - confidence) / max(len(counts), 1)
    inverse = claimed_blow_up_inverse(tuple(merge_history(history)))
    return any(fdp_falsified(m, k, v, inverse, alpha) for _, k, v in counts)


def empirical_epsilon(
    m: int,
    counts: Sequence[tuple[float, int, int]],
    history: Sequence[Step],
    delta: float,
    confidence: float = 0.95,
) -> float:
    """The largest ε(δ) of the claimed mechanism's family the guesses reject.

    The family scales the noise multiplier of every step by s; the curve with the
    largest ε(δ) that the guesses still reject gives the empirical lower bound (under
    the assumption that the mechanism's curve has that shape). 0 when none is rejected.
    """
    from fedcommons.privacy.accounting import audit_epsilon

    hist = merge_history(history)
    if not hist or any(z <= 0 for z, _, _ in hist):
        return 0.0

    def rejected(scale: float) -> bool:
        scaled = [(z * scale, q, n) for z, q, n in hist]
        return claim_falsified(m, counts, scaled, confidence)

    lo, hi = 1 / 64, 64.0
    if not rejected(hi):
        return 0.0
    if rejected(lo):
        hi = lo
    else:
        for _ in range(12):  # geometric bisection: hi / lo shrinks to 2^(12/2^12)
            mid = math.sqrt(lo * hi)
            if rejected(mid):
                hi = mid
            else:
                lo = mid
    return audit_epsilon([(z * hi, q, n) for z, q, n in hist], delta, "pld")


def p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """P[≥ v correct of r guesses] under (ε, δ)-DP with m canaries (Steinke et al. 2023)."""
    if not 0 <= v <= r <= m:
        raise PrivacyConfigError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    q = 1.0 / (1.0 + math.exp(-eps))
    beta = float(stats.binom.sf(v - 1, r, q))
    if v == 0:
        return min(beta, 1.0)
    pmf = stats.binom.pmf(np.arange(v - 1, -1, -1), r, q)
    alpha = float(np.max(np.cumsum(pmf) / np.arange(1, v + 1)))
    return min(beta + alpha * delta * 2 * m, 1.0)


def steinke_epsilon_bound(m: int, r: int, v: int, delta: float, confidence: float = 0.95) -> float:
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
