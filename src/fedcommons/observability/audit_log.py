"""Append-only audit log in JSON lines: who did what, to which round or release, outcome.

One JSON object per line::

    {"timestamp": "2026-11-23T10:31:02.114Z", "actor": "coordinator", "action": "round.finish",
     "run_id": 7, "round": 3, "release": null, "outcome": "completed", "details": {...},
     "prev_sha256": "<SHA-256 of the previous line>"}

Records are only ever appended (``O_APPEND``, under an exclusive ``flock`` so that
concurrent ServerApp processes interleave whole lines, then fsync). Each record carries
the SHA-256 of the line before it, so :func:`verify` detects an edited, removed or
reordered record. Where the log lives: ``FEDCOMMONS_AUDIT_LOG`` if set, else
``audit.jsonl`` inside the run's registry directory.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedcommons.errors import AuditLogError

ENV_PATH = "FEDCOMMONS_AUDIT_LOG"
FILE_NAME = "audit.jsonl"
GENESIS = "0" * 64
_TAIL_CHUNK = 1 << 16


def default_path(registry_dir: Path) -> Path:
    """``$FEDCOMMONS_AUDIT_LOG``, else ``<registry_dir>/audit.jsonl``."""
    env = os.environ.get(ENV_PATH, "").strip()
    return Path(env).expanduser() if env else Path(registry_dir) / FILE_NAME


def _last_line(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    if size == 0:
        return b""
    start = max(0, size - _TAIL_CHUNK)
    while True:
        data = os.pread(fd, size - start, start)
        body = data.rstrip(b"\n")
        cut = body.rfind(b"\n")
        if cut >= 0 or start == 0:
            return body[cut + 1 :]
        start = max(0, start - _TAIL_CHUNK)


@dataclass
class AuditLog:
    """Appends audit records to one JSON-lines file."""

    path: Path

    def record(
        self,
        action: str,
        outcome: str,
        *,
        actor: str = "coordinator",
        run_id: int | None = None,
        round: int | None = None,
        release: str | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Append one record and return it; raise :class:`AuditLogError` if unwritable."""
        entry: dict[str, Any] = {
            "timestamp": datetime.now(UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "actor": actor,
            "action": action,
            "run_id": run_id,
            "round": round,
            "release": release,
            "outcome": outcome,
            "details": dict(details or {}),
        }
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o640)
        except OSError as exc:
            raise AuditLogError(f"cannot open audit log {self.path}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            last = _last_line(fd)
            entry["prev_sha256"] = hashlib.sha256(last).hexdigest() if last else GENESIS
            line = json.dumps(entry, sort_keys=False, default=str).encode() + b"\n"
            os.write(fd, line)
            os.fsync(fd)
        except OSError as exc:
            raise AuditLogError(f"cannot append to audit log {self.path}: {exc}") from exc
        finally:
            os.close(fd)  # closing releases the lock
        return entry


def read(path: Path) -> Iterator[dict[str, Any]]:
    """Yield the records of an audit log; raise AuditLogError on a line that is not JSON."""
    try:
        with Path(path).open("rb") as fh:
            for number, line in enumerate(fh, start=1):
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as exc:
                    raise AuditLogError(f"{path}:{number} is not a JSON record") from exc
    except FileNotFoundError as exc:
        raise AuditLogError(f"audit log {path} not found") from exc


def verify(path: Path) -> int:
    """Check every record's ``prev_sha256`` link; return the count or raise AuditLogError."""
    previous = b""
    count = 0
    try:
        lines = Path(path).read_bytes().splitlines()
    except FileNotFoundError as exc:
        raise AuditLogError(f"audit log {path} not found") from exc
    for number, line in enumerate(lines, start=1):
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            raise AuditLogError(f"{path}:{number} is not a JSON record") from exc
        expected = hashlib.sha256(previous).hexdigest() if previous else GENESIS
        if entry.get("prev_sha256") != expected:
            raise AuditLogError(
                f"{path}:{number}: chain broken (a record before it was edited, removed "
                "or reordered)"
            )
        previous = line
        count += 1
    return count
