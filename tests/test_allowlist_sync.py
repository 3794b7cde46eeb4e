"""The allowlist on a live SuperLink (TLS + node auth): register, keep, revoke."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedcommons.engines import certs
from fedcommons.engines.superlink import sync_allowlist
from tests.conftest import BIN
from tests.processes import ProcessGroup, free_port, wait_for_coordinator_ready

pytestmark = pytest.mark.slow


def test_restart_keeps_registrations_and_sync_revokes_a_removed_key(
    tmp_path: Path, flower_env: dict[str, str]
) -> None:
    pki = tmp_path / "pki"
    certs.create_ca(pki)
    certs.create_server_cert(pki)
    a = certs.create_node_keys(pki / "keys", "a")
    b = certs.create_node_keys(pki / "keys", "b")
    port, control = free_port(), free_port()
    argv = [
        str(BIN / "fedcommons"),
        "coordinator",
        "start",
        "--port",
        str(port),
        "--control-port",
        str(control),
        "--database",
        str(tmp_path / "link.db"),
        "--ssl-certfile",
        str(pki / "server.pem"),
        "--ssl-keyfile",
        str(pki / "server.key"),
        "--ssl-ca-certfile",
        str(pki / "ca.pem"),
        "--allowlist",
        str(pki / "keys"),
        "--metrics-port",
        "0",
    ]

    group = ProcessGroup(tmp_path, flower_env)
    try:
        first, log1 = group.start("coordinator-1", argv)
        sync = wait_for_coordinator_ready(log1, first)["allowlist"]
        assert sorted(Path(k).name for k in sync["registered"]) == ["a.pub", "b.pub"]
        group.stop_all()

        second, log2 = group.start("coordinator-2", argv)  # same database: nothing new
        sync = wait_for_coordinator_ready(log2, second)["allowlist"]
        assert sync["registered"] == {} and len(sync["kept"]) == 2
        node_a = sync["kept"][str(a.public_key)]

        # from the coordinator host, through the loopback Control API
        result = sync_allowlist(f"127.0.0.1:{control}", [a.public_key], root_cert=pki / "ca.pem")
        assert result.kept == {str(a.public_key): node_a}
        assert result.revoked == [sync["kept"][str(b.public_key)]]
        again = sync_allowlist(f"127.0.0.1:{control}", [a.public_key], root_cert=pki / "ca.pem")
        assert again.registered == {} and again.revoked == []
    finally:
        group.stop_all()
    assert group.alive() == []
