"""Cryptographic primitives of secure aggregation, all on the ``cryptography`` package.

- key agreement: X25519, the shared secret stretched by HKDF-SHA256 into a 256-bit key
  bound to a context string (protocol version, purpose, run, round, the two parties);
- masks: the AES-256-CTR keystream of the full 256-bit key, read as little-endian
  64-bit words and reduced mod 2^b (2^b divides 2^64, so every residue is equally
  likely). Each key expands exactly one keystream (keys are fresh per round and purpose),
  so the all-zero counter block is never reused under one key;
- share encryption: ChaCha20-Poly1305 with a random 96-bit nonce and associated data
  that binds the ciphertext to its run, round, sender, receiver and protocol stage, so a
  tampered, redirected or replayed ciphertext fails authentication.
"""

from __future__ import annotations

import os
import struct

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedcommons.errors import SecAggProtocolError

PROTOCOL = b"fedcommons-secagg/1"
KEY_BYTES = 32
NONCE_BYTES = 12
#: Masks are expanded in chunks of this many 64-bit words (bounded temporaries).
MASK_CHUNK_WORDS = 1 << 17

_RAW = serialization.Encoding.Raw
_RAW_PUB = serialization.PublicFormat.Raw
_RAW_PRIV = serialization.PrivateFormat.Raw
_NO_ENC = serialization.NoEncryption()


def new_private_key() -> bytes:
    """A fresh X25519 private key (32 raw bytes) from the OS's CSPRNG."""
    return X25519PrivateKey.generate().private_bytes(_RAW, _RAW_PRIV, _NO_ENC)


def public_key(private: bytes) -> bytes:
    """The raw 32-byte X25519 public key of ``private``."""
    return _private(private).public_key().public_bytes(_RAW, _RAW_PUB)


def _private(private: bytes) -> X25519PrivateKey:
    if len(private) != KEY_BYTES:
        raise SecAggProtocolError(f"X25519 private key must be 32 bytes, got {len(private)}")
    return X25519PrivateKey.from_private_bytes(private)


def context_info(purpose: str, run_tag: str, round_no: int, a: int, b: int) -> bytes:
    """HKDF ``info``: protocol, purpose, run, round and the unordered pair of parties."""
    lo, hi = min(a, b), max(a, b)
    tag = run_tag.encode()
    return (
        PROTOCOL
        + b"|"
        + purpose.encode()
        + b"|"
        + struct.pack("<H", len(tag))
        + tag
        + struct.pack("<QII", round_no, lo, hi)
    )


def agree(private: bytes, peer_public: bytes, info: bytes) -> bytes:
    """X25519(private, peer_public) stretched by HKDF-SHA256 into a 256-bit key for ``info``.

    Raises :class:`SecAggProtocolError` for a malformed or low-order peer key (an
    all-zero shared secret).
    """
    if len(peer_public) != KEY_BYTES:
        raise SecAggProtocolError(f"X25519 public key must be 32 bytes, got {len(peer_public)}")
    try:
        shared = _private(private).exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as exc:  # cryptography refuses low-order points (all-zero secret)
        raise SecAggProtocolError(f"invalid X25519 public key: {exc}") from exc
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(shared)


def expand_mask(key: bytes, length: int, bits: int) -> np.ndarray:
    """``length`` uniform elements of Z_{2^bits} (uint64) from the AES-256-CTR keystream."""
    if len(key) != KEY_BYTES:
        raise SecAggProtocolError(f"mask key must be 32 bytes, got {len(key)}")
    if not 1 <= bits <= 64:
        raise SecAggProtocolError(f"ring bits must be in [1, 64], got {bits}")
    encryptor = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    out = np.empty(length, dtype=np.uint64)
    zeros = bytes(8 * min(length, MASK_CHUNK_WORDS))
    for start in range(0, length, MASK_CHUNK_WORDS):
        stop = min(start + MASK_CHUNK_WORDS, length)
        stream = encryptor.update(zeros[: 8 * (stop - start)])
        out[start:stop] = np.frombuffer(stream, dtype="<u8")
    if bits < 64:
        out &= np.uint64((1 << bits) - 1)
    return out


def share_ad(run_tag: str, round_no: int, sender: int, receiver: int, stage: str) -> bytes:
    """Associated data of one share ciphertext: run, round, sender, receiver, stage."""
    tag = run_tag.encode()
    return (
        PROTOCOL
        + b"|share|"
        + stage.encode()
        + b"|"
        + struct.pack("<H", len(tag))
        + tag
        + struct.pack("<QII", round_no, sender, receiver)
    )


def seal(key: bytes, plaintext: bytes, ad: bytes) -> bytes:
    """ChaCha20-Poly1305 encryption: random nonce ‖ ciphertext ‖ tag."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, ad)


def open_sealed(key: bytes, blob: bytes, ad: bytes) -> bytes:
    """Decrypt :func:`seal`'s output; :class:`SecAggProtocolError` if it fails to authenticate."""
    if len(blob) < NONCE_BYTES + 16:
        raise SecAggProtocolError("share ciphertext is too short")
    try:
        return ChaCha20Poly1305(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], ad)
    except InvalidTag:
        raise SecAggProtocolError(
            "share ciphertext failed authentication (tampered, or replayed from another "
            "round, sender or receiver)"
        ) from None
