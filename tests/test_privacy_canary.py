"""The canary audit: its statistics, and the end-to-end audit of the real coordinator path."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest

from fedcommons.engines.canary_audit import PipelineAuditConfig, run_pipeline_audit
from fedcommons.privacy.audits.canary import (
    GUESS_FRACTIONS,
    claim_falsified,
    guesses,
    p_value,
    steinke_epsilon_bound,
)
from fedcommons.privacy.line import LinePrivacy
from tests.cli_helpers import run_cli

#: The in-suite audit: 300 canaries (about 150 enrolled) + 300 failing institutions, one
#: round of z = 1.5 (claimed ε ≈ 2.76 at δ = 1e-5), 95 % confidence. The noise is pinned so
#: the outcome is reproducible; the strong bugs are caught with this size whatever the
#: noise (40/40 simulated draws), half-noise needs the larger run below.
SMALL = PipelineAuditConfig(canaries=300, dropouts=300, rounds=1, noise_multiplier=1.5, seed=3)


@pytest.fixture
def pinned_noise(monkeypatch: pytest.MonkeyPatch) -> None:
    """The coordinator's DP noise from a fixed seed (the audit itself stays unchanged)."""
    monkeypatch.setattr(
        LinePrivacy, "__init__", functools.partialmethod(LinePrivacy.__init__, noise_seed=11)
    )


def test_perfect_guesses_falsify_a_gaussian_claim_and_chance_guesses_do_not() -> None:
    rng = np.random.default_rng(0)
    enrolled = rng.random(1000) < 0.5
    history = [(2.0, 1.0, 1)]
    perfect = guesses(enrolled.astype(float), enrolled, GUESS_FRACTIONS)
    chance = guesses(rng.random(1000), enrolled, GUESS_FRACTIONS)
    assert claim_falsified(1000, perfect, history)
    assert not claim_falsified(1000, chance, history)


def test_steinke_bound_grows_with_correct_guesses() -> None:
    assert steinke_epsilon_bound(1000, 300, 150, 1e-5) == 0.0
    assert steinke_epsilon_bound(1000, 300, 250, 1e-5) < steinke_epsilon_bound(1000, 300, 300, 1e-5)
    assert p_value(1000, 300, 300, 0.5, 1e-5) < p_value(1000, 300, 200, 0.5, 1e-5)


@pytest.mark.parametrize(
    "bug", [None, "skip-clipping", "noise-for-sum", "denominator-replies", "leak-sample"]
)
def test_pipeline_audit_passes_the_correct_coordinator_and_flags_seeded_bugs(
    tmp_path: Path, pinned_noise: None, bug: str | None
) -> None:
    result = run_pipeline_audit(
        SMALL, seeded_bug=bug, workdir=tmp_path, with_empirical_epsilon=False
    )
    assert result.falsified is (bug is not None), result.to_dict()
    assert (result.leaked_ids > 0) is (bug == "leak-sample")
    assert 2.6 < result.claimed_epsilon < 2.9


@pytest.mark.slow
def test_pipeline_audit_flags_two_fold_under_noising(tmp_path: Path, pinned_noise: None) -> None:
    """z/2: 2,000 canaries, z = 2 (simulated power 39/40 draws at 95 % confidence)."""
    cfg = PipelineAuditConfig(canaries=2000, dropouts=0, rounds=1, noise_multiplier=2.0, seed=5)
    bugged = run_pipeline_audit(cfg, seeded_bug="half-noise", workdir=tmp_path / "bug")
    assert bugged.falsified and bugged.empirical_epsilon > 0
    correct = run_pipeline_audit(cfg, workdir=tmp_path / "ok")
    assert not correct.falsified
    assert correct.empirical_epsilon < correct.claimed_epsilon < bugged.empirical_epsilon


def test_audit_canary_cli_exits_2_when_a_seeded_bug_leaks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], pinned_noise: None
) -> None:
    argv = ["audit", "canary", "--canaries", "200", "--dropouts", "200", "--rounds", "1"]
    argv += ["-z", "1.5", "--seed", "1", "--no-empirical", "--format", "json"]
    code, out, err = run_cli([*argv, "--seeded-bug", "skip-clipping"], capsys)
    assert code == 2 and "falsify the claimed guarantee" in out + err
