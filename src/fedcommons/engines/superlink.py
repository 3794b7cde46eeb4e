"""The coordinator service on Flower's deployment engine: the SuperLink and its settings.

``fedcommons coordinator start`` runs Flower's SuperLink (TLS and SuperNode
authentication on by default) with the settings of :class:`CoordinatorSettings`, keeps its
registered SuperNodes equal to the allowlist (:func:`sync_allowlist`), exports metrics and
the audit log to the ServerApp processes it starts, and runs the run scheduler next to it.

Only the Fleet API faces the network (``host``/``port``, what SuperNodes dial); the
Control and runtime APIs listen on loopback (``control-host``/``control-port``), or, for
the Control API only, on an ``operator-address`` that requires TLS client certificates
(:mod:`fedcommons.engines.listeners`).
"""

from __future__ import annotations

import os
import signal
import subprocess
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

from fedcommons.engines.submission import DeploymentError, flower_exe
from fedcommons.errors import CertificateError, ConfigError
from fedcommons.observability import audit_log, metrics

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

    #: Fleet API (the only API SuperNodes need): the address institutions dial.
    host: str = "127.0.0.1"
    port: int = Field(9093, ge=1, le=65535)
    #: Control and runtime APIs: loopback only (operators submit from this host).
    control_host: str = "127.0.0.1"
    control_port: int = Field(9091, ge=1, le=65535)
    #: Optional HOST:PORT serving the Control API to operators elsewhere, TLS client
    #: certificates required (signed by ``operator_client_ca``, default the CA).
    operator_address: str | None = None
    operator_client_ca: Path | None = None
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
        from fedcommons.engines.certs import allowlist_keys, check_pem_certificate

        warnings: list[str] = self._check_listeners()
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

    def _check_listeners(self) -> list[str]:
        """The Control API stays on loopback or behind client certificates."""
        from fedcommons.engines.listeners import is_loopback, split_address

        if not is_loopback(self.control_host):
            raise ConfigError(
                f"control-host {self.control_host!r} is not a loopback address: the Control and "
                "runtime APIs listen on this machine only (use operator-address for remote "
                "operators, with TLS client certificates)"
            )
        clash = self.port == self.control_port and (
            self.host in ("0.0.0.0", "::", "", self.control_host)
        )
        if clash:
            raise ConfigError(
                f"port {self.port} is both the Fleet port and the Control port: choose "
                "another control-port"
            )
        warnings = []
        if self.operator_address:
            try:
                split_address(self.operator_address)
            except ValueError as exc:
                raise ConfigError(f"operator-address: {exc}") from None
            if self.insecure:
                raise ConfigError(
                    "operator-address needs TLS with client certificates; it cannot be "
                    "combined with --insecure"
                )
            warnings.append(
                f"the Control API is also served on {self.operator_address} to clients with "
                f"a certificate from {self.operator_client_ca or self.ssl_ca_certfile}"
            )
        if not is_loopback(self.host) and self.insecure:
            warnings.append(f"the Fleet API on {self.host} is plain text (--insecure)")
        return warnings

    @property
    def node_auth_active(self) -> bool:
        """Whether the SuperLink runs with ``--enable-supernode-auth``."""
        return self.node_auth and not self.insecure

    @property
    def local_address(self) -> str:
        """Where this machine reaches the Control API (the loopback listener)."""
        host = self.control_host
        return f"[{host}]:{self.control_port}" if ":" in host else f"{host}:{self.control_port}"

    @property
    def fleet_address(self) -> str:
        """Where the Fleet API listens (what SuperNodes dial)."""
        host = self.host or "0.0.0.0"
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    @property
    def fleet_probe_address(self) -> str:
        """Where this machine reaches the Fleet listener (loopback when it binds everywhere)."""
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
    "operator_client_ca",
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
    """The ``flower-superlink`` options for ``settings`` (its own host is the loopback one)."""
    argv = [
        "flower-superlink",
        "--host",
        settings.control_host,
        "--port",
        str(settings.control_port),
        "--disable-runtime-dependency-installation",
        # the coordinator service starts and supervises the SuperExec (engines/superexec.py)
        "--isolation",
        "process",
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


def service_argv(settings: CoordinatorSettings, python: str | None = None) -> list[str]:
    """The coordinator's SuperLink command: Flower's app behind separate listeners.

    ``python -m fedcommons.engines.listeners --fleet-address HOST:PORT [--operator-...]
    -- <flower-superlink options>`` (see :mod:`fedcommons.engines.listeners`).
    """
    import sys

    argv = [python or sys.executable, "-m", "fedcommons.engines.listeners"]
    argv += ["--fleet-address", settings.fleet_address]
    if settings.operator_address:
        ca = settings.operator_client_ca or settings.ssl_ca_certfile
        argv += ["--operator-address", settings.operator_address]
        argv += ["--operator-client-ca", str(ca)]
    return [*argv, "--", *superlink_argv(settings)[1:]]


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


def _control_client(
    address: str,
    root_cert: Path | None,
    insecure: bool,
    client_cert: tuple[Path, Path] | None = None,
) -> Any:
    """A Flower Control API client; with ``client_cert`` (cert, key) it authenticates by TLS."""
    if client_cert is not None:
        import ssl

        from flwr.cli.cli_client_interceptor import CliClientHttpInterceptor
        from flwr.supercore.control import ControlHttpClient
        from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor

        context = ssl.create_default_context(cafile=str(root_cert) if root_cert else None)
        context.load_cert_chain(str(client_cert[0]), str(client_cert[1]))
        return ControlHttpClient(
            f"https://{address}",
            interceptors=[
                CliClientHttpInterceptor(),
                RuntimeVersionHttpInterceptor(component_name="flwr CLI"),
            ],
            verify=context,
        )
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
    client_cert: tuple[Path, Path] | None = None,
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

    from fedcommons.engines.certs import load_node_public_key

    wanted = {public_key_to_bytes(load_node_public_key(path)): Path(path) for path in key_files}
    result = AllowlistSync()
    client = _control_client(address, root_cert, insecure, client_cert)
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

    Starts the SuperLink (:func:`service_argv`) as a child with TLS (and
    ``--enable-supernode-auth`` unless turned off), passes the metrics and audit-log
    settings on to the ServerApp processes through the environment, registers the
    allowlist once both listeners are open, forwards SIGTERM/SIGINT to the SuperLink and
    waits for it, keeping the SuperExec that starts the ServerApps running next to it
    (:mod:`fedcommons.engines.superexec`).
    """
    from fedcommons.engines.certs import allowlist_keys
    from fedcommons.engines.superexec import superexec_argv, supervise

    flower_exe("flower-superlink")  # Flower is installed next to this Python
    argv = service_argv(settings)
    proc = subprocess.Popen(argv, env=service_env(settings), stdin=subprocess.DEVNULL)

    def forward(signum: int, _frame: Any) -> None:
        if proc.poll() is None:
            proc.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        _wait_for_port(settings.local_address, proc, settings.startup_timeout)
        _wait_for_port(settings.fleet_probe_address, proc, settings.startup_timeout)
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
            return supervise(
                proc,
                superexec_argv(
                    settings.local_address,
                    insecure=settings.insecure,
                    root_cert=None
                    if settings.ssl_ca_certfile is None
                    else str(settings.ssl_ca_certfile),
                ),
                service_env(settings),
            )
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
    from fedcommons.engines.schedule import start_scheduler_thread
    from fedcommons.engines.submission import FlowerSubmitter

    submitter = FlowerSubmitter(
        settings.local_address,
        root_cert=None if settings.insecure else settings.ssl_ca_certfile,
        insecure=settings.insecure,
    )
    registry = Path(settings.registry).expanduser().resolve()
    _, stop = start_scheduler_thread(registry, submitter, poll=settings.schedule_poll)
    return stop
