import hashlib
import multiprocessing as mp
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedcommons.coordinator.registry import Registry, check_writable
from fedcommons.errors import RegistryError, RegistryNotWritableError, ReleaseNotFoundError
from fedcommons.wire import ReleaseManifest

WEIGHTS = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}


def _manifest(version: str, digest: str, size: int, parent: str | None = None) -> ReleaseManifest:
    return ReleaseManifest(
        name="line",
        version=version,
        parent_version=parent,
        parent_manifest_sha256=None,
        created="2026-01-01T00:00:00+00:00",
        task="digits",
        strategy="fedavg",
        strategy_params={},
        rounds=1,
        clients_per_round=0,
        contributors=2,
        weights_sha256=digest,
        weights_bytes=size,
        num_parameters=6,
        metrics={"test_accuracy": 0.5},
        round_metrics=[],
        config={},
        code_version="test",
    )


def test_publish_stores_content_addressed_safetensors_and_a_manifest(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "reg")
    rel = reg.publish("line", WEIGHTS, _manifest)
    assert rel.version == "1.0.0"
    data = rel.weights_path.read_bytes()
    assert hashlib.sha256(data).hexdigest() == rel.weights_sha256
    assert torch.equal(load_file(rel.weights_path)["w"], WEIGHTS["w"])
    assert rel.manifest().weights_sha256 == rel.weights_sha256
    assert hashlib.sha256(rel.manifest_path.read_bytes()).hexdigest() == rel.manifest_sha256


def test_versions_follow_parent_patch_and_fresh_major(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    first = reg.publish("line", WEIGHTS, _manifest)
    child = reg.publish("line", WEIGHTS, lambda v, d, s: _manifest(v, d, s, "1.0.0"), parent=first)
    fresh = reg.publish("line", WEIGHTS, _manifest)
    assert [first.version, child.version, fresh.version] == ["1.0.0", "1.0.1", "2.0.0"]
    assert [r.version for r in reg.releases("line")] == ["1.0.0", "1.0.1", "2.0.0"]
    assert reg.get("latest", name="line").version == "2.0.0"


def test_failing_manifest_builder_leaves_no_release(tmp_path: Path) -> None:
    """Input tried: a manifest builder that raises mid-publish."""
    reg = Registry(tmp_path)

    def broken(version: str, digest: str, size: int) -> ReleaseManifest:
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        reg.publish("line", WEIGHTS, broken)
    assert reg.releases() == []
    assert reg.publish("line", WEIGHTS, _manifest).version == "1.0.0"


def _publish_many(root: str, count: int) -> None:
    reg = Registry(root)
    for _ in range(count):
        reg.publish("line", WEIGHTS, _manifest)


def test_concurrent_publishers_get_distinct_versions(tmp_path: Path) -> None:
    Registry(tmp_path)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_publish_many, args=(str(tmp_path), 5)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    versions = [r.version for r in Registry(tmp_path).releases()]
    assert versions == [f"{i}.0.0" for i in range(1, 11)]


def test_tampered_weights_fail_to_load(tmp_path: Path) -> None:
    """Input tried: one byte of the weights blob flipped after publishing."""
    reg = Registry(tmp_path)
    rel = reg.publish("line", WEIGHTS, _manifest)
    data = bytearray(rel.weights_path.read_bytes())
    data[-1] ^= 0xFF
    rel.weights_path.write_bytes(bytes(data))
    with pytest.raises(RegistryError, match="does not match its hash"):
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
