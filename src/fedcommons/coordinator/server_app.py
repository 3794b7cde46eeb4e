"""The coordinator's Flower ``ServerApp`` (``fedcommons.coordinator.server_app:app``).

On the deployment engine ``flwr run`` starts it with the run config of the Flower app
(``[tool.flwr.app.config]`` plus ``--run-config`` overrides). The simulation runner
builds one with :func:`make_server_app` to attach a progress observer.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedcommons.coordinator.config import RunConfig
from fedcommons.coordinator.prepare import PreparedRun
from fedcommons.coordinator.run import FederationResult, RunObserver, run_federation
from fedcommons.logs import configure_logging

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Parse the run config and run the federation."""
    configure_logging()
    run_federation(grid, RunConfig.from_flat(context.run_config), run_id=context.run_id)


def make_server_app(
    config: RunConfig,
    *,
    observer: RunObserver | None = None,
    prepared: PreparedRun | None = None,
    results: list[FederationResult] | None = None,
) -> ServerApp:
    """A ServerApp bound to ``config`` (for in-process engines such as the simulation)."""
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        result = run_federation(
            grid, config, run_id=context.run_id, observer=observer, prepared=prepared
        )
        if results is not None:
            results.append(result)

    return server_app
