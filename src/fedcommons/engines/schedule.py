"""The scheduler: start scheduled runs when due, restart runs whose coordinator died.

``fedcommons round schedule`` stores a run in the registry (state ``scheduled``); the
scheduler inside ``fedcommons coordinator start`` (setting ``registry``) polls the
registry and, per run:

- ``scheduled`` and due (``not_before`` passed): submits it to the SuperLink as a Flower
  run (``flwr run`` with the stored run config, ``run-name`` included) and marks it
  ``running``; the ServerApp takes it from there (it commits each round).
- ``running`` whose Flower run has ended (``finished:*``, or unknown to the SuperLink
  after a restart) while the registry still says ``running``: the ServerApp died
  mid-run (killed, machine lost). The scheduler submits it again, which resumes after
  the last committed round — at most ``max_starts`` starts in all, then the run is
  marked ``failed``.

Runs the ServerApp ended itself (``finished``, ``failed``, ``cancelled``) are left alone.
How a run is submitted and how its Flower status is read are injected
(:class:`~fedcommons.engines.submission.FlowerSubmitter` on the deployment engine), so
one scheduler serves any engine.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from fedcommons.coordinator.runs import RunRecord, RunStore
from fedcommons.errors import FedcommonsError
from fedcommons.logs import get_logger
from fedcommons.observability import audit_log

log = get_logger("fedcommons.scheduler")

#: Flower run status of a run the SuperLink no longer knows (e.g. a fresh database).
UNKNOWN = "unknown"


class Submitter(Protocol):
    """Submits runs to an engine and reports their status."""

    def submit(self, record: RunRecord) -> int:
        """Start ``record``'s run config as a new run; return the engine's run id."""

    def status(self, run_id: int) -> str:
        """Flower-style status: ``pending``, ``running``, ``finished:completed``, ..."""


@dataclass
class Action:
    """What one scheduler tick did to one run."""

    run: str
    action: str  # submitted | resubmitted | submit-failed | gave-up | cancelled
    flower_run_id: int = 0
    detail: str = ""


def _due(not_before: str, now: datetime) -> bool:
    if not not_before:
        return True
    when = datetime.fromisoformat(not_before)
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when <= now


class Scheduler:
    """Polls one registry's runs and drives them through ``submitter``."""

    def __init__(
        self,
        registry: Path | str,
        submitter: Submitter,
        *,
        max_starts: int = 3,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.registry = Path(registry).expanduser()
        self.submitter = submitter
        self.max_starts = max_starts
        self.clock = clock
        self._submitted: dict[str, int] = {}  # run -> submissions by this scheduler
        self._flower_ids: dict[str, int] = {}  # run -> the Flower run it submitted last

    def _audit(self, action: str, outcome: str, record: RunRecord, **details: Any) -> None:
        audit_log.AuditLog(audit_log.default_path(self.registry)).record(
            action,
            outcome,
            actor="scheduler",
            details={"run_name": record.name, **details},
        )

    def tick(self) -> list[Action]:
        """One pass over the registry's scheduled and running runs."""
        store = RunStore.existing(self.registry)
        if store is None:
            return []
        actions: list[Action] = []
        now = self.clock()
        for record in store.list(("scheduled", "running")):
            if record.state == "scheduled":
                if not _due(record.not_before, now):
                    continue
                actions.append(self._submit(store, record, "submitted"))
                continue
            status = UNKNOWN  # no Flower run: its submission failed
            flower_run_id = self._flower_ids.get(record.name) or record.flower_run_id
            if flower_run_id:
                try:
                    status = self.submitter.status(flower_run_id)
                except FedcommonsError as exc:  # SuperLink unreachable: ask again next tick
                    log.warning("scheduler.status_failed", run_name=record.name, error=str(exc))
                    continue
            if not (status.startswith("finished") or status == UNKNOWN):
                continue
            fresh = store.get(record.name)  # the ServerApp may have just finished it
            if fresh.state != "running":
                continue
            if fresh.cancel_requested:  # died after the operator cancelled: it stays stopped
                store.set_state(record.name, "cancelled", error="cancelled by the operator")
                self._audit("run.end", "cancelled", fresh)
                actions.append(Action(record.name, "cancelled", flower_run_id))
                continue
            starts = max(fresh.starts, self._submitted.get(record.name, 0))
            if starts >= self.max_starts:
                detail = (
                    f"the coordinator ended {starts} time(s) without finishing the run "
                    f"(last Flower run {flower_run_id}: {status}); giving up"
                )
                store.set_state(record.name, "failed", error=detail)
                self._audit("run.end", "failed", fresh, detail=detail)
                log.error("scheduler.gave_up", run_name=record.name, detail=detail)
                actions.append(Action(record.name, "gave-up", flower_run_id, detail))
                continue
            actions.append(self._submit(store, fresh, "resubmitted", previous=status))
        return actions

    def _submit(self, store: RunStore, record: RunRecord, what: str, previous: str = "") -> Action:
        store.claim(record.name)  # running, no Flower run yet
        self._submitted[record.name] = self._submitted.get(record.name, 0) + 1
        try:
            run_id = self.submitter.submit(record)
        except FedcommonsError as exc:  # retried on the next tick, up to max_starts
            self._audit("run.submit", "failed", record, error=str(exc))
            log.error("scheduler.submit_failed", run_name=record.name, error=str(exc))
            self._flower_ids.pop(record.name, None)
            return Action(record.name, "submit-failed", 0, str(exc))
        self._flower_ids[record.name] = run_id
        store.set_flower_run(record.name, run_id, only_if_unset=True)
        details = {"flower_run_id": run_id, "committed_round": record.committed_round}
        if previous:
            details["previous_status"] = previous
        self._audit("run.submit", what, record, **details)
        log.info("scheduler." + what, run_name=record.name, flower_run_id=run_id)
        return Action(record.name, what, run_id, previous)

    def run_forever(self, stop: threading.Event, poll: float = 5.0) -> None:
        """Tick every ``poll`` seconds until ``stop`` is set; errors are logged, not raised."""
        while not stop.is_set():
            try:
                self.tick()
            except Exception as exc:  # a bad tick must not end the coordinator
                log.error("scheduler.tick_failed", error=f"{type(exc).__name__}: {exc}")
            stop.wait(poll)


def start_scheduler_thread(
    registry: Path, submitter: Submitter, *, poll: float = 5.0
) -> tuple[threading.Thread, threading.Event]:
    """Run a :class:`Scheduler` in a daemon thread; set the event to stop it."""
    stop = threading.Event()
    scheduler = Scheduler(registry, submitter)
    thread = threading.Thread(
        target=scheduler.run_forever, args=(stop, poll), name="fedcommons-scheduler", daemon=True
    )
    thread.start()
    return thread, stop
