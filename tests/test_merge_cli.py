"""``fedcommons strategies list`` and ``fedcommons merge`` (offline merges)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fedcommons.client_sdk.training import train_local
from fedcommons.releases.registry import Registry
from fedcommons.releases.signing import Signer
from fedcommons.strategies import refresh_plugins
from fedcommons.tasks import load_task
from tests import release_helpers
from tests.cli_helpers import run_cli
from tests.plugin_env import install_example_plugin


@pytest.fixture(autouse=True)
def _fresh_plugins() -> Iterator[None]:
    refresh_plugins()
    yield
    refresh_plugins()


@pytest.fixture(scope="module")
def fine_tuned(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """A shared base and three models fine-tuned on three label-skewed digits partitions."""
    root = tmp_path_factory.mktemp("models")
    task = load_task("digits", {"num-partitions": 3})
    base = task.build_model().state_dict()
    save_file(base, root / "base.safetensors")
    paths = []
    for pid in range(3):
        site = load_task("digits", {"num-partitions": 3, "partition-id": pid, "alpha": 0.3})
        res = train_local(site, base, epochs=2, lr=0.05, batch_size=16, seed=pid)
        paths.append(root / f"m{pid}.safetensors")
        save_file({k: base[k] + res.delta[k] for k in base}, paths[-1])
    return root / "base.safetensors", paths


def test_strategies_list_shows_builtins_and_plugins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    install_example_plugin(tmp_path, monkeypatch)
    code, out, _ = run_cli(["strategies", "list", "--format", "json"], capsys)
    assert code == 0
    rows = {r["name"]: r for r in json.loads(out)}
    assert rows["fisher"]["needs_fisher"] and "Matena" in rows["fisher"]["reference"]
    assert rows["mask-aligned"]["params"]["min_votes"] == {
        "type": "int",
        "default": 1,
        "required": False,
    }
    assert rows["geomed"]["origin"] == "plugin fedcommons-geomed 0.1.0"
    assert rows["median"]["streaming"] is False


def test_fisher_merge_of_checkpoints_writes_safetensors_with_provenance(
    fine_tuned: tuple[Path, list[Path]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base, models = fine_tuned
    out = tmp_path / "merged.safetensors"
    args = ["merge", "--strategy", "fisher", *map(str, models), "-o", str(out)]
    args += ["--base", str(base), "--fisher-data", "digits", "--eval-task", "digits"]
    code, stdout, stderr = run_cli([*args, "--format", "json"], capsys)
    assert code == 0, stderr
    result = json.loads(stdout)
    assert set(result["test_accuracy"]) == {*map(str, models), str(out)}
    assert all(0 <= a <= 1 for a in result["test_accuracy"].values())
    with safe_open(str(out), "pt") as fh:
        meta = fh.metadata()
        assert set(fh.keys()) == {"net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"}
    assert meta["fedcommons.strategy"] == "fisher"
    assert len(json.loads(meta["fedcommons.inputs"])) == 3


def test_merge_refuses_to_overwrite_output(
    fine_tuned: tuple[Path, list[Path]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Input: -o naming an existing file, without --force."""
    _, models = fine_tuned
    out = tmp_path / "keep.safetensors"
    out.write_bytes(b"precious")
    code, _, err = run_cli(["merge", *map(str, models), "-o", str(out)], capsys)
    assert code == 2 and "exists" in err
    assert out.read_bytes() == b"precious"


def test_merge_of_registry_releases_uses_their_common_parent(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reg = Registry(tmp_path / "reg")
    signer = Signer.generate()

    def publish(weights: dict[str, torch.Tensor], parent=None):  # type: ignore[no-untyped-def]
        return release_helpers.publish(reg, signer, weights, parent=parent, name="toy")

    root = publish({"w": torch.tensor([1.0, 1.0])})
    a = publish({"w": torch.tensor([3.0, 1.0])}, root)
    b = publish({"w": torch.tensor([1.0, -3.0])}, root)
    out = tmp_path / "m.safetensors"
    args = ["merge", "-s", "mask-aligned", "-p", "nonzero_mask=true", f"toy@{a.version}"]
    args += [f"toy@{b.version}", "-o", str(out), "-r", str(tmp_path / "reg"), "--format", "json"]
    code, stdout, stderr = run_cli(args, capsys)
    assert code == 0, stderr
    assert json.loads(stdout)["base"] == "toy@1.0.0"
    with safe_open(str(out), "pt") as fh:
        # deltas [2, 0] and [0, -4] are each alone in their coordinate: no dilution.
        assert fh.get_tensor("w").tolist() == [3.0, -3.0]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--strategy", "fedprox"], "unknown strategy 'fedprox'; available: fedadam, fedavg"),
        (["-p", "eps=1"], "has no parameter 'eps'; valid parameters: server_lr"),
        (["--strategy", "fisher"], "needs --fisher-data"),
        (["--weights", "1,x"], "not a list of numbers"),
    ],
)
def test_bad_merge_options_exit_2_naming_the_problem(
    fine_tuned: tuple[Path, list[Path]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    message: str,
) -> None:
    """Input: unknown strategy, unknown parameter, Fisher without data, bad weights."""
    _, models = fine_tuned
    out = tmp_path / "o.safetensors"
    code, _, err = run_cli(["merge", *map(str, models), "-o", str(out), *extra], capsys)
    assert code == 2
    assert message in " ".join(err.split())
    assert not out.exists()


def test_incompatible_or_missing_inputs_are_named(
    fine_tuned: tuple[Path, list[Path]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Input: a checkpoint with other shapes; a path that does not exist."""
    _, models = fine_tuned
    odd = tmp_path / "odd.safetensors"
    save_file({"w": torch.zeros(2)}, odd)
    out = tmp_path / "o.safetensors"
    code, _, err = run_cli(["merge", str(models[0]), str(odd), "-o", str(out)], capsys)
    assert code == 2 and "does not fit" in err
    code, _, err = run_cli(["merge", str(tmp_path / "nope.safetensors"), "-o", str(out)], capsys)
    assert code == 2 and "nope.safetensors" in err
    assert not out.exists()
