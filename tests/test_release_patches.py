"""Sparse patches between releases: bit-exact round trips, sizes, refusals; ``diff``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fedcommons.errors import PatchBaseMismatchError, PatchError
from fedcommons.releases.patches import (
    apply_patch,
    decode_varints,
    diff_weights,
    encode_varints,
    make_patch,
    sha256_hex,
)
from fedcommons.tasks.digits import DigitsTask


def _demo_weights() -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in DigitsTask().build_model().state_dict().items()}


def _perturb(w: dict[str, torch.Tensor], fraction: float, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for v in w.values():
        flat = v.view(-1)
        n = max(1, int(fraction * flat.numel()))
        flat[torch.randperm(flat.numel(), generator=g)[:n]] += 0.01


def test_sparse_patch_reproduces_target_bit_for_bit() -> None:
    a = _demo_weights()
    b = {k: v.clone() for k, v in a.items()}
    _perturb(b, 0.01)
    a_bytes, b_bytes = st_save(a), st_save(b)
    patch = make_patch(a_bytes, b_bytes)
    assert apply_patch(a_bytes, patch.data) == b_bytes
    assert patch.full_tensors == []


def test_patch_for_one_percent_change_is_at_most_three_percent_of_the_release() -> None:
    a = _demo_weights()
    b = {k: v.clone() for k, v in a.items()}
    _perturb(b, 0.01)
    b_bytes = st_save(b)
    patch = make_patch(st_save(a), b_bytes)
    assert patch.changed_entries <= 0.01 * sum(v.numel() for v in a.values()) + 4
    assert patch.size <= 0.03 * len(b_bytes)


def test_patch_handles_added_removed_retyped_and_special_values() -> None:
    a = _demo_weights()
    b = {k: v.clone() for k, v in a.items()}
    b["net.0.bias"][0] = float("nan")
    b["net.0.bias"][1] = -0.0 if a["net.0.bias"][1] == 0 else -a["net.0.bias"][1]
    b["head.weight"] = torch.ones(2, 3, dtype=torch.bfloat16)  # added
    b["net.2.bias"] = b["net.2.bias"].double()  # re-typed
    del b["net.2.weight"]  # removed
    b["counter"] = torch.tensor([1, 2, 3], dtype=torch.int64)
    a["counter"] = torch.tensor([1, 2, 4], dtype=torch.int64)
    a_bytes, b_bytes = st_save(a), st_save(b)
    patch = make_patch(a_bytes, b_bytes)
    assert apply_patch(a_bytes, patch.data) == b_bytes
    assert patch.removed == ["net.2.weight"]
    assert set(patch.full_tensors) >= {"head.weight", "net.2.bias"}


def test_negative_zero_counts_as_a_change() -> None:
    a = {"x": torch.zeros(8)}
    b = {"x": torch.zeros(8)}
    b["x"][3] = -0.0
    a_bytes, b_bytes = st_save(a), st_save(b)
    patch = make_patch(a_bytes, b_bytes)
    assert patch.changed_entries == 1
    assert apply_patch(a_bytes, patch.data) == b_bytes


def test_dense_change_stores_tensors_whole() -> None:
    a = _demo_weights()
    b = {k: v + 1 for k, v in a.items()}
    patch = make_patch(st_save(a), st_save(b))
    assert sorted(patch.full_tensors) == sorted(a)
    assert apply_patch(st_save(a), patch.data) == st_save(b)


def test_patch_on_the_wrong_base_is_refused_with_both_hashes() -> None:
    """Input: a patch made from A applied to C."""
    a = _demo_weights()
    b = {k: v.clone() for k, v in a.items()}
    _perturb(b, 0.01)
    c = {k: v * 2 for k, v in a.items()}
    a_bytes, c_bytes = st_save(a), st_save(c)
    patch = make_patch(a_bytes, st_save(b))
    with pytest.raises(PatchBaseMismatchError) as err:
        apply_patch(c_bytes, patch.data)
    assert sha256_hex(a_bytes) in str(err.value) and sha256_hex(c_bytes) in str(err.value)


def test_truncated_or_foreign_patch_is_refused() -> None:
    """Input: a patch cut in half; a plain weights file passed as a patch."""
    a = _demo_weights()
    b = {k: v.clone() for k, v in a.items()}
    _perturb(b, 0.01)
    a_bytes = st_save(a)
    patch = make_patch(a_bytes, st_save(b)).data
    with pytest.raises(PatchError):
        apply_patch(a_bytes, patch[: len(patch) // 2])
    with pytest.raises(PatchError, match="not a fedcommons-patch/1 file"):
        apply_patch(a_bytes, a_bytes)


def test_tampered_patch_values_fail_the_target_hash() -> None:
    """Input: a patch whose last value byte was flipped."""
    a = _demo_weights()
    b = {k: v.clone() for k, v in a.items()}
    _perturb(b, 0.01)
    a_bytes = st_save(a)
    patch = bytearray(make_patch(a_bytes, st_save(b)).data)
    patch[-1] ^= 0x40
    with pytest.raises(PatchError, match="the patch promised"):
        apply_patch(a_bytes, bytes(patch))


def test_varints_round_trip_large_and_small_gaps() -> None:
    values = np.array([0, 1, 127, 128, 16383, 16384, 2**31, 2**40], dtype=np.int64)
    assert np.array_equal(decode_varints(encode_varints(values)), values)
    assert len(encode_varints(np.array([5, 100]))) == 2


def test_diff_reports_changed_fraction_and_norms() -> None:
    a = _demo_weights()
    b = {k: v.clone() for k, v in a.items()}
    b["net.0.bias"][:4] += 1.0
    b["extra"] = torch.zeros(3)
    d = diff_weights(a, b)
    by_name = {t.name: t for t in d.tensors}
    assert by_name["net.0.bias"].changed == 4
    assert by_name["net.0.bias"].norm_diff == pytest.approx(2.0)
    assert by_name["net.2.weight"].status == "unchanged"
    assert d.added == ["extra"] and d.changed_entries == 4
    assert d.changed_fraction == pytest.approx(4 / sum(v.numel() for v in a.values()))
    assert st_load(st_save(b)).keys() == b.keys()
