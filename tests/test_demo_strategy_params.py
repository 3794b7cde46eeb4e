"""`fedcommons demo -p key=value`: strategy parameters, checked before Flower starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent


def test_demo_refuses_an_ill_typed_strategy_parameter_before_round_1(tmp_path: Path) -> None:
    """Input tried: -p server_lr=fast (a string for a float parameter)."""
    done = subprocess.run(
        [str(BIN / "fedcommons"), "demo", "-r", str(tmp_path / "reg"), "--institutions", "2",
         "--rounds", "1", "--strategy", "fedavg", "-p", "server_lr=fast"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    assert "parameter 'server_lr' expects float" in done.stderr
    assert not (tmp_path / "reg" / "releases").exists()


def test_demo_refuses_an_unknown_strategy_parameter_naming_the_valid_ones(tmp_path: Path) -> None:
    done = subprocess.run(
        [str(BIN / "fedcommons"), "demo", "-r", str(tmp_path / "reg"), "--strategy",
         "mask-aligned", "-p", "sign_elect=true"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2
    assert "no parameter 'sign_elect'" in done.stderr and "sign_election: bool" in done.stderr
