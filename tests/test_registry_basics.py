"""Registry behaviours the release tests do not pin: storage layout and path checks."""

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedcommons.errors import RegistryError, RegistryNotWritableError, ReleaseNotFoundError
from fedcommons.releases.registry import Registry, check_writable
from fedcommons.releases.signing import Signer
from tests.release_helpers import publish, weights


@pytest.fixture
def signer() -> Signer:
    return Signer.generate()


def test_weights_are_stored_content_addressed_as_safetensors(
    tmp_path: Path, signer: Signer
) -> None:
    reg = Registry(tmp_path / "reg")
    w = weights(0)
    rel = publish(reg, signer, w)
    data = rel.weights_path.read_bytes()
    assert hashlib.sha256(data).hexdigest() == rel.weights_sha256
    assert rel.weights_path.name == f"{rel.weights_sha256}.safetensors"
    loaded = load_file(rel.weights_path)
    assert all(torch.equal(loaded[k], w[k]) for k in w)
    assert rel.manifest().weights_sha256 == rel.weights_sha256


def test_tampered_weights_fail_to_load(tmp_path: Path, signer: Signer) -> None:
    """Input tried: one byte of the weights blob flipped after publishing."""
    reg = Registry(tmp_path)
    rel = publish(reg, signer, weights(0))
    data = bytearray(rel.weights_path.read_bytes())
    data[-1] ^= 0xFF
    rel.weights_path.chmod(0o644)
    rel.weights_path.write_bytes(bytes(data))
    with pytest.raises(RegistryError, match=r"the signed manifest of line 1\.0\.0 says"):
        reg.load_weights(rel)


def test_unknown_version_is_not_found(tmp_path: Path) -> None:
    """Input tried: version 9.9.9 in an empty registry."""
    with pytest.raises(ReleaseNotFoundError, match=r"9\.9\.9"):
        Registry(tmp_path).get("9.9.9")


def test_path_under_a_file_is_not_writable(tmp_path: Path) -> None:
    """Input tried: a registry path below a regular file."""
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(RegistryNotWritableError, match="not a directory"):
        check_writable(blocker / "registry")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


def test_reading_a_missing_registry_does_not_create_one(tmp_path: Path) -> None:
    """Input tried: `release list` on a directory that holds no registry."""
    with pytest.raises(RegistryError, match="no registry"):
        Registry(tmp_path / "nothing", create=False)
    assert not (tmp_path / "nothing").exists()
