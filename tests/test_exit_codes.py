"""Every command that reports a failure exits non-zero: run as the installed executable.

The ``fedcommons`` console script is run as a subprocess (not typer's CliRunner and not
in-process), because the bug was in the entry point itself: in click's non-standalone
mode ``typer.Exit(1)`` is *returned* by ``app()``, and the entry point dropped it.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from fedcommons.releases.registry import Registry
from fedcommons.releases.signing import Signer
from tests.conftest import BIN
from tests.release_helpers import publish, weights

ROOT = Path(__file__).resolve().parents[1]


def _fedcommons(*args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    environ = dict(os.environ, PYTHONPATH=str(ROOT), **env)
    return subprocess.run(
        [str(BIN / "fedcommons"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=environ,
        stdin=subprocess.DEVNULL,
    )


def test_verify_exits_0_when_intact_and_1_when_a_model_card_was_edited(tmp_path: Path) -> None:
    """Input tried: one line appended to a published release's model card."""
    reg = Registry(tmp_path / "reg")
    rel = publish(reg, Signer.load_or_create(tmp_path / "key.pem"), weights(0))
    assert _fedcommons("release", "verify", "latest", "-r", str(reg.root)).returncode == 0
    rel.card_path.write_text(rel.card_path.read_text() + "tampered\n")
    out = _fedcommons("release", "verify", "latest", "-r", str(reg.root))
    assert out.returncode == 1, out.stdout + out.stderr
    assert "FAIL" in out.stdout and str(rel.card_path) in out.stdout


def test_an_unknown_strategy_exits_2_naming_it(tmp_path: Path) -> None:
    """Input tried: ``fedcommons demo --strategy no-such-rule``."""
    out = _fedcommons("demo", "--strategy", "no-such-rule", "-r", str(tmp_path / "reg"))
    assert out.returncode == 2, out.stdout + out.stderr
    assert "UnknownStrategyError" in out.stderr and "no-such-rule" in out.stderr
    assert not (tmp_path / "reg").exists()


@pytest.mark.slow
def test_a_failed_round_exits_2_and_publishes_nothing(
    tmp_path: Path, flower_env: dict[str, str]
) -> None:
    """Input tried: a one-round demo whose two sites' training data loaders both raise."""
    out = _fedcommons(
        "demo",
        "--task",
        "tests.broken_site:UnreadableDigitsTask",
        "--institutions",
        "2",
        "--rounds",
        "1",
        "--local-epochs",
        "1",
        "-r",
        str(tmp_path / "reg"),
        timeout=300,
    )
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert "RoundFailedError" in out.stderr
    assert not list((tmp_path / "reg").glob("releases/*/*/manifest.json"))
