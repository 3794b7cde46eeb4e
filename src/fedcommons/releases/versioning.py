"""Semantic versions computed from what a release changed (Raffel's proposal).

- **MAJOR**: parameters were removed or replaced (a tensor vanished or changed shape or
  dtype), or the line starts over without a parent.
- **MINOR**: parameters or modules were added and every existing one kept its name,
  shape and dtype (a new head, an adapter); also an unchanged architecture whose change
  is too large for a patch (more than the configured fraction of entries, or a
  validation task got worse than the parent, even within its tolerance).
- **PATCH**: the architecture is unchanged, at most ``max_changed_fraction`` of the
  parameter entries changed, and no validation task is worse than the parent.

An operator may override the computed bump with a reason, which the manifest records.
The override may raise the bump freely; it may not lower it below what the architecture
requires (a removed tensor is always MAJOR, an added one at least MINOR), since users
rely on PATCH and MINOR releases loading into the code they already run.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

from fedcommons.errors import VersionOverrideError
from fedcommons.releases.patches import WeightsDiff

BUMPS = ("patch", "minor", "major")
DEFAULT_MAX_CHANGED_FRACTION = 0.1


@dataclass
class VersionDecision:
    """The bump a release gets and why (recorded in its manifest)."""

    bump: str
    computed: str
    reasons: list[str]
    override_reason: str = ""
    changed_fraction: float | None = None
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    degraded_tasks: list[str] = field(default_factory=list)
    max_changed_fraction: float = DEFAULT_MAX_CHANGED_FRACTION

    def to_dict(self) -> dict:
        """JSON-friendly form."""
        return asdict(self)


def decide_bump(
    change: WeightsDiff | None,
    degraded_tasks: Iterable[str] = (),
    *,
    max_changed_fraction: float = DEFAULT_MAX_CHANGED_FRACTION,
    override: str = "",
    override_reason: str = "",
) -> VersionDecision:
    """Compute the bump of a candidate against its parent (``change`` is None: no parent)."""
    if not 0.0 <= max_changed_fraction <= 1.0:
        raise VersionOverrideError(
            f"patch-max-changed must lie in [0, 1], got {max_changed_fraction}"
        )
    degraded = sorted(degraded_tasks)
    reasons: list[str] = []
    floor = "patch"  # the lowest bump the architecture allows
    if change is None:
        computed = floor = "major"
        reasons.append("no parent release: a new line or a replacement model")
    elif change.removed or change.reshaped:
        computed = floor = "major"
        if change.removed:
            reasons.append(f"{len(change.removed)} tensor(s) removed: {_names(change.removed)}")
        if change.reshaped:
            reasons.append(
                f"{len(change.reshaped)} tensor(s) replaced (shape/dtype): "
                f"{_names(change.reshaped)}"
            )
    elif change.added:
        computed = floor = "minor"
        reasons.append(
            f"{len(change.added)} tensor(s) added, existing ones kept: {_names(change.added)}"
        )
    else:
        computed = "patch"
        if change.changed_fraction > max_changed_fraction:
            computed = "minor"
            reasons.append(
                f"{change.changed_fraction:.2%} of parameter entries changed "
                f"(> {max_changed_fraction:.2%} allowed for a patch)"
            )
        if degraded:
            computed = "minor"
            reasons.append(f"worse than the parent on: {', '.join(degraded)}")
        if computed == "patch":
            reasons.append(
                f"same architecture, {change.changed_fraction:.2%} of entries changed, "
                "no validation task worse"
            )
    bump = computed
    override = override.strip().lower()
    if override:
        if override not in BUMPS:
            raise VersionOverrideError(
                f"version-bump {override!r} is not one of {', '.join(BUMPS)}"
            )
        if not override_reason.strip():
            raise VersionOverrideError("version-bump override needs version-bump-reason")
        if BUMPS.index(override) < BUMPS.index(floor):
            raise VersionOverrideError(
                f"version-bump {override!r} is below what the change requires ({floor}): "
                + "; ".join(reasons)
            )
        bump = override
    return VersionDecision(
        bump=bump,
        computed=computed,
        reasons=reasons,
        override_reason=override_reason.strip() if override else "",
        changed_fraction=None if change is None else change.changed_fraction,
        added=[] if change is None else list(change.added),
        removed=[] if change is None else list(change.removed),
        replaced=[] if change is None else list(change.reshaped),
        degraded_tasks=degraded,
        max_changed_fraction=max_changed_fraction,
    )


def next_version(
    existing: Iterable[tuple[int, int, int]], parent: tuple[int, int, int] | None, bump: str
) -> str:
    """The next free version of a line for ``bump`` relative to ``parent``.

    MAJOR: one past the line's highest major. MINOR: the parent's major, one past the
    highest minor in it. PATCH: the parent's major.minor, one past its highest patch.
    """
    versions = list(existing)
    if bump == "major" or parent is None:
        return f"{max((v[0] for v in versions), default=0) + 1}.0.0"
    major, minor, _ = parent
    if bump == "minor":
        top = max((v[1] for v in versions if v[0] == major), default=minor)
        return f"{major}.{top + 1}.0"
    if bump == "patch":
        top = max((v[2] for v in versions if v[:2] == (major, minor)), default=0)
        return f"{major}.{minor}.{top + 1}"
    raise VersionOverrideError(f"unknown bump {bump!r}")


def _names(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")
