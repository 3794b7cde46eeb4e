"""Strategies inside real rounds (in-process engine: the real ServerApp and ClientApp)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

from fedcommons.client_sdk.client_app import app as fedcommons_client
from fedcommons.client_sdk.client_app import train
from fedcommons.coordinator.config import RunConfig
from fedcommons.engines.inprocess import run_in_process
from fedcommons.errors import StrategyError, StrategyParameterError
from fedcommons.releases.registry import Registry
from fedcommons.strategies import refresh_plugins
from fedcommons.wire import keys
from tests.plugin_env import install_example_plugin, install_fake_distribution


@pytest.fixture(autouse=True)
def _fresh_plugins() -> Iterator[None]:
    refresh_plugins()
    yield
    refresh_plugins()


def _config(tmp_path: Path, strategy: str, **params: object) -> RunConfig:
    return RunConfig(
        strategy=strategy,
        strategy_params=dict(params),
        rounds=1,
        local_epochs=1,
        registry=str(tmp_path / "reg"),
        task_options={"alpha": 0.5},
    )


def _client_without_fisher() -> ClientApp:
    client = ClientApp()

    @client.train()
    def _train(msg: Message, context: Context) -> Message:
        reply = train(msg, context)
        del reply.content[keys.FISHER_CODES]
        del reply.content[keys.FISHER_RANGES]
        return reply

    return client


def _client_with_mask(outside_mask_nonzero: bool) -> ClientApp:
    client = ClientApp()

    @client.train()
    def _train(msg: Message, context: Context) -> Message:
        reply = train(msg, context)
        delta = reply.content[keys.DELTA_ARRAYS].to_torch_state_dict()
        mask = {k: torch.rand(v.shape) < 0.3 for k, v in delta.items()}
        if not outside_mask_nonzero:
            delta = {k: torch.where(mask[k], v, 0.0) for k, v in delta.items()}
        reply.content[keys.DELTA_ARRAYS] = ArrayRecord(delta)
        reply.content[keys.MASK_ARRAYS] = ArrayRecord(
            {k: Array(v.numpy()) for k, v in mask.items()}
        )
        return reply

    return client


def test_fisher_round_uses_the_clients_fisher(tmp_path: Path) -> None:
    result = run_in_process(_config(tmp_path, "fisher", fisher_samples=64), [fedcommons_client] * 3)
    report = result.reports[0]
    assert report.accepted == 3 and report.rejected == {}
    manifest = result.release.manifest()
    assert manifest.strategy == "fisher"
    assert manifest.strategy_params["epsilon"] == 1e-6
    assert manifest.strategy_params["fisher_samples"] == 64


def test_reply_missing_its_fisher_is_rejected_and_round_goes_on(tmp_path: Path) -> None:
    """Input: one of three clients replies without its Fisher to a Fisher-weighted round."""
    clients = [fedcommons_client, _client_without_fisher(), fedcommons_client]
    result = run_in_process(_config(tmp_path, "fisher"), clients)
    report = result.reports[0]
    assert report.accepted == 2
    assert report.rejected == {"missing-fisher": 1}


def test_masked_replies_are_aligned_by_mask_aligned(tmp_path: Path) -> None:
    clients = [_client_with_mask(False)] * 2 + [fedcommons_client]
    result = run_in_process(_config(tmp_path, "mask-aligned", sign_election=True), clients)
    assert result.reports[0].accepted == 3


def test_delta_outside_its_mask_is_rejected(tmp_path: Path) -> None:
    """Input: a reply whose delta is nonzero where its own mask says 'not sent'."""
    clients = [_client_with_mask(True), fedcommons_client]
    result = run_in_process(_config(tmp_path, "mask-aligned"), clients)
    assert result.reports[0].rejected == {"bad-mask": 1}


def test_unknown_strategy_parameter_fails_before_any_round(tmp_path: Path) -> None:
    """Input: run config strategy=fedavg with strategy.momentum (it is server_momentum)."""
    with pytest.raises(StrategyParameterError, match=r"server_momentum"):
        run_in_process(_config(tmp_path, "fedavg", momentum=0.9), [fedcommons_client] * 2)
    assert not (tmp_path / "reg").exists()


def test_example_plugin_runs_a_round(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    install_example_plugin(tmp_path / "site", monkeypatch)
    result = run_in_process(_config(tmp_path, "geomed", iterations=5), [fedcommons_client] * 3)
    manifest = result.release.manifest()
    assert manifest.strategy == "geomed"
    assert manifest.strategy_params == {"iterations": 5, "smoothing": 1e-6}


BAD_PLUGINS = """
import torch
from fedcommons.strategies import FedAvg, strategy

class Raises(FedAvg):
    def fold(self, update):
        raise RuntimeError("boom in fold")

class RaisesInBegin(FedAvg):
    def begin(self, base):
        raise KeyError("no such layer")

@strategy("wrong-shape")
def wrong_shape(updates, base, *, unused: int = 0):
    return {k: torch.zeros(3) for k in base}
"""


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("raiser", r"'raiser' \(plugin bad-strats 2.0.0\) failed: fold raised RuntimeError"),
        ("wrong-shape", r"'wrong-shape' \(plugin bad-strats 2.0.0\) failed: step .* shape"),
        ("begin-raiser", r"'begin-raiser' \(plugin bad-strats 2.0.0\) failed: begin raised"),
    ],
)
def test_failing_plugin_fails_the_round_and_publishes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, match: str
) -> None:
    """Input: plugins whose fold or begin raises, or whose step has the wrong shape."""
    install_fake_distribution(
        tmp_path / "site",
        monkeypatch,
        "bad-strats",
        {
            "raiser": "bad_strats:Raises",
            "wrong-shape": "bad_strats:wrong_shape",
            "begin-raiser": "bad_strats:RaisesInBegin",
        },
        version="2.0.0",
        modules={"bad_strats": BAD_PLUGINS},
    )
    config = _config(tmp_path, name)
    with pytest.raises(StrategyError, match=match):
        run_in_process(config, [fedcommons_client] * 2)
    registry = tmp_path / "reg"
    assert not (registry / "index.sqlite").exists() or Registry(registry).releases() == []


def test_round_config_asks_for_the_fisher_only_when_needed() -> None:
    import torch as _torch

    from fedcommons.coordinator.round import round_content

    config = RunConfig()
    weights = {"w": _torch.zeros(2)}
    plain = round_content(config, weights, 1)[keys.TRAIN_CONFIG]
    assert keys.FISHER_REQUEST not in plain
    asked = round_content(config, weights, 1, needs_fisher=True, fisher_samples=64)
    assert asked[keys.TRAIN_CONFIG][keys.FISHER_REQUEST] is True
    assert asked[keys.TRAIN_CONFIG][keys.FISHER_SAMPLES] == 64
