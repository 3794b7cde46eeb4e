"""One-line hooks the round loop calls: Prometheus metrics, the audit log, run sinks.

:func:`run_started` binds the audit log of the current run and its *sinks* (context
variables, so concurrent in-process runs do not mix) and starts the metrics server when
configured; the other hooks update all of them. They are kept here so that the round
engine only gains a call per event.

A sink is any object with some of the methods ``run_started(run_id, details)``,
``round_finished(report, epsilon=None)``, ``release_published(release)`` and
``run_ended(outcome, detail)`` (the MLflow mirror is one,
:class:`fedcommons.releases.integrations.mlflow_mirror.MlflowMirror`). A sink that raises is logged
and skipped: a sink never fails a round or loses a release.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fedcommons.logs import get_logger
from fedcommons.observability import metrics
from fedcommons.observability.audit_log import AuditLog, default_path

log = get_logger("fedcommons.observability")

_run: contextvars.ContextVar[tuple[AuditLog, int] | None] = contextvars.ContextVar(
    "fedcommons_audit_run", default=None
)
_sinks: contextvars.ContextVar[tuple[Any, ...]] = contextvars.ContextVar(
    "fedcommons_run_sinks", default=()
)


def run_started(
    registry_dir: Path, run_id: int, details: dict[str, Any], *, sinks: Sequence[Any] = ()
) -> AuditLog:
    """Serve metrics if configured; open the audit log; record ``run.start``; bind ``sinks``."""
    metrics.serve_from_env()
    audit = AuditLog(default_path(registry_dir))
    _run.set((audit, run_id))
    _sinks.set(tuple(sinks))
    audit.record("run.start", "started", run_id=run_id, details=details)
    _notify("run_started", run_id, details)
    return audit


def _notify(event: str, *args: Any, **kwargs: Any) -> None:
    """Call ``event`` on every sink of the run that has it; a failing sink is logged only."""
    for sink in _sinks.get():
        method = getattr(sink, event, None)
        if method is None:
            continue
        try:
            method(*args, **kwargs)
        except Exception as exc:  # a sink is never allowed to fail the run
            log.warning("sink.failed", sink=type(sink).__name__, event=event, error=str(exc))
            _audit("sink.failed", event, details={"sink": type(sink).__name__, "error": str(exc)})


def audit(action: str, outcome: str, **kwargs: Any) -> None:
    """Record ``action`` in the current run's audit log (a no-op outside a run)."""
    _audit(action, outcome, **kwargs)


def _audit(action: str, outcome: str, **kwargs: Any) -> None:
    bound = _run.get()
    if bound is not None:
        audit, run_id = bound
        audit.record(action, outcome, run_id=run_id, **kwargs)


def reply_received(reply: Any) -> None:
    """Count a reply and its uploaded bytes (replies carrying an error have none)."""
    metrics.UPDATES_RECEIVED.inc()
    if not reply.has_error():
        metrics.UPLOAD_BYTES.inc(metrics.reply_bytes(reply.content))


def update_rejected(round_no: int, node_id: int, reason: str, detail: str) -> None:
    """Count a rejected update by reason and audit it."""
    metrics.UPDATES_REJECTED.labels(reason=reason).inc()
    _audit(
        "update.reject",
        reason,
        actor=f"node:{node_id}",
        round=round_no,
        details={"detail": detail},
    )


def round_finished(report: Any, *, epsilon: float | None = None) -> None:
    """Count a completed round, observe its duration, audit it, tell the sinks.

    ``epsilon``: the line's cumulative central-DP ε after this round (``None``: no DP).
    """
    metrics.ROUNDS.labels(outcome="completed").inc()
    metrics.ROUND_DURATION.observe(report.seconds)
    _audit(
        "round.finish",
        "completed",
        round=report.round,
        details={
            "sampled": report.sampled,
            "accepted": report.accepted,
            "rejected": report.rejected,
            "timed_out": report.timed_out,
            "val_accuracy": report.val_accuracy,
            "seconds": round(report.seconds, 3),
        },
    )
    _notify("round_finished", report, epsilon=epsilon)


def round_failed(round_no: int, error: Exception) -> None:
    """Count and audit a round that ended without an aggregate."""
    metrics.ROUNDS.labels(outcome="failed").inc()
    _audit("round.finish", "failed", round=round_no, details={"error": str(error)})


def round_retried(round_no: int, attempt: int, error: Exception) -> None:
    """Count and audit a round started again after a failed attempt (#8)."""
    metrics.ROUND_RETRIES.inc()
    _audit(
        "round.retry",
        "retrying",
        round=round_no,
        details={"attempt": attempt + 1, "error": str(error)},
    )


def run_aborted(round_no: int, error: Exception, attempts: int) -> None:
    """Audit a run aborted because a round failed ``attempts`` times."""
    _audit(
        "run.abort", "aborted", round=round_no, details={"attempts": attempts, "error": str(error)}
    )


def round_committed(run_name: str, round_no: int, seconds: float = 0.0) -> None:
    """Count and audit a durably committed round (``seconds``: the commit's wall time)."""
    metrics.ROUNDS_COMMITTED.inc()
    _audit(
        "round.commit",
        "committed",
        round=round_no,
        details={"run_name": run_name, "seconds": round(seconds, 4)},
    )


def run_resumed(run_name: str, committed_round: int) -> None:
    """Count and audit a run resumed after its last committed round."""
    metrics.RUNS_RESUMED.inc()
    _audit(
        "run.resume",
        "resumed",
        round=committed_round,
        details={"run_name": run_name, "resume_after_round": committed_round},
    )


def run_ended(run_name: str, outcome: str, detail: str) -> None:
    """Count and audit the end of a run: finished, failed or cancelled."""
    metrics.RUNS.labels(outcome=outcome).inc()
    _audit("run.end", outcome, details={"run_name": run_name, "detail": detail})
    _notify("run_ended", outcome, detail)


def release_published(release: Any) -> None:
    """Count and audit a published release."""
    metrics.RELEASES_PUBLISHED.inc()
    _audit(
        "release.publish",
        "published",
        release=f"{release.name} {release.version}",
        details={"weights_sha256": release.weights_sha256},
    )
    _notify("release_published", release)


@contextmanager
def validation_timer() -> Iterator[None]:
    """Observe the wall time of scoring a candidate."""
    started = time.perf_counter()
    try:
        yield
    finally:
        metrics.VALIDATION_DURATION.observe(time.perf_counter() - started)
