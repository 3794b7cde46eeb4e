"""The ``fedcommons`` command line (typer + rich).

One module per command group; register a new group here with ``app.add_typer``.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from fedcommons import __version__
from fedcommons.cli.audit import audit_app
from fedcommons.cli.certs import certs_app
from fedcommons.cli.common import console, err_console
from fedcommons.cli.demo import demo
from fedcommons.cli.deploy import client_app, coordinator_app
from fedcommons.cli.receipt import receipt
from fedcommons.cli.release import release_app
from fedcommons.cli.rounds import round_app
from fedcommons.cli.secagg import secagg_app
from fedcommons.cli.strategies import merge, strategies_app
from fedcommons.errors import FedcommonsError

app = typer.Typer(
    help="fedcommons: federated training, merging and signed community releases.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command()(demo)
app.add_typer(release_app, name="release")
app.add_typer(coordinator_app, name="coordinator")
client_app.command("receipt")(receipt)
app.add_typer(client_app, name="client")
app.add_typer(audit_app, name="audit")
app.add_typer(strategies_app, name="strategies")
app.command("merge")(merge)
app.add_typer(certs_app, name="certs")
app.add_typer(round_app, name="round")
app.add_typer(secagg_app, name="secagg")


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    if version:
        console.print(f"fedcommons {__version__}")
        raise typer.Exit()


def main() -> None:
    """Console-script entry point: typed errors become one red line and exit code 2.

    In click's non-standalone mode a command that raises ``typer.Exit(code)`` does not
    raise out of ``app()``: click *returns* the code. It is passed on to ``sys.exit``
    here, so a command that reports a failure exits non-zero.
    """
    try:
        code = app(standalone_mode=False)
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
    if isinstance(code, int) and not isinstance(code, bool) and code != 0:
        sys.exit(code)
