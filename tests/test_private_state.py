"""The coordinator's private state stays out of the registry it serves."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from fedcommons.errors import ConfigError
from fedcommons.privacy.disclosure import PrivateRoundLog, private_dir


def test_private_dir_configured_inside_the_registry_is_refused(tmp_path: Path) -> None:
    """Tried: private-dir = <registry>/private (the registry is published as a whole)."""
    with pytest.raises(ConfigError, match="inside the registry"):
        private_dir(tmp_path / "reg", str(tmp_path / "reg" / "private"))


def test_default_private_dir_lies_outside_the_registry_even_when_the_state_root_is_in_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEDCOMMONS_STATE_DIR", str(tmp_path / "reg" / "state"))
    monkeypatch.delenv("FEDCOMMONS_COORDINATOR_DIR", raising=False)
    chosen = private_dir(tmp_path / "reg")
    assert chosen == (tmp_path / "reg.coordinator-private").resolve()


def test_private_round_log_is_readable_by_its_owner_only(tmp_path: Path) -> None:
    log = PrivateRoundLog(tmp_path / "private")
    log.append({"round": 1, "contributors": [2**63 + 7]})
    assert list(log.records()) == [{"round": 1, "contributors": [2**63 + 7]}]
    assert stat.S_IMODE(log.path.stat().st_mode) == 0o600
