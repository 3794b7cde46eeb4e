"""Roster-authenticated SecAgg+ and distributed DP, on the coordinator's real round path.

In-process engine (the real ServerApp and ClientApps), plus one run of ``fedcommons demo``
on Flower's simulation engine for the authenticated path.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
from scipy import stats

import fedcommons.client_sdk.secagg as client_secagg
import fedcommons.coordinator.secure_round as secure_round
from fedcommons.client_sdk.client_app import app as client_app
from fedcommons.coordinator.config import RunConfig
from fedcommons.engines import inprocess
from fedcommons.engines.inprocess import InProcessGrid, run_in_process
from fedcommons.errors import ConfigError, SecAggAbortedError
from fedcommons.privacy.audits.ledger_audit import audit_ledger
from fedcommons.privacy.disclosure import PrivateRoundLog
from fedcommons.privacy.distributed import recompute_epsilons
from fedcommons.privacy.secagg.primitives import new_private_key, public_key
from fedcommons.privacy.secagg.quantize import signed
from fedcommons.privacy.secagg.roster import simulated_consortium
from fedcommons.releases.registry import Registry
from fedcommons.wire import keys
from tests.secagg_helpers import dropping, run_secure_demo


def _config(tmp_path: Path, **extra: object) -> RunConfig:
    flat: dict[str, object] = {
        "rounds": 1,
        "local-epochs": 1,
        "batch-size": 64,
        "registry": str(tmp_path / "registry"),
        "secagg": True,
        "gate-first-release": "record",  # one round need not beat the starting weights
    }
    flat.update(extra)
    return RunConfig.from_flat(flat)


@pytest.fixture
def sites(tmp_path: Path) -> list[dict[str, str]]:
    """Seven institutions' node configs: the consortium roster and each one's own key."""
    roster = simulated_consortium(tmp_path / "consortium", 7)
    return [
        {
            keys.SECAGG_ROSTER: str(roster),
            keys.SECAGG_SIGNING_KEY: str(roster.parent / f"site-{i}.pem"),
        }
        for i in range(7)
    ]


class _KeySwappingGrid(InProcessGrid):
    """A malicious coordinator: in share-keys requests it replaces participant 3's mask key
    with one it generated (so it could compute that participant's pairwise masks), and it
    records every error reply."""

    errors: ClassVar[list[str]] = []

    def push_messages(self, messages):
        messages = list(messages)
        forged = public_key(new_private_key())
        for msg in messages:
            record = msg.content.config_records.get(keys.SECAGG_RECORD)
            if record is not None and record[keys.SECAGG_STAGE] == "share-keys":
                idx = list(record["idx"])
                if 3 in idx:
                    s_pks = list(record["s-pk"])
                    s_pks[idx.index(3)] = forged
                    record["s-pk"] = s_pks
        return super().push_messages(messages)

    def pull_messages(self, message_ids):
        replies = list(super().pull_messages(message_ids))
        _KeySwappingGrid.errors += [str(r.error.reason) for r in replies if r.has_error()]
        return replies


def test_roster_signed_round_publishes(tmp_path: Path, sites: list[dict[str, str]]) -> None:
    """Seven roster sites, secagg-auth = roster: every advertisement is signed and verified,
    the round completes with all seven and the release records the setting."""
    config = _config(tmp_path, **{"secagg-auth": "roster"})
    result = run_in_process(config, [client_app] * 7, node_configs=sites)
    assert result.reports[0].accepted == 7 and result.reports[0].rejected == {}
    assert result.release.manifest().config["secagg-auth"] == "roster"


def test_substituted_key_aborts_at_the_honest_clients_and_nothing_is_published(
    tmp_path: Path, sites: list[dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Input: a coordinator stage that swaps participant 3's advertised mask key for its own
    (complete graph of 7, threshold 5). Each of 3's six neighbours refuses with the
    substitution named, before sending a share; the round aborts; no release."""
    monkeypatch.setattr(inprocess, "InProcessGrid", _KeySwappingGrid)
    _KeySwappingGrid.errors = []
    with pytest.raises(SecAggAbortedError):
        run_in_process(_config(tmp_path), [client_app] * 7, node_configs=sites)
    refusals = [e for e in _KeySwappingGrid.errors if "substituted or altered its keys" in e]
    assert len(refusals) == 6
    assert all(
        e.startswith("secagg-share-keys: participant 3's key advertisement") for e in refusals
    )
    registry = tmp_path / "registry"
    assert not (registry / "index.sqlite").exists() or not Registry(registry).list()


def test_roster_site_refuses_an_unsigned_neighbour(
    tmp_path: Path, sites: list[dict[str, str]]
) -> None:
    """Input: one institution without a roster (it does not sign) among six roster sites, and
    a coordinator that does not require signatures. The roster sites refuse to share keys with
    it: each refusal names it; the round cannot reach its threshold and aborts."""
    mixed = [{}, *sites[1:]]
    with pytest.raises(SecAggAbortedError):
        run_in_process(_config(tmp_path), [client_app] * 7, node_configs=mixed)


def test_coordinator_requiring_signatures_drops_an_unsigned_site(
    tmp_path: Path, sites: list[dict[str, str]]
) -> None:
    """With secagg-auth = roster the unsigned site is rejected at advertise (counted as
    secagg-malformed) and the six roster sites aggregate without it."""
    mixed = [{}, *sites[1:]]
    config = _config(tmp_path, **{"secagg-auth": "roster"})
    report = run_in_process(config, [client_app] * 7, node_configs=mixed).reports[0]
    assert report.rejected == {"secagg-malformed": 1}
    assert report.accepted == 6


def test_signing_key_without_roster_is_refused_as_a_site_configuration_error(
    tmp_path: Path, sites: list[dict[str, str]]
) -> None:
    """Input: a site whose node config names a signing key but no roster: it refuses every
    secure round at advertise (counted secagg-refused), the others go on."""
    broken = [{keys.SECAGG_SIGNING_KEY: sites[0][keys.SECAGG_SIGNING_KEY]}] + [{}] * 6
    report = run_in_process(_config(tmp_path), [client_app] * 7, node_configs=broken).reports[0]
    assert report.rejected == {"secagg-refused": 1}


# ---------------------------------------------------------------------------------------
# Distributed DP (Skellam) on the real round path
# ---------------------------------------------------------------------------------------
def _ddp_config(tmp_path: Path, rounds: int = 1, **extra: object) -> RunConfig:
    return _config(
        tmp_path,
        rounds=rounds,
        **{
            "dp.mechanism": "skellam",
            "dp.noise-multiplier": 0.7,
            "dp.clip-norm": 0.5,
            "dp.epsilon": 200.0,
            "dp.delta": 1e-5,
            "dp.sampling": "fixed",
            "compression": "dense:fp16",  # 2^15 levels: Skellam variances of a few 1e8
            "secagg-num-shares": 7,
            "secagg-threshold": 4,
            "private-dir": str(tmp_path / "private"),
        },
        **extra,
    )


@pytest.fixture
def noise_seen(monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    """Every client's Skellam noise as drawn, and the coordinator's unmasked ring sum."""
    seen: dict[str, object] = {"noise": {}, "totals": []}
    real_noise, real_dequantize = client_secagg.skellam_noise, secure_round.dequantize

    def noise(size, variance, rng=None):
        out = real_noise(size, variance, rng)
        seen["noise"][len(seen["noise"])] = (variance, out.copy())
        return out

    def dequantize_spy(total, ring):
        seen["totals"].append((total.copy(), ring))
        return real_dequantize(total, ring)

    monkeypatch.setattr(client_secagg, "skellam_noise", noise)
    monkeypatch.setattr(secure_round, "dequantize", dequantize_spy)
    return seen


@pytest.mark.parametrize("dropped", [set(), {1, 6}])
def test_distributed_noise_is_in_the_sum_and_accounted_exactly(
    tmp_path: Path, noise_seen: dict[str, object], dropped: set[int]
) -> None:
    """10 sites add Skellam noise (2 drop before sending): every survivor drew noise of the
    calibrated variance (z·Δ₂)²/m_min; the unmasked sum carries their noise (variance m·μ_c,
    chi-square interval α = 1e-6); the ledger records m contributors and an ε the auditor
    recomputes; `audit ledger`'s check passes; no per-node value is in the ledger."""
    config = _ddp_config(tmp_path)
    result = run_in_process(config, [dropping("masked-input", dropped)] * 10)
    m = 10 - len(dropped)
    # a DP line publishes no count: the coordinator's private round log has them
    (record,) = PrivateRoundLog(tmp_path / "private").records()
    assert record["report"]["accepted"] == m
    draws = list(noise_seen["noise"].values())
    assert len(draws) == m  # the dropped sites never got to add noise
    variance = draws[0][0]
    ledger = tmp_path / "registry" / "privacy" / "digits" / "ledger.jsonl"
    entry = json.loads(ledger.read_text().splitlines()[-1])["entry"]
    assert entry["mechanism"] == "skellam" and entry["contributors"] == m
    assert entry["local_variance"] == pytest.approx(variance)
    assert entry["min_contributors"] == 4
    assert variance * 4 == pytest.approx((0.7 * entry["norm_bound"]) ** 2)
    total, ring = noise_seen["totals"][0]
    noise_sum = sum(n for _, n in draws)
    d = noise_sum.size
    lo, hi = stats.chi2.ppf([1e-6, 1 - 1e-6], d - 1) / (d - 1)
    assert lo * m * variance <= float(np.var(noise_sum, ddof=1)) <= hi * m * variance
    # the noise is really in what the coordinator unmasked: sum − noise = clean codes
    clean = signed(total, ring.bits)[:d] - noise_sum
    assert np.abs(clean).max() <= m * ring.levels
    assert float(np.std(signed(total, ring.bits)[:d])) > 0.5 * math.sqrt(m * variance)
    assert recompute_epsilons([entry], 1e-5) == pytest.approx([entry["epsilon"]], rel=1e-9)
    privacy = result.release.manifest().privacy
    assert privacy["distributed"]["epsilon"] == entry["epsilon"]
    audit = audit_ledger(tmp_path / "registry", privacy)
    assert audit.recomputed_epsilon == pytest.approx(entry["epsilon"], rel=1e-9)
    assert "client_spends" not in entry and "node" not in json.dumps(entry)


def test_site_refuses_a_round_below_its_noise_floor(tmp_path: Path) -> None:
    """Input: a site with node config dp-min-noise-multiplier 2 in a z = 0.7 round: it refuses
    at masked input (counted secagg-refused) before training; the others aggregate."""
    sites = [{keys.SECAGG_DP_MIN_NOISE: 2.0}] + [{}] * 6
    run_in_process(_ddp_config(tmp_path), [client_app] * 7, node_configs=sites)
    (record,) = PrivateRoundLog(tmp_path / "private").records()  # a DP line publishes no count
    assert record["report"]["rejected"] == {"secagg-refused": 1}
    assert record["report"]["accepted"] == 6


def test_skellam_without_secagg_is_refused_in_the_run_config(tmp_path: Path) -> None:
    """Input: dp.mechanism = skellam with secagg = false."""
    with pytest.raises(ConfigError, match="set secagg = true"):
        _ddp_config(tmp_path, secagg=False)


@pytest.mark.slow
def test_demo_with_roster_signed_keys_on_the_simulation_engine(
    tmp_path: Path, flower_env: dict[str, str]
) -> None:
    """`fedcommons demo --secagg --secagg-consortium DIR` on Flower's simulation engine:
    every simulated institution signs its advertisement with its own key, verifies its
    neighbours against the roster, and the coordinator requires signatures; a release
    recording secagg-auth = roster is published."""
    registry = tmp_path / "registry"
    consortium = str(tmp_path / "consortium")
    run = run_secure_demo(tmp_path, flower_env, 4, 1, "--secagg-consortium", consortium)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "roster-signed keys" in run.stdout
    manifest = Registry(registry).get("1.0.0", name="digits").manifest()
    # complete graph of 4, threshold 3: a site whose stage times out on a loaded machine
    # drops out; every site in the sum signed, and verified its neighbours, on the engine
    assert manifest.config["secagg-auth"] == "roster" and manifest.contributors >= 3
    roster = json.loads((tmp_path / "consortium" / "roster.json").read_text())
    assert sorted(roster["members"]) == [f"site-{i}" for i in range(4)]
