"""The registry's index: schema migration, atomic publishes, concurrent publishers, aliases."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import pytest

from fedcommons.errors import (
    InvalidNameError,
    RegistryError,
    ReleaseNotFoundError,
    SigningKeyError,
)
from fedcommons.releases.registry import (
    _SCHEMA_V1,
    INDEX_SCHEMA_VERSION,
    Registry,
    SqliteIndexStore,
)
from fedcommons.releases.signing import Signer
from fedcommons.releases.verification import Verifier
from tests.release_helpers import publish, run_python, weights


@pytest.fixture
def signer(tmp_path: Path) -> Signer:
    return Signer.load_or_create(tmp_path / "key" / "ed25519.pem")


def _v1_index(root: Path, weights_sha256: str, manifest_sha256: str, metrics_json: str) -> None:
    """A registry index exactly as the foundation (schema 1) wrote it: one row, digits 1.0.0."""
    db = sqlite3.connect(root / "index.sqlite")
    db.executescript(_SCHEMA_V1)
    db.execute(
        "INSERT INTO releases VALUES (?,?,?,?,?,?,?,?,?,?,?)",
        (
            "digits",
            "1.0.0",
            1,
            0,
            0,
            None,
            "2026-01-01T00:00:00+00:00",
            weights_sha256,
            manifest_sha256,
            "releases/digits/1.0.0/manifest.json",
            metrics_json,
        ),
    )
    db.execute("PRAGMA user_version = 1")
    db.commit()
    db.close()


def _v1_registry(root: Path) -> None:
    """A schema-1 registry whose one row points at no files."""
    root.mkdir(parents=True)
    _v1_index(root, "ab" * 32, "cd" * 32, '{"test_accuracy": 0.9}')


def test_schema_1_registry_is_migrated_forward_keeping_its_releases(tmp_path: Path) -> None:
    root = tmp_path / "reg"
    _v1_registry(root)
    reg = Registry(root, create=False)
    assert SqliteIndexStore(root / "index.sqlite").schema_version() == INDEX_SCHEMA_VERSION == 3
    (rel,) = reg.releases()
    assert (rel.name, rel.version, rel.metrics) == ("digits", "1.0.0", {"test_accuracy": 0.9})
    assert rel.bump == "" and rel.aliases == ()
    assert reg.rejections() == []


def test_migrated_registry_accepts_new_publishes(tmp_path: Path, signer: Signer) -> None:
    root = tmp_path / "reg"
    _v1_registry(root)
    reg = Registry(root)
    rel = publish(reg, signer, weights(1), name="digits")
    assert rel.version == "2.0.0"
    assert [r.version for r in reg.releases("digits")] == ["1.0.0", "2.0.0"]


def test_schema_1_releases_can_be_signed_after_migration(tmp_path: Path, signer: Signer) -> None:
    """A release written the foundation's way (no signature, no card) verifies once adopted."""
    from safetensors.torch import save as st_save

    from fedcommons.releases.verification import Verifier
    from fedcommons.wire.manifest import ReleaseManifest

    root = tmp_path / "reg"
    root.mkdir()
    data = st_save(weights(0))
    digest = hashlib.sha256(data).hexdigest()
    blob = root / "blobs" / "sha256" / digest[:2] / f"{digest}.safetensors"
    blob.parent.mkdir(parents=True)
    blob.write_bytes(data)
    manifest = ReleaseManifest(
        "digits",
        "1.0.0",
        None,
        None,
        "2026-01-01T00:00:00+00:00",
        "digits",
        "fedavg",
        {},
        1,
        0,
        1,
        digest,
        len(data),
        4810,
        {},
        [],
        {},
        "0.1.0",
    ).to_json()
    path = root / "releases" / "digits" / "1.0.0" / "manifest.json"
    path.parent.mkdir(parents=True)
    path.write_bytes(manifest)
    _v1_index(root, digest, hashlib.sha256(manifest).hexdigest(), "{}")
    reg = Registry(root)
    reg.publish_key(signer)
    assert "missing" in Verifier(reg).verify(reg.get("1.0.0")).error
    assert [r.version for r in reg.sign_legacy(signer)] == ["1.0.0"]
    assert Verifier(reg).verify(reg.get("1.0.0")).ok
    assert Verifier(reg).verify_head().attested == 1


def test_index_newer_than_the_code_is_refused(tmp_path: Path) -> None:
    """Input: an index whose user_version is 99."""
    root = tmp_path / "reg"
    root.mkdir()
    db = sqlite3.connect(root / "index.sqlite")
    db.execute("PRAGMA user_version = 99")
    db.close()
    with pytest.raises(RegistryError, match="newer than this fedcommons"):
        Registry(root)


def test_crash_before_commit_leaves_old_state_and_next_publish_succeeds(
    tmp_path: Path, signer: Signer
) -> None:
    """A real process dies (os._exit) after writing every file but before the commit."""
    root = tmp_path / "reg"
    reg = Registry(root)
    base = publish(reg, signer, weights(0))
    code = f"""
import os
from pathlib import Path
from fedcommons.releases.registry import Registry
from fedcommons.releases.signing import Signer
from tests.release_helpers import publish, weights
import fedcommons.releases.registry as registry
real = registry._SqliteWriter.insert_release
def insert_then_die(self, row):
    real(self, row)  # the row is written inside the open transaction...
    os._exit(17)     # ...and the process dies before COMMIT
registry._SqliteWriter.insert_release = insert_then_die
reg = Registry({str(root)!r})
signer = Signer.load({str(signer.path)!r})
publish(reg, signer, weights(1), parent=reg.get("1.0.0"))
"""
    proc = run_python(code)
    assert proc.returncode == 17, proc.stderr
    assert [r.version for r in reg.releases()] == ["1.0.0"]
    assert Verifier(reg).verify(reg.get("latest")).ok
    nxt = publish(reg, signer, weights(2), parent=base)
    assert nxt.version == "1.0.1"
    assert Verifier(reg).verify(nxt).ok
    assert reg.load_weights(nxt)["net.0.bias"].equal(weights(2)["net.0.bias"])


def test_crash_while_writing_release_files_leaves_old_state(tmp_path: Path, signer: Signer) -> None:
    """A real process dies while writing the signature (second file of the release)."""
    root = tmp_path / "reg"
    reg = Registry(root)
    publish(reg, signer, weights(0))
    code = f"""
import os
import fedcommons.releases.registry as registry
from fedcommons.releases.signing import Signer
from tests.release_helpers import publish, weights
calls = []
real = registry._fsync_write
def dying(path, data):
    calls.append(path)
    if path.name == "manifest.sig":
        os._exit(18)
    real(path, data)
registry._fsync_write = dying
reg = registry.Registry({str(root)!r})
publish(reg, Signer.load({str(signer.path)!r}), weights(1), parent=reg.get("1.0.0"))
"""
    proc = run_python(code)
    assert proc.returncode == 18, proc.stderr
    assert [r.version for r in reg.releases()] == ["1.0.0"]
    assert not (root / "releases" / "line" / "1.0.1").exists()
    assert publish(reg, signer, weights(2), parent=reg.get("1.0.0")).version == "1.0.1"


def test_failed_publish_in_process_rolls_back(
    tmp_path: Path, signer: Signer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Input: an index insert that fails after the release files were written."""
    import fedcommons.releases.registry as registry

    reg = Registry(tmp_path / "reg")
    publish(reg, signer, weights(0))

    def boom(self, row) -> None:
        raise RuntimeError("disk gone")

    monkeypatch.setattr(registry._SqliteWriter, "insert_release", boom)
    with pytest.raises(RuntimeError):
        publish(reg, signer, weights(1), parent=reg.get("1.0.0"))
    assert [r.version for r in reg.releases()] == ["1.0.0"]
    assert not (tmp_path / "reg" / "releases" / "line" / "1.0.1").exists()


def test_two_processes_publishing_at_once_do_not_corrupt_the_registry(
    tmp_path: Path, signer: Signer
) -> None:
    root = tmp_path / "reg"
    reg = Registry(root)
    publish(reg, signer, weights(0))
    script = tmp_path / "publisher.py"
    script.write_text(
        f"""
import sys
from fedcommons.releases.registry import Registry
from fedcommons.releases.signing import Signer
from tests.release_helpers import publish, weights
reg = Registry({str(root)!r})
signer = Signer.load({str(signer.path)!r})
offset = int(sys.argv[1])
for i in range(6):
    publish(reg, signer, weights(offset + i), parent=reg.get("1.0.0"))
"""
    )
    import os
    import subprocess
    import sys

    from tests.release_helpers import SRC

    env = dict(os.environ, PYTHONPATH=f"{SRC}{os.pathsep}{SRC.parent}")
    procs = [
        subprocess.Popen([sys.executable, str(script), str(off)], env=env, stderr=subprocess.PIPE)
        for off in (100, 200)
    ]
    for p in procs:
        _, err = p.communicate(timeout=180)
        assert p.returncode == 0, err.decode()
    releases = reg.releases()
    assert sorted(r.version for r in releases) == sorted(
        ["1.0.0"] + [f"1.0.{i}" for i in range(1, 13)]
    )
    assert len({r.weights_sha256 for r in releases}) == 13
    verifier = Verifier(reg)
    assert all(verifier.verify(r).ok for r in releases)
    head = verifier.verify_head()
    assert head.ok and head.attested == 13 and head.unattested == []
    assert not list((root / "releases" / "line").glob(".staging-*"))


def test_promote_sets_an_alias_that_resolves(tmp_path: Path, signer: Signer) -> None:
    reg = Registry(tmp_path / "reg")
    first = publish(reg, signer, weights(0))
    publish(reg, signer, weights(1), parent=first)
    reg.promote("1.0.0", "stable", signer=signer)
    reg.promote("1.0.1", "@candidate", signer=signer)
    assert reg.get("@stable").version == "1.0.0"
    assert reg.get("candidate").version == "1.0.1"
    reg.promote("1.0.1", "stable", signer=signer)
    assert reg.get("@stable").version == "1.0.1"
    assert reg.get("1.0.1").aliases == ("candidate", "stable")


def test_unknown_version_or_alias_lists_what_exists(tmp_path: Path, signer: Signer) -> None:
    """Input: version 9.9.9 and alias @nope against a registry with 1.0.0 and @stable."""
    reg = Registry(tmp_path / "reg")
    publish(reg, signer, weights(0))
    reg.promote("1.0.0", "stable", signer=signer)
    with pytest.raises(
        ReleaseNotFoundError, match=r"existing: line 'line': 1\.0\.0 \(aliases .*@stable=1\.0\.0\)"
    ):
        reg.get("9.9.9")
    with pytest.raises(ReleaseNotFoundError, match=r"no release or alias '@nope'.*1\.0\.0"):
        reg.get("@nope")


def test_publish_moves_candidate_alias_and_tags_are_kept(tmp_path: Path, signer: Signer) -> None:
    reg = Registry(tmp_path / "reg")
    first = publish(reg, signer, weights(0))
    assert reg.get("@candidate").version == "1.0.0"
    publish(reg, signer, weights(1), parent=first)
    assert reg.get("@candidate").version == "1.0.1"
    reg.set_tag("1.0.0", "reviewed-by", "dp-auditor")
    assert reg.tags(reg.get("1.0.0")) == {"reviewed-by": "dp-auditor"}
    reg.set_tag("1.0.0", "reviewed-by", None)
    assert reg.tags(reg.get("1.0.0")) == {}


def test_invalid_alias_name_is_refused(tmp_path: Path, signer: Signer) -> None:
    """Input: aliases '1.0.0', 'latest' and 'has space'."""
    reg = Registry(tmp_path / "reg")
    publish(reg, signer, weights(0))
    for bad in ("1.0.0", "latest", "has space"):
        with pytest.raises(InvalidNameError, match="alias"):
            reg.promote("1.0.0", bad, signer=signer)


def test_publishing_with_another_key_is_refused(tmp_path: Path, signer: Signer) -> None:
    """Input: a second, different Ed25519 key publishing into a signed registry."""
    reg = Registry(tmp_path / "reg")
    publish(reg, signer, weights(0))
    with pytest.raises(SigningKeyError, match="not the key this registry publishes"):
        publish(reg, Signer.generate(), weights(1))
    assert [r.version for r in reg.releases()] == ["1.0.0"]


def test_bumps_allocate_semantic_versions(tmp_path: Path, signer: Signer) -> None:
    reg = Registry(tmp_path / "reg")
    a = publish(reg, signer, weights(0))
    b = publish(reg, signer, weights(1), parent=a, bump="patch")
    c = publish(reg, signer, weights(2), parent=b, bump="minor")
    d = publish(reg, signer, weights(3), parent=c, bump="patch")
    e = publish(reg, signer, weights(4), parent=d, bump="major")
    assert [x.version for x in (a, b, c, d, e)] == ["1.0.0", "1.0.1", "1.1.0", "1.1.1", "2.0.0"]
    assert e.bump == "major" and e.parent_version == "1.1.1"
