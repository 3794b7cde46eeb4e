"""The same ServerApp/ClientApp on Flower's deployment engine, over loopback."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedcommons.releases.registry import Registry
from tests.conftest import BIN
from tests.processes import ProcessGroup, start_insecure_supernodes, start_superlink, submit_run

pytestmark = pytest.mark.slow


def test_superlink_and_two_supernodes_publish_a_release(
    tmp_path: Path, flower_env: dict[str, str]
) -> None:
    """flower-superlink + 2 flower-supernodes on 127.0.0.1, 2 rounds via flwr run."""
    group = ProcessGroup(tmp_path, flower_env)
    registry = tmp_path / "registry"
    try:
        link_port = start_superlink(group, BIN, tmp_path / "link.db")
        start_insecure_supernodes(group, BIN, link_port, 2)

        settings = ["rounds=2", "min-clients=2", "local-epochs=2", "task.num-partitions=2"]
        settings += [f"registry={registry}", "node-wait-timeout=60"]
        status = submit_run(BIN, flower_env, link_port, settings, tmp_path)
        assert status["status"] == "finished:completed"

        releases = Registry(registry, create=False).releases()
        assert [r.version for r in releases] == ["1.0.0"]
        manifest = releases[0].manifest()
        assert manifest.rounds == 2
        assert [r["accepted"] for r in manifest.round_metrics] == [2, 2]
        assert manifest.contributors == 2
        assert manifest.flower_run_id == status["run-id"]
    finally:
        group.stop_all()
    assert group.alive() == []
