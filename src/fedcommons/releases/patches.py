"""Differences between two sets of weights: ``diff`` reports, sparse patches, ``apply``.

A patch turns release A's weights file into release B's, bit for bit. It is itself a
safetensors file (readable with any safetensors tool):

- ``__metadata__``: ``format`` (``fedcommons-patch/1``) and, when not empty, ``removed``
  and ``full`` (JSON lists of tensor names);
- ``sha256``: 64 bytes, the SHA-256 of A's weights file then that of B's (raw bytes
  rather than hex metadata: for a small model the header is a visible part of the patch);
- ``full/<name>``: tensors stored whole (new in B, reshaped, re-typed, or so densely
  changed that whole is smaller);
- ``<dtype>.gaps`` / ``<dtype>.values``: every other tensor that changed, grouped by
  dtype. The group's tensors (the names A and B share with equal shape and dtype, not in
  ``full``, sorted) are read as one flat vector; ``gaps`` holds the gaps between the
  changed positions as LEB128 varints (one byte for a gap below 128), ``values`` the new
  entries themselves, so they are restored bit for bit.

Entries are compared bitwise (``-0.0`` vs ``0.0`` and NaN payloads count as changes),
so applying a patch reproduces B exactly; :func:`apply_patch` checks the SHA-256 of the
result against ``target`` before anything is written.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fedcommons.errors import PatchBaseMismatchError, PatchError

PATCH_FORMAT = "fedcommons-patch/1"
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def sha256_hex(data: bytes) -> str:
    """SHA-256 of ``data``, hex."""
    return hashlib.sha256(data).hexdigest()


def changed_mask(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Flat boolean mask of the entries whose bits differ (same shape and dtype)."""
    a, b = a.detach().reshape(-1).contiguous(), b.detach().reshape(-1).contiguous()
    size = a.element_size()
    if size in _INT_VIEW and a.dtype != torch.bool:
        return a.view(_INT_VIEW[size]) != b.view(_INT_VIEW[size])
    if a.dtype == torch.bool:
        return a != b
    return (a.view(torch.uint8).reshape(-1, size) != b.view(torch.uint8).reshape(-1, size)).any(1)


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype


# -- diff ---------------------------------------------------------------------------------
@dataclass
class TensorDiff:
    """How one tensor differs between A and B."""

    name: str
    status: str  # unchanged | changed | added | removed | reshaped
    shape_a: list[int] | None
    shape_b: list[int] | None
    dtype: str
    entries: int
    changed: int
    fraction: float
    norm_a: float
    norm_diff: float
    relative_norm: float
    max_abs: float


@dataclass
class WeightsDiff:
    """Every tensor's difference plus totals over the tensors A and B share."""

    tensors: list[TensorDiff]
    added: list[str]
    removed: list[str]
    reshaped: list[str]
    shared_entries: int
    changed_entries: int

    @property
    def changed_fraction(self) -> float:
        """Fraction of the shared entries that changed (1.0 when nothing is shared)."""
        return self.changed_entries / self.shared_entries if self.shared_entries else 1.0

    def to_dict(self) -> dict:
        """JSON-friendly form."""
        doc = asdict(self)
        doc["changed_fraction"] = self.changed_fraction
        return doc


def _norm(t: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(t.double().reshape(-1))) if t.numel() else 0.0


def diff_weights(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> WeightsDiff:
    """Compare two state dicts tensor by tensor (bitwise for the change counts)."""
    tensors: list[TensorDiff] = []
    added, removed, reshaped = [], [], []
    shared = changed_total = 0
    for name in sorted(set(a) | set(b)):
        ta, tb = a.get(name), b.get(name)
        if ta is None or tb is None:
            t = tb if ta is None else ta
            assert t is not None
            status = "added" if ta is None else "removed"
            (added if ta is None else removed).append(name)
            tensors.append(
                TensorDiff(
                    name,
                    status,
                    None if ta is None else list(ta.shape),
                    None if tb is None else list(tb.shape),
                    str(t.dtype).removeprefix("torch."),
                    t.numel(),
                    t.numel(),
                    1.0,
                    _norm(ta) if ta is not None else 0.0,
                    _norm(t),
                    math.inf if ta is None else 1.0,
                    float(t.double().abs().max()) if t.numel() else 0.0,
                )
            )
            continue
        if not _same_layout(ta, tb):
            reshaped.append(name)
            tensors.append(
                TensorDiff(
                    name,
                    "reshaped",
                    list(ta.shape),
                    list(tb.shape),
                    f"{str(ta.dtype).removeprefix('torch.')}->{str(tb.dtype).removeprefix('torch.')}",
                    tb.numel(),
                    tb.numel(),
                    1.0,
                    _norm(ta),
                    math.nan,
                    math.nan,
                    math.nan,
                )
            )
            continue
        mask = changed_mask(ta, tb)
        n_changed = int(mask.sum())
        shared += ta.numel()
        changed_total += n_changed
        delta = tb.double() - ta.double()
        norm_a = _norm(ta)
        norm_d = _norm(delta)
        tensors.append(
            TensorDiff(
                name,
                "changed" if n_changed else "unchanged",
                list(ta.shape),
                list(tb.shape),
                str(ta.dtype).removeprefix("torch."),
                ta.numel(),
                n_changed,
                n_changed / ta.numel() if ta.numel() else 0.0,
                norm_a,
                norm_d,
                norm_d / norm_a if norm_a else (0.0 if norm_d == 0 else math.inf),
                float(delta.abs().max()) if ta.numel() else 0.0,
            )
        )
    return WeightsDiff(tensors, added, removed, reshaped, shared, changed_total)


# -- varints ------------------------------------------------------------------------------
def encode_varints(values: np.ndarray) -> np.ndarray:
    """LEB128-encode non-negative integers (vectorised)."""
    v = values.astype(np.uint64)
    nbytes = np.ones(len(v), dtype=np.int64)
    rest = v >> np.uint64(7)
    while rest.any():
        nbytes += rest > 0
        rest >>= np.uint64(7)
    starts = np.cumsum(nbytes) - nbytes
    out = np.empty(int(nbytes.sum()), dtype=np.uint8)
    for j in range(int(nbytes.max(initial=0))):
        m = nbytes > j
        byte = (v[m] >> np.uint64(7 * j)) & np.uint64(0x7F)
        cont = (nbytes[m] > j + 1).astype(np.uint64) << np.uint64(7)
        out[starts[m] + j] = (byte | cont).astype(np.uint8)
    return out


def decode_varints(data: np.ndarray) -> np.ndarray:
    """Inverse of :func:`encode_varints`; raises :class:`PatchError` on a cut-off stream."""
    b = data.astype(np.uint8)
    if len(b) == 0:
        return np.zeros(0, dtype=np.int64)
    ends = (b & 0x80) == 0
    if not ends[-1]:
        raise PatchError("patch index stream is truncated (last varint unterminated)")
    end_idx = np.flatnonzero(ends)
    group = np.concatenate([[0], np.cumsum(ends)[:-1]])
    group_start = np.concatenate([[0], end_idx[:-1] + 1])
    pos = np.arange(len(b)) - group_start[group]
    if pos.max() > 8:
        raise PatchError("patch index stream holds a varint longer than 63 bits")
    parts = (b & 0x7F).astype(np.float64) * np.exp2(7.0 * pos)
    values = np.bincount(group, weights=parts, minlength=len(end_idx))
    if values.max(initial=0) >= 2**53:
        raise PatchError("patch index out of range")
    return values.astype(np.int64)


# -- patches ------------------------------------------------------------------------------
def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _sparse_groups(
    base: Mapping[str, torch.Tensor], target_layout: Mapping[str, torch.Tensor], full: set[str]
) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for name in sorted(set(base) & set(target_layout)):
        if name in full or not _same_layout(base[name], target_layout[name]):
            continue
        groups.setdefault(_dtype_name(base[name].dtype), []).append(name)
    return groups


@dataclass(frozen=True)
class PatchInfo:
    """What :func:`make_patch` produced."""

    data: bytes
    base_sha256: str
    target_sha256: str
    changed_entries: int
    full_tensors: list[str]
    removed: list[str]

    @property
    def size(self) -> int:
        """Patch size in bytes."""
        return len(self.data)


def make_patch(base_bytes: bytes, target_bytes: bytes) -> PatchInfo:
    """A patch that turns the safetensors file ``base_bytes`` into ``target_bytes``."""
    base, target = _load(base_bytes, "base weights"), _load(target_bytes, "target weights")
    removed = sorted(set(base) - set(target))
    full: set[str] = {n for n in target if n not in base or not _same_layout(base[n], target[n])}
    masks: dict[str, torch.Tensor] = {}
    for name in sorted(set(base) & set(target)):
        if name in full:
            continue
        mask = changed_mask(base[name], target[name])
        nnz = int(mask.sum())
        size = target[name].element_size()
        # sparse costs ~(size + 1.3) bytes per changed entry; whole costs size per entry
        if nnz and nnz * (size + 1.5) >= target[name].numel() * size:
            full.add(name)
        else:
            masks[name] = mask
    tensors: dict[str, torch.Tensor] = {f"full/{n}": target[n].contiguous() for n in full}
    changed = sum(target[n].numel() for n in full if n in base)
    for dtype, names in _sparse_groups(base, target, full).items():
        mask = torch.cat([masks[n] for n in names])
        idx = torch.nonzero(mask).reshape(-1)
        if idx.numel() == 0:
            continue
        changed += idx.numel()
        values = torch.cat([target[n].reshape(-1) for n in names])[idx].contiguous()
        gaps = np.diff(idx.numpy(), prepend=-1) - 1
        tensors[f"{dtype}.gaps"] = torch.from_numpy(encode_varints(gaps))
        tensors[f"{dtype}.values"] = values
    base_sha, target_sha = sha256_hex(base_bytes), sha256_hex(target_bytes)
    hashes = bytes.fromhex(base_sha) + bytes.fromhex(target_sha)
    tensors["sha256"] = torch.frombuffer(bytearray(hashes), dtype=torch.uint8)
    meta = {"format": PATCH_FORMAT}
    if removed:
        meta["removed"] = json.dumps(removed)
    if full:
        meta["full"] = json.dumps(sorted(full))
    data = st_save(tensors, metadata=meta)
    return PatchInfo(data, base_sha, target_sha, changed, sorted(full), removed)


def _load(data: bytes, what: str) -> dict[str, torch.Tensor]:
    try:
        return st_load(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise PatchError(f"{what} is not a safetensors file: {exc}") from exc


def read_patch_header(patch_bytes: bytes) -> dict[str, str]:
    """The patch's metadata (format, base, target, removed, full)."""
    if len(patch_bytes) < 8:
        raise PatchError("patch file is too short to be safetensors")
    n = int.from_bytes(patch_bytes[:8], "little")
    try:
        header = json.loads(patch_bytes[8 : 8 + n])
    except (ValueError, UnicodeDecodeError) as exc:
        raise PatchError(f"patch header is not valid JSON: {exc}") from exc
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != PATCH_FORMAT:
        raise PatchError(f"not a {PATCH_FORMAT} file (no matching format in its metadata)")
    sha = header.get("sha256")
    if not isinstance(sha, dict) or sha.get("dtype") != "U8" or sha.get("shape") != [64]:
        raise PatchError("patch lacks its 64-byte 'sha256' tensor (base and target hashes)")
    start, end = sha["data_offsets"]
    raw = patch_bytes[8 + n + start : 8 + n + end]
    if len(raw) != 64:
        raise PatchError("patch is truncated (hashes cut off)")
    return {
        "format": meta["format"],
        "base": raw[:32].hex(),
        "target": raw[32:].hex(),
        "removed": meta.get("removed", "[]"),
        "full": meta.get("full", "[]"),
    }


def apply_patch(base_bytes: bytes, patch_bytes: bytes) -> bytes:
    """Apply a patch to ``base_bytes``; return the target file's exact bytes.

    Raises :class:`PatchBaseMismatchError` (both hashes shown) when ``base_bytes`` is not
    the patch's base, and :class:`PatchError` when the patch is malformed or the result
    does not hash to the patch's target.
    """
    meta = read_patch_header(patch_bytes)
    base_sha = sha256_hex(base_bytes)
    if base_sha != meta["base"]:
        raise PatchBaseMismatchError(
            f"patch was made for base sha256 {meta['base']}, "
            f"but the weights given have sha256 {base_sha}"
        )
    patch = _load(patch_bytes, "patch")
    base = _load(base_bytes, "base weights")
    try:
        removed = set(json.loads(meta["removed"]))
        full = set(json.loads(meta["full"]))
    except ValueError as exc:
        raise PatchError(f"patch metadata is not valid JSON: {exc}") from exc
    result = {n: t for n, t in base.items() if n not in removed}
    for name in full:
        tensor = patch.get(f"full/{name}")
        if tensor is None:
            raise PatchError(f"patch lists {name!r} as stored whole but does not hold it")
        result[name] = tensor
    for dtype, names in _sparse_groups(base, result, full).items():
        gaps, values = patch.get(f"{dtype}.gaps"), patch.get(f"{dtype}.values")
        if gaps is None and values is None:
            continue
        if gaps is None or values is None:
            raise PatchError(f"patch group {dtype!r} lacks its gaps or values")
        idx = np.cumsum(decode_varints(gaps.numpy()) + 1) - 1
        flat = torch.cat([result[n].reshape(-1) for n in names])
        if len(idx) != values.numel() or (len(idx) and idx[-1] >= flat.numel()):
            raise PatchError(f"patch group {dtype!r} indexes outside the base tensors")
        flat[torch.from_numpy(idx)] = values
        offset = 0
        for n in names:
            count = result[n].numel()
            result[n] = flat[offset : offset + count].reshape(result[n].shape).clone()
            offset += count
    out = st_save(result)
    if sha256_hex(out) != meta["target"]:
        raise PatchError(
            f"patched weights hash to {sha256_hex(out)}, the patch promised {meta['target']}"
        )
    return out
