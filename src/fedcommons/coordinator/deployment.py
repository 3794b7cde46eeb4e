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
import time
import tomllib
from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from fedcommons import __version__
from fedcommons.coordinator import audit_log, metrics
from fedcommons.coordinator.config import RunConfig
from fedcommons.errors import CertificateError, ConfigError, FedcommonsError
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


def _flower_exe(name: str) -> str:
    """Path of Flower's ``name`` command: on PATH, else next to this Python."""
    exe = shutil.which(name) or str(Path(sys.executable).with_name(name))
    if not Path(exe).exists():
        raise DeploymentError(f"{name!r} is not installed next to this Python")
    return exe


def run_status(connection: str, run_id: int) -> dict[str, Any]:
    """The run's row from ``flwr ls`` (status like ``finished:completed``)."""
    out = subprocess.run(
        [_flower_exe("flwr"), "ls", connection, "--run-id", str(run_id), "--format", "json"],
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
        [_flower_exe("flwr"), "run", str(app_dir), connection, "--format", "json"],
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


# -- the coordinator service: settings, TLS, node authentication ------------------------

#: Environment variables the ServerApp processes read (set by :func:`service_env`);
#: named by the modules that read them.
ENV_METRICS_PORT = metrics.ENV_PORT
ENV_METRICS_HOST = metrics.ENV_HOST
ENV_AUDIT_LOG = audit_log.ENV_PATH


class CoordinatorSettings(BaseSettings):
    """Settings of ``fedcommons coordinator start``.

    Sources, highest first: command-line options, environment variables
    (``FEDCOMMONS_<FIELD>``, e.g. ``FEDCOMMONS_SSL_CERTFILE``), the TOML file given with
    ``--config`` (top-level keys named like the fields), the defaults below. Relative
    paths in the TOML file are relative to the file's directory; others to the working
    directory.
    """

    model_config = SettingsConfigDict(env_prefix="FEDCOMMONS_", extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(9093, ge=1, le=65535)
    database: Path | None = None
    insecure: bool = False
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    ssl_ca_certfile: Path | None = None
    node_auth: bool = True
    allowlist: list[Path] = Field(default_factory=list)
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(9095, ge=0, le=65535)
    audit_log: Path | None = None
    startup_timeout: float = Field(60.0, gt=0)
    #: Registry whose scheduled runs this coordinator submits (``fedcommons round
    #: schedule``) and restarts when their ServerApp dies (#8); None: no scheduler.
    registry: Path | None = None
    schedule_poll: float = Field(5.0, gt=0)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """CLI options (init), then environment, then the TOML file."""
        toml_file = _TOML_FILE.get()
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if toml_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_file))
        return tuple(sources)

    def check(self) -> list[str]:
        """Raise ConfigError/CertificateError on unusable settings; return warnings."""
        from fedcommons.coordinator.certs import allowlist_keys, check_pem_certificate

        warnings: list[str] = []
        if self.insecure:
            warnings.append("TLS is off (--insecure): use only on a trusted network")
            if self.node_auth:
                warnings.append("SuperNode authentication needs TLS: it is off as well")
            return warnings
        missing = [
            f"--{name.replace('_', '-')}"
            for name in ("ssl_certfile", "ssl_keyfile", "ssl_ca_certfile")
            if getattr(self, name) is None
        ]
        if missing:
            raise ConfigError(
                f"TLS is on by default and needs {', '.join(missing)} "
                "(create development ones with 'fedcommons certs dev'), or pass --insecure"
            )
        for name in ("ssl_certfile", "ssl_ca_certfile"):
            check_pem_certificate(getattr(self, name), name.replace("_", "-"))
        if not Path(self.ssl_keyfile).is_file():  # type: ignore[arg-type]
            raise CertificateError(f"ssl-keyfile {self.ssl_keyfile} not found")
        if self.node_auth:
            keys_found = allowlist_keys(self.allowlist)
            if not keys_found:
                warnings.append(
                    "node authentication is on and the allowlist is empty: no SuperNode "
                    "can connect until keys are added (coordinator allowlist-sync)"
                )
        else:
            warnings.append("SuperNode authentication is off: any SuperNode may connect")
        return warnings

    @property
    def node_auth_active(self) -> bool:
        """Whether the SuperLink runs with ``--enable-supernode-auth``."""
        return self.node_auth and not self.insecure

    @property
    def local_address(self) -> str:
        """Where this machine reaches the SuperLink (loopback when it binds everywhere)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"


_TOML_FILE: ContextVar[Path | None] = ContextVar("fedcommons_coordinator_toml", default=None)


def load_coordinator_settings(
    config_file: Path | None = None, **overrides: Any
) -> CoordinatorSettings:
    """Read settings from ``config_file`` (TOML), the environment and ``overrides``.

    ``None`` overrides are ignored (an option not given on the command line).
    Raises :class:`ConfigError` naming the bad file, key or value.
    """
    if config_file is not None and not Path(config_file).is_file():
        raise ConfigError(f"coordinator config {config_file} not found")
    token = _TOML_FILE.set(Path(config_file) if config_file is not None else None)
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        settings = CoordinatorSettings(**given)
        if config_file is not None:
            settings = _paths_relative_to(settings, Path(config_file), given)
        return settings
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'settings'}: {err['msg']}"
            for err in exc.errors()
        )
        raise ConfigError(f"coordinator settings: {problems}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"coordinator config {config_file} is not valid TOML: {exc}") from exc
    finally:
        _TOML_FILE.reset(token)


_PATH_FIELDS = (
    "database",
    "ssl_certfile",
    "ssl_keyfile",
    "ssl_ca_certfile",
    "audit_log",
    "registry",
)


def _paths_relative_to(
    settings: CoordinatorSettings, config_file: Path, given: Mapping[str, Any]
) -> CoordinatorSettings:
    """Resolve relative paths that came from the TOML file against the file's directory."""
    data = tomllib.loads(config_file.read_text())
    base = config_file.resolve().parent
    update: dict[str, Any] = {}
    for name in (*_PATH_FIELDS, "allowlist"):
        if name not in data or name in given or f"FEDCOMMONS_{name.upper()}" in os.environ:
            continue
        value = getattr(settings, name)
        if name == "allowlist":
            update[name] = [p if p.is_absolute() else base / p for p in value]
        elif value is not None and not value.is_absolute():
            update[name] = base / value
    return settings.model_copy(update=update)


def superlink_argv(settings: CoordinatorSettings) -> list[str]:
    """The ``flower-superlink`` command line for ``settings``."""
    argv = [
        "flower-superlink",
        "--host",
        settings.host,
        "--port",
        str(settings.port),
        "--disable-runtime-dependency-installation",
    ]
    if settings.database:
        argv += ["--database", str(settings.database)]
    if settings.insecure:
        return [*argv, "--insecure"]
    argv += [
        "--ssl-certfile",
        str(settings.ssl_certfile),
        "--ssl-keyfile",
        str(settings.ssl_keyfile),
        "--ssl-ca-certfile",
        str(settings.ssl_ca_certfile),
    ]
    if settings.node_auth_active:
        argv.append("--enable-supernode-auth")
    return argv


def service_env(
    settings: CoordinatorSettings, base: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Environment for the SuperLink and the ServerApp processes it starts."""
    env = dict(os.environ if base is None else base)
    env[ENV_METRICS_HOST] = settings.metrics_host
    env[ENV_METRICS_PORT] = str(settings.metrics_port)
    if settings.audit_log is not None:
        env[ENV_AUDIT_LOG] = str(Path(settings.audit_log).expanduser().resolve())
    return env


@dataclass
class AllowlistSync:
    """What :func:`sync_allowlist` changed on the SuperLink."""

    registered: dict[str, int] = field(default_factory=dict)  # key file -> node id
    kept: dict[str, int] = field(default_factory=dict)
    revoked: list[int] = field(default_factory=list)


def _control_client(address: str, root_cert: Path | None, insecure: bool) -> Any:
    from flwr.cli.typing import SuperLinkConnection
    from flwr.cli.utils import init_http_client_from_connection

    connection = SuperLinkConnection(
        name="fedcommons-coordinator",
        address=address,
        root_certificates=str(Path(root_cert).resolve()) if root_cert else None,
        insecure=insecure,
    )
    return init_http_client_from_connection(connection)


def sync_allowlist(
    address: str,
    key_files: Sequence[Path],
    *,
    root_cert: Path | None,
    insecure: bool = False,
    revoke_unlisted: bool = True,
) -> AllowlistSync:
    """Make the SuperLink's registered SuperNodes equal the allowlist.

    Registers each OpenSSH public key not yet registered (Flower's Control API, as
    ``flwr supernode register`` does) and, with ``revoke_unlisted``, unregisters every
    node whose key is not listed. Idempotent: a restart with the same allowlist and a
    persistent ``--database`` changes nothing.
    """
    from flwr.proto.control_pb2 import (
        ListNodesRequest,
        RegisterNodeRequest,
        UnregisterNodeRequest,
    )
    from flwr.supercore.constant import NodeStatus
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    from fedcommons.coordinator.certs import load_node_public_key

    wanted = {public_key_to_bytes(load_node_public_key(path)): Path(path) for path in key_files}
    result = AllowlistSync()
    client = _control_client(address, root_cert, insecure)
    try:
        try:
            nodes = client.ListNodes(ListNodesRequest()).nodes_info
        except Exception as exc:
            raise DeploymentError(f"cannot list SuperNodes on {address}: {exc}") from exc
        active = {n.public_key: n.node_id for n in nodes if n.status != NodeStatus.UNREGISTERED}
        for key, path in wanted.items():
            if key in active:
                result.kept[str(path)] = active[key]
                continue
            try:
                reply = client.RegisterNode(RegisterNodeRequest(public_key=key, name=path.stem))
            except Exception as exc:
                raise DeploymentError(f"cannot register {path} on {address}: {exc}") from exc
            result.registered[str(path)] = int(reply.node_id)
        if revoke_unlisted:
            for key, node_id in active.items():
                if key not in wanted:
                    client.UnregisterNode(UnregisterNodeRequest(node_id=node_id))
                    result.revoked.append(int(node_id))
    finally:
        client.close()
    return result


def _wait_for_port(address: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    import socket

    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DeploymentError(f"flower-superlink exited with code {proc.returncode}")
        with socket.socket(socket.AF_INET6 if host.startswith("[") else socket.AF_INET) as s:
            s.settimeout(0.5)
            if s.connect_ex((host.strip("[]"), int(port))) == 0:
                return
        time.sleep(0.2)
    raise DeploymentError(f"the SuperLink did not open {address} within {timeout:.0f}s")


def run_coordinator(
    settings: CoordinatorSettings, *, on_ready: Callable[[AllowlistSync | None], None] | None = None
) -> int:
    """Run the SuperLink until it exits or this process is asked to stop; return its code.

    Starts ``flower-superlink`` as a child with TLS (and ``--enable-supernode-auth``
    unless turned off), passes the metrics and audit-log settings on to the ServerApp
    processes through the environment, registers the allowlist once the port is open,
    forwards SIGTERM/SIGINT to the SuperLink and waits for it.
    """
    import signal

    from fedcommons.coordinator.certs import allowlist_keys

    argv = [_flower_exe("flower-superlink"), *superlink_argv(settings)[1:]]
    proc = subprocess.Popen(argv, env=service_env(settings), stdin=subprocess.DEVNULL)

    def forward(signum: int, _frame: Any) -> None:
        if proc.poll() is None:
            proc.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        _wait_for_port(settings.local_address, proc, settings.startup_timeout)
        sync = None
        if settings.node_auth_active:
            sync = sync_allowlist(
                settings.local_address,
                allowlist_keys(settings.allowlist),
                root_cert=settings.ssl_ca_certfile,
            )
        if on_ready:
            on_ready(sync)
        stop_scheduler = _start_scheduler(settings)
        try:
            return proc.wait()
        finally:
            if stop_scheduler is not None:
                stop_scheduler.set()
    except BaseException:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _start_scheduler(settings: CoordinatorSettings) -> Any:
    """Start the run scheduler on ``settings.registry`` (#8); return its stop event."""
    if settings.registry is None:
        return None
    from fedcommons.coordinator.schedule import FlowerSubmitter, start_scheduler_thread

    submitter = FlowerSubmitter(
        settings.local_address,
        root_cert=None if settings.insecure else settings.ssl_ca_certfile,
        insecure=settings.insecure,
    )
    registry = Path(settings.registry).expanduser().resolve()
    _, stop = start_scheduler_thread(registry, submitter, poll=settings.schedule_poll)
    return stop
