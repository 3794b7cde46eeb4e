"""The MLflow mirror against real MLflow (SQLite backend): runs, metrics, model versions.

MLflow takes ~20 s to create the tables of a new SQLite store, so one migrated store is
made per session and copied for each test.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("mlflow", reason="MLflow is not installed (pip install '.[mlflow]')")

from mlflow import MlflowClient

from fedcommons.client_sdk.client_app import app as fedcommons_client
from fedcommons.coordinator.config import RunConfig
from fedcommons.engines.inprocess import run_in_process
from fedcommons.errors import ConfigError
from fedcommons.observability import audit_log
from fedcommons.releases.integrations.mlflow_mirror import ROUND_METRICS
from fedcommons.releases.registry import Registry

BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def migrated_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()  # creates the tables
    return path


@pytest.fixture
def tracking_uri(tmp_path: Path, migrated_store: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    db = tmp_path / "mlflow.db"
    shutil.copyfile(migrated_store, db)
    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root (./mlruns) stays in tmp
    return f"sqlite:///{db}"


@pytest.fixture
def closed_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]  # bound, never listening: connections are refused


def _config(tmp_path: Path, uri: str, **over: object) -> RunConfig:
    values: dict = {
        "rounds": 2,
        "local_epochs": 1,
        "registry": str(tmp_path / "reg"),
        "run_name": "nightly-7",
        "mlflow_tracking_uri": uri,
    }
    values.update(over)
    return RunConfig(**values)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "fedcommons"), *args], capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow
def test_a_run_shows_up_in_mlflow_with_params_round_metrics_card_and_a_model_version(
    tmp_path: Path, tracking_uri: str
) -> None:
    result = run_in_process(_config(tmp_path, tracking_uri), [fedcommons_client] * 3)
    release = result.release
    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name("digits")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["rounds"] == "2" and run.data.params["strategy"] == "fedavg"
    assert "signing-key" not in run.data.params
    assert "mlflow-tracking-uri" not in run.data.params
    assert run.data.tags["fedcommons.run_name"] == "nightly-7"
    history = client.get_metric_history(run.info.run_id, "val_accuracy")
    assert [(m.step, round(m.value, 6)) for m in history] == [
        (r.round, round(r.val_accuracy, 6)) for r in result.reports
    ]
    for key in ("val_loss", "accepted", "rejected", "sampled", "upload_bytes"):
        assert len(client.get_metric_history(run.info.run_id, key)) == 2, key
    assert [m.value for m in client.get_metric_history(run.info.run_id, "accepted")] == [3, 3]
    assert run.data.metrics["test_accuracy"] == pytest.approx(result.test_metrics["accuracy"])
    card = release.card_path.read_text()
    assert run.data.tags["mlflow.note.content"] == card
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "release")}
    assert artifacts == {
        "release/README.md",
        "release/manifest.json",
        "release/manifest.sig",
        "release/model.safetensors",
    }
    mv = client.get_model_version_by_alias("digits", "candidate")
    assert mv.run_id == run.info.run_id
    assert mv.tags["fedcommons.version"] == release.version == "1.0.0"
    assert mv.tags["fedcommons.manifest_sha256"] == release.manifest_sha256
    assert mv.tags["fedcommons.weights_sha256"] == release.weights_sha256
    local = client.download_artifacts(run.info.run_id, "release/model.safetensors", str(tmp_path))
    assert Path(local).read_bytes() == release.weights_path.read_bytes()


@pytest.mark.slow
def test_promote_moves_the_mlflow_alias_through_the_installed_cli(
    tmp_path: Path, tracking_uri: str
) -> None:
    run_in_process(_config(tmp_path, tracking_uri, run_name="a"), [fedcommons_client] * 2)
    second = run_in_process(
        _config(tmp_path, tracking_uri, run_name="b", base_release="1.0.0"),
        [fedcommons_client] * 2,
    ).release
    reg = str(tmp_path / "reg")
    done = _cli("release", "promote", "1.0.0", "--alias", "stable", "-r", reg,
                "--mlflow-tracking-uri", tracking_uri)  # fmt: skip
    assert done.returncode == 0, done.stderr
    client = MlflowClient(tracking_uri=tracking_uri)
    stable = client.get_model_version_by_alias("digits", "stable")
    candidate = client.get_model_version_by_alias("digits", "candidate")
    assert stable.tags["fedcommons.version"] == "1.0.0"
    assert candidate.tags["fedcommons.version"] == second.version
    assert len(client.search_model_versions("name = 'digits'")) == 2


@pytest.mark.slow
def test_a_tracking_server_that_is_down_fails_no_round_and_sync_mirrors_the_release_later(
    tmp_path: Path, tracking_uri: str, closed_port: int
) -> None:
    """Input tried: an MLflow URI whose port refuses connections, for the whole run."""
    down = f"http://127.0.0.1:{closed_port}"
    result = run_in_process(_config(tmp_path, down), [fedcommons_client] * 2)
    assert [r.round for r in result.reports] == [1, 2]
    reg = Registry(tmp_path / "reg", create=False)
    assert [r.version for r in reg.releases()] == ["1.0.0"]
    records = list(audit_log.read(tmp_path / "reg" / "audit.jsonl"))
    missed = [r["details"]["what"] for r in records if r["action"] == "mlflow.mirror"]
    assert "release digits 1.0.0" in missed
    assert any(m.startswith("round 1 metrics") for m in missed)
    done = _cli("release", "mlflow-sync", "-r", str(tmp_path / "reg"),
                "--mlflow-tracking-uri", tracking_uri)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "1 release(s) mirrored" in done.stdout
    client = MlflowClient(tracking_uri=tracking_uri)
    mv = client.get_model_version_by_alias("digits", "candidate")
    assert mv.tags["fedcommons.manifest_sha256"] == result.release.manifest_sha256
    history = client.get_metric_history(mv.run_id, "val_accuracy")
    assert [m.step for m in history] == [1, 2]
    again = _cli("release", "mlflow-sync", "-r", str(tmp_path / "reg"),
                 "--mlflow-tracking-uri", tracking_uri)  # fmt: skip
    assert "0 release(s) mirrored, 1 already in MLflow" in again.stdout


def test_a_tracking_uri_with_a_password_is_refused_before_round_1(tmp_path: Path) -> None:
    """Input tried: credentials inside the URI (they would land in the manifest)."""
    with pytest.raises(ConfigError, match="must not carry credentials"):
        _config(tmp_path, "https://alice:s3cret@mlflow.example:5000")


@pytest.mark.slow
def test_dp_line_mirrors_no_manifest_holding_per_node_fields(
    tmp_path: Path, tracking_uri: str
) -> None:
    dp = {"noise-multiplier": 1.0, "clip-norm": 1.0, "epsilon": 50.0, "delta": 1e-5}
    config = _config(  # one noisy round need not beat the starting weights
        tmp_path, tracking_uri, dp_params=dp, rounds=1, gate_first_release="record"
    )
    result = run_in_process(config, [fedcommons_client] * 3)
    client = MlflowClient(tracking_uri=tracking_uri)
    mv = client.get_model_version_by_alias("digits", "candidate")
    eps = client.get_metric_history(mv.run_id, "epsilon")
    central = result.release.manifest().privacy["central"]
    assert eps and eps[-1].value == pytest.approx(central["epsilon"])
    run = client.get_run(mv.run_id)
    assert set(run.data.metrics) <= ROUND_METRICS | {"test_accuracy", "test_loss"}
    assert not any("1000" in key for key in run.data.params)  # in-process node ids: 1000+
    manifest = result.release.manifest()
    artifacts = {a.path for a in client.list_artifacts(mv.run_id, "release")}
    if any(r.get("upload_bytes") for r in manifest.round_metrics):
        assert "release/manifest.json" not in artifacts
    assert "release/model.safetensors" in artifacts


def test_after_a_failure_live_calls_pause_and_the_pause_doubles(closed_port: int) -> None:
    """Input tried: three rounds against a refusing server; the mirror's clock is not faked."""
    from fedcommons.releases.integrations.mlflow_mirror import MlflowMirror

    mirror = MlflowMirror(f"http://127.0.0.1:{closed_port}", line="digits")
    mirror.run_started(1, {"run_name": "r", "config": {"rounds": 3}})
    first_pause = mirror.paused_until
    report = {"round": 1, "val_accuracy": 0.5, "rejected": {}, "upload_bytes": {"7": 10}}
    mirror.round_finished(report)  # skipped: the server is marked down
    assert mirror.not_mirrored == ["run start and parameters", "round 1 metrics"]
    assert mirror.pending_rounds == [1]  # kept for the next call that succeeds
    mirror.run_ended("finished", "1.0.0")  # always attempted: fails again, pause doubles
    assert mirror.paused_until - first_pause > mirror.retry_after_s
