"""Durable runs: scheduled and running runs, and one atomic commit per finished round.

Tables (registry index schema 3, see :mod:`fedcommons.releases.registry`): ``runs``
(one row per run: its flat run config, state, progress, persistent ``run_tag``) and
``run_rounds`` (one row per committed round: checkpoint path and SHA-256, the round's
report, the contributing nodes, the strategy and privacy state, the round's privacy
ledger entry).

Committing round ``k`` (:meth:`DurableRun.commit`):

1. the checkpoint (weights + strategy server state) is written atomically to
   ``runs/<name>/round-<k>.safetensors`` (:mod:`fedcommons.coordinator.checkpoint`);
2. under the privacy ledger's lock (DP runs), the round's ledger entry is finished (its
   cumulative ε recomputed) and the index transaction that inserts the ``run_rounds`` row
   (with that entry) and advances ``runs.committed_round`` commits — the commit point;
3. still under the lock, the ledger line is appended.

A crash before the commit point loses round ``k`` entirely (file without a row: removed on
restart; no ledger line); a crash between 2 and 3 leaves a committed round whose ledger
line is missing, which the restart appends from the row (roll forward). So the ledger
holds exactly the committed rounds: a resumed run never counts a round's ε twice.

Started again under the same ``run-name`` with the same configuration, a run resumes
after its last committed round, as a new Flower run: weights, strategy state, reports,
contributors, the run tag that keys the clients' state, and the ledger position all come
from the commit.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from fedcommons.coordinator import faults
from fedcommons.coordinator.checkpoint import (
    read_checkpoint,
    restore_strategy_state,
    strategy_state,
    write_checkpoint,
)
from fedcommons.coordinator.config import RunConfig
from fedcommons.errors import CheckpointError, RegistryError, RunStateError
from fedcommons.logs import get_logger
from fedcommons.names import NameKind, check_name
from fedcommons.privacy.ledger import LedgerRecord
from fedcommons.releases.registry import Registry, Release, sqlite_connect, sqlite_transaction

log = get_logger("fedcommons.coordinator")

STATES = ("scheduled", "running", "finished", "failed", "cancelled")
#: Run-config keys that may change when a run is started again (policies, not results).
MUTABLE_KEYS = frozenset(
    {
        "run-name",
        "registry",
        "round-timeout",
        "node-wait-timeout",
        "on-round-failure",
        "round-retries",
        "mlflow-tracking-uri",
        "mlflow-experiment",
        "private-dir",
        "population",  # a DP round records its own q and W in the ledger
    }
)
RUNS_DIR = "runs"


def now() -> str:
    """UTC timestamp, seconds."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def new_run_name(line: str) -> str:
    """A fresh run name: ``<line>-<UTC time>-<6 hex>`` (the line cut to fit 100 characters)."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{line[:76]}-{stamp}-{uuid.uuid4().hex[:6]}"


def comparable_config(flat: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a flat run config that must not change when a run resumes."""
    return {k: v for k, v in flat.items() if k not in MUTABLE_KEYS}


@dataclass(frozen=True)
class RunRecord:
    """One row of ``runs``."""

    name: str
    line: str
    state: str
    config: dict[str, Any]
    run_tag: str
    rounds: int
    committed_round: int
    not_before: str
    created: str
    updated: str
    heartbeat: str
    flower_run_id: int
    starts: int
    cancel_requested: bool
    release_version: str
    error: str

    @property
    def progress(self) -> str:
        """``scheduled``, ``running: committed round 2 of 5``, ``finished: 1.0.0``, ..."""
        if self.state == "running":
            text = f"running: committed round {self.committed_round} of {self.rounds}"
            return text + (" (cancel requested)" if self.cancel_requested else "")
        if self.state == "finished":
            return f"finished: {self.line} {self.release_version}"
        if self.state in ("failed", "cancelled"):
            return f"{self.state} after round {self.committed_round} of {self.rounds}"
        return self.state

    def to_dict(self) -> dict[str, Any]:
        """JSON form (``round status --format json``)."""
        out = asdict(self)
        out["progress"] = self.progress
        return out


@dataclass(frozen=True)
class RoundCommit:
    """One row of ``run_rounds``: everything a restart needs to resume after ``round``."""

    run: str
    round: int
    committed: str
    checkpoint_path: str  # relative to the registry root
    checkpoint_sha256: str
    report: dict[str, Any]
    contributors: list[int]
    state: dict[str, Any]
    ledger_seq: int | None
    ledger_sha256: str | None
    ledger_entry: dict[str, Any] | None
    flower_run_id: int
    attempts: int


_RUN_COLUMNS = (
    "name, line, state, config_json, run_tag, rounds, committed_round, not_before, created, "
    "updated, heartbeat, flower_run_id, starts, cancel_requested, release_version, error"
)
_ROUND_COLUMNS = (
    "run, round, committed, checkpoint_path, checkpoint_sha256, report_json, "
    "contributors_json, state_json, ledger_seq, ledger_sha256, ledger_entry_json, "
    "flower_run_id, attempts"
)


def _run(row: tuple) -> RunRecord:
    values = list(row)
    values[3] = json.loads(values[3])
    values[11] = int(values[11] or 0)  # stored as text: Flower run ids are unsigned 64-bit
    values[13] = bool(values[13])
    return RunRecord(*values)


def _round(row: tuple) -> RoundCommit:
    values = list(row)
    values[5] = json.loads(values[5])
    values[6] = json.loads(values[6])
    values[7] = json.loads(values[7])
    values[10] = json.loads(values[10]) if values[10] else None
    values[11] = int(values[11] or 0)
    return RoundCommit(*values)


def _select_run(db: sqlite3.Connection, name: str) -> RunRecord | None:
    row = db.execute(f"SELECT {_RUN_COLUMNS} FROM runs WHERE name=?", (name,)).fetchone()
    return _run(row) if row else None


class RunStore:
    """The ``runs`` and ``run_rounds`` tables of a registry's index."""

    def __init__(self, registry_root: Path | str, *, create: bool = False) -> None:
        self.registry = Registry(registry_root, create=create)  # migrates to schema 3
        self.root = self.registry.root
        self.db_path = self.registry.index_path

    @classmethod
    def existing(cls, registry_root: Path | str) -> RunStore | None:
        """The store if the registry's index exists (creates nothing), else ``None``."""
        if not (Path(registry_root).expanduser() / "index.sqlite").exists():
            return None
        return cls(registry_root)

    def _connect(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        return sqlite_connect(self.db_path)

    def _transaction(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        return sqlite_transaction(self.db_path)

    # -- reading ----------------------------------------------------------------------
    def find(self, name: str) -> RunRecord | None:
        """The run called ``name``, or ``None``."""
        with self._connect() as db:
            return _select_run(db, name)

    def get(self, name: str) -> RunRecord:
        """The run called ``name``; :class:`RunStateError` naming the known runs if none."""
        record = self.find(name)
        if record is None:
            known = [r.name for r in self.list()][-10:]
            raise RunStateError(
                f"no run {name!r} in registry {str(self.root)!r}"
                + (f"; latest runs: {', '.join(known)}" if known else "; it holds no runs")
            )
        return record

    def list(self, states: tuple[str, ...] | None = None) -> list[RunRecord]:
        """Runs (in ``states``), oldest first."""
        query = f"SELECT {_RUN_COLUMNS} FROM runs"
        args: tuple = ()
        if states:
            query += f" WHERE state IN ({','.join('?' * len(states))})"
            args = tuple(states)
        with self._connect() as db:
            return [_run(r) for r in db.execute(query + " ORDER BY created, name", args)]

    def rounds(self, name: str) -> list[RoundCommit]:
        """Committed rounds of run ``name``, in order."""
        with self._connect() as db:
            rows = db.execute(
                f"SELECT {_ROUND_COLUMNS} FROM run_rounds WHERE run=? ORDER BY round", (name,)
            ).fetchall()
        return [_round(r) for r in rows]

    # -- operator actions -------------------------------------------------------------
    def schedule(self, config: RunConfig, *, not_before: str = "") -> RunRecord:
        """Store ``config`` as a scheduled run (its ``run_name`` must be new)."""
        name = config.run_name or new_run_name(config.line)
        config.run_name = name
        stamp = now()
        with self._transaction() as db:
            if db.execute("SELECT 1 FROM runs WHERE name=?", (name,)).fetchone():
                raise RunStateError(f"a run named {name!r} exists already; pick another name")
            db.execute(
                "INSERT INTO runs (name, line, state, config_json, run_tag, rounds, not_before,"
                " created, updated) VALUES (?,?,?,?,?,?,?,?,?)",
                (
                    name,
                    config.line,
                    "scheduled",
                    json.dumps(config.to_flat()),
                    uuid.uuid4().hex[:16],
                    config.rounds,
                    not_before,
                    stamp,
                    stamp,
                ),
            )
        return self.get(name)

    def request_cancel(self, name: str) -> RunRecord:
        """Cancel a scheduled run now, or ask a running one to stop after its current round."""
        with self._transaction() as db:
            record = _select_run(db, name)
            if record is None:
                raise RunStateError(f"no run {name!r} in registry {str(self.root)!r}")
            if record.state == "scheduled":
                db.execute(
                    "UPDATE runs SET state='cancelled', cancel_requested=1, updated=? WHERE name=?",
                    (now(), name),
                )
            elif record.state in ("running", "failed"):
                # failed: it may be resumed later; a cancelled run never is
                state = "cancelled" if record.state == "failed" else "running"
                db.execute(
                    "UPDATE runs SET cancel_requested=1, state=?, updated=? WHERE name=?",
                    (state, now(), name),
                )
            else:
                raise RunStateError(f"run {name!r} is {record.state}: nothing to cancel")
        return self.get(name)

    # -- the coordinator --------------------------------------------------------------
    def start(self, name: str, config: RunConfig, flower_run_id: int) -> RunRecord | None:
        """Mark an existing run as running again (a resume); ``None`` if no such run.

        Raises :class:`RunStateError` if the run finished or was cancelled, or if
        ``config`` differs from the stored one in anything but :data:`MUTABLE_KEYS`.
        """
        with self._transaction() as db:
            record = _select_run(db, name)
            if record is None:
                return None
            if record.state == "finished":
                raise RunStateError(
                    f"run {name!r} finished already (release {record.line} "
                    f"{record.release_version}); start a new run under another run-name"
                )
            if record.state == "cancelled":
                raise RunStateError(f"run {name!r} was cancelled; it cannot be started again")
            cancelled = record.cancel_requested
            if cancelled:  # cancelled before this start: record it, then refuse
                db.execute(
                    "UPDATE runs SET state='cancelled', updated=? WHERE name=?", (now(), name)
                )
            else:
                stored = comparable_config(record.config)
                given = comparable_config(config.to_flat())
                if stored != given:
                    diff = sorted(
                        k for k in stored.keys() | given.keys() if stored.get(k) != given.get(k)
                    )
                    raise RunStateError(
                        f"run {name!r} exists with another configuration (differs in: "
                        f"{', '.join(diff[:8])}); resume it with the same settings or pick a "
                        "new run-name"
                    )
                stamp = now()
                db.execute(
                    "UPDATE runs SET state='running', starts=starts+1, flower_run_id=?,"
                    " updated=?, heartbeat=?, error='' WHERE name=?",
                    (str(int(flower_run_id)), stamp, stamp, name),
                )
        if cancelled:
            raise RunStateError(f"run {name!r} was cancelled before it started again")
        return self.get(name)

    def claim(self, name: str) -> None:
        """A scheduler is about to submit the run: ``running``, no Flower run id yet."""
        with self._transaction() as db:
            db.execute(
                "UPDATE runs SET state='running', flower_run_id='0', updated=? "
                "WHERE name=? AND state IN ('scheduled', 'running')",
                (now(), name),
            )

    def commit_round(
        self,
        *,
        name: str,
        config: RunConfig,
        run_tag: str,
        commit: RoundCommit,
        starts: int = 1,
    ) -> None:
        """The commit point of a round: one transaction (creates the run row if needed).

        ``starts`` is the start count this coordinator process was given: if another
        process has started the run since (a second coordinator on the same run), this
        one is fenced off with :class:`RunStateError` and commits nothing.
        """
        stamp = now()
        with self._transaction() as db:
            row = db.execute("SELECT starts FROM runs WHERE name=?", (name,))
            found = row.fetchone()
            if found is not None and int(found[0]) != starts:
                raise RunStateError(
                    f"run {name!r} was started again by another coordinator (start "
                    f"{found[0]}, this one is start {starts}): this one stops, committing nothing"
                )
            exists = db.execute(
                "SELECT 1 FROM run_rounds WHERE run=? AND round=?", (name, commit.round)
            ).fetchone()
            if exists:
                raise RunStateError(f"round {commit.round} of run {name!r} is committed already")
            if found is None:
                db.execute(
                    "INSERT INTO runs (name, line, state, config_json, run_tag, rounds, created,"
                    " updated, heartbeat, flower_run_id, starts) VALUES (?,?,?,?,?,?,?,?,?,?,1)",
                    (
                        name,
                        config.line,
                        "running",
                        json.dumps(config.to_flat()),
                        run_tag,
                        config.rounds,
                        stamp,
                        stamp,
                        stamp,
                        str(int(commit.flower_run_id)),
                    ),
                )
            db.execute(
                f"INSERT INTO run_rounds ({_ROUND_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    name,
                    commit.round,
                    commit.committed,
                    commit.checkpoint_path,
                    commit.checkpoint_sha256,
                    json.dumps(commit.report),
                    json.dumps(commit.contributors),
                    json.dumps(commit.state),
                    commit.ledger_seq,
                    commit.ledger_sha256,
                    json.dumps(commit.ledger_entry) if commit.ledger_entry is not None else None,
                    str(int(commit.flower_run_id)),
                    commit.attempts,
                ),
            )
            db.execute(
                "UPDATE runs SET committed_round=?, updated=?, heartbeat=? WHERE name=?",
                (commit.round, stamp, stamp, name),
            )
            faults.reached("committing", commit.round)  # inside the open transaction

    def update_ledger_position(self, name: str, round_no: int, record: LedgerRecord) -> None:
        """Record where a rolled-forward ledger entry landed."""
        with self._transaction() as db:
            db.execute(
                "UPDATE run_rounds SET ledger_seq=?, ledger_sha256=?, ledger_entry_json=? "
                "WHERE run=? AND round=?",
                (record.seq, record.sha256, json.dumps(record.entry), name, round_no),
            )

    def cancel_requested(self, name: str) -> bool:
        """Whether the operator asked run ``name`` to stop."""
        with self._connect() as db:
            row = db.execute("SELECT cancel_requested FROM runs WHERE name=?", (name,)).fetchone()
        return bool(row and row[0])

    def set_state(
        self, name: str, state: str, *, error: str = "", release_version: str = ""
    ) -> None:
        """Record the run's outcome."""
        if state not in STATES:
            raise RunStateError(f"unknown run state {state!r}")
        with self._transaction() as db:
            db.execute(
                "UPDATE runs SET state=?, error=?, release_version=?, updated=? WHERE name=?",
                (state, error[:2000], release_version, now(), name),
            )

    def set_flower_run(self, name: str, flower_run_id: int, *, only_if_unset: bool = False) -> None:
        """Record the Flower run a scheduler submitted for ``name``.

        ``only_if_unset``: leave the id the ServerApp recorded itself when it started.
        """
        query = "UPDATE runs SET flower_run_id=?, updated=? WHERE name=?"
        if only_if_unset:
            query += " AND flower_run_id='0'"
        with self._transaction() as db:
            db.execute(query, (str(int(flower_run_id)), now(), name))


@dataclass
class Resumed:
    """What a durable run starts from."""

    next_round: int
    weights: dict[str, torch.Tensor]
    reports: list[dict[str, Any]]
    contributors: set[int]


class DurableRun:
    """The durable side of one run_federation call: resume, commit, cancel, finish."""

    def __init__(self, prepared: Any, flower_run_id: int) -> None:
        self.prepared = prepared
        self.config: RunConfig = prepared.config
        self.flower_run_id = int(flower_run_id)
        self.name = self.config.run_name or new_run_name(self.config.line)
        self.config.run_name = self.name
        self.store = RunStore.existing(self.config.registry_path)
        self.record: RunRecord | None = None
        self.resumed_from = 0
        privacy = prepared.privacy
        if privacy is not None:
            privacy.defer_ledger = True
            privacy.run_name = self.name

    @property
    def root(self) -> Path:
        """The registry directory."""
        return self.config.registry_path

    def run_dir(self) -> Path:
        """Where this run's checkpoints live (the run name is checked before it is a path)."""
        return self.root / RUNS_DIR / check_name(self.name, NameKind.run)

    def open(self) -> Resumed:
        """Start or resume: restore everything the last committed round recorded."""
        prepared = self.prepared
        if self.store is not None:
            self.record = self.store.start(self.name, self.config, self.flower_run_id)
        if self.record is None:
            return Resumed(1, prepared.weights, [], set())
        prepared.run_tag = self.record.run_tag
        commits = self.store.rounds(self.name) if self.store else []
        if not commits:
            return Resumed(1, prepared.weights, [], set())
        self._roll_forward_ledger(commits)
        last = commits[-1]
        loaded, strategy_tensors = read_checkpoint(
            self.root / last.checkpoint_path, last.checkpoint_sha256
        )
        if set(loaded) != set(prepared.weights):
            raise CheckpointError(
                f"checkpoint {last.checkpoint_path} holds other tensors than task "
                f"{self.config.task!r} builds"
            )
        weights = {k: loaded[k] for k in prepared.weights}  # the model's order (client layouts)
        restore_strategy_state(prepared.strategy, strategy_tensors, last.state.get("strategy", {}))
        if prepared.privacy is not None:
            prepared.privacy.restore_state(last.state.get("privacy", {}))
        contributors = {int(n) for c in commits for n in c.contributors}
        self.resumed_from = last.round
        self._prune(keep=self.root / last.checkpoint_path)
        log.info("run.resumed", run_name=self.name, committed_round=last.round)
        return Resumed(last.round + 1, weights, [c.report for c in commits], contributors)

    def _roll_forward_ledger(self, commits: list[RoundCommit]) -> None:
        """Append ledger lines of committed rounds that a crash kept from being written."""
        privacy = self.prepared.privacy
        pending = [c for c in commits if c.ledger_entry is not None]
        if privacy is None or not pending:
            return
        records = privacy.ledger.verify()
        for commit in pending:
            seq = commit.ledger_seq
            if (
                seq is not None
                and seq < len(records)
                and records[seq].sha256 == commit.ledger_sha256
            ):
                continue
            entry = dict(commit.ledger_entry or {})
            if records and seq is not None and seq != len(records):
                # others appended meanwhile: the cumulative ε must include their rounds
                from fedcommons.privacy.line import recompute_entry_epsilon

                if privacy.central is not None:
                    entry = recompute_entry_epsilon(entry, records, privacy.central)
            record = privacy.ledger.append(entry)
            records.append(record)
            if record.sha256 != commit.ledger_sha256:
                self.store.update_ledger_position(self.name, commit.round, record)  # type: ignore[union-attr]
            log.warning(
                "ledger.rolled_forward", run_name=self.name, round=commit.round, seq=record.seq
            )

    def cancel_requested(self) -> bool:
        """Whether the operator cancelled this run (checked between rounds)."""
        return self.store is not None and self.store.cancel_requested(self.name)

    def commit(
        self,
        round_no: int,
        weights: Mapping[str, torch.Tensor],
        report: Any,
        contributors: set[int],
        attempts: int = 1,
    ) -> RoundCommit:
        """Commit round ``round_no`` (see the module docstring for the protocol)."""
        prepared = self.prepared
        tensors, meta = strategy_state(prepared.strategy)
        path = self.run_dir() / f"round-{round_no:05d}.safetensors"
        sha = write_checkpoint(
            path, weights, tensors, {"run": self.name, "round": round_no, "strategy": meta}
        )
        privacy = prepared.privacy
        if self.store is None:
            self.store = RunStore(self.root, create=True)
        store = self.store
        committed: list[RoundCommit] = []

        def commit_point(ledger: LedgerRecord | None) -> None:
            commit = RoundCommit(
                run=self.name,
                round=round_no,
                committed=now(),
                checkpoint_path=str(path.relative_to(self.root)),
                checkpoint_sha256=sha,
                report=asdict(report),
                contributors=sorted(int(n) for n in contributors),
                state={
                    "strategy": meta,
                    "privacy": privacy.resume_state() if privacy is not None else {},
                },
                ledger_seq=ledger.seq if ledger else None,
                ledger_sha256=ledger.sha256 if ledger else None,
                ledger_entry=ledger.entry if ledger else None,
                flower_run_id=self.flower_run_id,
                attempts=attempts,
            )
            store.commit_round(
                name=self.name,
                config=self.config,
                run_tag=prepared.run_tag,
                commit=commit,
                starts=self.record.starts if self.record else 1,
            )
            committed.append(commit)
            faults.reached("committed", round_no)  # committed; ledger line not yet written

        if privacy is not None:
            privacy.append_staged(commit_point)
        else:
            commit_point(None)
        self._prune(keep=path)
        return committed[0]

    def _prune(self, keep: Path) -> None:
        """Remove this run's checkpoint files other than ``keep`` (older or uncommitted)."""
        directory = self.run_dir()
        if not directory.is_dir():
            return
        for path in directory.glob("round-*.safetensors"):
            if path != keep:
                with contextlib.suppress(OSError):
                    path.unlink()

    def published(self) -> Release | None:
        """The release this run already published (a crash after publishing, before finish)."""
        if self.record is None or self.store is None:
            return None
        registry = self.store.registry
        for release in reversed(registry.releases(self.config.line)):
            if release.created < self.record.created:
                break
            try:
                config = release.manifest().config
            except (OSError, ValueError, RegistryError):
                continue
            if config.get("run-name") == self.name:
                return release
        return None

    def finish(self, release: Release) -> None:
        """Mark the run finished and drop its checkpoints (the release holds the weights)."""
        if self.store is None:
            self.store = RunStore(self.root, create=True)
        if self.store.find(self.name) is not None:
            self.store.set_state(self.name, "finished", release_version=release.version)
        self._prune(keep=Path("/nonexistent"))
        with contextlib.suppress(OSError):
            self.run_dir().rmdir()

    def fail(self, state: str, error: str) -> None:
        """Record a failed or cancelled run (if it has a row: it committed or was scheduled)."""
        if self.store is None or self.store.find(self.name) is None:
            return
        self.store.set_state(self.name, state, error=error)
        if state == "cancelled":
            self._prune(keep=Path("/nonexistent"))


def committed_rounds(config: RunConfig) -> int:
    """Rounds already committed by the run ``config.run_name`` names (0: a new run)."""
    if not config.run_name:
        return 0
    store = RunStore.existing(config.registry_path)
    record = store.find(config.run_name) if store is not None else None
    if record is None or record.state in ("finished", "cancelled"):
        return 0
    return record.committed_round
