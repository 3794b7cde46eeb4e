"""Compiled inner loops of the codec and of the FedAvg fold (Numba).

Why compiled code: every loop here is one pass over model-sized data, and the
numpy/torch formulations need 4–8 passes with model-sized temporaries (abs, max,
scale, round, clip, cast, …): the in-place torch version of int8 encode + decode
reached 836 MB/s per core, the numpy one 533 MB/s, a memcpy 10–14 GB/s. One fused
loop per operation is memory-bound instead (``python -m benchmarks.compression``).

Rules every kernel keeps:

- no allocation beyond a fixed 16 KiB block: callers pass every output array (so a
  hostile header cannot make a kernel allocate, and ``tracemalloc`` sees all of the
  decoder's memory);
- bit-reproducible: no ``fastmath`` that changes results (no reciprocal approximations,
  no reassociated sums; FMA contraction only in the folds, as torch does), so an
  encoding gives the same bits on every machine, and NaN/Inf checks are never
  optimised away;
- validation kernels return a status instead of raising (the caller raises the typed
  :class:`~fedcommons.errors.MalformedUpdateError`).

Kernels are compiled on first use and cached on disk (``cache=True``; Numba falls back
to a user-wide cache directory when the package directory is read-only).
"""

from __future__ import annotations

import numba as nb
import numpy as np

_JIT = {"cache": True, "nogil": True, "boundscheck": False}
# Folds ``acc += w · v`` may contract into one FMA, as torch's ``add_(v, alpha=w)``
# does on CPUs with FMA, so a fold gives the bits torch gave (they differ from a
# separate multiply and add only for weights that are not integers).
_FOLD = {**_JIT, "fastmath": {"contract"}}

# Stochastic rounding: a per-chunk offset from a 64-bit key (splitmix64 of seed and chunk
# number), then a Weyl sequence over the chunk's positions. Counter-based, so encoding
# is a pure function of (seed, values).
_PHI = 0.6180339887498949  # 1/φ: the most uniformly spread Weyl step


@nb.njit(inline="always")
def _splitmix64(z: np.uint64) -> np.uint64:  # pragma: no cover - compiled
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@nb.njit(**_JIT)
def quantize(v, chunk, levels, seed, stochastic, scales, codes):  # pragma: no cover
    """Per-chunk scale ``max|v|`` and codes in ``[-levels, levels]`` (int8 ``codes``).

    ``stochastic``: ``floor(v·L/s + u)`` with ``u`` uniform on [0, 1) from ``seed``
    (unbiased); else round half to even (deterministic; for error feedback).
    A chunk holding NaN or ±Inf gets a non-finite scale and zero codes.
    """
    n = v.size
    bits = v.view(np.int32)
    sbits = scales.view(np.int32)
    lv = np.float32(levels)
    inf = np.float32(np.inf)
    # Loops index slices from 0 (Numba then knows the index is non-negative, drops its
    # wraparound check and vectorises the loop).
    for c in range(scales.size):
        lo = c * chunk
        hi = min(lo + chunk, n)
        row, rbits, out = v[lo:hi], bits[lo:hi], codes[lo:hi]
        m = np.int32(0)
        for i in range(hi - lo):  # |v| as integer bits: exact, vectorises, NaN > Inf
            m = max(m, rbits[i] & np.int32(0x7FFFFFFF))
        sbits[c] = m
        s = scales[c]
        if not (s > 0 and s < inf):
            out[:] = 0
            continue
        inv = lv / s
        if stochastic:
            # u_i = frac(o + i·φ⁻¹) with o ~ U[0, 1) from the chunk's key: each u_i is
            # uniform on [0, 1) (so each code is unbiased), and a Weyl sequence costs
            # two flops where a per-value hash costs ten integer ops.
            o = np.float64(_splitmix64(np.uint64(seed) + np.uint64(c)) >> np.uint64(11))
            o *= 1.0 / 9007199254740992.0
            for i in range(hi - lo):
                t = o + np.float64(i) * _PHI
                u = np.float32(t - np.floor(t))
                q = np.floor(row[i] * inv + u)
                out[i] = np.int32(min(max(q, -lv), lv))
        else:
            for i in range(hi - lo):
                q = np.rint(row[i] * inv)
                out[i] = np.int32(min(max(q, -lv), lv))


@nb.njit(**_JIT)
def pack_int4(codes, out):  # pragma: no cover - compiled
    """Two codes in ``[-7, 7]`` per byte (code + 8 in each nibble, low nibble first)."""
    n = codes.size
    for b in range(n // 2):
        out[b] = np.uint8(codes[2 * b] + 8) | (np.uint8(codes[2 * b + 1] + 8) << np.uint8(4))
    if n % 2:
        out[n // 2] = np.uint8(codes[n - 1] + 8)


@nb.njit(inline="always")
def _code4(packed, j):  # pragma: no cover - compiled
    return np.int32((packed[j >> 1] >> np.uint8((j & 1) * 4)) & np.uint8(0x0F)) - 8


@nb.njit(**_JIT)
def int8_codes_ok(codes):  # pragma: no cover - compiled
    """False when a code is -128 (outside the symmetric range)."""
    low = np.int8(0)
    for i in range(codes.size):
        low = min(low, codes[i])
    return low > -128


@nb.njit(**_JIT)
def int4_codes_ok(packed, n):  # pragma: no cover - compiled
    """False when a nibble holds code -8, or the padding nibble is not zero."""
    low = np.int32(0)
    for b in range(n // 2):
        low |= np.int32((packed[b] & 0x0F) == 0) | np.int32((packed[b] >> 4) == 0)
    if n % 2:
        low |= np.int32((packed[n // 2] & 0x0F) == 0) | np.int32((packed[n // 2] >> 4) != 0)
    return low == 0


@nb.njit(**_JIT)
def all_finite_bits(bits, exponent):  # pragma: no cover - compiled
    """True when no value's exponent field is all ones (no NaN, no ±Inf).

    ``bits`` is the integer view of float32 (``exponent`` 0x7F800000), float16
    (0x7C00) or bfloat16 (0x7F80) values.
    """
    worst = exponent - exponent
    for i in range(bits.size):
        worst = max(worst, bits[i] & exponent)
    return worst != exponent


@nb.njit(**_JIT)
def dequantize8(codes, scales, chunk, levels, j0, out):  # pragma: no cover - compiled
    """``out[j - j0] = code[j] · (s / L)`` for ``j`` in ``[j0, j0 + out.size)``."""
    lv = np.float32(levels)
    j1 = j0 + out.size
    j = j0
    while j < j1:
        c = j // chunk
        stop = min((c + 1) * chunk, j1)
        f = scales[c] / lv
        src, dst = codes[j:stop], out[j - j0 : stop - j0]
        for i in range(stop - j):
            dst[i] = np.float32(src[i]) * f
        j = stop


@nb.njit(inline="always")
def _unpack_range(packed, j, stop, f, dst):  # pragma: no cover - compiled
    """``dst[t] = code(j + t) · f`` for int4 codes ``j … stop-1``, two per byte."""
    t = 0
    if j & 1:
        dst[0] = np.float32(_code4(packed, j)) * f
        t = 1
    pairs = (stop - j - t) // 2
    src = packed[(j + t) >> 1 : ((j + t) >> 1) + pairs]
    out = dst[t : t + 2 * pairs]
    for b in range(pairs):
        byte = src[b]
        out[2 * b] = np.float32(np.int32(byte & np.uint8(0x0F)) - 8) * f
        out[2 * b + 1] = np.float32(np.int32(byte >> np.uint8(4)) - 8) * f
    if t + 2 * pairs < stop - j:
        dst[stop - j - 1] = np.float32(_code4(packed, stop - 1)) * f


@nb.njit(**_JIT)
def dequantize4(packed, scales, chunk, levels, j0, out):  # pragma: no cover - compiled
    """:func:`dequantize8` for int4 codes packed two per byte."""
    lv = np.float32(levels)
    j1 = j0 + out.size
    j = j0
    while j < j1:
        c = j // chunk
        stop = min((c + 1) * chunk, j1)
        _unpack_range(packed, j, stop, scales[c] / lv, out[j - j0 : stop - j0])
        j = stop


@nb.njit(**_FOLD)
def fold8(codes, scales, chunk, levels, j0, w, acc):  # pragma: no cover - compiled
    """``acc[j - j0] += w · float64(code[j] · (s / L))``: decode and fold in one pass.

    The value is formed in float32 exactly as :func:`dequantize8` forms it, so this
    gives the same bits as decoding to a dense tensor and folding that.
    """
    lv = np.float32(levels)
    j1 = j0 + acc.size
    j = j0
    while j < j1:
        c = j // chunk
        stop = min((c + 1) * chunk, j1)
        f = scales[c] / lv
        src, dst = codes[j:stop], acc[j - j0 : stop - j0]
        for i in range(stop - j):
            dst[i] += w * np.float64(np.float32(src[i]) * f)
        j = stop


@nb.njit(**_FOLD)
def fold4(packed, scales, chunk, levels, j0, w, acc):  # pragma: no cover - compiled
    """:func:`fold8` for int4 codes packed two per byte (decoded a block at a time)."""
    lv = np.float32(levels)
    j1 = j0 + acc.size
    buf = np.empty(min(chunk, 4096), dtype=np.float32)  # a small stack-sized block
    j = j0
    while j < j1:
        c = j // chunk
        stop = min((c + 1) * chunk, j1, j + buf.size)
        _unpack_range(packed, j, stop, scales[c] / lv, buf)
        dst = acc[j - j0 : stop - j0]
        for i in range(stop - j):
            dst[i] += w * np.float64(buf[i])
        j = stop


@nb.njit(**_FOLD)
def fold_values(x, w, acc):  # pragma: no cover - compiled
    """``acc += w · float64(x)`` (float32 or float64 ``x``), one pass."""
    for i in range(x.size):
        acc[i] += w * np.float64(x[i])


@nb.njit(**_JIT)
def scatter8(codes, scales, chunk, levels, j0, support, out):  # pragma: no cover
    """``out[i] =`` the next int8 value (from value ``j0`` on) where ``support[i]``."""
    lv = np.float32(levels)
    j = j0
    for i in range(support.size):
        if support[i]:
            out[i] = np.float32(codes[j]) * (scales[j // chunk] / lv)
            j += 1


@nb.njit(**_JIT)
def scatter4(packed, scales, chunk, levels, j0, support, out):  # pragma: no cover
    """:func:`scatter8` for int4 codes."""
    lv = np.float32(levels)
    j = j0
    for i in range(support.size):
        if support[i]:
            out[i] = np.float32(_code4(packed, j)) * (scales[j // chunk] / lv)
            j += 1


@nb.njit(**_FOLD)
def scatter_fold8(codes, scales, chunk, levels, j0, support, w, acc):  # pragma: no cover
    """``acc[i] += w ·`` the next int8 value where ``support[i]`` (sparse fused fold)."""
    lv = np.float32(levels)
    j = j0
    for i in range(support.size):
        if support[i]:
            acc[i] += w * np.float64(np.float32(codes[j]) * (scales[j // chunk] / lv))
            j += 1


@nb.njit(**_FOLD)
def scatter_fold4(packed, scales, chunk, levels, j0, support, w, acc):  # pragma: no cover
    """:func:`scatter_fold8` for int4 codes."""
    lv = np.float32(levels)
    j = j0
    for i in range(support.size):
        if support[i]:
            acc[i] += w * np.float64(np.float32(_code4(packed, j)) * (scales[j // chunk] / lv))
            j += 1


@nb.njit(**_FOLD)
def scatter_fold_values(x, support, w, acc):  # pragma: no cover - compiled
    """``acc[i] += w · x[j]`` for the ``j``-th set entry ``i`` of ``support``."""
    j = 0
    for i in range(support.size):
        if support[i]:
            acc[i] += w * np.float64(x[j])
            j += 1


# Status codes of the index decoders (the caller turns them into typed rejections).
OK, MID_NUMBER, TOO_LONG, COUNT, OUT_OF_RANGE, DUPLICATE = 0, 1, 2, 3, 4, 5


@nb.njit(**_JIT)
def varint_support(buf, n, count, support):  # pragma: no cover - compiled
    """Mark the indices of delta-coded LEB128 gaps in ``support``, checked on the way.

    Returns a status: every index must be < ``n``, every gap after the first >= 1 (so
    indices strictly increase), each varint at most 9 bytes, and the stream must hold
    exactly ``count`` varints.
    """
    pos = 0
    prev = np.uint64(0)
    size = buf.size
    for j in range(count):
        value = np.uint64(0)
        shift = np.uint64(0)
        length = 0
        while True:
            if pos >= size:
                return MID_NUMBER
            byte = buf[pos]
            pos += 1
            length += 1
            if length > 9:
                return TOO_LONG
            value |= np.uint64(byte & 0x7F) << shift
            shift += np.uint64(7)
            if byte < 0x80:
                break
        if j > 0 and value == 0:
            return DUPLICATE
        if value >= np.uint64(n) or (j > 0 and value >= np.uint64(n) - prev):
            return OUT_OF_RANGE
        prev = value if j == 0 else prev + value
        support[prev] = True
    if pos != size:
        return COUNT
    return OK


@nb.njit(**_JIT)
def bitmap_support(bits, n, count, support):  # pragma: no cover - compiled
    """Unpack a bitmap over ``n`` values (little-endian bit order) into ``support``.

    Returns ``OUT_OF_RANGE`` for a set bit at or beyond ``n``, ``COUNT`` unless exactly
    ``count`` bits are set.
    """
    found = 0
    for b in range(bits.size):
        byte = bits[b]
        if byte == 0:
            continue
        for k in range(8):
            if byte & (1 << k):
                i = b * 8 + k
                if i >= n:
                    return OUT_OF_RANGE
                support[i] = True
                found += 1
    if found != count:
        return COUNT
    return OK


@nb.njit(**_JIT)
def support_indices(support, out):  # pragma: no cover - compiled
    """Fill ``out`` with the positions of ``support``'s first ``out.size`` true entries."""
    j = 0
    count = out.size
    for i in range(support.size):
        if support[i]:
            if j >= count:
                return j
            out[j] = i
            j += 1
    return j
