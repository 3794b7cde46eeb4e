"""Durable rounds: commit per round, resume after a crash, retry/abort policy, cancel.

Crashes here are simulated in-process with ``FEDCOMMONS_FAULT=<point>:<round>:raise`` (an
exception no handler catches: the open transaction rolls back and nothing after the
point runs); tests/test_crash_recovery.py kills real processes with SIGKILL.
"""

from __future__ import annotations

import functools
import json
import sqlite3
from pathlib import Path

import pytest
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedcommons.client_sdk.client_app import app as fedcommons_client
from fedcommons.coordinator import faults
from fedcommons.coordinator.config import RunConfig
from fedcommons.coordinator.runs import RunStore
from fedcommons.engines.inprocess import run_in_process
from fedcommons.errors import (
    CheckpointError,
    ConfigError,
    FaultSpecError,
    RoundFailedError,
    RunCancelledError,
    RunStateError,
)
from fedcommons.observability import audit_log
from fedcommons.privacy.ledger import PrivacyLedger, ledger_path
from fedcommons.privacy.line import LinePrivacy
from fedcommons.releases.registry import Registry


def _config(registry: Path, **over: object) -> RunConfig:
    flat: dict[str, object] = {
        "rounds": 3,
        "local-epochs": 1,
        "batch-size": 32,
        "registry": str(registry),
        "run-name": "r1",
        "compression": "topk:0.1+int8",
        "strategy.server_momentum": 0.5,
        "task.hidden": "32",
    }
    flat.update(over)
    return RunConfig.from_flat(flat)


@pytest.fixture
def crash(monkeypatch: pytest.MonkeyPatch):
    """``crash("committing:2")`` arms an in-process crash at that point."""

    def arm(spec: str) -> None:
        faults.reset()
        monkeypatch.setenv(faults.ENV, f"{spec}:raise")

    yield arm
    faults.reset()


def _crash_run(crash, monkeypatch, spec: str, config: RunConfig, clients: list) -> None:
    """Run ``config`` until the fault ``spec`` fires, then disarm it."""
    crash(spec)
    with pytest.raises(faults.InjectedFault):
        run_in_process(config, clients)
    monkeypatch.delenv(faults.ENV)


def _interrupted_then_resumed(registry: Path, spec: str, crash, monkeypatch, **over: object):
    _crash_run(crash, monkeypatch, spec, _config(registry, **over), [fedcommons_client] * 3)
    record = RunStore(registry).find("r1")
    committed = record.committed_round if record else 0
    return committed, run_in_process(_config(registry, **over), [fedcommons_client] * 3)


@pytest.mark.parametrize(
    ("spec", "committed_at_crash"),
    [("collecting:2", 1), ("aggregating:2", 1), ("committing:2", 1), ("committed:2", 2)],
)
def test_crash_at_each_point_resumes_to_the_uninterrupted_release(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, crash, spec: str, committed_at_crash: int
) -> None:
    monkeypatch.setenv("FEDCOMMONS_STATE_DIR", str(tmp_path / "state-a"))
    baseline = run_in_process(_config(tmp_path / "a"), [fedcommons_client] * 3)
    monkeypatch.setenv("FEDCOMMONS_STATE_DIR", str(tmp_path / "state-b"))
    committed, resumed = _interrupted_then_resumed(tmp_path / "b", spec, crash, monkeypatch)
    assert committed == committed_at_crash
    assert resumed.release.weights_sha256 == baseline.release.weights_sha256
    store = RunStore(tmp_path / "b")
    assert [c.round for c in store.rounds("r1")] == [1, 2, 3]
    assert store.get("r1").state == "finished"
    resume = [
        r for r in audit_log.read(tmp_path / "b" / "audit.jsonl") if r["action"] == "run.resume"
    ]
    assert [r["details"]["resume_after_round"] for r in resume] == [committed_at_crash]
    # the checkpoints are gone once the release holds the weights
    assert not (tmp_path / "b" / "runs" / "r1").exists()


@pytest.mark.parametrize("spec", ["committing:2", "committed:2"])
def test_dp_run_resumed_after_a_crash_counts_every_round_once_in_the_ledger(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, crash, spec: str
) -> None:
    """The ledger holds exactly the committed rounds; ε equals the uninterrupted run's."""
    monkeypatch.setattr(
        LinePrivacy, "__init__", functools.partialmethod(LinePrivacy.__init__, noise_seed=7)
    )
    dp = {
        "dp.noise-multiplier": 0.5,
        "dp.clip-norm": 0.05,
        "dp.epsilon": 1000.0,
        "dp.delta": 1e-5,
        "dp.sampling": "fixed",
        "gate-first-release": "record",  # the ledger is tested, not the gate
    }
    monkeypatch.setenv("FEDCOMMONS_STATE_DIR", str(tmp_path / "state-a"))
    baseline = run_in_process(_config(tmp_path / "a", **dp), [fedcommons_client] * 3)
    monkeypatch.setenv("FEDCOMMONS_STATE_DIR", str(tmp_path / "state-b"))
    _, resumed = _interrupted_then_resumed(tmp_path / "b", spec, crash, monkeypatch, **dp)
    entries = PrivacyLedger(ledger_path(tmp_path / "b", "digits")).entries()
    assert [(e["round"], e["run_name"]) for e in entries] == [(1, "r1"), (2, "r1"), (3, "r1")]
    assert resumed.release.weights_sha256 == baseline.release.weights_sha256
    want = baseline.release.manifest().privacy["central"]["epsilon"]
    assert resumed.release.manifest().privacy["central"]["epsilon"] == pytest.approx(want)
    assert resumed.release.manifest().privacy["rounds_this_run"] == 3


def test_finished_run_cannot_be_started_again(tmp_path: Path) -> None:
    """Input tried: the run-name of a run that already published its release."""
    run_in_process(_config(tmp_path / "r", rounds=1), [fedcommons_client] * 2)
    with pytest.raises(RunStateError, match="finished already"):
        run_in_process(_config(tmp_path / "r", rounds=1), [fedcommons_client] * 2)
    assert len(Registry(tmp_path / "r").releases()) == 1


def test_resume_with_another_configuration_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, crash
) -> None:
    """Input tried: the same run-name restarted with a different learning rate."""
    _crash_run(crash, monkeypatch, "committed:1", _config(tmp_path / "r"), [fedcommons_client] * 2)
    with pytest.raises(RunStateError, match="differs in: lr"):
        run_in_process(_config(tmp_path / "r", lr=0.5), [fedcommons_client] * 2)
    assert RunStore(tmp_path / "r").get("r1").committed_round == 1


def test_checkpoint_that_does_not_match_its_commit_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, crash
) -> None:
    """Input tried: a committed round's checkpoint file with one byte changed."""
    _crash_run(crash, monkeypatch, "collecting:2", _config(tmp_path / "r"), [fedcommons_client] * 2)
    (commit,) = RunStore(tmp_path / "r").rounds("r1")
    path = tmp_path / "r" / commit.checkpoint_path
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match its commit"):
        run_in_process(_config(tmp_path / "r"), [fedcommons_client] * 2)
    assert RunStore(tmp_path / "r").get("r1").committed_round == 1


def _flaky_client(failures: int) -> ClientApp:
    """The fedcommons client, except that its first ``failures`` calls raise."""
    calls = {"n": 0}
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        calls["n"] += 1
        if calls["n"] <= failures:
            raise RuntimeError("site offline")
        return fedcommons_client(msg, context)

    return app


def test_round_short_of_min_clients_is_retried_and_the_run_completes(tmp_path: Path) -> None:
    config = _config(tmp_path / "r", rounds=2, **{"min-clients": 2, "on-round-failure": "retry"})
    result = run_in_process(config, [fedcommons_client, _flaky_client(failures=1)])
    commits = RunStore(tmp_path / "r").rounds("r1")
    assert [(c.round, c.attempts) for c in commits] == [(1, 2), (2, 1)]
    assert result.reports[0].accepted == 2
    actions = [r["action"] for r in audit_log.read(tmp_path / "r" / "audit.jsonl")]
    assert actions.count("round.retry") == 1 and "run.abort" not in actions


def test_retries_exhausted_abort_the_run_keeping_committed_rounds(tmp_path: Path) -> None:
    """Input tried: one of two sites (min-clients 2) fails from round 2 on; 1 retry."""
    flaky = ClientApp()
    calls = {"n": 0}

    @flaky.train()
    def train(msg: Message, context: Context) -> Message:
        calls["n"] += 1
        if calls["n"] >= 2:
            raise RuntimeError("site offline")
        return fedcommons_client(msg, context)

    config = _config(
        tmp_path / "r",
        **{"min-clients": 2, "on-round-failure": "retry", "round-retries": 1},
    )
    with pytest.raises(RoundFailedError, match="round 2"):
        run_in_process(config, [fedcommons_client, flaky])
    record = RunStore(tmp_path / "r").get("r1")
    assert (record.state, record.committed_round) == ("failed", 1)
    assert Registry(tmp_path / "r").releases() == []
    records = list(audit_log.read(tmp_path / "r" / "audit.jsonl"))
    assert [r["action"] for r in records].count("round.retry") == 1
    abort = next(r for r in records if r["action"] == "run.abort")
    assert abort["round"] == 2 and abort["details"]["attempts"] == 2
    # once the site is back, the same run resumes after round 1 and publishes
    result = run_in_process(config, [fedcommons_client, fedcommons_client])
    assert RunStore(tmp_path / "r").get("r1").state == "finished"
    assert [r.round for r in result.reports] == [1, 2, 3]


def test_abort_policy_fails_at_the_first_short_round(tmp_path: Path) -> None:
    config = _config(tmp_path / "r", rounds=2, **{"min-clients": 2})
    with pytest.raises(RoundFailedError, match="round 1"):
        run_in_process(config, [fedcommons_client, _flaky_client(failures=1)])
    actions = [r["action"] for r in audit_log.read(tmp_path / "r" / "audit.jsonl")]
    assert "round.retry" not in actions and "run.abort" in actions


def test_cancel_stops_the_run_after_its_current_round_and_publishes_nothing(
    tmp_path: Path,
) -> None:
    registry = tmp_path / "r"

    class CancelAfterRound1:
        def on_start(self, config: RunConfig, run_id: int) -> None:
            pass

        def on_round(self, report) -> None:  # the operator runs `round cancel` meanwhile
            if report.round == 1:
                RunStore(registry).request_cancel("r1")

    with pytest.raises(RunCancelledError, match="after round 1"):
        run_in_process(_config(registry), [fedcommons_client] * 2, observer=CancelAfterRound1())
    record = RunStore(registry).get("r1")
    assert (record.state, record.committed_round) == ("cancelled", 1)
    assert Registry(registry).releases() == []
    with pytest.raises(RunStateError, match="cancelled"):
        run_in_process(_config(registry), [fedcommons_client] * 2)


def test_unnamed_run_gets_a_durable_name_recorded_in_its_manifest(tmp_path: Path) -> None:
    config = _config(tmp_path / "r", rounds=1, **{"run-name": ""})
    result = run_in_process(config, [fedcommons_client] * 2)
    name = result.release.manifest().config["run-name"]
    assert name.startswith("digits-")
    assert (
        RunStore(tmp_path / "r").get(name).progress == f"finished: digits {result.release.version}"
    )


@pytest.mark.parametrize(
    "spec", ["boom:1", "collecting", "collecting:0", "collecting:1:explode", "collecting:x"]
)
def test_malformed_fault_spec_is_a_typed_error_before_round_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spec: str
) -> None:
    """Input tried: FEDCOMMONS_FAULT values with an unknown point, no round, round 0, an
    unknown action, a non-numeric round."""
    monkeypatch.setenv(faults.ENV, spec)
    with pytest.raises(FaultSpecError):
        run_in_process(_config(tmp_path / "r"), [fedcommons_client])
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    ("key", "value"),
    [("on-round-failure", "ignore"), ("round-retries", -1), ("run-name", "../etc")],
)
def test_bad_round_policy_keys_are_config_errors(tmp_path: Path, key: str, value: object) -> None:
    """Input tried: an unknown failure policy, negative retries, a run name with a path."""
    with pytest.raises(ConfigError, match=key):
        _config(tmp_path / "r", **{key: value})


def test_schema_2_registry_gains_the_run_tables_and_keeps_its_releases(tmp_path: Path) -> None:
    run_in_process(_config(tmp_path / "r", rounds=1), [fedcommons_client])
    db = sqlite3.connect(tmp_path / "r" / "index.sqlite")
    db.executescript("DROP TABLE run_rounds; DROP TABLE runs; PRAGMA user_version = 2;")
    db.close()
    store = RunStore(tmp_path / "r")
    assert store.list() == []
    assert [r.version for r in store.registry.releases()] == ["1.0.0"]


def test_status_json_round_trips_through_the_store(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "r", create=True)
    record = store.schedule(_config(tmp_path / "r", **{"run-name": "nightly"}))
    data = json.loads(json.dumps(record.to_dict()))
    assert (data["name"], data["state"], data["progress"]) == ("nightly", "scheduled", "scheduled")
    assert data["config"]["rounds"] == 3


def test_a_second_coordinator_on_the_same_run_fences_off_the_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, crash
) -> None:
    """Input tried: the run started again while its first coordinator still runs."""
    from fedcommons.coordinator.prepare import prepare_run
    from fedcommons.coordinator.round import RoundReport
    from fedcommons.coordinator.runs import DurableRun

    _crash_run(crash, monkeypatch, "committed:1", _config(tmp_path / "r"), [fedcommons_client] * 2)
    config = _config(tmp_path / "r", **{"task.num-partitions": 2})
    first, second = prepare_run(config), prepare_run(config)
    old = DurableRun(first, flower_run_id=7)
    old.open()
    DurableRun(second, flower_run_id=8).open()
    report = RoundReport(2, 2, 2, {}, 0, 10, 0.1, 0.1, 0.5, 1.0)
    with pytest.raises(RunStateError, match="started again by another coordinator"):
        old.commit(2, first.weights, report, {1000})
    assert RunStore(tmp_path / "r").get("r1").committed_round == 1


def test_flower_run_ids_beyond_int64_are_stored_exactly(tmp_path: Path) -> None:
    """Input tried: a Flower run id of 2**64 - 1 (Flower's run ids are unsigned 64-bit)."""
    store = RunStore(tmp_path / "r", create=True)
    store.schedule(_config(tmp_path / "r"))
    store.claim("r1")
    store.set_flower_run("r1", 2**64 - 1, only_if_unset=True)
    assert store.get("r1").flower_run_id == 2**64 - 1


@pytest.mark.parametrize("spec", ["collecting:2", "aggregating:2"])
def test_secure_aggregation_run_resumes_after_a_crash_with_each_round_once_in_the_ledger(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, crash, spec: str
) -> None:
    """Input tried: a SecAgg+ round with central DP interrupted mid-round, then restarted."""
    over = {
        "secagg": True,
        "compression": "dense",
        "strategy": "fedavg",
        "strategy.server_momentum": 0.0,
        "dp.noise-multiplier": 0.5,
        "dp.clip-norm": 0.05,
        "dp.epsilon": 1000.0,
        "dp.delta": 1e-5,
        "dp.sampling": "fixed",
        "gate-first-release": "record",  # the ledger is tested, not the gate
    }
    committed, resumed = _interrupted_then_resumed(tmp_path, spec, crash, monkeypatch, **over)
    assert committed == 1
    entries = PrivacyLedger(ledger_path(tmp_path, "digits")).entries()
    assert [(e["round"], e["run_name"]) for e in entries] == [(1, "r1"), (2, "r1"), (3, "r1")]
    assert resumed.release.manifest().privacy["rounds_this_run"] == 3


def test_fault_fires_once_per_marker_file_so_a_restarted_coordinator_goes_past_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "fault-reached"
    monkeypatch.setenv(faults.ENV, "aggregating:2:raise")
    monkeypatch.setenv(faults.ENV_MARKER, str(marker))
    faults.reset()
    faults.reached("aggregating", 1)  # another round: nothing
    with pytest.raises(faults.InjectedFault):
        faults.reached("aggregating", 2)
    faults.reset()  # a new coordinator process, same marker file
    faults.reached("aggregating", 2)
    assert marker.read_text().count("point=aggregating round=2 ") == 1
    faults.reset()
