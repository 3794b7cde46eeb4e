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


def _check_exit(command: str, code: int) -> None:
    """Raise unless ``command`` ended cleanly or on SIGINT/SIGTERM (as a child or a shell)."""
    if code not in (0, -2, -15, 130, 143):
        raise FedcommonsError(f"{command} exited with code {code}")


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
    config: Annotated[
        Path | None, typer.Option("--config", help="coordinator.toml (settings file).")
    ] = None,
    host: Annotated[
        str | None,
        typer.Option(help="Address of the Fleet API, the one SuperNodes dial (e.g. 0.0.0.0)."),
    ] = None,
    port: Annotated[int | None, typer.Option(help="Port of the Fleet API.")] = None,
    control_port: Annotated[
        int | None,
        typer.Option(help="Loopback port of the Control and runtime APIs (default 9091)."),
    ] = None,
    operator_address: Annotated[
        str | None,
        typer.Option(
            help="Also serve the Control API on HOST:PORT, to clients with a TLS certificate "
            "signed by --operator-client-ca (default: the CA)."
        ),
    ] = None,
    operator_client_ca: Annotated[
        Path | None, typer.Option(help="CA of operator client certificates.")
    ] = None,
    database: Annotated[Path | None, typer.Option(help="SQLite file for durable state.")] = None,
    insecure: Annotated[
        bool | None,
        typer.Option("--insecure", help="Plain-text gRPC (development only; logs a warning)."),
    ] = None,
    ssl_certfile: Annotated[Path | None, typer.Option(help="Server certificate (TLS).")] = None,
    ssl_keyfile: Annotated[Path | None, typer.Option(help="Server private key (TLS).")] = None,
    ssl_ca_certfile: Annotated[Path | None, typer.Option(help="CA certificate (TLS).")] = None,
    allowlist: Annotated[
        list[Path] | None,
        typer.Option(help="Node public key (*.pub) or a directory of them (repeatable)."),
    ] = None,
    no_node_auth: Annotated[
        bool,
        typer.Option("--no-node-auth", help="Accept any SuperNode (logs a warning)."),
    ] = False,
    metrics_host: Annotated[
        str | None, typer.Option(help="Address of the Prometheus endpoint.")
    ] = None,
    metrics_port: Annotated[
        int | None, typer.Option(help="Port of the Prometheus endpoint (0: off).")
    ] = None,
    audit_log: Annotated[
        Path | None, typer.Option(help="Audit log file (default: <registry>/audit.jsonl).")
    ] = None,
    registry: Annotated[
        Path | None,
        typer.Option(help="Registry whose scheduled runs to submit (`fedcommons round`)."),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Check the settings, print the command, exit.")
    ] = False,
) -> None:
    """Start the coordinator: a SuperLink with TLS and SuperNode authentication.

    Only the Fleet API listens on --host/--port; the Control and runtime APIs listen on
    127.0.0.1:--control-port (submit runs and sync the allowlist from this host, or
    through --operator-address with client certificates). Settings come from --config
    (TOML), FEDCOMMONS_* environment variables and these options (highest). The
    allowlisted public keys are registered once the SuperLink is up; keys registered
    earlier but no longer listed are revoked.
    """
    from fedcommons.engines.superlink import (
        load_coordinator_settings,
        run_coordinator,
        service_argv,
    )
    from fedcommons.logs import get_logger

    settings = load_coordinator_settings(
        config,
        host=host,
        port=port,
        control_port=control_port,
        operator_address=operator_address,
        operator_client_ca=operator_client_ca,
        database=database,
        insecure=insecure,
        ssl_certfile=ssl_certfile,
        ssl_keyfile=ssl_keyfile,
        ssl_ca_certfile=ssl_ca_certfile,
        allowlist=allowlist,
        node_auth=False if no_node_auth else None,
        metrics_host=metrics_host,
        metrics_port=metrics_port,
        audit_log=audit_log,
        registry=registry,
    )
    configure_logging()
    logger = get_logger("fedcommons.cli")
    for warning in settings.check():
        logger.warning("coordinator.insecure_setting", detail=warning)
    if dry_run:
        console.print(" ".join(service_argv(settings)))
        return

    def ready(sync: object) -> None:
        logger.info(
            "coordinator.ready",
            address=settings.local_address,
            fleet=settings.fleet_address,
            operator=settings.operator_address,
            tls=not settings.insecure,
            node_auth=settings.node_auth_active,
            allowlist=None if sync is None else vars(sync),
        )

    code = run_coordinator(settings, on_ready=ready)
    _check_exit("flower-superlink", code)


@coordinator_app.command("allowlist-sync")
def coordinator_allowlist_sync(
    allowlist: Annotated[
        list[Path], typer.Argument(help="Node public keys (*.pub) or directories of them.")
    ],
    superlink: Annotated[
        str, typer.Option(help="The SuperLink's Control API HOST:PORT (loopback or operator).")
    ] = "127.0.0.1:9091",
    root_cert: RootCertOpt = None,
    keep_unlisted: Annotated[
        bool, typer.Option(help="Do not revoke registered nodes missing from the list.")
    ] = False,
    client_cert: Annotated[
        Path | None, typer.Option(help="Operator TLS certificate (for an operator address).")
    ] = None,
    client_key: Annotated[Path | None, typer.Option(help="Its private key.")] = None,
) -> None:
    """Register these node keys on a running SuperLink and revoke the others."""
    from fedcommons.engines.certs import allowlist_keys
    from fedcommons.engines.superlink import sync_allowlist

    if root_cert is None:
        raise FedcommonsError("node authentication needs TLS: pass --root-cert CA.pem")
    if (client_cert is None) != (client_key is None):
        raise FedcommonsError("pass both --client-cert and --client-key, or neither")
    result = sync_allowlist(
        superlink,
        allowlist_keys(allowlist),
        root_cert=root_cert,
        revoke_unlisted=not keep_unlisted,
        client_cert=(client_cert, client_key) if client_cert and client_key else None,
    )
    console.print(json.dumps(vars(result), indent=2))


@coordinator_app.command("app-dir")
def coordinator_app_dir(
    out: Annotated[Path, typer.Argument(help="Directory to write the Flower app into.")],
    run_config: RunConfigOpt = None,
) -> None:
    """Write the Flower app directory for ``flwr run`` (components + run-config defaults)."""
    from fedcommons.engines.submission import write_flower_app

    console.print(str(write_flower_app(out, parse_settings(run_config))))


@coordinator_app.command("submit")
def coordinator_submit(
    superlink: Annotated[
        str, typer.Option(help="The SuperLink's Control API HOST:PORT (on the coordinator host).")
    ] = "127.0.0.1:9091",
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

    from fedcommons.engines.submission import submit_run, write_connection, write_flower_app

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


@coordinator_app.command("audit-log")
def coordinator_audit_log(
    path: Annotated[Path, typer.Argument(help="Audit log (e.g. REGISTRY/audit.jsonl).")],
    last: Annotated[int, typer.Option(help="Show the last N records (0: none).")] = 20,
) -> None:
    """Verify the audit log's hash chain and show its last records."""
    from fedcommons.observability import audit_log

    count = audit_log.verify(path)
    records = list(audit_log.read(path))[-last:] if last > 0 else []
    for record in records:
        console.print(
            f"{record['timestamp']}  {record['actor']:<22} {record['action']:<16} "
            f"round={record.get('round')} release={record.get('release')} "
            f"-> {record['outcome']}"
        )
    console.print(f"{count} record(s), hash chain intact")


@client_app.command("join")
def client_join(
    superlink: Annotated[
        str | None,
        typer.Option("--coordinator", "--superlink", help="Coordinator's SuperLink HOST:PORT."),
    ] = None,
    task: Annotated[
        str | None,
        typer.Option(help="Your Task (name or 'pkg.module:Class'): it trains every round."),
    ] = None,
    allow_task: Annotated[
        list[str] | None,
        typer.Option(
            "--allow-task",
            help="A task name a round may ask for (repeatable; built-in and installed "
            "tasks are allowed already). Rounds asking for any other task are refused.",
        ),
    ] = None,
    node_config: Annotated[
        list[str] | None, typer.Option("--node-config", "-n", help="key=value (repeatable).")
    ] = None,
    insecure: InsecureOpt = False,
    root_cert: RootCertOpt = None,
    key: Annotated[
        Path | None,
        typer.Option("--key", help="This node's private key (OpenSSH ECDSA); stays here."),
    ] = None,
    no_node_auth: Annotated[
        bool,
        typer.Option("--no-node-auth", help="Join without a node key (logs a warning)."),
    ] = False,
    host: Annotated[str, typer.Option(help="Local address of the runtime API.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Local port of this SuperNode's runtime API.")] = 9094,
    max_wait_time: Annotated[
        float | None, typer.Option(help="Give up connecting after this many seconds.")
    ] = None,
    mode: Annotated[
        str,
        typer.Option(
            "--mode",
            envvar="FEDCOMMONS_CLIENT_MODE",
            help="ClientApp processes: 'warm' (one long-lived worker, default) or "
            "'subprocess' (Flower's default: a fresh process per message).",
        ),
    ] = "warm",
) -> None:
    """Join a federation: run a SuperNode with the fedcommons ClientApp.

    TLS (--root-cert) and node authentication (--key) are on by default. In the default
    'warm' mode a long-lived worker serves every round (SuperNode --isolation process);
    'subprocess' starts a fresh ClientApp process per message (see docs/operations.md).
    """
    from fedcommons.client_sdk.node import check_mode

    check_mode(mode)
    from fedcommons.engines.certs import check_node_private_key, check_pem_certificate
    from fedcommons.tasks import resolve_task_class

    if not superlink:
        raise FedcommonsError("pass --coordinator HOST:PORT (the coordinator's SuperLink)")
    _warn_insecure(insecure, root_cert)
    if not insecure:
        check_pem_certificate(root_cert, "root certificate")  # type: ignore[arg-type]
        if key is not None:
            check_node_private_key(key)
        elif no_node_auth:
            from fedcommons.logs import get_logger

            get_logger("fedcommons.cli").warning(
                "insecure.node_auth", detail="joining without a node key (--no-node-auth)"
            )
        else:
            raise FedcommonsError(
                "pass --key NODE.key (node authentication; create one with "
                "'fedcommons certs node NAME'), or --no-node-auth"
            )
    elif key is not None:
        raise FedcommonsError(
            "--key needs TLS: node authentication is not possible with --insecure"
        )
    settings = parse_settings(node_config)
    from fedcommons.privacy.client_dp import ClientDPConfig

    ClientDPConfig.from_node_config(settings)  # a bad DP budget fails here, not in round 1
    if task:
        resolve_task_class(task)  # fail here, not in the first round
        settings["task"] = task
    if allow_task:
        from fedcommons.client_sdk.site_tasks import ALLOWED_TASKS_KEY

        settings[ALLOWED_TASKS_KEY] = ",".join(allow_task)
    if mode == "subprocess":
        configure_logging()
        from fedcommons.logs import get_logger

        get_logger("fedcommons.cli").warning(
            "client.subprocess_mode",
            detail="subprocess mode runs the ClientApp the run's app bundle names, including "
            "code it ships: join in the default warm mode unless you trust whoever submits runs",
        )
    from fedcommons.client_sdk.node import run_node, supernode_argv, worker_argv

    argv = supernode_argv(
        superlink,
        mode=mode,
        host=host,
        port=port,
        node_config=settings,
        insecure=insecure,
        root_cert=root_cert,
        key=key,
        max_wait_time=max_wait_time,
    )
    if mode == "subprocess":
        _exec(argv)  # Flower's own process model: nothing of ours stays running
        return
    err_console.print("[dim]run " + " ".join(argv) + " + warm ClientApp worker[/]")
    worker = worker_argv(
        host=host, port=port, task=task, node_config=settings, parent_pid=os.getpid()
    )
    code = run_node(argv, worker)
    _check_exit("flower-supernode", code)
