"""``fedcommons secagg ...``: plan a secure-aggregation round before running it."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from fedcommons.cli.common import OutputFormat, console, parse_settings

secagg_app = typer.Typer(
    help="Secure aggregation (SecAgg+). See docs/secure-aggregation.md.",
    no_args_is_help=True,
)


@secagg_app.command("plan")
def plan(
    clients: Annotated[int, typer.Option(help="Clients sampled per round.")],
    params: Annotated[int, typer.Option(help="Parameters of the model.")],
    setting: Annotated[
        list[str] | None,
        typer.Option(
            "--config",
            "-c",
            help="Run-config key=value (repeatable), e.g. -c secagg-num-shares=15 "
            "-c compression=int8 -c dp.clip-norm=0.5.",
        ),
    ] = None,
    output: Annotated[OutputFormat, typer.Option("--format", help="table or json.")] = (
        OutputFormat.table
    ),
) -> None:
    """Graph, threshold, ring size, quantization step and bytes per client of one round.

    Refused combinations (a strategy or compression that needs individual updates, an
    unsafe threshold, a ring over 64 bits) end with the reason and exit code 2.
    """
    from fedcommons.coordinator.config import RunConfig
    from fedcommons.coordinator.secure_round import plan_round

    flat: dict[str, object] = {"secagg": True, **parse_settings(setting)}
    result = plan_round(RunConfig.from_flat(flat), clients, params)
    if output == OutputFormat.json:
        console.print_json(json.dumps(result))
        return
    table = Table(title=f"SecAgg+ round: {clients} clients x {params:,} parameters")
    table.add_column("")
    table.add_column("value", justify="right")
    rows = [
        ("neighbours (k)", f"{result['neighbours']}"),
        ("shares / threshold", f"{result['shares']} / {result['threshold']}"),
        ("dropouts tolerated per neighbourhood", str(result["shares"] - result["threshold"])),
        ("coordinates sent", f"{result['coordinates_sent']:,}"),
        ("ring bits", f"{result['ring_bits']}"),
        ("quantization step", f"{result['quantization_step']:.3g}"),
        ("upload per client (B)", f"{result['upload_total']:,}"),
        ("download per client (B, without the model)", f"{result['download_total']:,}"),
        ("upload / dense fp32", f"{result['upload_vs_dense_fp32']:.3f}"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)
