"""Runtime (Opacus) and audit (dp-accounting) accountants agree."""

from __future__ import annotations

import math

import pytest

from fedcommons.privacy.accounting import (
    PLD_TOLERANCE,
    agrees,
    audit_epsilon,
    merge_history,
    runtime_epsilon,
)

HISTORIES = [
    ([(1.1, 0.3, 50)], 1e-5),
    ([(2.0, 1.0, 1)], 1e-5),
    ([(1.0, 0.01, 3000), (1.5, 0.02, 200)], 1e-6),
    ([(0.8, 0.5, 10)], 1e-5),
    ([(5.0, 0.1, 50)], 1e-5),
]


@pytest.mark.parametrize(("history", "delta"), HISTORIES)
def test_rdp_recomputation_with_dp_accounting_matches_opacus_within_1e6(
    history: list[tuple[float, float, int]], delta: float
) -> None:
    runtime = runtime_epsilon(history, delta, "rdp")
    recomputed = audit_epsilon(history, delta, "rdp")
    assert abs(runtime - recomputed) <= 1e-6 * runtime
    assert agrees(runtime, recomputed, "rdp")


@pytest.mark.parametrize(("history", "delta"), HISTORIES[1:2] + HISTORIES[4:])
def test_prv_and_pld_agree_within_their_declared_numerical_error(
    history: list[tuple[float, float, int]], delta: float
) -> None:
    prv = runtime_epsilon(history, delta, "prv")
    pld = audit_epsilon(history, delta, "pld")
    assert abs(prv - pld) <= PLD_TOLERANCE[0] + PLD_TOLERANCE[1] * prv
    assert pld < runtime_epsilon(history, delta, "rdp")  # PLD is the tighter method


def test_single_gaussian_step_z2_gives_the_issue_claim_of_about_1_99() -> None:
    assert audit_epsilon([(2.0, 1.0, 1)], 1e-5, "pld") == pytest.approx(1.99, abs=0.01)


def test_empty_history_spends_nothing_and_zero_noise_is_infinite() -> None:
    assert runtime_epsilon([], 1e-5, "rdp") == 0.0
    assert math.isinf(runtime_epsilon([(0.0, 0.5, 1)], 1e-5, "rdp"))
    assert math.isinf(audit_epsilon([(0.0, 0.5, 1)], 1e-5, "rdp"))


def test_history_merges_consecutive_equal_steps_and_composes() -> None:
    assert merge_history([(1.0, 0.1, 2), (1.0, 0.1, 3), (1.0, 0.2, 1), (1.0, 0.2, 0)]) == [
        (1.0, 0.1, 5),
        (1.0, 0.2, 1),
    ]
    one = runtime_epsilon([(1.0, 0.1, 10)], 1e-5, "rdp")
    two = runtime_epsilon([(1.0, 0.1, 20)], 1e-5, "rdp")
    assert one < two < 2 * one
