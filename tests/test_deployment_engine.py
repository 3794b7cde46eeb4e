"""The same ServerApp/ClientApp on Flower's deployment engine, over loopback."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from fedcommons.releases.registry import Registry
from tests.conftest import BIN
from tests.processes import (
    ProcessGroup,
    start_insecure_supernodes,
    start_superlink,
    tail,
)

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

        submit = subprocess.run(
            [
                str(BIN / "fedcommons"),
                "coordinator",
                "submit",
                "--insecure",
                "--superlink",
                f"127.0.0.1:{link_port}",
                "--timeout",
                "400",
                "-c",
                "rounds=2",
                "-c",
                "min-clients=2",
                "-c",
                "local-epochs=2",
                "-c",
                "task.num-partitions=2",
                "-c",
                f"registry={registry}",
                "-c",
                "node-wait-timeout=60",
            ],
            env=flower_env,
            capture_output=True,
            text=True,
            timeout=480,
            check=False,
        )
        logs = "\n".join(tail(p) for p in sorted(tmp_path.glob("*.log")))
        assert submit.returncode == 0, f"{submit.stdout}\n{submit.stderr}\n{logs}"
        status = json.loads(submit.stdout[submit.stdout.index("{") :])
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
