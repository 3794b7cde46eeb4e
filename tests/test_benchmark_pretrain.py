"""The compression benchmark's pre-trained base is a signed release FISH rows start from."""

from pathlib import Path

from benchmarks.compression import pretrain

from fedcommons.releases.registry import Registry
from fedcommons.releases.verification import verify_release


def test_pretrained_base_is_published_signed_and_verifiable(tmp_path: Path) -> None:
    version = pretrain(tmp_path / "reg", "64", seed=0)
    registry = Registry(tmp_path / "reg", create=False)
    release = registry.get(version, name="digits")
    manifest = release.manifest()
    assert manifest.strategy == "central-pretraining"
    assert manifest.parent_version is None and manifest.num_parameters == 4810
    result = verify_release(registry, release)
    assert result.ok, result.error
    assert result.chain == [version]
