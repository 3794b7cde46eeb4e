"""Client-side diagonal Fisher and its int8 log-domain wire encoding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedcommons.client_sdk.fisher import diagonal_fisher, estimate_fisher
from fedcommons.errors import ConfigError, UpdateRejectedError
from fedcommons.tasks import load_task
from fedcommons.wire.fisher import decode_fisher, encode_fisher


def _brute_force_fisher(model: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    out = {k: torch.zeros_like(v) for k, v in model.named_parameters()}
    for i in range(len(x)):
        probs = torch.softmax(model(x[i : i + 1]), -1)[0].detach()
        for c in range(probs.numel()):
            model.zero_grad()
            torch.log_softmax(model(x[i : i + 1]), -1)[0, c].backward()
            for k, v in model.named_parameters():
                out[k] += probs[c] * v.grad**2
    return {k: v / len(x) for k, v in out.items()}


def test_fisher_is_the_exact_expectation_over_predicted_labels() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 5))
    x = torch.randn(9, 4)
    fisher = diagonal_fisher(model, x, chunk=4)
    expected = _brute_force_fisher(model, x)
    for k, v in expected.items():
        torch.testing.assert_close(fisher[k], v, rtol=1e-4, atol=1e-7)


def test_fisher_samples_labels_above_100_classes() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 150)
    x = torch.randn(200, 3)
    sampled = diagonal_fisher(model, x, generator=torch.Generator().manual_seed(0))
    exact = diagonal_fisher(model, x, exact_max_classes=1000)
    ratio = sampled["weight"].sum() / exact["weight"].sum()
    assert 0.75 < float(ratio) < 1.25


def test_fisher_uses_at_most_256_examples_of_the_task() -> None:
    task = load_task("digits", {"num-partitions": 1, "partition-id": 0})
    weights = task.build_model().state_dict()
    fisher = estimate_fisher(task, weights, seed=3)
    assert set(fisher) == set(weights)
    assert all(torch.isfinite(v).all() and (v >= 0).all() for v in fisher.values())
    # 256 of the ~1078 training examples: a different seed picks others, so it differs.
    other = estimate_fisher(task, weights, seed=4)
    assert not torch.equal(fisher["net.0.weight"], other["net.0.weight"])


def test_fisher_rejects_non_classifier_outputs() -> None:
    """Input: a model that returns a 1-D output instead of (batch, classes) logits."""

    class Flat(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x).reshape(-1)

    with pytest.raises(ConfigError, match=r"logits"):
        diagonal_fisher(Flat(), torch.randn(3, 2))


def test_int8_log_encoding_round_trips_within_4_percent() -> None:
    gen = torch.Generator().manual_seed(0)
    fisher = {
        "a": torch.rand(50, 20, generator=gen) ** 6,
        "b": torch.cat([torch.zeros(5), torch.rand(5, generator=gen)]),
    }
    codes, ranges = encode_fisher(fisher)
    assert all(c.dtype == np.int8 for c in codes.values())
    decoded = decode_fisher(codes, ranges, fisher)
    assert torch.equal(decoded["b"][:5], torch.zeros(5))
    norm = float(torch.cat([v.reshape(-1) for v in fisher.values()]).norm())
    for k, v in fisher.items():
        big = v > norm * 1e-8
        rel = ((decoded[k][big] - v[big]) / v[big]).abs().max()
        assert float(rel) < 0.04


def test_encoding_sends_only_masked_entries() -> None:
    fisher = {"w": torch.rand(10, 10)}
    mask = {"w": torch.rand(10, 10) < 0.2}
    codes, ranges = encode_fisher(fisher, mask)
    assert codes["w"].size == int(mask["w"].sum())
    decoded = decode_fisher(codes, ranges, fisher, mask)
    assert torch.equal(decoded["w"][~mask["w"]], torch.zeros(int((~mask["w"]).sum())))


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda c, r: c.update(w=c["w"].astype(np.int16)), "int8"),
        (lambda c, r: c.update(w=c["w"][:-1]), "codes, expected"),
        (lambda c, r: r.update(w=np.array([1.0, np.inf], dtype=np.float32)), "bad range"),
        (lambda c, r: r.update(w=np.array([2.0, 1.0], dtype=np.float32)), "bad range"),
        (lambda c, r: c.pop("w"), "missing"),
    ],
)
def test_malformed_fisher_payload_is_rejected(mutate, match: str) -> None:
    """Input: Fisher codes of the wrong dtype or length, Inf or inverted ranges, no tensor."""
    ref = {"w": torch.rand(4, 3)}
    codes, ranges = encode_fisher(ref)
    mutate(codes, ranges)
    with pytest.raises(UpdateRejectedError, match=match) as info:
        decode_fisher(codes, ranges, ref)
    assert info.value.reason == "bad-fisher"


def test_a_fisher_range_beyond_float32_is_rejected_not_passed_on_as_inf() -> None:
    """Input: Fisher codes with a log range [0, 100] (exp(100) overflows float32)."""
    import numpy as np
    import pytest
    import torch

    from fedcommons.errors import UpdateRejectedError
    from fedcommons.wire.fisher import decode_fisher

    ref = {"w": torch.zeros(4)}
    codes = {"w": np.array([-127, 0, 100, 127], dtype=np.int8)}
    ranges = {"w": np.array([0.0, 100.0], dtype=np.float32)}
    with pytest.raises(UpdateRejectedError) as info:
        decode_fisher(codes, ranges, ref)
    assert info.value.reason == "bad-fisher"
