"""``fedcommons client receipt``: an institution's cumulative privacy spend, from its records."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from fedcommons.cli.common import OutputFormat, console


def receipt(
    state_dir: Annotated[
        Path | None,
        typer.Option("--state-dir", help="The site's state directory (its node config's)."),
    ] = None,
    site_id: Annotated[
        str | None, typer.Option("--site-id", help="The site-id of the node config.")
    ] = None,
    registry: Annotated[
        Path | None,
        typer.Option(
            "--registry", "-r", help="Check every recorded round against the line's ledger."
        ),
    ] = None,
    delta: Annotated[float | None, typer.Option(help="δ of the composed ε.")] = None,
    fmt: Annotated[OutputFormat, typer.Option("--format")] = OutputFormat.table,
) -> None:
    """Compose this institution's (ε, δ) over every line and run it contributed to.

    Reads only the site's own receipt log and DP-SGD accountant; with --registry, checks
    each recorded round against the line's public ledger and exits 2 on a mismatch.
    """
    from fedcommons.errors import PrivacyAuditError
    from fedcommons.privacy.receipts import compose_receipts, site_state_dir

    node_config: dict[str, object] = {}
    if state_dir is not None:
        node_config["state-dir"] = str(state_dir)
    if site_id is not None:
        node_config["site-id"] = site_id
    where = site_state_dir(node_config)
    result = compose_receipts(where, registry=registry, delta=delta)
    if fmt is OutputFormat.json:
        print(json.dumps(asdict(result), indent=2))
    else:
        table = Table(
            "line",
            "run",
            "rounds contributed",
            "z",
            "q",
            "rounds accounted",
            "source",
            title=f"privacy receipts of {where}",
        )
        for run in result.runs:
            table.add_row(
                run.line,
                run.run_tag,
                ", ".join(str(r) for r in sorted(set(run.rounds_contributed))),
                f"{run.noise_multiplier:g}",
                f"{run.sample_rate:.3g}",
                str(run.rounds_accounted),
                run.source,
            )
        console.print(table)
        summary = Table(show_header=False, title="cumulative guarantee")
        summary.add_row(
            "user-level ε (all lines, Opacus RDP)",
            f"{result.user_epsilon_rdp:.6f} at δ={result.delta:g}",
        )
        summary.add_row("recomputed (dp-accounting RDP)", f"{result.user_epsilon_recomputed:.6f}")
        for line, eps in result.per_line.items():
            summary.add_row(f"  line {line}", f"{eps:.6f}")
        if result.record_level:
            rl = result.record_level
            summary.add_row(
                "record-level ε (DP-SGD)",
                f"{rl['epsilon_recorded']:.6f} recorded, {rl['epsilon_recomputed']:.6f} "
                f"recomputed at δ={rl['delta']:g} ({rl['steps']} steps)",
            )
        console.print(summary)
    if result.mismatches:
        raise PrivacyAuditError(
            "the coordinator's claims do not match its ledger: " + "; ".join(result.mismatches)
        )
