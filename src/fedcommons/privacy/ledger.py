"""The privacy ledger: append-only, hash-chained JSON lines, one entry per DP round.

File: ``<registry>/privacy/<line>/ledger.jsonl``. Each line is::

    {"seq": 7, "prev_sha256": "<hash of line 6>", "entry": {...}, "sha256": "<hash>"}

with ``sha256 = SHA-256(prev_sha256 + newline + canonical JSON of entry)`` (sorted keys, no
spaces) and ``prev_sha256`` of the first line 64 zeros. Editing, removing or reordering
an entry breaks the chain at that entry; :meth:`PrivacyLedger.verify` names its round. A
release's manifest records the number of entries and the head hash it covers, so a ledger
truncated or rewritten after publication no longer matches its releases.

Appends take an exclusive ``flock`` on the file, check the chain, write one line and
fsync: two coordinators on one line cannot interleave entries.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedcommons.errors import LedgerTamperedError, PrivacyAuditError
from fedcommons.fileio import exclusive_lock
from fedcommons.names import NameKind, check_name

GENESIS = "0" * 64
LEDGER_DIR = "privacy"
LEDGER_FILE = "ledger.jsonl"
LOCK_TIMEOUT_S = 30.0


def ledger_path(registry_root: Path, line: str) -> Path:
    """Where line ``line``'s ledger lives inside a registry (the name is checked first)."""
    return Path(registry_root) / LEDGER_DIR / check_name(line, NameKind.line) / LEDGER_FILE


def canonical(entry: Mapping[str, Any]) -> bytes:
    """Canonical JSON of an entry (the bytes that get hashed)."""
    return json.dumps(entry, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def entry_hash(prev: str, entry: Mapping[str, Any]) -> str:
    """SHA-256 chaining an entry to its predecessor's hash."""
    return hashlib.sha256(prev.encode() + b"\n" + canonical(entry)).hexdigest()


@dataclass(frozen=True)
class LedgerRecord:
    """One verified ledger line."""

    seq: int
    prev_sha256: str
    sha256: str
    entry: dict[str, Any]

    @property
    def round(self) -> int | None:
        """The round the entry records."""
        value = self.entry.get("round")
        return int(value) if isinstance(value, int) else None


def _describe(seq: int, entry: Mapping[str, Any] | None) -> str:
    if entry and "round" in entry:
        run = entry.get("run_id")
        return (
            f"round {entry['round']}"
            + (f" of run {run}" if run is not None else "")
            + (f" (entry {seq})")
        )
    return f"entry {seq}"


class PrivacyLedger:
    """A line's ledger file."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def exists(self) -> bool:
        """Whether the ledger has been written at all."""
        return self.path.exists()

    def verify(self, limit: int | None = None) -> list[LedgerRecord]:
        """Read and check the chain (the first ``limit`` entries); raise on any break.

        Raises :class:`~fedcommons.errors.LedgerTamperedError` naming the round of the
        first entry that does not check out.
        """
        if not self.path.exists():
            return []
        records: list[LedgerRecord] = []
        prev = GENESIS
        with self.path.open("rb") as fh:
            for lineno, raw in enumerate(fh):
                if limit is not None and lineno >= limit:
                    break
                records.append(self._check_line(lineno, raw, prev))
                prev = records[-1].sha256
        return records

    @staticmethod
    def _check_line(lineno: int, raw: bytes, prev: str) -> LedgerRecord:
        try:
            doc = json.loads(raw)
            seq, entry = doc["seq"], doc["entry"]
            stored, stored_prev = doc["sha256"], doc["prev_sha256"]
            if not isinstance(entry, dict):
                raise TypeError("entry is not an object")
        except (ValueError, KeyError, TypeError) as exc:
            raise LedgerTamperedError(
                f"ledger line {lineno + 1} is not a valid entry ({exc}): the ledger was "
                "edited or corrupted",
                seq=lineno,
            ) from None
        what = _describe(lineno, entry)
        rnd = entry.get("round") if isinstance(entry.get("round"), int) else None
        if seq != lineno:
            raise LedgerTamperedError(
                f"{what}: sequence number {seq} where {lineno} was expected: entries were "
                "removed, duplicated or reordered",
                round_no=rnd,
                seq=lineno,
            )
        if stored_prev != prev:
            raise LedgerTamperedError(
                f"{what}: does not chain to the previous entry (prev_sha256 mismatch): an "
                "earlier entry was removed, edited or reordered",
                round_no=rnd,
                seq=lineno,
            )
        try:
            actual = entry_hash(prev, entry)
        except ValueError as exc:
            raise LedgerTamperedError(f"{what}: unhashable content ({exc})", round_no=rnd) from None
        if actual != stored:
            raise LedgerTamperedError(
                f"{what}: content does not match its SHA-256 (stored {stored[:12]}…, "
                f"recomputed {actual[:12]}…): the entry was edited",
                round_no=rnd,
                seq=lineno,
            )
        return LedgerRecord(lineno, prev, stored, entry)

    def entries(self) -> list[dict[str, Any]]:
        """Verified entries, oldest first."""
        return [r.entry for r in self.verify()]

    def head(self) -> tuple[int, str]:
        """``(number of entries, hash of the last one)`` after verifying the chain."""
        records = self.verify()
        return len(records), records[-1].sha256 if records else GENESIS

    @contextlib.contextmanager
    def _locked(self) -> Iterator[Any]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with (
            self.path.open("a+b") as fh,
            exclusive_lock(
                fh,
                LOCK_TIMEOUT_S,
                lambda: PrivacyAuditError(
                    f"ledger {self.path} is locked by another writer for {LOCK_TIMEOUT_S:.0f}s"
                ),
            ),
        ):
            yield fh

    def append(
        self,
        entry: Mapping[str, Any] | Callable[[list[LedgerRecord]], Mapping[str, Any]],
        *,
        before_write: Callable[[LedgerRecord], None] | None = None,
    ) -> LedgerRecord:
        """Verify the chain, then append ``entry`` durably; return its record.

        ``entry`` may be a function of the verified records, called under the lock: an
        entry whose content depends on the ledger (a cumulative ε) stays correct when
        another coordinator appended in between, and the function may raise to refuse.
        ``before_write`` receives the finished record under the lock before the line is
        written; if it raises, nothing is written (the coordinator commits its round
        there, so a round is committed before its ledger line exists, never after).
        """
        with self._locked() as fh:
            records = self.verify()
            entry = dict(entry(records) if callable(entry) else entry)
            canonical(entry)  # fail before writing if not JSON-serialisable
            prev = records[-1].sha256 if records else GENESIS
            seq = len(records)
            digest = entry_hash(prev, entry)
            if before_write is not None:
                before_write(LedgerRecord(seq, prev, digest, entry))
            line = json.dumps(
                {"seq": seq, "prev_sha256": prev, "entry": entry, "sha256": digest},
                sort_keys=True,
                allow_nan=False,
            )
            fh.seek(0, os.SEEK_END)
            fh.write(line.encode() + b"\n")
            fh.flush()
            os.fsync(fh.fileno())
        return LedgerRecord(seq, prev, digest, entry)
