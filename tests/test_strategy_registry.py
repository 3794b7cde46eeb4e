"""Strategy registry: names, parameters, entry-point plugins, the decorator path."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from fedcommons.errors import DuplicateStrategyError, StrategyParameterError, UnknownStrategyError
from fedcommons.strategies import (
    FedAvg,
    available_strategies,
    create_strategy,
    get_spec,
    refresh_plugins,
    register_strategy,
    strategy,
    strategy_specs,
    unregister_strategy,
)
from fedcommons.strategies import testing as kit
from tests.plugin_env import install_example_plugin, install_fake_distribution

BUILTINS = {"fedavg", "fedadam", "fisher", "mask-aligned", "median", "trimmed-mean"}


@pytest.fixture(autouse=True)
def _fresh_plugins() -> Iterator[None]:
    refresh_plugins()
    yield
    refresh_plugins()


def test_builtins_are_listed_with_reference_and_params() -> None:
    specs = {s.name: s for s in strategy_specs()}
    assert set(specs) >= BUILTINS
    assert "Matena" in specs["fisher"].reference
    assert specs["mask-aligned"].params["min_votes"].describe() == "min_votes: int = 1"
    assert specs["fedavg"].origin == "built-in"


def test_unknown_strategy_lists_the_valid_ones() -> None:
    """Input: strategy name 'fedprox' (not registered)."""
    with pytest.raises(UnknownStrategyError, match=r"fedprox.*available: .*fedavg.*fisher"):
        create_strategy("fedprox")


def test_unknown_parameter_lists_the_valid_ones() -> None:
    """Input: fisher with a parameter 'eps' (the parameter is called 'epsilon')."""
    with pytest.raises(StrategyParameterError, match=r"'eps'.*epsilon: float = 1e-06"):
        create_strategy("fisher", {"eps": 1e-3})


def test_ill_typed_parameter_names_the_expected_type() -> None:
    """Input: mask-aligned min_votes='many' and sign_election='maybe'."""
    with pytest.raises(StrategyParameterError, match=r"min_votes.*int"):
        create_strategy("mask-aligned", {"min_votes": "many"})
    with pytest.raises(StrategyParameterError, match=r"sign_election.*bool"):
        create_strategy("mask-aligned", {"sign_election": "maybe"})


def test_run_config_values_are_coerced_to_parameter_types() -> None:
    agg = create_strategy("mask-aligned", {"sign_election": "true", "min_votes": 2.0})
    assert agg.params()["sign_election"] is True and agg.params()["min_votes"] == 2
    assert create_strategy("fedavg", {"clip_norm": "none"}).params()["clip_norm"] is None


def test_register_refuses_a_duplicate_name() -> None:
    """Input: registering a class whose name is the built-in 'fedavg'."""

    class Again(FedAvg):
        name = "fedavg"

    with pytest.raises(DuplicateStrategyError, match=r"'fedavg' is already taken by built-in"):
        register_strategy(Again)


def test_decorated_function_registers_and_runs() -> None:
    @strategy("mean-of-signs", reference="test")
    def mean_of_signs(updates, base, *, scale: float = 1.0):  # type: ignore[no-untyped-def]
        return {
            k: (scale * torch.stack([torch.sign(u.delta[k]) for u in updates]).mean(0)).to(v.dtype)
            for k, v in base.items()
        }

    name = register_strategy(mean_of_signs)
    try:
        agg = create_strategy(name, {"scale": "0.5"})
        assert agg.params() == {"scale": 0.5}
        assert get_spec(name).params["scale"].describe() == "scale: float = 1.0"
        kit.check_shapes_and_dtypes(lambda: create_strategy(name))
    finally:
        unregister_strategy(name)


def test_decorator_rejects_untyped_parameters() -> None:
    """Input: a @strategy function whose parameter has no type hint."""
    with pytest.raises(TypeError, match=r"type hint and a default"):

        @strategy("untyped")
        def untyped(updates, base, *, k=3):  # type: ignore[no-untyped-def]
            return {}


def test_entry_point_plugin_is_discovered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    install_example_plugin(tmp_path, monkeypatch)
    assert "geomed" in available_strategies()
    spec = get_spec("geomed")
    assert spec.origin == "plugin fedcommons-geomed 0.1.0"
    assert "Pillutla" in spec.reference
    assert set(spec.params) == {"iterations", "smoothing"}
    kit.run_conformance(lambda: create_strategy("geomed", {"iterations": 4}))


def test_two_plugins_claiming_one_name_are_both_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Input: distributions 'alpha-strat' and 'beta-strat' both declaring 'twin'."""
    source = "from fedcommons.strategies import FedAvg\nclass Twin(FedAvg):\n    name = 'twin'\n"
    install_fake_distribution(
        tmp_path / "a",
        monkeypatch,
        "alpha-strat",
        {"twin": "twin_a:Twin"},
        modules={"twin_a": source},
    )
    install_fake_distribution(
        tmp_path / "b",
        monkeypatch,
        "beta-strat",
        {"twin": "twin_b:Twin"},
        modules={"twin_b": source},
    )
    with pytest.raises(DuplicateStrategyError, match=r"twin.*both refused"):
        create_strategy("twin")
    assert "twin" not in available_strategies()
    assert sum(1 for s in strategy_specs() if s.name == "twin") == 2


def test_plugin_shadowing_a_builtin_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Input: a plugin declaring the entry point name 'fedavg'."""
    source = "from fedcommons.strategies import FedAvg\nclass Fake(FedAvg):\n    pass\n"
    install_fake_distribution(
        tmp_path,
        monkeypatch,
        "evil-strat",
        {"fedavg": "evil_mod:Fake"},
        modules={"evil_mod": source},
    )
    assert type(create_strategy("fedavg")) is FedAvg
    refused = [s for s in strategy_specs() if s.origin.startswith("plugin evil-strat")]
    assert refused and "taken by built-in" in refused[0].error


def test_broken_plugin_is_listed_with_its_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Input: an entry point naming a module that does not exist."""
    install_fake_distribution(tmp_path, monkeypatch, "broken-strat", {"broken": "no_such_mod:X"})
    with pytest.raises(UnknownStrategyError, match=r"broken.*unusable.*no_such_mod"):
        create_strategy("broken")
    assert "fedavg" in available_strategies()
