"""Scheduling: ``fedcommons round schedule/status/cancel`` and the scheduler's decisions.

The scheduler is driven with a submitter that runs each submitted run on the in-process
engine (the real ServerApp and ClientApps) and reports Flower-style statuses; on the
deployment engine ``FlowerSubmitter`` does the same with ``flwr run`` / ``flwr ls``.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedcommons.cli import app
from fedcommons.client_sdk.client_app import app as fedcommons_client
from fedcommons.coordinator import faults
from fedcommons.coordinator.config import RunConfig
from fedcommons.coordinator.runs import RunRecord, RunStore
from fedcommons.engines.inprocess import run_in_process
from fedcommons.engines.schedule import Scheduler
from fedcommons.observability import audit_log
from fedcommons.releases.registry import Registry

runner = CliRunner()
SMALL = ["-c", "local-epochs=1", "-c", "batch-size=32", "-c", "task.hidden=32"]


def _schedule(registry: Path, *args: str) -> dict:
    result = runner.invoke(
        app,
        ["round", "schedule", "--registry", str(registry), "--format", "json", *SMALL, *args],
    )
    assert result.exit_code == 0, result.output
    (record,) = json.loads(result.output)
    return record


class InProcessSubmitter:
    """Runs a submitted run to its end right away; a crashed one reads finished:failed."""

    def __init__(self, clients: int = 2) -> None:
        self.clients = clients
        self.statuses: dict[int, str] = {}
        self.submitted: list[str] = []

    def submit(self, record: RunRecord) -> int:
        run_id = 100 + len(self.statuses)
        self.submitted.append(record.name)
        try:
            run_in_process(RunConfig.from_flat(record.config), [fedcommons_client] * self.clients)
            self.statuses[run_id] = "finished:completed"
        except faults.InjectedFault:  # the ServerApp process died mid-run
            self.statuses[run_id] = "finished:failed"
        return run_id

    def status(self, run_id: int) -> str:
        return self.statuses[run_id]


def test_schedule_stores_the_full_run_config_and_status_shows_it(tmp_path: Path) -> None:
    record = _schedule(
        tmp_path / "reg",
        "--name",
        "nightly",
        "--rounds",
        "4",
        "--strategy",
        "fedavg",
        "-p",
        "server_momentum=0.5",
        "--min-clients",
        "2",
        "--deadline",
        "90",
        "--compression",
        "int8",
        "--on-round-failure",
        "retry",
    )
    assert (record["name"], record["state"], record["rounds"]) == ("nightly", "scheduled", 4)
    config = record["config"]
    assert config["strategy.server_momentum"] == 0.5 and config["round-timeout"] == 90.0
    assert config["compression"] == "int8" and config["on-round-failure"] == "retry"
    assert config["registry"] == str((tmp_path / "reg").resolve())
    table = runner.invoke(
        app, ["round", "status", "--registry", str(tmp_path / "reg")], env={"COLUMNS": "200"}
    )
    assert table.exit_code == 0 and "nightly" in table.output and "scheduled" in table.output
    actions = [r["action"] for r in audit_log.read(tmp_path / "reg" / "audit.jsonl")]
    assert actions == ["run.schedule"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--strategy", "no-such-rule"], "no-such-rule"),
        (["--base-release", "9.9.9"], "9.9.9"),
        (["--start-at", "next tuesday"], "ISO 8601"),
        (["--rounds", "0"], "rounds"),
        (["-p", "server_lr=-1"], "server_lr"),
    ],
)
def test_bad_schedule_input_exits_2_and_stores_nothing(
    tmp_path: Path, args: list[str], message: str
) -> None:
    """Input tried: an unknown strategy, a missing base release, a malformed start time,
    zero rounds, a negative server learning rate."""
    from fedcommons.cli import main

    registry = tmp_path / "reg"
    run_in_process(RunConfig(rounds=1, local_epochs=1, registry=str(registry)), [fedcommons_client])
    argv = ["fedcommons", "round", "schedule", "--registry", str(registry), *SMALL, *args]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("sys.argv", argv)
        with pytest.raises(SystemExit) as exit_info:
            main()
    assert exit_info.value.code == 2
    assert [r.name for r in RunStore(registry).list()] == [
        r.name for r in RunStore(registry).list() if r.state == "finished"
    ]


def test_scheduler_submits_due_runs_only(tmp_path: Path) -> None:
    registry = tmp_path / "reg"
    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    _schedule(registry, "--name", "now", "--rounds", "1")
    _schedule(registry, "--name", "later", "--rounds", "1", "--start-at", later)
    submitter = InProcessSubmitter()
    actions = Scheduler(registry, submitter).tick()
    assert [(a.run, a.action) for a in actions] == [("now", "submitted")]
    store = RunStore(registry)
    assert store.get("now").state == "finished" and store.get("later").state == "scheduled"
    assert len(Registry(registry).releases()) == 1
    assert Scheduler(registry, submitter).tick() == []  # nothing else is due


def test_scheduler_resumes_a_run_whose_serverapp_died(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = tmp_path / "reg"
    _schedule(registry, "--name", "r", "--rounds", "2")
    faults.reset()
    monkeypatch.setenv(faults.ENV, "aggregating:2:raise")
    scheduler = Scheduler(registry, InProcessSubmitter())
    assert [a.action for a in scheduler.tick()] == ["submitted"]
    record = RunStore(registry).get("r")
    assert (record.state, record.committed_round) == ("running", 1)
    monkeypatch.delenv(faults.ENV)
    actions = scheduler.tick()
    assert [(a.action, a.detail) for a in actions] == [("resubmitted", "finished:failed")]
    record = RunStore(registry).get("r")
    assert (record.state, record.starts) == ("finished", 2)
    resumes = [r for r in audit_log.read(registry / "audit.jsonl") if r["action"] == "run.resume"]
    assert [r["details"]["resume_after_round"] for r in resumes] == [1]


def test_scheduler_gives_up_after_max_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = tmp_path / "reg"
    _schedule(registry, "--name", "r", "--rounds", "2")
    scheduler = Scheduler(registry, InProcessSubmitter(), max_starts=2)
    for _ in range(2):
        faults.reset()
        monkeypatch.setenv(faults.ENV, "collecting:2:raise")
        scheduler.tick()
    monkeypatch.delenv(faults.ENV)
    (action,) = scheduler.tick()
    assert action.action == "gave-up"
    record = RunStore(registry).get("r")
    assert record.state == "failed" and "giving up" in record.error
    assert Registry(registry).releases() == []


def test_cancel_a_scheduled_run_and_status_json(tmp_path: Path) -> None:
    registry = tmp_path / "reg"
    _schedule(registry, "--name", "r", "--rounds", "1")
    result = runner.invoke(app, ["round", "cancel", "r", "--registry", str(registry)])
    assert result.exit_code == 0 and "cancelled" in result.output
    out = runner.invoke(
        app, ["round", "status", "r", "--registry", str(registry), "--format", "json"]
    )
    (record,) = json.loads(out.output)
    assert (record["state"], record["progress"]) == ("cancelled", "cancelled after round 0 of 1")
    assert Scheduler(registry, InProcessSubmitter()).tick() == []


def test_cancel_of_an_unknown_or_finished_run_is_a_typed_error(tmp_path: Path) -> None:
    """Input tried: cancelling a run name that does not exist, then a finished run."""
    from fedcommons.errors import RunStateError

    registry = tmp_path / "reg"
    _schedule(registry, "--name", "r", "--rounds", "1")
    Scheduler(registry, InProcessSubmitter()).tick()
    store = RunStore(registry)
    with pytest.raises(RunStateError, match="no run 'nope'"):
        store.request_cancel("nope")
    with pytest.raises(RunStateError, match="finished"):
        store.request_cancel("r")
    assert store.get("r").state == "finished"


def test_status_rounds_lists_each_committed_round(tmp_path: Path) -> None:
    registry = tmp_path / "reg"
    _schedule(registry, "--name", "r", "--rounds", "2")
    Scheduler(registry, InProcessSubmitter()).tick()
    out = runner.invoke(
        app, ["round", "status", "r", "--rounds", "--registry", str(registry), "--format", "json"]
    )
    data = json.loads(out.output)
    assert data["progress"].startswith("finished")
    assert [(c["round"], c["attempts"]) for c in data["committed_rounds"]] == [(1, 1), (2, 1)]
