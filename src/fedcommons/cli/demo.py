"""``fedcommons demo``: the embedded default, Flower simulation plus a local release."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import Progress

from fedcommons.cli.common import (
    DEFAULT_REGISTRY,
    LogLevelOpt,
    RegistryOpt,
    console,
    progress_columns,
)
from fedcommons.logs import configure_logging

#: What ``fedcommons demo`` runs unless told otherwise; a task class's ``demo_defaults``
#: overrides entries (text tasks: fewer rounds, AdamW's learning rate, int8 LoRA patches).
DIGITS_DEFAULTS: dict[str, Any] = {
    "rounds": 10,
    "local_epochs": 5,
    "lr": 0.05,
    "batch_size": 16,
    "strategy": "fedavg",
    "compression": "dense",
    "error_feedback": True,
    "partition": "dirichlet",
    "alpha": 0.5,
    "task_options": {},
}


class _DemoDisplay:
    """Progress bar plus one line per round (a RunObserver)."""

    def __init__(self, progress: Progress, task_id: int, rounds: int) -> None:
        self.progress, self.task_id, self.rounds = progress, task_id, rounds

    def on_start(self, config: object, run_id: int) -> None:
        self.progress.update(self.task_id, description="federating")

    def on_round(self, report: object) -> None:
        r = report  # RoundReport
        rejected = sum(r.rejected.values()) + r.timed_out  # type: ignore[attr-defined]
        self.progress.console.print(
            f"round {r.round:>3}/{self.rounds}  val accuracy [bold]{r.val_accuracy:.4f}[/]  "  # type: ignore[attr-defined]
            f"val loss {r.val_loss:.4f}  clients {r.accepted}/{r.sampled}"  # type: ignore[attr-defined]
            + (f"  rejected {rejected}" if rejected else "")
            + f"  {r.seconds:.2f}s"  # type: ignore[attr-defined]
            + _upload_text(r)
        )
        self.progress.advance(self.task_id)


def _upload_text(report: object) -> str:
    """``  upload 190 B/client (101x less than dense fp32)`` for compressed rounds."""
    sizes = getattr(report, "upload_bytes", {}) or {}
    if not sizes:
        return ""
    mean = sum(sizes.values()) / len(sizes)
    return f"  upload {mean:,.0f} B/client ({getattr(report, 'ratio_vs_dense', 1.0):.1f}x)"


def demo(
    registry: RegistryOpt = Path(DEFAULT_REGISTRY),
    institutions: Annotated[int, typer.Option(help="Simulated institutions.")] = 10,
    rounds: Annotated[
        int | None, typer.Option(help="Federated rounds [default: 10; text tasks 3].")
    ] = None,
    alpha: Annotated[
        float | None,
        typer.Option(
            help="Dirichlet label-skew α (smaller: less IID) [default: 0.5; rotten-tomatoes "
            "splits by movie unless α is given]."
        ),
    ] = None,
    iid: Annotated[bool, typer.Option("--iid", help="IID split instead of Dirichlet.")] = False,
    clients_per_round: Annotated[int, typer.Option(help="Sampled per round (0: all).")] = 0,
    local_epochs: Annotated[
        int | None, typer.Option(help="Local epochs per round [default: 5; text tasks 1].")
    ] = None,
    lr: Annotated[
        float | None, typer.Option(help="Client learning rate [default: 0.05; text 0.002].")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the split, init and sampling.")] = 0,
    task: Annotated[
        str,
        typer.Option(
            help="Task name (digits, rotten-tomatoes, bbc-news) or 'package.module:Class'."
        ),
    ] = "digits",
    task_option: Annotated[
        list[str] | None,
        typer.Option(
            "--task-option",
            "-o",
            help="Task option key=value (repeatable), e.g. -o adapter=head -o max-train=2000.",
        ),
    ] = None,
    strategy: Annotated[
        str | None, typer.Option(help="Aggregation strategy [default: fedavg; text lora-exact].")
    ] = None,
    strategy_param: Annotated[
        list[str] | None,
        typer.Option(
            "--strategy-param",
            "-p",
            help="Strategy parameter key=value (repeatable), as in `merge`; checked before "
            "round 1 (`fedcommons strategies list` shows each strategy's parameters).",
        ),
    ] = None,
    dp: Annotated[
        list[str] | None,
        typer.Option(
            "--dp",
            help="Central DP-FedAvg option key=value (repeatable): noise-multiplier, "
            "clip-norm, epsilon, delta[, sampling, accountant]. See docs/privacy.md.",
        ),
    ] = None,
    compression: Annotated[
        str | None,
        typer.Option(
            help="Update compression, e.g. topk:0.01+int8, int4, fish:0.02+int8 "
            "[default: dense; text tasks int8]."
        ),
    ] = None,
    error_feedback: Annotated[
        bool | None,
        typer.Option(
            help="Clients carry what compression dropped into the next round "
            "[default: on; text tasks off]."
        ),
    ] = None,
    secagg: Annotated[
        bool,
        typer.Option(
            help="Secure aggregation (SecAgg+): the coordinator sees only the sum of the "
            "updates. See docs/secure-aggregation.md."
        ),
    ] = False,
    mlflow_tracking_uri: Annotated[
        str,
        typer.Option(
            "--mlflow-tracking-uri",
            help="Mirror the run and its release into MLflow (e.g. sqlite:///mlflow.db); "
            "needs the mlflow extra.",
        ),
    ] = "",
    secagg_consortium: Annotated[
        Path | None,
        typer.Option(
            help="With --secagg: authenticated key advertisements. Creates (or reuses) one "
            "Ed25519 key per simulated institution and their roster in this directory; "
            "every institution signs its keys and checks its neighbours'."
        ),
    ] = None,
    first_release: Annotated[
        str,
        typer.Option(
            "--first-release",
            help="beat-start: a line's first release must beat the starting weights (the "
            "gate); record: score and record that comparison without enforcing it.",
        ),
    ] = "beat-start",
    log_level: LogLevelOpt = "WARNING",
    verbose: Annotated[bool, typer.Option(help="Show Flower's and Ray's logs.")] = False,
) -> None:
    """Federate N simulated institutions on Flower's simulation engine and publish a release."""
    from fedcommons.cli.common import parse_settings
    from fedcommons.coordinator.config import RunConfig
    from fedcommons.engines.simulation import run_simulation
    from fedcommons.tasks import resolve_task_class

    configure_logging(log_level)
    defaults = {**DIGITS_DEFAULTS, **getattr(resolve_task_class(task), "demo_defaults", {})}
    options: dict[str, object] = {**defaults["task_options"], "seed": seed}
    if iid:
        options["partition"] = "iid"
    elif alpha is not None or defaults["partition"] == "dirichlet":
        options.update(partition="dirichlet", alpha=defaults["alpha"] if alpha is None else alpha)
    options.update(parse_settings(task_option))
    if secagg_consortium is not None:
        import os

        from fedcommons.client_sdk.secagg import SITE_ENV
        from fedcommons.errors import ConfigError
        from fedcommons.privacy.secagg.roster import simulated_consortium
        from fedcommons.wire import keys

        if not secagg:
            raise ConfigError("--secagg-consortium authenticates SecAgg+ keys: add --secagg")
        roster_path = simulated_consortium(secagg_consortium, institutions)
        os.environ[SITE_ENV[keys.SECAGG_ROSTER]] = str(roster_path)
        os.environ[SITE_ENV[keys.SECAGG_SIGNING_KEY]] = str(
            roster_path.parent / "site-{partition-id}.pem"
        )
    config = RunConfig(
        task=task,
        task_options=options,
        strategy=defaults["strategy"] if strategy is None else strategy,
        strategy_params=parse_settings(strategy_param),
        rounds=defaults["rounds"] if rounds is None else rounds,
        clients_per_round=clients_per_round,
        min_clients=1,
        local_epochs=defaults["local_epochs"] if local_epochs is None else local_epochs,
        lr=defaults["lr"] if lr is None else lr,
        batch_size=defaults["batch_size"],
        seed=seed,
        registry=str(registry),
        dp_params=parse_settings(dp),
        compression=defaults["compression"] if compression is None else compression,
        error_feedback=defaults["error_feedback"] if error_feedback is None else error_feedback,
        secagg=secagg,
        mlflow_tracking_uri=mlflow_tracking_uri,
        secagg_auth="roster" if secagg_consortium is not None else "none",
        gate_first_release=first_release,
    )
    strategy, rounds = config.strategy, config.rounds
    partition = str(options.get("partition", "the task's default"))
    split = {"iid": "IID", "dirichlet": f"Dirichlet α={options.get('alpha')}"}.get(
        partition, f"split by {partition}"
    )
    console.print(
        f"[bold]fedcommons demo[/]: {institutions} institutions, {rounds} rounds of "
        f"{strategy} on {task} ({split}), Flower simulation engine"
        + (f", updates {config.compression}" if config.compression != "dense" else "")
        + (", secure aggregation (SecAgg+)" if secagg else "")
        + (", roster-signed keys" if secagg_consortium is not None else "")
    )
    with Progress(*progress_columns(), console=console, transient=True) as progress:
        task_id = progress.add_task("starting Flower simulation", total=rounds)
        result = run_simulation(
            config,
            institutions,
            observer=_DemoDisplay(progress, task_id, rounds),
            verbose=verbose,
        )
    rel = result.release
    console.print(
        f"[bold green]published[/] {rel.name} [bold]{rel.version}[/]  "
        f"test accuracy [bold]{result.test_metrics.get('accuracy', float('nan')):.4f}[/]\n"
        f"  manifest {rel.manifest_path}\n"
        f"  weights  {rel.weights_path}\n"
        f"  sha256   {rel.weights_sha256}"
    )
    if guarantee := rel.manifest().privacy.get("guarantee"):
        console.print(f"  privacy  {guarantee}")
