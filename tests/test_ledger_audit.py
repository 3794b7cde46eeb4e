"""``audit ledger`` trusts signatures, not the registry: forged, rewritten and appended ledgers.

One central-DP run (two rounds, in-process engine) is published once per module; each
test works on its own copy of that registry and tries one attack.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedcommons.client_sdk.client_app import app as client_app
from fedcommons.coordinator.config import RunConfig
from fedcommons.engines.inprocess import run_in_process
from fedcommons.errors import LedgerTamperedError, PrivacyAuditError
from fedcommons.privacy.accounting import audit_epsilon
from fedcommons.privacy.audits.ledger_audit import audit_ledger
from fedcommons.privacy.ledger import GENESIS, PrivacyLedger, entry_hash
from fedcommons.releases.ledger_audit import audit_signed_ledger
from fedcommons.releases.registry import Registry
from fedcommons.releases.signing import key_id
from fedcommons.releases.trust import TrustStore
from tests.cli_helpers import run_cli
from tests.test_privacy_federation import CENTRAL

LEDGER = Path("privacy") / "digits" / "ledger.jsonl"


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A registry with release 1.0.0 of line digits: 2 central-DP rounds in its ledger."""
    root = tmp_path_factory.mktemp("dp-run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEDCOMMONS_CONFIG_DIR", str(root / "user-config"))
        mp.setenv("FEDCOMMONS_STATE_DIR", str(root / "client-state"))
        config = RunConfig.from_flat(
            {
                "rounds": 2,
                "local-epochs": 1,
                "batch-size": 64,
                "registry": str(root / "registry"),
                **CENTRAL,
            }
        )
        run_in_process(config, [client_app] * 2)
    yield root / "registry"


@pytest.fixture
def registry(published: Path, tmp_path: Path) -> Registry:
    shutil.copytree(published, tmp_path / "registry")
    return Registry(tmp_path / "registry", create=False)


def _rewrite_ledger(path: Path, sample_rate: float) -> list[str]:
    """Rewrite every entry's q and ε consistently and re-chain; return the new hashes."""
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    prev, history, hashes = GENESIS, [], []
    for doc in lines:
        entry = doc["entry"]
        history.append((float(entry["noise_multiplier"]), sample_rate, 1))
        entry["sample_rate"] = sample_rate
        entry["epsilon"] = audit_epsilon(history, float(entry["delta"]), "rdp")
        doc["prev_sha256"], doc["sha256"] = prev, entry_hash(prev, entry)
        prev = doc["sha256"]
        hashes.append(prev)
    path.write_text("".join(json.dumps(d, sort_keys=True) + "\n" for d in lines))
    return hashes


def test_an_intact_release_audits_ok_against_the_pinned_signer(registry: Registry) -> None:
    """Input tried: the published registry, untouched, with the signer pinned by fingerprint."""
    key = registry.published_key()
    assert key is not None
    signed = audit_signed_ledger(registry, "1.0.0", trust=key_id(key))
    assert signed.trust.pinned and not signed.flagged
    assert signed.covered_entries == 2 and signed.audit.entries == 2


def test_a_rewritten_ledger_manifest_and_index_fail_on_the_signature(registry: Registry) -> None:
    """Input tried: q rewritten to 0.05 with matching ε in ledger, manifest and index."""
    rel = registry.get("1.0.0")
    hashes = _rewrite_ledger(registry.root / LEDGER, 0.05)
    doc = json.loads(rel.manifest_path.read_text())
    privacy = doc["privacy"]
    privacy["ledger_head_sha256"], privacy["ledger_entry_sha256"] = hashes[-1], hashes
    forged_eps = json.loads((registry.root / LEDGER).read_text().splitlines()[-1])["entry"]
    privacy["central"]["epsilon"] = forged_eps["epsilon"]
    data = (json.dumps(doc, sort_keys=True, indent=2) + "\n").encode()
    rel.manifest_path.write_bytes(data)
    with sqlite3.connect(registry.index_path) as db:
        db.execute(
            "UPDATE releases SET manifest_sha256=? WHERE version='1.0.0'",
            (hashlib.sha256(data).hexdigest(),),
        )
    # what the audit trusted before: the forged ledger reproduces the forged, lower claim
    assert audit_ledger(registry.root, privacy).claimed_epsilon < 2.5
    with pytest.raises(PrivacyAuditError, match="signature does not match the manifest"):
        audit_signed_ledger(Registry(registry.root, create=False), "1.0.0")


def test_a_ledger_rewritten_under_an_intact_manifest_names_its_first_round(
    registry: Registry,
) -> None:
    """Input tried: both entries re-chained with q = 0.05; the signed manifest untouched."""
    _rewrite_ledger(registry.root / LEDGER, 0.05)
    with pytest.raises(LedgerTamperedError, match=r"round 1 of run .*rewritten from here on") as e:
        audit_signed_ledger(registry, "1.0.0")
    assert e.value.round == 1


def test_an_appended_ledger_line_is_flagged_with_exit_code_1(
    registry: Registry, capsys: pytest.CaptureFixture[str]
) -> None:
    """Input tried: a third, well-chained ledger entry appended after publication."""
    ledger = PrivacyLedger(registry.root / LEDGER)
    last = ledger.entries()[-1]
    ledger.append(dict(last, round=3))
    signed = audit_signed_ledger(registry, "1.0.0")
    assert signed.flagged and [u["round"] for u in signed.unreleased] == [3]
    code, out, _ = run_cli(["audit", "ledger", "1.0.0", "-r", str(registry.root)], capsys)
    assert code == 1 and "flagged" in out and "round 3" in out


def test_an_unpinned_audit_says_which_key_it_trusted(registry: Registry) -> None:
    """Input tried: no --trust and nothing pinned."""
    signed = audit_signed_ledger(registry, "1.0.0", store=TrustStore())
    assert not signed.trust.pinned and "UNPINNED" in signed.trust.note
