"""Shamir t-of-n secret sharing of 256-bit secrets over the prime field GF(2^256 + 297).

2^256 + 297 is the smallest prime above 2^256, so any 32-byte secret is a field element
and a share's value fits in 33 bytes. Coefficients come from :func:`secrets.randbelow`.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Sequence
from functools import lru_cache

from fedcommons.errors import SecAggProtocolError

PRIME = (1 << 256) + 297
SHARE_BYTES = 33


def split(secret: bytes, threshold: int, xs: Sequence[int]) -> dict[int, bytes]:
    """Shares of the 32-byte ``secret`` at the points ``xs`` (distinct, 1 ≤ x < p).

    Any ``threshold`` of them reconstruct it; fewer reveal nothing about it.
    """
    if len(secret) != 32:
        raise SecAggProtocolError(f"secret must be 32 bytes, got {len(secret)}")
    if not 1 <= threshold <= len(xs):
        raise SecAggProtocolError(f"threshold {threshold} outside 1..{len(xs)} shares")
    if len(set(xs)) != len(xs) or any(not 0 < x < PRIME for x in xs):
        raise SecAggProtocolError("share points must be distinct and nonzero")
    coeffs = [int.from_bytes(secret, "big")] + [
        secrets.randbelow(PRIME) for _ in range(threshold - 1)
    ]
    out: dict[int, bytes] = {}
    for x in xs:
        acc = 0
        for c in reversed(coeffs):  # Horner
            acc = (acc * x + c) % PRIME
        out[x] = acc.to_bytes(SHARE_BYTES, "big")
    return out


def reconstruct(shares: Iterable[tuple[int, bytes]], threshold: int) -> bytes:
    """The secret from at least ``threshold`` shares ``(x, value)`` (Lagrange at 0).

    Raises :class:`SecAggProtocolError` when fewer than ``threshold`` distinct shares are
    given or a share is malformed.
    """
    points: dict[int, int] = {}
    for x, value in shares:
        if len(value) != SHARE_BYTES:
            raise SecAggProtocolError(f"share must be {SHARE_BYTES} bytes, got {len(value)}")
        y = int.from_bytes(value, "big")
        if y >= PRIME or not 0 < x < PRIME:
            raise SecAggProtocolError("share outside the field")
        points[int(x)] = y
    if len(points) < threshold:
        raise SecAggProtocolError(f"{len(points)} share(s), {threshold} needed")
    chosen = sorted(points.items())[:threshold]
    coeffs = lagrange_at_zero(tuple(x for x, _ in chosen))
    secret = sum(y * c for (_, y), c in zip(chosen, coeffs, strict=True)) % PRIME
    if secret >> 256:
        raise SecAggProtocolError("inconsistent shares: the reconstruction is not 256 bits")
    return secret.to_bytes(32, "big")


@lru_cache(maxsize=4096)
def lagrange_at_zero(xs: tuple[int, ...]) -> tuple[int, ...]:
    """Lagrange basis coefficients at 0 for the points ``xs``.

    Cached: within a round, many secrets are reconstructed from the same survivors.
    """
    out = []
    for i, xi in enumerate(xs):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if i != j:
                num = num * (-xj) % PRIME
                den = den * (xi - xj) % PRIME
        out.append(num * pow(den, -1, PRIME) % PRIME)
    return tuple(out)
