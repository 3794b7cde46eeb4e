"""Prometheus metrics served by the ServerApp process, and the JSON-lines audit log."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from prometheus_client.parser import text_string_to_metric_families

from fedcommons.client_sdk.client_app import app as fedcommons_client
from fedcommons.coordinator.config import RunConfig
from fedcommons.engines.inprocess import run_in_process
from fedcommons.errors import AuditLogError, ConfigError, RoundFailedError
from fedcommons.observability import audit_log, metrics
from fedcommons.wire import keys
from tests.processes import free_port


def _nan_client() -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        base = msg.content[keys.BASE_ARRAYS]
        delta = {n: Array(np.full_like(a.numpy(), np.nan)) for n, a in base.items()}
        content = RecordDict(
            {
                keys.DELTA_ARRAYS: ArrayRecord(delta),
                keys.REPLY_METRICS: MetricRecord({keys.NUM_EXAMPLES: 10}),
            }
        )
        return Message(content=content, reply_to=msg)

    return app


def _scrape(port: int) -> dict[str, float]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


@pytest.fixture(scope="module")
def metrics_port() -> int:
    """One metrics server per test process (prometheus-client serves a registry once)."""
    host, port = metrics.serve(free_port())
    assert host == "127.0.0.1"
    return port


def test_metrics_endpoint_counts_rounds_updates_bytes_and_releases_after_a_run(
    tmp_path: Path, metrics_port: int
) -> None:
    before = _scrape(metrics_port)
    config = RunConfig(rounds=2, local_epochs=1, registry=str(tmp_path / "reg"))
    result = run_in_process(config, [fedcommons_client] * 3)
    after = _scrape(metrics_port)

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert delta("fedcommons_rounds_total{outcome=completed}") == 2
    assert delta("fedcommons_updates_received_total") == 6
    assert delta("fedcommons_releases_published_total") == 1
    assert delta("fedcommons_round_duration_seconds_count") == 2
    assert delta("fedcommons_round_duration_seconds_sum") == pytest.approx(
        sum(r.seconds for r in result.reports), rel=1e-6
    )
    # 2 per-round validations + the final test split
    assert delta("fedcommons_validation_duration_seconds_count") == 3
    params = sum(v.numel() for v in result_weights_shapes(tmp_path))
    assert delta("fedcommons_upload_bytes_total") >= 6 * params * 4


def result_weights_shapes(tmp_path: Path):
    from fedcommons.releases.registry import Registry

    registry = Registry(tmp_path / "reg", create=False)
    return registry.load_weights(registry.releases()[0]).values()


def test_rejected_updates_are_counted_by_reason_and_failed_rounds_by_outcome(
    tmp_path: Path, metrics_port: int
) -> None:
    """Input tried: a client whose update is all NaN, with min-clients=2 of 2 nodes."""
    before = _scrape(metrics_port)
    config = RunConfig(rounds=1, local_epochs=1, min_clients=2, registry=str(tmp_path / "r"))
    with pytest.raises(RoundFailedError):
        run_in_process(config, [fedcommons_client, _nan_client()])
    after = _scrape(metrics_port)
    rejected = {k: v - before.get(k, 0.0) for k, v in after.items() if "rejected_total" in k}
    assert sum(rejected.values()) == 1
    assert rejected["fedcommons_updates_rejected_total{reason=non-finite}"] == 1
    assert (
        after["fedcommons_rounds_total{outcome=failed}"]
        - before.get("fedcommons_rounds_total{outcome=failed}", 0.0)
        == 1
    )

    records = list(audit_log.read(tmp_path / "r" / audit_log.FILE_NAME))
    actions = [(r["action"], r["outcome"]) for r in records]
    assert actions[0] == ("run.start", "started")
    assert actions[-3:] == [
        ("round.finish", "failed"),
        ("run.abort", "aborted"),
        ("run.end", "failed"),
    ]
    reject = next(r for r in records if r["action"] == "update.reject")
    assert reject["actor"].startswith("node:") and reject["round"] == 1
    assert audit_log.verify(tmp_path / "r" / audit_log.FILE_NAME) == len(records)


def test_audit_log_records_each_round_and_the_release_in_order(tmp_path: Path) -> None:
    config = RunConfig(rounds=2, local_epochs=1, registry=str(tmp_path / "reg"))
    result = run_in_process(config, [fedcommons_client] * 2)
    path = tmp_path / "reg" / audit_log.FILE_NAME
    records = list(audit_log.read(path))
    assert [(r["action"], r["round"]) for r in records] == [
        ("run.start", None),
        ("round.finish", 1),
        ("round.commit", 1),
        ("round.finish", 2),
        ("round.commit", 2),
        ("release.publish", None),
        ("run.end", None),
    ]
    assert records[-2]["release"] == f"{result.release.name} {result.release.version}"
    assert all(r["run_id"] == result.run_id for r in records)
    for record in records:
        assert {"timestamp", "actor", "action", "outcome"} <= record.keys()
        assert record["timestamp"].endswith("Z")


def test_audit_log_env_var_chooses_the_file_and_appends_across_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "elsewhere" / "audit.jsonl"
    monkeypatch.setenv(audit_log.ENV_PATH, str(target))
    for _ in range(2):
        run_in_process(
            RunConfig(rounds=1, local_epochs=1, registry=str(tmp_path / "reg")),
            [fedcommons_client],
        )
    assert not (tmp_path / "reg" / audit_log.FILE_NAME).exists()
    assert [r["action"] for r in audit_log.read(target)].count("run.start") == 2
    assert audit_log.verify(target) == 10  # per run: start, finish, commit, publish, end


def test_audit_log_verify_names_the_line_after_an_edited_record(tmp_path: Path) -> None:
    """Input tried: a log whose second record's outcome was changed after writing."""
    log = audit_log.AuditLog(tmp_path / "audit.jsonl")
    for n in range(3):
        log.record("round.finish", "completed", round=n + 1)
    lines = log.path.read_text().splitlines()
    edited = json.loads(lines[1])
    edited["outcome"] = "failed"
    lines[1] = json.dumps(edited)
    log.path.write_text("\n".join(lines) + "\n")
    with pytest.raises(AuditLogError, match=r"audit.jsonl:3: chain broken"):
        audit_log.verify(log.path)


def test_audit_log_verify_rejects_a_line_that_is_not_json(tmp_path: Path) -> None:
    """Input tried: a log with a truncated (non-JSON) last line."""
    log = audit_log.AuditLog(tmp_path / "audit.jsonl")
    log.record("run.start", "started")
    with log.path.open("a") as fh:
        fh.write('{"timestamp": "2026\n')
    with pytest.raises(AuditLogError, match=r":2 is not a JSON record"):
        audit_log.verify(log.path)


def test_audit_log_in_an_unwritable_place_raises_audit_log_error(tmp_path: Path) -> None:
    """Input tried: an audit log path below a regular file."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(AuditLogError, match="cannot open audit log"):
        audit_log.AuditLog(blocker / "audit.jsonl").record("run.start", "started")


def test_metrics_port_out_of_range_is_a_config_error() -> None:
    """Input tried: port 70000 for the metrics server."""
    metrics_server = metrics._server
    metrics._server = None
    try:
        with pytest.raises(ConfigError, match="metrics port"):
            metrics.serve(70000)
    finally:
        metrics._server = metrics_server


def test_metrics_env_with_a_bad_port_logs_and_does_not_fail(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Input tried: FEDCOMMONS_METRICS_PORT=not-a-port; the run must not fail on it."""
    monkeypatch.setenv(metrics.ENV_PORT, "not-a-port")
    metrics_server = metrics._server
    metrics._server = None
    try:
        assert metrics.serve_from_env() is None
    finally:
        metrics._server = metrics_server


def test_audit_log_command_verifies_the_chain_and_fails_on_a_broken_one(tmp_path: Path) -> None:
    """Input tried: `coordinator audit-log` on an intact log, then after deleting a record."""
    from typer.testing import CliRunner

    from fedcommons.cli import app

    log = audit_log.AuditLog(tmp_path / "audit.jsonl")
    for n in range(3):
        log.record("round.finish", "completed", round=n + 1)
    ok = CliRunner().invoke(app, ["coordinator", "audit-log", str(log.path)])
    assert ok.exit_code == 0 and "3 record(s), hash chain intact" in ok.output
    lines = log.path.read_text().splitlines()
    log.path.write_text("\n".join([lines[0], lines[2]]) + "\n")
    broken = CliRunner().invoke(app, ["coordinator", "audit-log", str(log.path)])
    assert isinstance(broken.exception, AuditLogError)
