"""The ``fedcommons`` command line (typer + rich)."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedcommons import __version__
from fedcommons.errors import FedcommonsError
from fedcommons.logs import configure_logging

app = typer.Typer(
    help="fedcommons: federated training, merging and signed community releases.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
release_app = typer.Typer(help="List and inspect published releases.", no_args_is_help=True)
coordinator_app = typer.Typer(
    help="Run the coordinator on Flower's deployment engine.", no_args_is_help=True
)
client_app = typer.Typer(help="Join a federation as an institution.", no_args_is_help=True)
app.add_typer(release_app, name="release")
app.add_typer(coordinator_app, name="coordinator")
app.add_typer(client_app, name="client")

console = Console()
err_console = Console(stderr=True)

DEFAULT_REGISTRY = os.environ.get("FEDCOMMONS_REGISTRY", "fedcommons-registry")
RegistryOpt = Annotated[
    Path, typer.Option("--registry", "-r", help="Registry directory (env FEDCOMMONS_REGISTRY).")
]
LogLevelOpt = Annotated[str, typer.Option("--log-level", help="DEBUG, INFO, WARNING or ERROR.")]


class OutputFormat(StrEnum):
    """Output formats of the read commands."""

    table = "table"
    json = "json"


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    if version:
        console.print(f"fedcommons {__version__}")
        raise typer.Exit()


# -- demo -------------------------------------------------------------------------------
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
        )
        self.progress.advance(self.task_id)


@app.command()
def demo(
    registry: RegistryOpt = Path(DEFAULT_REGISTRY),
    institutions: Annotated[int, typer.Option(help="Simulated institutions.")] = 10,
    rounds: Annotated[int, typer.Option(help="Federated rounds.")] = 10,
    alpha: Annotated[float, typer.Option(help="Dirichlet label-skew α (smaller: less IID).")] = 0.5,
    iid: Annotated[bool, typer.Option("--iid", help="IID split instead of Dirichlet.")] = False,
    clients_per_round: Annotated[int, typer.Option(help="Sampled per round (0: all).")] = 0,
    local_epochs: Annotated[int, typer.Option(help="Local epochs per round.")] = 5,
    lr: Annotated[float, typer.Option(help="Client learning rate.")] = 0.05,
    seed: Annotated[int, typer.Option(help="Seed of the split, init and sampling.")] = 0,
    task: Annotated[str, typer.Option(help="Task name or 'package.module:Class'.")] = "digits",
    strategy: Annotated[str, typer.Option(help="Aggregation strategy.")] = "fedavg",
    log_level: LogLevelOpt = "WARNING",
    verbose: Annotated[bool, typer.Option(help="Show Flower's and Ray's logs.")] = False,
) -> None:
    """Federate N simulated institutions on Flower's simulation engine and publish a release."""
    from fedcommons.coordinator.config import RunConfig
    from fedcommons.coordinator.simulation import run_simulation

    configure_logging(log_level)
    config = RunConfig(
        task=task,
        task_options={"partition": "iid" if iid else "dirichlet", "alpha": alpha, "seed": seed},
        strategy=strategy,
        rounds=rounds,
        clients_per_round=clients_per_round,
        min_clients=1,
        local_epochs=local_epochs,
        lr=lr,
        seed=seed,
        registry=str(registry),
    )
    split = "IID" if iid else f"Dirichlet α={alpha}"
    console.print(
        f"[bold]fedcommons demo[/]: {institutions} institutions, {rounds} rounds of "
        f"{strategy} on {task} ({split}), Flower simulation engine"
    )
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=True) as progress:
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


# -- release ----------------------------------------------------------------------------
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


# -- deployment engine ----------------------------------------------------------------
InsecureOpt = Annotated[
    bool, typer.Option("--insecure", help="Plain-text gRPC (development only; logs a warning).")
]
RootCertOpt = Annotated[
    Path | None, typer.Option("--root-cert", help="CA certificate the SuperLink's TLS chains to.")
]
RunConfigOpt = Annotated[
    list[str] | None,
    typer.Option("--run-config", "-c", help="key=value run-config setting (repeatable)."),
]


def parse_settings(items: list[str] | None) -> dict[str, object]:
    """Parse ``key=value`` items; values are JSON scalars when they parse, else strings."""
    from fedcommons.errors import ConfigError

    settings: dict[str, object] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"setting {item!r} is not key=value")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        if isinstance(value, list | dict) or value is None:
            value = raw
        settings[key.strip()] = value
    return settings


def _exec(argv: list[str]) -> None:
    import shutil

    exe = shutil.which(argv[0])
    if exe is None:
        raise FedcommonsError(f"{argv[0]!r} is not installed (it comes with flwr)")
    err_console.print("[dim]exec " + " ".join(argv) + "[/]")
    sys.stdout.flush()
    os.execv(exe, argv)


def _warn_insecure(insecure: bool, root_cert: Path | None) -> None:
    if insecure:
        configure_logging()
        from fedcommons.logs import get_logger

        get_logger("fedcommons.cli").warning(
            "insecure.transport", detail="TLS is off: use only on a trusted network"
        )
    elif root_cert is None:
        raise FedcommonsError("pass --root-cert CA.pem for TLS, or --insecure for development")


@coordinator_app.command("start")
def coordinator_start(
    host: Annotated[str, typer.Option(help="Address the SuperLink listens on.")] = "127.0.0.1",
    port: Annotated[
        int, typer.Option(help="One HTTP port for Fleet, Control and runtime APIs.")
    ] = 9093,
    database: Annotated[Path | None, typer.Option(help="SQLite file for durable state.")] = None,
    insecure: InsecureOpt = False,
    ssl_certfile: Annotated[Path | None, typer.Option(help="Server certificate (TLS).")] = None,
    ssl_keyfile: Annotated[Path | None, typer.Option(help="Server private key (TLS).")] = None,
    ssl_ca_certfile: Annotated[Path | None, typer.Option(help="CA certificate (TLS).")] = None,
) -> None:
    """Start the coordinator's SuperLink (``flower-superlink``); submit runs with ``submit``."""
    argv = [
        "flower-superlink",
        "--host",
        host,
        "--port",
        str(port),
        "--disable-runtime-dependency-installation",
    ]
    if database:
        argv += ["--database", str(database)]
    if insecure:
        _warn_insecure(True, None)
        argv.append("--insecure")
    else:
        if not (ssl_certfile and ssl_keyfile and ssl_ca_certfile):
            raise FedcommonsError(
                "TLS needs --ssl-certfile, --ssl-keyfile and --ssl-ca-certfile (or --insecure)"
            )
        argv += [
            "--ssl-certfile",
            str(ssl_certfile),
            "--ssl-keyfile",
            str(ssl_keyfile),
            "--ssl-ca-certfile",
            str(ssl_ca_certfile),
        ]
    _exec(argv)


@coordinator_app.command("app-dir")
def coordinator_app_dir(
    out: Annotated[Path, typer.Argument(help="Directory to write the Flower app into.")],
    run_config: RunConfigOpt = None,
) -> None:
    """Write the Flower app directory for ``flwr run`` (components + run-config defaults)."""
    from fedcommons.coordinator.deployment import write_flower_app

    console.print(str(write_flower_app(out, parse_settings(run_config))))


@coordinator_app.command("submit")
def coordinator_submit(
    superlink: Annotated[str, typer.Option(help="SuperLink address HOST:PORT.")] = "127.0.0.1:9093",
    run_config: RunConfigOpt = None,
    insecure: InsecureOpt = False,
    root_cert: RootCertOpt = None,
    connection: Annotated[
        str, typer.Option(help="Name of the flwr connection to write.")
    ] = "fedcommons",
    wait: Annotated[bool, typer.Option(help="Wait for the run to finish.")] = True,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the run.")] = 3600.0,
) -> None:
    """Submit a federation run to a SuperLink (``flwr run``) and report its outcome."""
    import tempfile

    from fedcommons.coordinator.deployment import submit_run, write_connection, write_flower_app

    _warn_insecure(insecure, root_cert)
    settings = parse_settings(run_config)
    registry = settings.get("registry")
    if isinstance(registry, str):  # the ServerApp runs elsewhere: make the path absolute
        settings["registry"] = str(Path(registry).expanduser().resolve())
    write_connection(connection, superlink, insecure=insecure, root_cert=root_cert)
    with tempfile.TemporaryDirectory(prefix="fedcommons-app-") as tmp:
        app_dir = write_flower_app(Path(tmp), settings)
        status = submit_run(app_dir, connection, wait=wait, timeout=timeout)
    console.print(json.dumps(status, indent=2))
    if wait and status.get("status") != "finished:completed":
        raise FedcommonsError(
            f"run {status['run-id']} ended {status.get('status')}: {status.get('status-details')}"
        )


@client_app.command("join")
def client_join(
    superlink: Annotated[str, typer.Option(help="Coordinator's SuperLink HOST:PORT.")],
    task: Annotated[str | None, typer.Option(help="Your Task: name or 'pkg.module:Class'.")] = None,
    node_config: Annotated[
        list[str] | None, typer.Option("--node-config", "-n", help="key=value (repeatable).")
    ] = None,
    insecure: InsecureOpt = False,
    root_cert: RootCertOpt = None,
    port: Annotated[int, typer.Option(help="Local port of this SuperNode's runtime API.")] = 9094,
) -> None:
    """Join a federation: run a SuperNode with the fedcommons ClientApp."""
    from fedcommons.tasks import resolve_task_class

    _warn_insecure(insecure, root_cert)
    settings = parse_settings(node_config)
    if task:
        resolve_task_class(task)  # fail here, not in the first round
        settings["task"] = task
    pairs = " ".join(
        f"{k}={json.dumps(v) if isinstance(v, str) else v}" for k, v in settings.items()
    )
    argv = ["flower-supernode", "--superlink", superlink, "--port", str(port)]
    if pairs:
        argv += ["--node-config", pairs]
    argv += ["--insecure"] if insecure else ["--root-certificates", str(root_cert)]
    _exec(argv)


def main() -> None:
    """Console-script entry point: typed errors become one red line and exit code 2."""
    try:
        app(standalone_mode=False)
    except FedcommonsError as exc:
        err_console.print(f"[bold red]error[/] ({type(exc).__name__}): {exc}")
        sys.exit(2)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        err_console.print("aborted")
        sys.exit(130)
    except Exception as exc:  # click usage errors arrive here in non-standalone mode
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise
