"""The encoded-update codec: one versioned, self-describing byte format, one decoder.

Flower-free (numpy and torch only): the client SDK encodes its delta with
:func:`encode_update`, the coordinator decodes and validates it with
:func:`decode_update` before anything touches the aggregate.

Compression specs (``+`` composes a sparsifier with a value coding)::

    dense | dense:fp32 | dense:fp16 | dense:bf16      every value, as floats
    int8[:CHUNK] | int4[:CHUNK]                         every value, quantized
    topk:F          global top-k by magnitude, k = F·d over all tensors
    topk-tensor:F   top-k per tensor (each tensor keeps its own fraction F)
    randk:F         random-k from a per-round shared seed (indices never sent)
    fish:F[:N]      FISH fixed sparse mask (Sung et al. 2021) from N examples' Fisher
    topk:0.01+int8, fish:0.02+int4, randk:0.05+fp16, ...   sparsify, then quantize

Quantization (int8: levels −127…127, int4: −7…7) uses one fp32 scale ``s = max|v|``
per chunk of ``CHUNK`` consecutive values (default 256) and one of two roundings:

- ``stochastic`` (the default of :func:`encode_update`, and what a client uses without
  error feedback): ``q = floor(v·L/s + u)`` with ``u`` uniform on ``[0, 1)`` (per
  chunk, a random offset drawn from the client's generator plus a Weyl sequence over
  the positions), so ``E[q·s/L] = v``: the mean of many clients' updates is unbiased.
- ``nearest`` (what a client uses with error feedback, the default): round half to
  even, deterministic, half the worst-case error; the error feedback residual carries
  the rounding error into the client's next update, so nothing is lost on average
  (Karimireddy et al. 2019) and no random numbers are drawn.

The decoder does not need to know which rounding was used.

Byte format, version 1 (all integers little-endian; *varint* = unsigned LEB128)::

    "FCU" | version u8 | total length u32 | round varint
    sparsifier u8 | value coding u8 | chunk varint | tensor count varint
    per tensor: name length varint, UTF-8 name, dtype u8, ndim u8, dims varint…
    index mode u8 (0 every value, 1 delta varints, 2 bitmap, 3 shared seed u64)
    value count varint | index section | value section | CRC-32 u32 of all before it

The index section holds whichever of delta-coded varints (first index, then gaps) and
a bitmap over the flattened tensors is smaller; for random-k it holds only the seed.
The value section holds fp32/fp16/bf16 values, or the chunk scales (fp32) followed by
int8 codes or int4 codes packed two per byte (code + 8 in each nibble).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedcommons.errors import CompressionSpecError, EncodingError, MalformedUpdateError

try:  # ISA-L's CRC-32: zlib's polynomial and values, ~10x faster (carry-less multiply)
    from isal.isal_zlib import crc32
except ImportError:  # pragma: no cover - a platform without an isal wheel
    from zlib import crc32
from fedcommons.wire import kernels
from fedcommons.wire.decoded import EncodedValues, LazyDelta
from fedcommons.wire.decoded import unflatten as unflatten  # public here since v1

FORMAT_VERSION = 1
MAGIC = b"FCU"
DEFAULT_CHUNK = 256
DEFAULT_FISH_EXAMPLES = 256
_FIXED_HEADER = struct.Struct("<3sBI")  # magic, version, total length
_CRC = struct.Struct("<I")

SPARSIFIERS = ("none", "topk", "topk-tensor", "randk", "fish")
VALUE_CODINGS = ("fp32", "fp16", "bf16", "int8", "int4")
_LEVELS = {"int8": 127, "int4": 7}

INDEX_ALL, INDEX_VARINT, INDEX_BITMAP, INDEX_SEED = 0, 1, 2, 3

_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_DTYPE_CODE = {dt: i for i, dt in enumerate(_DTYPES)}
_FP16_MAX = float(np.finfo(np.float16).max)


# ---------------------------------------------------------------------------------------
# The compression spec
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CompressionSpec:
    """A parsed compression spec: an optional sparsifier, then a value coding."""

    sparsifier: str = "none"
    density: float = 1.0
    values: str = "fp32"
    chunk: int = DEFAULT_CHUNK
    fish_examples: int = DEFAULT_FISH_EXAMPLES

    @classmethod
    def parse(cls, text: str) -> CompressionSpec:
        """Parse ``"topk:0.01+int8"`` and friends; raise CompressionSpecError if invalid."""
        raw = str(text).strip().lower()
        if not raw:
            raise CompressionSpecError("empty compression spec; use e.g. 'dense' or 'topk:0.01'")
        sparsifier, density, fish_n = "none", 1.0, DEFAULT_FISH_EXAMPLES
        values, chunk = "", DEFAULT_CHUNK
        for stage in raw.split("+"):
            name, *args = stage.split(":")
            if name in {"topk", "topk-tensor", "randk", "fish"}:
                if sparsifier != "none" or values:
                    raise CompressionSpecError(
                        f"{text!r}: one sparsifier at most, and it comes before the value "
                        "coding (e.g. 'topk:0.01+int8')"
                    )
                max_args = 2 if name == "fish" else 1
                if not 1 <= len(args) <= max_args:
                    raise CompressionSpecError(
                        f"{text!r}: {name} takes a kept fraction, e.g. '{name}:0.01'"
                    )
                density = _parse_number(text, args[0], float)
                if not 0 < density <= 1:
                    raise CompressionSpecError(
                        f"{text!r}: kept fraction must be in (0, 1], got {args[0]}"
                    )
                if len(args) == 2:
                    fish_n = _parse_number(text, args[1], int)
                    if fish_n < 1:
                        raise CompressionSpecError(f"{text!r}: FISH needs >= 1 example")
                sparsifier = name
            elif name in {"int8", "int4"}:
                if values or len(args) > 1:
                    raise CompressionSpecError(f"{text!r}: one value coding at most")
                values = name
                if args:
                    chunk = _parse_number(text, args[0], int)
                    if chunk < 1:
                        raise CompressionSpecError(f"{text!r}: chunk size must be >= 1")
            elif name in {"dense", "fp32", "fp16", "bf16"}:
                coding = (args[0] if args else "fp32") if name == "dense" else name
                if name == "dense" and (sparsifier != "none" or len(args) > 1):
                    raise CompressionSpecError(f"{text!r}: 'dense' cannot follow a sparsifier")
                if values or coding not in {"fp32", "fp16", "bf16"} or (name != "dense" and args):
                    raise CompressionSpecError(
                        f"{text!r}: bad value coding {stage!r}; use fp32, fp16, bf16, int8 or int4"
                    )
                values = coding
            else:
                raise CompressionSpecError(
                    f"{text!r}: unknown stage {name!r}; known: dense[:fp16|bf16], int8, int4, "
                    "topk:F, topk-tensor:F, randk:F, fish:F[:N], joined with '+'"
                )
        return cls(sparsifier, density, values or "fp32", chunk, fish_n)

    def __str__(self) -> str:
        parts = []
        if self.sparsifier != "none":
            arg = f"{self.density:g}"
            if self.sparsifier == "fish" and self.fish_examples != DEFAULT_FISH_EXAMPLES:
                arg += f":{self.fish_examples}"
            parts.append(f"{self.sparsifier}:{arg}")
        if self.values in _LEVELS:
            parts.append(self.values + (f":{self.chunk}" if self.chunk != DEFAULT_CHUNK else ""))
        elif parts:
            parts += [self.values] if self.values != "fp32" else []
        else:
            parts.append("dense" if self.values == "fp32" else f"dense:{self.values}")
        return "+".join(parts)

    @property
    def is_dense_fp32(self) -> bool:
        """True for the uncompressed baseline (sent as a plain Flower ArrayRecord)."""
        return self.sparsifier == "none" and self.values == "fp32"

    @property
    def lossy(self) -> bool:
        """Whether decoding loses information (then error feedback applies)."""
        return not self.is_dense_fp32


def _parse_number(text: str, value: str, kind: type) -> Any:
    try:
        return kind(value)
    except ValueError:
        raise CompressionSpecError(f"{text!r}: {value!r} is not a valid {kind.__name__}") from None


# ---------------------------------------------------------------------------------------
# Layouts and flat views
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorInfo:
    """Name, shape and dtype of one tensor of an update."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)


def layout_of(tensors: Mapping[str, torch.Tensor | np.ndarray]) -> list[TensorInfo]:
    """The layout (names, shapes, dtypes, in mapping order) of a state dict."""
    out = []
    for name, value in tensors.items():
        dtype = value.dtype if isinstance(value, torch.Tensor) else _np_to_torch_dtype(value)
        if dtype not in _DTYPE_CODE:
            raise EncodingError(
                f"tensor {name!r} has dtype {dtype}; only float32/float16/bfloat16/float64 "
                "tensors can be encoded"
            )
        out.append(TensorInfo(name, tuple(int(d) for d in value.shape), dtype))
    return out


def _np_to_torch_dtype(value: np.ndarray) -> torch.dtype:
    try:
        return torch.from_numpy(np.empty(0, dtype=value.dtype)).dtype
    except TypeError:
        raise EncodingError(f"unsupported array dtype {value.dtype}") from None


def flatten(tensors: Mapping[str, torch.Tensor | np.ndarray]) -> np.ndarray:
    """Concatenate every tensor, flattened, into one float32 vector (mapping order)."""
    parts = []
    for value in tensors.values():
        if isinstance(value, torch.Tensor):
            value = value.detach().to("cpu", torch.float32).reshape(-1).numpy()
        parts.append(np.asarray(value, dtype=np.float32).reshape(-1))
    if not parts:
        return np.zeros(0, dtype=np.float32)
    return np.concatenate(parts)


# ---------------------------------------------------------------------------------------
# Varints (vectorised LEB128)
# ---------------------------------------------------------------------------------------
def encode_varints(values: np.ndarray) -> bytes:
    """Unsigned LEB128 of every value of a non-negative integer array, concatenated."""
    v = np.asarray(values, dtype=np.uint64)
    if v.size == 0:
        return b""
    nbytes = np.ones(v.shape, dtype=np.int64)
    for j in range(1, 10):
        more = v >= np.uint64(1 << (7 * j))
        if not more.any():
            break
        nbytes += more
    ends = np.cumsum(nbytes)
    starts = ends - nbytes
    out = np.empty(int(ends[-1]), dtype=np.uint8)
    for j in range(int(nbytes.max())):
        sel = nbytes > j
        chunk = ((v[sel] >> np.uint64(7 * j)) & np.uint64(0x7F)).astype(np.uint8)
        chunk |= (nbytes[sel] > j + 1).astype(np.uint8) << 7
        out[starts[sel] + j] = chunk
    return out.tobytes()


def decode_varints(data: bytes | np.ndarray, max_bytes_each: int = 9) -> np.ndarray:
    """Inverse of :func:`encode_varints`; raises MalformedUpdateError on a bad stream."""
    b = np.frombuffer(data, dtype=np.uint8) if isinstance(data, bytes | bytearray) else data
    if b.size == 0:
        return np.zeros(0, dtype=np.uint64)
    ends = np.flatnonzero(b < 0x80)
    if ends.size == 0 or ends[-1] != b.size - 1:
        raise MalformedUpdateError("malformed", "index varints end mid-number")
    starts = np.empty_like(ends)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    lengths = ends - starts + 1
    if int(lengths.max()) > max_bytes_each:
        raise MalformedUpdateError("malformed", "index varint longer than 63 bits")
    out = np.zeros(ends.size, dtype=np.uint64)
    for j in range(int(lengths.max())):
        sel = lengths > j
        out[sel] |= (b[starts[sel] + j] & np.uint64(0x7F)).astype(np.uint64) << np.uint64(7 * j)
    return out


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


class _Reader:
    """Bounds-checked cursor over a payload (overruns are malformed payloads)."""

    def __init__(self, data: memoryview, start: int, end: int) -> None:
        self.data, self.pos, self.end = data, start, end

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > self.end:
            raise MalformedUpdateError("malformed", "payload sections overrun its length")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        if self.pos >= self.end:
            raise MalformedUpdateError("malformed", "payload sections overrun its length")
        self.pos += 1
        return self.data[self.pos - 1]

    def varint(self) -> int:
        value, shift, data, pos, end = 0, 0, self.data, self.pos, self.end
        while True:
            if pos >= end:
                raise MalformedUpdateError("malformed", "payload sections overrun its length")
            byte = data[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                self.pos = pos
                return value
            shift += 7
            if shift > 63:
                raise MalformedUpdateError("malformed", "header varint longer than 63 bits")


# ---------------------------------------------------------------------------------------
# Selecting indices
# ---------------------------------------------------------------------------------------
def _keep_count(density: float, n: int) -> int:
    return min(n, max(1, round(density * n))) if n else 0


def topk_indices(values: np.ndarray, k: int) -> np.ndarray:
    """Sorted indices of the ``k`` largest-magnitude entries (ties: lowest index first)."""
    n = values.size
    if k >= n:
        return np.arange(n, dtype=np.int64)
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    mag = np.abs(values)
    kth = np.partition(mag, n - k)[n - k]
    idx = np.flatnonzero(mag >= kth)
    if idx.size > k:  # ties at the threshold: keep every larger one, then the first equal
        greater = np.flatnonzero(mag > kth)
        equal = np.flatnonzero(mag == kth)[: k - greater.size]
        idx = np.sort(np.concatenate([greater, equal]))
    return idx.astype(np.int64, copy=False)


def random_k_indices(seed: int, n: int, k: int, dtype: type = np.int64) -> np.ndarray:
    """The ``k`` sorted indices of ``range(n)`` a shared ``seed`` selects.

    The ``k`` positions whose keys in Philox's raw 64-bit stream (stable across numpy
    versions) are smallest, ties broken by position, so encoder and decoder agree
    without sending the indices. Streams the keys in blocks: memory is O(k + block),
    not the O(n) 64-bit keys a full sort would hold.
    """
    if k >= n:
        return np.arange(n, dtype=dtype)
    out = np.empty(max(k, 0), dtype=dtype)
    if k <= 0:
        return out
    support = _random_k_support(seed, n, k)
    kernels.support_indices(support, out)
    return out


_RANDK_BLOCK = 1 << 16
_RANDK_BUCKET_SHIFT = np.uint64(48)


def _philox_blocks(seed: int, n: int) -> Any:
    gen = np.random.Philox(key=seed & 0xFFFFFFFFFFFFFFFF)
    for start in range(0, n, _RANDK_BLOCK):
        yield start, gen.random_raw(min(_RANDK_BLOCK, n - start))


def _random_k_support(seed: int, n: int, k: int) -> np.ndarray:
    """Bool mask of the ``k`` smallest keys (two passes over the key stream)."""
    hist = np.zeros(1 << 16, dtype=np.int64)
    for _, keys in _philox_blocks(seed, n):
        hist += np.bincount((keys >> _RANDK_BUCKET_SHIFT).astype(np.intp), minlength=1 << 16)
    cum = np.cumsum(hist)
    bucket = int(np.searchsorted(cum, k))  # the bucket holding the k-th smallest key
    need = k - (int(cum[bucket - 1]) if bucket else 0)
    support = np.zeros(n, dtype=np.bool_)
    cand_idx, cand_key = [], []
    for start, keys in _philox_blocks(seed, n):
        top = keys >> _RANDK_BUCKET_SHIFT
        support[start : start + keys.size] = top < np.uint64(bucket)
        hit = np.flatnonzero(top == np.uint64(bucket))
        cand_idx.append(hit + start)
        cand_key.append(keys[hit])
    idx, key = np.concatenate(cand_idx), np.concatenate(cand_key)
    support[idx[np.lexsort((idx, key))[:need]]] = True
    return support


def _index_section(idx: np.ndarray, total: int) -> tuple[int, bytes]:
    """Delta varints or a bitmap, whichever is smaller."""
    gaps = np.empty(idx.size, dtype=np.uint64)
    if idx.size:
        gaps[0] = idx[0]
        np.subtract(idx[1:], idx[:-1], out=gaps[1:], casting="unsafe")
    bitmap_len = (total + 7) // 8
    # Cheap size estimate before encoding: LEB128 length from the gap magnitudes.
    est = int(idx.size + (gaps >= 128).sum() + (gaps >= 1 << 14).sum() + (gaps >= 1 << 21).sum())
    if est > bitmap_len + 8:
        return INDEX_BITMAP, _bitmap(idx, bitmap_len)
    coded = encode_varints(gaps)
    if len(coded) + len(_varint(len(coded))) > bitmap_len:
        return INDEX_BITMAP, _bitmap(idx, bitmap_len)
    return INDEX_VARINT, _varint(len(coded)) + coded


def _bitmap(idx: np.ndarray, nbytes: int) -> bytes:
    bits = np.zeros(nbytes * 8, dtype=bool)
    bits[idx] = True
    return np.packbits(bits, bitorder="little").tobytes()


# ---------------------------------------------------------------------------------------
# Value codings
# ---------------------------------------------------------------------------------------
def _quantize(
    v: np.ndarray, levels: int, chunk: int, seed: int, stochastic: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Per-chunk scales and codes in ``[-levels, levels]`` (see :func:`kernels.quantize`)."""
    v = np.ascontiguousarray(v, dtype=np.float32)
    scales = np.empty(-(-v.size // chunk), dtype=np.float32)
    codes = np.empty(v.size, dtype=np.int8)
    kernels.quantize(v, chunk, levels, seed, stochastic, scales, codes)
    return scales, codes


def _pack_int4(codes: np.ndarray) -> np.ndarray:
    out = np.empty((codes.size + 1) // 2, dtype=np.uint8)
    kernels.pack_int4(codes, out)
    return out


def _encode_values(
    v: np.ndarray,
    spec: CompressionSpec,
    rng: np.random.Generator,
    reconstruct: bool,
    rounding: str,
) -> tuple[list[Any], np.ndarray | None]:
    """Value section (a list of buffers) and (optionally) what the decoder reads back."""
    if spec.values == "fp32":
        v = np.ascontiguousarray(v, dtype=np.float32)
        return [v], (v if reconstruct else None)
    if spec.values == "fp16":
        h = np.clip(v, -_FP16_MAX, _FP16_MAX).astype(np.float16)
        return [h], (h.astype(np.float32) if reconstruct else None)
    if spec.values == "bf16":
        b = torch.from_numpy(np.ascontiguousarray(v)).to(torch.bfloat16)
        rec = b.float().numpy() if reconstruct else None
        return [b.view(torch.int16).numpy()], rec
    levels = _LEVELS[spec.values]
    seed = int(rng.integers(0, 1 << 63)) if rounding == "stochastic" else 0
    scales, codes = _quantize(v, levels, spec.chunk, seed, rounding == "stochastic")
    body = codes if spec.values == "int8" else _pack_int4(codes)
    rec = None
    if reconstruct:
        rec = np.empty(codes.size, dtype=np.float32)
        kernels.dequantize8(codes, scales, spec.chunk, levels, 0, rec)
    return [scales, body], rec


# ---------------------------------------------------------------------------------------
# Encode
# ---------------------------------------------------------------------------------------
@dataclass
class EncodedUpdate:
    """An encoded update: the payload plus what the receiver will decode from it."""

    payload: bytes
    #: Flat float32 reconstruction (what the decoder reads back), if asked for.
    reconstruction: np.ndarray | None
    #: Values sent (k for sparse encodings, d for dense ones).
    num_values: int
    #: How the indices travelled: "all", "varint", "bitmap" or "seed".
    index_mode: str

    @property
    def nbytes(self) -> int:
        """Size of the payload in bytes (what goes over the wire)."""
        return len(self.payload)


_INDEX_MODE_NAMES = {
    INDEX_ALL: "all",
    INDEX_VARINT: "varint",
    INDEX_BITMAP: "bitmap",
    INDEX_SEED: "seed",
}


def encode_update(
    delta: Mapping[str, torch.Tensor | np.ndarray],
    spec: CompressionSpec | str,
    *,
    round_no: int,
    rng: np.random.Generator | None = None,
    shared_seed: int = 0,
    mask: np.ndarray | None = None,
    reconstruct: bool = False,
    rounding: str = "stochastic",
) -> EncodedUpdate:
    """Encode ``delta`` as ``spec`` says.

    ``rng`` seeds stochastic rounding (use a per-client generator); ``shared_seed``
    picks random-k indices (the coordinator sends it each round); ``mask`` is the flat
    boolean FISH mask over the concatenated tensors (required for ``fish``). With
    ``reconstruct`` the result carries the flat vector the decoder will read back, which
    error feedback subtracts from what the client meant to send. ``rounding`` is
    ``"stochastic"`` (unbiased) or ``"nearest"`` (deterministic; for error feedback).
    """
    spec = CompressionSpec.parse(spec) if isinstance(spec, str) else spec
    layout = layout_of(delta)
    flat = flatten(delta)
    return encode_flat(
        flat,
        layout,
        spec,
        round_no=round_no,
        rng=rng,
        shared_seed=shared_seed,
        mask=mask,
        reconstruct=reconstruct,
        rounding=rounding,
    )


ROUNDINGS = ("stochastic", "nearest")


def encode_flat(
    flat: np.ndarray,
    layout: list[TensorInfo],
    spec: CompressionSpec,
    *,
    round_no: int,
    rng: np.random.Generator | None = None,
    shared_seed: int = 0,
    mask: np.ndarray | None = None,
    reconstruct: bool = False,
    rounding: str = "stochastic",
) -> EncodedUpdate:
    """:func:`encode_update` on an already flattened float32 vector and its layout."""
    total = flat.size
    if total != layout_size(layout):
        raise EncodingError(f"flat vector has {total} values, layout {layout_size(layout)}")
    if rounding not in ROUNDINGS:
        raise EncodingError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    rng = rng or np.random.default_rng()
    if spec.sparsifier == "none":
        idx = None
        mode, index_bytes = INDEX_ALL, b""
    elif spec.sparsifier == "topk":
        idx = topk_indices(flat, _keep_count(spec.density, total))
    elif spec.sparsifier == "topk-tensor":
        parts, offset = [], 0
        for info in layout:
            n = info.numel
            parts.append(topk_indices(flat[offset : offset + n], _keep_count(spec.density, n)))
            parts[-1] += offset
            offset += n
        idx = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    elif spec.sparsifier == "randk":
        idx = random_k_indices(shared_seed, total, _keep_count(spec.density, total))
        mode, index_bytes = INDEX_SEED, struct.pack("<Q", shared_seed & 0xFFFFFFFFFFFFFFFF)
    elif spec.sparsifier == "fish":
        if mask is None or mask.size != total:
            raise EncodingError("fish encoding needs the client's FISH mask over every tensor")
        idx = np.flatnonzero(mask)
    else:  # pragma: no cover - CompressionSpec.parse rejects the rest
        raise EncodingError(f"unknown sparsifier {spec.sparsifier!r}")
    if idx is not None and spec.sparsifier != "randk":
        mode, index_bytes = _index_section(idx, total)
    values = flat if idx is None else flat[idx]
    value_parts, rec_values = _encode_values(values, spec, rng, reconstruct, rounding)
    reconstruction = None
    if reconstruct:
        if idx is None:
            reconstruction = np.array(rec_values, dtype=np.float32, copy=True)
        else:
            reconstruction = np.zeros(total, dtype=np.float32)
            reconstruction[idx] = rec_values
    payload = pack_payload(
        layout,
        round_no=round_no,
        sparsifier=SPARSIFIERS.index(spec.sparsifier),
        value_coding=VALUE_CODINGS.index(spec.values),
        chunk=spec.chunk if spec.values in _LEVELS else 0,
        index_mode=mode,
        count=int(values.size),
        index_bytes=index_bytes,
        value_bytes=value_parts,
    )
    return EncodedUpdate(payload, reconstruction, int(values.size), _INDEX_MODE_NAMES[mode])


def layout_size(layout: list[TensorInfo]) -> int:
    """Total number of elements of a layout."""
    return sum(t.numel for t in layout)


def pack_payload(
    layout: list[TensorInfo],
    *,
    round_no: int,
    sparsifier: int,
    value_coding: int,
    chunk: int,
    index_mode: int,
    count: int,
    index_bytes: bytes,
    value_bytes: bytes | list[Any],
    version: int = FORMAT_VERSION,
) -> bytes:
    """Assemble a payload from its sections and seal it with length and CRC-32.

    ``value_bytes`` is bytes or a list of buffers (numpy arrays are read in place, so
    the values are copied once, into the payload). The low-level builder
    :func:`encode_flat` uses; it validates nothing, so tools and tests can also build
    deliberately wrong payloads with it.
    """
    head = bytearray()
    head += _varint(round_no)
    head += bytes([sparsifier, value_coding])
    head += _varint(chunk)
    head += _varint(len(layout))
    for info in layout:
        name = info.name.encode()
        head += _varint(len(name)) + name
        head += bytes([_DTYPE_CODE[info.dtype], len(info.shape)])
        for dim in info.shape:
            head += _varint(dim)
    head += bytes([index_mode])
    head += _varint(count)
    values = [value_bytes] if isinstance(value_bytes, bytes | bytearray) else value_bytes
    views = [memoryview(v).cast("B") for v in values]
    body_len = len(head) + len(index_bytes) + sum(v.nbytes for v in views)
    total = _FIXED_HEADER.size + body_len + _CRC.size
    parts = [_FIXED_HEADER.pack(MAGIC, version, total), bytes(head), index_bytes, *views]
    crc = 0
    for part in parts:
        crc = crc32(part, crc)
    return b"".join([*parts, _CRC.pack(crc)])


# ---------------------------------------------------------------------------------------
# Decode
# ---------------------------------------------------------------------------------------
#: Without a reference layout, the largest update (in values) the decoder accepts.
MAX_UNCHECKED_ELEMENTS = 1 << 26


@dataclass
class DecodedUpdate:
    """A decoded, validated update.

    ``delta`` is a :class:`~fedcommons.wire.decoded.LazyDelta`: a read-only mapping
    that decodes to dense tensors on first access, or folds straight into an
    accumulator (:meth:`~fedcommons.wire.decoded.LazyDelta.fold_into`).
    """

    round_no: int
    delta: LazyDelta
    spec: CompressionSpec
    num_values: int
    index_mode: str
    nbytes: int
    shared_seed: int | None = None
    #: The coordinates the client sent (sparse encodings; ``None`` when dense).
    mask: dict[str, torch.Tensor] | None = None


def peek_header(payload: bytes) -> tuple[int, int]:
    """Return (format version, declared total length) after checking the magic bytes."""
    if len(payload) < _FIXED_HEADER.size:
        if payload[: len(MAGIC)] == MAGIC[: len(payload)]:
            raise MalformedUpdateError("truncated", f"payload of {len(payload)} bytes is truncated")
        raise MalformedUpdateError("malformed", "not a fedcommons encoded update")
    magic, version, total = _FIXED_HEADER.unpack_from(payload)
    if magic != MAGIC:
        raise MalformedUpdateError("malformed", "not a fedcommons encoded update (bad magic)")
    return version, total


def decode_update(
    payload: bytes,
    reference: Mapping[str, torch.Tensor] | list[TensorInfo] | None = None,
    *,
    expected_round: int | None = None,
    max_bytes: int | None = None,
    expected_seed: int | None = None,
    max_elements: int = MAX_UNCHECKED_ELEMENTS,
) -> DecodedUpdate:
    """Decode and validate ``payload``; raise MalformedUpdateError naming the problem.

    Checks, in order: size cap (``too-large``), magic (``malformed``), format version
    (``unknown-version``), declared length (``truncated``), CRC-32 (``checksum``),
    encoding codes (``unknown-encoding``), round (``wrong-round``), tensor names,
    shapes and dtypes against ``reference`` (``wrong-tensors``, ``wrong-shape``,
    ``wrong-dtype``), indices (``index-out-of-range``, ``duplicate-index``), the
    random-k seed (``wrong-seed``), and values (``non-finite``).

    Memory: every header field is bounded before anything is allocated — the layout by
    ``reference`` (without one, by ``max_elements`` values), counts by the bytes
    actually present — and the values stay views of ``payload``. Decoding allocates
    at most a sparse update's support mask (1 byte a parameter, a quarter of the dense
    fp32 size); reading ``delta`` adds the dense float32 vector (1×), folding it
    (:meth:`LazyDelta.fold_into`) nothing.
    """
    size = len(payload)
    if max_bytes is not None and size > max_bytes:
        raise MalformedUpdateError("too-large", f"payload of {size} bytes exceeds cap {max_bytes}")
    version, total = peek_header(payload)
    if version != FORMAT_VERSION:
        raise MalformedUpdateError(
            "unknown-version", f"format version {version}; this decoder reads {FORMAT_VERSION}"
        )
    if size < total:
        raise MalformedUpdateError("truncated", f"payload has {size} of its {total} bytes")
    if size > total:
        raise MalformedUpdateError("malformed", f"{size - total} bytes after the payload's end")
    if total < _FIXED_HEADER.size + _CRC.size:
        raise MalformedUpdateError("truncated", f"declared length {total} is below the minimum")
    (crc,) = _CRC.unpack_from(payload, total - _CRC.size)
    if crc32(memoryview(payload)[: total - _CRC.size]) != crc:
        raise MalformedUpdateError("checksum", "CRC-32 does not match the payload")
    reader = _Reader(memoryview(payload), _FIXED_HEADER.size, total - _CRC.size)
    round_no = reader.varint()
    sparsifier_code, value_code = reader.u8(), reader.u8()
    if sparsifier_code >= len(SPARSIFIERS) or value_code >= len(VALUE_CODINGS):
        raise MalformedUpdateError(
            "unknown-encoding", f"sparsifier code {sparsifier_code}, value code {value_code}"
        )
    coding = VALUE_CODINGS[value_code]
    chunk = reader.varint()
    ref_layout = None
    if reference is not None:
        ref_layout = reference if isinstance(reference, list) else layout_of(reference)
    layout = _read_layout(reader, None if ref_layout is None else len(ref_layout))
    index_mode = reader.u8()
    if index_mode not in _INDEX_MODE_NAMES:
        raise MalformedUpdateError("unknown-encoding", f"index mode {index_mode}")
    count = reader.varint()
    if expected_round is not None and round_no != expected_round:
        raise MalformedUpdateError(
            "wrong-round", f"update for round {round_no}, expected {expected_round}"
        )
    if ref_layout is not None:
        check_layout(layout, ref_layout)
    n = layout_size(layout)
    if ref_layout is None and n > max_elements:
        raise MalformedUpdateError(
            "too-large", f"layout of {n} values exceeds {max_elements} (no reference layout)"
        )
    if count > n:
        raise MalformedUpdateError("malformed", f"{count} values for {n} parameters")
    if coding in _LEVELS and chunk < 1:
        raise MalformedUpdateError("malformed", f"chunk size {chunk} for {coding}")
    seed = None
    if index_mode == INDEX_ALL:
        if count != n:
            raise MalformedUpdateError("malformed", f"dense update with {count} of {n} values")
        support = None
    elif index_mode == INDEX_VARINT:
        support = _read_varint_support(reader, count, n)
    elif index_mode == INDEX_BITMAP:
        support = _read_bitmap_support(reader, count, n)
    else:
        (seed,) = struct.unpack("<Q", reader.take(8))
        if expected_seed is not None and seed != expected_seed & 0xFFFFFFFFFFFFFFFF:
            raise MalformedUpdateError(
                "wrong-seed", f"random-k seed {seed} is not this round's shared seed"
            )
        _need_value_bytes(reader, count, coding, chunk)  # before generating n keys
        support = np.ones(n, dtype=np.bool_) if count >= n else _random_k_support(seed, n, count)
    values = _read_values(reader, count, coding, chunk)
    if reader.pos != reader.end:
        raise MalformedUpdateError("malformed", f"{reader.end - reader.pos} unread bytes")
    spec = CompressionSpec(
        SPARSIFIERS[sparsifier_code],
        count / n if n else 1.0,
        coding,
        chunk if coding in _LEVELS else DEFAULT_CHUNK,
    )
    delta = LazyDelta(layout, values, support)
    overflow = delta.check_range()
    if overflow is not None:
        raise MalformedUpdateError("non-finite", f"{overflow}: values overflow its dtype")
    mask = None
    if support is not None:
        mask, offset = {}, 0
        for info in layout:
            mask[info.name] = torch.from_numpy(support[offset : offset + info.numel])
            mask[info.name] = mask[info.name].reshape(info.shape)
            offset += info.numel
    return DecodedUpdate(
        round_no,
        delta,
        spec,
        count,
        _INDEX_MODE_NAMES[index_mode],
        size,
        seed,
        mask,
    )


def _read_layout(reader: _Reader, expected_tensors: int | None) -> list[TensorInfo]:
    n_tensors = reader.varint()
    if expected_tensors is not None and n_tensors != expected_tensors:
        raise MalformedUpdateError(
            "wrong-tensors", f"{n_tensors} tensors, the base release has {expected_tensors}"
        )
    if n_tensors > (reader.end - reader.pos) // 3:  # name length, dtype, ndim: >= 3 bytes
        raise MalformedUpdateError("malformed", f"{n_tensors} tensors cannot fit the payload")
    layout = []
    for _ in range(n_tensors):
        name_len = reader.varint()
        try:
            name = bytes(reader.take(name_len)).decode()
        except UnicodeDecodeError:
            raise MalformedUpdateError("malformed", "tensor name is not UTF-8") from None
        dtype_code, ndim = reader.u8(), reader.u8()
        if dtype_code >= len(_DTYPES):
            raise MalformedUpdateError("unknown-encoding", f"{name}: dtype code {dtype_code}")
        shape = tuple(reader.varint() for _ in range(ndim))
        layout.append(TensorInfo(name, shape, _DTYPES[dtype_code]))
    return layout


def check_layout(layout: list[TensorInfo], reference: list[TensorInfo]) -> None:
    """Raise ``wrong-tensors`` / ``wrong-shape`` / ``wrong-dtype`` unless layouts match."""
    got = {t.name: t for t in layout}
    want = {t.name: t for t in reference}
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    if missing or extra or len(got) != len(layout):
        raise MalformedUpdateError(
            "wrong-tensors",
            f"missing {missing[:5]}, unexpected {extra[:5]} for the base release"
            + (" (duplicated tensor names)" if len(got) != len(layout) else ""),
        )
    for info in layout:
        ref = want[info.name]
        if info.shape != ref.shape:
            raise MalformedUpdateError(
                "wrong-shape", f"{info.name}: shape {info.shape}, base release has {ref.shape}"
            )
        if info.dtype != ref.dtype:
            raise MalformedUpdateError(
                "wrong-dtype", f"{info.name}: dtype {info.dtype}, base release has {ref.dtype}"
            )


_INDEX_ERRORS = {
    kernels.MID_NUMBER: ("malformed", "index varints end mid-number"),
    kernels.TOO_LONG: ("malformed", "index varint longer than 63 bits"),
    kernels.COUNT: ("malformed", "the index section does not hold one index per value"),
    kernels.OUT_OF_RANGE: ("index-out-of-range", "an index lies outside the parameters"),
    kernels.DUPLICATE: ("duplicate-index", "an index is sent twice"),
}


def _index_status(status: int) -> None:
    if status != kernels.OK:
        raise MalformedUpdateError(*_INDEX_ERRORS[status])


def _read_varint_support(reader: _Reader, count: int, n: int) -> np.ndarray:
    nbytes = reader.varint()
    data = np.frombuffer(reader.take(nbytes), dtype=np.uint8)
    support = np.zeros(n, dtype=np.bool_)
    _index_status(kernels.varint_support(data, n, count, support))
    return support


def _read_bitmap_support(reader: _Reader, count: int, n: int) -> np.ndarray:
    bits = np.frombuffer(reader.take((n + 7) // 8), dtype=np.uint8)
    support = np.zeros(n, dtype=np.bool_)
    _index_status(kernels.bitmap_support(bits, n, count, support))
    return support


def _value_bytes(count: int, coding: str, chunk: int) -> int:
    if coding == "fp32":
        return 4 * count
    if coding in ("fp16", "bf16"):
        return 2 * count
    scales = 4 * (-(-count // chunk))
    return scales + (count if coding == "int8" else (count + 1) // 2)


def _need_value_bytes(reader: _Reader, count: int, coding: str, chunk: int) -> None:
    need = _value_bytes(count, coding, chunk)
    if need > reader.end - reader.pos:
        raise MalformedUpdateError("malformed", f"{count} {coding} values need {need} bytes")


def _read_values(reader: _Reader, count: int, coding: str, chunk: int) -> EncodedValues:
    """Views of the value section, validated (finite, codes in range)."""
    _need_value_bytes(reader, count, coding, chunk)
    if coding == "fp32":
        data = np.frombuffer(reader.take(4 * count), dtype=np.float32)
        _check_finite(data.view(np.int32), np.int32(0x7F800000))
        return EncodedValues("fp32", count, data)
    if coding in ("fp16", "bf16"):
        data = np.frombuffer(reader.take(2 * count), dtype=np.uint16)
        _check_finite(data, np.uint16(0x7C00 if coding == "fp16" else 0x7F80))
        return EncodedValues(coding, count, data)
    n_chunks = -(-count // chunk)
    scales = np.frombuffer(reader.take(4 * n_chunks), dtype=np.float32)
    if not kernels.all_finite_bits(scales.view(np.int32), np.int32(0x7F800000)):
        raise MalformedUpdateError("non-finite", "a quantization scale is NaN or Inf")
    if n_chunks and np.signbit(scales).any():
        raise MalformedUpdateError("malformed", "a quantization scale is negative")
    levels = _LEVELS[coding]
    if coding == "int8":
        codes = np.frombuffer(reader.take(count), dtype=np.int8)
        if not kernels.int8_codes_ok(codes):
            raise MalformedUpdateError("malformed", "int8 code -128 is outside [-127, 127]")
    else:
        codes = np.frombuffer(reader.take((count + 1) // 2), dtype=np.uint8)
        if not kernels.int4_codes_ok(codes, count):
            raise MalformedUpdateError(
                "malformed", "int4 code -8 is outside [-7, 7], or the padding nibble is not 0"
            )
    return EncodedValues(coding, count, codes, scales, min(chunk, max(count, 1)), levels)


def _check_finite(bits: np.ndarray, exponent: Any) -> None:
    if not kernels.all_finite_bits(bits, exponent):
        raise MalformedUpdateError("non-finite", "update values contain NaN or Inf")


def dense_fp32_bytes(tensors: Mapping[str, torch.Tensor] | list[TensorInfo]) -> int:
    """Bytes of the same update as raw dense fp32 (the baseline of every ratio)."""
    layout = tensors if isinstance(tensors, list) else layout_of(tensors)
    return 4 * layout_size(layout)
