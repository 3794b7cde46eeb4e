"""A whole federation run: every round, committed one by one, then the release.

One code path for every engine: Flower's simulation engine (``fedcommons demo``) and its
deployment engine (``flwr run`` against a SuperLink) both call :func:`run_federation`
from the coordinator's ServerApp. Each round is plaintext (:mod:`.round`) or secure
(:mod:`.secure_round`); after the last one the candidate is scored on the test split and
handed to :func:`~.publish.publish`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

import structlog
import torch
from flwr.serverapp import Grid
from flwr.supercore.run import RunNotRunningException

from fedcommons.coordinator import faults
from fedcommons.coordinator.config import RunConfig
from fedcommons.coordinator.prepare import PreparedRun, prepare_run
from fedcommons.coordinator.publish import publish
from fedcommons.coordinator.round import RoundReport, evaluate, public_report, run_round
from fedcommons.coordinator.runs import DurableRun
from fedcommons.coordinator.secure_round import run_secure_round
from fedcommons.errors import (
    ConfigError,
    RoundFailedError,
    RunCancelledError,
)
from fedcommons.logs import get_logger
from fedcommons.observability import events as observe
from fedcommons.privacy.disclosure import PrivateRoundLog, private_dir
from fedcommons.releases.registry import Release

log = get_logger("fedcommons.coordinator")


@dataclass
class FederationResult:
    """The outcome of a whole run."""

    release: Release
    reports: list[RoundReport]
    test_metrics: dict[str, float]
    run_id: int


class RunObserver(Protocol):
    """Receives progress events (the CLI's progress display implements it)."""

    def on_start(self, config: RunConfig, run_id: int) -> None:
        """Called once the run is validated, before round 1."""

    def on_round(self, report: RoundReport) -> None:
        """Called after each round's candidate was scored."""


def run_federation(
    grid: Grid,
    config: RunConfig,
    *,
    run_id: int = 0,
    observer: RunObserver | None = None,
    prepared: PreparedRun | None = None,
) -> FederationResult:
    """Run every round of ``config`` on ``grid`` and publish the release.

    Each finished round is committed (:class:`~fedcommons.coordinator.runs.DurableRun`);
    a run started again under the same ``run-name`` resumes after its last committed
    round. A round short of ``min-clients`` at its deadline is retried or aborts the run
    (``on-round-failure``); a cancelled run stops before its next round. A run that
    does not finish publishes nothing.
    """
    with structlog.contextvars.bound_contextvars(run_id=run_id):
        prepared = prepared or prepare_run(config)
        if prepared.released:
            raise ConfigError("this PreparedRun already served a run: call prepare_run again")
        config = prepared.config
        if prepared.privacy is not None:
            prepared.privacy.run_id = run_id
        durable = DurableRun(prepared, run_id)
        resumed = durable.open()
        prepared.release_weights()  # resumed.weights are the run's own from here
        if prepared.privacy is not None:
            prepared.privacy.run_tag = prepared.run_tag
        dp_line = prepared.privacy is not None and prepared.privacy.central is not None
        private = private_dir(config.registry_path, config.private_dir)
        private_log = PrivateRoundLog(private)
        if observer:
            observer.on_start(config, run_id)
        log.info(
            "run.started",
            task=config.task,
            strategy=config.strategy,
            rounds=config.rounds,
            line=config.line,
            run_name=durable.name,
            resume_after=resumed.next_round - 1,
        )
        observe.run_started(  # a DP line's audit log names nodes: kept out of the registry
            private if dp_line else config.registry_path,
            run_id,
            {"config": config.to_flat(), "run_name": durable.name},
            sinks=run_sinks(config),
        )
        if resumed.next_round > 1:
            observe.run_resumed(durable.name, resumed.next_round - 1)
        weights, resumed.weights = resumed.weights, {}  # held here only: no copy pinned
        reports = [RoundReport(**r) for r in resumed.reports]
        contributors: set[int] = set(resumed.contributors)
        try:
            for round_no in range(resumed.next_round, config.rounds + 1):
                if durable.cancel_requested():
                    raise RunCancelledError(
                        f"run {durable.name!r} cancelled by the operator after round "
                        f"{round_no - 1}; nothing was published"
                    )
                with structlog.contextvars.bound_contextvars(round=round_no):
                    weights, report, nodes, attempts = _run_round_with_policy(
                        grid, prepared, weights, round_no
                    )
                    # what the registry may hold of the round (DP lines: nothing per node)
                    public = public_report(report, prepared.privacy) if dp_line else report
                    published_nodes = set() if dp_line else nodes
                    commit_started = time.monotonic()
                    durable.commit(round_no, weights, public, published_nodes, attempts)
                    commit_seconds = time.monotonic() - commit_started
                    _record_private(private_log, durable.name, report, nodes, prepared)
                observe.round_finished(report, epsilon=_epsilon_spent(prepared))
                observe.round_committed(durable.name, round_no, commit_seconds)
                reports.append(public)
                contributors |= published_nodes
                if observer:
                    observer.on_round(report)
            test = evaluate(prepared.task, weights, prepared.task.test_loader())
            release = durable.published()  # a crash after publishing, before finishing
            if release is None:
                release = publish(prepared, weights, reports, test, len(contributors), run_id)
                observe.release_published(release)
            durable.finish(release)
        except RunCancelledError as exc:
            durable.fail("cancelled", str(exc))
            observe.run_ended(durable.name, "cancelled", str(exc))
            log.warning("run.cancelled", run_name=durable.name)
            raise
        except faults.InjectedFault:
            raise  # a simulated crash: like SIGKILL, it records nothing
        except (KeyboardInterrupt, SystemExit, RunNotRunningException) as exc:
            # The process is being stopped (SIGINT/SIGTERM: Flower's ServerApp raises SIGINT
            # on itself when its SuperExec, or the SuperLink's authentication, goes away), or
            # the SuperLink ended the Flower run under it (its heartbeat expired). Like a
            # crash it leaves the run resumable after its last committed round, so a
            # scheduler submits it again; "failed" would keep it stopped for good.
            observe.run_ended(durable.name, "interrupted", type(exc).__name__)
            log.warning("run.interrupted", run_name=durable.name, signal=type(exc).__name__)
            raise
        except BaseException as exc:
            durable.fail("failed", f"{type(exc).__name__}: {exc}")
            observe.run_ended(durable.name, "failed", f"{type(exc).__name__}: {exc}")
            raise
        observe.run_ended(durable.name, "finished", release.version)
        log.info(
            "release.published",
            name=release.name,
            version=release.version,
            sha256=release.weights_sha256,
            test_accuracy=test.get("accuracy"),
            run_name=durable.name,
        )
        return FederationResult(release, reports, test, run_id)


def run_sinks(config: RunConfig) -> list[object]:
    """The run's event sinks besides metrics and audit log: the MLflow mirror if configured."""
    if not config.mlflow_tracking_uri:
        return []
    from fedcommons.releases.integrations.mlflow_mirror import MlflowMirror

    return [
        MlflowMirror(
            config.mlflow_tracking_uri,
            line=config.line,
            experiment=config.mlflow_experiment,
            audit=observe.audit,
        )
    ]


def _epsilon_spent(prepared: PreparedRun) -> float | None:
    """The line's cumulative central-DP ε after the last committed round (``None``: no DP)."""
    if prepared.privacy is None or prepared.privacy.central is None:
        return None
    return prepared.privacy.spent()


def _record_private(
    log_: PrivateRoundLog,
    run_name: str,
    report: RoundReport,
    nodes: set[int],
    prepared: PreparedRun,
) -> None:
    """Keep the round's operational record (node ids, counts, spends) in private state."""
    record: dict[str, object] = {
        "run_name": run_name,
        "line": prepared.config.line,
        "round": report.round,
        "contributors": sorted(int(n) for n in nodes),
        "report": {
            "sampled": report.sampled,
            "accepted": report.accepted,
            "rejected": report.rejected,
            "timed_out": report.timed_out,
            "connected": report.connected,
            "examples": report.examples,
            "upload_bytes": report.upload_bytes,
        },
    }
    if prepared.privacy is not None and prepared.privacy.private_round:
        record["privacy"] = prepared.privacy.private_round
        prepared.privacy.private_round = {}
    log_.append(record)


def _run_round_with_policy(
    grid: Grid, prepared: PreparedRun, weights: dict[str, torch.Tensor], round_no: int
) -> tuple[dict[str, torch.Tensor], RoundReport, set[int], int]:
    """Play one round (plaintext or secure), retried per ``on-round-failure``.

    ``round-retries`` bounds the retries.

    Returns the round's result and the number of attempts it took. Each failed attempt
    is logged, counted and audited; the last one re-raises (the run aborts).
    """
    config = prepared.config
    attempt = 0
    while True:
        prepared.attempt = attempt
        if prepared.privacy is not None:
            prepared.privacy.staged.clear()  # a failed attempt releases nothing
        try:
            # secure aggregation (#7): the coordinator sees only the sum
            play = run_secure_round if config.secagg else run_round
            new_weights, report, nodes = play(grid, prepared, weights, round_no)
            return new_weights, report, nodes, attempt + 1
        except RoundFailedError as exc:
            retry = config.on_round_failure == "retry" and attempt < config.round_retries
            observe.round_failed(round_no, exc)
            if not retry:
                observe.run_aborted(round_no, exc, attempt + 1)
                log.error("round.aborted", attempts=attempt + 1, error=str(exc))
                raise
            attempt += 1
            observe.round_retried(round_no, attempt, exc)
            log.warning(
                "round.retry", attempt=attempt + 1, of=config.round_retries + 1, error=str(exc)
            )
        finally:
            prepared.attempt = 0
