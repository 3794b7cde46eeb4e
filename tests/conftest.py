"""Shared fixtures: an isolated Flower/Ray environment and small helpers."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


@pytest.fixture(autouse=True)
def private_client_state(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Client state (error feedback, FISH masks, DP accountants) stays in the test's tmp.

    So does the user's configuration directory (the default signing key, the trust file),
    in a directory of its own: tests that use ``tmp_path`` itself as a registry must not
    find the signing key inside it (publishing refuses that).
    """
    monkeypatch.setenv("FEDCOMMONS_STATE_DIR", str(tmp_path / "client-state"))
    monkeypatch.setenv("FEDCOMMONS_CONFIG_DIR", str(tmp_path_factory.mktemp("user-config")))


@pytest.fixture
def flower_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """Environment for Flower processes: no telemetry, private FLWR_HOME and RAY_TMPDIR.

    RAY_TMPDIR is a short directory of its own: Ray puts Unix sockets below it, and
    socket paths longer than 107 bytes fail.
    """
    ray_tmp = tempfile.mkdtemp(prefix="fc-ray-")
    values = {
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_HOME": str(tmp_path / "flwr_home"),
        "RAY_TMPDIR": ray_tmp,
        "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    yield dict(os.environ)
    shutil.rmtree(ray_tmp, ignore_errors=True)
