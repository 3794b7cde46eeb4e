"""Client process modes of `fedcommons client join`: warm worker and Flower's subprocess."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
from flwr.clientapp import ClientApp

from fedcommons.client_sdk.node import (
    NodeProcessError,
    check_mode,
    run_node,
    supernode_argv,
    worker_argv,
)
from fedcommons.client_sdk.warm import (
    NotWarmableAppError,
    WarmWorker,
    WarmWorkerError,
    load_installed_app,
    task_preloader,
)
from fedcommons.errors import ConfigError
from tests.test_cli import run_cli


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # a zombie still answers kill(0): read its state
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"


def test_warm_mode_runs_the_supernode_with_process_isolation() -> None:
    argv = supernode_argv(
        "coord:9093",
        mode="warm",
        port=9200,
        node_config={"partition-id": 1, "task": "a:B"},
        root_cert=Path("ca.pem"),
        key=Path("n.key"),
    )
    assert argv[argv.index("--isolation") + 1] == "process"
    assert argv[argv.index("--node-config") + 1] == 'partition-id=1 task="a:B"'
    assert argv[argv.index("--auth-supernode-private-key") + 1] == "n.key"
    cold = supernode_argv("coord:9093", mode="subprocess", insecure=True)
    assert cold[cold.index("--isolation") + 1] == "subprocess" and "--insecure" in cold


def test_worker_serves_the_supernodes_runtime_api() -> None:
    argv = worker_argv(host="127.0.0.1", port=9200, task="digits", parent_pid=42)
    assert argv[:3] == [sys.executable, "-m", "fedcommons.client_sdk.warm"]
    assert argv[argv.index("--runtime-api-address") + 1] == "127.0.0.1:9200"
    assert argv[argv.index("--parent-pid") + 1] == "42"


def test_unknown_client_mode_is_a_config_error() -> None:
    """Input tried: mode 'fast' (neither 'warm' nor 'subprocess')."""
    with pytest.raises(ConfigError, match="warm, subprocess"):
        check_mode("fast")


def test_client_join_rejects_an_unknown_mode(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Input tried: `client join --insecure --mode fast`; nothing is started."""
    code = run_cli(
        monkeypatch,
        "client",
        "join",
        "--coordinator",
        "127.0.0.1:1",
        "--insecure",
        "--mode",
        "fast",
    )
    assert code == 2
    assert "client mode must be one of warm, subprocess" in capsys.readouterr().err


def test_installed_clientapp_loads_warm() -> None:
    app = load_installed_app("fedcommons.client_sdk.client_app:app")
    assert isinstance(app, ClientApp)
    task_preloader(None, {"partition-id": 0, "num-partitions": 2})()  # digits, warmed


def test_fab_that_ships_its_own_clientapp_code_is_not_run_warm() -> None:
    """Input tried: a FAB whose files include the ClientApp's top-level package."""
    with pytest.raises(NotWarmableAppError, match="--mode subprocess"):
        load_installed_app("fedcommons.client_sdk.client_app:app", shipped={"fedcommons"})


def test_clientapp_that_is_not_installed_is_not_run_warm() -> None:
    """Input tried: clientapp = 'not_installed_pkg.client:app'."""
    with pytest.raises(NotWarmableAppError, match="not installed"):
        load_installed_app("not_installed_pkg.client:app")


def test_worker_refuses_a_bad_runtime_api_address() -> None:
    """Input tried: runtime API address without a port; poll interval of 0."""
    with pytest.raises(WarmWorkerError, match="HOST:PORT"):
        WarmWorker("localhost")
    with pytest.raises(WarmWorkerError, match="poll interval"):
        WarmWorker("127.0.0.1:9094", poll_interval=0)


def test_supervisor_restarts_a_dying_worker_then_stops_the_node(tmp_path: Path) -> None:
    """Input tried: a worker that exits at once, every time (a broken installation)."""
    pidfile, starts = tmp_path / "node.pid", tmp_path / "starts"
    node = ["/bin/sh", "-c", f"echo $$ > {pidfile}; exec sleep 60"]
    worker = ["/bin/sh", "-c", f"sleep 0.2; printf x >> {starts}; exit 3"]
    with pytest.raises(NodeProcessError, match="exited 3 times"):
        run_node(node, worker, max_restarts=2, poll=0.05)
    assert starts.read_text() == "xxx"  # first start + 2 restarts
    assert _gone(int(pidfile.read_text()))  # the SuperNode was stopped, by PID


def test_supervisor_stops_the_worker_when_the_supernode_exits(tmp_path: Path) -> None:
    pidfile = tmp_path / "worker.pid"
    node = ["/bin/sh", "-c", "sleep 2; exit 7"]
    worker = ["/bin/sh", "-c", f"echo $$ > {pidfile}; exec sleep 60"]
    started = time.monotonic()
    assert run_node(node, worker, poll=0.05) == 7
    assert time.monotonic() - started < 20
    assert _gone(int(pidfile.read_text()))
