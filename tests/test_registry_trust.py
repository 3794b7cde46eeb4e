"""Registry trust: pinned signers, rollback detection, signed aliases and metrics, key location.

Each test tries one attack of someone who can write the registry (but does not hold the
signing key) or one migration step, and says what it tried.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest

from fedcommons.coordinator.config import RunConfig
from fedcommons.coordinator.prepare import signing_key_path
from fedcommons.errors import InvalidNameError, SigningKeyError, TrustError
from fedcommons.releases.export import ExportFormat, export_release
from fedcommons.releases.head import HEAD_FORMAT_V1, head_body
from fedcommons.releases.registry import Registry
from fedcommons.releases.signing import Signer, key_id, public_pem
from fedcommons.releases.trust import TrustSource, TrustStore
from fedcommons.releases.verification import verify_registry
from tests.release_helpers import publish, weights


@pytest.fixture
def signer(tmp_path: Path) -> Signer:
    return Signer.load_or_create(tmp_path / "keys" / "coordinator.pem")


@pytest.fixture
def reg(tmp_path: Path, signer: Signer) -> Registry:
    """Line ``line``: 1.0.0 -> 1.0.1, ``@stable`` on 1.0.0 (so ``@candidate`` is 1.0.1)."""
    registry = Registry(tmp_path / "reg")
    first = publish(registry, signer, weights(0))
    publish(registry, signer, weights(1), parent=first)
    registry.promote("1.0.0", "stable", signer=signer)
    return registry


def _resign_everything(reg: Registry, forger: Signer) -> None:
    """The attack: replace the published key, re-sign every manifest and HEAD.json."""
    (reg.root / "keys" / "ed25519.pub").write_bytes(public_pem(forger.public_key))
    for rel in reg.releases():
        sig = forger.sign(rel.manifest_path.read_bytes())
        rel.signature_path.write_text(json.dumps(sig))
    reg.head_path.unlink()
    reg.write_head(forger)


def _legacy_head(reg: Registry, signer: Signer, keep: int | None = None) -> str:
    """A format-1 HEAD.json (no sequence, no aliases) of the first ``keep`` releases."""
    attestation = {
        "format": HEAD_FORMAT_V1,
        "created": "2024-01-01T00:00:00+00:00",
        "releases": [
            {"name": r.name, "version": r.version, "manifest_sha256": r.manifest_sha256}
            for r in reg.releases()[:keep]
        ],
    }
    return json.dumps(
        {"attestation": attestation, "signature": signer.sign(head_body(attestation))}
    )


def _verify(reg: Registry, store: TrustStore, **kwargs):
    plain = Registry(reg.root, create=False)
    return verify_registry(plain, plain.releases(), store=store, **kwargs)


def test_an_unpinned_verify_says_it_trusted_the_key_it_found(reg: Registry) -> None:
    """Input tried: verify with no --trust, no pin and no first-use flag."""
    store = TrustStore()
    outcome = _verify(reg, store)
    assert outcome.ok and outcome.trust.source is TrustSource.registry
    assert not outcome.trust.pinned and "UNPINNED" in outcome.trust.note
    assert outcome.trust.key_id in outcome.trust.note  # the fingerprint to pin
    assert store.pins() == {}  # nothing was pinned behind the user's back


def test_a_registry_re_signed_with_a_replaced_key_fails_against_the_pinned_signer(
    reg: Registry, signer: Signer
) -> None:
    """Input tried: keys/ed25519.pub replaced, every manifest and HEAD.json re-signed."""
    store = TrustStore()
    assert _verify(reg, store, trust=key_id(signer.public_key)).ok  # pins the real signer
    _resign_everything(reg, Signer.generate())
    outcome = _verify(reg, store)  # the pin is remembered: no --trust needed
    assert outcome.trust.source is TrustSource.trust_file
    assert not outcome.ok
    assert all("signed by key" in r.error for r in outcome.releases)
    assert "signed by key" in outcome.head.error


def test_a_fingerprint_that_is_not_the_registrys_key_is_refused(
    reg: Registry, signer: Signer
) -> None:
    """Input tried: --trust with the fingerprint of the real signer after a key swap."""
    _resign_everything(reg, Signer.generate())
    with pytest.raises(TrustError, match=r"not the \w+ you trust"):
        _verify(reg, TrustStore(), trust=key_id(signer.public_key))


def test_trust_on_first_use_pins_only_when_asked(reg: Registry) -> None:
    """Input tried: a verify with --trust-on-first-use, then a key swap."""
    store = TrustStore()
    first = _verify(reg, store, first_use=True)
    assert first.ok and first.trust.source is TrustSource.first_use
    _resign_everything(reg, Signer.generate())
    assert not _verify(reg, store).ok


def test_an_older_head_json_restored_after_a_newer_one_was_accepted_fails_as_a_rollback(
    reg: Registry, signer: Signer
) -> None:
    """Input tried: HEAD.json of seq 3 copied back over seq 4 (hides release 1.0.2)."""
    store = TrustStore()
    old_head = reg.head_path.read_bytes()
    publish(reg, signer, weights(2), parent=reg.get("1.0.1"))
    assert _verify(reg, store).ok  # accepts seq 4
    reg.head_path.write_bytes(old_head)
    with sqlite3.connect(reg.index_path) as db:  # hide the newest release from the index too
        db.execute("DELETE FROM releases WHERE version='1.0.2'")
    outcome = _verify(reg, store)
    assert not outcome.ok and outcome.head.rollback
    assert "rollback" in outcome.head.error and "seq 3" in outcome.head.error


def test_a_head_that_drops_an_accepted_release_fails_even_without_sequence_numbers(
    reg: Registry, signer: Signer, tmp_path: Path
) -> None:
    """Input tried: a legacy format-1 head signed by the real key that omits 1.0.1."""
    store = TrustStore()
    reg.head_path.write_text(_legacy_head(reg, signer))
    first = _verify(reg, store)
    assert first.ok and any("legacy HEAD.json" in n for n in first.head.notes)
    reg.head_path.write_text(_legacy_head(reg, signer, keep=1))
    outcome = _verify(reg, store)
    assert not outcome.ok and "line 1.0.1 was attested" in outcome.head.error


def test_a_legacy_head_is_upgraded_by_the_next_publish_and_cannot_come_back(
    reg: Registry, signer: Signer
) -> None:
    """Input tried: the format-1 head restored after the registry moved to format 2."""
    store = TrustStore()
    legacy = _legacy_head(reg, signer)
    reg.head_path.write_text(legacy)
    assert _verify(reg, store).ok
    reg.promote("1.0.1", "stable", signer=signer)  # rewrites HEAD.json, continuing it
    upgraded = _verify(reg, store)
    assert upgraded.ok and upgraded.head.seq == 1
    assert any("upgraded" in n for n in upgraded.head.notes)
    reg.head_path.write_text(legacy)
    outcome = _verify(reg, store)
    assert not outcome.ok and "unsequenced format-1 head" in outcome.head.error


def test_editing_the_index_aliases_changes_nothing_a_reader_resolves(reg: Registry) -> None:
    """Input tried: UPDATE aliases SET version='1.0.1' WHERE alias='stable' in index.sqlite."""
    with sqlite3.connect(reg.index_path) as db:
        db.execute("UPDATE aliases SET version='1.0.1' WHERE alias='stable'")
    reader = Registry(reg.root, create=False)
    assert reader.get("@stable").version == "1.0.0"
    assert reader.get("1.0.0").aliases == ("stable",)


def test_editing_the_index_metrics_and_weights_hash_changes_nothing_exported_or_listed(
    reg: Registry, tmp_path: Path
) -> None:
    """Input tried: the index's metrics set to 0.99 and its weights hash pointed at 1.0.1's blob."""
    other = reg.get("1.0.1").weights_sha256
    genuine = reg.get("1.0.0").weights_path.read_bytes()
    with sqlite3.connect(reg.index_path) as db:
        db.execute(
            "UPDATE releases SET metrics_json=?, weights_sha256=? WHERE version='1.0.0'",
            (json.dumps({"test_accuracy": 0.99}), other),
        )
    reader = Registry(reg.root, create=False)
    rel = reader.get("1.0.0")
    assert export_release(reader, rel, ExportFormat.safetensors) == genuine
    assert reader.verified_manifest(rel).metrics == {"test_accuracy": 0.5}


def test_a_signing_key_inside_the_registry_is_refused_by_publish(
    tmp_path: Path,
) -> None:
    """Input tried: publishing with a key file at <registry>/private/ed25519.pem."""
    reg = Registry(tmp_path / "reg")
    inside = Signer.load_or_create(tmp_path / "reg" / "private" / "ed25519.pem")
    with pytest.raises(SigningKeyError, match="lies inside the registry"):
        publish(reg, inside, weights(0))
    assert reg.releases() == []


def test_the_default_signing_key_lives_in_the_user_config_dir(tmp_path: Path) -> None:
    """Input tried: a run config with no signing-key and no $FEDCOMMONS_SIGNING_KEY."""
    path = signing_key_path(RunConfig(registry=str(tmp_path / "reg")))
    assert path.name == "signing-key.pem" and not path.is_relative_to(tmp_path / "reg")


def test_a_registry_still_holding_the_old_default_key_gets_the_move_command(
    tmp_path: Path,
) -> None:
    """Input tried: an existing registry with its key at the old <registry>/private/ed25519.pem."""
    legacy = tmp_path / "reg" / "private" / "ed25519.pem"
    Signer.load_or_create(legacy)
    with pytest.raises(SigningKeyError, match=r"old default .*mv .*ed25519\.pem"):
        signing_key_path(RunConfig(registry=str(tmp_path / "reg")))


def test_an_alias_that_is_not_a_safe_name_is_refused(reg: Registry, signer: Signer) -> None:
    """Input tried: promote with alias '../x'."""
    with pytest.raises(InvalidNameError):
        reg.promote("1.0.0", "../x", signer=signer)


def test_a_trust_file_that_is_not_json_is_a_typed_error(tmp_path: Path, reg: Registry) -> None:
    """Input tried: a trust file holding 'not json'."""
    store = TrustStore(tmp_path / "trust.json")
    store.path.write_text("not json")
    with pytest.raises(TrustError, match="not valid JSON"):
        _verify(reg, store)


def test_a_copied_registry_keeps_the_rollback_state_of_its_signer(
    reg: Registry, signer: Signer, tmp_path: Path
) -> None:
    """Input tried: an old copy of the registry served from another path after a newer verify."""
    store = TrustStore()
    mirror = tmp_path / "mirror"
    shutil.copytree(reg.root, mirror)  # the old state: seq 3
    publish(reg, signer, weights(2), parent=reg.get("1.0.1"))
    assert _verify(reg, store).ok
    outcome = _verify(Registry(mirror, create=False), store)
    assert not outcome.ok and outcome.head.rollback
