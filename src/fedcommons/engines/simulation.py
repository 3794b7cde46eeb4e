"""Run the coordinator and N simulated institutions on Flower's simulation engine."""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from typing import Any

import torch

from fedcommons.client_sdk.site_tasks import ALLOWED_TASKS_ENV
from fedcommons.coordinator.config import RunConfig
from fedcommons.coordinator.prepare import prepare_run
from fedcommons.coordinator.run import FederationResult, RunObserver
from fedcommons.coordinator.server_app import make_server_app
from fedcommons.errors import ConfigError, FedcommonsError


def quiet_flower_env() -> None:
    """Environment defaults for Flower and Ray: no telemetry, no update checks."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_TMPDIR", os.path.join(tempfile.gettempdir(), "fedcommons-ray"))
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")


def run_simulation(
    config: RunConfig,
    num_institutions: int,
    *,
    observer: RunObserver | None = None,
    client_cpus: float = 1.0,
    verbose: bool = False,
) -> FederationResult:
    """Validate ``config``, then run it with ``num_institutions`` simulated SuperNodes.

    Every institution gets ``partition-id`` in ``[0, num_institutions)`` from Flower's
    simulation engine; the run publishes one release into ``config.registry``.
    Bad input raises before Ray starts, so nothing is half-written.
    """
    if num_institutions < 1:
        raise ConfigError(f"institutions must be >= 1, got {num_institutions}")
    config.task_options.setdefault("num-partitions", num_institutions)
    if int(config.task_options["num-partitions"]) != num_institutions:
        raise ConfigError("task.num-partitions must equal the number of institutions")
    # Rounds sample from the declared population: round 1 waits until every simulated
    # institution has registered (Flower starts the ServerApp before all SuperNodes are up).
    if not config.population:
        config.population = num_institutions
    if config.population > num_institutions:
        raise ConfigError(
            f"population ({config.population}) exceeds the {num_institutions} simulated "
            "institutions"
        )
    prepared = prepare_run(config)

    quiet_flower_env()
    # Each simulated client trains with one thread: the engine runs several at once.
    os.environ.setdefault("FEDCOMMONS_CLIENT_THREADS", "1")
    # The operator runs the simulated sites: they allow the run's task (site_tasks);
    # Ray's workers inherit this process's environment. Restored after the run.
    allowed = os.environ.get(ALLOWED_TASKS_ENV)
    os.environ[ALLOWED_TASKS_ENV] = ",".join(p for p in (allowed, config.task) if p)
    from flwr.simulation import run_simulation as flwr_run_simulation

    from fedcommons.client_sdk.client_app import app as client_app

    if not verbose:
        # Flower 1.41 marks its Python simulation API deprecated in favour of `flwr run`;
        # it is the one in-process entry that lets the CLI observe rounds, so keep it quiet.
        logging.getLogger("flwr").setLevel(logging.ERROR)
    gpus = 0.0
    if torch.cuda.is_available():
        gpus = min(1.0, max(0.1, torch.cuda.device_count() / max(num_institutions, 1)))
    backend_config: dict[str, Any] = {
        "client_resources": {"num_cpus": client_cpus, "num_gpus": gpus},
        "init_args": {
            "logging_level": "INFO" if verbose else "ERROR",
            "log_to_driver": verbose,
            "include_dashboard": False,
        },
    }
    results: list[FederationResult] = []
    server_app = make_server_app(config, observer=observer, prepared=prepared, results=results)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            flwr_run_simulation(
                server_app=server_app,
                client_app=client_app,
                num_supernodes=num_institutions,
                backend_config=backend_config,
                verbose_logging=verbose,
            )
        except RuntimeError as exc:
            cause = exc.__cause__ or exc.__context__
            if isinstance(cause, FedcommonsError):
                raise cause from None
            raise
        finally:
            if allowed is None:
                os.environ.pop(ALLOWED_TASKS_ENV, None)
            else:
                os.environ[ALLOWED_TASKS_ENV] = allowed
    if not results:
        raise FedcommonsError("the simulation ended without publishing a release")
    return results[0]
