"""``fedcommons certs ...``: a development CA, the SuperLink's certificate, node keys."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedcommons.cli.common import console

certs_app = typer.Typer(
    help="Development certificates and node keys (production operators bring their own).",
    no_args_is_help=True,
)

DirOpt = Annotated[Path, typer.Option("--dir", "-d", help="Directory of the CA and keys.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace existing files.")]


@certs_app.command("ca")
def certs_ca(
    out: DirOpt = Path("certs"),
    days: Annotated[int, typer.Option(help="Validity in days.")] = 825,
    force: ForceOpt = False,
) -> None:
    """Create a development CA (ca.pem, ca.key)."""
    from fedcommons.engines.certs import create_ca

    cert, key = create_ca(out, days=days, overwrite=force)
    console.print(f"CA certificate {cert}\nCA key         {key} (keep it private)")


@certs_app.command("server")
def certs_server(
    out: DirOpt = Path("certs"),
    host: Annotated[
        list[str] | None,
        typer.Option("--host", help="Extra DNS name or IP of the SuperLink (repeatable)."),
    ] = None,
    days: Annotated[int, typer.Option(help="Validity in days.")] = 397,
    force: ForceOpt = False,
) -> None:
    """Sign the SuperLink's certificate (SANs: localhost, 127.0.0.1 and each --host)."""
    from fedcommons.engines.certs import create_server_cert, server_cert_hosts

    cert, key = create_server_cert(out, host or [], days=days, overwrite=force)
    console.print(f"server certificate {cert} for {', '.join(server_cert_hosts(cert))}")
    console.print(f"server key         {key}")


@certs_app.command("node")
def certs_node(
    names: Annotated[list[str], typer.Argument(help="Node names, e.g. hospital-a.")],
    out: Annotated[
        Path, typer.Option("--dir", "-d", help="Directory for NAME.key / NAME.pub.")
    ] = Path("certs/nodes"),
    force: ForceOpt = False,
) -> None:
    """Create SuperNode key pairs (OpenSSH ECDSA P-384) for node authentication."""
    from fedcommons.engines.certs import create_node_keys

    for name in names:
        pair = create_node_keys(out, name, overwrite=force)
        console.print(
            f"{name}: {pair.private_key} (stays at the site), {pair.public_key} "
            f"(goes to the allowlist) {pair.fingerprint}"
        )


@certs_app.command("operator")
def certs_operator(
    name: Annotated[str, typer.Argument(help="Operator name, e.g. alice.")],
    out: DirOpt = Path("certs"),
    days: Annotated[int, typer.Option(help="Validity in days.")] = 397,
    force: ForceOpt = False,
) -> None:
    """Sign an operator's TLS client certificate (for the coordinator's --operator-address)."""
    from fedcommons.engines.certs import create_operator_cert

    cert, key = create_operator_cert(out, name, days=days, overwrite=force)
    console.print(f"operator certificate {cert}")
    console.print(f"operator key         {key} (keep it private)")


@certs_app.command("dev")
def certs_dev(
    out: DirOpt = Path("certs"),
    nodes: Annotated[int, typer.Option(help="Number of node key pairs (node-1 ...).")] = 3,
    host: Annotated[
        list[str] | None,
        typer.Option("--host", help="Extra DNS name or IP of the SuperLink (repeatable)."),
    ] = None,
    force: ForceOpt = False,
) -> None:
    """All at once: CA, server certificate and ``nodes`` node key pairs under --dir."""
    from fedcommons.engines.certs import create_ca, create_node_keys, create_server_cert
    from fedcommons.errors import CertificateError

    if nodes < 0:
        raise CertificateError(f"--nodes must be >= 0, got {nodes}")
    create_ca(out, overwrite=force)
    create_server_cert(out, host or [], overwrite=force)
    for i in range(1, nodes + 1):
        create_node_keys(out / "nodes", f"node-{i}", overwrite=force)
    console.print(
        f"{out}/ca.pem ca.key server.pem server.key; {nodes} node key pair(s) in {out}/nodes"
    )
