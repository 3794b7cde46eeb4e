"""User-level central DP: DP-FedAvg (McMahan et al. 2018), streamed, Flower-free.

Per round, with clip norm C, noise multiplier z and W the *expected* number of
participants (fixed before the round: q·N under Poisson sampling, the sample size
otherwise):

1. each client delta Δᵢ is clipped to L2 norm C over all its tensors (flat clipping);
2. clipped deltas are summed in float64, one at a time (memory O(model), whatever the
   number of clients);
3. the released mean is ``(Σ clip(Δᵢ)) / W + N(0, (z·C/W)² I)``.

The denominator and the noise are fixed by W, never by the number of replies: a user
changes the mean by at most C/W, and the noise std is z times that, however many sampled
clients drop out (Flower's fixed-clipping wrapper divides by the replies and so
under-noises when clients drop). The noisy mean is then handed, as a single update, to
the wrapped strategy (e.g. FedAvg with its server learning rate): everything after the
noise is post-processing and costs no privacy.

:class:`DPFedAvg` reports what it actually did in :class:`MechanismStats`, including the
*effective* noise multiplier: the noise std on the released mean divided by one user's
largest possible influence on it. The ledger records that figure, not the configured z.

``sensitivity`` Δ is what one user can change in the sum: C for Poisson sampling, 2C
for a fixed-size sample (adding a user can swap it for another member of the sample);
the noise std on the mean is z·Δ/W.

``seeded_bug`` is set only through the test-only switch of
:mod:`fedcommons.privacy.audits.seeded_bugs` (the canary audit's scratch registries): it makes
this very code misbehave while :class:`MechanismStats` keeps reporting the intended
mechanism, as a silent implementation bug would.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from fedcommons.errors import PrivacyConfigError, RoundFailedError
from fedcommons.privacy.audits.seeded_bugs import SEEDED_BUGS
from fedcommons.privacy.config import check_clip_norm, check_noise_multiplier
from fedcommons.strategies.base import Aggregator
from fedcommons.wire.update import ClientUpdate


@dataclass(frozen=True)
class MechanismStats:
    """What one round of the mechanism did (the ledger's per-round privacy fields)."""

    participants: int
    clipped: int
    expected_participants: float
    denominator: float
    clip_norm: float
    noise_multiplier: float
    noise_std: float
    #: Δ: the largest change one user can make to the clipped sum (C or 2C).
    sensitivity: float

    @property
    def fraction_clipped(self) -> float:
        """Share of folded updates whose norm exceeded C."""
        return self.clipped / self.participants if self.participants else 0.0

    @property
    def effective_noise_multiplier(self) -> float:
        """Noise std on the released mean over one user's largest influence on it (Δ/W)."""
        return self.noise_std * self.denominator / self.sensitivity

    def to_dict(self) -> dict[str, Any]:
        """Fields plus the derived figures."""
        out = asdict(self)
        out["fraction_clipped"] = self.fraction_clipped
        out["effective_noise_multiplier"] = self.effective_noise_multiplier
        return out


def clip_delta(
    delta: Mapping[str, torch.Tensor], clip_norm: float
) -> tuple[dict[str, torch.Tensor], float, bool]:
    """Scale ``delta`` to L2 norm at most ``clip_norm`` (over all tensors, float64).

    Returns ``(clipped float64 tensors, original norm, whether it was scaled down)``.
    """
    tensors = {k: v.detach().to(torch.float64) for k, v in delta.items()}
    norm = math.sqrt(sum(float(torch.sum(t * t)) for t in tensors.values()))
    if norm > clip_norm:
        factor = clip_norm / norm
        return {k: t * factor for k, t in tensors.items()}, norm, True
    return tensors, norm, False


class DPFedAvg(Aggregator):
    """DP-FedAvg around an inner aggregator (see the module docstring).

    ``expected_participants`` is W. ``inner`` receives the noisy mean as one update and
    returns the server step (``None``: the noisy mean is the step). ``seed`` fixes the
    noise for tests and audits; by default every round draws a fresh secret seed.
    """

    name = "dp-fedavg"
    reference = "McMahan et al. 2018, Learning Differentially Private Recurrent Language Models"

    def __init__(
        self,
        inner: Aggregator | None,
        *,
        noise_multiplier: float,
        clip_norm: float,
        expected_participants: float,
        sensitivity: float | None = None,
        seed: int | None = None,
        seeded_bug: str | None = None,
    ) -> None:
        super().__init__()
        self.inner = inner
        self.noise_multiplier = check_noise_multiplier("noise multiplier", noise_multiplier)
        self.clip_norm = check_clip_norm("clip norm", clip_norm)
        if not (expected_participants > 0 and math.isfinite(expected_participants)):
            raise PrivacyConfigError(
                f"expected participants must be > 0, got {expected_participants}"
            )
        self.sensitivity = check_clip_norm(
            "sensitivity", self.clip_norm if sensitivity is None else sensitivity
        )
        if self.sensitivity < self.clip_norm:
            raise PrivacyConfigError(
                f"sensitivity {self.sensitivity} is below the clip norm {self.clip_norm}"
            )
        if seeded_bug is not None and seeded_bug not in SEEDED_BUGS:
            raise PrivacyConfigError(f"unknown seeded bug {seeded_bug!r}")
        self.expected_participants = float(expected_participants)
        self.seed = seed
        self._bug = seeded_bug
        self._base: Mapping[str, torch.Tensor] = {}
        self._sum: dict[str, torch.Tensor] = {}
        self._clipped = 0
        self.stats: MechanismStats | None = None

    def params(self) -> dict[str, Any]:
        """Mechanism parameters (and the inner strategy's)."""
        out: dict[str, Any] = {
            "noise_multiplier": self.noise_multiplier,
            "clip_norm": self.clip_norm,
            "sensitivity": self.sensitivity,
            "expected_participants": self.expected_participants,
        }
        if self.inner is not None:
            out["inner"] = {"name": self.inner.name, **self.inner.params()}
        return out

    def begin(self, base: Mapping[str, torch.Tensor]) -> None:
        """Zero the float64 running sum of clipped deltas."""
        self._base = base
        self._sum = {
            k: torch.zeros(v.shape, dtype=torch.float64, device=v.device) for k, v in base.items()
        }
        self._clipped = 0
        self.num_folded = 0
        self.stats = None

    def fold(self, update: ClientUpdate) -> None:
        """Clip one delta to C and add it to the sum (uniform user weights)."""
        clipped, _, was_clipped = clip_delta(update.delta, self.clip_norm)
        if self._bug == "skip-clipping":
            clipped = {k: v.detach().to(torch.float64) for k, v in update.delta.items()}
        for name, acc in self._sum.items():
            acc.add_(clipped[name].to(acc.device))
        self._clipped += int(was_clipped)
        self.num_folded += 1

    def fold_sum(
        self, clipped_sum: Mapping[str, torch.Tensor], participants: int, clipped: int
    ) -> None:
        """Fold a sum of deltas each already clipped to C by its client (secure aggregation).

        Under secure aggregation the coordinator sees only ``Σ clip(Δᵢ)``; the clients
        clip (and round within C) themselves, so the sensitivity is unchanged and the
        noise is added here, after unmasking, exactly as for plaintext rounds.
        """
        if participants < 0 or not 0 <= clipped <= max(participants, 0):
            raise RoundFailedError(
                f"dp-fedavg: inconsistent secure sum ({participants} participants, "
                f"{clipped} clipped)"
            )
        for name, acc in self._sum.items():
            acc.add_(clipped_sum[name].to(device=acc.device, dtype=torch.float64))
        self._clipped += int(clipped)
        self.num_folded += int(participants)

    def noisy_mean(self) -> dict[str, torch.Tensor]:
        """Release the noisy mean of this round (float64) and set :attr:`stats`."""
        denom = self.expected_participants
        std_mean = self.noise_multiplier * self.sensitivity / denom
        divide_by, std_drawn = denom, std_mean
        if self._bug == "denominator-replies" and self.num_folded:
            divide_by = float(self.num_folded)
        if self._bug == "half-noise":
            std_drawn = std_mean / 2
        generator = torch.Generator(device="cpu")
        generator.manual_seed(self.seed if self.seed is not None else secrets.randbits(63))
        out: dict[str, torch.Tensor] = {}
        for name, acc in self._sum.items():
            noise = torch.normal(
                0.0, 1.0, size=tuple(acc.shape), generator=generator, dtype=torch.float64
            ).to(acc.device)
            if self._bug == "noise-for-sum":  # the mean's noise added to the sum, then divided
                out[name] = (acc + noise * std_drawn) / divide_by
            else:
                out[name] = acc / divide_by + noise * std_drawn
        self.stats = MechanismStats(  # what the mechanism is meant to do (bugs are silent)
            participants=self.num_folded,
            clipped=self._clipped,
            expected_participants=self.expected_participants,
            denominator=denom,
            clip_norm=self.clip_norm,
            noise_multiplier=self.noise_multiplier,
            noise_std=std_mean,
            sensitivity=self.sensitivity,
        )
        return out

    def finalize(self) -> dict[str, torch.Tensor]:
        """The server step: the inner strategy applied to the noisy mean."""
        mean = self.noisy_mean()
        self._sum = {}
        return step_from_mean(self.inner, self._base, mean)


def step_from_mean(
    inner: Aggregator | None,
    base: Mapping[str, torch.Tensor],
    mean: Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """The server step for a released (noisy) mean: ``inner`` folds it as one update.

    Post-processing of the mean; without ``inner`` the mean itself is the step.
    """
    if inner is None:
        return {k: mean[k].to(base[k].dtype) for k in mean}
    inner.begin(base)
    inner.fold(ClientUpdate({k: v.to(base[k].dtype) for k, v in mean.items()}, 1))
    return inner.finalize()


def poisson_sample(nodes: list[int], rate: float, rng: np.random.Generator) -> list[int]:
    """Include each node independently with probability ``rate`` (Poisson sampling)."""
    if not 0 < rate <= 1:
        raise PrivacyConfigError(f"sampling rate must be in (0, 1], got {rate}")
    if rate >= 1:
        return sorted(nodes)
    keep = rng.random(len(nodes)) < rate
    return sorted(int(n) for n, k in zip(nodes, keep, strict=True) if k)


def secret_rng() -> np.random.Generator:
    """A generator seeded from the OS's entropy (client sampling must stay secret)."""
    return np.random.default_rng(secrets.randbits(128))
