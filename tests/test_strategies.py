"""Built-in aggregators: the conformance kit plus the rules' defining properties."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from fedcommons.errors import ConfigError, RoundFailedError, StrategyError
from fedcommons.strategies import (
    FedAdam,
    FedAvg,
    FisherMerge,
    MaskAligned,
    Median,
    MultiKrum,
    TrimmedMean,
    check_step,
    guarded_finalize,
    guarded_fold,
)
from fedcommons.strategies import testing as kit
from fedcommons.wire.update import ClientUpdate

CONFORMANCE = {
    "fedavg": (FedAvg, kit.reference_fedavg),
    "fedavg-clipped-large": (lambda: FedAvg(clip_norm=1e9), kit.reference_fedavg),
    "fisher": (FisherMerge, kit.reference_fisher),
    "fisher-eps": (lambda: FisherMerge(epsilon=1e-2), partial(kit.reference_fisher, epsilon=1e-2)),
    "mask-aligned": (MaskAligned, kit.reference_mask_aligned),
    "ties": (
        lambda: MaskAligned(sign_election=True),
        partial(kit.reference_mask_aligned, sign_election=True),
    ),
    "ties-min-votes": (
        lambda: MaskAligned(sign_election=True, min_votes=3),
        partial(kit.reference_mask_aligned, sign_election=True, min_votes=3),
    ),
    "median": (Median, kit.reference_median),
    "trimmed-mean": (
        lambda: TrimmedMean(beta=0.2),
        partial(kit.reference_trimmed_mean, beta=0.2),
    ),
    "multi-krum": (MultiKrum, kit.reference_multi_krum),
    "krum": (lambda: MultiKrum(f=2, m=1), partial(kit.reference_multi_krum, f=2, m=1)),
    "fedavgm": (lambda: FedAvg(server_momentum=0.9), None),
    "fedadam": (FedAdam, None),
}


@pytest.mark.parametrize("name", sorted(CONFORMANCE))
def test_builtin_passes_conformance_kit(name: str) -> None:
    factory, reference = CONFORMANCE[name]
    ran = kit.run_conformance(factory, reference=reference)
    assert "check_finite" in ran
    if reference is not None:
        assert "check_streaming_matches_batch" in ran


def test_kit_catches_an_order_dependent_strategy() -> None:
    class LastWins(FedAvg):
        name = "last-wins"

        def fold(self, update: ClientUpdate) -> None:
            self._last = {k: v.clone() for k, v in update.delta.items()}
            self.num_folded += 1

        def finalize(self) -> dict[str, torch.Tensor]:
            return self._last

    with pytest.raises(AssertionError, match=r"permuted order|reversed order"):
        kit.check_permutation_invariance(LastWins)


def test_kit_catches_state_growing_with_clients() -> None:
    class Hoarder(FedAvg):
        name = "hoarder"

        def begin(self, base):  # type: ignore[no-untyped-def]
            super().begin(base)
            self.kept: list = []

        def fold(self, update: ClientUpdate) -> None:
            super().fold(update)
            self.kept.append({k: v.clone() for k, v in update.delta.items()})

    with pytest.raises(AssertionError, match=r"not O\(model\)"):
        kit.check_state_is_o_model(Hoarder)


def test_fedavg_counts_compression_zeros_as_votes() -> None:
    base = {"w": torch.zeros(2)}
    a = ClientUpdate({"w": torch.tensor([2.0, 0.0])}, 1, mask={"w": torch.tensor([True, False])})
    b = ClientUpdate({"w": torch.tensor([4.0, 6.0])}, 1)
    assert FedAvg().aggregate(base, [a, b])["w"].tolist() == [3.0, 3.0]
    assert MaskAligned().aggregate(base, [a, b])["w"].tolist() == [3.0, 6.0]


def test_ties_sign_election_drops_disagreeing_entries() -> None:
    base = {"w": torch.zeros(3)}
    ups = [
        ClientUpdate({"w": torch.tensor([1.0, -1.0, 2.0])}, 1),
        ClientUpdate({"w": torch.tensor([3.0, -3.0, -1.0])}, 1),
        ClientUpdate({"w": torch.tensor([-2.0, 5.0, -1.0])}, 1),
    ]
    step = MaskAligned(sign_election=True).aggregate(base, ups)["w"]
    # sums: 2 (> 0: mean of 1, 3), 1 (> 0: only 5), 0 (tie: no sign, keeps base)
    assert step.tolist() == [2.0, 5.0, 0.0]


def test_min_votes_keeps_base_where_too_few_clients_sent() -> None:
    base = {"w": torch.zeros(2)}
    m = {"w": torch.tensor([True, False])}
    ups = [
        ClientUpdate({"w": torch.tensor([1.0, 0.0])}, 1, mask=m),
        ClientUpdate({"w": torch.tensor([3.0, 5.0])}, 1),
    ]
    assert MaskAligned(min_votes=2).aggregate(base, ups)["w"].tolist() == [2.0, 0.0]


def test_fisher_weights_coordinates_by_normalised_fisher() -> None:
    base = {"w": torch.zeros(2)}
    a = ClientUpdate({"w": torch.tensor([1.0, 1.0])}, 1, fisher={"w": torch.tensor([3.0, 0.0])})
    b = ClientUpdate({"w": torch.tensor([-1.0, -1.0])}, 1, fisher={"w": torch.tensor([0.0, 4.0])})
    step = FisherMerge().aggregate(base, [a, b])["w"]
    # F̃a = [1, ε], F̃b = [ε, 1]: each coordinate follows the client that is sure of it.
    assert step[0] == pytest.approx(1.0, abs=1e-5)
    assert step[1] == pytest.approx(-1.0, abs=1e-5)


def test_fisher_uniform_lambda_ignores_example_counts() -> None:
    base = {"w": torch.zeros(1)}
    f = {"w": torch.ones(1)}
    ups = [
        ClientUpdate({"w": torch.tensor([1.0])}, 9, fisher=f),
        ClientUpdate({"w": torch.tensor([0.0])}, 1, fisher=f),
    ]
    assert FisherMerge().aggregate(base, ups)["w"].item() == pytest.approx(0.9)
    assert FisherMerge(uniform=True).aggregate(base, ups)["w"].item() == pytest.approx(0.5)


def test_fisher_fold_without_fisher_is_refused() -> None:
    """Input: an update with fisher=None folded into the Fisher merge."""
    agg = FisherMerge()
    agg.begin({"w": torch.zeros(1)})
    with pytest.raises(StrategyError, match=r"fisher.*carries no Fisher"):
        guarded_fold(agg, ClientUpdate({"w": torch.ones(1)}, 1))


def test_clip_norm_bounds_each_update() -> None:
    base = {"w": torch.zeros(2)}
    ups = [ClientUpdate({"w": torch.tensor([30.0, 40.0])}, 1)]
    assert FedAvg(clip_norm=5.0).aggregate(base, ups)["w"].tolist() == pytest.approx([3.0, 4.0])


def test_median_resists_one_outlier() -> None:
    base = {"w": torch.zeros(1)}
    ups = [ClientUpdate({"w": torch.tensor([v])}, 1) for v in (1.0, 2.0, 1e6)]
    assert Median().aggregate(base, ups)["w"].item() == 2.0
    assert TrimmedMean(beta=0.34).aggregate(base, ups)["w"].item() == 2.0


def test_multi_krum_leaves_out_scaled_and_sign_flipped_updates() -> None:
    """Input: 7 honest updates near (1, 1), one ×10 sign flip, one ×50 scaled, K = 9, f = 2."""
    gen = torch.Generator().manual_seed(0)
    base = {"w": torch.zeros(2)}
    honest = [torch.ones(2) + 0.1 * torch.randn(2, generator=gen) for _ in range(7)]
    ups = [ClientUpdate({"w": h}, 10, node_id=i) for i, h in enumerate(honest)]
    ups.append(ClientUpdate({"w": -10 * honest[0]}, 10, node_id=7))
    ups.append(ClientUpdate({"w": 50 * honest[1]}, 10, node_id=8))
    agg = MultiKrum(f=2)
    step = agg.aggregate(base, ups)["w"]
    assert agg.selected == list(range(7))
    assert torch.allclose(step, torch.stack(honest).mean(0))


def test_multi_krum_parameters_are_checked() -> None:
    """Input: f = -1, f = 1.5, m = -2."""
    with pytest.raises(ConfigError, match="f must be"):
        MultiKrum(f=-1)
    with pytest.raises(ConfigError, match="f must be"):
        MultiKrum(f=1.5)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="m must be"):
        MultiKrum(m=-2)


def test_fedavgm_accumulates_momentum_across_rounds() -> None:
    base = {"w": torch.zeros(1)}
    agg = FedAvg(server_momentum=0.5)
    one = [ClientUpdate({"w": torch.ones(1)}, 1)]
    assert agg.aggregate(base, one)["w"].item() == 1.0
    assert agg.aggregate(base, one)["w"].item() == 1.5


def test_fedadam_step_is_bounded_by_server_lr() -> None:
    base = {"w": torch.zeros(3)}
    agg = FedAdam(server_lr=0.1)
    step = agg.aggregate(base, [ClientUpdate({"w": torch.tensor([100.0, -1.0, 0.0])}, 1)])["w"]
    assert step.abs().max().item() <= 0.1 + 1e-6
    assert step[0] > 0 > step[1]


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (lambda: FedAvg(server_lr=0), "server_lr"),
        (lambda: FedAvg(server_momentum=1.0), "server_momentum"),
        (lambda: FedAvg(clip_norm=-1), "clip_norm"),
        (lambda: FisherMerge(epsilon=0), "epsilon"),
        (lambda: MaskAligned(min_votes=0), "min_votes"),
        (lambda: MaskAligned(density=0), "density"),
        (lambda: TrimmedMean(beta=0.5), "beta"),
        (lambda: FedAdam(tau=0), "tau"),
    ],
)
def test_bad_parameter_values_are_config_errors(factory, match: str) -> None:
    """Input: out-of-range parameter values (0, negative, ≥ 1 where a fraction)."""
    with pytest.raises(ConfigError, match=match):
        factory()


def test_finalize_without_updates_fails_the_round() -> None:
    """Input: finalize() right after begin(), no update folded."""
    for cls in (FedAvg, FisherMerge, MaskAligned, Median):
        agg = cls()
        agg.begin({"w": torch.zeros(1)})
        with pytest.raises(RoundFailedError):
            guarded_finalize(agg, {"w": torch.zeros(1)})


@pytest.mark.parametrize(
    ("step", "match"),
    [
        ({"w": torch.zeros(3)}, "shape"),
        ({"w": torch.zeros(2, dtype=torch.float64)}, "dtype"),
        ({"w": torch.tensor([0.0, float("nan")])}, "NaN"),
        ({}, "missing"),
        ([torch.zeros(2)], "not a dict"),
    ],
)
def test_check_step_rejects_malformed_steps(step: object, match: str) -> None:
    """Input: finalize() results with a wrong shape, dtype, NaN, missing tensor, a list."""
    with pytest.raises(StrategyError, match=match):
        check_step(step, {"w": torch.zeros(2)}, "bad", "plugin x 1.0")


def test_mask_aligned_density_trims_small_entries() -> None:
    base = {"w": torch.zeros(4)}
    ups = [ClientUpdate({"w": torch.tensor([4.0, -0.1, 0.2, 3.0])}, 1)]
    step = MaskAligned(density=0.5).aggregate(base, ups)["w"]
    assert step.tolist() == pytest.approx([4.0, 0.0, 0.0, 3.0])
