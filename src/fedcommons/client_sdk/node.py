"""An institution's SuperNode and how its ClientApp processes run (``client join``).

Two client process modes:

- ``warm`` (default): ``flower-supernode --isolation process`` plus one long-lived
  :mod:`fedcommons.client_sdk.warm` worker that serves every message from a process
  that has already imported torch, flwr and the ClientApp and loaded the site's data.
  :func:`run_node` supervises both: it restarts a worker that died (bounded), stops
  the worker when the SuperNode exits, and stops both, by PID, when asked to stop.
- ``subprocess``: Flower's default, ``flower-supernode --isolation subprocess``: a
  fresh ``flwr-clientapp`` process per message (runs any FAB, including ones that
  ship their own code; pays process start, imports and data loading every round).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedcommons.errors import ConfigError, FedcommonsError
from fedcommons.logs import get_logger

log = get_logger("fedcommons.client.node")

CLIENT_MODES = ("warm", "subprocess")
DEFAULT_CLIENT_MODE = "warm"


class NodeProcessError(FedcommonsError):
    """The SuperNode or its warm worker could not be started or kept running."""


def check_mode(mode: str) -> str:
    """Return ``mode`` if it is a client process mode, else raise :class:`ConfigError`."""
    if mode not in CLIENT_MODES:
        raise ConfigError(f"client mode must be one of {', '.join(CLIENT_MODES)}; got {mode!r}")
    return mode


def _node_config_arg(settings: Mapping[str, Any]) -> str:
    return " ".join(
        f"{k}={json.dumps(v) if isinstance(v, str) else v}" for k, v in settings.items()
    )


def supernode_argv(
    superlink: str,
    *,
    mode: str = DEFAULT_CLIENT_MODE,
    host: str = "127.0.0.1",
    port: int = 9094,
    node_config: Mapping[str, Any] | None = None,
    insecure: bool = False,
    root_cert: Path | None = None,
    key: Path | None = None,
    max_wait_time: float | None = None,
) -> list[str]:
    """The ``flower-supernode`` command line for ``mode``."""
    check_mode(mode)
    argv = ["flower-supernode", "--superlink", superlink, "--host", host, "--port", str(port)]
    if node_config:
        argv += ["--node-config", _node_config_arg(node_config)]
    argv += ["--insecure"] if insecure else ["--root-certificates", str(root_cert)]
    if key is not None:
        argv += ["--auth-supernode-private-key", str(key)]
    if max_wait_time is not None:
        argv += ["--max-wait-time", str(max_wait_time)]
    argv += ["--isolation", "process" if mode == "warm" else "subprocess"]
    return argv


def worker_argv(
    *,
    host: str,
    port: int,
    task: str | None = None,
    node_config: Mapping[str, Any] | None = None,
    parent_pid: int | None = None,
) -> list[str]:
    """The command line of the warm worker serving the SuperNode at ``host:port``."""
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    argv = [sys.executable, "-m", "fedcommons.client_sdk.warm", "--runtime-api-address", address]
    if task:
        argv += ["--task", task]
    if node_config:
        argv += ["--node-config", json.dumps(dict(node_config))]
    if parent_pid is not None:
        argv += ["--parent-pid", str(parent_pid)]
    return argv


def _resolve(argv: Sequence[str]) -> list[str]:
    exe = shutil.which(argv[0]) or str(Path(sys.executable).with_name(argv[0]))
    if not Path(exe).exists():
        raise NodeProcessError(f"{argv[0]!r} is not installed (it comes with flwr)")
    return [exe, *argv[1:]]


def _stop(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """TERM, then KILL after ``timeout`` seconds; always reaps (by PID, never by name)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(timeout=timeout)


def run_node(
    supernode: Sequence[str],
    worker: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    max_restarts: int = 5,
    restart_window: float = 300.0,
    poll: float = 0.2,
) -> int:
    """Run the SuperNode and its warm worker until the SuperNode exits; return its code.

    A worker that exits while the SuperNode runs is restarted, at most ``max_restarts``
    times within ``restart_window`` seconds; past that the node is stopped and
    :class:`NodeProcessError` raised. SIGTERM/SIGINT stop both children and return
    the SuperNode's exit code.
    """
    environ = dict(os.environ if env is None else env)
    node_cmd, worker_cmd = _resolve(supernode), list(worker)
    stopping = False

    def request_stop(_signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True

    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
    node = subprocess.Popen(node_cmd, env=environ, stdin=subprocess.DEVNULL)
    work: subprocess.Popen[bytes] | None = None
    restarts: list[float] = []
    try:
        work = subprocess.Popen(worker_cmd, env=environ, stdin=subprocess.DEVNULL)
        log.info("node.started", supernode_pid=node.pid, worker_pid=work.pid)
        while not stopping:
            if node.poll() is not None:
                log.warning("node.supernode-exited", code=node.returncode)
                break
            if work.poll() is not None:
                now = time.monotonic()
                restarts = [t for t in restarts if now - t < restart_window] + [now]
                if len(restarts) > max_restarts:
                    raise NodeProcessError(
                        f"the warm worker exited {len(restarts)} times in "
                        f"{restart_window:.0f}s (last code {work.returncode}); stopping the "
                        "node (try --mode subprocess)"
                    )
                log.warning("node.worker-restart", code=work.returncode, restarts=len(restarts))
                work = subprocess.Popen(worker_cmd, env=environ, stdin=subprocess.DEVNULL)
            time.sleep(poll)
    finally:
        if work is not None:
            _stop(work)
        _stop(node)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return int(node.returncode)
