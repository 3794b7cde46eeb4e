"""The conformance kit reports every check accurately and catches subtle plugin bugs."""

from __future__ import annotations

import unittest

import pytest

from fedcommons.strategies import FedAvg, strategy
from fedcommons.strategies import testing as kit

_SEEN_NORMS: list[float] = []  # the bug under test: per-update state in a module global


class NormLogging(FedAvg):
    """FedAvg that keeps every update's norm in a Python list (O(K) floats)."""

    name = "norm-logging"

    def begin(self, base):
        super().begin(base)
        self.norms: list[float] = []

    def fold(self, update):
        self.norms.append(float(sum(v.double().norm() for v in update.delta.values())))
        super().fold(update)


class GlobalLogging(FedAvg):
    """FedAvg that appends each update's example count to a module-level list."""

    name = "global-logging"

    def fold(self, update):
        _SEEN_NORMS.append(float(update.num_examples))
        super().fold(update)


@strategy("pick-smallest")
def pick_smallest(updates, base, *, scale: float = 1.0):
    """Δ* = the update of smallest norm (ties: the first to arrive)."""
    best = min(updates, key=lambda u: round(sum(float(v.norm()) for v in u.delta.values()), 9))
    return {k: (scale * best.delta[k]).to(v.dtype) for k, v in base.items()}


@strategy("plain-mean")
def plain_mean(updates, base, *, scale: float = 1.0):
    """Δ* = scale · Σ nΔ / Σ n."""
    total = sum(u.num_examples for u in updates)
    return {
        k: (scale * sum(u.num_examples * u.delta[k].double() for u in updates) / total).to(v.dtype)
        for k, v in base.items()
    }


class TwoBugs(FedAvg):
    """Returns float64 steps for float32 tensors and scales deltas in place."""

    name = "two-bugs"

    def finalize(self):
        return {k: v.double() for k, v in super().finalize().items()}

    def fold(self, update):
        update.delta[next(iter(update.delta))].mul_(0.5)  # clips in place
        super().fold(update)


def test_python_scalars_growing_with_k_fail_the_o_model_check() -> None:
    with pytest.raises(AssertionError, match="state grew"):
        kit.check_state_is_o_model(NormLogging)


def test_per_update_state_in_module_globals_fails_the_o_model_check() -> None:
    with pytest.raises(AssertionError, match="module globals grew"):
        kit.check_state_is_o_model(GlobalLogging)


def test_tie_breaking_by_arrival_fails_although_random_inputs_pass() -> None:
    kit.check_permutation_invariance(pick_smallest)  # random inputs never tie
    with pytest.raises(AssertionError, match="order of tied updates"):
        kit.check_ties_do_not_make_results_order_dependent(pick_smallest)


def test_run_conformance_runs_every_check_and_lists_every_failure() -> None:
    with pytest.raises(AssertionError) as info:
        kit.run_conformance(TwoBugs)
    text = str(info.value)
    assert "FAILED  check_shapes_and_dtypes" in text
    assert "FAILED  check_leaves_inputs_untouched" in text
    assert "FAILED  check_single_update_identity" in text  # the last check ran too
    assert "passed  check_state_is_o_model" in text


def test_skipped_checks_are_reported_with_their_reason_not_as_run() -> None:
    report = kit.run_conformance(plain_mean)  # buffered: streaming = False
    assert "check_state_is_o_model" not in report
    assert "streaming = False" in report.skipped["check_state_is_o_model"]
    assert report.skipped["check_streaming_matches_batch"] == "no reference= given"
    assert "check_finite" in report and not report.failed


def test_a_skipped_check_called_alone_is_a_pytest_skip() -> None:
    with pytest.raises(unittest.SkipTest) as info:  # what pytest reports as a skip
        kit.check_state_is_o_model(plain_mean)
    assert isinstance(info.value, kit.CheckSkipped)


def test_configured_function_plugin_runs_through_the_kit() -> None:
    report = kit.run_conformance(lambda: plain_mean.aggregator(scale=1.0))
    assert "check_single_update_identity" in report
    with pytest.raises(AssertionError, match="check_single_update_identity"):
        kit.run_conformance(lambda: plain_mean.aggregator(scale=2.0))
