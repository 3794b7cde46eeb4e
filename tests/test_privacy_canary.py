"""The one-run canary audit: a sound mechanism passes, both seeded bugs are caught."""

from __future__ import annotations

import pytest

from fedcommons.privacy.canary import epsilon_lower_bound, p_value, run_canary_audit
from tests.cli_helpers import run_cli


def test_correct_dp_fedavg_keeps_the_lower_bound_below_the_claim() -> None:
    result = run_canary_audit(num_params=20_000, canaries=1_000, noise_multiplier=2.0, seed=0)
    assert result.claimed_epsilon == pytest.approx(1.99, abs=0.01)
    assert 0.0 < result.epsilon_lower_bound < result.claimed_epsilon
    assert result.passed


@pytest.mark.parametrize("bug", ["skip-clipping", "noise-for-sum"])
def test_seeded_bug_pushes_the_lower_bound_above_the_claim(bug: str) -> None:
    result = run_canary_audit(
        num_params=20_000, canaries=1_000, noise_multiplier=2.0, seed=0, seeded_bug=bug
    )
    assert result.epsilon_lower_bound > result.claimed_epsilon
    assert result.epsilon_lower_bound > 4.0
    assert not result.passed


def test_lower_bound_is_zero_for_chance_guessing_and_grows_with_accuracy() -> None:
    assert epsilon_lower_bound(1000, 300, 150, 1e-5) == 0.0
    assert epsilon_lower_bound(1000, 300, 200, 1e-5) < epsilon_lower_bound(1000, 300, 250, 1e-5)
    assert p_value(1000, 300, 300, 0.0, 0.0) == pytest.approx(0.5**300)


def test_audit_canary_cli_exits_2_when_a_seeded_bug_leaks(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, _, err = run_cli(
        ["audit", "canary", "--params", "5000", "--seeded-bug", "skip-clipping"], capsys
    )
    assert code == 2
    assert "exceeds the claimed" in err
