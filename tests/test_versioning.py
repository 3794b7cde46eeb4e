"""Semantic versions from the change (Raffel): PATCH / MINOR / MAJOR and overrides."""

from __future__ import annotations

import pytest
import torch

from fedcommons.errors import VersionOverrideError
from fedcommons.releases.patches import diff_weights
from fedcommons.releases.versioning import decide_bump, next_version


def _w() -> dict[str, torch.Tensor]:
    return {"a.weight": torch.zeros(10, 10), "a.bias": torch.zeros(10)}


def test_small_change_same_architecture_is_a_patch() -> None:
    b = _w()
    b["a.bias"][0] = 1.0
    decision = decide_bump(diff_weights(_w(), b), max_changed_fraction=0.05)
    assert decision.bump == "patch" and decision.computed == "patch"


def test_large_change_same_architecture_is_a_minor() -> None:
    b = {k: v + 1 for k, v in _w().items()}
    decision = decide_bump(diff_weights(_w(), b), max_changed_fraction=0.05)
    assert decision.bump == "minor"
    assert "100.00% of parameter entries changed" in decision.reasons[0]


def test_degraded_task_prevents_a_patch() -> None:
    b = _w()
    b["a.bias"][0] = 1.0
    decision = decide_bump(diff_weights(_w(), b), ["loss"], max_changed_fraction=0.5)
    assert decision.bump == "minor" and decision.degraded_tasks == ["loss"]


def test_added_head_is_a_minor() -> None:
    b = _w()
    b["head.weight"] = torch.zeros(3, 10)
    decision = decide_bump(diff_weights(_w(), b))
    assert decision.bump == "minor" and decision.added == ["head.weight"]


def test_removed_or_replaced_parameters_are_a_major() -> None:
    removed = _w()
    del removed["a.bias"]
    assert decide_bump(diff_weights(_w(), removed)).bump == "major"
    reshaped = _w()
    reshaped["a.weight"] = torch.zeros(10, 12)
    decision = decide_bump(diff_weights(_w(), reshaped))
    assert decision.bump == "major" and decision.replaced == ["a.weight"]


def test_no_parent_is_a_major() -> None:
    assert decide_bump(None).bump == "major"


def test_override_is_recorded_with_its_reason() -> None:
    b = _w()
    b["a.bias"][0] = 1.0
    decision = decide_bump(
        diff_weights(_w(), b), override="major", override_reason="new tokenizer downstream"
    )
    assert (decision.bump, decision.computed) == ("major", "patch")
    assert decision.override_reason == "new tokenizer downstream"


def test_override_without_reason_is_refused() -> None:
    """Input: version-bump=minor with an empty reason."""
    with pytest.raises(VersionOverrideError, match="needs version-bump-reason"):
        decide_bump(diff_weights(_w(), _w()), override="minor", override_reason=" ")


def test_override_below_what_the_architecture_requires_is_refused() -> None:
    """Input: version-bump=patch for a change that removed a tensor."""
    b = _w()
    del b["a.bias"]
    with pytest.raises(VersionOverrideError, match="below what the change requires"):
        decide_bump(diff_weights(_w(), b), override="patch", override_reason="trust me")


def test_override_may_lower_a_minor_caused_by_change_size() -> None:
    b = {k: v + 1 for k, v in _w().items()}
    decision = decide_bump(diff_weights(_w(), b), override="patch", override_reason="recal")
    assert (decision.bump, decision.computed) == ("patch", "minor")


def test_unknown_override_is_refused() -> None:
    """Input: version-bump=huge."""
    with pytest.raises(VersionOverrideError, match="not one of"):
        decide_bump(None, override="huge", override_reason="x")


def test_next_version_numbers() -> None:
    existing = [(1, 0, 0), (1, 0, 1), (1, 1, 0), (2, 0, 0)]
    assert next_version(existing, (1, 0, 1), "patch") == "1.0.2"
    assert next_version(existing, (1, 0, 1), "minor") == "1.2.0"
    assert next_version(existing, (1, 1, 0), "major") == "3.0.0"
    assert next_version([], None, "patch") == "1.0.0"
