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

from fedcommons.cli.common import (
    DEFAULT_REGISTRY,
    OutputFormat,
    RegistryOpt,
    console,
    err_console,
)
from fedcommons.cli.common import progress as _progress
from fedcommons.releases.export import ExportFormat

release_app = typer.Typer(
    help="List, verify, diff, patch and export published releases.", no_args_is_help=True
)

NameOpt = Annotated[str | None, typer.Option("--name", help="Release line (if several).")]
FormatOpt = Annotated[OutputFormat, typer.Option("--format")]


def _open_registry(path: Path):
    """The registry at ``path``, read with the signer pinned for it in the trust file.

    Without a pin, signatures are checked with the key the registry publishes
    (``release verify`` says so and shows the fingerprint to pin).
    """
    from fedcommons.releases.registry import Registry
    from fedcommons.releases.trust import TrustStore

    return Registry(path, create=False, trusted_key=TrustStore().pinned_key(path))


def _signer(registry_root: Path, signing_key: Path | None):
    """The coordinator's signing key, found as a run finds it (never inside the registry)."""
    from fedcommons.coordinator.config import RunConfig
    from fedcommons.coordinator.prepare import signing_key_path
    from fedcommons.releases.signing import Signer

    path = signing_key_path(
        RunConfig(registry=str(registry_root), signing_key=str(signing_key or ""))
    )
    if (Path(registry_root) / "keys" / "ed25519.pub").exists():
        return Signer.load(path)  # the registry's key exists somewhere: never make a new one
    return Signer.load_or_create(path)


SigningKeyOpt = Annotated[
    Path | None,
    typer.Option(
        help="Ed25519 PEM (default: $FEDCOMMONS_SIGNING_KEY or ~/.config/fedcommons/"
        "signing-key.pem)."
    ),
]


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
    """List published releases with their bump, parent, aliases and metrics.

    Everything shown comes from signed files: each release's signed manifest (metrics,
    parent, hashes) and the signed HEAD.json (aliases). A release whose manifest does not
    verify is listed as such, without figures.
    """
    from fedcommons.errors import VerificationError

    reg = _open_registry(registry)
    rows = []
    for r in reg.releases(name):
        row: dict[str, object] = {"name": r.name, "version": r.version, "aliases": list(r.aliases)}
        try:
            m = reg.verified_manifest(r)
        except VerificationError as exc:
            row.update(signed=False, error=str(exc))
        else:
            row.update(
                signed=True,
                bump=(m.version_bump or {}).get("bump", r.bump),
                parent=m.parent_version,
                created=m.created,
                weights_sha256=m.weights_sha256,
                manifest_sha256=r.manifest_sha256,
                metrics=m.metrics,
            )
        rows.append(row)
    if fmt is OutputFormat.json:
        print(json.dumps(rows, indent=2))
        return
    table = Table("name", "version", "bump", "parent", "aliases", "created", "test acc", "sha256")
    for row in rows:
        aliases = " ".join(f"@{a}" for a in row["aliases"]) or "-"  # type: ignore[attr-defined]
        if not row["signed"]:
            table.add_row(
                row["name"], row["version"], "-", "-", aliases, "[red]UNVERIFIED[/]", "-", "-"
            )
            continue
        table.add_row(
            row["name"],
            row["version"],
            row["bump"] or "-",
            row["parent"] or "-",
            aliases,
            row["created"],
            _fmt(row["metrics"].get("test_accuracy")),  # type: ignore[attr-defined]
            str(row["weights_sha256"])[:16],
        )
    console.print(table)
    for row in rows:
        if not row["signed"]:
            console.print(f"[red]UNVERIFIED[/] {row['name']} {row['version']}: {row['error']}")


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
    manifest = reg.verified_manifest(rel)
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


@release_app.command("validate")
def release_validate(
    version: Annotated[str, typer.Argument(help="Version, alias (@stable) or 'latest'.")],
    registry: RegistryOpt = Path(DEFAULT_REGISTRY),
    name: NameOpt = None,
    suite: Annotated[
        str, typer.Option(help="Validation suite 'package.module:function' (default: the run's).")
    ] = "",
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1 (default: CUDA if present).")] = "",
) -> None:
    """Score a published release again on its line's validation suite, against its parent.

    Publishes nothing: re-checks a release on this machine (another device, a newer suite
    or data). Exit code 1 when the gate would reject it.
    """
    from fedcommons.releases.export import task_options
    from fedcommons.releases.gate import load_suite, run_gate
    from fedcommons.tasks import load_task, select_device

    reg = _open_registry(registry)
    rel = reg.get(version, name=name)
    manifest = rel.manifest()
    task = load_task(manifest.task, task_options(manifest.config))
    config = manifest.config or {}
    checks = load_suite(
        task, suite or str(config.get("validation-suite", "")), str(config.get("gate-target", ""))
    )
    parent = reg.get(rel.parent_version, name=rel.name) if rel.parent_version else None
    sizes = {}
    for t in checks.tasks:
        try:
            sizes[t.dataset] = len(t.loader().dataset)  # type: ignore[arg-type]
        except TypeError:  # an iterable loader without a length: a bar of unknown size
            sizes[t.dataset] = None
    total = None if None in sizes.values() else sum(sizes.values()) * (2 if parent else 1)
    with _progress(f"validating {rel.name} {rel.version} ({checks.name})", total) as advance:
        gate = run_gate(
            task,
            checks,
            reg.load_weights(rel),
            parent=reg.load_weights(parent) if parent else None,
            parent_version=parent.version if parent else None,
            parent_validation=parent.manifest().validation if parent else None,
            device=select_device(device or None),
            progress=lambda n: advance(n),
        )
    report = gate.to_dict()
    console.print(
        f"{rel.name} {rel.version} on suite {report.get('suite')} ({report.get('device')}, "
        f"{report.get('seconds', 0):.2f}s), parent {parent.version if parent else '-'}"
    )
    console.print(_validation_table(report))
    if not gate.passed:
        console.print("[red]the gate would reject it:[/] " + "; ".join(gate.reasons))
        raise typer.Exit(1)


@release_app.command("card")
def release_card(
    version: Annotated[str, typer.Argument(help="Version, alias (@stable) or 'latest'.")],
    registry: RegistryOpt = Path(DEFAULT_REGISTRY),
    name: NameOpt = None,
) -> None:
    """Print a release's model card (Markdown with YAML metadata), checked against its manifest."""
    import hashlib

    from fedcommons.errors import RegistryError, VerificationError

    reg = _open_registry(registry)
    rel = reg.get(version, name=name)
    manifest = reg.verified_manifest(rel)
    try:
        data = rel.card_path.read_bytes()
    except FileNotFoundError as exc:
        raise RegistryError(f"release {rel.version} has no model card ({rel.card_path})") from exc
    if hashlib.sha256(data).hexdigest() != manifest.card_sha256:
        raise VerificationError(
            f"model card {rel.card_path} does not match the hash its signed manifest records",
            str(rel.card_path),
        )
    sys.stdout.write(data.decode())


MlflowUriOpt = Annotated[
    str,
    typer.Option(
        "--mlflow-tracking-uri",
        help="Mirror into this MLflow tracking server too (e.g. sqlite:///mlflow.db).",
    ),
]


@release_app.command("promote")
def release_promote(
    version: Annotated[str, typer.Argument(help="Version (or alias) to point the alias at.")],
    alias: Annotated[str, typer.Option("--alias", help="Alias, e.g. stable or candidate.")],
    registry: RegistryOpt = Path(DEFAULT_REGISTRY),
    name: NameOpt = None,
    signing_key: SigningKeyOpt = None,
    mlflow_tracking_uri: MlflowUriOpt = "",
) -> None:
    """Point an alias (@stable, @candidate, ...) of the release's line at VERSION.

    Aliases live in the signed HEAD.json: the registry's signing key re-signs it. With
    --mlflow-tracking-uri the line is mirrored into MLflow afterwards (its missing
    releases as model versions, every alias); an unreachable server is reported, and
    the alias in the registry stays moved.
    """
    reg = _open_registry(registry)
    rel = reg.promote(version, alias, name=name, signer=_signer(reg.root, signing_key))
    console.print(f"{rel.name} @{alias.removeprefix('@')} -> {rel.version}")
    if mlflow_tracking_uri:
        from fedcommons.releases.integrations.mlflow_mirror import check_available, sync_registry

        check_available()
        try:
            sync_registry(reg, mlflow_tracking_uri, name=rel.name)
        except Exception as exc:  # the registry changed already: report, exit non-zero
            console.print(
                f"[yellow]not mirrored[/] to MLflow ({type(exc).__name__}: {exc}); "
                "run `fedcommons release mlflow-sync` when the server is back"
            )
            raise typer.Exit(1) from exc
        console.print(f"MLflow: @{alias.removeprefix('@')} -> {rel.name} {rel.version}")


@release_app.command("mlflow-sync")
def release_mlflow_sync(
    tracking_uri: Annotated[
        str,
        typer.Option(
            "--mlflow-tracking-uri",
            envvar="MLFLOW_TRACKING_URI",
            help="MLflow tracking server (env MLFLOW_TRACKING_URI).",
        ),
    ],
    registry: RegistryOpt = Path(DEFAULT_REGISTRY),
    name: NameOpt = None,
    experiment: Annotated[
        str, typer.Option(help="Experiment for releases mirrored now (default: the line).")
    ] = "",
) -> None:
    """Mirror every release MLflow lacks as a model version, then every alias (idempotent).

    For releases published while the tracking server was down, or before it was
    configured: each gets an MLflow run (per-round and final metrics from its manifest,
    model card, release files) and a model version tagged with its manifest hash.
    """
    from fedcommons.releases.integrations.mlflow_mirror import check_available, check_tracking_uri

    check_tracking_uri(tracking_uri)
    check_available()
    from fedcommons.releases.integrations.mlflow_mirror import sync_registry

    reg = _open_registry(registry)
    total = len(reg.releases(name))
    with _progress("mirroring releases", total) as advance:
        done = sync_registry(
            reg, tracking_uri, name=name, experiment=experiment, on_release=lambda r, v: advance()
        )
    for label in done["mirrored"]:
        console.print(f"mirrored {label}")
    console.print(
        f"{len(done['mirrored'])} release(s) mirrored, {len(done['present'])} already in "
        f"MLflow; aliases set ({tracking_uri})"
    )


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
    signing_key: SigningKeyOpt = None,
    registry: RegistryOpt = Path(DEFAULT_REGISTRY),
) -> None:
    """Sign releases published before signing existed; rewrite HEAD.json in the current format.

    Also upgrades a format-1 HEAD.json (no sequence number, aliases unsigned).
    """
    reg = _open_registry(registry)
    signed = reg.sign_legacy(_signer(reg.root, signing_key))
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
    trust: Annotated[
        str | None,
        typer.Option(
            "--trust",
            "--public-key",
            help="The signer you trust: its Ed25519 public key (PEM file) or fingerprint. "
            "Remembered for this registry in ~/.config/fedcommons/trust.json.",
        ),
    ] = None,
    first_use: Annotated[
        bool,
        typer.Option(
            "--trust-on-first-use",
            help="With no signer pinned for this registry, pin the key it publishes now.",
        ),
    ] = False,
    fmt: FormatOpt = OutputFormat.table,
) -> None:
    """Check hashes, signatures, the chain to the parent and HEAD.json; name the wrong file.

    The signer is the one you pinned (--trust, or earlier, in the trust file); without a
    pin the key the registry publishes is used and a warning says so. HEAD.json must not
    be older than the last head you accepted from that signer (rollback).
    Exit code 0 when everything verifies, 1 when anything fails.
    """
    from fedcommons.errors import ConfigError
    from fedcommons.releases.registry import Registry
    from fedcommons.releases.trust import TrustStore, resolve_trust
    from fedcommons.releases.verification import verify_registry

    reg = Registry(registry, create=False)
    if all_ == (version is not None):
        raise ConfigError("give a VERSION or --all")
    store = TrustStore()
    # the key first: aliases (@stable) resolve from the HEAD.json that key signed
    decision = resolve_trust(
        reg.root, reg.published_key(), trust=trust, first_use=first_use, store=store
    )
    reg.trusted_key = decision.public_key
    targets = reg.releases(name) if all_ else [reg.get(version or "", name=name)]
    outcome = verify_registry(
        reg, targets, store=store, line=None if all_ else targets[0].name, decision=decision
    )
    if fmt is OutputFormat.json:
        print(json.dumps(outcome.to_dict(), indent=2))
    else:
        style = "yellow" if not decision.pinned else "dim"
        err_console.print(f"[{style}]{decision.note}[/]")
        for r in outcome.releases:
            chain = " -> ".join(r.chain)
            if r.ok:
                console.print(f"[green]OK[/]   {r.name} {r.version}  chain {chain}")
            else:
                console.print(f"[red]FAIL[/] {r.name} {r.version}: {r.error}")
                if r.path:
                    console.print(f"     wrong file: {r.path}")
        head = outcome.head
        if head.ok:
            seq = f" (seq {head.seq})" if head.seq is not None else ""
            console.print(f"[green]OK[/]   HEAD.json attests {head.attested} release(s){seq}")
            for item in head.unattested:
                console.print(f"     note: {item} is not attested yet (publish interrupted?)")
        else:
            console.print(f"[red]FAIL[/] {head.error}")
            if head.path:
                console.print(f"     wrong file: {head.path}")
        for note in head.notes:
            console.print(f"     note: {note}")
    if not outcome.ok:
        raise typer.Exit(1)


@release_app.command("site")
def release_site(
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder to write the site to.")],
    registry: RegistryOpt = Path(DEFAULT_REGISTRY),
    trust: Annotated[
        str | None,
        typer.Option(
            "--trust",
            help="The signer you trust: its Ed25519 public key (PEM file) or fingerprint "
            "(remembered, as for `release verify`); default: the signer pinned for this "
            "registry, else the registry's own key (and the site says so).",
        ),
    ] = None,
) -> None:
    """Render a static site of every line and version (works from file://, no server).

    Lineage, validation scores across versions (SVG chart), privacy budget, compression,
    contributors, verification against the trusted key, and downloads (weights, card,
    patch from the parent). Exit code 1 when a release fails verification.
    """
    from fedcommons.releases.integrations.site import build_site
    from fedcommons.releases.registry import Registry
    from fedcommons.releases.trust import resolve_trust

    reg = Registry(registry, create=False)
    decision = resolve_trust(reg.root, reg.published_key(), trust=trust)
    if decision.pinned:
        reg.trusted_key = decision.public_key
    with _progress("rendering release pages", len(reg.releases())) as advance:
        summary = build_site(
            reg,
            output,
            public_key=decision.public_key if decision.pinned else None,
            on_release=lambda r: advance(),
        )
    console.print(
        f"site of {summary.releases} release(s) -> {summary.root / 'index.html'}; "
        f"{summary.verified} verified against key {summary.key_id[:16]}"
        + ("" if summary.pinned else " (the registry's own: pin one with --trust)")
    )
    for label in summary.failed:
        console.print(f"[red]FAIL[/] {label}: verification failed (shown on the site)")
    if summary.failed:
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
    output: Annotated[
        Path, typer.Option("--output", "-o", help="File to write (a new folder for peft / hf).")
    ],
    fmt: Annotated[ExportFormat, typer.Option("--format")] = ExportFormat.safetensors,
    registry: RegistryOpt = Path(DEFAULT_REGISTRY),
    name: NameOpt = None,
) -> None:
    """Export a release (hash-checked): safetensors, torch, peft or hf.

    safetensors as stored, a torch state dict; hf writes a folder Hugging Face tools
    load: the task's own layout (text tasks: the merged model via save_pretrained) or
    model.safetensors + config.json + README.md (the model card), loaded by
    fedcommons.releases.integrations.hf_hub.FedcommonsModel.from_pretrained(folder);
    peft (text-task LoRA patches) a PEFT adapter folder.
    """
    from fedcommons.releases.export import FOLDER_FORMATS, export_folder, export_release

    reg = _open_registry(registry)
    rel = reg.get(version, name=name)
    with _progress(f"exporting {rel.name} {rel.version} as {fmt.value}", None):
        if fmt in FOLDER_FORMATS:
            export_folder(reg, rel, fmt, output)
        else:
            _write_atomic(output, export_release(reg, rel, fmt))
    suffix = "/" if fmt in FOLDER_FORMATS else ""
    console.print(f"exported {rel.name} {rel.version} as {fmt.value} -> {output}{suffix}")


trust_app = typer.Typer(
    help="Pin the signer you trust per registry (the trust file in ~/.config/fedcommons).",
    no_args_is_help=True,
)
release_app.add_typer(trust_app, name="trust")


@trust_app.command("add")
def trust_add(
    key: Annotated[str, typer.Argument(help="Ed25519 public key (PEM file) or fingerprint.")],
    registry: RegistryOpt = Path(DEFAULT_REGISTRY),
) -> None:
    """Pin KEY as the signer of this registry (replaces an earlier pin, and says so)."""
    from fedcommons.releases.registry import Registry
    from fedcommons.releases.signing import key_id
    from fedcommons.releases.trust import TrustStore, parse_trust

    reg = Registry(registry, create=False)
    public_key = parse_trust(key, reg.published_key())
    store = TrustStore()
    replaced = store.pin(reg.root, public_key, how="trust add")
    console.print(f"pinned {key_id(public_key)} for {reg.root} in {store.path}")
    if replaced is not None:
        console.print(f"[yellow]replaced the earlier pin {key_id(replaced)}[/]")


@trust_app.command("list")
def trust_list(fmt: FormatOpt = OutputFormat.table) -> None:
    """The pinned signers, one per registry."""
    from fedcommons.releases.trust import TrustStore

    pins = TrustStore().pins()
    if fmt is OutputFormat.json:
        print(json.dumps(pins, indent=2))
        return
    table = Table("registry", "signer fingerprint", "pinned", "how")
    for label, pin in sorted(pins.items()):
        table.add_row(label, pin["key_id"], pin["pinned"], pin["how"])
    console.print(table)


@trust_app.command("remove")
def trust_remove(registry: RegistryOpt = Path(DEFAULT_REGISTRY)) -> None:
    """Forget the signer pinned for this registry."""
    from fedcommons.errors import TrustError
    from fedcommons.releases.trust import TrustStore

    if not TrustStore().unpin(registry):
        raise TrustError(f"no signer is pinned for {registry}")
    console.print(f"unpinned {registry}")
