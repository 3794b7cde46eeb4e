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
    config = RunConfig(strategy=strategy, dp_params=dict(DP), registry=str(tmp_path / "reg"))
    with pytest.raises(ConfigError, match=needs):
        prepare_run(config)
    assert not (tmp_path / "reg").exists()


def test_central_dp_with_fedavg_is_accepted(tmp_path: Path) -> None:
    prepared = prepare_run(RunConfig(dp_params=dict(DP), registry=str(tmp_path / "reg")))
    assert prepared.privacy is not None and prepared.privacy.central is not None
