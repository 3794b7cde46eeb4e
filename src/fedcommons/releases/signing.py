"""Ed25519 signatures of release manifests (``cryptography``).

The coordinator holds one Ed25519 private key (PEM, PKCS#8, file mode 0600). Every
manifest is signed over its exact bytes; the signature lives next to the manifest as
``manifest.sig`` (JSON: algorithm, key id, manifest SHA-256, base64 signature). The
public half is published with the registry (``keys/ed25519.pub``); a user who obtained
it out of band pins it with ``fedcommons release verify --public-key``.

The key id is the SHA-256 of the raw 32-byte public key, hex-encoded.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedcommons.errors import SignatureError, SigningKeyError

ALGORITHM = "ed25519"


def key_id(public_key: Ed25519PublicKey) -> str:
    """SHA-256 (hex) of the raw public key bytes."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def public_pem(public_key: Ed25519PublicKey) -> bytes:
    """The public key as PEM (SubjectPublicKeyInfo)."""
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_public_key(data: bytes, source: str = "public key") -> Ed25519PublicKey:
    """Parse a PEM public key; raise :class:`SigningKeyError` unless it is Ed25519."""
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise SigningKeyError(f"{source} is not a PEM public key: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise SigningKeyError(f"{source} is not an Ed25519 key ({type(key).__name__})")
    return key


@dataclass(frozen=True)
class Signer:
    """The coordinator's signing key."""

    private_key: Ed25519PrivateKey
    path: Path | None = None

    @property
    def public_key(self) -> Ed25519PublicKey:
        """The public half."""
        return self.private_key.public_key()

    @property
    def key_id(self) -> str:
        """SHA-256 of the raw public key."""
        return key_id(self.public_key)

    def sign(self, data: bytes) -> dict[str, str]:
        """The signature document of ``data`` (what ``manifest.sig`` holds)."""
        return {
            "algorithm": ALGORITHM,
            "key_id": self.key_id,
            "sha256": hashlib.sha256(data).hexdigest(),
            "signature": base64.b64encode(self.private_key.sign(data)).decode(),
        }

    @classmethod
    def generate(cls) -> Signer:
        """A fresh key held in memory only."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load(cls, path: Path | str) -> Signer:
        """Load a PEM (PKCS#8, unencrypted) Ed25519 private key."""
        path = Path(path).expanduser()
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise SigningKeyError(f"cannot read signing key {str(path)!r}: {exc}") from exc
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise SigningKeyError(f"{str(path)!r} is not a PEM private key: {exc}") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise SigningKeyError(f"{str(path)!r} is not an Ed25519 key ({type(key).__name__})")
        return cls(key, path)

    @classmethod
    def load_or_create(cls, path: Path | str) -> Signer:
        """Load the key at ``path``, creating it (mode 0600) if the file does not exist."""
        path = Path(path).expanduser()
        if path.exists():
            return cls.load(path)
        signer = cls.generate()
        pem = signer.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process created it first: use theirs
            return cls.load(path)
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
            fh.flush()
            os.fsync(fh.fileno())
        return cls(signer.private_key, path)


def verify_signature(
    public_key: Ed25519PublicKey, data: bytes, signature_doc: bytes, *, where: str
) -> str:
    """Check ``signature_doc`` (``manifest.sig`` bytes) over ``data``; return the key id.

    Raises :class:`SignatureError` naming ``where`` when the document is malformed, was
    made by another key, or does not match ``data``.
    """
    try:
        doc = json.loads(signature_doc)
        algorithm, kid, sig = doc["algorithm"], doc["key_id"], doc["signature"]
        raw_sig = base64.b64decode(sig, validate=True)
    except (ValueError, KeyError, TypeError) as exc:
        raise SignatureError(f"{where}: malformed signature file ({exc})") from exc
    if algorithm != ALGORITHM:
        raise SignatureError(f"{where}: unsupported algorithm {algorithm!r}")
    expected = key_id(public_key)
    if kid != expected:
        raise SignatureError(f"{where}: signed by key {kid[:16]}…, expected {expected[:16]}…")
    try:
        public_key.verify(raw_sig, data)
    except InvalidSignature as exc:
        raise SignatureError(f"{where}: signature does not match the manifest") from exc
    return kid
