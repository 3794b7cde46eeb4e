"""The coordinator's private state stays out of the registry it serves."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from fedcommons.errors import ConfigError
from fedcommons.privacy.disclosure import PrivateRoundLog, private_dir


def test_private_dir_configured_inside_the_registry_is_refused(tmp_path: Path) -> None:
    """Tried: private-dir = <registry>/private (the registry is published as a whole)."""
    with pytest.raises(ConfigError, match="inside the registry"):
        private_dir(tmp_path / "reg", str(tmp_path / "reg" / "private"))


def test_default_private_dir_lies_outside_the_registry_even_when_the_state_root_is_in_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEDCOMMONS_STATE_DIR", str(tmp_path / "reg" / "state"))
    monkeypatch.delenv("FEDCOMMONS_COORDINATOR_DIR", raising=False)
    chosen = private_dir(tmp_path / "reg")
    assert chosen == (tmp_path / "reg.coordinator-private").resolve()


def test_private_round_log_is_readable_by_its_owner_only(tmp_path: Path) -> None:
    log = PrivateRoundLog(tmp_path / "private")
    log.append({"round": 1, "contributors": [2**63 + 7]})
    assert list(log.records()) == [{"round": 1, "contributors": [2**63 + 7]}]
    assert stat.S_IMODE(log.path.stat().st_mode) == 0o600


def test_dp_line_serves_no_node_id_and_its_epsilon_recomputes(tmp_path: Path) -> None:
    """In-process engine with Flower-like 64-bit ids, Poisson 2 of 4, DP-SGD at the sites."""
    from fedcommons.client_sdk.client_app import app as client_app
    from fedcommons.coordinator.config import RunConfig
    from fedcommons.engines.inprocess import run_in_process
    from fedcommons.privacy.audits.ledger_audit import audit_ledger

    ids = [2**63 + 12_345_678_901, 18_000_000_000_000_000_001, 9_999_999_999_999, 2**64 - 59]
    config = RunConfig.from_flat(
        {
            "rounds": 2,
            "local-epochs": 1,
            "batch-size": 64,
            "clients-per-round": 2,
            "registry": str(tmp_path / "reg"),
            "private-dir": str(tmp_path / "private"),
            "dp.noise-multiplier": 1.0,
            "dp.clip-norm": 0.5,
            "dp.epsilon": 30.0,
            "dp.delta": 1e-5,
            "gate-first-release": "record",  # two noisy rounds need not beat the start
        }
    )
    sites = [{"dp-epsilon": 50.0, "dp-delta": 1e-5, "site-id": f"s{i}"} for i in range(4)]
    result = run_in_process(config, [client_app] * 4, node_configs=sites, node_ids=ids)
    records = list(PrivateRoundLog(tmp_path / "private").records())
    assert {n for r in records for n in r["contributors"]} <= set(ids)
    for path in (p for p in (tmp_path / "reg").rglob("*") if p.is_file()):
        data = path.read_bytes()
        for node in ids:
            assert str(node).encode() not in data, f"node {node} served in {path}"
            assert node.to_bytes(8, "little") not in data, f"node {node} served in {path}"
    privacy = result.release.manifest().privacy
    audit = audit_ledger(tmp_path / "reg", privacy)
    assert audit.recomputed_epsilon == pytest.approx(privacy["central"]["epsilon"], rel=1e-6)
