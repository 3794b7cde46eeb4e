"""Flower deployment engine glue: the Flower app directory, connections, run submission.

The coordinator side is a ``flower-superlink`` plus our ``ServerApp``; each institution
runs a ``flower-supernode`` with our ``ClientApp``. ``flwr run`` submits a run: it needs
an app directory whose ``pyproject.toml`` names the two components and lists every
run-config key (Flower rejects overrides of keys it does not list), and a connection in
``$FLWR_HOME/config.toml``. :func:`write_flower_app` and :func:`write_connection` write
both; :func:`submit_run` calls ``flwr run`` and reports the run's final status.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedcommons import __version__
from fedcommons.coordinator.config import RunConfig
from fedcommons.coordinator.runs import RunRecord
from fedcommons.engines.schedule import UNKNOWN
from fedcommons.errors import ConfigError, FedcommonsError
from fedcommons.wire import keys

APP_DIR_NAME = "fedcommons-app"
SERVERAPP_REF = "fedcommons.coordinator.server_app:app"
CLIENTAPP_REF = "fedcommons.client_sdk.client_app:app"
#: Options of the built-in digits task, listed so that ``--run-config`` may override them.
DEFAULT_TASK_OPTIONS: dict[str, Any] = {
    "partition": "dirichlet",
    "alpha": 0.5,
    "seed": 0,
    "num-partitions": 2,
    "hidden": "64",
}


class DeploymentError(FedcommonsError):
    """A Flower deployment command failed or a run did not complete."""


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))  # a TOML basic string


def app_run_config(overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Flat run config: RunConfig defaults, digits options, then ``overrides``."""
    flat = RunConfig().to_flat()
    flat.update({f"{keys.TASK_OPTION_PREFIX}{k}": v for k, v in DEFAULT_TASK_OPTIONS.items()})
    flat.update(overrides or {})
    RunConfig.from_flat(flat)  # validate now, not in the ServerApp process
    return flat


def write_flower_app(directory: Path, overrides: Mapping[str, Any] | None = None) -> Path:
    """Write the Flower app (``<directory>/fedcommons-app/pyproject.toml``); return its path.

    The components point into the installed ``fedcommons`` package, so the app holds no
    code; the SuperLink and SuperNodes must run where fedcommons is installed.
    """
    app_dir = Path(directory) / APP_DIR_NAME
    app_dir.mkdir(parents=True, exist_ok=True)
    lines = [
        "[project]",
        f'name = "{APP_DIR_NAME}"',
        f'version = "{__version__.split("+")[0]}"',
        'description = "fedcommons coordinator and client apps for Flower"',
        'license = "Apache-2.0"',
        "dependencies = []  # fedcommons is installed on the SuperLink and SuperNodes",
        "",
        "[tool.flwr.app]",
        'publisher = "fedcommons"',
        "",
        "[tool.flwr.app.components]",
        f'serverapp = "{SERVERAPP_REF}"',
        f'clientapp = "{CLIENTAPP_REF}"',
        "",
        "[tool.flwr.app.config]",
    ]
    for key, value in app_run_config(overrides).items():
        lines.append(f"{json.dumps(key)} = {_toml_value(value)}")
    (app_dir / "pyproject.toml").write_text("\n".join(lines) + "\n")
    return app_dir


def flwr_home() -> Path:
    """``$FLWR_HOME`` if set, else Flower's default ``~/.flwr``."""
    return Path(os.environ.get("FLWR_HOME", Path.home() / ".flwr"))


def write_connection(
    name: str, address: str, *, insecure: bool, root_cert: Path | None = None
) -> Path:
    """Add or replace connection ``name`` in ``$FLWR_HOME/config.toml``; return the file."""
    if not insecure and root_cert is None:
        raise ConfigError("a TLS connection needs --root-cert (or pass --insecure)")
    home = flwr_home()
    home.mkdir(parents=True, exist_ok=True)
    path = home / "config.toml"
    kept: list[str] = []
    if path.exists():
        skipping = False
        for line in path.read_text().splitlines():
            stripped = line.strip()
            if stripped.startswith("["):
                skipping = stripped == f"[superlink.{name}]"
            if not skipping:
                kept.append(line)
    if not any(line.strip() == "[superlink]" for line in kept):
        kept = ["[superlink]", f'default = "{name}"', "", *kept]
    block = [f"[superlink.{name}]", f'address = "{address}"']
    block.append("insecure = true" if insecure else f'root-certificates = "{root_cert}"')
    path.write_text("\n".join([*kept, "", *block]).strip() + "\n")
    return path


def flower_exe(name: str) -> str:
    """Path of Flower's ``name`` command: on PATH, else next to this Python."""
    exe = shutil.which(name) or str(Path(sys.executable).with_name(name))
    if not Path(exe).exists():
        raise DeploymentError(f"{name!r} is not installed next to this Python")
    return exe


def run_status(connection: str, run_id: int) -> dict[str, Any]:
    """The run's row from ``flwr ls`` (status like ``finished:completed``)."""
    out = subprocess.run(
        [flower_exe("flwr"), "ls", connection, "--run-id", str(run_id), "--format", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    try:
        runs = json.loads(out.stdout).get("runs", [])
    except json.JSONDecodeError as exc:
        raise DeploymentError(f"flwr ls failed: {out.stdout[-500:]} {out.stderr[-500:]}") from exc
    if not runs:
        raise DeploymentError(f"run {run_id} not found on connection {connection!r}")
    return runs[0]


def submit_run(
    app_dir: Path, connection: str, *, wait: bool = True, timeout: float = 3600.0
) -> dict[str, Any]:
    """Submit the app with ``flwr run``; with ``wait`` poll until it finishes.

    Returns the final ``flwr ls`` row. ``flwr run --stream`` exits 0 even when the
    ServerApp fails, so the status is read from ``flwr ls`` instead.
    """
    out = subprocess.run(
        [flower_exe("flwr"), "run", str(app_dir), connection, "--format", "json"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    try:
        run_id = int(json.loads(out.stdout)["run-id"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise DeploymentError(
            f"flwr run failed (rc={out.returncode}): {out.stdout[-800:]} {out.stderr[-800:]}"
        ) from exc
    status = run_status(connection, run_id)
    deadline = time.monotonic() + timeout
    while wait and not str(status.get("status", "")).startswith("finished"):
        if time.monotonic() > deadline:
            raise DeploymentError(f"run {run_id} still {status.get('status')} after {timeout}s")
        time.sleep(2.0)
        status = run_status(connection, run_id)
    status["run-id"] = run_id
    return status


class FlowerSubmitter:
    """Submits runs to a SuperLink with ``flwr run`` (Flower's deployment engine)."""

    CONNECTION = "fedcommons-scheduler"

    def __init__(self, address: str, *, root_cert: Path | None, insecure: bool) -> None:
        write_connection(self.CONNECTION, address, insecure=insecure, root_cert=root_cert)

    def submit(self, record: RunRecord) -> int:
        """``flwr run`` the Flower app with the run's stored config."""
        with tempfile.TemporaryDirectory(prefix="fedcommons-app-") as tmp:
            app_dir = write_flower_app(Path(tmp), record.config)
            status = submit_run(app_dir, self.CONNECTION, wait=False)
        return int(status["run-id"])

    def status(self, run_id: int) -> str:
        """The run's status from ``flwr ls`` (``unknown`` when the SuperLink lost it)."""
        try:
            return str(run_status(self.CONNECTION, run_id).get("status", UNKNOWN))
        except DeploymentError as exc:
            if "not found" in str(exc):
                return UNKNOWN
            raise
