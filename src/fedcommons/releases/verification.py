"""``fedcommons release verify``: hashes, signature and the chain to the parent.

For a release, in order (the first failure names the file that is wrong):

1. ``manifest.json`` hashes to what the index recorded, and names the same line and
   version the index does (a swapped or re-labelled release fails here);
2. ``manifest.sig`` is an Ed25519 signature of those bytes by the registry's key (or the
   key pinned with ``--public-key``);
3. the weights blob hashes to the manifest's ``weights_sha256``;
4. the model card hashes to the manifest's ``card_sha256``;
5. the parent named in the manifest exists, its manifest hashes to the manifest's
   ``parent_manifest_sha256`` and it was created no later than the child; then the
   parent is verified the same way, up to the first release of the line.

A deleted release breaks its children's chain; a reordered or replaced one breaks the
hashes; an edited manifest breaks its hash and its signature. Each release in a chain is
verified once per call.

:meth:`Verifier.verify_head` checks ``HEAD.json``, the signed list of every release the
registry published: an attested release missing from the index (deleted, also the newest
of a line) or with another manifest hash (replaced) fails; a release the head does not
list yet (a publish that crashed between commit and head rewrite) is reported, not failed.
With a :class:`~fedcommons.releases.trust.TrustStore` it also compares the head with the
last one this user accepted from the same signer (rollback detection).

:func:`verify_registry` is the whole check as ``fedcommons release verify`` runs it:
decide the key (pinned, remembered, first use, or the registry's own, said so), verify
the releases and the head, and remember the head when everything verified.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedcommons.errors import (
    RollbackError,
    SigningKeyError,
    VerificationError,
)
from fedcommons.releases.head import HEAD_FORMAT_V1, SignedHead, read_head
from fedcommons.releases.registry import Registry, Release
from fedcommons.releases.signing import key_id
from fedcommons.releases.trust import TrustDecision, TrustStore, check_head_progress, resolve_trust
from fedcommons.wire.manifest import ReleaseManifest


@dataclass
class VerifyResult:
    """Outcome of verifying one release and its chain."""

    name: str
    version: str
    ok: bool
    chain: list[str] = field(default_factory=list)  # versions checked, child first
    error: str = ""
    path: str | None = None  # the file that is wrong
    key_id: str = ""


@dataclass
class HeadResult:
    """Outcome of checking ``HEAD.json`` against the index (and the last accepted head)."""

    ok: bool
    attested: int = 0
    unattested: list[str] = field(default_factory=list)  # "name version" not in the head
    error: str = ""
    path: str | None = None
    format: str = ""
    seq: int | None = None
    sha256: str = ""
    rollback: bool = False  # the error is a rollback / fork against the accepted head
    notes: list[str] = field(default_factory=list)


def _when(stamp: str) -> datetime:
    try:
        return datetime.fromisoformat(stamp)
    except ValueError as exc:
        raise VerificationError(f"created time {stamp!r} is not ISO 8601") from exc


def _sha256_file(path: Path, what: str) -> tuple[bytes, str]:
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise VerificationError(f"{what} {path} is missing", str(path)) from exc
    return data, hashlib.sha256(data).hexdigest()


def _check_file(path: Path, what: str, manifest_sha256: str) -> None:
    """Raise unless ``path`` hashes to the sha256 its manifest records."""
    _, sha = _sha256_file(path, what)
    if sha != manifest_sha256:
        raise VerificationError(
            f"{what} {path} has sha256 {sha}, the manifest says {manifest_sha256}", str(path)
        )


class Verifier:
    """Verifies releases of one registry against one public key (memoised per chain)."""

    def __init__(self, registry: Registry, public_key: Ed25519PublicKey | None = None) -> None:
        self.registry = registry
        if public_key is None:
            public_key = registry.reader_key()
            if public_key is None:
                raise SigningKeyError(
                    f"registry publishes no public key ({registry.public_key_path} is "
                    "missing); pass --trust KEY.pem"
                )
        self.public_key = public_key
        #: The head :meth:`verify_head` last read and found valid (for the trust store).
        self.last_head: SignedHead | None = None
        self._verified: dict[tuple[str, str], str] = {}  # -> manifest sha256
        self._lines: dict[str, dict[str, Release]] = {}

    def check_one(self, release: Release) -> ReleaseManifest:
        """Steps 1–4 for ``release`` alone; return its parsed manifest."""
        data, digest = _sha256_file(release.manifest_path, "manifest")
        if digest != release.manifest_sha256:
            raise VerificationError(
                f"manifest {release.manifest_path} has sha256 {digest}, the index recorded "
                f"{release.manifest_sha256}",
                str(release.manifest_path),
            )
        manifest = self.registry.verified_manifest(release, key=self.public_key, data=data)
        _check_file(release.weights_path, "weights file", manifest.weights_sha256)
        if manifest.card_sha256:
            _check_file(release.card_path, "model card", manifest.card_sha256)
        return manifest

    def verify(self, release: Release) -> VerifyResult:
        """Verify ``release`` and every ancestor; never raises for a bad release."""
        result = VerifyResult(release.name, release.version, ok=True)
        current: Release | None = release
        child: tuple[Release, ReleaseManifest] | None = None
        try:
            while current is not None:
                key = (current.name, current.version)
                result.chain.append(current.version)
                if key in self._verified:
                    manifest = None
                    sha = self._verified[key]
                else:
                    manifest = self.check_one(current)
                    sha = current.manifest_sha256
                if child is not None:
                    self._check_link(child[0], child[1], current, sha)
                if manifest is None:
                    break  # the rest of this chain was verified in this call already
                self._verified[key] = sha
                if not manifest.parent_version:
                    break
                parent = self._lookup(current.name, manifest.parent_version)
                if parent is None:
                    raise VerificationError(
                        f"{current.name} {current.version}: parent {manifest.parent_version} "
                        "is missing from the registry (deleted?)",
                        str(current.manifest_path),
                    )
                child = (current, manifest)
                current = parent
        except VerificationError as exc:
            result.ok = False
            result.error = str(exc)
            result.path = exc.path
        return result

    def verify_head(
        self, name: str | None = None, *, store: TrustStore | None = None
    ) -> HeadResult:
        """Check ``HEAD.json`` (for line ``name``, or every line); never raises.

        With ``store``, the head must also not be older than, fork from or drop releases
        of the head last accepted from this signer (see
        :func:`~fedcommons.releases.trust.check_head_progress`).
        """
        path = self.registry.head_path
        rows = {(r.name, r.version): r for r in self.registry.releases(name)}
        self.last_head = None
        try:
            head = read_head(path, self.public_key)
        except VerificationError as exc:
            return HeadResult(False, error=str(exc), path=str(path))
        if head is None:
            if not rows:
                return HeadResult(ok=True)
            return HeadResult(False, error=f"{path} is missing", path=str(path))
        result = HeadResult(True, format=head.format, seq=head.seq, sha256=head.sha256)
        if head.format == HEAD_FORMAT_V1:
            result.notes.append(
                "HEAD.json is format 1: aliases and its sequence are not signed; the next "
                "publish, promote or `release sign-legacy` upgrades it"
            )
        for (line, version), sha in head.releases.items():
            if name is not None and line != name:
                continue
            result.attested += 1
            row = rows.get((line, version))
            if row is None:
                result.ok = False
                result.error = (
                    f"{line} {version} is attested by {path} but missing from the index (deleted?)"
                )
                result.path = str(path)
                return result
            if row.manifest_sha256 != sha:
                result.ok = False
                result.error = (
                    f"{line} {version}: the index's manifest sha256 {row.manifest_sha256} is "
                    f"not the one {path} attests (replaced?)"
                )
                result.path = str(row.manifest_path)
                return result
        for line, aliases in head.aliases.items():
            for alias, version in aliases.items():
                if (line, version) not in head.releases:
                    result.ok = False
                    result.error = f"{path}: alias {line} @{alias} names unattested {version}"
                    result.path = str(path)
                    return result
        result.unattested = [f"{n} {v}" for (n, v) in rows if (n, v) not in head.releases]
        if store is not None:
            try:
                result.notes += check_head_progress(
                    head, store.accepted_head(self.registry.root, head)
                )
            except RollbackError as exc:
                result.ok, result.rollback = False, True
                result.error, result.path = str(exc), str(path)
                return result
        self.last_head = head
        return result

    def _lookup(self, name: str, version: str) -> Release | None:
        """The index's release ``version`` of line ``name`` (one index read per line)."""
        if name not in self._lines:
            self._lines[name] = {r.version: r for r in self.registry.releases(name)}
        return self._lines[name].get(version)

    @staticmethod
    def _check_link(
        child: Release, child_manifest: ReleaseManifest, parent: Release, parent_sha: str
    ) -> None:
        if child_manifest.parent_manifest_sha256 != parent_sha:
            raise VerificationError(
                f"{child.name} {child.version} was built on a parent manifest with sha256 "
                f"{child_manifest.parent_manifest_sha256}, but {parent.version}'s manifest "
                f"is {parent_sha} (replaced or reordered)",
                str(parent.manifest_path),
            )
        if _when(parent.created) > _when(child_manifest.created):
            raise VerificationError(
                f"{child.name} {child.version} (created {child_manifest.created}) predates "
                f"its parent {parent.version} (created {parent.created}): reordered chain",
                str(parent.manifest_path),
            )


def verify_release(
    registry: Registry, release: Release, public_key: Ed25519PublicKey | None = None
) -> VerifyResult:
    """Verify one release and its chain."""
    verifier = Verifier(registry, public_key)
    result = verifier.verify(release)
    result.key_id = key_id(verifier.public_key)
    return result


@dataclass
class RegistryVerification:
    """What ``fedcommons release verify`` found: the key used, each release, the head."""

    trust: TrustDecision
    releases: list[VerifyResult]
    head: HeadResult

    @property
    def ok(self) -> bool:
        """Whether every release and the head verified."""
        return self.head.ok and all(r.ok for r in self.releases)

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form (the CLI's ``--format json``)."""
        from dataclasses import asdict

        return {
            "ok": self.ok,
            "trust": {
                "key_id": self.trust.key_id,
                "source": self.trust.source.value,
                "pinned": self.trust.pinned,
                "note": self.trust.note,
            },
            "releases": [asdict(r) for r in self.releases],
            "head": asdict(self.head),
        }


def verify_registry(
    registry: Registry,
    targets: list[Release],
    *,
    trust: str | None = None,
    first_use: bool = False,
    store: TrustStore | None = None,
    line: str | None = None,
    decision: TrustDecision | None = None,
) -> RegistryVerification:
    """Verify ``targets`` and ``HEAD.json`` against the signer the user trusts.

    The key comes from :func:`~fedcommons.releases.trust.resolve_trust` (``trust``: a PEM
    file or fingerprint; else the trust file; else, with ``first_use``, the registry's key
    pinned now; else the registry's key, reported unpinned). The head is checked for the
    whole registry against the last one accepted and, when everything verified,
    remembered as accepted. A ``decision`` made earlier (to resolve aliases with its key)
    is used as is. Never raises for a bad release; raises
    :class:`~fedcommons.errors.TrustError` / :class:`~fedcommons.errors.SigningKeyError`
    when no key can be decided.
    """
    store = store or TrustStore()
    if decision is None:
        decision = resolve_trust(
            registry.root, registry.published_key(), trust=trust, first_use=first_use, store=store
        )
    verifier = Verifier(registry, decision.public_key)
    results = []
    for release in targets:
        result = verifier.verify(release)
        result.key_id = decision.key_id
        results.append(result)
    head = verifier.verify_head(line, store=store)
    outcome = RegistryVerification(decision, results, head)
    if outcome.ok and verifier.last_head is not None:
        store.accept_head(registry.root, verifier.last_head)
    return outcome
