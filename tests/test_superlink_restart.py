"""The SuperLink SIGKILLed mid-run and started again: the run resumes to a release.

Loopback only: ``fedcommons coordinator start`` (SuperLink + scheduler, with a
``--database``) and two ``fedcommons client join`` institutions (the chaos soak's
:class:`benchmarks.chaos.Cluster`); every process is stopped by PID. Only the SuperLink
process (Flower's SuperLink app behind fedcommons' listeners) is killed: its SuperExec
and ServerApp are left to stop on their own (Flower's parent monitor stops them), and
the run must stay resumable rather than be recorded as failed.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from benchmarks.chaos import Cluster

from fedcommons.coordinator.runs import RunStore
from fedcommons.observability import audit_log
from fedcommons.releases.registry import Registry
from fedcommons.releases.verification import verify_release
from tests.conftest import BIN
from tests.processes import schedule_run

pytestmark = pytest.mark.slow


def test_superlink_killed_mid_run_restarts_and_the_run_resumes_to_a_verified_release(
    tmp_path: Path, flower_env: dict[str, str]
) -> None:
    registry = tmp_path / "registry"
    schedule_run(
        BIN,
        flower_env,
        registry,
        *("--deadline", "90", "--on-round-failure", "retry", "-c", "node-wait-timeout=180"),
        rounds=3,
    )
    env = {**flower_env, "FEDCOMMONS_SCHEDULE_POLL": "1", "FEDCOMMONS_METRICS_PORT": "0"}
    cluster = Cluster(tmp_path, env, 2)
    try:
        cluster.start_coordinator()
        cluster.start_nodes([0, 1])
        # generous bounds: on a loaded 2-core machine a ServerApp can take minutes to start
        # (Flower gives it 30 s from the SuperExec's claim to authenticate, then retries)
        deadline = time.monotonic() + 900
        while RunStore(registry).get("e2e").committed_round < 1:
            assert time.monotonic() < deadline, "round 1 never committed"
            time.sleep(1.0)
        at_kill = RunStore(registry).get("e2e")
        code, leftovers = cluster.kill_superlink()
        assert code not in (None, 0), "the coordinator service must notice its SuperLink died"
        cluster.start_coordinator()  # same port, same --database
        deadline = time.monotonic() + 900
        record = RunStore(registry).get("e2e")
        while record.state in ("scheduled", "running") and time.monotonic() < deadline:
            time.sleep(1.0)
            record = RunStore(registry).get("e2e")
    finally:
        cluster.stop_all()
    assert cluster.group.alive() == []
    assert at_kill.state == "running" and at_kill.committed_round < 3, "killed after the run"
    assert record.state == "finished", record
    assert [c.round for c in RunStore(registry).rounds("e2e")] == [1, 2, 3]
    resumes = [
        r["details"]["resume_after_round"]
        for r in audit_log.read(registry / "audit.jsonl")
        if r["action"] == "run.resume"
    ]
    # the run resumed after (not behind) what was committed when the SuperLink died
    assert resumes and resumes[0] >= at_kill.committed_round and record.starts >= 2
    reg = Registry(registry, create=False)
    (release,) = reg.releases()
    assert verify_release(reg, release).ok
    assert leftovers == [], f"processes outlived their SuperLink: {leftovers}"
