"""Budget and mechanism parameters are rejected at configuration time."""

from __future__ import annotations

import pytest

from fedcommons.coordinator.config import RunConfig
from fedcommons.errors import PrivacyConfigError
from fedcommons.privacy.client_dp import ClientDPConfig
from tests.cli_helpers import run_cli

GOOD = {
    "dp.mechanism": "dp-fedavg",
    "dp.noise-multiplier": 1.0,
    "dp.clip-norm": 0.5,
    "dp.epsilon": 4.0,
    "dp.delta": 1e-5,
}


def test_valid_central_dp_config_round_trips_through_flat_run_config() -> None:
    config = RunConfig.from_flat(GOOD)
    central = config.central_dp
    assert central is not None
    assert (central.noise_multiplier, central.clip_norm) == (1.0, 0.5)
    assert central.sampling == "poisson" and central.accountant == "rdp"
    assert RunConfig.from_flat(config.to_flat()).central_dp == central


@pytest.mark.parametrize(
    ("key", "value", "named"),
    [
        ("dp.epsilon", 0, "dp.epsilon"),
        ("dp.epsilon", -1.0, "dp.epsilon"),
        ("dp.delta", 1.0, "dp.delta"),
        ("dp.delta", 1.5, "dp.delta"),
        ("dp.delta", 0.0, "dp.delta"),
        ("dp.noise-multiplier", -0.1, "dp.noise-multiplier"),
        ("dp.clip-norm", 0.0, "dp.clip-norm"),
        ("dp.clip-norm", -2.0, "dp.clip-norm"),
        ("dp.epsilon", "lots", "dp.epsilon"),
        ("dp.sampling", "stratified", "dp.sampling"),
        ("dp.accountant", "gdp", "dp.accountant"),
    ],
)
def test_out_of_range_central_dp_parameter_fails_at_configuration(
    key: str, value: object, named: str
) -> None:
    """Tried: each budget/noise parameter out of range (ε ≤ 0, δ ≥ 1, z < 0, C ≤ 0, ...)."""
    with pytest.raises(PrivacyConfigError, match=named):
        RunConfig.from_flat({**GOOD, key: value})


def test_central_dp_without_budget_is_rejected() -> None:
    """Tried: dp = dp-fedavg with no dp.epsilon / dp.delta."""
    flat = {k: v for k, v in GOOD.items() if k not in {"dp.epsilon", "dp.delta"}}
    with pytest.raises(PrivacyConfigError, match=r"dp\.epsilon, dp\.delta"):
        RunConfig.from_flat(flat)


def test_unknown_dp_option_and_mechanism_are_rejected() -> None:
    """Tried: a misspelt dp.* key, an unknown mechanism."""
    with pytest.raises(PrivacyConfigError, match="unknown dp option"):
        RunConfig.from_flat({**GOOD, "dp.noise": 1.0})
    with pytest.raises(PrivacyConfigError, match=r"dp\.mechanism must be one of"):
        RunConfig.from_flat({**GOOD, "dp.mechanism": "dp-ftrl"})


def test_no_dp_keys_means_no_central_dp_and_mechanism_defaults_to_dp_fedavg() -> None:
    assert RunConfig.from_flat({"rounds": 2}).central_dp is None
    flat = {k: v for k, v in GOOD.items() if k != "dp.mechanism"}
    central = RunConfig.from_flat(flat).central_dp
    assert central is not None and central.mechanism == "dp-fedavg"


def test_dp_options_parse_from_flower_run_config_syntax() -> None:
    """`flwr run --run-config` turns dotted keys into a table; Flower flattens it back."""
    from flwr.common.config import parse_config_args

    flat = parse_config_args(
        ["dp.noise-multiplier=1.0 dp.clip-norm=0.5 dp.epsilon=4.0 dp.delta=1e-5 rounds=3"]
    )
    central = RunConfig.from_flat(flat).central_dp
    assert central is not None and central.clip_norm == 0.5


@pytest.mark.parametrize(
    ("node_config", "named"),
    [
        ({"dp-epsilon": 0.0, "dp-delta": 1e-5}, "dp-epsilon"),
        ({"dp-epsilon": 2.0, "dp-delta": 1.0}, "dp-delta"),
        ({"dp-epsilon": 2.0, "dp-delta": 1e-5, "dp-noise-multiplier": -1}, "dp-noise-multiplier"),
        ({"dp-epsilon": 2.0, "dp-delta": 1e-5, "dp-max-grad-norm": 0}, "dp-max-grad-norm"),
        ({"dp-noise-multiplier": 1.0}, "dp-epsilon, dp-delta"),
        ({"dp-epsilon": 2.0, "dp-delta": 1e-5, "dp-accountant": "moments"}, "dp-accountant"),
    ],
)
def test_out_of_range_client_dp_node_config_fails_before_training(
    node_config: dict[str, object], named: str
) -> None:
    """Tried: an institution's node config with ε ≤ 0, δ ≥ 1, σ < 0, C ≤ 0, no budget."""
    with pytest.raises(PrivacyConfigError, match=named):
        ClientDPConfig.from_node_config(node_config)


def test_client_dp_is_off_without_dp_keys_and_keys_its_state_by_site_not_node_id() -> None:
    assert ClientDPConfig.from_node_config({"partition-id": 3}) is None
    cfg = ClientDPConfig.from_node_config({"dp-epsilon": 3.0, "dp-delta": 1e-5, "partition-id": 3})
    assert cfg is not None and cfg.state_dir.name == "partition-3"
    cfg = ClientDPConfig.from_node_config(
        {"dp-epsilon": 3.0, "dp-delta": 1e-5, "site-id": "hospital-a"}
    )
    assert cfg is not None and cfg.state_dir.name == "site-hospital-a"
    cfg = ClientDPConfig.from_node_config({"dp-epsilon": 3.0, "dp-delta": 1e-5})
    assert cfg is not None and cfg.state_dir.name == "site"  # one site per state root


def test_client_join_rejects_a_bad_dp_budget_before_starting_a_supernode(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Tried: `fedcommons client join -n dp-epsilon=0 -n dp-delta=1e-5`."""
    code, _, err = run_cli(
        [
            "client",
            "join",
            "--superlink",
            "127.0.0.1:1",
            "--insecure",
            "-n",
            "dp-epsilon=0",
            "-n",
            "dp-delta=1e-5",
        ],
        capsys,
    )
    assert code == 2
    assert "PrivacyConfigError" in err


def test_demo_rejects_bad_central_dp_options_before_any_simulation(
    capsys: pytest.CaptureFixture[str], tmp_path: object
) -> None:
    """Tried: `fedcommons demo --dp clip-norm=0 ...` (C ≤ 0)."""
    code, _, err = run_cli(
        [
            "demo",
            "-r",
            str(tmp_path),
            "--dp",
            "noise-multiplier=1",
            "--dp",
            "clip-norm=0",
            "--dp",
            "epsilon=5",
            "--dp",
            "delta=1e-5",
        ],
        capsys,
    )
    assert code == 2
    assert "dp.clip-norm" in err
