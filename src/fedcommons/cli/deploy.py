"""``fedcommons coordinator ...`` and ``fedcommons client ...``: Flower's deployment engine."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from fedcommons.cli.common import console, err_console, parse_settings
from fedcommons.errors import FedcommonsError
from fedcommons.logs import configure_logging

coordinator_app = typer.Typer(
    help="Run the coordinator on Flower's deployment engine.", no_args_is_help=True
)
client_app = typer.Typer(help="Join a federation as an institution.", no_args_is_help=True)


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
    from fedcommons.privacy.client_dp import ClientDPConfig

    ClientDPConfig.from_node_config(settings)  # a bad DP budget fails here, not in round 1
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
