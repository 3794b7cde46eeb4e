"""What the coordinator enforces on plugin strategies at run time, and what it records."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedcommons.client_sdk.client_app import app as fedcommons_client
from fedcommons.coordinator.config import RunConfig
from fedcommons.engines.inprocess import run_in_process
from fedcommons.errors import StrategyError
from fedcommons.releases.registry import Registry
from fedcommons.strategies import FedAvg, register_strategy, unregister_strategy

#: Per-coordinate bound of the clipping plugins: loose enough that one round trains the
#: model past its starting weights (the gate refuses a first release that does not).
CLIP = 0.5


class ClipInPlace(FedAvg):
    """Clips each update in place: the bug a plugin author shipped."""

    name = "clip-in-place"

    def fold(self, update):
        for value in update.delta.values():
            value.clamp_(-CLIP, CLIP)
        super().fold(update)


class ClipCopy(FedAvg):
    """The same rule written correctly: clip a copy."""

    name = "clip-copy"

    def fold(self, update):
        update.delta = {k: v.clamp(-CLIP, CLIP) for k, v in update.delta.items()}
        super().fold(update)


@pytest.fixture
def plugins() -> object:
    register_strategy(ClipInPlace)
    register_strategy(ClipCopy)
    yield
    unregister_strategy("clip-in-place")
    unregister_strategy("clip-copy")


def _config(tmp_path: Path, strategy: str) -> RunConfig:
    return RunConfig(rounds=1, local_epochs=1, registry=str(tmp_path / "reg"), strategy=strategy)


def test_a_plugin_writing_into_the_read_only_reply_views_fails_the_round(
    tmp_path: Path, plugins: object
) -> None:
    """Input tried: a plugin whose fold clamps update.delta in place."""
    with pytest.raises(StrategyError, match=r"fold wrote into the update's delta\["):
        run_in_process(_config(tmp_path, "clip-in-place"), [fedcommons_client] * 2)
    assert Registry(tmp_path / "reg").releases() == []


def test_a_plugin_that_copies_before_clipping_publishes_and_names_its_code(
    tmp_path: Path, plugins: object
) -> None:
    result = run_in_process(_config(tmp_path, "clip-copy"), [fedcommons_client] * 2)
    code = result.release.manifest().strategy_code
    assert code["origin"] == "local" and code["object"] == "tests.test_plugin_guards:ClipCopy"


def test_an_entry_point_plugin_is_recorded_with_its_package_and_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedcommons.strategies import create_strategy, strategy_code
    from tests.plugin_env import install_example_plugin

    install_example_plugin(tmp_path, monkeypatch)
    code = strategy_code(create_strategy("geomed", {"iterations": 2}))
    assert code["origin"] == "plugin"
    assert (code["package"], code["version"]) == ("fedcommons-geomed", "0.1.0")
    assert code["object"].endswith(":geometric_median")


def test_a_function_plugin_check_refuses_bad_parameters_before_round_1(tmp_path: Path) -> None:
    """Input tried: multi-krum-style f=-1 through the run config."""
    from fedcommons.errors import ConfigError
    from fedcommons.strategies import strategy

    def check(*, f: int) -> None:
        if f < 0:
            raise ConfigError(f"f must be >= 0 (Byzantine clients tolerated), got {f}")

    @strategy("krum-like", check=check)
    def krum_like(updates, base, *, f: int = 1):
        return {k: updates[0].delta[k] for k in base}

    register_strategy(krum_like)
    try:
        config = RunConfig(rounds=1, registry=str(tmp_path / "reg"), strategy="krum-like",
                           strategy_params={"f": -1})  # fmt: skip
        with pytest.raises(ConfigError, match="f must be >= 0"):
            run_in_process(config, [fedcommons_client])
    finally:
        unregister_strategy("krum-like")
    assert not (tmp_path / "reg" / "runs").exists() or Registry(tmp_path / "reg").releases() == []
