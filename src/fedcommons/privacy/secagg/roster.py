"""Authenticated key advertisements: a consortium roster of the institutions' Ed25519 keys.

Without it, SecAgg+ trusts the coordinator to relay public keys faithfully: a coordinator
that hands a client its own key in place of a neighbour's learns that client's shares
and pairwise masks and can unmask its update. With a roster, every institution holds the
same list of member keys (obtained out of band, like a CA certificate), signs the two
X25519 keys it advertises in each round, and checks every neighbour's signature before
it derives a pairwise key or encrypts a share. A substituted, altered or replayed key
fails verification and the honest client refuses the round (``secagg-refused``).

Roster file (JSON; every institution of the consortium holds the same one)::

    {
      "format": "fedcommons-secagg-roster/1",
      "consortium": "example-health",
      "members": {"hospital-a": "<64 hex digits: raw Ed25519 public key>", ...},
      "signature": "<128 hex digits>"        # optional
    }

``signature``, when present, is an Ed25519 signature by the consortium's key over the
canonical JSON (sorted keys, no spaces) of the other three fields; a site that pins that
key (node config ``secagg-roster-signer``) refuses a roster that does not verify.

What one institution signs per round (:func:`advertisement_message`): the protocol
version, a SHA-256 digest of the round's public parameters (run tag, round, participant
count, graph seed, threshold, ring, length), its participant index, its member name and
its two public keys. So a signature is good for one round, one seat and one pair of
keys; and since every verifier hashes *its own* copy of the parameters, a coordinator
that shows different parameters to different clients is caught too.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from fedcommons.errors import SecAggProtocolError, SecAggRosterError
from fedcommons.privacy.secagg.primitives import PROTOCOL

ROSTER_FORMAT = "fedcommons-secagg-roster/1"
SIGNATURE_BYTES = 64
#: Member names: what an institution is called in the roster (and in refusals).
MEMBER_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_RAW = serialization.Encoding.Raw
_RAW_PUB = serialization.PublicFormat.Raw


def _canonical(doc: Mapping[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def public_hex(key: Ed25519PublicKey) -> str:
    """The raw 32-byte public key as 64 hex digits (the roster's notation)."""
    return key.public_bytes(_RAW, _RAW_PUB).hex()


def _public_from_hex(text: Any, what: str) -> Ed25519PublicKey:
    try:
        raw = bytes.fromhex(str(text))
        if len(raw) != 32:
            raise ValueError(f"{len(raw)} bytes")
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError as exc:
        raise SecAggRosterError(f"{what}: not a 64-hex-digit Ed25519 public key ({exc})") from None


def check_member(name: Any) -> str:
    """A member name, or :class:`SecAggRosterError`."""
    if not isinstance(name, str) or not MEMBER_PATTERN.fullmatch(name):
        raise SecAggRosterError(
            f"member name {name!r} must be 1-64 characters of letters, digits, '.', '_', '-'"
        )
    return name


@dataclass(frozen=True)
class Roster:
    """The consortium's member keys, as one institution holds them."""

    consortium: str
    members: Mapping[str, Ed25519PublicKey]

    @classmethod
    def from_document(cls, doc: Any, signer: str | None = None, source: str = "roster") -> Roster:
        """Parse (and with ``signer``, authenticate) a roster document.

        ``signer`` is the consortium's public key as 64 hex digits: the roster's
        ``signature`` must verify under it. Raises :class:`SecAggRosterError`.
        """
        if not isinstance(doc, dict) or doc.get("format") != ROSTER_FORMAT:
            raise SecAggRosterError(f"{source}: not a {ROSTER_FORMAT} document")
        members = doc.get("members")
        consortium = doc.get("consortium", "")
        if not isinstance(members, dict) or not members or not isinstance(consortium, str):
            raise SecAggRosterError(f"{source}: needs a consortium name and at least one member")
        keys = {
            check_member(name): _public_from_hex(key, f"{source}: member {name!r}")
            for name, key in members.items()
        }
        raw = [k.public_bytes(_RAW, _RAW_PUB) for k in keys.values()]
        if len(set(raw)) != len(raw):
            raise SecAggRosterError(f"{source}: two members share one key")
        if signer is not None:
            pinned = _public_from_hex(signer, "secagg-roster-signer")
            sig = doc.get("signature")
            body = {k: doc[k] for k in ("format", "consortium", "members")}
            try:
                pinned.verify(bytes.fromhex(str(sig)), _canonical(body))
            except (InvalidSignature, ValueError):
                raise SecAggRosterError(
                    f"{source}: its signature does not verify under the pinned consortium key "
                    f"{signer[:16]}…: the roster was altered or signed by someone else"
                ) from None
        return cls(consortium=consortium, members=keys)

    @classmethod
    def load(cls, path: str | Path, signer: str | None = None) -> Roster:
        """Read a roster file (see the module docstring)."""
        p = Path(path).expanduser()
        try:
            doc = json.loads(p.read_text())
        except (OSError, ValueError) as exc:
            raise SecAggRosterError(f"cannot read the SecAgg+ roster {p}: {exc}") from None
        return cls.from_document(doc, signer, source=str(p))

    def member_of(self, key: Ed25519PublicKey) -> str:
        """The member whose roster key is ``key``; :class:`SecAggRosterError` if none."""
        want = key.public_bytes(_RAW, _RAW_PUB)
        for name, k in self.members.items():
            if k.public_bytes(_RAW, _RAW_PUB) == want:
                return name
        raise SecAggRosterError(
            f"the institution's signing key {want.hex()[:16]}… is not in the roster of "
            f"{self.consortium!r}"
        )

    def verify(
        self, params_digest: bytes, index: int, member: str, c_pk: bytes, s_pk: bytes, sig: bytes
    ) -> None:
        """Check one advertisement; :class:`SecAggProtocolError` naming what is wrong."""
        key = self.members.get(member) if isinstance(member, str) else None
        if key is None:
            raise SecAggProtocolError(
                f"participant {index} advertises keys as {member!r}, which is not a member of "
                f"{self.consortium!r}: refusing the round"
            )
        try:
            key.verify(sig, advertisement_message(params_digest, index, member, c_pk, s_pk))
        except InvalidSignature:
            raise SecAggProtocolError(
                f"participant {index}'s key advertisement does not verify under {member!r}'s "
                "roster key: the coordinator substituted or altered its keys (or relayed them "
                "from another round or seat); refusing the round"
            ) from None


def advertisement_message(
    params_digest: bytes, index: int, member: str, c_pk: bytes, s_pk: bytes
) -> bytes:
    """The bytes an institution signs for one round's key advertisement."""
    name = member.encode()
    return (
        PROTOCOL
        + b"|advertise|"
        + params_digest
        + struct.pack("<IH", index, len(name))
        + name
        + c_pk
        + s_pk
    )


class AdvertisementSigner:
    """One institution's signing key and its name in the roster."""

    def __init__(self, key: Ed25519PrivateKey, member: str) -> None:
        self._key = key
        self.member = check_member(member)

    @classmethod
    def load(cls, path: str | Path, roster: Roster) -> AdvertisementSigner:
        """Load an Ed25519 private key (PEM, PKCS#8, unencrypted) that the roster lists."""
        key = load_private_key(path, "the SecAgg+ signing key")
        return cls(key, roster.member_of(key.public_key()))

    def sign(self, params_digest: bytes, index: int, c_pk: bytes, s_pk: bytes) -> bytes:
        """Sign this round's advertisement."""
        return self._key.sign(advertisement_message(params_digest, index, self.member, c_pk, s_pk))


def load_private_key(path: str | Path, what: str) -> Ed25519PrivateKey:
    """An Ed25519 private key from a PEM (PKCS#8, unencrypted) file; else SecAggRosterError."""
    p = Path(path).expanduser()
    try:
        key = serialization.load_pem_private_key(p.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise SecAggRosterError(f"cannot read {what} {p}: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SecAggRosterError(f"{p}: {what} must be Ed25519")
    return key


def new_signing_key(path: str | Path) -> str:
    """Write a fresh Ed25519 private key (PEM, mode 0600) to ``path``; return its public hex.

    Refuses to overwrite an existing file.
    """
    p = Path(path).expanduser()
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    try:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise SecAggRosterError(f"{p} exists: refusing to overwrite a signing key") from None
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    return public_hex(key.public_key())


def roster_document(
    consortium: str, members: Mapping[str, str], signing_key: str | Path | None = None
) -> dict[str, Any]:
    """A roster document for ``members`` (name -> public hex), signed if a key is given.

    The result passes :meth:`Roster.from_document` (with the signer's public key pinned
    when it is signed).
    """
    body = {
        "format": ROSTER_FORMAT,
        "consortium": consortium,
        "members": {check_member(k): str(v) for k, v in sorted(members.items())},
    }
    Roster.from_document(body)  # refuse malformed keys and duplicates now
    if signing_key is None:
        return body
    key = load_private_key(signing_key, "the consortium signing key")
    return {**body, "signature": key.sign(_canonical(body)).hex()}


def params_digest(record: Mapping[str, Any]) -> bytes:
    """SHA-256 of a round's public parameters (:meth:`RoundParams.to_record`)."""
    plain = {k: (v.hex() if isinstance(v, bytes) else v) for k, v in record.items()}
    return hashlib.sha256(_canonical(plain)).digest()


def simulated_consortium(directory: str | Path, institutions: int) -> Path:
    """A consortium for ``institutions`` simulated sites: ``site-<i>.pem`` and ``roster.json``.

    For Flower's simulation engine (``fedcommons demo --secagg-consortium DIR``): keys
    already in ``directory`` are kept, missing ones created; the roster lists them all.
    Returns the roster's path.
    """
    root = Path(directory).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    members = {}
    for i in range(institutions):
        path = root / f"site-{i}.pem"
        if path.exists():
            members[f"site-{i}"] = public_hex(load_private_key(path, "a site key").public_key())
        else:
            members[f"site-{i}"] = new_signing_key(path)
    roster = root / "roster.json"
    roster.write_text(json.dumps(roster_document("simulated", members), indent=2) + "\n")
    return roster
