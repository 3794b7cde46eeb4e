"""Privacy accounting: the runtime accountant (Opacus) and the independent one (dp-accounting).

Both sides account the same thing: a history of Poisson-subsampled Gaussian mechanisms,
each ``(noise_multiplier z, sample_rate q, steps)``. ``q = 1`` is the plain Gaussian
mechanism (no amplification by sampling).

- The coordinator and the client SDK use Opacus's accountants at run time: ``rdp``
  (Rényi DP, Mironov et al. 2019, converted with Balle et al. 2020) or ``prv``
  (privacy random variables, Gopi et al. 2021).
- Auditors recompute with Google's ``dp-accounting`` package, a separate code base:
  ``rdp`` is checked with its RDP accountant (same method: equal within 1e-6 relative),
  ``prv`` with its privacy-loss-distribution (PLD) accountant (same family of numerical
  method, different discretisation: equal within the numerical error the two methods
  declare, see :data:`PLD_TOLERANCE`).

RDP uses the integer orders 2–256 on both sides: for integer orders both libraries
evaluate the exact binomial expansion of the subsampled Gaussian's Rényi divergence, while
their series for fractional orders differ (dp-accounting's fails to converge for some
``(q, z, α)`` and drops the order), which would make the recomputation disagree.
"""

from __future__ import annotations

import functools
import logging
import math
import warnings
from collections.abc import Iterable, Sequence
from typing import Any, Literal

from fedcommons.errors import PrivacyConfigError

#: One accounting step: ``(noise_multiplier, sample_rate, num_steps)``.
Step = tuple[float, float, int]
Accountant = Literal["rdp", "prv"]
AuditMethod = Literal["rdp", "pld"]

ACCOUNTANTS: tuple[str, ...] = ("rdp", "prv")
#: Which independent method recomputes each runtime accountant.
AUDIT_METHOD: dict[str, AuditMethod] = {"rdp": "rdp", "prv": "pld"}
#: RDP orders used by both implementations.
RDP_ORDERS: tuple[int, ...] = tuple(range(2, 257))
#: Opacus PRV's ε error bound and the PLD accountant's discretisation interval.
PRV_EPS_ERROR = 0.01
PLD_DISCRETIZATION = 1e-4
#: Accepted |ε_prv − ε_pld| (absolute, plus relative): the sum of both methods' declared
#: numerical error with a safety factor of two.
PLD_TOLERANCE = (2 * PRV_EPS_ERROR, 0.01)
#: Accepted relative difference for the RDP recomputation.
RDP_TOLERANCE = 1e-6


def check_accountant(name: str) -> Accountant:
    """Return ``name`` if it is a runtime accountant, else raise PrivacyConfigError."""
    if name not in ACCOUNTANTS:
        raise PrivacyConfigError(f"unknown accountant {name!r}; choose one of {ACCOUNTANTS}")
    return name  # type: ignore[return-value]


def merge_history(steps: Iterable[Sequence[float]]) -> list[Step]:
    """Merge consecutive steps with equal ``(z, q)`` (as Opacus does) and drop empty ones."""
    merged: list[Step] = []
    for z, q, n in steps:
        n = int(n)
        if n <= 0:
            continue
        if merged and merged[-1][0] == float(z) and merged[-1][1] == float(q):
            merged[-1] = (merged[-1][0], merged[-1][1], merged[-1][2] + n)
        else:
            merged.append((float(z), float(q), n))
    return merged


def _no_privacy(history: Sequence[Step]) -> bool:
    return any(z <= 0 for z, _, _ in history)


def runtime_epsilon(history: Iterable[Sequence[float]], delta: float, accountant: str) -> float:
    """ε at ``delta`` of ``history`` with Opacus's ``accountant`` (``rdp`` or ``prv``).

    An empty history spends nothing (0.0); a step with ``z = 0`` gives ``inf``.
    """
    check_accountant(accountant)
    hist = merge_history(history)
    if not hist:
        return 0.0
    if _no_privacy(hist):
        return math.inf
    if accountant == "rdp":
        import numpy as np
        from opacus.accountants.analysis.rdp import get_privacy_spent

        total = sum(n * _opacus_rdp(z, q) for z, q, n in hist)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            eps, _ = get_privacy_spent(orders=list(RDP_ORDERS), rdp=np.asarray(total), delta=delta)
        return float(eps)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from opacus.accountants import PRVAccountant

        prv = PRVAccountant()
        prv.history = [tuple(h) for h in hist]
        return float(prv.get_epsilon(delta, eps_error=PRV_EPS_ERROR))


@functools.lru_cache(maxsize=256)
def _opacus_rdp(z: float, q: float) -> Any:
    """Opacus's per-step RDP vector of the subsampled Gaussian (what RDPAccountant sums)."""
    from opacus.accountants.analysis.rdp import compute_rdp

    return compute_rdp(q=q, noise_multiplier=z, steps=1, orders=list(RDP_ORDERS))


@functools.lru_cache(maxsize=256)
def _google_rdp(z: float, q: float) -> Any:
    """dp-accounting's per-step RDP vector of the same event (its own implementation)."""
    import dp_accounting as dpa
    from dp_accounting import rdp

    acc = rdp.RdpAccountant(
        orders=list(RDP_ORDERS), neighboring_relation=dpa.NeighboringRelation.ADD_OR_REMOVE_ONE
    )
    event = (
        dpa.GaussianDpEvent(z) if q >= 1.0 else dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(z))
    )
    acc.compose(event, 1)
    return acc.rdp.copy()


def audit_epsilon(history: Iterable[Sequence[float]], delta: float, method: str) -> float:
    """ε at ``delta`` of ``history`` recomputed with Google's dp-accounting (``rdp``/``pld``)."""
    if method not in ("rdp", "pld"):
        raise PrivacyConfigError(f"unknown audit method {method!r}; choose 'rdp' or 'pld'")
    hist = merge_history(history)
    if not hist:
        return 0.0
    if _no_privacy(hist):
        return math.inf
    import dp_accounting as dpa

    logging.getLogger("absl").setLevel(logging.ERROR)
    if method == "rdp":
        from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon

        total = sum(n * _google_rdp(z, q) for z, q, n in hist)
        eps, _ = compute_epsilon(list(RDP_ORDERS), total, delta)
        return float(eps)
    from dp_accounting import pld

    acc = pld.PLDAccountant(
        dpa.NeighboringRelation.ADD_OR_REMOVE_ONE,
        value_discretization_interval=PLD_DISCRETIZATION,
    )
    for z, q, n in hist:
        event = (
            dpa.GaussianDpEvent(z)
            if q >= 1.0
            else dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(z))
        )
        acc.compose(event, n)
    return float(acc.get_epsilon(delta))


def agrees(runtime: float, recomputed: float, accountant: str) -> bool:
    """Whether a recomputed ε reproduces the runtime ε within the method's tolerance."""
    if math.isinf(runtime) or math.isinf(recomputed):
        return math.isinf(runtime) and math.isinf(recomputed)
    if accountant == "rdp":
        return abs(runtime - recomputed) <= RDP_TOLERANCE * max(abs(runtime), 1e-12)
    absolute, relative = PLD_TOLERANCE
    return abs(runtime - recomputed) <= absolute + relative * abs(runtime)
