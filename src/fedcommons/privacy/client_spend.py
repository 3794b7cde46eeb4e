"""The DP-SGD spend record an institution attaches to every reply, and its validation.

A reply *claims* record-level DP with the metric ``dp-sgd = 1`` and carries its spend in
the config record ``dp-spend`` (keys below). The coordinator rejects a claim without a
complete, consistent record (reason ``dp-spend-missing`` / ``dp-spend-invalid``), so no
update enters a release on an unverifiable privacy claim. Flower-free: the record is read
from a plain mapping.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from fedcommons.errors import UpdateRejectedError
from fedcommons.privacy.accounting import ACCOUNTANTS, Step, merge_history, runtime_epsilon

REQUIRED = (
    "epsilon",
    "delta",
    "accountant",
    "noise-multiplier",
    "max-grad-norm",
    "sample-rate",
    "steps",
    "budget-epsilon",
    "history",
)


@dataclass(frozen=True)
class ClientSpend:
    """An institution's cumulative record-level DP spend after a round."""

    epsilon: float
    delta: float
    accountant: str
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps: int
    budget_epsilon: float
    history: list[Step] = field(default_factory=list)

    def to_record(self) -> dict[str, Any]:
        """Flat values for Flower's ConfigRecord (history as JSON text)."""
        return {
            "epsilon": float(self.epsilon),
            "delta": float(self.delta),
            "accountant": self.accountant,
            "noise-multiplier": float(self.noise_multiplier),
            "max-grad-norm": float(self.max_grad_norm),
            "sample-rate": float(self.sample_rate),
            "steps": int(self.steps),
            "budget-epsilon": float(self.budget_epsilon),
            "history": json.dumps([list(h) for h in self.history]),
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (for the ledger)."""
        out = asdict(self)
        out["history"] = [list(h) for h in self.history]
        return out


def _reject(detail: str) -> UpdateRejectedError:
    return UpdateRejectedError("dp-spend-invalid", detail)


def parse_spend(record: Mapping[str, Any] | None) -> ClientSpend:
    """Validate a reply's spend record; raise UpdateRejectedError naming what is wrong."""
    if record is None:
        raise UpdateRejectedError(
            "dp-spend-missing", "reply claims DP-SGD but carries no 'dp-spend' record"
        )
    missing = [k for k in REQUIRED if k not in record]
    if missing:
        raise UpdateRejectedError("dp-spend-missing", f"DP spend record lacks {', '.join(missing)}")
    try:
        eps = float(record["epsilon"])
        delta = float(record["delta"])
        z = float(record["noise-multiplier"])
        clip = float(record["max-grad-norm"])
        rate = float(record["sample-rate"])
        steps = int(record["steps"])
        budget = float(record["budget-epsilon"])
        raw = json.loads(str(record["history"]))
        history = merge_history((float(a), float(b), int(c)) for a, b, c in raw)
    except (TypeError, ValueError) as exc:
        raise _reject(f"malformed DP spend record: {exc}") from None
    accountant = str(record["accountant"])
    if accountant not in ACCOUNTANTS:
        raise _reject(f"unknown accountant {accountant!r}")
    if not (math.isfinite(eps) and eps >= 0):
        raise _reject(f"epsilon {eps} is not a finite number >= 0")
    if not 0 < delta < 1:
        raise _reject(f"delta {delta} is outside (0, 1)")
    if not (z >= 0 and clip > 0 and 0 < rate <= 1 and steps >= 0 and budget > 0):
        raise _reject("noise multiplier, clip norm, sample rate, steps or budget out of range")
    if sum(n for _, _, n in history) != steps:
        raise _reject(f"history has {sum(n for _, _, n in history)} steps, record says {steps}")
    if eps > budget * (1 + 1e-9):
        raise _reject(f"reported ε={eps:.4g} exceeds the institution's own budget {budget:g}")
    if accountant == "rdp":
        recomputed = runtime_epsilon(history, delta, "rdp")
        if eps < recomputed * (1 - 1e-6):
            raise _reject(f"reported ε={eps:.6g} understates its history's ε={recomputed:.6g}")
    return ClientSpend(eps, delta, accountant, z, clip, rate, steps, budget, history)
