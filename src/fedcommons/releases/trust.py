"""Whom a release user trusts: pinned signers and the last registry head they accepted.

A registry publishes its public key next to the data (``keys/ed25519.pub``), so whoever
can write the registry can replace the key, re-sign everything and rewrite history. A
user therefore pins the signer out of band:

- ``fedcommons release verify --trust KEY.pem|FINGERPRINT`` pins for this call and
  remembers the pin for the registry;
- the trust file (``trust.json`` in :func:`fedcommons.fileio.config_dir`) remembers pins
  per registry (``fedcommons release trust add|list|remove``);
- trust on first use only when asked (``--trust-on-first-use``);
- otherwise verification uses the key it finds and says so (:attr:`TrustDecision.pinned`
  is false, and the CLI prints a warning with the fingerprint to pin).

The trust file also remembers, per registry and signer, the last ``HEAD.json`` the user
accepted (its sequence number, hash and attested releases). :func:`check_head_progress`
refuses an older head (a rollback that hides the newest releases), a different head with
the same number (a fork), a head that does not chain to the accepted one, and any head
that drops or replaces a release the accepted one attested.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedcommons.errors import RollbackError, SigningKeyError, TrustError
from fedcommons.fileio import atomic_write, config_dir, exclusive_lock
from fedcommons.releases.head import SignedHead
from fedcommons.releases.signing import key_id, load_public_key, public_pem

TRUST_FILE = "trust.json"
TRUST_FORMAT = "fedcommons-trust/1"
_FINGERPRINT = re.compile(r"(?:sha256:)?([0-9a-fA-F]{16,64})")


class TrustSource(StrEnum):
    """Where the key a verification used came from."""

    pinned = "pinned"  #: --trust on this call
    trust_file = "trust-file"  #: remembered pin for this registry
    first_use = "first-use"  #: the registry's key, remembered now (--trust-on-first-use)
    registry = "registry"  #: the registry's own key, not pinned


@dataclass(frozen=True)
class TrustDecision:
    """The key to verify a registry with, and why."""

    public_key: Ed25519PublicKey
    key_id: str
    source: TrustSource
    note: str

    @property
    def pinned(self) -> bool:
        """Whether the key came from the user rather than from the registry itself."""
        return self.source is not TrustSource.registry


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def registry_label(root: Path) -> str:
    """How the trust file names a registry: its resolved absolute path."""
    return str(Path(root).expanduser().resolve())


@dataclass
class TrustStore:
    """The user's trust file: pinned signers per registry, accepted heads per signer."""

    path: Path = field(default_factory=lambda: config_dir() / TRUST_FILE)

    def _read(self) -> dict[str, Any]:
        try:
            doc = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return {"format": TRUST_FORMAT, "registries": {}, "heads": {}}
        except ValueError as exc:
            raise TrustError(f"trust file {self.path} is not valid JSON: {exc}") from exc
        if not isinstance(doc, dict) or doc.get("format") != TRUST_FORMAT:
            raise TrustError(f"trust file {self.path} is not a {TRUST_FORMAT} file")
        doc.setdefault("registries", {})
        doc.setdefault("heads", {})
        return doc

    @contextlib.contextmanager
    def _update(self) -> Iterator[dict[str, Any]]:
        """Read, let the caller change, write back atomically (0600), under a lock."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        lock = self.path.with_name(self.path.name + ".lock")
        with (
            lock.open("a+b") as fh,
            exclusive_lock(fh, 30.0, lambda: TrustError(f"{lock} is locked for 30s")),
        ):
            doc = self._read()
            yield doc
            atomic_write(self.path, (json.dumps(doc, indent=1) + "\n").encode(), mode=0o600)

    # -- pinned signers -------------------------------------------------------------
    def pinned_key(self, registry: Path) -> Ed25519PublicKey | None:
        """The key pinned for ``registry``, or ``None``."""
        entry = self._read()["registries"].get(registry_label(registry))
        if entry is None:
            return None
        return load_public_key(entry["public_key"].encode(), f"{self.path} (pin for {registry})")

    def pin(self, registry: Path, key: Ed25519PublicKey, how: str) -> Ed25519PublicKey | None:
        """Remember ``key`` as ``registry``'s signer; return the pin it replaced, if any."""
        label = registry_label(registry)
        with self._update() as doc:
            old = doc["registries"].get(label)
            doc["registries"][label] = {
                "key_id": key_id(key),
                "public_key": public_pem(key).decode(),
                "pinned": _now(),
                "how": how,
            }
        if old is None or old["key_id"] == key_id(key):
            return None
        return load_public_key(old["public_key"].encode(), str(self.path))

    def unpin(self, registry: Path) -> bool:
        """Forget ``registry``'s pin; return whether there was one."""
        with self._update() as doc:
            return doc["registries"].pop(registry_label(registry), None) is not None

    def pins(self) -> dict[str, dict[str, str]]:
        """Every pin: registry -> {key_id, pinned, how}."""
        return {
            label: {k: v for k, v in entry.items() if k != "public_key"}
            for label, entry in self._read()["registries"].items()
        }

    # -- accepted heads -------------------------------------------------------------
    @staticmethod
    def _head_key(registry: Path, head: SignedHead) -> str:
        return f"{head.key_id}:{head.registry_id or registry_label(registry)}"

    def accepted_head(self, registry: Path, head: SignedHead) -> dict[str, Any] | None:
        """The head last accepted from ``head``'s signer for its registry.

        Found by the registry id the signed head carries (so a copy served from another
        path is compared too), else by path: a legacy head without an id, or the first
        sequenced head of a registry whose legacy head was accepted before, is compared
        with the newest head accepted from this signer at this path.
        """
        heads = self._read()["heads"]
        if head.registry_id and (found := heads.get(self._head_key(registry, head))):
            return found
        label = registry_label(registry)
        same = [
            h
            for k, h in heads.items()
            if k.startswith(f"{head.key_id}:") and h.get("registry") == label
        ]
        if not same:
            return None
        return max(same, key=lambda h: (h.get("seq") is not None, h.get("seq") or 0))

    def accept_head(self, registry: Path, head: SignedHead) -> None:
        """Remember ``head`` as the newest this user accepted for its registry and signer."""
        with self._update() as doc:
            doc["heads"][self._head_key(registry, head)] = {
                "format": head.format,
                "seq": head.seq,
                "sha256": head.sha256,
                "created": head.created,
                "accepted": _now(),
                "registry": registry_label(registry),
                "releases": {f"{n} {v}": sha for (n, v), sha in sorted(head.releases.items())},
            }


def parse_trust(value: str, registry_key: Ed25519PublicKey | None) -> Ed25519PublicKey:
    """``--trust`` VALUE: a PEM public-key file, or the fingerprint of the registry's key.

    A fingerprint (``sha256:`` + 16-64 hex digits of the key id, as ``release verify``
    prints) selects the registry's published key only when it matches; it never makes
    an unknown key trusted.
    """
    path = Path(value).expanduser()
    if path.is_file():
        try:
            return load_public_key(path.read_bytes(), str(path))
        except OSError as exc:
            raise TrustError(f"cannot read public key {str(path)!r}: {exc}") from exc
    match = _FINGERPRINT.fullmatch(value.strip())
    if match is None:
        raise TrustError(
            f"--trust {value!r} is neither a PEM public-key file nor a key fingerprint "
            "(16-64 hex digits of the key id, as `fedcommons release verify` prints it)"
        )
    if registry_key is None:
        raise TrustError(
            f"--trust {value!r} is a fingerprint, but the registry publishes no key to match "
            "it against: pass the PEM public key file instead"
        )
    wanted = match.group(1).lower()
    found = key_id(registry_key)
    if not found.startswith(wanted):
        raise TrustError(
            f"the registry's key has fingerprint {found}, not the {wanted} you trust: its "
            "releases were not signed by the signer you pinned (key replaced?)"
        )
    return registry_key


def resolve_trust(
    registry_root: Path,
    registry_key: Ed25519PublicKey | None,
    *,
    trust: str | None = None,
    first_use: bool = False,
    store: TrustStore | None = None,
) -> TrustDecision:
    """Decide which key verifies ``registry_root``: pinned, remembered, first use, or found.

    ``registry_key`` is the key the registry publishes (``None`` if it publishes none).
    ``trust`` (``--trust``) wins and is remembered for the registry; else the trust file's
    pin; else, with ``first_use``, the registry's key is pinned now; else the registry's
    key is used unpinned, and the decision's note says so.
    """
    store = store or TrustStore()
    if trust:
        key = parse_trust(trust, registry_key)
        replaced = store.pin(registry_root, key, how="--trust")
        note = f"signer pinned with --trust (fingerprint {key_id(key)}); remembered in {store.path}"
        if replaced is not None:
            note += f" (it replaces the earlier pin {key_id(replaced)[:16]}…)"
        return TrustDecision(key, key_id(key), TrustSource.pinned, note)
    pinned = store.pinned_key(registry_root)
    if pinned is not None:
        note = f"signer pinned in {store.path} (fingerprint {key_id(pinned)})"
        return TrustDecision(pinned, key_id(pinned), TrustSource.trust_file, note)
    if registry_key is None:
        raise SigningKeyError(
            f"registry {str(registry_root)!r} publishes no public key and no signer is pinned "
            "for it: pass --trust KEY.pem"
        )
    kid = key_id(registry_key)
    if first_use:
        store.pin(registry_root, registry_key, how="first use")
        note = (
            f"trusted on first use: the registry's key (fingerprint {kid}) is now pinned in "
            f"{store.path}; check the fingerprint with the publisher out of band"
        )
        return TrustDecision(registry_key, kid, TrustSource.first_use, note)
    note = (
        f"UNPINNED: trusted the key found in the registry itself (fingerprint {kid}); "
        "whoever can write the registry can replace it. Pin the signer: --trust " + kid
    )
    return TrustDecision(registry_key, kid, TrustSource.registry, note)


def check_head_progress(head: SignedHead, accepted: dict[str, Any] | None) -> list[str]:
    """Compare ``head`` with the head last accepted; return notes, raise on a rollback.

    Raises :class:`~fedcommons.errors.RollbackError` for an older sequence number, a
    different head with the accepted number, a next head that does not chain to the
    accepted one, a format-1 head after a sequenced one, or any release the accepted
    head attested that this one drops or attests with another manifest hash.
    """
    notes: list[str] = []
    if accepted is None:
        if head.sequenced:
            notes.append(f"first HEAD seen from this signer: seq {head.seq} remembered")
        else:
            notes.append(
                "legacy HEAD.json (format 1, no sequence number) accepted once; rollback "
                "protection starts when the registry next publishes or runs "
                "`fedcommons release sign-legacy`"
            )
        return notes
    when = accepted.get("accepted", "?")
    old_seq = accepted.get("seq")
    if old_seq is not None:
        if not head.sequenced:
            raise RollbackError(
                f"rollback: HEAD.json is an unsequenced format-1 head, but head seq {old_seq} "
                f"was accepted on {when}"
            )
        assert head.seq is not None
        if head.seq < old_seq:
            raise RollbackError(
                f"rollback: HEAD.json has seq {head.seq}, older than seq {old_seq} accepted on "
                f"{when}: newer releases are being hidden"
            )
        if head.seq == old_seq and head.sha256 != accepted["sha256"]:
            raise RollbackError(
                f"HEAD.json seq {head.seq} differs from the seq {old_seq} head accepted on "
                f"{when}: two different histories signed under one number"
            )
        if head.seq == old_seq + 1 and head.prev_sha256 != accepted["sha256"]:
            raise RollbackError(
                f"HEAD.json seq {head.seq} does not chain to the seq {old_seq} head accepted "
                f"on {when} (prev_head_sha256 {str(head.prev_sha256)[:16]}…)"
            )
    attested = {f"{n} {v}": sha for (n, v), sha in head.releases.items()}
    for release, sha in accepted.get("releases", {}).items():
        if release not in attested:
            raise RollbackError(
                f"rollback: {release} was attested by the head accepted on {when} but is "
                "missing from HEAD.json"
            )
        if attested[release] != sha:
            raise RollbackError(
                f"{release}: HEAD.json attests manifest {attested[release][:16]}…, the head "
                f"accepted on {when} attested {sha[:16]}… (replaced)"
            )
    if head.sequenced and old_seq is None:
        notes.append(f"HEAD.json upgraded to a sequenced head (seq {head.seq})")
    elif head.sequenced and head.seq != old_seq:
        notes.append(f"HEAD.json advanced from seq {old_seq} to {head.seq}")
    elif not head.sequenced:
        notes.append("legacy HEAD.json (format 1) unchanged since last accepted")
    return notes


__all__ = [
    "TrustDecision",
    "TrustSource",
    "TrustStore",
    "check_head_progress",
    "parse_trust",
    "resolve_trust",
]
