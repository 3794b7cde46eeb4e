"""Exact LoRA aggregation (``lora-exact``) against naive factor averaging (``fedavg``)."""

from __future__ import annotations

import torch

from fedcommons.strategies import FedAvg, LoraExact, create_strategy, lora_pairs
from fedcommons.strategies import testing as kit
from fedcommons.wire.update import ClientUpdate

A = "net.layer.0.query.lora_A.default.weight"
B = "net.layer.0.query.lora_B.default.weight"
HEAD = "net.classifier.weight"
R, D_IN, D_OUT = 2, 6, 5


def _base(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        A: torch.randn(R, D_IN, generator=gen),
        B: torch.zeros(D_OUT, R),  # LoRA's own initialisation: B = 0
        HEAD: torch.randn(3, D_OUT, generator=gen),
    }


def _update(seed: int, n: int, *, move_a: bool = True) -> ClientUpdate:
    gen = torch.Generator().manual_seed(100 + seed)
    delta = {
        A: torch.randn(R, D_IN, generator=gen) * (0.5 if move_a else 0.0),
        B: torch.randn(D_OUT, R, generator=gen),
        HEAD: torch.randn(3, D_OUT, generator=gen),
    }
    return ClientUpdate(delta=delta, num_examples=n, node_id=seed)


def _product(weights: dict[str, torch.Tensor]) -> torch.Tensor:
    return weights[B].double() @ weights[A].double()


def _apply(base: dict[str, torch.Tensor], step: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: base[k] + step[k] for k in base}


def _mean_product(base: dict[str, torch.Tensor], updates: list[ClientUpdate]) -> torch.Tensor:
    total = sum(u.num_examples for u in updates)
    return sum(_product(_apply(base, u.delta)) * (u.num_examples / total) for u in updates)


def test_lora_pairs_match_peft_factor_names_and_ignore_everything_else() -> None:
    names = [A, B, HEAD, "x.lora_A.weight", "x.lora_B.weight", "y.lora_A.default.weight"]
    pairs = lora_pairs(names)
    assert [(p.a, p.b) for p in pairs] == [(A, B), ("x.lora_A.weight", "x.lora_B.weight")]


def test_exact_aggregation_reproduces_the_mean_of_the_products_when_it_fits_rank_r() -> None:
    # only B moves: every product is B_i A0, so the mean has rank <= r and is exact
    base = _base()
    updates = [_update(i, n, move_a=False) for i, n in enumerate((10, 30, 60))]
    merged = _apply(base, LoraExact().aggregate(base, updates))
    torch.testing.assert_close(_product(merged), _mean_product(base, updates), rtol=1e-5, atol=1e-5)


def test_naive_factor_averaging_misses_the_mean_product_that_exact_aggregation_hits() -> None:
    base = _base()
    updates = [_update(i, n) for i, n in enumerate((10, 30))]  # both factors move
    target = _mean_product(base, updates)
    exact = _product(_apply(base, LoraExact().aggregate(base, updates)))
    naive = _product(_apply(base, FedAvg().aggregate(base, updates)))
    # two clients of rank 2 give a product of rank <= 4: truncation to rank 2 is the
    # best rank-2 approximation (Eckart–Young), never worse than naive averaging's rank-2
    u, s, vh = torch.linalg.svd(target)
    best = (u[:, :R] * s[:R]) @ vh[:R]
    torch.testing.assert_close(exact, best, rtol=1e-6, atol=1e-6)
    assert torch.linalg.norm(exact - target) <= torch.linalg.norm(naive - target)
    assert torch.linalg.norm(naive - target) > 1e-3


def test_tensors_outside_lora_pairs_get_fedavgs_weighted_mean() -> None:
    base = _base()
    updates = [_update(i, n) for i, n in enumerate((10, 30, 60))]
    exact = LoraExact().aggregate(base, updates)
    naive = FedAvg().aggregate(base, updates)
    torch.testing.assert_close(exact[HEAD], naive[HEAD])


def test_refactorised_a_keeps_the_scale_of_the_base_a() -> None:
    base = _base()
    step = LoraExact().aggregate(base, [_update(i, 5) for i in range(4)])
    merged = _apply(base, step)
    rms = lambda t: float(torch.linalg.norm(t)) / R**0.5  # noqa: E731
    assert abs(rms(merged[A]) - rms(base[A])) < 1e-4


def test_server_learning_rate_scales_the_product_step() -> None:
    base = _base()
    updates = [_update(i, n, move_a=False) for i, n in enumerate((10, 30))]
    half = _apply(base, LoraExact(server_lr=0.5).aggregate(base, updates))
    expected = _product(base) + 0.5 * (_mean_product(base, updates) - _product(base))
    torch.testing.assert_close(_product(half), expected, rtol=1e-5, atol=1e-5)


def test_lora_exact_is_a_registered_strategy_with_fedavg_parameters() -> None:
    agg = create_strategy("lora-exact", {"server_lr": "0.5"})
    assert isinstance(agg, LoraExact) and agg.params()["server_lr"] == 0.5


def test_lora_exact_passes_the_conformance_kit_on_a_model_with_lora_pairs() -> None:
    shapes = {
        A: ((R, D_IN), torch.float32),
        B: ((D_OUT, R), torch.float32),
        HEAD: ((3, D_OUT), torch.float32),
    }
    base = kit.make_base(shapes=shapes)
    updates = kit.make_updates(base, masks=False)
    step = kit.run_round(LoraExact, base, updates)
    kit.assert_close(step, kit.run_round(LoraExact, base, updates[::-1]), "arrival order")
    assert "check_finite" in kit.run_conformance(LoraExact)
