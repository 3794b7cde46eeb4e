"""Test-only switch that seeds known privacy bugs into the real coordinator path.

The end-to-end canary audit (``fedcommons audit canary``) has to show that it catches
real implementation bugs, so the bugs live in the production code path (DP-FedAvg's fold
and noise, the coordinator's public round report) behind this switch, never in a second
implementation of the mechanism. Each bug is *silent*: the ledger and the manifest still
record what the mechanism was meant to do, so only an audit of what is actually released
can catch it.

``FEDCOMMONS_SEEDED_BUG=<name>`` turns one on, and only for a registry that holds the
marker file :data:`MARKER` (the canary audit creates it in its scratch registry): set by
mistake in production, the variable does nothing but make the run fail before round 1
(:func:`check_environment`).

| name | what the coordinator then does |
| --- | --- |
| ``skip-clipping`` | folds every update unclipped |
| ``noise-for-sum`` | adds the noise meant for the mean to the sum, before dividing by W |
| ``half-noise`` | draws noise with std z·Δ/(2W): z/2, a 2× under-noising |
| ``denominator-replies`` | divides the sum by the number of replies instead of W |
| ``leak-sample`` | publishes which nodes took part in each round (per-node upload bytes) |
"""

from __future__ import annotations

import os
from pathlib import Path

from fedcommons.errors import ConfigError

ENV = "FEDCOMMONS_SEEDED_BUG"
#: File that marks a scratch registry made by the canary audit.
MARKER = ".fedcommons-canary-audit"
SEEDED_BUGS = (
    "skip-clipping",
    "noise-for-sum",
    "half-noise",
    "denominator-replies",
    "leak-sample",
)


def requested() -> str | None:
    """The bug named by the environment (``None`` when unset); raises on an unknown name."""
    name = os.environ.get(ENV, "").strip()
    if not name or name == "none":
        return None
    if name not in SEEDED_BUGS:
        raise ConfigError(f"{ENV}={name!r}: choose one of {', '.join(SEEDED_BUGS)}")
    return name


def check_environment(registry_root: Path) -> None:
    """Before round 1: refuse a seeded bug outside a canary-audit scratch registry."""
    name = requested()
    if name is not None and not (Path(registry_root) / MARKER).exists():
        raise ConfigError(
            f"{ENV}={name} is a test-only switch of the canary audit; registry "
            f"{str(registry_root)!r} is not a canary-audit scratch registry (no {MARKER}): "
            "unset it"
        )


def active_bug(registry_root: Path) -> str | None:
    """The seeded bug in force for a run publishing into ``registry_root`` (usually none)."""
    name = requested()
    if name is None or not (Path(registry_root) / MARKER).exists():
        return None
    return name
