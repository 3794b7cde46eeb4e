"""Budgets and mechanism parameters, validated when they are configured.

Every out-of-range value raises :class:`~fedcommons.errors.PrivacyConfigError` (a
:class:`~fedcommons.errors.ConfigError`) naming the key: ε ≤ 0, δ outside (0, 1),
a negative noise multiplier, a clip norm ≤ 0, an unknown accountant or sampling scheme.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from fedcommons.errors import PrivacyConfigError
from fedcommons.privacy.accounting import check_accountant

#: Line-level DP mechanisms (run-config key ``dp.mechanism``): ``dp-fedavg`` (central: the
#: coordinator adds Gaussian noise) and ``skellam`` (distributed: clients add Skellam noise
#: before secure aggregation masks their updates; needs ``secagg = true``).
CENTRAL_MECHANISMS = ("dp-fedavg", "skellam")
#: How the coordinator samples clients under central DP (``dp.sampling``).
SAMPLING = ("poisson", "fixed")


def _number(key: str, value: Any) -> float:
    if isinstance(value, bool):
        raise PrivacyConfigError(f"{key}: {value!r} is not a number")
    try:
        number = float(value)
    except (TypeError, ValueError) as exc:
        raise PrivacyConfigError(f"{key}: {value!r} is not a number") from exc
    if math.isnan(number):
        raise PrivacyConfigError(f"{key}: NaN is not allowed")
    return number


def check_epsilon(key: str, value: Any) -> float:
    """A budget ε: a finite number > 0."""
    eps = _number(key, value)
    if not (eps > 0 and math.isfinite(eps)):
        raise PrivacyConfigError(f"{key} (privacy budget ε) must be a finite number > 0, got {eps}")
    return eps


def check_delta(key: str, value: Any) -> float:
    """A budget δ: 0 < δ < 1."""
    delta = _number(key, value)
    if not 0 < delta < 1:
        raise PrivacyConfigError(f"{key} (privacy budget δ) must satisfy 0 < δ < 1, got {delta}")
    return delta


def check_noise_multiplier(key: str, value: Any) -> float:
    """A noise multiplier z ≥ 0 (z = 0: clipping only, ε = ∞)."""
    z = _number(key, value)
    if not (z >= 0 and math.isfinite(z)):
        raise PrivacyConfigError(f"{key} (noise multiplier z) must be >= 0, got {z}")
    return z


def check_clip_norm(key: str, value: Any) -> float:
    """A clip norm C > 0."""
    c = _number(key, value)
    if not (c > 0 and math.isfinite(c)):
        raise PrivacyConfigError(f"{key} (clip norm C) must be a finite number > 0, got {c}")
    return c


@dataclass(frozen=True)
class Budget:
    """An (ε, δ) budget."""

    epsilon: float
    delta: float

    def __post_init__(self) -> None:
        check_epsilon("epsilon", self.epsilon)
        check_delta("delta", self.delta)


@dataclass(frozen=True)
class CentralDPConfig:
    """User-level central DP (DP-FedAvg) for a release line, from run-config ``dp.*`` keys.

    ``noise_multiplier`` z and ``clip_norm`` C define the mechanism; ``epsilon``/``delta``
    the line's budget; ``sampling`` is ``poisson`` (each connected node joins a round
    independently with probability q = clients-per-round / connected nodes: amplification
    by sampling is accounted) or ``fixed`` (a fixed-size sample: accounted without
    amplification, q = 1). With ``mechanism = skellam`` (distributed DP,
    :mod:`fedcommons.privacy.distributed`) the clients add the noise and every round is
    accounted with q = 1: the coordinator, which distributed DP guards against, knows
    the sample.
    """

    noise_multiplier: float
    clip_norm: float
    epsilon: float
    delta: float
    sampling: str = "poisson"
    accountant: str = "rdp"
    mechanism: str = "dp-fedavg"

    #: The ``dp.<key>`` names this config reads.
    KEYS = (
        "mechanism",
        "noise-multiplier",
        "clip-norm",
        "epsilon",
        "delta",
        "sampling",
        "accountant",
    )

    def __post_init__(self) -> None:
        check_noise_multiplier("dp.noise-multiplier", self.noise_multiplier)
        check_clip_norm("dp.clip-norm", self.clip_norm)
        check_epsilon("dp.epsilon", self.epsilon)
        check_delta("dp.delta", self.delta)
        if self.sampling not in SAMPLING:
            raise PrivacyConfigError(
                f"dp.sampling must be one of {SAMPLING}, got {self.sampling!r}"
            )
        try:
            check_accountant(self.accountant)
        except PrivacyConfigError as exc:
            raise PrivacyConfigError(f"dp.accountant: {exc}") from None
        if self.mechanism not in CENTRAL_MECHANISMS:
            raise PrivacyConfigError(
                f"dp.mechanism must be one of {CENTRAL_MECHANISMS}, got {self.mechanism!r}"
            )
        if self.distributed and self.accountant != "rdp":
            raise PrivacyConfigError(
                "dp.mechanism = skellam is accounted with its published RDP bound: "
                f"dp.accountant must be rdp, got {self.accountant!r}"
            )

    @property
    def distributed(self) -> bool:
        """Whether clients add the noise (distributed DP under secure aggregation)."""
        return self.mechanism == "skellam"

    @property
    def budget(self) -> Budget:
        """The line's (ε, δ) budget."""
        return Budget(self.epsilon, self.delta)

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> CentralDPConfig:
        """Build from the run config's ``dp.<key>`` options (prefix removed)."""
        unknown = sorted(set(options) - set(cls.KEYS))
        if unknown:
            raise PrivacyConfigError(
                f"unknown dp option(s) {unknown}; valid: {', '.join('dp.' + k for k in cls.KEYS)}"
            )
        required = ("noise-multiplier", "clip-norm", "epsilon", "delta")
        missing = [k for k in required if k not in options]
        if missing:
            raise PrivacyConfigError(
                f"central DP needs {', '.join('dp.' + k for k in missing)} "
                f"(got {', '.join('dp.' + k for k in sorted(options))})"
            )
        return cls(
            noise_multiplier=check_noise_multiplier(
                "dp.noise-multiplier", options["noise-multiplier"]
            ),
            clip_norm=check_clip_norm("dp.clip-norm", options["clip-norm"]),
            epsilon=check_epsilon("dp.epsilon", options["epsilon"]),
            delta=check_delta("dp.delta", options["delta"]),
            sampling=str(options.get("sampling", "poisson")),
            accountant=str(options.get("accountant", "rdp")),
            mechanism=str(options.get("mechanism", "dp-fedavg")),
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for manifests and ledgers)."""
        return asdict(self)
