"""``fedcommons release ...``: read the release registry."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from fedcommons.cli.common import DEFAULT_REGISTRY, OutputFormat, RegistryOpt, console

release_app = typer.Typer(help="List and inspect published releases.", no_args_is_help=True)


def _open_registry(path: Path):
    from fedcommons.coordinator.registry import Registry

    return Registry(path, create=False)


@release_app.command("list")
def release_list(
    registry: RegistryOpt = Path(DEFAULT_REGISTRY),
    name: Annotated[str | None, typer.Option(help="Only this release line.")] = None,
    fmt: Annotated[OutputFormat, typer.Option("--format")] = OutputFormat.table,
) -> None:
    """List published releases."""
    releases = _open_registry(registry).releases(name)
    if fmt is OutputFormat.json:
        rows = [
            {
                "name": r.name,
                "version": r.version,
                "parent": r.parent_version,
                "created": r.created,
                "weights_sha256": r.weights_sha256,
                "manifest_sha256": r.manifest_sha256,
                "metrics": r.metrics,
            }
            for r in releases
        ]
        print(json.dumps(rows, indent=2))
        return
    table = Table("name", "version", "parent", "created", "test acc", "weights sha256")
    for r in releases:
        acc = r.metrics.get("test_accuracy")
        table.add_row(
            r.name,
            r.version,
            r.parent_version or "-",
            r.created,
            f"{acc:.4f}" if acc is not None else "-",
            r.weights_sha256[:16],
        )
    console.print(table)


@release_app.command("show")
def release_show(
    version: Annotated[str, typer.Argument(help="Version, or 'latest'.")],
    registry: RegistryOpt = Path(DEFAULT_REGISTRY),
    name: Annotated[str | None, typer.Option(help="Release line (if several).")] = None,
    fmt: Annotated[OutputFormat, typer.Option("--format")] = OutputFormat.table,
) -> None:
    """Show one release's manifest."""
    rel = _open_registry(registry).get(version, name=name)
    manifest = rel.manifest()
    if fmt is OutputFormat.json:
        doc = asdict(manifest)
        doc["paths"] = {"manifest": str(rel.manifest_path), "weights": str(rel.weights_path)}
        doc["manifest_sha256"] = rel.manifest_sha256
        print(json.dumps(doc, indent=2))
        return
    table = Table(show_header=False)
    for key in (
        "name",
        "version",
        "parent_version",
        "created",
        "task",
        "strategy",
        "rounds",
        "clients_per_round",
        "contributors",
        "num_parameters",
        "weights_sha256",
        "code_version",
    ):
        table.add_row(key, str(getattr(manifest, key)))
    table.add_row("strategy params", json.dumps(manifest.strategy_params))
    for key, value in manifest.metrics.items():
        table.add_row(key, f"{value:.4f}")
    table.add_row("manifest", str(rel.manifest_path))
    table.add_row("weights", str(rel.weights_path))
    console.print(table)
    rounds = Table("round", "clients", "rejected", "val acc", "val loss", "seconds")
    for r in manifest.round_metrics:
        rounds.add_row(
            str(r["round"]),
            f"{r['accepted']}/{r['sampled']}",
            str(sum(r["rejected"].values()) + r["timed_out"]),
            f"{r['val_accuracy']:.4f}",
            f"{r['val_loss']:.4f}",
            f"{r['seconds']:.2f}",
        )
    console.print(rounds)
