import pytest

from fedcommons.coordinator.config import RunConfig
from fedcommons.errors import ConfigError


def test_flat_run_config_round_trips() -> None:
    flat = {"rounds": 3, "task.alpha": 0.1, "strategy.server_lr": 0.5, "min-clients": 2}
    config = RunConfig.from_flat(flat)
    assert config.rounds == 3 and config.min_clients == 2
    assert config.task_options == {"alpha": 0.1}
    assert config.strategy_params == {"server_lr": 0.5}
    assert RunConfig.from_flat(config.to_flat()) == config


@pytest.mark.parametrize(
    ("flat", "message"),
    [
        ({"rounds": 0}, "rounds must be >= 1"),
        ({"rounds": -2}, "rounds must be >= 1"),
        ({"rounds": 2.5}, "not a valid int"),
        ({"lr": 0}, "lr must be > 0"),
        ({"clients-per-round": 2, "min-clients": 3}, "exceeds clients-per-round"),
        ({"num-rounds": 3}, "unknown run-config key 'num-rounds'"),
        ({"registry": ""}, "registry path is empty"),
    ],
)
def test_invalid_run_config_names_the_problem(flat: dict, message: str) -> None:
    """Inputs tried: rounds 0, -2 and 2.5, lr 0, min-clients above clients-per-round,
    a misspelt key, an empty registry path."""
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_flat(flat)
