"""Per-institution receipts: each site composes its own (ε, δ) over every line and run."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest

from fedcommons.client_sdk.client_app import app as client_app
from fedcommons.coordinator.config import RunConfig
from fedcommons.engines.inprocess import run_in_process
from fedcommons.errors import ConfigError
from fedcommons.privacy.accounting import audit_epsilon
from fedcommons.privacy.line import LinePrivacy
from fedcommons.privacy.receipts import RECEIPTS_FILE, compose_receipts, site_state_dir
from tests.cli_helpers import run_cli

DP = {"dp.noise-multiplier": 2.0, "dp.clip-norm": 0.5, "dp.epsilon": 100.0, "dp.delta": 1e-5}
DP["gate-first-release"] = "record"  # noisy rounds need not beat the starting weights


def _run(tmp_path: Path, line: str, rounds: int, sites: list[dict], **extra: object) -> None:
    flat = {
        "rounds": rounds,
        "local-epochs": 1,
        "batch-size": 64,
        "registry": str(tmp_path / "registry"),
        "release-name": line,
        "clients-per-round": 2,
        **DP,
        **extra,
    }
    run_in_process(RunConfig.from_flat(flat), [client_app] * len(sites), node_configs=sites)


def test_site_receipt_composes_every_round_of_every_run_on_two_lines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two lines, Poisson q = 2/4: the receipt counts all rounds of each run it joined."""
    monkeypatch.setattr(  # a reproducible sample (the coordinator's is secret)
        LinePrivacy,
        "__init__",
        functools.partialmethod(LinePrivacy.__init__, rng=np.random.default_rng(0)),
    )
    sites = [{"site-id": f"hospital-{i}"} for i in range(4)]
    _run(tmp_path, "alpha", 2, sites)
    _run(tmp_path, "beta", 3, sites, **{"dp.sampling": "fixed"})

    def lines_of(site: dict) -> set[str]:
        path = site_state_dir(site) / RECEIPTS_FILE
        text = path.read_text() if path.exists() else ""
        return {json.loads(x)["line"] for x in text.splitlines()}

    both = [site_state_dir(s) for s in sites if lines_of(s) == {"alpha", "beta"}]
    assert both, "no site was sampled on both lines"
    state = both[0]
    assert state.name.startswith("site-hospital-")
    records = [json.loads(x) for x in (state / RECEIPTS_FILE).read_text().splitlines()]
    assert records and {r["line"] for r in records} <= {"alpha", "beta"}
    receipt = compose_receipts(state, registry=tmp_path / "registry")
    assert receipt.mismatches == []
    accounted = {
        r.line: (r.noise_multiplier, r.sample_rate, r.rounds_accounted) for r in receipt.runs
    }
    expected = [accounted[line] for line in sorted(accounted)]
    assert all(n in (2, 3) for _, _, n in expected)
    want = audit_epsilon(expected, 1e-5, "rdp")
    assert receipt.user_epsilon_recomputed == pytest.approx(want)
    assert receipt.user_epsilon_rdp == pytest.approx(want, rel=1e-6)
    code, out, err = run_cli(
        [
            "client",
            "receipt",
            "--state-dir",
            str(state),
            "-r",
            str(tmp_path / "registry"),
            "--format",
            "json",
        ],
        capsys,
    )
    assert code == 0, out + err
    assert json.loads(out)["user_epsilon_rdp"] == pytest.approx(receipt.user_epsilon_rdp)


def test_receipt_flags_a_round_the_ledger_does_not_hold(tmp_path: Path) -> None:
    """Tried: a receipt of a round whose claim the coordinator never put in its ledger."""
    sites = [{"site-id": f"s{i}"} for i in range(2)]
    _run(tmp_path, "alpha", 1, sites, **{"clients-per-round": 0})
    state = site_state_dir(sites[0])
    path = state / RECEIPTS_FILE
    doc = json.loads(path.read_text().splitlines()[0])
    doc["round"] = 7
    path.write_text(path.read_text() + json.dumps(doc) + "\n")
    receipt = compose_receipts(state, registry=tmp_path / "registry")
    assert any("round 7 is not in the ledger" in m for m in receipt.mismatches)


def test_site_identity_never_falls_back_to_the_node_id(tmp_path: Path) -> None:
    """Tried: no state-dir, no site-id, no partition-id; then a malformed site-id."""
    assert site_state_dir({}).name == "site"
    assert site_state_dir({"partition-id": 3}).name == "partition-3"
    with pytest.raises(ConfigError, match="site-id"):
        site_state_dir({"site-id": "../escape"})
