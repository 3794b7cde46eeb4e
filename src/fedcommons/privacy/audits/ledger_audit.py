"""Recompute a release's privacy guarantee from its ledger with an independent accountant.

What :func:`audit_ledger` checks, in order (the first failure raises, naming the round):

1. the hash chain of every ledger entry the release covers (edits, removals, reorders);
2. that each entry's hash is the one the manifest recorded (``ledger_entry_sha256``,
   naming the first rewritten round) and the chain's head after that many entries is the
   hash the manifest recorded (a ledger rewritten or truncated after publication);
3. per central-DP round: the sensitivity the sampling scheme implies (C for Poisson or
   every-institution rounds, 2C for fixed-size samples under add/remove adjacency), the
   effective noise multiplier recomputed from the recorded noise std, denominator and that
   sensitivity, and that it is at least the configured z;
4. per central-DP round: the cumulative ε at δ recomputed with Google's dp-accounting
   (RDP for an Opacus-RDP ledger, equal within 1e-6 relative; PLD for an Opacus-PRV one,
   equal within the two numerical methods' error bounds);
5. the manifest's guarantee equals the last entry's ε;
6. every institution's reported DP-SGD spend, recomputed from the history it reported.

It also reports the final ε with both methods (RDP and PLD) for the auditors' page.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedcommons.errors import LedgerTamperedError, PrivacyAuditError
from fedcommons.privacy.accounting import AUDIT_METHOD, agrees, audit_epsilon, merge_history
from fedcommons.privacy.ledger import PrivacyLedger


@dataclass(frozen=True)
class RoundCheck:
    """One central-DP round as recorded and as recomputed."""

    seq: int
    round: int
    run_id: int
    population: int
    expected_participants: float
    sensitivity: float
    noise_multiplier: float
    effective_noise_multiplier: float
    sample_rate: float
    recorded_epsilon: float
    recomputed_epsilon: float


@dataclass
class LedgerAudit:
    """The outcome of :func:`audit_ledger` (raised errors aside, everything checked out)."""

    ledger: str
    entries: int
    head_sha256: str
    accountant: str
    method: str
    delta: float
    claimed_epsilon: float
    recomputed_epsilon: float
    epsilon_rdp: float
    epsilon_pld: float
    rounds: list[RoundCheck] = field(default_factory=list)
    client_checks: list[dict[str, Any]] = field(default_factory=list)


def implied_sensitivity(entry: dict[str, Any]) -> float:
    """Δ of a DP-FedAvg round, derived from its sampling scheme (never taken on trust).

    Add/remove adjacency: C under Poisson sampling or when every institution takes part;
    2C for a fixed-size sample of k (adding an institution can swap it for a member of the
    sample). A schema-1 entry (no ``clients_per_round``) counts as fixed-size when it
    sampled fewer nodes than were connected.
    """
    c = float(entry["clip_norm"])
    if entry.get("sampling") != "fixed":
        return c
    if "clients_per_round" in entry:
        return 2 * c if int(entry["clients_per_round"]) > 0 else c
    return 2 * c if int(entry.get("sampled", 0)) < int(entry.get("population", 0)) else c


def _round_of(entry: dict[str, Any], seq: int) -> str:
    return f"round {entry.get('round', '?')} of run {entry.get('run_id', '?')} (entry {seq})"


def audit_ledger(
    registry_root: Path, privacy: dict[str, Any], *, check_clients: bool = True
) -> LedgerAudit:
    """Audit the ledger a release's manifest ``privacy`` field points to."""
    if not privacy or "ledger" not in privacy:
        raise PrivacyAuditError("the release records no privacy ledger (no DP was used)")
    path = Path(registry_root) / privacy["ledger"]
    if not path.exists():
        raise PrivacyAuditError(f"ledger {path} named by the release does not exist")
    count = int(privacy["ledger_entries"])
    records = PrivacyLedger(path).verify(limit=count)
    if len(records) < count:
        raise LedgerTamperedError(
            f"ledger {path} has {len(records)} entries, the release covers {count}: "
            "entries were removed",
            seq=len(records),
        )
    for rec, signed in zip(records, privacy.get("ledger_entry_sha256") or [], strict=False):
        if rec.sha256 != signed:
            raise LedgerTamperedError(
                f"{_round_of(rec.entry, rec.seq)}: the entry's hash {rec.sha256[:12]}… is not "
                f"the {signed[:12]}… the release signed: the ledger was rewritten from here on",
                round_no=rec.round,
                seq=rec.seq,
            )
    head = records[-1]
    if head.sha256 != privacy["ledger_head_sha256"]:
        raise LedgerTamperedError(
            f"{_round_of(head.entry, head.seq)}: the ledger's hash "
            f"{head.sha256[:12]}… is not the {privacy['ledger_head_sha256'][:12]}… the "
            "release recorded: the ledger was rewritten after publication",
            round_no=head.round,
            seq=head.seq,
        )
    if privacy.get("distributed"):
        result = _audit_distributed(records, privacy["distributed"], str(path), head.sha256)
        if check_clients:
            result.client_checks = _check_client_spends(records)
        return result
    central = privacy.get("central") or {}
    history: list[tuple[float, float, int]] = []
    checks: list[RoundCheck] = []
    accountant = str(central.get("accountant", "opacus-rdp")).removeprefix("opacus-")
    method = AUDIT_METHOD.get(accountant, "rdp")
    delta = float(central.get("delta", 0.0) or 0.0)
    for rec in records:
        e = rec.entry
        if e.get("mechanism") != "dp-fedavg":
            continue
        where = _round_of(e, rec.seq)
        try:
            z = float(e["noise_multiplier"])
            q = float(e["sample_rate"])
            float(e["clip_norm"])  # present and numeric (Δ derives from it)
            std = float(e["noise_std"])
            denom = float(e["denominator"])
            recorded = float(e["epsilon"])
            d = float(e["delta"])
            acct = str(e["accountant"]).removeprefix("opacus-")
        except (KeyError, TypeError, ValueError) as exc:
            raise PrivacyAuditError(f"{where}: incomplete entry ({exc})") from None
        sensitivity = implied_sensitivity(e)
        effective = std * denom / sensitivity
        if not math.isclose(effective, float(e["effective_noise_multiplier"]), rel_tol=1e-9):
            raise PrivacyAuditError(
                f"{where}: recorded effective noise multiplier "
                f"{e['effective_noise_multiplier']} but noise std × denominator / Δ = {effective} "
                f"(Δ = {sensitivity:g} for {e.get('sampling', '?')} sampling)"
            )
        if effective < z * (1 - 1e-9):
            raise PrivacyAuditError(
                f"{where}: under-noised: effective noise multiplier {effective:.6g} < "
                f"configured z={z:g}"
            )
        history.append((z, q, 1))
        recomputed = audit_epsilon(history, d, AUDIT_METHOD[acct])
        if not agrees(recorded, recomputed, acct):
            raise PrivacyAuditError(
                f"{where}: recorded cumulative ε={recorded!r} at δ={d:g}, independent "
                f"{AUDIT_METHOD[acct].upper()} recomputation gives ε={recomputed!r}"
            )
        accountant, method, delta = acct, AUDIT_METHOD[acct], d
        checks.append(
            RoundCheck(
                seq=rec.seq,
                round=int(e["round"]),
                run_id=int(e.get("run_id", 0)),
                population=int(e.get("population", 0)),
                expected_participants=float(e.get("expected_participants", denom)),
                sensitivity=sensitivity,
                noise_multiplier=z,
                effective_noise_multiplier=effective,
                sample_rate=q,
                recorded_epsilon=recorded,
                recomputed_epsilon=recomputed,
            )
        )
    claimed = float(central["epsilon"]) if central else 0.0
    final = checks[-1].recomputed_epsilon if checks else 0.0
    if central and not agrees(claimed, checks[-1].recorded_epsilon if checks else 0.0, "rdp"):
        raise PrivacyAuditError(
            f"the release claims ε={claimed!r} but its ledger's last DP round records "
            f"ε={checks[-1].recorded_epsilon if checks else 0.0!r}"
        )
    result = LedgerAudit(
        ledger=str(path),
        entries=len(records),
        head_sha256=head.sha256,
        accountant=f"opacus-{accountant}",
        method=f"dp-accounting-{method}",
        delta=delta,
        claimed_epsilon=claimed,
        recomputed_epsilon=final,
        epsilon_rdp=audit_epsilon(history, delta, "rdp") if checks else 0.0,
        epsilon_pld=audit_epsilon(history, delta, "pld") if checks else 0.0,
        rounds=checks,
    )
    if check_clients:
        result.client_checks = _check_client_spends(records)
    return result


def _audit_distributed(
    records: list[Any], claim: dict[str, Any], ledger: str, head: str
) -> LedgerAudit:
    """Steps 3–5 for a distributed-DP (Skellam) ledger.

    Per round: the sensitivity bounds recomputed from levels and dimension, the noise
    variance from contributors × local variance, the noise at least (z·Δ₂)²; the
    cumulative ε recomputed independently (:func:`~fedcommons.privacy.distributed.
    recompute_epsilons`: dp-accounting's Gaussian RDP plus the published discreteness
    term, Opacus's conversion), equal within 1e-6 relative.
    """
    from fedcommons.privacy.distributed import (
        MECHANISM,
        l1_bound,
        norm_bound,
        recompute_epsilons,
    )

    delta = float(claim["delta"])
    rounds = [r for r in records if r.entry.get("mechanism") == MECHANISM]
    entries = [r.entry for r in rounds]
    try:
        recomputed = recompute_epsilons(entries, delta)
    except (KeyError, TypeError, ValueError) as exc:
        raise PrivacyAuditError(f"a distributed-DP entry is incomplete ({exc})") from None
    checks: list[RoundCheck] = []
    for rec, again in zip(rounds, recomputed, strict=True):
        e, where = rec.entry, _round_of(rec.entry, rec.seq)
        bound = norm_bound(int(e["levels"]), int(e["dim"]))
        if not math.isclose(bound, float(e["norm_bound"]), rel_tol=1e-12) or not math.isclose(
            l1_bound(bound, int(e["dim"])), float(e["l1_bound"]), rel_tol=1e-12
        ):
            raise PrivacyAuditError(f"{where}: recorded sensitivity bounds do not recompute")
        variance = int(e["contributors"]) * float(e["local_variance"])
        if not math.isclose(variance, float(e["noise_variance"]), rel_tol=1e-12):
            raise PrivacyAuditError(
                f"{where}: noise variance {e['noise_variance']} is not contributors × local "
                f"variance = {variance}"
            )
        z = float(e["noise_multiplier"])
        effective = math.sqrt(variance) / bound
        if effective < z * (1 - 1e-9):
            raise PrivacyAuditError(
                f"{where}: under-noised: {effective:.6g} < configured z={z:g} at Δ₂"
            )
        if not agrees(float(e["epsilon"]), again, "rdp"):
            raise PrivacyAuditError(
                f"{where}: recorded cumulative ε={e['epsilon']!r} at δ={delta:g}, independent "
                f"recomputation gives ε={again!r}"
            )
        checks.append(
            RoundCheck(
                seq=rec.seq,
                round=int(e["round"]),
                run_id=int(e.get("run_id", 0)),
                population=int(e.get("population", 0)),
                expected_participants=float(e.get("expected_participants", 0.0)),
                sensitivity=bound,
                noise_multiplier=z,
                effective_noise_multiplier=effective,
                sample_rate=1.0,
                recorded_epsilon=float(e["epsilon"]),
                recomputed_epsilon=again,
            )
        )
    claimed = float(claim["epsilon"])
    final = checks[-1].recomputed_epsilon if checks else 0.0
    if not agrees(claimed, checks[-1].recorded_epsilon if checks else 0.0, "rdp"):
        raise PrivacyAuditError(
            f"the release claims ε={claimed!r} but its ledger's last distributed round records "
            f"ε={checks[-1].recorded_epsilon if checks else 0.0!r}"
        )
    return LedgerAudit(
        ledger=ledger,
        entries=len(records),
        head_sha256=head,
        accountant=str(claim.get("accountant", "skellam-rdp+dp-accounting")),
        method="dp-accounting-gaussian-rdp+skellam-term+opacus-conversion",
        delta=delta,
        claimed_epsilon=claimed,
        recomputed_epsilon=final,
        epsilon_rdp=final,
        epsilon_pld=math.nan,  # no PLD of the Skellam mechanism exists in dp-accounting
        rounds=checks,
    )


def _check_client_spends(records: list[Any]) -> list[dict[str, Any]]:
    latest: dict[int, tuple[int, dict[str, Any]]] = {}
    for rec in records:
        for spend in rec.entry.get("client_spends", []):
            latest[int(spend["node"])] = (rec.seq, spend)
    out = []
    for node, (seq, spend) in sorted(latest.items()):
        acct = str(spend["accountant"])
        history = merge_history(spend["history"])
        recomputed = audit_epsilon(history, float(spend["delta"]), AUDIT_METHOD[acct])
        if not agrees(float(spend["epsilon"]), recomputed, acct):
            raise PrivacyAuditError(
                f"institution node {node} (entry {seq}) reported ε={spend['epsilon']!r}; its "
                f"reported history gives ε={recomputed!r}"
            )
        out.append(
            {
                "node": node,
                "reported_epsilon": float(spend["epsilon"]),
                "recomputed_epsilon": recomputed,
                "delta": float(spend["delta"]),
                "budget_epsilon": float(spend["budget_epsilon"]),
                "steps": int(spend["steps"]),
                "accountant": f"opacus-{acct}",
            }
        )
    return out
