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
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedcommons.errors import (
    SignatureError,
    SigningKeyError,
    VerificationError,
)
from fedcommons.releases.registry import HEAD_FORMAT, Registry, Release, head_body
from fedcommons.releases.signing import key_id, load_public_key, verify_signature
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
    """Outcome of checking ``HEAD.json`` against the index."""

    ok: bool
    attested: int = 0
    unattested: list[str] = field(default_factory=list)  # "name version" not in the head
    error: str = ""
    path: str | None = None


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
            path = registry.public_key_path
            try:
                public_key = load_public_key(path.read_bytes(), str(path))
            except FileNotFoundError as exc:
                raise SigningKeyError(
                    f"registry publishes no public key ({path} is missing); pass --public-key"
                ) from exc
        self.public_key = public_key
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
        try:
            manifest = ReleaseManifest.from_json(data)
        except (ValueError, TypeError) as exc:
            raise VerificationError(
                f"manifest {release.manifest_path} does not parse: {exc}",
                str(release.manifest_path),
            ) from exc
        if (manifest.name, manifest.version) != (release.name, release.version):
            raise VerificationError(
                f"manifest {release.manifest_path} is {manifest.name} {manifest.version}, "
                f"but the index lists it as {release.name} {release.version}",
                str(release.manifest_path),
            )
        sig_path = release.signature_path
        try:
            sig = sig_path.read_bytes()
        except FileNotFoundError as exc:
            raise SignatureError(f"signature {sig_path} is missing", str(sig_path)) from exc
        try:
            verify_signature(self.public_key, data, sig, where=str(sig_path))
        except SignatureError as exc:
            raise SignatureError(str(exc), str(sig_path)) from exc
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

    def verify_head(self, name: str | None = None) -> HeadResult:
        """Check ``HEAD.json`` (for line ``name``, or every line); never raises."""
        path = self.registry.head_path
        rows = {(r.name, r.version): r for r in self.registry.releases(name)}
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            if not rows:
                return HeadResult(ok=True)
            return HeadResult(False, error=f"{path} is missing", path=str(path))
        try:
            doc = json.loads(raw)
            attestation, signature = doc["attestation"], doc["signature"]
            entries = attestation["releases"]
            if attestation.get("format") != HEAD_FORMAT:
                raise ValueError(f"format {attestation.get('format')!r}")
            verify_signature(
                self.public_key,
                head_body(attestation),
                json.dumps(signature).encode(),
                where=str(path),
            )
        except SignatureError as exc:
            return HeadResult(False, error=str(exc), path=str(path))
        except (ValueError, KeyError, TypeError) as exc:
            return HeadResult(False, error=f"{path} is malformed ({exc})", path=str(path))
        attested = set()
        for entry in entries:
            key = (entry.get("name"), entry.get("version"))
            if name is not None and key[0] != name:
                continue
            attested.add(key)
            row = rows.get(key)  # type: ignore[arg-type]
            if row is None:
                return HeadResult(
                    False,
                    len(attested),
                    error=f"{key[0]} {key[1]} is attested by {path} but missing from the "
                    "index (deleted?)",
                    path=str(path),
                )
            if row.manifest_sha256 != entry.get("manifest_sha256"):
                return HeadResult(
                    False,
                    len(attested),
                    error=f"{key[0]} {key[1]}: the index's manifest sha256 "
                    f"{row.manifest_sha256} is not the one {path} attests (replaced?)",
                    path=str(row.manifest_path),
                )
        unattested = [f"{n} {v}" for (n, v) in rows if (n, v) not in attested]
        return HeadResult(True, len(attested), unattested)

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
