"""DP end to end on the in-process engine: real ServerApp and ClientApps, real registry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedcommons.client_sdk.client_app import app as client_app
from fedcommons.coordinator.config import RunConfig
from fedcommons.engines.inprocess import run_in_process
from fedcommons.errors import PrivacyBudgetExceededError
from fedcommons.privacy.client_dp import STATE_FILE
from fedcommons.releases.registry import Registry
from fedcommons.wire import keys
from tests.cli_helpers import run_cli

CENTRAL = {
    "dp.mechanism": "dp-fedavg",
    "dp.noise-multiplier": 1.0,
    "dp.clip-norm": 0.5,
    "dp.epsilon": 20.0,
    "dp.delta": 1e-5,
    # a few noisy rounds need not beat the starting weights: these tests are about privacy
    "gate-first-release": "record",
}


def _config(tmp_path: Path, rounds: int = 2, **extra: object) -> RunConfig:
    flat = {
        "rounds": rounds,
        "local-epochs": 1,
        "batch-size": 64,  # few DP-SGD steps: the tests stay fast
        "registry": str(tmp_path / "registry"),
    }
    flat.update(extra)
    return RunConfig.from_flat(flat)


def _sites(tmp_path: Path, n: int, epsilon: float = 20.0) -> list[dict[str, object]]:
    return [
        {"dp-epsilon": epsilon, "dp-delta": 1e-5, "state-dir": str(tmp_path / f"site{i}")}
        for i in range(n)
    ]


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code, out, err = run_cli(argv, capsys)
    return code, out + err


def test_central_and_client_dp_run_publishes_a_guarantee_the_audit_reproduces(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(tmp_path, rounds=2, **CENTRAL)
    result = run_in_process(config, [client_app] * 3, node_configs=_sites(tmp_path, 3))
    privacy = result.release.manifest().privacy
    assert privacy["ledger"] == "privacy/digits/ledger.jsonl"
    assert privacy["ledger_entries"] == 2
    central = privacy["central"]
    assert central["mechanism"] == "dp-fedavg" and central["level"] == "user"
    assert central["min_effective_noise_multiplier"] >= 1.0
    assert 0 < central["epsilon"] <= 20.0
    assert central["adjacency"] == "add-or-remove-one-institution"
    assert central["population"] == 3 and central["expected_participants"] == 3
    assert "client_dp" not in privacy  # per-institution spends stay with the institutions
    for r in result.release.manifest().round_metrics:  # nothing data-dependent un-noised
        assert set(r) == {"round", "val_loss", "val_accuracy", "dense_bytes"}
    assert result.release.manifest().contributors == 0
    assert "user-level" in privacy["guarantee"]

    code, out = _cli(
        ["audit", "ledger", "latest", "-r", str(tmp_path / "registry"), "--format", "json"], capsys
    )
    assert code == 0, out
    doc = json.loads(out)
    assert doc["verdict"] == "ok"
    assert abs(doc["recomputed_epsilon"] - central["epsilon"]) <= 1e-6 * central["epsilon"]
    assert doc["client_checks"] == []


def test_tampered_ledger_fails_audit_ledger_naming_the_round(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Tried: round 2's noise std edited in the published ledger."""
    config = _config(tmp_path, rounds=2, **CENTRAL)
    run_in_process(config, [client_app] * 2)
    path = tmp_path / "registry" / "privacy" / "digits" / "ledger.jsonl"
    lines = path.read_text().splitlines()
    doc = json.loads(lines[1])
    doc["entry"]["noise_std"] *= 0.1
    lines[1] = json.dumps(doc)
    path.write_text("\n".join(lines) + "\n")
    code, out = _cli(["audit", "ledger", "1.0.0", "-r", str(tmp_path / "registry")], capsys)
    assert code == 2
    assert "LedgerTamperedError" in out and "round 2" in out


def test_client_accountant_persists_across_runs_and_is_never_reset(tmp_path: Path) -> None:
    sites = _sites(tmp_path, 2)
    run_in_process(_config(tmp_path, rounds=1), [client_app] * 2, node_configs=sites)
    first = json.loads((tmp_path / "site0" / STATE_FILE).read_text())
    run_in_process(_config(tmp_path, rounds=1), [client_app] * 2, node_configs=sites)
    state = json.loads((tmp_path / "site0" / STATE_FILE).read_text())
    assert len(state["rounds"]) == 2
    assert state["rounds"][1]["epsilon"] > first["rounds"][0]["epsilon"]
    assert state["rounds"][1]["steps"] == first["rounds"][0]["steps"]
    assert sum(h[2] for h in state["history"]) == state_steps(state)


def state_steps(state: dict) -> int:
    return sum(r["steps"] for r in state["rounds"])


def test_client_refuses_a_round_past_its_budget_and_the_coordinator_counts_it(
    tmp_path: Path,
) -> None:
    """Tried: one institution with ε = 0.3, too small for even one round of DP-SGD."""
    sites = _sites(tmp_path, 3)
    sites[2]["dp-epsilon"] = 0.3
    result = run_in_process(_config(tmp_path, rounds=1), [client_app] * 3, node_configs=sites)
    assert result.reports[0].rejected == {"dp-budget-exhausted": 1}
    assert result.reports[0].accepted == 2
    assert not (tmp_path / "site2" / STATE_FILE).exists()  # nothing was spent


def _strip_spend(msg: Message, context: Context) -> Message:
    reply = client_app(msg, context)
    if not reply.has_error():
        del reply.content[keys.DP_SPEND]
    return reply


def test_reply_claiming_dp_without_its_spend_record_is_rejected(tmp_path: Path) -> None:
    """Tried: a client that sets the dp-sgd claim but drops its dp-spend record."""
    liar = ClientApp()
    liar.train()(_strip_spend)
    # one round of record-level DP-SGD need not beat the starting weights
    config = _config(tmp_path, rounds=1, **{"gate-first-release": "record"})
    result = run_in_process(config, [client_app, liar], node_configs=_sites(tmp_path, 2))
    assert result.reports[0].rejected == {"dp-spend-missing": 1}
    assert result.release.manifest().privacy["client_dp"]["institutions"] == 1


def test_exhausted_line_refuses_the_next_run_before_any_round(tmp_path: Path) -> None:
    """Tried: a second run on a line whose first run spent more than the new budget."""
    run_in_process(_config(tmp_path, rounds=2, **CENTRAL), [client_app] * 2)
    small = {**CENTRAL, "dp.epsilon": 1.0}
    with pytest.raises(PrivacyBudgetExceededError, match="cannot run a central-DP round"):
        run_in_process(_config(tmp_path, rounds=2, **small), [client_app] * 2)
    assert [r.version for r in Registry(tmp_path / "registry").releases()] == ["1.0.0"]


def test_audit_ledger_rejects_a_manifest_edited_after_publication(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Tried: the release's claimed ε lowered in manifest.json after publishing."""
    result = run_in_process(_config(tmp_path, rounds=1, **CENTRAL), [client_app] * 2)
    path = result.release.manifest_path
    doc = json.loads(path.read_text())
    doc["privacy"]["central"]["epsilon"] = 0.1
    path.write_text(json.dumps(doc, sort_keys=True, indent=2) + "\n")
    code, out = _cli(["audit", "ledger", "1.0.0", "-r", str(tmp_path / "registry")], capsys)
    assert code == 2 and "does not verify against the signer" in out


def test_audit_ledger_of_a_release_without_dp_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Tried: auditing a release trained without any DP."""
    run_in_process(_config(tmp_path, rounds=1), [client_app] * 2)
    code, out = _cli(["audit", "ledger", "latest", "-r", str(tmp_path / "registry")], capsys)
    assert code == 2 and "no privacy ledger" in out
