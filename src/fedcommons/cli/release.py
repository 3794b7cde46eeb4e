"""``fedcommons release ...``: read, verify, diff, patch and export releases."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from fedcommons.cli.common import DEFAULT_REGISTRY, OutputFormat, RegistryOpt, console
from fedcommons.releases.export import ExportFormat

release_app = typer.Typer(
    help="List, verify, diff, patch and export published releases.", no_args_is_help=True
)

NameOpt = Annotated[str | None, typer.Option("--name", help="Release line (if several).")]
FormatOpt = Annotated[OutputFormat, typer.Option("--format")]


def _open_registry(path: Path):
    from fedcommons.releases.registry import Registry

    return Registry(path, create=False)


def _write_atomic(path: Path, data: bytes) -> None:
    from fedcommons.fileio import atomic_write

    atomic_write(path.expanduser(), data, mode=0o644)


def _fmt(value: float | None, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return f"{value:.{digits}f}"


@release_app.command("list")
def release_list(
    registry: RegistryOpt = Path(DEFAULT_REGISTRY),
    name: NameOpt = None,
    fmt: FormatOpt = OutputFormat.table,
) -> None:
    """List published releases with their bump, parent and aliases."""
    releases = _open_registry(registry).releases(name)
    if fmt is OutputFormat.json:
        rows = [
            {
                "name": r.name,
                "version": r.version,
                "bump": r.bump,
                "parent": r.parent_version,
                "aliases": list(r.aliases),
                "created": r.created,
                "weights_sha256": r.weights_sha256,
                "manifest_sha256": r.manifest_sha256,
                "metrics": r.metrics,
            }
            for r in releases
        ]
        print(json.dumps(rows, indent=2))
        return
    table = Table("name", "version", "bump", "parent", "aliases", "created", "test acc", "sha256")
    for r in releases:
        table.add_row(
            r.name,
            r.version,
            r.bump or "-",
            r.parent_version or "-",
            " ".join(f"@{a}" for a in r.aliases) or "-",
            r.created,
            _fmt(r.metrics.get("test_accuracy")),
            r.weights_sha256[:16],
        )
    console.print(table)


def _validation_table(validation: dict) -> Table:
    table = Table("task", "metric", "dir", "tol", "value", "parent", "change", "verdict")
    for t in validation.get("tasks", []):
        table.add_row(
            t["name"] + (" (target)" if t.get("target") else ""),
            t["metric"],
            t["direction"],
            str(t["tolerance"]),
            _fmt(t["candidate"]),
            _fmt(t["parent"]),
            _fmt(t["change"]),
            ("pass" if t["passed"] else "[red]FAIL[/]") + f" {t['reason']}",
        )
    return table


@release_app.command("show")
def release_show(
    version: Annotated[str, typer.Argument(help="Version, alias (@stable) or 'latest'.")],
    registry: RegistryOpt = Path(DEFAULT_REGISTRY),
    name: NameOpt = None,
    fmt: FormatOpt = OutputFormat.table,
) -> None:
    """Show one release's manifest: provenance, version bump, validation, hashes."""
    reg = _open_registry(registry)
    rel = reg.get(version, name=name)
    manifest = rel.manifest()
    if fmt is OutputFormat.json:
        doc = asdict(manifest)
        doc["paths"] = {
            "manifest": str(rel.manifest_path),
            "weights": str(rel.weights_path),
            "signature": str(rel.signature_path),
            "card": str(rel.card_path),
        }
        doc["manifest_sha256"] = rel.manifest_sha256
        doc["aliases"] = list(rel.aliases)
        doc["tags"] = reg.tags(rel)
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
        "compression",
        "upload_bytes",
        "weights_sha256",
        "card_sha256",
        "signing_key_id",
        "code_version",
    ):
        table.add_row(key, str(getattr(manifest, key)))
    table.add_row("aliases", " ".join(f"@{a}" for a in rel.aliases) or "-")
    tags = reg.tags(rel)
    table.add_row("tags", " ".join(f"{k}={v}" for k, v in tags.items()) or "-")
    bump = manifest.version_bump
    if bump:
        text = f"{bump.get('bump')} (computed {bump.get('computed')}): " + "; ".join(
            bump.get("reasons", [])
        )
        if bump.get("override_reason"):
            text += f"; override: {bump['override_reason']}"
        table.add_row("version bump", text)
    table.add_row("strategy params", json.dumps(manifest.strategy_params))
    for key, value in manifest.metrics.items():
        table.add_row(key, _fmt(value))
    for dataset, sha in sorted(manifest.data_fingerprints.items()):
        table.add_row(f"data {dataset}", sha)
    table.add_row("manifest", f"{rel.manifest_path} ({rel.manifest_sha256[:16]})")
    table.add_row("weights", str(rel.weights_path))
    table.add_row("card", str(rel.card_path))
    console.print(table)
    if manifest.validation:
        v = manifest.validation
        console.print(
            f"validation gate: suite {v.get('suite')} on {v.get('device')} in "
            f"{v.get('seconds', 0):.3f}s, parent {v.get('parent_version') or '-'} "
            f"({v.get('parent_source')})"
        )
        console.print(_validation_table(v))
    if manifest.round_metrics:
        rounds = Table("round", "clients", "rejected", "val acc", "val loss", "seconds")
        for r in manifest.round_metrics:
            rounds.add_row(
                str(r["round"]),
                f"{r['accepted']}/{r['sampled']}",
                str(sum(r["rejected"].values()) + r["timed_out"]),
                _fmt(r["val_accuracy"]),
                _fmt(r["val_loss"]),
                f"{r['seconds']:.2f}",
            )
        console.print(rounds)


@release_app.command("card")
def release_card(
    version: Annotated[str, typer.Argument(help="Version, alias (@stable) or 'latest'.")],
    registry: RegistryOpt = Path(DEFAULT_REGISTRY),
    name: NameOpt = None,
) -> None:
    """Print a release's model card (Markdown with YAML metadata)."""
    from fedcommons.errors import RegistryError

    rel = _open_registry(registry).get(version, name=name)
    try:
        sys.stdout.write(rel.card_path.read_text())
    except FileNotFoundError as exc:
        raise RegistryError(f"release {rel.version} has no model card ({rel.card_path})") from exc


@release_app.command("promote")
def release_promote(
    version: Annotated[str, typer.Argument(help="Version (or alias) to point the alias at.")],
    alias: Annotated[str, typer.Option("--alias", help="Alias, e.g. stable or candidate.")],
    registry: RegistryOpt = Path(DEFAULT_REGISTRY),
    name: NameOpt = None,
) -> None:
    """Point an alias (@stable, @candidate, ...) of the release's line at VERSION."""
    rel = _open_registry(registry).promote(version, alias, name=name)
    console.print(f"{rel.name} @{alias.removeprefix('@')} -> {rel.version}")


@release_app.command("tag")
def release_tag(
    version: Annotated[str, typer.Argument(help="Version or alias.")],
    tags: Annotated[list[str] | None, typer.Argument(help="key=value pairs to set.")] = None,
    delete: Annotated[
        list[str] | None, typer.Option("--delete", help="Tag key to remove (repeatable).")
    ] = None,
    registry: RegistryOpt = Path(DEFAULT_REGISTRY),
    name: NameOpt = None,
) -> None:
    """Set or remove key=value tags on a release (MLflow-style metadata) and print them."""
    from fedcommons.errors import ConfigError

    reg = _open_registry(registry)
    for item in tags or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"tag {item!r} is not key=value")
        reg.set_tag(version, key.strip(), value, name=name)
    for key in delete or []:
        reg.set_tag(version, key, None, name=name)
    rel = reg.get(version, name=name)
    for key, value in reg.tags(rel).items():
        console.print(f"{key}={value}")


@release_app.command("sign-legacy")
def release_sign_legacy(
    signing_key: Annotated[
        Path | None,
        typer.Option(help="Ed25519 PEM (default: $FEDCOMMONS_SIGNING_KEY or <registry>/private)."),
    ] = None,
    registry: RegistryOpt = Path(DEFAULT_REGISTRY),
) -> None:
    """Sign releases published before signing existed (after checking their hashes)."""
    from fedcommons.coordinator.config import RunConfig
    from fedcommons.coordinator.prepare import signing_key_path
    from fedcommons.releases.signing import Signer

    reg = _open_registry(registry)
    # the key the coordinator signs with (same lookup as a run's)
    key = signing_key_path(RunConfig(registry=str(reg.root), signing_key=str(signing_key or "")))
    signed = reg.sign_legacy(Signer.load_or_create(key))
    for rel in signed:
        console.print(f"signed {rel.name} {rel.version}")
    console.print(f"{len(signed)} release(s) signed; HEAD.json rewritten")


@release_app.command("rejected")
def release_rejected(
    registry: RegistryOpt = Path(DEFAULT_REGISTRY),
    name: NameOpt = None,
    fmt: FormatOpt = OutputFormat.table,
) -> None:
    """Candidates the validation gate rejected, with their reasons (nothing was published)."""
    rejections = _open_registry(registry).rejections(name)
    if fmt is OutputFormat.json:
        print(json.dumps([asdict(r) for r in rejections], indent=2))
        return
    table = Table("id", "name", "created", "parent", "candidate sha256", "reasons")
    for r in rejections:
        table.add_row(
            str(r.id),
            r.name,
            r.created,
            r.parent_version or "-",
            r.weights_sha256[:16],
            "\n".join(r.reasons),
        )
    console.print(table)


@release_app.command("verify")
def release_verify(
    version: Annotated[
        str | None, typer.Argument(help="Version, alias or 'latest'; omit with --all.")
    ] = None,
    registry: RegistryOpt = Path(DEFAULT_REGISTRY),
    name: NameOpt = None,
    all_: Annotated[bool, typer.Option("--all", help="Verify every release.")] = False,
    public_key: Annotated[
        Path | None,
        typer.Option(help="Pin this Ed25519 public key (PEM) instead of the registry's."),
    ] = None,
    fmt: FormatOpt = OutputFormat.table,
) -> None:
    """Check hashes, signature and the chain to the parent; name the file that is wrong.

    Exit code 0 when everything verifies, 1 when a release fails.
    """
    from fedcommons.errors import ConfigError
    from fedcommons.releases.signing import load_public_key
    from fedcommons.releases.verification import Verifier

    reg = _open_registry(registry)
    if all_ == (version is not None):
        raise ConfigError("give a VERSION or --all")
    key = None
    if public_key is not None:
        try:
            key = load_public_key(public_key.read_bytes(), str(public_key))
        except OSError as exc:
            raise ConfigError(f"cannot read public key {str(public_key)!r}: {exc}") from exc
    verifier = Verifier(reg, key)
    targets = reg.releases(name) if all_ else [reg.get(version or "", name=name)]
    results = [verifier.verify(r) for r in targets]
    head = verifier.verify_head(None if all_ else targets[0].name)
    if fmt is OutputFormat.json:
        print(
            json.dumps({"releases": [asdict(r) for r in results], "head": asdict(head)}, indent=2)
        )
    else:
        for r in results:
            chain = " -> ".join(r.chain)
            if r.ok:
                console.print(f"[green]OK[/]   {r.name} {r.version}  chain {chain}")
            else:
                console.print(f"[red]FAIL[/] {r.name} {r.version}: {r.error}")
                if r.path:
                    console.print(f"     wrong file: {r.path}")
        if head.ok:
            console.print(f"[green]OK[/]   HEAD.json attests {head.attested} release(s)")
            for item in head.unattested:
                console.print(f"     note: {item} is not attested yet (publish interrupted?)")
        else:
            console.print(f"[red]FAIL[/] {head.error}")
            if head.path:
                console.print(f"     wrong file: {head.path}")
    if not all(r.ok for r in results) or not head.ok:
        raise typer.Exit(1)


def _bytes_of(reg, ref: str, name: str | None) -> tuple[bytes, str]:
    """Weights bytes of a release reference or of a safetensors file path."""
    path = Path(ref).expanduser()
    if path.is_file():
        return path.read_bytes(), str(path)
    rel = reg.get(ref, name=name)
    return reg.weights_bytes(rel), f"{rel.name} {rel.version}"


@release_app.command("diff")
def release_diff(
    a: Annotated[str, typer.Argument(help="Release A (version, alias, or weights file).")],
    b: Annotated[str, typer.Argument(help="Release B.")],
    registry: RegistryOpt = Path(DEFAULT_REGISTRY),
    name: NameOpt = None,
    show_unchanged: Annotated[bool, typer.Option(help="List unchanged tensors too.")] = False,
    fmt: FormatOpt = OutputFormat.table,
) -> None:
    """Changed tensors, the fraction of entries changed, and norms of the change."""
    from safetensors.torch import load as st_load

    from fedcommons.releases.patches import diff_weights

    reg = _open_registry(registry)
    data_a, label_a = _bytes_of(reg, a, name)
    data_b, label_b = _bytes_of(reg, b, name)
    diff = diff_weights(st_load(data_a), st_load(data_b))
    if fmt is OutputFormat.json:
        print(json.dumps(diff.to_dict(), indent=2, default=str))
        return
    table = Table("tensor", "status", "shape", "changed", "fraction", "‖Δ‖", "‖Δ‖/‖A‖", "max |Δ|")
    for t in diff.tensors:
        if t.status == "unchanged" and not show_unchanged:
            continue
        shape = t.shape_b if t.shape_b is not None else t.shape_a
        if t.status == "reshaped":
            shape = f"{t.shape_a}->{t.shape_b}"
        table.add_row(
            t.name,
            t.status,
            str(shape),
            f"{t.changed}/{t.entries}",
            f"{t.fraction:.2%}",
            _fmt(t.norm_diff, 5),
            _fmt(t.relative_norm, 5),
            _fmt(t.max_abs, 5),
        )
    console.print(f"{label_a} -> {label_b}")
    console.print(table)
    console.print(
        f"{diff.changed_entries}/{diff.shared_entries} shared entries changed "
        f"({diff.changed_fraction:.2%}); added {len(diff.added)}, removed {len(diff.removed)}, "
        f"replaced {len(diff.reshaped)} tensor(s)"
    )


@release_app.command("patch")
def release_patch(
    a: Annotated[str, typer.Argument(help="Base release A (version, alias, or weights file).")],
    b: Annotated[str, typer.Argument(help="Target release B.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Patch file to write.")],
    registry: RegistryOpt = Path(DEFAULT_REGISTRY),
    name: NameOpt = None,
) -> None:
    """Write a patch that turns A's weights into B's (sparse when the change is)."""
    from fedcommons.releases.patches import make_patch

    reg = _open_registry(registry)
    data_a, label_a = _bytes_of(reg, a, name)
    data_b, label_b = _bytes_of(reg, b, name)
    patch = make_patch(data_a, data_b)
    _write_atomic(output, patch.data)
    console.print(
        f"patch {label_a} -> {label_b}: {patch.size} bytes = "
        f"{patch.size / len(data_b):.2%} of the full release ({len(data_b)} bytes); "
        f"{patch.changed_entries} entries stored, {len(patch.full_tensors)} tensor(s) whole "
        f"-> {output}"
    )
    if patch.size >= len(data_b):
        console.print("the change is dense: downloading B itself is as cheap as this patch")


@release_app.command("apply")
def release_apply(
    a: Annotated[str, typer.Argument(help="Base release A (version, alias, or weights file).")],
    patch_file: Annotated[Path, typer.Argument(help="Patch made by `release patch`.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Weights file to write.")],
    registry: RegistryOpt = Path(DEFAULT_REGISTRY),
    name: NameOpt = None,
) -> None:
    """Apply a patch to A; the output equals B bit for bit (its SHA-256 is checked)."""
    from fedcommons.errors import PatchError
    from fedcommons.releases.patches import apply_patch, sha256_hex

    path = Path(a).expanduser()
    if path.is_file():
        data_a = path.read_bytes()
    else:
        reg = _open_registry(registry)
        data_a = reg.weights_bytes(reg.get(a, name=name))
    try:
        patch_bytes = patch_file.read_bytes()
    except OSError as exc:
        raise PatchError(f"cannot read patch {str(patch_file)!r}: {exc}") from exc
    out = apply_patch(data_a, patch_bytes)
    _write_atomic(output, out)
    console.print(f"wrote {output} ({len(out)} bytes, sha256 {sha256_hex(out)})")


@release_app.command("export")
def release_export(
    version: Annotated[str, typer.Argument(help="Version, alias (@stable) or 'latest'.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="File to write.")],
    fmt: Annotated[ExportFormat, typer.Option("--format")] = ExportFormat.safetensors,
    registry: RegistryOpt = Path(DEFAULT_REGISTRY),
    name: NameOpt = None,
) -> None:
    """Export a release's weights (hash-checked): safetensors as stored, or a torch state dict."""
    from fedcommons.releases.export import export_release

    reg = _open_registry(registry)
    rel = reg.get(version, name=name)
    data = export_release(reg, rel, fmt)
    _write_atomic(output, data)
    console.print(f"exported {rel.name} {rel.version} as {fmt.value} -> {output}")
