"""Central DP releases only the noised mean: strategies that need more are refused."""

from pathlib import Path

import pytest

from fedcommons.coordinator.config import RunConfig
from fedcommons.coordinator.prepare import prepare_run
from fedcommons.errors import ConfigError

DP = {"noise-multiplier": 1.0, "clip-norm": 0.5, "epsilon": 8.0, "delta": 1e-5}


@pytest.mark.parametrize(
    ("strategy", "needs"),
    [
        ("fisher", "Fisher information"),
        ("mask-aligned", "mask"),
        ("median", "every individual update"),
    ],
)
def test_central_dp_with_a_strategy_needing_individual_data_is_refused(
    tmp_path: Path, strategy: str, needs: str
) -> None:
    """Inputs tried: dp.* together with strategy fisher, mask-aligned and median."""
    config = RunConfig(
        strategy=strategy,
        dp_params=dict(DP),
        registry=str(tmp_path / "reg"),
        population=20,
        clients_per_round=2,
    )
    with pytest.raises(ConfigError, match=needs):
        prepare_run(config)
    assert not (tmp_path / "reg").exists()


def test_central_dp_with_fedavg_is_accepted(tmp_path: Path) -> None:
    config = RunConfig(
        dp_params=dict(DP), registry=str(tmp_path / "reg"), population=20, clients_per_round=2
    )
    prepared = prepare_run(config)
    assert prepared.privacy is not None and prepared.privacy.central is not None


def test_central_dp_without_a_declared_population_is_refused(tmp_path: Path) -> None:
    """Tried: dp.* with no population: q and W would depend on who happens to connect."""
    with pytest.raises(ConfigError, match="declared population"):
        prepare_run(RunConfig(dp_params=dict(DP), registry=str(tmp_path / "reg")))


@pytest.mark.parametrize(
    ("setting", "match"),
    [({"min_clients": 2}, "min-clients = 2"), ({"on_round_failure": "retry"}, "retry")],
)
def test_dp_line_refuses_round_policies_that_condition_the_release_on_the_sample(
    tmp_path: Path, setting: dict, match: str
) -> None:
    """Tried: min-clients = 2 and on-round-failure = retry on a DP line."""
    config = RunConfig(
        dp_params=dict(DP),
        registry=str(tmp_path / "reg"),
        population=20,
        clients_per_round=2,
        **setting,
    )
    with pytest.raises(ConfigError, match=match):
        prepare_run(config)
