"""A scheduled run executed by `fedcommons coordinator start --registry` (deployment engine).

Loopback only: the coordinator (SuperLink + scheduler) and two SuperNodes; every process
is stopped by PID. The run's ServerApp SIGKILLs itself while collecting round 2
(``FEDCOMMONS_FAULT``, once per marker file); Flower marks that run failed, the scheduler
submits the run again, and the new ServerApp resumes after committed round 1.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from fedcommons.coordinator.runs import RunStore
from fedcommons.observability import audit_log
from fedcommons.releases.registry import Registry
from tests.conftest import BIN
from tests.processes import (
    ProcessGroup,
    free_port,
    start_insecure_supernodes,
    tail,
    wait_for_port,
)

pytestmark = pytest.mark.slow


def test_scheduled_run_killed_mid_round_is_resubmitted_and_resumes_to_a_release(
    tmp_path: Path, flower_env: dict[str, str]
) -> None:
    registry = tmp_path / "registry"
    scheduled = subprocess.run(
        [
            str(BIN / "fedcommons"),
            "round",
            "schedule",
            "--registry",
            str(registry),
            "--name",
            "e2e",
            "--rounds",
            "2",
            "--min-clients",
            "2",
            "--deadline",
            "120",
            "-c",
            "local-epochs=1",
            "-c",
            "task.num-partitions=2",
            "-c",
            "node-wait-timeout=90",
        ],
        env=flower_env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert scheduled.returncode == 0, scheduled.stderr
    marker = tmp_path / "fault-reached"
    env = {
        **flower_env,
        "FEDCOMMONS_SCHEDULE_POLL": "1",
        "FEDCOMMONS_METRICS_PORT": "0",
        "FEDCOMMONS_FAULT": "collecting:2:kill",  # the ServerApp process SIGKILLs itself
        "FEDCOMMONS_FAULT_MARKER": str(marker),
    }
    group = ProcessGroup(tmp_path, env)
    link_port = free_port()
    try:
        link, link_log = group.start(
            "coordinator",
            [
                str(BIN / "fedcommons"),
                "coordinator",
                "start",
                "--insecure",
                "--host",
                "127.0.0.1",
                "--port",
                str(link_port),
                "--control-port",
                str(free_port()),
                "--database",
                str(tmp_path / "link.db"),
                "--registry",
                str(registry),
            ],
        )
        wait_for_port(link_port, link, link_log)
        start_insecure_supernodes(group, BIN, link_port, 2)
        deadline = time.monotonic() + 400
        record = RunStore(registry).get("e2e")
        while record.state in ("scheduled", "running") and time.monotonic() < deadline:
            time.sleep(1.0)
            record = RunStore(registry).get("e2e")
        logs = "\n".join(tail(p) for p in sorted(tmp_path.glob("*.log")))
        assert record.state == "finished", f"{record}\n{logs}"
        assert "point=collecting round=2" in marker.read_text(), logs
        assert record.flower_run_id > 0 and record.starts == 2, f"{record}\n{logs}"
        (release,) = Registry(registry, create=False).releases()
        assert release.version == record.release_version
        assert release.manifest().config["run-name"] == "e2e"
        assert [c.round for c in RunStore(registry).rounds("e2e")] == [1, 2]
        resumed = [
            r for r in audit_log.read(registry / "audit.jsonl") if r["action"] == "run.resume"
        ]
        assert [r["details"]["resume_after_round"] for r in resumed] == [1]
    finally:
        group.stop_all()
    assert group.alive() == []
