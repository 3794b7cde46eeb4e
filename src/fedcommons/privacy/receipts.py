"""An institution's own privacy receipts: every round it contributed to, composed by itself.

Each train message of a central-DP round states the line's public mechanism (round-config
keys ``dp-line``, ``dp-noise-multiplier``, ``dp-sample-rate``, ``dp-delta``,
``dp-rounds``, ``dp-sampling``). After training, before replying, the institution appends
one line to ``<site state>/privacy-receipts.jsonl``: which line, run (tag and Flower run
id) and round it contributed to, what the coordinator claimed for it, and its own DP-SGD
spend if it trained with record-level DP. Nothing here comes back from the coordinator
later: the receipt is the institution's own record.

:func:`compose_receipts` turns the log into the institution's cumulative guarantee:

- user-level (central DP): for every run it contributed to, *every* round of the run at
  the run's (z, q) (its planned rounds, or the rounds the line's public ledger records for
  that run when a registry is given), composed across all runs and lines with Opacus and
  recomputed with dp-accounting. Counting the rounds it was not sampled in is what the
  amplification by sampling requires; a run it was never sampled in used none of its data.
- record-level (DP-SGD): its own accountant's history, recomputed with dp-accounting.

With a registry, every recorded claim is checked against the line's hash-chained ledger:
a round the ledger does not hold, or holds with other parameters, is reported (the
coordinator told the institution something it did not publish).

Site identity: the state lives under ``state-dir`` (node config), else
``<state root>/client/<site>``, where ``<site>`` is ``site-<site-id>`` (node config
``site-id``), ``partition-<id>`` (simulation), or ``site`` (one site per state root) —
never Flower's node id, which changes when a node registers again.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedcommons.errors import ConfigError
from fedcommons.fileio import append_json_line, default_state_root, read_json_lines
from fedcommons.privacy.accounting import (
    AUDIT_METHOD,
    Step,
    audit_epsilon,
    merge_history,
    runtime_epsilon,
)

RECEIPTS_FILE = "privacy-receipts.jsonl"
#: The site's DP-SGD accountant state (written by :mod:`fedcommons.privacy.client_dp`).
STATE_FILE = "dp-sgd-accountant.json"
#: Round-config keys of a central-DP round's public mechanism (coordinator → institution).
LINE_KEY = "dp-line"
CLAIM_KEYS = ("dp-noise-multiplier", "dp-sample-rate", "dp-delta", "dp-rounds", "dp-sampling")
_SITE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def site_state_dir(node_config: Mapping[str, Any]) -> Path:
    """Where this institution keeps its state (see the module docstring), never by node id."""
    state = node_config.get("state-dir")
    if state:
        return Path(str(state)).expanduser()
    site = node_config.get("site-id")
    if site is not None:
        if not _SITE.fullmatch(str(site)):
            raise ConfigError(
                f"site-id {site!r}: use 1-64 letters, digits, '.', '_' or '-' (a stable "
                "name for this institution)"
            )
        name = f"site-{site}"
    elif node_config.get("partition-id") is not None:
        name = f"partition-{int(node_config['partition-id'])}"
    else:
        name = "site"
    return default_state_root() / "client" / name


def round_claim(config: Mapping[str, Any]) -> dict[str, Any] | None:
    """The central-DP claim a round config carries (``None`` for a round without one)."""
    if LINE_KEY not in config:
        return None
    try:
        return {
            "line": str(config[LINE_KEY]),
            "noise_multiplier": float(config["dp-noise-multiplier"]),
            "sample_rate": float(config["dp-sample-rate"]),
            "delta": float(config["dp-delta"]),
            "rounds": int(config["dp-rounds"]),
            "sampling": str(config["dp-sampling"]),
        }
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"round config carries a malformed DP claim ({exc})") from None


class ReceiptLog:
    """The institution's append-only receipt log."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / RECEIPTS_FILE

    def append(self, record: Mapping[str, Any]) -> None:
        """Append one receipt durably (0600, exclusive lock, fsync)."""
        locked = lambda: ConfigError(f"{self.path} is locked")  # noqa: E731
        append_json_line(self.path, {"time": _now(), **record}, locked)

    def records(self) -> Iterator[dict[str, Any]]:
        """Every receipt, oldest first."""
        return read_json_lines(
            self.path, lambda n: ConfigError(f"{self.path} line {n} is not JSON")
        )


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass
class RunReceipt:
    """One run the institution contributed to, with the rounds accounted for it."""

    line: str
    run_tag: str
    flower_run_ids: list[int]
    rounds_contributed: list[int]
    noise_multiplier: float
    sample_rate: float
    delta: float
    sampling: str
    rounds_accounted: int
    source: str  # "planned rounds" or "registry ledger"


@dataclass
class Receipt:
    """The institution's cumulative privacy spend, composed from its own records."""

    state_dir: str
    delta: float
    runs: list[RunReceipt] = field(default_factory=list)
    user_epsilon_rdp: float = 0.0
    user_epsilon_recomputed: float = 0.0
    per_line: dict[str, float] = field(default_factory=dict)
    record_level: dict[str, Any] | None = None
    mismatches: list[str] = field(default_factory=list)


def compose_receipts(
    state_dir: Path, *, registry: Path | None = None, delta: float | None = None
) -> Receipt:
    """Compose the institution's receipts (see the module docstring)."""
    from fedcommons.privacy.ledger import PrivacyLedger, ledger_path

    runs: dict[tuple[str, str], RunReceipt] = {}
    for rec in ReceiptLog(state_dir).records():
        claim = rec.get("central")
        if not claim:
            continue
        key = (str(claim["line"]), str(rec.get("run_tag", "")))
        run = runs.get(key)
        if run is None:
            run = runs[key] = RunReceipt(
                line=key[0],
                run_tag=key[1],
                flower_run_ids=[],
                rounds_contributed=[],
                noise_multiplier=float(claim["noise_multiplier"]),
                sample_rate=float(claim["sample_rate"]),
                delta=float(claim["delta"]),
                sampling=str(claim["sampling"]),
                rounds_accounted=int(claim["rounds"]),
                source="planned rounds",
            )
        run.rounds_contributed.append(int(rec["round"]))
        if int(rec.get("flower_run_id", 0)) not in run.flower_run_ids:
            run.flower_run_ids.append(int(rec.get("flower_run_id", 0)))
        if (float(claim["noise_multiplier"]), float(claim["sample_rate"])) != (
            run.noise_multiplier,
            run.sample_rate,
        ):  # a run whose mechanism changed between rounds: account the weaker one
            run.noise_multiplier = min(run.noise_multiplier, float(claim["noise_multiplier"]))
            run.sample_rate = max(run.sample_rate, float(claim["sample_rate"]))
    mismatches: list[str] = []
    if registry is not None:
        for run in runs.values():
            entries = [
                e
                for e in PrivacyLedger(ledger_path(registry, run.line)).entries()
                if e.get("mechanism") == "dp-fedavg" and e.get("run_tag") == run.run_tag
            ]
            by_round = {int(e["round"]): e for e in entries}
            for r in sorted(set(run.rounds_contributed)):
                e = by_round.get(r)
                if e is None:
                    mismatches.append(
                        f"line {run.line!r} run {run.run_tag}: round {r} is not in the ledger"
                    )
                elif (float(e["noise_multiplier"]), float(e["sample_rate"])) != (
                    run.noise_multiplier,
                    run.sample_rate,
                ):
                    mismatches.append(
                        f"line {run.line!r} run {run.run_tag} round {r}: the ledger records "
                        f"z={e['noise_multiplier']}, q={e['sample_rate']}; the round said "
                        f"z={run.noise_multiplier}, q={run.sample_rate}"
                    )
            if entries:
                run.rounds_accounted = max(len(by_round), run.rounds_accounted)
                run.source = "registry ledger (or planned, if more)"
    target = delta if delta is not None else max((r.delta for r in runs.values()), default=1e-5)
    history: list[Step] = [
        (r.noise_multiplier, r.sample_rate, r.rounds_accounted) for r in runs.values()
    ]
    per_line: dict[str, float] = {}
    for line in sorted({r.line for r in runs.values()}):
        steps = [
            (r.noise_multiplier, r.sample_rate, r.rounds_accounted)
            for r in runs.values()
            if r.line == line
        ]
        per_line[line] = runtime_epsilon(steps, target, "rdp")
    return Receipt(
        state_dir=str(state_dir),
        delta=target,
        runs=list(runs.values()),
        user_epsilon_rdp=runtime_epsilon(history, target, "rdp"),
        user_epsilon_recomputed=audit_epsilon(history, target, "rdp"),
        per_line=per_line,
        record_level=_record_level(Path(state_dir)),
        mismatches=mismatches,
    )


def _record_level(state_dir: Path) -> dict[str, Any] | None:
    """The site's DP-SGD spend from its accountant state, recomputed with dp-accounting."""
    path = state_dir / STATE_FILE
    if not path.exists():
        return None
    try:
        state = json.loads(path.read_text())
        history = merge_history(state["history"])
        accountant = str(state["accountant"])
        rounds = state.get("rounds", [])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"DP-SGD state {path} is unreadable ({exc})") from None
    delta = float(state.get("delta", 1e-5))
    return {
        "accountant": f"opacus-{accountant}",
        "rounds": len(rounds),
        "steps": sum(n for _, _, n in history),
        "delta": delta,
        "epsilon_recorded": float(rounds[-1]["epsilon"]) if rounds else 0.0,
        "epsilon_recomputed": audit_epsilon(history, delta, AUDIT_METHOD[accountant]),
    }
