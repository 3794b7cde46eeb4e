"""The `fedcommons` command: help, read commands and bad input."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from fedcommons.cli import main
from fedcommons.client_sdk.client_app import app as client
from fedcommons.coordinator.config import RunConfig
from fedcommons.engines.inprocess import run_in_process


def run_cli(monkeypatch: pytest.MonkeyPatch, *args: str) -> int:
    monkeypatch.setattr(sys, "argv", ["fedcommons", *args])
    try:
        main()
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def test_help_lists_demo_release_coordinator_and_client(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli(monkeypatch, "--help") == 0
    out = capsys.readouterr().out
    for command in ("demo", "release", "coordinator", "client"):
        assert command in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--task", "cifar"], "unknown task 'cifar'"),
        (["--strategy", "fedsgd"], "unknown strategy 'fedsgd'"),
        (["--alpha", "0"], "alpha must be > 0"),
        (["--alpha", "-0.5"], "alpha must be > 0"),
        (["--institutions", "5000"], "5000 institutions but only 1078"),
        (["--institutions", "0"], "institutions must be >= 1"),
        (["--rounds", "0"], "rounds must be >= 1"),
        (["--rounds", "-3"], "rounds must be >= 1"),
    ],
)
def test_demo_bad_input_fails_before_any_round_and_writes_nothing(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    message: str,
) -> None:
    """Inputs tried: unknown task, unknown strategy, alpha 0 and -0.5, 5000 and 0
    institutions, rounds 0 and -3."""
    registry = tmp_path / "reg"
    code = run_cli(monkeypatch, "demo", "--registry", str(registry), *args)
    assert code == 2
    assert message in capsys.readouterr().err
    assert not registry.exists()


def test_demo_with_unwritable_registry_fails_cleanly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Input tried: --registry below a regular file."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    code = run_cli(monkeypatch, "demo", "--registry", str(blocker / "reg"))
    assert code == 2
    assert "RegistryNotWritableError" in capsys.readouterr().err


def test_release_list_and_show_read_the_registry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    registry = tmp_path / "reg"
    result = run_in_process(RunConfig(rounds=1, local_epochs=1, registry=str(registry)), [client])
    capsys.readouterr()
    assert run_cli(monkeypatch, "release", "list", "-r", str(registry), "--format", "json") == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["name"], r["version"]) for r in rows] == [("digits", "1.0.0")]
    assert rows[0]["weights_sha256"] == result.release.weights_sha256
    assert (
        run_cli(monkeypatch, "release", "show", "1.0.0", "-r", str(registry), "--format", "json")
        == 0
    )
    shown = json.loads(capsys.readouterr().out)
    assert shown["version"] == "1.0.0" and shown["rounds"] == 1
    assert shown["paths"]["weights"].endswith(f"{result.release.weights_sha256}.safetensors")
    assert run_cli(monkeypatch, "release", "show", "latest", "-r", str(registry)) == 0
    assert "1.0.0" in capsys.readouterr().out


def test_release_show_of_unknown_version_exits_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Input tried: `release show 3.1.4` on a registry with one release."""
    registry = tmp_path / "reg"
    run_in_process(RunConfig(rounds=1, local_epochs=1, registry=str(registry)), [client])
    assert run_cli(monkeypatch, "release", "show", "3.1.4", "-r", str(registry)) == 2
    assert "no release '3.1.4'" in capsys.readouterr().err


def test_submit_rejects_unknown_run_config_key_before_contacting_flower(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Input tried: `coordinator submit -c num-rounds=3` (the key is `rounds`)."""
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr"))
    code = run_cli(
        monkeypatch,
        "coordinator",
        "submit",
        "--insecure",
        "--superlink",
        "127.0.0.1:1",
        "-c",
        "num-rounds=3",
    )
    assert code == 2
    assert "unknown run-config key 'num-rounds'" in capsys.readouterr().err


def test_client_join_rejects_an_unknown_task(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Input tried: `client join --task nope.module:Task`."""
    code = run_cli(
        monkeypatch,
        "client",
        "join",
        "--superlink",
        "127.0.0.1:1",
        "--insecure",
        "--task",
        "nope.module:Task",
    )
    assert code == 2
    assert "cannot import module 'nope.module'" in capsys.readouterr().err
