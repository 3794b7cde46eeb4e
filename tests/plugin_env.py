"""Make plugins discoverable without pip: a ``*.dist-info`` with entry points on sys.path."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from fedcommons.strategies import refresh_plugins

EXAMPLE_PLUGIN_SRC = Path(__file__).resolve().parents[1] / "examples" / "strategy-plugin" / "src"


def install_fake_distribution(
    root: Path,
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    entry_points: dict[str, str],
    *,
    version: str = "1.0.0",
    modules: dict[str, str] | None = None,
) -> None:
    """Write ``<name>-<version>.dist-info`` (and modules) under ``root``; add it to sys.path."""
    dist = root / f"{name.replace('-', '_')}-{version}.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    lines = ["[fedcommons.strategies]"] + [f"{k} = {v}" for k, v in entry_points.items()]
    (dist / "entry_points.txt").write_text("\n".join(lines) + "\n")
    for mod, source in (modules or {}).items():
        (root / f"{mod}.py").write_text(source)
    monkeypatch.syspath_prepend(str(root))
    for mod in modules or {}:
        sys.modules.pop(mod, None)
    refresh_plugins()


def install_example_plugin(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make examples/strategy-plugin discoverable as the distribution fedcommons-geomed."""
    monkeypatch.syspath_prepend(str(EXAMPLE_PLUGIN_SRC))
    install_fake_distribution(
        root,
        monkeypatch,
        "fedcommons-geomed",
        {"geomed": "fedcommons_geomed:geometric_median"},
        version="0.1.0",
    )
