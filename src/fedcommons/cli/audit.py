"""``fedcommons audit ...``: check every privacy claim without trusting the coordinator."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from fedcommons.cli.common import DEFAULT_REGISTRY, OutputFormat, RegistryOpt, console

audit_app = typer.Typer(
    help="Audit differential-privacy claims: ledger recomputation and canary audits.",
    no_args_is_help=True,
)


class SeededBug(StrEnum):
    """Bugs the canary audit can seed into the mechanism, to show it catches them."""

    none = "none"
    skip_clipping = "skip-clipping"
    noise_for_sum = "noise-for-sum"


@audit_app.command("ledger")
def audit_ledger_cmd(
    version: Annotated[str, typer.Argument(help="Release version, or 'latest'.")],
    registry: RegistryOpt = Path(DEFAULT_REGISTRY),
    name: Annotated[str | None, typer.Option(help="Release line (if several).")] = None,
    fmt: Annotated[OutputFormat, typer.Option("--format")] = OutputFormat.table,
) -> None:
    """Recompute a release's ε from its privacy ledger with Google's dp-accounting.

    Fails (exit 2) naming the round when the ledger was edited, when an entry's ε does
    not reproduce, or when a round was under-noised.
    """
    from fedcommons.errors import PrivacyAuditError
    from fedcommons.privacy.audit import audit_ledger
    from fedcommons.releases.registry import Registry

    rel = Registry(registry, create=False).get(version, name=name)
    if hashlib.sha256(rel.manifest_path.read_bytes()).hexdigest() != rel.manifest_sha256:
        raise PrivacyAuditError(
            f"manifest {rel.manifest_path} does not match the SHA-256 the registry index "
            "recorded at publication: its privacy claim cannot be trusted"
        )
    result = audit_ledger(Path(registry), rel.manifest().privacy)
    if fmt is OutputFormat.json:
        doc = asdict(result)
        doc["release"] = {"name": rel.name, "version": rel.version}
        doc["verdict"] = "ok"
        print(json.dumps(doc, indent=2))
        return
    table = Table(
        "round",
        "run",
        "sampled",
        "particip.",
        "dropped",
        "z",
        "z eff.",
        "clipped",
        "q",
        "ε recorded",
        "ε recomputed",
        title=f"{rel.name} {rel.version}: {result.entries} ledger entries, chain intact",
    )
    for r in result.rounds:
        table.add_row(
            str(r.round),
            str(r.run_id),
            str(r.sampled),
            str(r.participating),
            str(r.dropped),
            f"{r.noise_multiplier:g}",
            f"{r.effective_noise_multiplier:.4g}",
            f"{r.fraction_clipped:.0%}",
            f"{r.sample_rate:.3g}",
            f"{r.recorded_epsilon:.6f}",
            f"{r.recomputed_epsilon:.6f}",
        )
    console.print(table)
    summary = Table(show_header=False, title="guarantee")
    summary.add_row("claimed ε (release)", f"{result.claimed_epsilon:.6f} at δ={result.delta:g}")
    summary.add_row(f"recomputed ε ({result.method})", f"{result.recomputed_epsilon:.6f}")
    summary.add_row("runtime accountant", result.accountant)
    summary.add_row("ε, RDP (dp-accounting)", f"{result.epsilon_rdp:.6f}")
    summary.add_row(
        "ε, PLD (dp-accounting)",
        "n/a (no PLD of the Skellam mechanism)"
        if math.isnan(result.epsilon_pld)
        else f"{result.epsilon_pld:.6f}",
    )
    for c in result.client_checks:
        summary.add_row(
            f"institution node {c['node']}",
            f"reported ε={c['reported_epsilon']:.4f}, recomputed {c['recomputed_epsilon']:.4f}"
            f" (budget {c['budget_epsilon']:g}, {c['steps']} DP-SGD steps)",
        )
    summary.add_row("verdict", "[green]ok[/]: every claim reproduces")
    console.print(summary)


@audit_app.command("canary")
def audit_canary_cmd(
    release: Annotated[
        str | None,
        typer.Option("--release", help="Take z, C and the parameter count from this release."),
    ] = None,
    registry: RegistryOpt = Path(DEFAULT_REGISTRY),
    name: Annotated[str | None, typer.Option(help="Release line (with --release).")] = None,
    params: Annotated[int, typer.Option(help="Parameters (dimension of the update).")] = 20_000,
    canaries: Annotated[int, typer.Option(help="Canary clients m.")] = 1_000,
    noise_multiplier: Annotated[float, typer.Option("--noise-multiplier", "-z")] = 2.0,
    clip_norm: Annotated[float, typer.Option("--clip-norm", "-C")] = 1.0,
    delta: Annotated[float, typer.Option(help="δ of the claim.")] = 1e-5,
    guesses: Annotated[
        int | None, typer.Option(help="Top-k and bottom-k guesses each (default 15% of m).")
    ] = None,
    confidence: Annotated[float, typer.Option(help="Confidence of the bound.")] = 0.95,
    seed: Annotated[int, typer.Option(help="Seed of canaries, inclusion and noise.")] = 0,
    seeded_bug: Annotated[
        SeededBug, typer.Option("--seeded-bug", help="Self-test: weaken the mechanism.")
    ] = SeededBug.none,
    fmt: Annotated[OutputFormat, typer.Option("--format")] = OutputFormat.table,
) -> None:
    """One-run canary audit of DP-FedAvg (Steinke, Nasr & Jagielski 2023).

    Prints the empirical lower bound on ε next to the claimed ε; exits 2 when the bound
    exceeds the claim (the mechanism leaks more than its accounting says).
    """
    from fedcommons.errors import PrivacyAuditError
    from fedcommons.privacy.canary import run_canary_audit

    if release is not None:
        from fedcommons.releases.registry import Registry

        manifest = Registry(registry, create=False).get(release, name=name).manifest()
        central = manifest.privacy.get("central")
        if not central:
            raise PrivacyAuditError(f"release {release} has no central DP to audit")
        noise_multiplier = float(central["noise_multiplier"])
        clip_norm = float(central["clip_norm"])
        delta = float(central["delta"])
        params = manifest.num_parameters
    result = run_canary_audit(
        num_params=params,
        canaries=canaries,
        noise_multiplier=noise_multiplier,
        clip_norm=clip_norm,
        delta=delta,
        k_plus=guesses,
        k_minus=guesses,
        confidence=confidence,
        seed=seed,
        seeded_bug=seeded_bug.value,  # type: ignore[arg-type]
    )
    if fmt is OutputFormat.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        table = Table(show_header=False, title="one-run canary audit (Steinke et al. 2023)")
        for key, value in result.to_dict().items():
            table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
        console.print(table)
    if not result.passed:
        raise PrivacyAuditError(
            f"empirical ε lower bound {result.epsilon_lower_bound:.3f} exceeds the claimed "
            f"ε={result.claimed_epsilon:.3f} at δ={result.delta:g} "
            f"({result.correct}/{result.guesses} correct guesses)"
        )
