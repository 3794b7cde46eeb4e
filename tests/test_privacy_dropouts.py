"""50 rounds with 30 % of sampled clients dropping: never under-noised, ledger reproduces."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedcommons.errors import PrivacyBudgetExceededError
from fedcommons.privacy.audits.ledger_audit import audit_ledger
from fedcommons.privacy.config import CentralDPConfig
from fedcommons.privacy.line import LinePrivacy
from fedcommons.strategies import FedAvg
from fedcommons.wire.update import ClientUpdate

BASE = {"w": torch.zeros(64), "b": torch.zeros(10)}


def _line(tmp_path: Path, cfg: CentralDPConfig, **kwargs: object) -> LinePrivacy:
    """A line sampling 10 of a declared population of 20 per round."""
    return LinePrivacy(tmp_path, "digits", cfg, clients_per_round=10, population=20, **kwargs)  # type: ignore[arg-type]


def _run(line: LinePrivacy, rounds: int, dropout: float, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    nodes = list(range(100, 120))
    entries = []
    for r in range(1, rounds + 1):
        sample = line.sample(nodes)
        sampled = sample.nodes
        agg = line.start_round(
            r,
            FedAvg(),
            population=len(nodes),
            sampled=len(sampled),
            sample_rate=sample.sample_rate,
            expected=sample.expected,
        )
        agg.begin(BASE)
        replied = [n for n in sampled if rng.random() >= dropout]
        for n in replied:
            delta = {
                k: torch.randn(v.shape, generator=torch.Generator().manual_seed(n))
                for k, v in BASE.items()
            }
            agg.fold(ClientUpdate(delta, 1, n))
        agg.finalize()
        entry = line.commit_round(
            accepted=len(replied), rejected=0, timed_out=len(sampled) - len(replied)
        )
        assert entry is not None
        entries.append({**entry, "private": line.private_round})
    return entries


def test_fifty_rounds_with_30pct_dropouts_keep_effective_noise_at_least_configured(
    tmp_path: Path,
) -> None:
    cfg = CentralDPConfig(noise_multiplier=1.1, clip_norm=1.0, epsilon=50.0, delta=1e-5)
    line = _line(tmp_path, cfg, rng=np.random.default_rng(1), noise_seed=5)
    entries = _run(line, 50, dropout=0.3)
    assert len(entries) == 50
    private = [e["private"] for e in entries]  # the counts stay in the coordinator's records
    dropped = sum(p["sampled"] - p["participating"] for p in private)
    assert dropped > 0.2 * sum(p["sampled"] for p in private)
    assert not {"sampled", "participating", "dropped", "fraction_clipped"} & set(entries[0])
    for e in entries:
        assert e["effective_noise_multiplier"] >= cfg.noise_multiplier
        assert e["denominator"] == e["expected_participants"] == 10.0
        assert e["sample_rate"] == 0.5 and e["amplification"] is True
    assert [e["epsilon"] for e in entries] == sorted(e["epsilon"] for e in entries)
    # the independent recomputation reproduces every round's ε within 1e-6
    audit = audit_ledger(tmp_path, line.manifest_privacy())
    assert len(audit.rounds) == 50
    for check in audit.rounds:
        gap = abs(check.recorded_epsilon - check.recomputed_epsilon)
        assert gap <= 1e-6 * check.recorded_epsilon
    assert audit.epsilon_pld < audit.epsilon_rdp


def test_round_past_the_line_budget_is_refused_before_it_starts(tmp_path: Path) -> None:
    """Tried: a 4th round when 3 rounds at z=1, q=0.5 already spend most of ε=7."""
    cfg = CentralDPConfig(noise_multiplier=1.0, clip_norm=1.0, epsilon=7.0, delta=1e-5)
    line = _line(tmp_path, cfg, rng=np.random.default_rng(0))
    _run(line, 3, dropout=0.0)
    spent = line.spent()
    with pytest.raises(PrivacyBudgetExceededError, match="round 4 refused before it started"):
        _run_one_more(line, 4)
    assert line.ledger.head()[0] == 3  # nothing was recorded for the refused round
    assert line.spent() == spent


def _run_one_more(line: LinePrivacy, round_no: int) -> None:
    line.start_round(round_no, FedAvg(), population=20, sampled=10, sample_rate=0.5, expected=10)


def test_fixed_sampling_is_accounted_without_amplification(tmp_path: Path) -> None:
    cfg = CentralDPConfig(
        noise_multiplier=2.0, clip_norm=1.0, epsilon=50.0, delta=1e-5, sampling="fixed"
    )
    line = _line(tmp_path, cfg, rng=np.random.default_rng(0))
    entries = _run(line, 2, dropout=0.3)
    assert all(e["sample_rate"] == 1.0 and e["amplification"] is False for e in entries)
    assert all(e["private"]["sampled"] == 10 for e in entries)
    assert all(e["sensitivity"] == 2.0 for e in entries)  # 2C: a fixed sample swaps members
    assert "no amplification" in line.manifest_privacy()["guarantee"]
    audit = audit_ledger(tmp_path, line.manifest_privacy())  # Δ derived from the scheme
    assert [c.sensitivity for c in audit.rounds] == [2.0, 2.0]
    assert min(c.effective_noise_multiplier for c in audit.rounds) == pytest.approx(2.0)


def test_a_run_that_cannot_fit_the_budget_is_refused_at_configuration(tmp_path: Path) -> None:
    """Tried: 50 fixed-sampling rounds at z=1 against ε=5: refused, with how many fit."""
    cfg = CentralDPConfig(
        noise_multiplier=1.0, clip_norm=1.0, epsilon=5.0, delta=1e-5, sampling="fixed"
    )
    with pytest.raises(PrivacyBudgetExceededError, match=r"round\(s\) fit"):
        _line(tmp_path, cfg).check_plan(50)


def test_model_card_section_states_the_guarantee(tmp_path: Path) -> None:
    from fedcommons.privacy.line import model_card_section

    cfg = CentralDPConfig(noise_multiplier=1.0, clip_norm=1.0, epsilon=50.0, delta=1e-5)
    line = _line(tmp_path, cfg, rng=np.random.default_rng(0))
    _run(line, 2, dropout=0.0)
    privacy = line.manifest_privacy()
    card = model_card_section(privacy)
    assert privacy["guarantee"] in card
    assert f"{privacy['central']['epsilon']:.6g} at 1e-05" in card
    assert "No differential privacy" in model_card_section({})


def test_poisson_run_that_cannot_fit_is_refused_at_configuration(tmp_path: Path) -> None:
    """Tried: 30 Poisson rounds (q = 10/20 declared, z = 1) against ε = 8: refused up front."""
    cfg = CentralDPConfig(noise_multiplier=1.0, clip_norm=1.0, epsilon=8.0, delta=1e-5)
    line = _line(tmp_path, cfg)
    with pytest.raises(PrivacyBudgetExceededError, match=r"Poisson sampling q=0.5.*fit"):
        line.check_plan(30)  # q is public: known before any node connects
    assert not line.ledger.exists()


def _one_round(line: LinePrivacy, round_no: int) -> None:
    agg = line.start_round(
        round_no, FedAvg(), population=20, sampled=10, sample_rate=0.5, expected=10
    )
    agg.begin(BASE)
    agg.fold(ClientUpdate({k: torch.ones(v.shape) for k, v in BASE.items()}, 1, 1))
    agg.finalize()


def test_concurrent_coordinators_on_one_line_compose_in_ledger_order(tmp_path: Path) -> None:
    """Tried: two runs start a round on the same line before either commits."""
    cfg = CentralDPConfig(noise_multiplier=1.0, clip_norm=1.0, epsilon=50.0, delta=1e-5)
    a, b = _line(tmp_path, cfg), _line(tmp_path, cfg)
    _one_round(a, 1)
    _one_round(b, 1)
    first = a.commit_round(accepted=1, rejected=0, timed_out=9)
    second = b.commit_round(accepted=1, rejected=0, timed_out=9)
    assert first is not None and second is not None
    assert second["epsilon"] > first["epsilon"]  # b's entry counts a's round
    assert len(audit_ledger(tmp_path, b.manifest_privacy()).rounds) == 2


def test_round_left_without_budget_by_a_concurrent_run_is_discarded(tmp_path: Path) -> None:
    """Tried: two runs each pass the pre-round check for the last round the budget allows."""
    cfg = CentralDPConfig(noise_multiplier=1.0, clip_norm=1.0, epsilon=4.5, delta=1e-5)
    a, b = _line(tmp_path, cfg), _line(tmp_path, cfg)
    _one_round(a, 1)
    _one_round(b, 1)
    a.commit_round(accepted=1, rejected=0, timed_out=9)
    with pytest.raises(PrivacyBudgetExceededError, match="discarded before release"):
        b.commit_round(accepted=1, rejected=0, timed_out=9)
    assert a.ledger.head()[0] == 1


def test_prv_ledger_is_recomputed_with_pld_within_the_methods_error(tmp_path: Path) -> None:
    cfg = CentralDPConfig(
        noise_multiplier=1.2, clip_norm=1.0, epsilon=50.0, delta=1e-5, accountant="prv"
    )
    line = _line(tmp_path, cfg, rng=np.random.default_rng(0))
    entries = _run(line, 3, dropout=0.3)
    assert all(e["accountant"] == "opacus-prv" for e in entries)
    audit = audit_ledger(tmp_path, line.manifest_privacy())
    assert audit.method == "dp-accounting-pld"
    assert abs(audit.recomputed_epsilon - entries[-1]["epsilon"]) < 0.03
