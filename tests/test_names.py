"""Names that become paths are checked by one function before anything touches the disk."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedcommons.coordinator.config import RunConfig
from fedcommons.engines.certs import create_node_keys
from fedcommons.errors import CertificateError, InvalidNameError
from fedcommons.names import NameKind, check_name
from fedcommons.privacy.ledger import ledger_path
from fedcommons.releases.registry import Registry
from fedcommons.releases.signing import Signer
from tests.release_helpers import publish, weights

UNSAFE = ["../../x", "a/b", "..", ".hidden", "", "a..b", "x" * 101, "a b", "line\n", "é"]


@pytest.mark.parametrize("bad", UNSAFE)
def test_unsafe_line_names_are_refused(bad: str) -> None:
    """Input tried: each of traversal, separators, hidden, empty, too long, space, non-ASCII."""
    with pytest.raises(InvalidNameError, match="release line"):
        check_name(bad, NameKind.line)


def test_safe_names_pass_unchanged() -> None:
    """Input tried: typical names of each kind."""
    assert check_name("digits", NameKind.line) == "digits"
    assert check_name("pkg.module.Class", NameKind.task) == "pkg.module.Class"
    assert check_name("1.10.0", NameKind.version) == "1.10.0"
    assert check_name("stable", NameKind.alias) == "stable"


@pytest.mark.parametrize("bad", ["1.0", "01.0.0", "1.0.0-rc1", "../1.0.0"])
def test_versions_must_be_major_minor_patch(bad: str) -> None:
    """Input tried: short, zero-padded, pre-release and traversal versions."""
    with pytest.raises(InvalidNameError, match="version"):
        check_name(bad, NameKind.version)


def test_release_name_with_traversal_is_refused_by_the_run_config(tmp_path: Path) -> None:
    """Input tried: release-name = ../../x (it wrote a manifest outside the registry)."""
    with pytest.raises(InvalidNameError, match=r"'\.\./\.\./x'"):
        RunConfig.from_flat({"release-name": "../../x", "registry": str(tmp_path / "reg")})
    assert list(tmp_path.iterdir()) == []


def test_run_name_with_a_separator_is_refused(tmp_path: Path) -> None:
    """Input tried: run-name = runs/../../etc."""
    with pytest.raises(InvalidNameError, match="run name"):
        RunConfig(run_name="runs/../../etc", registry=str(tmp_path / "reg"))


def test_a_task_reference_names_a_safe_line() -> None:
    """Input tried: task = tests.slow_site:SlowDigitsTask with no release-name."""
    assert RunConfig(task="tests.slow_site:SlowDigitsTask").line == "tests.slow_site.SlowDigitsTask"


def test_publish_refuses_a_line_name_with_traversal_and_writes_nothing(tmp_path: Path) -> None:
    """Input tried: Registry.publish into line '../../x'."""
    reg = Registry(tmp_path / "reg")
    with pytest.raises(InvalidNameError):
        publish(reg, Signer.generate(), weights(0), name="../../x")
    assert not (tmp_path / "x").exists() and not (tmp_path / "reg" / "releases").exists()


def test_the_ledger_path_of_an_unsafe_line_is_refused(tmp_path: Path) -> None:
    """Input tried: ledger_path(registry, '../x')."""
    with pytest.raises(InvalidNameError):
        ledger_path(tmp_path, "../x")


def test_a_node_key_name_with_a_separator_is_refused(tmp_path: Path) -> None:
    """Input tried: `certs node ../evil`."""
    with pytest.raises(CertificateError, match="node name"):
        create_node_keys(tmp_path / "keys", "../evil")
    assert not (tmp_path / "evil.key").exists()
