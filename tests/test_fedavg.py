import pytest
import torch

from fedcommons.errors import RoundFailedError, UnknownStrategyError
from fedcommons.strategies import FedAvg, create_strategy
from fedcommons.wire import ClientUpdate

BASE = {"w": torch.zeros(3, 2), "b": torch.zeros(2)}


def _update(value: float, n: int) -> ClientUpdate:
    return ClientUpdate({k: torch.full_like(v, value) for k, v in BASE.items()}, n)


def test_fedavg_is_the_example_weighted_mean_of_deltas() -> None:
    agg = FedAvg()
    agg.begin(BASE)
    agg.fold(_update(1.0, 10))
    agg.fold(_update(4.0, 30))
    step = agg.finalize()
    assert torch.allclose(step["w"], torch.full((3, 2), (10 * 1 + 30 * 4) / 40))
    assert step["b"].dtype == torch.float32


def test_server_learning_rate_scales_the_step() -> None:
    agg = FedAvg(server_lr=0.5)
    agg.begin(BASE)
    agg.fold(_update(2.0, 1))
    assert torch.allclose(agg.finalize()["b"], torch.full((2,), 1.0))


def test_fedavg_result_does_not_depend_on_arrival_order() -> None:
    gen = torch.Generator().manual_seed(0)
    updates = [
        ClientUpdate({k: torch.randn(v.shape, generator=gen) for k, v in BASE.items()}, n)
        for n in (3, 17, 101, 5)
    ]
    results = []
    for order in ([0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1]):
        agg = FedAvg()
        agg.begin(BASE)
        for i in order:
            agg.fold(updates[i])
        results.append(agg.finalize())
    for other in results[1:]:
        assert all(torch.equal(results[0][k], other[k]) for k in BASE)


def test_fedavg_state_stays_one_copy_of_the_model() -> None:
    agg = FedAvg()
    agg.begin(BASE)
    for i in range(200):
        agg.fold(_update(float(i), 1))
    state_numel = sum(t.numel() for t in agg._sum.values())
    assert state_numel == sum(t.numel() for t in BASE.values())


def test_finalize_without_updates_fails_the_round() -> None:
    agg = FedAvg()
    agg.begin(BASE)
    with pytest.raises(RoundFailedError):
        agg.finalize()


def test_unknown_strategy_lists_the_available_ones() -> None:
    """Input tried: strategy 'fedsgd'."""
    with pytest.raises(UnknownStrategyError, match=r"available: .*\bfedavg\b"):
        create_strategy("fedsgd")


@pytest.mark.parametrize("accumulate", ["float64", "float32"])
def test_next_round_reuses_the_sum_without_touching_the_returned_step(accumulate: str) -> None:
    agg = FedAvg(accumulate=accumulate)
    agg.begin(BASE)
    agg.fold(_update(2.0, 1))
    first = agg.finalize()
    kept = {k: v.clone() for k, v in first.items()}
    agg.begin(BASE)  # zeroes the round's sum: must not zero the step handed out
    agg.fold(_update(6.0, 3))
    second = agg.finalize()
    assert all(torch.equal(first[k], kept[k]) for k in BASE)
    assert torch.allclose(second["w"], torch.full((3, 2), 6.0))


def test_float64_sum_is_allocated_once_across_rounds() -> None:
    agg = FedAvg()
    agg.begin(BASE)
    pointers = {k: v.data_ptr() for k, v in agg._sum.items()}
    agg.fold(_update(1.0, 1))
    agg.finalize()
    agg.begin(BASE)
    assert {k: v.data_ptr() for k, v in agg._sum.items()} == pointers
    agg.begin({"other": torch.zeros(4)})  # new architecture: new sum
    assert list(agg._sum) == ["other"]


def test_fedadam_checkpoint_restores_both_moments_and_not_the_round_sum() -> None:
    agg = create_strategy("fedadam", {"server_lr": 0.1})
    agg.begin(BASE)
    agg.fold(_update(1.0, 2))
    agg.finalize()
    tensors, meta = agg.checkpoint_state()
    assert {name.split("/")[0] for name in tensors} == {"momentum", "second_moment"}
    resumed = create_strategy("fedadam", {"server_lr": 0.1})
    resumed.load_checkpoint_state(tensors, meta)
    for a in (agg, resumed):
        a.begin(BASE)
        a.fold(_update(-3.0, 1))
    expected, got = agg.finalize(), resumed.finalize()
    assert all(torch.equal(expected[k], got[k]) for k in BASE)


def _reference_sum(base: dict, updates: list, weights: list) -> dict:
    """The float64 sum as torch computes it: acc.add_(float64(Δ), alpha=n), in order."""
    acc = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in base.items()}
    for delta, n in zip(updates, weights, strict=True):
        for k in acc:
            acc[k].add_(delta[k].to(torch.float64), alpha=n)
    return acc


@pytest.mark.parametrize("spec", ["dense", "int8", "int4:64", "topk:0.05+int8", "randk:0.3+fp16"])
def test_batched_fold_of_encoded_updates_gives_the_bits_of_decoding_then_folding(
    spec: str,
) -> None:
    """Input: 5 encoded updates of a 3-tensor model (one tensor of 70,000 values, so the
    fold walks several blocks), integer and fractional weights, folded as one batch."""
    from fedcommons.wire.codec import decode_update, encode_update

    gen = torch.Generator().manual_seed(1)
    base = {"a": torch.zeros(350, 200), "b": torch.zeros(7), "c": torch.zeros(3, 3)}
    weights = [3, 17.5, 1, 250, 0.125]
    payloads = [
        encode_update(
            {k: torch.randn(v.shape, generator=gen) for k, v in base.items()},
            spec,
            round_no=1,
            shared_seed=9,
        ).payload
        for _ in weights
    ]
    lazy = [decode_update(p, base).delta for p in payloads]
    dense = [{k: v.clone() for k, v in decode_update(p, base).delta.items()} for p in payloads]
    agg = FedAvg()
    agg.begin(base)
    agg.fold_many([ClientUpdate(d, 1, weight=w) for d, w in zip(lazy, weights, strict=True)])
    assert all(not d.materialized for d in lazy)  # folded from the codes, never decoded
    expected = _reference_sum(base, dense, weights)
    for k in base:
        assert torch.equal(agg._sum[k], expected[k]), k


def test_batched_fold_equals_one_fold_per_update_bit_for_bit() -> None:
    """Input: 4 dense float32 updates of 100,000 values (several fold blocks), weights
    3, 17, 101, 5, folded as one batch and, with a second aggregator, one at a time."""
    gen = torch.Generator().manual_seed(2)
    base = {"w": torch.zeros(100_000), "b": torch.zeros(10)}
    updates = [
        ClientUpdate({k: torch.randn(v.shape, generator=gen) for k, v in base.items()}, n)
        for n in (3, 17, 101, 5)
    ]
    batched, single = FedAvg(), FedAvg()
    batched.begin(base)
    single.begin(base)
    batched.fold_many(updates)
    for u in updates:
        single.fold(u)
    a, b = batched.finalize(), single.finalize()
    assert all(torch.equal(a[k], b[k]) for k in base)
    expected = _reference_sum(base, [u.delta for u in updates], [3, 17, 101, 5])
    assert torch.equal(a["w"], (expected["w"] / 126).to(torch.float32))


def test_fold_many_calls_the_fold_of_a_subclass_that_overrides_it() -> None:
    """Input: a FedAvg subclass whose fold doubles every delta, then calls FedAvg.fold."""

    class Doubling(FedAvg):
        name = "doubling-test"

        def fold(self, update: ClientUpdate) -> None:
            doubled = {k: 2 * v for k, v in update.delta.items()}
            super().fold(ClientUpdate(doubled, update.num_examples))

    agg = Doubling()
    agg.begin(BASE)
    agg.fold_many([_update(1.0, 1), _update(3.0, 1)])
    assert torch.allclose(agg.finalize()["w"], torch.full((3, 2), 4.0))
