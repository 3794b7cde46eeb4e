"""The privacy ledger is append-only and tamper-evident, naming the round."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedcommons.errors import LedgerTamperedError
from fedcommons.privacy.ledger import PrivacyLedger


def _ledger(tmp_path: Path, rounds: int = 4) -> PrivacyLedger:
    ledger = PrivacyLedger(tmp_path / "privacy" / "line" / "ledger.jsonl")
    for r in range(1, rounds + 1):
        ledger.append({"round": r, "run_id": 7, "epsilon": 0.5 * r, "noise_std": 0.1})
    return ledger


def _rewrite(ledger: PrivacyLedger, lines: list[str]) -> None:
    ledger.path.write_text("".join(line if line.endswith("\n") else line + "\n" for line in lines))


def test_appended_entries_verify_in_order(tmp_path: Path) -> None:
    ledger = _ledger(tmp_path)
    records = ledger.verify()
    assert [r.round for r in records] == [1, 2, 3, 4]
    assert records[1].prev_sha256 == records[0].sha256
    assert ledger.head() == (4, records[-1].sha256)


def test_edited_entry_fails_naming_its_round(tmp_path: Path) -> None:
    """Tried: the noise std of round 3 lowered in place."""
    ledger = _ledger(tmp_path)
    lines = ledger.path.read_text().splitlines()
    doc = json.loads(lines[2])
    doc["entry"]["noise_std"] = 0.001
    lines[2] = json.dumps(doc)
    _rewrite(ledger, lines)
    with pytest.raises(LedgerTamperedError, match="round 3 of run 7") as info:
        ledger.verify()
    assert info.value.round == 3


def test_removed_entry_fails_naming_the_round_after_the_gap(tmp_path: Path) -> None:
    """Tried: round 2's line deleted."""
    ledger = _ledger(tmp_path)
    lines = ledger.path.read_text().splitlines()
    _rewrite(ledger, lines[:1] + lines[2:])
    with pytest.raises(LedgerTamperedError, match="round 3") as info:
        ledger.verify()
    assert info.value.round == 3


def test_reordered_entries_fail(tmp_path: Path) -> None:
    """Tried: rounds 2 and 3 swapped."""
    ledger = _ledger(tmp_path)
    lines = ledger.path.read_text().splitlines()
    _rewrite(ledger, [lines[0], lines[2], lines[1], lines[3]])
    with pytest.raises(LedgerTamperedError, match="round 3"):
        ledger.verify()


def test_rehashed_edit_breaks_the_chain_at_the_next_round(tmp_path: Path) -> None:
    """Tried: round 2 edited and its own hash recomputed (the next entry still chains)."""
    from fedcommons.privacy.ledger import entry_hash

    ledger = _ledger(tmp_path)
    lines = ledger.path.read_text().splitlines()
    doc = json.loads(lines[1])
    doc["entry"]["epsilon"] = 0.01
    doc["sha256"] = entry_hash(doc["prev_sha256"], doc["entry"])
    lines[1] = json.dumps(doc)
    _rewrite(ledger, lines)
    with pytest.raises(LedgerTamperedError, match="round 3 of run 7"):
        ledger.verify()


def test_garbage_line_fails_naming_the_line(tmp_path: Path) -> None:
    """Tried: a line replaced by non-JSON text."""
    ledger = _ledger(tmp_path)
    lines = ledger.path.read_text().splitlines()
    lines[1] = "not json"
    _rewrite(ledger, lines)
    with pytest.raises(LedgerTamperedError, match="line 2"):
        ledger.verify()


def test_append_refuses_to_extend_a_tampered_ledger(tmp_path: Path) -> None:
    """Tried: appending round 5 after round 1 was edited: nothing is written."""
    ledger = _ledger(tmp_path)
    text = ledger.path.read_text().replace('"epsilon": 0.5,', '"epsilon": 0.1,', 1)
    ledger.path.write_text(text)
    with pytest.raises(LedgerTamperedError):
        ledger.append({"round": 5})
    assert ledger.path.read_text() == text
