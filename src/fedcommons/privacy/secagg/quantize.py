"""Fixed-point encoding of updates into the ring Z_{2^b}, and back.

Every participant encodes with the same public parameters (:class:`RingSpec`): values
are clipped to ``[-clip, clip]`` and stochastically rounded (unbiased) to integers
``q ∈ [-levels, levels]``; the integer weight ``w`` (the example count, capped at
``max_weight``, or 1 under central DP) multiplies them, ``y = w·q``, and is appended as
an extra ring element so that the sum reveals ``Σ wᵢ qᵢ`` and ``Σ wᵢ`` only. Negative
numbers are two's complement mod 2^b; ``b`` is chosen so that no sum of ``n``
contributions can wrap around: ``n · max_weight · levels ≤ 2^(b−1) − 1``.

Masked vectors travel bit-packed: ``b`` bits per element, not a whole machine word. The
server sums them without unpacking each one (:class:`PackedSum`).
"""

from __future__ import annotations

import math
import secrets
from dataclasses import asdict, dataclass

import numpy as np

from fedcommons.errors import SecAggProtocolError

#: Input levels per value coding of the compression spec: int8 and int4 keep the codec's
#: resolution; float codings get 24 (fp32) or 16 (fp16, bf16) bits per input.
LEVELS = {
    "fp32": (1 << 23) - 1,
    "fp16": (1 << 15) - 1,
    "bf16": (1 << 15) - 1,
    "int8": 127,
    "int4": 7,
}


def ring_bits(n: int, max_weight: int, levels: int) -> int:
    """Smallest ring size 2^b in which ``n`` contributions ``|w·q| ≤ max_weight·levels`` sum."""
    bound = n * max_weight * max(levels, 1)
    return max(2, bound.bit_length() + 1)


@dataclass(frozen=True)
class RingSpec:
    """Public encoding parameters of one round (sent to every participant)."""

    bits: int
    levels: int
    clip: float
    max_weight: int
    #: Number of auxiliary ring elements after the values (weight, clipped flag).
    aux: int = 1

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 64:
            raise SecAggProtocolError(f"ring bits must be in [2, 64], got {self.bits}")
        if self.levels < 1 or self.max_weight < 1 or self.aux < 1:
            raise SecAggProtocolError("levels, max weight and aux slots must be >= 1")
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise SecAggProtocolError(f"clip range must be a finite number > 0, got {self.clip}")

    @property
    def step(self) -> float:
        """The quantization step: one integer level in update units."""
        return self.clip / self.levels

    @property
    def modulus_mask(self) -> np.uint64:
        """2^b − 1 as uint64."""
        return np.uint64((1 << self.bits) - 1)

    def capacity(self) -> int:
        """How many maximal contributions fit before the sum could wrap around."""
        return ((1 << (self.bits - 1)) - 1) // (self.max_weight * self.levels)

    def to_dict(self) -> dict[str, int | float]:
        """Plain fields (for messages and reports)."""
        return asdict(self)


def quantize(values: np.ndarray, spec: RingSpec, rng: np.random.Generator | None = None):
    """Clip to ±clip and stochastically round to int64 levels in [−levels, levels].

    Returns ``(codes, clipped coordinates)``. ``rng`` defaults to a generator seeded
    from the OS's entropy (the rounding noise hides the low bits of the input).
    """
    rng = rng or np.random.default_rng(secrets.randbits(128))
    x = np.asarray(values, dtype=np.float64)
    if not np.isfinite(x).all():
        raise SecAggProtocolError("update contains NaN or Inf")
    clipped = int(np.count_nonzero(np.abs(x) > spec.clip))
    scaled = np.clip(x, -spec.clip, spec.clip) * (spec.levels / spec.clip)
    codes = np.floor(scaled + rng.random(x.shape))
    np.clip(codes, -spec.levels, spec.levels, out=codes)
    return codes.astype(np.int64), clipped


def to_ring(codes: np.ndarray, weight: int, aux: list[int], spec: RingSpec) -> np.ndarray:
    """``[w·q₁, …, w·q_d, aux…]`` as elements of Z_{2^b} (uint64)."""
    if not 1 <= weight <= spec.max_weight:
        raise SecAggProtocolError(f"weight {weight} outside 1..{spec.max_weight}")
    if len(aux) != spec.aux:
        raise SecAggProtocolError(f"{len(aux)} aux values, the round expects {spec.aux}")
    full = np.empty(codes.size + spec.aux, dtype=np.int64)
    np.multiply(codes, weight, out=full[: codes.size])
    full[codes.size :] = aux
    return full.view(np.uint64) & spec.modulus_mask


def signed(ring: np.ndarray, bits: int) -> np.ndarray:
    """Ring elements as signed int64 (two's complement in ``bits`` bits)."""
    r = np.asarray(ring, dtype=np.uint64)
    if bits == 64:
        return r.view(np.int64)
    half = np.uint64(1 << (bits - 1))
    out = r.astype(np.int64)
    out[r >= half] -= np.int64(1 << bits)
    return out


def dequantize(total: np.ndarray, spec: RingSpec) -> tuple[np.ndarray, np.ndarray]:
    """Split a ring sum into ``(Σ wᵢ Δᵢ as float64, the aux sums as int64)``."""
    s = signed(total, spec.bits)
    values = s[: s.size - spec.aux].astype(np.float64) * spec.step
    return values, s[s.size - spec.aux :]


#: Ring sizes the word-window packer handles: an element and its bit offset in a byte
#: (≤ 7) fit one unaligned 64-bit read, and windows of consecutive elements do not overlap.
_WINDOW_BITS = range(8, 57)


def _windows(buf: np.ndarray, groups: int, bits: int) -> list[tuple[np.ndarray, np.uint64]]:
    """Unaligned 64-bit views of a packed buffer, one per position j of a group of 8.

    View j reads every group's j-th element (the 8 bytes from its first byte, stride
    ``bits`` bytes); it comes with the element's bit shift in its first byte.
    """
    out = []
    for j in range(8):
        off, shift = divmod(j * bits, 8)
        view = np.ndarray((groups,), dtype="<u8", buffer=buf, offset=off, strides=(bits,))
        out.append((view, np.uint64(shift)))
    return out


def _element(data: bytes | bytearray | memoryview, i: int, bits: int) -> int:
    """Element ``i`` of a bit-packed stream (for the few elements after the last group)."""
    first = i * bits
    raw = int.from_bytes(bytes(data[first // 8 : (first + bits + 7) // 8 + 1]), "little")
    return (raw >> (first % 8)) & ((1 << bits) - 1)


def pack(ring: np.ndarray, bits: int) -> bytes:
    """Bit-pack ring elements, ``bits`` each, little-endian bit order.

    Element ``i`` occupies bits ``[i·bits, (i+1)·bits)`` of the stream; 8 elements fill
    exactly ``bits`` bytes. For 8–56-bit rings each of the 8 positions of a group is
    written with one shift and one OR through an unaligned 64-bit window (3 vector
    passes per position); other sizes take :func:`_pack_bytewise`.
    """
    r = np.ascontiguousarray(ring, dtype="<u8").reshape(-1)
    if bits == 64:
        return r.tobytes()
    if bits not in _WINDOW_BITS:
        return _pack_bytewise(r, bits)
    n = r.size
    groups = n // 8
    out = np.zeros((n * bits + 7) // 8 + 16, dtype=np.uint8)  # spare: the last windows
    mask = np.uint64((1 << bits) - 1)
    if groups:
        cols = r[: groups * 8].reshape(groups, 8)
        tmp = np.empty(groups, dtype=np.uint64)
        for j, (window, shift) in enumerate(_windows(out, groups, bits)):
            np.bitwise_and(cols[:, j], mask, out=tmp)
            tmp <<= shift
            np.bitwise_or(window, tmp, out=window)
    for i in range(groups * 8, n):  # the last, incomplete group
        first = i * bits
        value = (int(r[i]) & int(mask)) << (first % 8)
        lo = first // 8
        span = (first % 8 + bits + 7) // 8
        for k, byte in enumerate(value.to_bytes(span, "little")):
            out[lo + k] |= byte
    return out[: (n * bits + 7) // 8].tobytes()


def _pack_bytewise(r: np.ndarray, bits: int) -> bytes:
    """:func:`pack` for any ring size, one byte column at a time (8 × ≤ 9 vector passes)."""
    if bits % 8 == 0:
        return r.view(np.uint8).reshape(-1, 8)[:, : bits // 8].tobytes()
    n = r.size
    groups = -(-n // 8)
    padded = np.zeros(groups * 8, dtype=np.uint64)
    padded[:n] = r
    m = padded.reshape(groups, 8)
    out = np.zeros((groups, bits + 1), dtype=np.uint8)
    byte = np.uint64(0xFF)
    for j in range(8):
        off, shift = divmod(j * bits, 8)
        col = m[:, j]
        low = col << np.uint64(shift)
        span = (bits + shift + 7) // 8
        for k in range(min(span, 8)):
            out[:, off + k] |= ((low >> np.uint64(8 * k)) & byte).astype(np.uint8)
        if span == 9:  # the top bits shifted out of the 64-bit word
            out[:, off + 8] |= (col >> np.uint64(64 - shift)).astype(np.uint8)
    return out[:, :bits].tobytes()[: (n * bits + 7) // 8]


def _check_packed(data: bytes, count: int, bits: int) -> None:
    expected = (count * bits + 7) // 8
    if len(data) != expected:
        raise SecAggProtocolError(
            f"masked vector has {len(data)} bytes, expected {expected} ({count} × {bits} bits)"
        )


class PackedSum:
    """Running sum mod 2^64 of bit-packed vectors of ``count`` ``bits``-bit elements.

    The server folds each masked vector in as it arrives (:meth:`add`) and reads the sum
    once (:meth:`total`). For 8–56-bit rings the sum is kept position-major: row ``j``
    holds elements ``j, j + 8, j + 16, …``, so each of the 8 positions of a packed group
    is one shift of an unaligned 64-bit window on the received bytes and one contiguous
    add, with no unpacked temporary. Only the low ``bits`` bits of each element of
    :meth:`total` are meaningful (no masking per add: bits above cannot carry down):
    reduce it mod 2^bits.
    """

    def __init__(self, count: int, bits: int) -> None:
        if count < 0 or not 2 <= bits <= 64:
            raise SecAggProtocolError(f"a packed sum needs count >= 0 and 2..64 bits, got {bits}")
        self.count, self.bits = count, bits
        self._fast = bits in _WINDOW_BITS
        self.groups = count // 8 if self._fast else 0
        self._rows = np.zeros((8, self.groups), dtype=np.uint64)
        self._rest = np.zeros(count - 8 * self.groups, dtype=np.uint64)
        self._tmp = np.empty(max(self.groups - 1, 0), dtype=np.uint64)

    def add(self, data: bytes) -> None:
        """Add one packed vector; :class:`SecAggProtocolError` if its length is wrong."""
        _check_packed(data, self.count, self.bits)
        bits, groups = self.bits, self.groups
        if not self._fast:
            if bits == 64:
                self._rest += np.frombuffer(data, dtype="<u8")
            else:
                self._rest += _unpack_bytewise(data, self.count, bits)
            return
        if groups > 1:  # every group but the last: its windows stay inside the data
            raw = np.frombuffer(data, dtype=np.uint8)
            tmp = self._tmp
            for j, (window, shift) in enumerate(_windows(raw, groups - 1, bits)):
                np.right_shift(window, shift, out=tmp)
                row = self._rows[j, : groups - 1]
                np.add(row, tmp, out=row)
        if groups:  # the last full group: its windows would read past the end
            last = int.from_bytes(data[(groups - 1) * bits : groups * bits], "little")
            mask = (1 << bits) - 1
            col = self._rows[:, groups - 1]
            col += np.array([(last >> (j * bits)) & mask for j in range(8)], dtype=np.uint64)
        for i in range(8 * groups, self.count):  # the incomplete group after them
            self._rest[i - 8 * groups] += np.uint64(_element(data, i, bits))

    def total(self) -> np.ndarray:
        """The sum in element order (uint64; reduce mod 2^bits)."""
        out = np.empty(self.count, dtype=np.uint64)
        out[: 8 * self.groups].reshape(self.groups, 8)[:] = self._rows.T
        out[8 * self.groups :] = self._rest
        return out


def unpack(data: bytes, count: int, bits: int) -> np.ndarray:
    """Inverse of :func:`pack`; raises :class:`SecAggProtocolError` on a wrong length."""
    acc = PackedSum(count, bits)
    acc.add(data)
    out = acc.total()
    if bits < 64:
        out &= np.uint64((1 << bits) - 1)
    return out


def _unpack_bytewise(data: bytes, count: int, bits: int) -> np.ndarray:
    """:func:`unpack` for any ring size, one byte column at a time."""
    if bits % 8 == 0:
        wide = np.zeros((count, 8), dtype=np.uint8)
        wide[:, : bits // 8] = np.frombuffer(data, dtype=np.uint8).reshape(count, bits // 8)
        return wide.view("<u8").reshape(-1).astype(np.uint64)
    groups = -(-count // 8)
    rows = np.zeros((groups, bits + 1), dtype=np.uint8)
    flat = np.zeros(groups * bits, dtype=np.uint8)
    flat[: len(data)] = np.frombuffer(data, dtype=np.uint8)
    rows[:, :bits] = flat.reshape(groups, bits)
    out = np.empty((groups, 8), dtype=np.uint64)
    mask = np.uint64((1 << bits) - 1)
    for j in range(8):
        off, shift = divmod(j * bits, 8)
        span = (bits + shift + 7) // 8
        acc = np.zeros(groups, dtype=np.uint64)
        for k in range(min(span, 8)):
            acc |= rows[:, off + k].astype(np.uint64) << np.uint64(8 * k)
        value = acc >> np.uint64(shift)
        if span == 9:
            value |= rows[:, off + 8].astype(np.uint64) << np.uint64(64 - shift)
        out[:, j] = value & mask
    return out.reshape(-1)[:count]


def support(sparsifier: str, density: float, seed: int, size: int) -> np.ndarray | None:
    """The coordinates every participant sends: all (``None``), or a shared random-k.

    Random-k uses the codec's :func:`~fedcommons.wire.codec.random_k_indices` of the
    public per-round seed, so all masked vectors line up.
    """
    from fedcommons.wire.codec import random_k_indices

    if sparsifier in ("", "none"):
        return None
    if sparsifier != "randk":
        raise SecAggProtocolError(
            f"{sparsifier} supports differ between clients: secure aggregation cannot sum them"
        )
    k = min(size, max(1, round(density * size))) if size else 0
    return random_k_indices(seed, size, k)


def clip_l2_and_round(
    values: np.ndarray,
    spec: RingSpec,
    clip_norm: float,
    *,
    tries: int = 8,
    rng: np.random.Generator | None = None,
    norm_bound: float | None = None,
) -> tuple[np.ndarray, bool]:
    """DP encoding: L2-clip to ``clip_norm``, round so the result stays within a bound.

    Stochastic rounding is redrawn (up to ``tries`` times) while the integer vector's L2
    norm exceeds ``norm_bound`` (default ``clip_norm / step``: the dequantized vector
    within ``clip_norm``); the last resort rounds toward zero, which never increases a
    coordinate's magnitude. So the contribution that enters the sum always has integer
    L2 norm ≤ ``norm_bound``: the sensitivity the DP noise is calibrated for (central
    DP-FedAvg: ``clip_norm``; distributed Skellam: Kairouz et al.'s conditional-rounding
    bound, slightly above ``clip_norm / step``). Returns ``(codes, whether the input was
    clipped)``.
    """
    rng = rng or np.random.default_rng(secrets.randbits(128))
    x = np.asarray(values, dtype=np.float64)
    if not np.isfinite(x).all():
        raise SecAggProtocolError("update contains NaN or Inf")
    norm = float(np.linalg.norm(x))
    clipped = norm > clip_norm
    if clipped:
        x = x * (clip_norm / norm)
    for _ in range(tries):
        codes, _ = quantize(x, spec, rng)
        if norm_bound is None:
            if float(np.linalg.norm(codes.astype(np.float64) * spec.step)) <= clip_norm:
                return codes, clipped
        elif float(np.linalg.norm(codes.astype(np.float64))) <= norm_bound:
            return codes, clipped
    scaled = np.clip(x, -spec.clip, spec.clip) * (spec.levels / spec.clip)
    return np.trunc(scaled).astype(np.int64), clipped
