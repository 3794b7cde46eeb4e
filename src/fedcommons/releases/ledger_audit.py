"""``fedcommons audit ledger``: a release's privacy claim, checked from signed data only.

:func:`audit_signed_ledger` trusts nothing the registry's writer could change without the
signing key:

1. the signer is decided as for ``release verify`` (``--trust``, the trust file, first
   use, or the registry's own key, reported as unpinned);
2. the release, its chain and ``HEAD.json`` verify against that signer (a rewritten
   ledger + manifest + index fails here: the forger cannot sign), and the head is not a
   rollback of one the user accepted;
3. the privacy ledger the *signed* manifest names is audited
   (:func:`fedcommons.privacy.audits.ledger_audit.audit_ledger`): chain, each entry's
   signed hash (the first wrong round is named), noise, ε recomputed with dp-accounting;
4. the whole ledger's chain is read, and entries after what the newest signed release of
   the line covers are flagged: an appended line, or a run still in progress, that no
   signature vouches for.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedcommons.errors import PrivacyAuditError, VerificationError
from fedcommons.privacy.audits.ledger_audit import LedgerAudit, audit_ledger
from fedcommons.privacy.ledger import LedgerRecord, PrivacyLedger
from fedcommons.releases.registry import Registry, Release
from fedcommons.releases.trust import TrustDecision, TrustStore, resolve_trust
from fedcommons.releases.verification import Verifier
from fedcommons.wire.manifest import ReleaseManifest


@dataclass
class SignedLedgerAudit:
    """The outcome of :func:`audit_signed_ledger` (errors aside, the claim reproduced)."""

    trust: TrustDecision
    name: str
    version: str
    audit: LedgerAudit
    #: The newest signed release of the line whose ledger head the ledger still matches.
    covered_by: str
    covered_entries: int
    #: Entries after every signed release: {"seq", "round", "run_id"}.
    unreleased: list[dict[str, Any]] = field(default_factory=list)

    @property
    def flagged(self) -> bool:
        """Whether the ledger holds entries no signed release covers."""
        return bool(self.unreleased)


def _ledger_file(registry: Registry, privacy: dict[str, Any]) -> Path:
    """The ledger the manifest names, refused unless it lies inside the registry."""
    root = registry.root.resolve()
    path = (registry.root / str(privacy["ledger"])).resolve()
    if not path.is_relative_to(root):
        raise PrivacyAuditError(f"the release names a ledger outside the registry: {path}")
    return path


def _coverage(
    registry: Registry, release: Release, privacy: dict[str, Any], records: list[LedgerRecord]
) -> tuple[str, int]:
    """(version, entries) of the newest signed release of the line that the ledger matches."""
    best = (release.version, int(privacy["ledger_entries"]))
    for other in registry.releases(release.name):
        try:
            manifest: ReleaseManifest = registry.verified_manifest(other)
        except VerificationError:
            continue  # unsigned or altered: covers nothing
        theirs = manifest.privacy or {}
        if theirs.get("ledger") != privacy.get("ledger") or "ledger_entries" not in theirs:
            continue
        count = int(theirs["ledger_entries"])
        if count <= best[1] or count > len(records):
            continue
        if records[count - 1].sha256 == theirs.get("ledger_head_sha256"):
            best = (other.version, count)
    return best


def audit_signed_ledger(
    registry: Registry,
    ref: str,
    *,
    name: str | None = None,
    trust: str | None = None,
    first_use: bool = False,
    store: TrustStore | None = None,
) -> SignedLedgerAudit:
    """Audit release ``ref``'s privacy ledger against the signer the user trusts.

    Raises :class:`~fedcommons.errors.PrivacyAuditError` (or its
    :class:`~fedcommons.errors.LedgerTamperedError`, naming the first wrong round) when
    the release does not verify or a claim does not reproduce.
    """
    store = store or TrustStore()
    decision = resolve_trust(
        registry.root, registry.published_key(), trust=trust, first_use=first_use, store=store
    )
    registry.trusted_key = decision.public_key
    release = registry.get(ref, name=name)
    verifier = Verifier(registry, decision.public_key)
    result = verifier.verify(release)
    if not result.ok:
        raise PrivacyAuditError(
            f"{release.name} {release.version} does not verify against the signer "
            f"{decision.key_id[:16]}… ({decision.source.value}): {result.error}; its privacy "
            "claim cannot be trusted"
        )
    head = verifier.verify_head(release.name, store=store)
    if not head.ok:
        raise PrivacyAuditError(f"HEAD.json does not verify: {head.error}")
    privacy = registry.verified_manifest(release).privacy
    if privacy and "ledger" in privacy:
        privacy = dict(privacy, ledger=str(_ledger_file(registry, privacy)))
    audit = audit_ledger(registry.root, privacy)
    records = PrivacyLedger(Path(privacy["ledger"])).verify()  # every line, chain checked
    version, covered = _coverage(registry, release, privacy, records)
    unreleased = [
        {"seq": r.seq, "round": r.round, "run_id": r.entry.get("run_id")} for r in records[covered:]
    ]
    if verifier.last_head is not None:
        store.accept_head(registry.root, verifier.last_head)
    return SignedLedgerAudit(
        decision, release.name, release.version, audit, version, covered, unreleased
    )
