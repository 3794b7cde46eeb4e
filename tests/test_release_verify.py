"""``verify``: hashes, Ed25519 signatures and the chain; the wrong file is named."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest

from fedcommons.errors import SigningKeyError
from fedcommons.releases.registry import Registry, Release
from fedcommons.releases.signing import Signer, public_pem
from fedcommons.releases.verification import Verifier, verify_release
from tests.release_helpers import publish, weights


@pytest.fixture
def chain(tmp_path: Path) -> tuple[Registry, list[Release]]:
    """A line of four releases 1.0.0 -> 1.0.1 -> 1.0.2 -> 1.0.3."""
    signer = Signer.load_or_create(tmp_path / "key.pem")
    reg = Registry(tmp_path / "reg")
    releases = [publish(reg, signer, weights(0))]
    for i in range(1, 4):
        releases.append(publish(reg, signer, weights(i), parent=releases[-1]))
    return reg, releases


def _flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0x01
    path.chmod(0o644)
    path.write_bytes(bytes(data))


def test_untouched_chain_verifies_to_the_root(chain: tuple[Registry, list[Release]]) -> None:
    reg, releases = chain
    result = verify_release(reg, releases[-1])
    assert result.ok, result.error
    assert result.chain == ["1.0.3", "1.0.2", "1.0.1", "1.0.0"]


@pytest.mark.parametrize("kind", ["weights", "manifest", "card", "signature"])
def test_one_flipped_byte_fails_verify_and_names_the_file(
    chain: tuple[Registry, list[Release]], kind: str
) -> None:
    """Input: one byte flipped in the weights blob, manifest, model card or signature."""
    reg, releases = chain
    rel = releases[1]
    path = {
        "weights": rel.weights_path,
        "manifest": rel.manifest_path,
        "card": rel.card_path,
        "signature": rel.signature_path,
    }[kind]
    if kind == "signature":  # flip a byte inside the base64 signature itself
        doc = json.loads(path.read_bytes())
        sig = doc["signature"]
        doc["signature"] = ("B" if sig[0] != "B" else "C") + sig[1:]
        path.write_text(json.dumps(doc))
    else:
        _flip_byte(path)
    result = Verifier(reg).verify(releases[-1])
    assert not result.ok
    assert result.path == str(path)
    assert str(path) in result.error


def test_edited_manifest_with_fixed_index_hash_fails_on_the_signature(
    chain: tuple[Registry, list[Release]],
) -> None:
    """Input: a manifest whose metrics were edited and whose index hash was updated to match."""
    import hashlib

    reg, releases = chain
    rel = releases[2]
    doc = json.loads(rel.manifest_path.read_bytes())
    doc["metrics"]["test_accuracy"] = 0.99
    data = json.dumps(doc).encode()
    rel.manifest_path.write_bytes(data)
    db = sqlite3.connect(reg.index_path)
    db.execute(
        "UPDATE releases SET manifest_sha256=? WHERE version=?",
        (hashlib.sha256(data).hexdigest(), rel.version),
    )
    db.commit()
    db.close()
    result = Verifier(reg).verify(reg.get(rel.version))
    assert not result.ok
    assert result.path == str(rel.signature_path)
    assert "signature does not match" in result.error


def test_deleted_release_in_the_chain_is_detected(chain: tuple[Registry, list[Release]]) -> None:
    """Input: release 1.0.1 removed from index and disk."""
    reg, releases = chain
    victim = releases[1]
    db = sqlite3.connect(reg.index_path)
    db.execute("DELETE FROM releases WHERE version=?", (victim.version,))
    db.commit()
    db.close()
    shutil.rmtree(victim.release_dir)
    result = Verifier(reg).verify(reg.get("1.0.3"))
    assert not result.ok
    assert "parent 1.0.1 is missing" in result.error


def test_reordered_releases_are_detected(chain: tuple[Registry, list[Release]]) -> None:
    """Input: the index rows of 1.0.1 and 1.0.2 swapped (versions relabelled)."""
    reg, _ = chain
    db = sqlite3.connect(reg.index_path)
    db.execute("UPDATE releases SET version='tmp', patch=-1 WHERE version='1.0.1'")
    db.execute("UPDATE releases SET version='1.0.1', patch=1 WHERE version='1.0.2'")
    db.execute("UPDATE releases SET version='1.0.2', patch=2 WHERE version='tmp'")
    db.commit()
    db.close()
    result = Verifier(reg).verify(reg.get("1.0.3"))
    assert not result.ok
    # the relabelled row points at the files of the version it claims, whose hash differs
    assert "the index recorded" in result.error or "replaced or reordered" in result.error


def test_swapped_manifest_files_are_detected(chain: tuple[Registry, list[Release]]) -> None:
    """Input: manifest.json and manifest.sig of 1.0.1 replaced by those of 1.0.2."""
    reg, releases = chain
    for f in ("manifest.json", "manifest.sig"):
        shutil.copy(releases[2].release_dir / f, releases[1].release_dir / f)
    result = Verifier(reg).verify(reg.get("1.0.3"))
    assert not result.ok
    assert result.path == str(releases[1].manifest_path)


def test_pinned_foreign_public_key_fails_every_signature(
    chain: tuple[Registry, list[Release]],
) -> None:
    """Input: --public-key of a key that did not sign the registry."""
    reg, releases = chain
    other = Signer.generate().public_key
    result = Verifier(reg, other).verify(releases[0])
    assert not result.ok
    assert "signed by key" in result.error
    assert result.path == str(releases[0].signature_path)


def test_registry_public_key_replaced_is_detected_by_pinning(
    chain: tuple[Registry, list[Release]], tmp_path: Path
) -> None:
    """Input: an attacker re-signs 1.0.0 with their own key and swaps keys/ed25519.pub."""
    reg, releases = chain
    attacker = Signer.generate()
    original = reg.public_key_path.read_bytes()
    rel = releases[0]
    rel.signature_path.write_text(json.dumps(attacker.sign(rel.manifest_path.read_bytes())))
    reg.public_key_path.write_bytes(public_pem(attacker.public_key))
    from fedcommons.releases.signing import load_public_key

    pinned = load_public_key(original)
    assert not Verifier(reg, pinned).verify(rel).ok


def test_missing_public_key_is_a_clear_error(chain: tuple[Registry, list[Release]]) -> None:
    """Input: a registry whose keys/ed25519.pub was deleted."""
    reg, _ = chain
    reg.public_key_path.unlink()
    with pytest.raises(SigningKeyError, match="publishes no public key"):
        Verifier(reg)


def test_head_attests_every_release(chain: tuple[Registry, list[Release]]) -> None:
    reg, _ = chain
    head = Verifier(reg).verify_head()
    assert head.ok and head.attested == 4 and head.unattested == []


def test_deleting_the_newest_release_of_a_line_is_detected_by_the_head(
    chain: tuple[Registry, list[Release]],
) -> None:
    """Input: the newest release 1.0.3 removed from index and disk (no child names it)."""
    reg, releases = chain
    db = sqlite3.connect(reg.index_path)
    db.execute("DELETE FROM releases WHERE version='1.0.3'")
    db.commit()
    db.close()
    shutil.rmtree(releases[-1].release_dir)
    assert Verifier(reg).verify(reg.get("1.0.2")).ok  # the remaining chain is intact
    head = Verifier(reg).verify_head()
    assert not head.ok and "line 1.0.3 is attested" in head.error
    assert head.path == str(reg.head_path)


def test_tampered_head_fails_on_its_signature(chain: tuple[Registry, list[Release]]) -> None:
    """Input: HEAD.json with one attested release dropped from its list."""
    reg, _ = chain
    doc = json.loads(reg.head_path.read_bytes())
    doc["attestation"]["releases"].pop()
    reg.head_path.write_text(json.dumps(doc))
    head = Verifier(reg).verify_head()
    assert not head.ok and "signature does not match" in head.error


def test_publish_interrupted_before_the_head_rewrite_is_reported_not_failed(
    chain: tuple[Registry, list[Release]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Input: a publish whose head rewrite fails after the index commit."""
    reg, releases = chain
    signer = Signer.load(tmp_path / "key.pem")

    def fail(self, signer) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(Registry, "write_head", fail)
    with pytest.raises(OSError):
        publish(reg, signer, weights(9), parent=releases[-1])
    head = Verifier(reg).verify_head()
    assert head.ok and head.unattested == ["line 1.0.4"]
    monkeypatch.undo()
    publish(reg, signer, weights(10), parent=reg.get("1.0.4"))
    assert Verifier(reg).verify_head().unattested == []
