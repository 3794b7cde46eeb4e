"""``HEAD.json``: the registry's signed statement of what it published, in sequence.

The attestation (format ``fedcommons-head/2``) lists every release with its manifest
SHA-256 and the line aliases (``@stable`` -> version), and chains to the head it
replaces::

    {"format": "fedcommons-head/2", "registry_id": "<uuid>", "seq": 7,
     "prev_head_sha256": "<sha256 of head 6's attestation>", "created": "...",
     "releases": [{"name": ..., "version": ..., "manifest_sha256": ...}, ...],
     "aliases": {"<line>": {"stable": "1.2.0", "candidate": "1.3.0"}}}

The signature covers the attestation's canonical JSON (:func:`head_body`). Readers take
aliases from here, never from the index, and remember the last head they accepted per
registry and signer (:mod:`fedcommons.releases.trust`): an older head (a rollback that
hides the newest releases) or a second head with the same number fails verification.

Format 1 heads (before this module) carry neither a sequence number nor aliases; they
are read for migration, and the next head written continues from them.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedcommons.errors import SignatureError, VerificationError
from fedcommons.releases.signing import Signer, verify_signature

HEAD_FORMAT_V1 = "fedcommons-head/1"
HEAD_FORMAT = "fedcommons-head/2"


def head_body(attestation: Mapping[str, Any]) -> bytes:
    """The exact bytes ``HEAD.json``'s signature covers (compact canonical JSON)."""
    return json.dumps(attestation, sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True)
class SignedHead:
    """A ``HEAD.json`` whose signature checked out against one public key."""

    format: str
    sha256: str  #: SHA-256 of the signed attestation (what the next head chains to)
    key_id: str
    created: str
    #: (name, version) -> manifest SHA-256
    releases: dict[tuple[str, str], str] = field(default_factory=dict)
    #: line -> alias -> version (empty for format 1)
    aliases: dict[str, dict[str, str]] = field(default_factory=dict)
    seq: int | None = None  #: None for format 1
    prev_sha256: str | None = None
    registry_id: str | None = None

    @property
    def sequenced(self) -> bool:
        """Whether this head carries a sequence number (format 2)."""
        return self.seq is not None


def build_attestation(
    previous: SignedHead | None,
    releases: Iterable[tuple[str, str, str]],
    aliases: Iterable[tuple[str, str, str]],
) -> dict[str, Any]:
    """The head after ``previous``: releases (name, version, manifest sha), aliases."""
    alias_map: dict[str, dict[str, str]] = {}
    for line, alias, version in aliases:
        alias_map.setdefault(line, {})[alias] = version
    seq = 1
    registry_id = uuid.uuid4().hex
    prev_sha = None
    if previous is not None:
        seq = (previous.seq or 0) + 1
        registry_id = previous.registry_id or registry_id
        prev_sha = previous.sha256
    return {
        "format": HEAD_FORMAT,
        "registry_id": registry_id,
        "seq": seq,
        "prev_head_sha256": prev_sha,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "releases": [{"name": n, "version": v, "manifest_sha256": sha} for n, v, sha in releases],
        "aliases": alias_map,
    }


def sign_head(signer: Signer, attestation: Mapping[str, Any]) -> bytes:
    """``HEAD.json``'s bytes: the attestation and its signature."""
    doc = {"attestation": attestation, "signature": signer.sign(head_body(attestation))}
    return (json.dumps(doc, indent=1) + "\n").encode()


def parse_head(raw: bytes, public_key: Ed25519PublicKey, *, where: str) -> SignedHead:
    """Check ``HEAD.json`` bytes against ``public_key``; return what it attests.

    Raises :class:`SignatureError` (another key, bad signature) or
    :class:`VerificationError` (malformed) naming ``where``.
    """
    try:
        doc = json.loads(raw)
        attestation, signature = doc["attestation"], doc["signature"]
        fmt = attestation.get("format")
        if fmt not in (HEAD_FORMAT, HEAD_FORMAT_V1):
            raise ValueError(f"format {fmt!r}")
        entries = attestation["releases"]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise VerificationError(f"{where} is malformed ({exc})", where) from None
    body = head_body(attestation)
    try:
        kid = verify_signature(public_key, body, json.dumps(signature).encode(), where=where)
    except SignatureError as exc:
        raise SignatureError(str(exc), where) from None
    try:
        releases = {(str(e["name"]), str(e["version"])): str(e["manifest_sha256"]) for e in entries}
        aliases: dict[str, dict[str, str]] = {}
        seq = prev = registry_id = None
        if fmt == HEAD_FORMAT:
            seq = int(attestation["seq"])
            prev = attestation["prev_head_sha256"]
            registry_id = str(attestation["registry_id"])
            aliases = {
                str(line): {str(a): str(v) for a, v in names.items()}
                for line, names in attestation["aliases"].items()
            }
            if seq < 1 or (prev is not None and not isinstance(prev, str)):
                raise ValueError(f"seq {seq!r} / prev_head_sha256 {prev!r}")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise VerificationError(f"{where} is malformed ({exc})", where) from None
    return SignedHead(
        format=fmt,
        sha256=hashlib.sha256(body).hexdigest(),
        key_id=kid,
        created=str(attestation.get("created", "")),
        releases=releases,
        aliases=aliases,
        seq=seq,
        prev_sha256=prev,
        registry_id=registry_id,
    )


def read_head(path: Path, public_key: Ed25519PublicKey) -> SignedHead | None:
    """:func:`parse_head` of the file at ``path``; ``None`` when there is none."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    return parse_head(raw, public_key, where=str(path))
