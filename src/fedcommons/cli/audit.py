"""``fedcommons audit ...``: check every privacy claim without trusting the coordinator."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from enum import StrEnum
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

audit_app = typer.Typer(
    help="Audit differential-privacy claims: ledger recomputation and canary audits.",
    no_args_is_help=True,
)


class SeededBug(StrEnum):
    """Bugs the canary audit can seed into the real coordinator path, to show it catches them."""

    none = "none"
    skip_clipping = "skip-clipping"
    noise_for_sum = "noise-for-sum"
    half_noise = "half-noise"
    denominator_replies = "denominator-replies"
    leak_sample = "leak-sample"


@audit_app.command("ledger")
def audit_ledger_cmd(
    version: Annotated[str, typer.Argument(help="Release version, or 'latest'.")],
    registry: RegistryOpt = Path(DEFAULT_REGISTRY),
    name: Annotated[str | None, typer.Option(help="Release line (if several).")] = None,
    trust: Annotated[
        str | None,
        typer.Option("--trust", help="The signer you trust: public key (PEM file) or fingerprint."),
    ] = None,
    first_use: Annotated[
        bool,
        typer.Option("--trust-on-first-use", help="Pin the registry's key if none is pinned."),
    ] = False,
    fmt: Annotated[OutputFormat, typer.Option("--format")] = OutputFormat.table,
) -> None:
    """Recompute a release's ε from its privacy ledger with Google's dp-accounting.

    The release, its chain and HEAD.json must verify against the signer you trust
    (--trust, or the one pinned for the registry). Fails (exit 2) naming the round when
    the ledger was edited, when an entry's ε does not reproduce, or when a round was
    under-noised; exits 1 when the ledger holds entries no signed release covers
    (appended, or a run still in progress).
    """
    from fedcommons.releases.ledger_audit import audit_signed_ledger
    from fedcommons.releases.registry import Registry

    signed = audit_signed_ledger(
        Registry(registry, create=False), version, name=name, trust=trust, first_use=first_use
    )
    result = signed.audit
    flagged = [
        f"round {u['round']} of run {u['run_id']} (entry {u['seq']})" for u in signed.unreleased
    ]
    if fmt is OutputFormat.json:
        doc = asdict(result)
        doc["release"] = {"name": signed.name, "version": signed.version}
        doc["trust"] = {"key_id": signed.trust.key_id, "source": signed.trust.source.value}
        doc["covered_by"] = signed.covered_by
        doc["unreleased_entries"] = signed.unreleased
        doc["verdict"] = "flagged" if signed.flagged else "ok"
        print(json.dumps(doc, indent=2))
        if signed.flagged:
            raise typer.Exit(1)
        return
    err_console.print(f"[{'dim' if signed.trust.pinned else 'yellow'}]{signed.trust.note}[/]")
    table = Table(
        "round",
        "run",
        "N",
        "W",
        "Δ",
        "z",
        "z eff.",
        "q",
        "ε recorded",
        "ε recomputed",
        title=f"{signed.name} {signed.version}: {result.entries} ledger entries, chain "
        f"intact, signed by {signed.trust.key_id[:16]}…",
    )
    for r in result.rounds:
        table.add_row(
            str(r.round),
            str(r.run_id),
            str(r.population),
            f"{r.expected_participants:g}",
            f"{r.sensitivity:g}",
            f"{r.noise_multiplier:g}",
            f"{r.effective_noise_multiplier:.4g}",
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
    if signed.flagged:
        summary.add_row(
            "verdict",
            f"[red]flagged[/]: the claim reproduces, but {len(flagged)} ledger entries follow "
            f"the newest signed release ({signed.covered_by}): " + "; ".join(flagged),
        )
    else:
        summary.add_row("verdict", "[green]ok[/]: every claim reproduces")
    console.print(summary)
    if signed.flagged:
        raise typer.Exit(1)


@audit_app.command("canary")
def audit_canary_cmd(
    release: Annotated[
        str | None,
        typer.Option(
            "--release",
            help="Audit the mechanism of this release (z, C, δ, q, rounds, accountant).",
        ),
    ] = None,
    registry: RegistryOpt = Path(DEFAULT_REGISTRY),
    name: Annotated[str | None, typer.Option(help="Release line (with --release).")] = None,
    canaries: Annotated[int, typer.Option(help="Canary institutions m.")] = 1000,
    dropouts: Annotated[int, typer.Option(help="Institutions that always fail.")] = 1000,
    rounds: Annotated[int, typer.Option(help="Rounds (without --release).")] = 2,
    noise_multiplier: Annotated[float, typer.Option("--noise-multiplier", "-z")] = 2.83,
    clip_norm: Annotated[float, typer.Option("--clip-norm", "-C")] = 1.0,
    delta: Annotated[float, typer.Option(help="δ of the claim.")] = 1e-5,
    sample_rate: Annotated[float, typer.Option(help="Poisson rate q (1: everyone).")] = 1.0,
    confidence: Annotated[float, typer.Option(help="Confidence of the test.")] = 0.95,
    seed: Annotated[
        int | None, typer.Option(help="Seed of canaries and enrolment (default: secret).")
    ] = None,
    seeded_bug: Annotated[
        SeededBug,
        typer.Option("--seeded-bug", help="Self-test: seed a bug into the coordinator path."),
    ] = SeededBug.none,
    empirical: Annotated[
        bool, typer.Option(help="Also compute the empirical ε (a few more seconds).")
    ] = True,
    fmt: Annotated[OutputFormat, typer.Option("--format")] = OutputFormat.table,
) -> None:
    """End-to-end canary audit: canary institutions through the real coordinator path.

    Runs the coordinator (sampling, clipping, noise, composition, ledger, publishing) into
    a scratch registry with canary institutions, reads only what it serves (each round's
    released model, every file) and tests the guesses against the claimed f-DP curve
    (Mahloujifar et al. 2024). Exits 2 when the released outputs falsify the claim.
    """
    import tempfile

    from fedcommons.engines.canary_audit import (
        PipelineAuditConfig,
        run_pipeline_audit,
        secret_seed,
    )
    from fedcommons.errors import PrivacyAuditError

    options: dict[str, object] = {}
    if release is not None:
        from fedcommons.releases.registry import Registry

        manifest = Registry(registry, create=False).get(release, name=name).manifest()
        central = manifest.privacy.get("central")
        if not central:
            raise PrivacyAuditError(f"release {release} has no central DP to audit")
        noise_multiplier = float(central["noise_multiplier"])
        clip_norm = float(central["clip_norm"])
        delta = float(central["delta"])
        sample_rate = float(central.get("sample_rate", 1.0))
        rounds = int(manifest.rounds)
        options = {
            "sampling": central["sampling"],
            "accountant": str(central["accountant"]).removeprefix("opacus-"),
            "task": manifest.task,
            "task_options": {"hidden": "64"} if manifest.task == "digits" else {},
        }
    cfg = PipelineAuditConfig(
        canaries=canaries,
        dropouts=dropouts,
        rounds=rounds,
        noise_multiplier=noise_multiplier,
        clip_norm=clip_norm,
        delta=delta,
        sample_rate=sample_rate,
        confidence=confidence,
        seed=secret_seed() if seed is None else seed,
        **options,  # type: ignore[arg-type]
    )
    bug = None if seeded_bug is SeededBug.none else seeded_bug.value
    with tempfile.TemporaryDirectory(prefix="fc-canary-") as work:
        result = run_pipeline_audit(
            cfg, seeded_bug=bug, workdir=Path(work), with_empirical_epsilon=empirical
        )
    if fmt is OutputFormat.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        table = Table(show_header=False, title="end-to-end canary audit (one run, f-DP)")
        for key, value in result.to_dict().items():
            table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
        console.print(table)
    if result.falsified:
        raise PrivacyAuditError(
            f"the released outputs falsify the claimed guarantee ε={result.claimed_epsilon:.3f} "
            f"at δ={result.delta:g} ({confidence:.0%} confidence; correct guesses "
            + ", ".join(f"{v}/{k}" for _, k, v in result.counts)
            + f"; empirical ε {result.empirical_epsilon:.3f})"
        )
