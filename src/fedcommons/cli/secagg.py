"""``fedcommons secagg ...``: plan a round, make keys and the roster for authentication.

See docs/secure-aggregation.md ("Authenticated key advertisements").
"""

from __future__ import annotations

import json
from pathlib import Path
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
    if result["distributed_dp"]:
        ddp = result["distributed_dp"]
        rows += [
            ("distributed DP: Skellam variance per client", f"{ddp['local_variance']:.4g}"),
            ("distributed DP: calibrated for contributors >=", str(ddp["min_contributors"])),
            ("distributed DP: sensitivity bound (integer L2)", f"{ddp['norm_bound']:.6g}"),
        ]
    if result["authenticated"]:
        rows.append(("key advertisements", "roster-signed (Ed25519)"))
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)


@secagg_app.command("keygen")
def keygen(
    out: Annotated[Path, typer.Option("--out", help="Where to write the private key (PEM).")],
) -> None:
    """Create an institution's (or the consortium's) Ed25519 signing key, mode 0600.

    Prints the public key (64 hex digits) to put in the consortium roster. Refuses to
    overwrite an existing file.
    """
    from fedcommons.privacy.secagg.roster import new_signing_key

    print(new_signing_key(out))


@secagg_app.command("roster")
def roster(
    consortium: Annotated[str, typer.Option(help="The consortium's name.")],
    member: Annotated[
        list[str],
        typer.Option("--member", "-m", help="name=PUBLIC_HEX of one institution (repeatable)."),
    ],
    out: Annotated[Path, typer.Option("--out", help="Roster file to write (JSON).")],
    sign_with: Annotated[
        Path | None,
        typer.Option(help="The consortium's Ed25519 key: sign the roster with it."),
    ] = None,
) -> None:
    """Write the consortium roster every institution holds (signed if --sign-with is given).

    Institutions point node config ``secagg-roster`` at it, ``secagg-signing-key`` at their
    own key, and optionally pin the consortium key with ``secagg-roster-signer``.
    """
    from fedcommons.errors import SecAggRosterError
    from fedcommons.privacy.secagg.roster import roster_document

    members: dict[str, str] = {}
    for item in member:
        name, sep, key = item.partition("=")
        if not sep or name in members:
            raise SecAggRosterError(f"--member {item!r}: expected a new name=PUBLIC_HEX")
        members[name.strip()] = key.strip()
    doc = roster_document(consortium, members, sign_with)
    out.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    console.print(
        f"roster of {consortium!r}: {len(members)} member(s)"
        + (", signed" if sign_with else ", unsigned")
        + f" -> {out}"
    )
