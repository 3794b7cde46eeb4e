"""Cryptographic primitives of secure aggregation, all on the ``cryptography`` package.

- key agreement: X25519, the shared secret stretched by HKDF-SHA256 into a 256-bit key
  bound to a context string (protocol version, purpose, run, round, the two parties);
- masks: the AES-256-CTR keystream of the full 256-bit key, read as little-endian
  64-bit words and reduced mod 2^b (2^b divides 2^64, so every residue is equally
  likely). The first counter block is ``0^96 ‖ 0x00000002`` and the low 32 bits count up
  (the keystream AES-256-GCM encrypts with under the all-zero nonce: OpenSSL's GCM path
  is the fastest AES-CTR it has, twice its CTR mode on VAES hardware; the tag is never
  used). Each key expands exactly one keystream (keys are fresh per round and purpose),
  so no counter block is reused under one key. :func:`add_mask` adds the keystream into
  an accumulator chunk by chunk, with no full-size temporary;
- share encryption: ChaCha20-Poly1305 with a random 96-bit nonce and associated data
  that binds the ciphertext to its run, round, sender, receiver and protocol stage, so a
  tampered, redirected or replayed ciphertext fails authentication.
"""

from __future__ import annotations

import os
import struct
import threading

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedcommons.errors import SecAggProtocolError

#: Version 2: the mask PRG starts at GCM's first counter block (version 1 used the
#: all-zero block); parties of different versions refuse each other's rounds.
PROTOCOL = b"fedcommons-secagg/2"
KEY_BYTES = 32
NONCE_BYTES = 12
#: Masks are expanded in chunks of this many 64-bit words (256 KiB: the keystream is
#: still in L2 when it is added; larger chunks measured slower, smaller ones pay calls).
MASK_CHUNK_WORDS = 1 << 15
#: Nonce of the mask PRG: the keystream starts at counter block ``0^96 ‖ 0x00000002``.
PRG_NONCE = bytes(12)
#: First counter block of the mask PRG, as AES-CTR sees it (for independent checks).
PRG_FIRST_BLOCK = PRG_NONCE + (2).to_bytes(4, "big")
#: Longest mask: the 32-bit block counter runs from 2 to 2^32 − 1 (16 bytes, 2 words each).
MAX_MASK_WORDS = 2 * ((1 << 32) - 2)
_ZEROS = bytes(8 * MASK_CHUNK_WORDS)
#: One keystream buffer per thread, reused by every :func:`add_mask` call (a fresh
#: 256 KiB buffer costs page faults each time).
_SCRATCH = threading.local()

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


def agree(private: bytes | X25519PrivateKey, peer_public: bytes, info: bytes) -> bytes:
    """X25519(private, peer_public) stretched by HKDF-SHA256 into a 256-bit key for ``info``.

    ``private`` is the raw key or a loaded :func:`private_key` (cheaper when one key
    agrees with many peers). Raises :class:`SecAggProtocolError` for a malformed or
    low-order peer key (an all-zero shared secret).
    """
    if len(peer_public) != KEY_BYTES:
        raise SecAggProtocolError(f"X25519 public key must be 32 bytes, got {len(peer_public)}")
    sk = private if isinstance(private, X25519PrivateKey) else _private(private)
    try:
        shared = sk.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as exc:  # cryptography refuses low-order points (all-zero secret)
        raise SecAggProtocolError(f"invalid X25519 public key: {exc}") from exc
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(shared)


def private_key(private: bytes) -> X25519PrivateKey:
    """The raw 32-byte X25519 ``private`` key loaded once, for many :func:`agree` calls."""
    return _private(private)


def add_mask(acc: np.ndarray, key: bytes, sign: int = 1) -> None:
    """``acc ← acc + sign · PRG(key)`` mod 2^64, in place (``acc``: contiguous uint64).

    The keystream is written chunk by chunk into one reused buffer
    (``CipherContext.update_into``) and added from there: no mask-sized temporary, no copy.
    Reducing mod 2^b afterwards gives the sum mod 2^b (2^b divides 2^64), so callers
    reduce once, after the last mask.
    """
    if len(key) != KEY_BYTES:
        raise SecAggProtocolError(f"mask key must be 32 bytes, got {len(key)}")
    if acc.dtype != np.uint64 or acc.ndim != 1 or not acc.flags.c_contiguous:
        raise SecAggProtocolError("masks are added into a contiguous 1-D uint64 vector")
    if acc.size > MAX_MASK_WORDS:
        raise SecAggProtocolError(f"a mask is at most {MAX_MASK_WORDS} elements, got {acc.size}")
    if sign not in (1, -1):
        raise SecAggProtocolError(f"mask sign must be +1 or -1, got {sign}")
    if acc.size == 0:
        return
    stream = Cipher(algorithms.AES(key), modes.GCM(PRG_NONCE)).encryptor()
    chunk = MASK_CHUNK_WORDS
    scratch = getattr(_SCRATCH, "buf", None)
    if scratch is None:  # GCM's update_into wants 15 spare bytes after the output
        scratch = _SCRATCH.buf = np.empty(8 * chunk + 16, dtype=np.uint8)
    words = scratch[: 8 * chunk].view("<u8")
    zeros = memoryview(_ZEROS)
    op = np.add if sign > 0 else np.subtract
    for start in range(0, acc.size, chunk):
        m = min(chunk, acc.size - start)
        if stream.update_into(zeros[: 8 * m], scratch) != 8 * m:
            raise SecAggProtocolError("AES keystream came back short")
        part = acc[start : start + m]
        op(part, words[:m], out=part)


def expand_mask(key: bytes, length: int, bits: int) -> np.ndarray:
    """``length`` uniform elements of Z_{2^bits} (uint64): the PRG of :func:`add_mask`."""
    if not 1 <= bits <= 64:
        raise SecAggProtocolError(f"ring bits must be in [1, 64], got {bits}")
    out = np.zeros(length, dtype=np.uint64)
    add_mask(out, key)
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
