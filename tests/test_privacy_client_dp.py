"""Client DP-SGD through Opacus: fixed layers, clean state dict, a persistent accountant."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedcommons.errors import ConfigError, PrivacyBudgetExceededError
from fedcommons.privacy.accounting import runtime_epsilon
from fedcommons.privacy.client_dp import STATE_FILE, ClientDPConfig, spent_epsilon, train_local_dp
from fedcommons.privacy.client_spend import parse_spend
from fedcommons.tasks import Task


class BatchNormTask(Task):
    """A model with BatchNorm (which Opacus cannot train) on generated data."""

    name = "bn"

    def build_model(self) -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))

    def train_loader(self, batch_size: int, seed: int) -> DataLoader:
        g = torch.Generator().manual_seed(1)
        x = torch.randn(200, 8, generator=g)
        y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
        return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True)


def _base() -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in BatchNormTask().build_model().state_dict().items()}


def _dp(tmp_path: Path, epsilon: float = 10.0) -> ClientDPConfig:
    return ClientDPConfig(epsilon=epsilon, delta=1e-5, state_dir=tmp_path / "state")


def test_batchnorm_model_is_fixed_and_delta_uses_the_base_names(tmp_path: Path) -> None:
    base = _base()
    result = train_local_dp(
        BatchNormTask(), base, epochs=1, lr=0.1, batch_size=20, seed=0, dp=_dp(tmp_path)
    )
    assert set(result.delta) == set(base)  # no "_module." prefix, nothing missing
    assert not any(k.startswith("_module.") for k in result.delta)
    assert float(result.delta["0.weight"].abs().sum()) > 0  # trained
    assert float(result.delta["1.running_mean"].abs().sum()) == 0  # GroupNorm keeps none
    assert result.spend.steps == 10 and result.spend.sample_rate == pytest.approx(0.1)
    assert parse_spend(result.spend.to_record()) == result.spend


def test_spend_accumulates_in_the_state_dir_across_rounds(tmp_path: Path) -> None:
    dp = _dp(tmp_path)
    task, base = BatchNormTask(), _base()
    first = train_local_dp(task, base, epochs=1, lr=0.1, batch_size=20, seed=0, dp=dp).spend
    second = train_local_dp(task, base, epochs=1, lr=0.1, batch_size=20, seed=1, dp=dp).spend
    assert second.steps == 2 * first.steps
    assert second.epsilon > first.epsilon
    assert second.epsilon == pytest.approx(runtime_epsilon([(1.0, 0.1, 20)], 1e-5, "rdp"))
    assert spent_epsilon(dp) == pytest.approx(second.epsilon)
    state = json.loads((tmp_path / "state" / STATE_FILE).read_text())
    assert [r["steps"] for r in state["rounds"]] == [10, 10]


def test_round_that_would_exceed_the_budget_is_refused_before_training(tmp_path: Path) -> None:
    """Tried: a budget of ε = 4.0 that one 10-step round fits and a second does not."""
    dp = _dp(tmp_path, epsilon=4.0)
    task, base = BatchNormTask(), _base()
    train_local_dp(task, base, epochs=1, lr=0.1, batch_size=20, seed=0, dp=dp)
    before = (tmp_path / "state" / STATE_FILE).read_text()
    with pytest.raises(PrivacyBudgetExceededError, match=r"past its budget ε=4 "):
        train_local_dp(task, base, epochs=1, lr=0.1, batch_size=20, seed=1, dp=dp)
    assert (tmp_path / "state" / STATE_FILE).read_text() == before


def test_corrupt_accountant_state_refuses_to_train_rather_than_reset(tmp_path: Path) -> None:
    """Tried: a state file truncated to garbage."""
    dp = _dp(tmp_path)
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / STATE_FILE).write_text("{not json")
    with pytest.raises(ConfigError, match="refusing to train"):
        train_local_dp(BatchNormTask(), _base(), epochs=1, lr=0.1, batch_size=20, seed=0, dp=dp)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"history": "[[1.0, 0.1, 3]]"}, "steps"),
        ({"epsilon": 0.001}, "understates"),
        ({"delta": 2.0}, "delta"),
        ({"accountant": "moments"}, "accountant"),
        ({"epsilon": 99.0}, "exceeds"),
    ],
)
def test_inconsistent_spend_record_is_rejected_with_a_reason(
    tmp_path: Path, change: dict[str, object], reason: str
) -> None:
    """Tried: spend records with wrong step counts, understated ε, bad δ, over budget."""
    from fedcommons.errors import UpdateRejectedError

    spend = train_local_dp(
        BatchNormTask(), _base(), epochs=1, lr=0.1, batch_size=20, seed=0, dp=_dp(tmp_path)
    ).spend
    record = {**spend.to_record(), **change}
    with pytest.raises(UpdateRejectedError, match=reason) as info:
        parse_spend(record)
    assert info.value.reason == "dp-spend-invalid"
