"""``fedcommons round ...``: schedule federation runs, watch them, cancel them."""

from __future__ import annotations

import getpass
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from fedcommons.cli.common import (
    DEFAULT_REGISTRY,
    OutputFormat,
    RegistryOpt,
    console,
    parse_settings,
)
from fedcommons.errors import ConfigError

round_app = typer.Typer(
    help="Schedule federation runs, show their progress, cancel them.", no_args_is_help=True
)

KVOpt = Annotated[list[str] | None, typer.Option(help="key=value (repeatable).")]


def _operator() -> str:
    try:
        return f"operator:{getpass.getuser()}"
    except (KeyError, OSError):
        return "operator"


def _audit(registry: Path, action: str, outcome: str, details: dict[str, object]) -> None:
    from fedcommons.observability.audit_log import AuditLog, default_path

    AuditLog(default_path(registry)).record(action, outcome, actor=_operator(), details=details)


def _start_at(text: str | None) -> str:
    if not text:
        return ""
    try:
        when = datetime.fromisoformat(text)
    except ValueError as exc:
        raise ConfigError(f"--start-at {text!r} is not an ISO 8601 time") from exc
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.astimezone(UTC).isoformat(timespec="seconds")


@round_app.command("schedule")
def schedule(
    registry: RegistryOpt = Path(DEFAULT_REGISTRY),
    name: Annotated[
        str | None, typer.Option("--name", help="Run name (default: <line>-<time>-<hex>).")
    ] = None,
    base_release: Annotated[
        str | None, typer.Option(help="Release to start from (version or @alias).")
    ] = None,
    strategy: Annotated[str | None, typer.Option(help="Aggregator (fedavg, fisher, ...).")] = None,
    strategy_param: Annotated[
        list[str] | None, typer.Option("--strategy-param", "-p", help="name=value (repeatable).")
    ] = None,
    rounds: Annotated[int | None, typer.Option(help="Federated rounds.")] = None,
    clients_per_round: Annotated[
        int | None, typer.Option(help="Nodes sampled per round (0: all).")
    ] = None,
    min_clients: Annotated[
        int | None, typer.Option(help="Valid replies a round needs by its deadline.")
    ] = None,
    deadline: Annotated[
        float | None, typer.Option(help="Seconds a round waits for replies (round-timeout).")
    ] = None,
    on_round_failure: Annotated[
        str | None, typer.Option(help="A round short of min-clients: abort or retry.")
    ] = None,
    round_retries: Annotated[
        int | None, typer.Option(help="Re-sampled attempts per round with retry.")
    ] = None,
    compression: Annotated[
        str | None, typer.Option(help="Update encoding (int8, topk:0.01+int8, ...).")
    ] = None,
    dp: Annotated[
        list[str] | None, typer.Option("--dp", help="Central DP key=value (noise-multiplier=1).")
    ] = None,
    start_at: Annotated[
        str | None, typer.Option(help="Earliest start, ISO 8601 (default: now; naive = UTC).")
    ] = None,
    run_config: Annotated[
        list[str] | None,
        typer.Option("--run-config", "-c", help="Any other run-config key=value (repeatable)."),
    ] = None,
    output: Annotated[OutputFormat, typer.Option("--format", help="table or json.")] = (
        OutputFormat.table
    ),
) -> None:
    """Schedule a run in the registry; `coordinator start --registry` submits it when due.

    Everything is checked now (task, strategy and its parameters, base release, DP
    budget, signing key), before anything is stored.
    """
    from fedcommons.coordinator.config import RunConfig
    from fedcommons.coordinator.prepare import prepare_run
    from fedcommons.coordinator.runs import RunStore
    from fedcommons.engines.submission import app_run_config

    flat: dict[str, object] = dict(parse_settings(run_config))
    given = {
        "rounds": rounds,
        "strategy": strategy,
        "base-release": base_release,
        "clients-per-round": clients_per_round,
        "min-clients": min_clients,
        "round-timeout": deadline,
        "on-round-failure": on_round_failure,
        "round-retries": round_retries,
        "compression": compression,
        "run-name": name,
    }
    flat.update({k: v for k, v in given.items() if v is not None})
    flat.update({f"strategy.{k}": v for k, v in parse_settings(strategy_param).items()})
    flat.update({f"dp.{k}": v for k, v in parse_settings(dp).items()})
    flat["registry"] = str(Path(registry).expanduser().resolve())
    # exactly what the ServerApp will be started with (the Flower app's run config)
    config = RunConfig.from_flat(app_run_config(flat))
    prepare_run(config)  # task, strategy, base release, signing key, DP plan: fail now
    store = RunStore(config.registry_path, create=True)
    record = store.schedule(config, not_before=_start_at(start_at))
    _audit(
        config.registry_path,
        "run.schedule",
        "scheduled",
        {"run_name": record.name, "not_before": record.not_before, "rounds": record.rounds},
    )
    _print([record], output)


@round_app.command("status")
def status(
    name: Annotated[str | None, typer.Argument(help="One run (default: every run).")] = None,
    registry: RegistryOpt = Path(DEFAULT_REGISTRY),
    output: Annotated[OutputFormat, typer.Option("--format", help="table or json.")] = (
        OutputFormat.table
    ),
    rounds: Annotated[
        bool, typer.Option("--rounds", help="With NAME: also each committed round.")
    ] = False,
) -> None:
    """Show runs: scheduled, running (committed round k of n), finished, failed, cancelled."""
    from fedcommons.coordinator.runs import RunStore

    store = RunStore(registry, create=False)
    records = [store.get(name)] if name else store.list()
    if name and rounds:
        commits = store.rounds(name)
        if output is OutputFormat.json:
            out = records[0].to_dict()
            out["committed_rounds"] = [
                {
                    "round": c.round,
                    "committed": c.committed,
                    "attempts": c.attempts,
                    "accepted": c.report.get("accepted"),
                    "val_accuracy": c.report.get("val_accuracy"),
                    "ledger_seq": c.ledger_seq,
                    "flower_run_id": c.flower_run_id,
                }
                for c in commits
            ]
            console.print_json(json.dumps(out))
            return
        _print(records, output)
        table = Table(
            "round", "committed", "attempts", "accepted", "val acc", "ledger", "flower run"
        )
        for c in commits:
            table.add_row(
                str(c.round),
                c.committed,
                str(c.attempts),
                str(c.report.get("accepted")),
                f"{c.report.get('val_accuracy', float('nan')):.4f}",
                "-" if c.ledger_seq is None else f"#{c.ledger_seq}",
                str(c.flower_run_id),
            )
        console.print(table)
        return
    _print(records, output)


@round_app.command("cancel")
def cancel(
    name: Annotated[str, typer.Argument(help="The run to cancel.")],
    registry: RegistryOpt = Path(DEFAULT_REGISTRY),
) -> None:
    """Cancel a run: a scheduled one at once; a running one after its current round commits.

    A cancelled run publishes nothing and cannot be resumed; its committed rounds stay
    in `round status --rounds` and the privacy ledger.
    """
    from fedcommons.coordinator.runs import RunStore

    store = RunStore(registry, create=False)
    record = store.request_cancel(name)
    _audit(
        store.root,
        "run.cancel",
        "requested" if record.state == "running" else "cancelled",
        {"run_name": name, "committed_round": record.committed_round},
    )
    if record.state == "running":
        console.print(
            f"run {name}: cancel requested; it stops after committing round "
            f"{record.committed_round + 1} at the latest (nothing is published)"
        )
    else:
        console.print(f"run {name}: cancelled")


def _print(records: list, output: OutputFormat) -> None:
    if output is OutputFormat.json:
        console.print_json(json.dumps([r.to_dict() for r in records]))
        return
    table = Table("run", "line", "state", "progress", "strategy", "base", "start at", "updated")
    for r in records:
        cfg = r.config
        table.add_row(
            r.name,
            r.line,
            r.state,
            r.progress + (f" — {r.error}" if r.error and r.state != "finished" else ""),
            str(cfg.get("strategy", "")),
            str(cfg.get("base-release", "") or "-"),
            r.not_before or "-",
            r.updated,
        )
    console.print(table)
