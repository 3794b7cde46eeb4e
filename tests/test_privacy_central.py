"""DP-FedAvg: clipping, fixed denominator, noise calibrated to the expected participants."""

from __future__ import annotations

import math

import pytest
import torch

from fedcommons.errors import PrivacyConfigError
from fedcommons.privacy.central import DPFedAvg, clip_delta, poisson_sample
from fedcommons.strategies import FedAvg
from fedcommons.wire.update import ClientUpdate

BASE = {"a": torch.zeros(3), "b": torch.zeros(2, 2)}


def _update(scale: float, n: int = 10) -> ClientUpdate:
    return ClientUpdate({"a": torch.full((3,), scale), "b": torch.full((2, 2), scale)}, n)


def test_clip_bounds_the_l2_norm_over_all_tensors() -> None:
    clipped, norm, was = clip_delta(_update(1.0).delta, 0.5)
    assert was and norm == pytest.approx(math.sqrt(7))
    total = math.sqrt(sum(float((t * t).sum()) for t in clipped.values()))
    assert total == pytest.approx(0.5)
    small, _, was_small = clip_delta(_update(0.01).delta, 0.5)
    assert not was_small and float(small["a"][0]) == pytest.approx(0.01)


def test_mean_divides_by_expected_participants_not_by_replies() -> None:
    """Two replies of an expected four: the mean is their sum over 4 (z = 0: no noise)."""
    mech = DPFedAvg(None, noise_multiplier=0.0, clip_norm=100.0, expected_participants=4)
    mech.begin(BASE)
    mech.fold(_update(1.0, n=5))
    mech.fold(_update(3.0, n=500))  # user-level: example counts do not weight
    step = mech.finalize()
    assert torch.allclose(step["a"], torch.full((3,), 1.0))  # (1 + 3) / 4
    assert mech.stats is not None and mech.stats.denominator == 4


def test_noise_std_is_z_c_over_expected_participants_whatever_replies() -> None:
    big = {"w": torch.zeros(200_000)}
    mech = DPFedAvg(None, noise_multiplier=2.0, clip_norm=0.5, expected_participants=10, seed=3)
    mech.begin(big)
    mech.fold(ClientUpdate({"w": torch.zeros(200_000)}, 1))  # 1 of 10 replied
    out = mech.finalize()["w"]
    assert float(out.std()) == pytest.approx(2.0 * 0.5 / 10, rel=0.01)
    assert mech.stats is not None
    assert mech.stats.effective_noise_multiplier == pytest.approx(2.0)


def test_fixed_size_sensitivity_doubles_the_noise_at_the_same_z() -> None:
    """Δ = 2C (a fixed-size sample swaps members): std = z·2C/W, effective z stays z."""
    big = {"w": torch.zeros(200_000)}
    mech = DPFedAvg(
        None, noise_multiplier=2.0, clip_norm=0.5, sensitivity=1.0, expected_participants=10
    )
    mech.begin(big)
    out = mech.finalize()["w"]
    assert float(out.std()) == pytest.approx(2.0 * 1.0 / 10, rel=0.01)
    assert mech.stats is not None and mech.stats.effective_noise_multiplier == pytest.approx(2.0)


@pytest.mark.parametrize(
    ("bug", "expected_std"),
    [("half-noise", 0.1), ("noise-for-sum", 0.2 / 10), ("denominator-replies", 0.2)],
)
def test_seeded_bugs_change_what_is_released_but_not_what_is_recorded(
    bug: str, expected_std: float
) -> None:
    """A silent bug: the released noise differs, the stats still claim z·C/W = 0.2."""
    mech = DPFedAvg(
        None, noise_multiplier=2.0, clip_norm=1.0, expected_participants=10, seeded_bug=bug, seed=1
    )
    mech.begin({"w": torch.zeros(200_000)})
    mech.fold(ClientUpdate({"w": torch.zeros(200_000)}, 1))  # one reply of W = 10
    out = mech.finalize()["w"]
    if bug == "denominator-replies":  # divided by 1 reply: the noise on the mean is 0.2·10/10
        expected_std = 0.2
    assert float(out.std()) == pytest.approx(expected_std, rel=0.02)
    assert mech.stats is not None and mech.stats.noise_std == pytest.approx(0.2)
    assert mech.stats.effective_noise_multiplier == pytest.approx(2.0)


def test_skip_clipping_bug_folds_the_update_unclipped() -> None:
    mech = DPFedAvg(
        None,
        noise_multiplier=0.0,
        clip_norm=1.0,
        expected_participants=1,
        seeded_bug="skip-clipping",
    )
    mech.begin(BASE)
    mech.fold(_update(10.0))
    step = mech.finalize()
    assert float(torch.cat([v.flatten() for v in step.values()]).norm()) > 5.0


def test_inner_strategy_post_processes_the_noisy_mean() -> None:
    """FedAvg with server_lr 0.5 halves the (noise-free) DP mean."""
    mech = DPFedAvg(
        FedAvg(server_lr=0.5), noise_multiplier=0.0, clip_norm=100.0, expected_participants=2
    )
    mech.begin(BASE)
    mech.fold(_update(2.0))
    step = mech.finalize()
    assert torch.allclose(step["b"], torch.full((2, 2), 0.5))  # 0.5 · 2 / 2
    assert step["b"].dtype == torch.float32


def test_mechanism_rejects_bad_parameters() -> None:
    """Tried: z < 0, C = 0, zero expected participants, Δ < C, an unknown seeded bug."""
    with pytest.raises(PrivacyConfigError):
        DPFedAvg(None, noise_multiplier=-1, clip_norm=1, expected_participants=1)
    with pytest.raises(PrivacyConfigError):
        DPFedAvg(None, noise_multiplier=1, clip_norm=0, expected_participants=1)
    with pytest.raises(PrivacyConfigError):
        DPFedAvg(None, noise_multiplier=1, clip_norm=1, expected_participants=0)
    with pytest.raises(PrivacyConfigError):
        DPFedAvg(None, noise_multiplier=1, clip_norm=1, sensitivity=0.5, expected_participants=1)
    with pytest.raises(PrivacyConfigError):
        DPFedAvg(None, noise_multiplier=1, clip_norm=1, expected_participants=1, seeded_bug="x")


def test_poisson_sampling_includes_each_node_with_its_rate() -> None:
    rng = __import__("numpy").random.default_rng(0)
    nodes = list(range(1000))
    counts = [len(poisson_sample(nodes, 0.3, rng)) for _ in range(20)]
    assert 250 < sum(counts) / 20 < 350
    assert poisson_sample(nodes, 1.0, rng) == nodes
