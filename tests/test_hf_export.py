"""`release export --format hf`: a folder Hugging Face tools load, offline."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file

from fedcommons.errors import ConfigError
from fedcommons.releases.export import ExportFormat, export_folder
from fedcommons.releases.integrations.hf_hub import FedcommonsModel
from fedcommons.releases.registry import Registry
from fedcommons.releases.signing import Signer
from fedcommons.tasks.digits import digits_split
from tests.release_helpers import digits_weights, publish_digits

BIN = Path(sys.executable).parent


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    reg = Registry(tmp_path / "reg")
    signer = Signer.generate()
    first = publish_digits(reg, signer, digits_weights(20))
    publish_digits(reg, signer, digits_weights(60), parent=first)
    return reg


def _accuracy(model: torch.nn.Module) -> float:
    split = digits_split()
    with torch.no_grad():
        logits = model(torch.from_numpy(split.x_val))
    return int((logits.argmax(1) == torch.from_numpy(split.y_val)).sum()) / len(split.y_val)


def test_hf_export_loads_with_the_hub_mixin_and_scores_what_the_card_says(
    registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "digits-hf"
    done = subprocess.run(
        [str(BIN / "fedcommons"), "release", "export", "1.0.1", "--format", "hf",
         "-o", str(out), "-r", str(registry.root)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    release = registry.get("1.0.1")
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
    ]
    weights = (out / "model.safetensors").read_bytes()
    assert hashlib.sha256(weights).hexdigest() == release.manifest().weights_sha256
    model = FedcommonsModel.from_pretrained(str(out))
    assert model.release["version"] == "1.0.1"
    assert model.release["manifest_sha256"] == release.manifest_sha256
    card = ModelCard.load(out / "README.md")
    data = card.data
    assert data.license == "apache-2.0"
    assert "fedcommons" in data.tags and data.datasets == ["digits"]
    results = {r.metric_type: r.metric_value for r in data.eval_results}
    assert results["accuracy"] == pytest.approx(_accuracy(model), abs=1e-9)
    assert data.eval_results[0].dataset_split == "validation"
    loaded = load_file(out / "model.safetensors")
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded[key])


def test_the_hub_mixin_refuses_weights_that_do_not_fit_the_task(
    registry: Registry, tmp_path: Path
) -> None:
    """Input tried: the config of an export edited to another hidden width."""
    out = export_folder(registry, registry.get("1.0.0"), ExportFormat.hf, tmp_path / "x")
    config = out / "config.json"
    config.write_text(config.read_text().replace('"64"', '"32"'))
    with pytest.raises(RuntimeError, match="size mismatch"):
        FedcommonsModel.from_pretrained(str(out))


def test_export_never_writes_into_a_folder_that_holds_files(
    registry: Registry, tmp_path: Path
) -> None:
    """Input tried: -o pointing at a folder with a file in it."""
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        export_folder(registry, registry.get("1.0.0"), ExportFormat.hf, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_a_task_hook_writes_its_own_hf_folder(
    registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedcommons.tasks.digits import DigitsTask

    seen = {}

    def export_hf(self, weights, folder, *, release, card):
        seen.update(keys=sorted(weights), release=release, card=card)
        (folder / "custom.bin").write_bytes(b"x")

    monkeypatch.setattr(DigitsTask, "export_hf", export_hf, raising=False)
    out = export_folder(registry, registry.get("1.0.0"), ExportFormat.hf, tmp_path / "t")
    assert [p.name for p in out.iterdir()] == ["custom.bin"]
    assert seen["release"]["version"] == "1.0.0" and seen["card"].startswith("---")
    assert "net.0.weight" in seen["keys"]
