"""The encoded-update codec (fedcommons.wire.codec): formats, encoders, decoder checks."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import torch

from fedcommons.errors import CompressionSpecError, MalformedUpdateError
from fedcommons.wire.codec import (
    FORMAT_VERSION,
    INDEX_VARINT,
    CompressionSpec,
    decode_update,
    decode_varints,
    encode_update,
    encode_varints,
    flatten,
    layout_of,
    pack_payload,
    random_k_indices,
    topk_indices,
)


def make_delta(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "net.0.weight": torch.randn(64, 64, generator=g),
        "net.0.bias": torch.randn(64, generator=g),
        "net.2.weight": torch.randn(10, 64, generator=g),
        "net.2.bias": torch.randn(10, generator=g),
    }


SPECS = [
    "dense",
    "dense:fp16",
    "dense:bf16",
    "int8",
    "int4",
    "int8:64",
    "topk:0.01",
    "topk:0.1",
    "topk-tensor:0.05",
    "topk:0.01+int8",
    "topk:0.02+int4",
    "topk:0.6+fp16",
    "randk:0.05",
    "randk:0.05+int8",
]


@pytest.mark.parametrize("spec", SPECS)
def test_decoder_reads_back_exactly_what_the_encoder_reconstructs(spec: str) -> None:
    delta = make_delta()
    enc = encode_update(
        delta, spec, round_no=7, rng=np.random.default_rng(1), shared_seed=99, reconstruct=True
    )
    dec = decode_update(enc.payload, delta, expected_round=7, expected_seed=99)
    assert dec.round_no == 7
    assert dec.nbytes == len(enc.payload)
    assert {k: tuple(v.shape) for k, v in dec.delta.items()} == {
        k: tuple(v.shape) for k, v in delta.items()
    }
    np.testing.assert_array_equal(flatten(dec.delta), enc.reconstruction)


def test_dense_fp32_round_trip_is_lossless() -> None:
    delta = make_delta()
    dec = decode_update(encode_update(delta, "dense", round_no=1).payload, delta)
    for name, value in delta.items():
        assert torch.equal(dec.delta[name], value)


@pytest.mark.parametrize("coding", ["int8", "int4"])
def test_stochastic_rounding_is_unbiased(coding: str) -> None:
    # One large value fixes the chunk scale; the others sit between quantization levels.
    values = np.full(4096, 0.3, dtype=np.float32)
    values[::256] = 1.0
    delta = {"w": torch.from_numpy(values)}
    rng = np.random.default_rng(0)
    decoded = [
        flatten(decode_update(encode_update(delta, coding, round_no=0, rng=rng).payload).delta)
        for _ in range(200)
    ]
    mean = np.mean(decoded, axis=0)
    levels = 127 if coding == "int8" else 7
    # Each decode is within one quantum; the mean of 200 is far closer (unbiased).
    assert np.abs(decoded[0] - values).max() <= 1.0 / levels + 1e-6
    assert abs(float(mean[values == 0.3].mean()) - 0.3) < 2e-3


def test_topk_global_keeps_the_largest_magnitudes_over_all_tensors() -> None:
    delta = make_delta()
    delta["net.2.bias"] = torch.full((10,), 100.0)
    enc = encode_update(delta, "topk:0.01", round_no=0, reconstruct=True)
    flat = flatten(delta)
    k = round(0.01 * flat.size)
    expected = np.sort(np.argsort(-np.abs(flat), kind="stable")[:k])
    assert np.array_equal(np.flatnonzero(enc.reconstruction), expected)
    assert enc.reconstruction[-10:].tolist() == [100.0] * 10


def test_topk_per_tensor_keeps_a_share_of_every_tensor() -> None:
    delta = make_delta()
    delta["net.2.bias"] = torch.full((10,), 100.0)
    rec = encode_update(delta, "topk-tensor:0.1", round_no=0, reconstruct=True).reconstruction
    dec = decode_update(encode_update(delta, "topk-tensor:0.1", round_no=0).payload).delta
    for name, value in delta.items():
        kept = int((dec[name] != 0).sum())
        assert kept == max(1, round(0.1 * value.numel())), name
    assert rec is not None and np.count_nonzero(rec) == sum(
        max(1, round(0.1 * v.numel())) for v in delta.values()
    )


def test_randk_sends_a_seed_not_indices() -> None:
    delta = make_delta()
    enc = encode_update(delta, "randk:0.05", round_no=0, shared_seed=1234, reconstruct=True)
    n = flatten(delta).size
    k = round(0.05 * n)
    assert enc.index_mode == "seed"
    assert len(enc.payload) < 4 * k + 200  # values + header, no index section
    expected = random_k_indices(1234, n, k)
    assert np.array_equal(np.flatnonzero(enc.reconstruction), expected)
    other = encode_update(make_delta(1), "randk:0.05", round_no=0, shared_seed=1234)
    assert np.array_equal(
        np.flatnonzero(flatten(decode_update(other.payload).delta)), expected
    )  # every client of the round sends the same coordinates


def test_random_k_indices_are_stable_for_a_seed() -> None:
    first = random_k_indices(42, 10_000, 100)
    assert np.array_equal(first, random_k_indices(42, 10_000, 100))
    assert len(np.unique(first)) == 100 and first.max() < 10_000
    assert not np.array_equal(first, random_k_indices(43, 10_000, 100))


def test_index_coding_uses_varints_when_sparse_and_a_bitmap_when_dense() -> None:
    delta = make_delta()
    sparse = encode_update(delta, "topk:0.01", round_no=0)
    dense_ish = encode_update(delta, "topk:0.5", round_no=0)
    n = flatten(delta).size
    assert sparse.index_mode == "varint"
    assert dense_ish.index_mode == "bitmap"
    # The bitmap costs n/8 bytes; the chosen coding never costs more.
    assert len(dense_ish.payload) <= 4 * dense_ish.num_values + (n + 7) // 8 + 200


def test_varints_round_trip_large_values() -> None:
    values = np.array([0, 1, 127, 128, 16383, 16384, 2**35, 2**62], dtype=np.uint64)
    assert np.array_equal(decode_varints(encode_varints(values)), values)


def test_topk_indices_break_ties_by_position() -> None:
    values = np.array([1.0, -3.0, 3.0, 0.0, 3.0], dtype=np.float32)
    assert topk_indices(values, 2).tolist() == [1, 2]


def test_int8_top1_percent_payload_is_about_a_hundred_times_smaller() -> None:
    delta = make_delta()  # the 4,810-parameter demo MLP's layout
    enc = encode_update(delta, "topk:0.01+int8", round_no=1)
    assert 4 * flatten(delta).size / len(enc.payload) > 60


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("dense", "dense"),
        ("dense:fp32", "dense"),
        ("DENSE:FP16", "dense:fp16"),
        ("topk:0.01+int8", "topk:0.01+int8"),
        ("fish:0.02:128+int4", "fish:0.02:128+int4"),
        ("int8:256", "int8"),
        ("randk:0.05", "randk:0.05"),
        ("topk:0.1+bf16", "topk:0.1+bf16"),
    ],
)
def test_spec_parses_to_a_canonical_form(text: str, canonical: str) -> None:
    assert str(CompressionSpec.parse(text)) == canonical
    assert CompressionSpec.parse(canonical) == CompressionSpec.parse(text)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "zip",
        "topk",
        "topk:0",
        "topk:1.5",
        "topk:x",
        "int8+topk:0.1",
        "int8+int4",
        "topk:0.1+randk:0.1",
        "int8:0",
        "topk:0.1+dense",
        "fish:0.1:0",
    ],
)
def test_bad_spec_is_a_typed_config_error(text: str) -> None:
    """Input: malformed compression specs (empty, unknown stage, missing or out-of-range
    fraction, quantize-before-sparsify, two codings, zero chunk, zero FISH examples)."""
    with pytest.raises(CompressionSpecError):
        CompressionSpec.parse(text)


# -- bad input: one test per rejection reason ----------------------------------------------
def reseal(payload: bytes) -> bytes:
    """Recompute the CRC after tampering (a malicious client can do that too)."""
    body = payload[:-4]
    return body + struct.pack("<I", zlib.crc32(body))


def sparse_payload(delta: dict[str, torch.Tensor], gaps: list[int], **kw: object) -> bytes:
    from fedcommons.wire.codec import _varint

    coded = encode_varints(np.array(gaps, dtype=np.uint64))
    values = np.ones(len(gaps), dtype=np.float32).tobytes()
    args: dict = dict(
        round_no=1,
        sparsifier=1,
        value_coding=0,
        chunk=0,
        index_mode=INDEX_VARINT,
        count=len(gaps),
        index_bytes=_varint(len(coded)) + coded,
        value_bytes=values,
    )
    args.update(kw)
    return pack_payload(layout_of(delta), **args)


def reason_of(payload: bytes, reference: dict[str, torch.Tensor], **kw: object) -> str:
    with pytest.raises(MalformedUpdateError) as info:
        decode_update(payload, reference, **kw)  # type: ignore[arg-type]
    return info.value.reason


def test_rejects_wrong_tensor_names() -> None:
    """Input: an update whose tensor is named 'net.9.weight' instead of 'net.2.weight'."""
    delta = make_delta()
    renamed = {("net.9.weight" if k == "net.2.weight" else k): v for k, v in delta.items()}
    assert reason_of(encode_update(renamed, "int8", round_no=1).payload, delta) == "wrong-tensors"


def test_rejects_wrong_shapes() -> None:
    """Input: an update whose first weight is 32x128 where the base release has 64x64."""
    delta = make_delta()
    reshaped = dict(delta, **{"net.0.weight": delta["net.0.weight"].reshape(32, 128)})
    assert reason_of(encode_update(reshaped, "int8", round_no=1).payload, delta) == "wrong-shape"


def test_rejects_unknown_format_version() -> None:
    """Input: a well-sealed payload that declares format version 2."""
    delta = make_delta()
    payload = encode_update(delta, "int8", round_no=1).payload
    bumped = reseal(payload[:3] + bytes([FORMAT_VERSION + 1]) + payload[4:])
    assert reason_of(bumped, delta) == "unknown-version"


def test_rejects_unknown_encoding() -> None:
    """Input: a well-sealed payload whose value-coding code is 9 (no such coding)."""
    delta = make_delta()
    payload = sparse_payload(delta, [0, 5], value_coding=9)
    assert reason_of(payload, delta) == "unknown-encoding"


def test_rejects_truncated_payload() -> None:
    """Input: the first half of a valid top-k payload, and its first 5 bytes."""
    delta = make_delta()
    payload = encode_update(delta, "topk:0.1", round_no=1).payload
    assert reason_of(payload[: len(payload) // 2], delta) == "truncated"
    assert reason_of(payload[:5], delta) == "truncated"


def test_rejects_checksum_mismatch() -> None:
    """Input: a valid int8 payload with one value byte flipped (CRC not updated)."""
    delta = make_delta()
    payload = bytearray(encode_update(delta, "int8", round_no=1).payload)
    payload[len(payload) // 2] ^= 0x01
    assert reason_of(bytes(payload), delta) == "checksum"


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_rejects_non_finite_values(bad: float) -> None:
    """Input: fp32, fp16 and int8 payloads of a delta holding NaN / +Inf / -Inf."""
    delta = make_delta()
    broken = dict(delta, **{"net.0.bias": delta["net.0.bias"].clone()})
    broken["net.0.bias"][3] = bad
    for spec in ["dense", "int8"] + (["dense:fp16"] if bad != bad else []):
        assert reason_of(encode_update(broken, spec, round_no=1).payload, delta) == "non-finite"


def test_rejects_indices_out_of_range() -> None:
    """Input: sparse payloads whose last index is 4810 (one past the end) or a huge step."""
    delta = make_delta()
    n = flatten(delta).size
    assert reason_of(sparse_payload(delta, [0, n]), delta) == "index-out-of-range"
    assert reason_of(sparse_payload(delta, [5, n - 5]), delta) == "index-out-of-range"


def test_rejects_duplicated_indices() -> None:
    """Input: a sparse payload that sends index 7 twice (a zero gap)."""
    delta = make_delta()
    assert reason_of(sparse_payload(delta, [7, 0, 3]), delta) == "duplicate-index"


def test_rejects_payload_above_the_size_cap() -> None:
    """Input: a 19 kB dense payload against a 4 kB cap."""
    delta = make_delta()
    payload = encode_update(delta, "dense", round_no=1).payload
    assert reason_of(payload, delta, max_bytes=4096) == "too-large"


def test_rejects_update_for_another_round() -> None:
    """Input: a valid payload encoded for round 3, received in round 4."""
    delta = make_delta()
    payload = encode_update(delta, "topk:0.01+int8", round_no=3).payload
    assert reason_of(payload, delta, expected_round=4) == "wrong-round"


def test_rejects_random_k_with_another_seed() -> None:
    """Input: a random-k payload drawn with seed 5 in a round whose shared seed is 6."""
    delta = make_delta()
    payload = encode_update(delta, "randk:0.05", round_no=1, shared_seed=5).payload
    assert reason_of(payload, delta, expected_seed=6) == "wrong-seed"


def test_rejects_bytes_that_are_not_an_update() -> None:
    """Input: 64 bytes of JSON instead of an encoded update."""
    assert reason_of(b'{"delta": [1, 2, 3]}' + b" " * 44, make_delta()) == "malformed"


def test_rejects_int4_code_minus_eight() -> None:
    """Input: a sealed int4 payload with a 0 nibble (code -8, never produced)."""
    delta = {"w": torch.ones(4)}
    scales = np.ones(1, dtype=np.float32).tobytes()
    payload = pack_payload(
        layout_of(delta),
        round_no=1,
        sparsifier=0,
        value_coding=4,
        chunk=256,
        index_mode=0,
        count=4,
        index_bytes=b"",
        value_bytes=scales + bytes([0x90, 0x99]),
    )
    assert reason_of(payload, delta) == "malformed"
