"""A scheduled run executed by `fedcommons coordinator start --registry` (deployment engine).

Loopback only: the coordinator (SuperLink + scheduler) and two `client join` institutions
(the chaos soak's :class:`benchmarks.chaos.Cluster`); every process is stopped by PID.
The run's ServerApp SIGKILLs itself while collecting round 2 (``FEDCOMMONS_FAULT``, once
per marker file); Flower marks that run failed, the scheduler submits the run again, and
the new ServerApp resumes after committed round 1.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from benchmarks.chaos import Cluster

from fedcommons.coordinator.runs import RunStore
from fedcommons.observability import audit_log
from fedcommons.releases.registry import Registry
from tests.conftest import BIN
from tests.processes import schedule_run, tail

pytestmark = pytest.mark.slow


def test_scheduled_run_killed_mid_round_is_resubmitted_and_resumes_to_a_release(
    tmp_path: Path, flower_env: dict[str, str]
) -> None:
    registry = tmp_path / "registry"
    schedule_run(
        BIN, flower_env, registry, "--deadline", "120", "-c", "node-wait-timeout=90", rounds=2
    )
    marker = tmp_path / "fault-reached"
    env = {
        **flower_env,
        "FEDCOMMONS_SCHEDULE_POLL": "1",
        "FEDCOMMONS_METRICS_PORT": "0",
        "FEDCOMMONS_FAULT": "collecting:2:kill",  # the ServerApp process SIGKILLs itself
        "FEDCOMMONS_FAULT_MARKER": str(marker),
    }
    cluster = Cluster(tmp_path, env, 2)
    try:
        cluster.start_coordinator()
        cluster.start_nodes([0, 1])
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
        cluster.stop_all()
    assert cluster.group.alive() == []
