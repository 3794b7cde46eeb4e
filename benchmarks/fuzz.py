"""Fuzz the update decoder: ``python -m benchmarks.fuzz [--cases N] [--seconds S] [--seed K]``.

Every case is a payload a hostile client could send, decoded the way the coordinator
decodes a reply (against the base release's layout, with round and random-k seed
checks), then read back densely and folded into a float64 sum. Inputs:

- valid payloads of every encoding (dense fp32/fp16/bf16, int8/int4 with several chunk
  sizes, top-k with varint and bitmap indices, per-tensor top-k, random-k, FISH masks,
  sparse + quantized), on a small model and on a 4M-parameter one;
- byte mutations of them (bit flips, interesting bytes, truncation, extension, inserted
  and deleted spans, splices of two payloads), most resealed with a correct length
  and CRC-32 so they reach the checks past the checksum, as a malicious client would;
- field mutations: one header field (round, codes, chunk, tensor count, names, dims,
  index mode, value count, index section, scales, codes) set to an interesting value
  (0, 1, 2³¹, 2⁶³−1, n ± 1, …) and the payload rebuilt with a valid CRC;
- random bytes, bare and inside a valid frame.

A *crash* is any exception other than the typed rejection
(:class:`~fedcommons.errors.UpdateRejectedError`), or an accepted payload that breaks an
invariant (names, shapes and dtypes of the base, finite values, a fold that differs
from the dense decode); crashes are grouped into classes by exception type and the
innermost fedcommons frame. The table also gives the largest peak RSS one large-model
case added (``VmHWM`` reset before each, above the RSS with its input already built),
in units of the model's dense fp32 size (target: at most ~2×, issue #13; the decoder
allocates a sparse update's support mask, 0.25×, and reading the delta densely 1×).
The suite runs the same engine on 20,000 small-model cases
(``tests/test_codec_fuzz.py``).

Exit status 1 when a crash class was found or the memory bound was exceeded.
"""

from __future__ import annotations

import argparse
import struct
import sys
import time
import traceback
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedcommons.errors import UpdateRejectedError
from fedcommons.wire.codec import (
    _CRC,
    _FIXED_HEADER,
    CompressionSpec,
    TensorInfo,
    _Reader,
    _varint,
    decode_update,
    encode_flat,
    layout_of,
    layout_size,
    pack_payload,
)

ENCODINGS = [
    "dense",
    "dense:fp16",
    "dense:bf16",
    "int8",
    "int4",
    "int8:7",
    "int4:5",
    "int8:1",
    "topk:0.05",
    "topk:0.6",
    "topk-tensor:0.1",
    "topk:0.05+int8",
    "topk:0.3+int4:3",
    "topk:0.4+bf16",
    "randk:0.1",
    "randk:0.2+int8",
    "fish:0.1",
    "fish:0.5+fp16",
]
ROUND, SHARED_SEED = 3, 77


def small_model() -> dict[str, torch.Tensor]:
    """The small reference model of the in-suite fuzz test (167 values, 4 tensors)."""
    return {
        "enc.weight": torch.zeros(8, 16),
        "enc.bias": torch.zeros(16),
        "head.weight": torch.zeros(3, 5),
        "head.scale": torch.zeros(8, dtype=torch.float16),
    }


def large_model(params: int = 4_000_000) -> dict[str, torch.Tensor]:
    """A reference model of ``params`` float32 values (three tensors)."""
    return {
        "a.weight": torch.zeros(params // 2 // 1000, 1000),
        "b.weight": torch.zeros(params // 4),
        "c.bias": torch.zeros(params - params // 2 // 1000 * 1000 - params // 4),
    }


@dataclass
class Target:
    """A reference layout and the valid payloads (one per encoding) mutations start from.

    ``full_checks``: check every invariant of an accepted payload (this allocates
    several dense copies); off for the large model, whose cases measure the decoder's
    memory: decode, fold into ``accumulator`` (allocated once), read the dense delta.
    """

    reference: dict[str, torch.Tensor]
    layout: list[TensorInfo]
    seeds: list[bytes]
    full_checks: bool = True
    accumulator: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def size(self) -> int:
        """Parameters in the reference layout."""
        return layout_size(self.layout)


def make_target(reference: dict[str, torch.Tensor], seed: int, full_checks: bool = True) -> Target:
    """Encode a random delta of ``reference``'s layout in every encoding."""
    layout = layout_of(reference)
    rng = np.random.default_rng(seed)
    n = layout_size(layout)
    flat = (rng.standard_normal(n) * rng.uniform(0.01, 3.0)).astype(np.float32)
    mask = rng.random(n) < 0.15
    mask[rng.integers(n)] = True
    seeds = []
    for text in ENCODINGS:
        spec = CompressionSpec.parse(text)
        for rounding in ("stochastic", "nearest"):
            enc = encode_flat(
                flat,
                layout,
                spec,
                round_no=ROUND,
                rng=rng,
                shared_seed=SHARED_SEED,
                mask=mask,
                rounding=rounding,
            )
            seeds.append(enc.payload)
            if spec.values not in ("int8", "int4"):
                break
    target = Target(reference, layout, seeds, full_checks)
    if not full_checks:
        target.accumulator = {k: np.zeros(v.numel()) for k, v in reference.items()}
    return target


# -- payload structure (for field mutations) -----------------------------------------------
@dataclass
class Fields:
    """The sections of a valid payload, as :func:`pack_payload` takes them."""

    round_no: int
    sparsifier: int
    value_coding: int
    chunk: int
    layout: list[TensorInfo]
    index_mode: int
    count: int
    index_bytes: bytes
    value_bytes: bytes

    def pack(self) -> bytes:
        """Rebuild the payload (valid length and CRC, whatever the fields say)."""
        return pack_payload(
            self.layout,
            round_no=self.round_no,
            sparsifier=self.sparsifier,
            value_coding=self.value_coding,
            chunk=self.chunk,
            index_mode=self.index_mode,
            count=self.count,
            index_bytes=self.index_bytes,
            value_bytes=self.value_bytes,
        )


def parse_fields(payload: bytes) -> Fields:
    """Split a payload the encoder wrote into its fields (no validation)."""
    from fedcommons.wire.codec import _DTYPES, _value_bytes

    total = len(payload)
    r = _Reader(memoryview(payload), _FIXED_HEADER.size, total - _CRC.size)
    round_no, sparsifier, coding, chunk = r.varint(), r.u8(), r.u8(), r.varint()
    layout = []
    for _ in range(r.varint()):
        name = bytes(r.take(r.varint())).decode()
        dtype, ndim = r.u8(), r.u8()
        layout.append(TensorInfo(name, tuple(r.varint() for _ in range(ndim)), _DTYPES[dtype]))
    index_mode, count = r.u8(), r.varint()
    names = ("fp32", "fp16", "bf16", "int8", "int4")
    value_len = _value_bytes(count, names[coding], max(chunk, 1))
    index_len = r.end - r.pos - value_len
    index_bytes = bytes(r.take(index_len))
    value_bytes = bytes(r.take(value_len))
    return Fields(
        round_no, sparsifier, coding, chunk, layout, index_mode, count, index_bytes, value_bytes
    )


def interesting(rng: np.random.Generator, n: int) -> int:
    """A boundary value for an integer field (sizes, counts, codes)."""
    pool = [0, 1, 2, 3, 7, 8, 127, 128, 255, 256, 65535, 65536, 2**31 - 1, 2**31, 2**32]
    pool += [2**32 + 1, 2**40, 2**53, 2**62, 2**63 - 1, max(n - 1, 0), n, n + 1, 2 * n, 8 * n]
    return int(pool[rng.integers(len(pool))])


def reseal(data: bytes) -> bytes:
    """Fix the declared total length and the CRC-32 of a mutated payload."""
    if len(data) < _FIXED_HEADER.size + _CRC.size:
        return data
    body = bytearray(data[: -_CRC.size])
    body[4:8] = struct.pack("<I", len(data) & 0xFFFFFFFF)
    return bytes(body) + _CRC.pack(zlib.crc32(body))


def mutate_fields(rng: np.random.Generator, payload: bytes, n: int) -> bytes:
    """Set one header field or section of a valid payload to a hostile value."""
    f = parse_fields(payload)
    choice = int(rng.integers(13))
    if choice == 0:
        f.round_no = interesting(rng, n)
    elif choice == 1:
        f.sparsifier = int(rng.integers(7))
    elif choice == 2:
        f.value_coding = int(rng.integers(7))
    elif choice == 3:
        f.chunk = interesting(rng, n)
    elif choice == 4:
        f.count = interesting(rng, n)
    elif choice == 5:
        f.index_mode = int(rng.integers(6))
    elif choice == 6 and f.layout:  # one dimension of one tensor
        t = int(rng.integers(len(f.layout)))
        info = f.layout[t]
        dims = list(info.shape) or [1]
        dims[int(rng.integers(len(dims)))] = interesting(rng, n)
        f.layout[t] = TensorInfo(info.name, tuple(dims), info.dtype)
    elif choice == 7 and f.layout:  # drop, duplicate, rename, or reshape a tensor
        t = int(rng.integers(len(f.layout)))
        info = f.layout[t]
        op = int(rng.integers(4))
        if op == 0:
            del f.layout[t]
        elif op == 1:
            f.layout.insert(t, info)
        elif op == 2:
            f.layout[t] = TensorInfo(info.name + "x", info.shape, info.dtype)
        else:
            f.layout[t] = TensorInfo(info.name, (*info.shape, 1), torch.float64)
    elif choice == 8:  # index section: random varints, random bytes, or empty
        op = int(rng.integers(3))
        if op == 0:
            gaps = rng.integers(0, max(n, 2), size=int(rng.integers(0, 40)))
            coded = b"".join(_varint(int(g)) for g in gaps)
            f.index_bytes = _varint(len(coded)) + coded
        elif op == 1:
            f.index_bytes = rng.bytes(int(rng.integers(0, 64)))
        else:
            f.index_bytes = b""
    elif choice == 9 and f.value_bytes:  # poison values/scales: NaN, Inf, -1, -128, 0
        data = bytearray(f.value_bytes)
        pattern = [b"\xff\xff\xff\x7f", b"\x00\x00\x80\x7f", b"\x00\x00\x80\xbf", b"\x80"]
        poison = pattern[int(rng.integers(len(pattern)))]
        at = int(rng.integers(len(data)))
        data[at : at + len(poison)] = poison
        f.value_bytes = bytes(data[: len(f.value_bytes)])
    elif choice == 10:  # value section of another length
        cut = int(rng.integers(len(f.value_bytes) + 1))
        f.value_bytes = f.value_bytes[:cut] + rng.bytes(int(rng.integers(0, 16)))
    elif choice == 11:  # a count and index section that agree, over a wrong layout
        f.count = int(rng.integers(0, 2 * max(n, 1)))
        f.layout = f.layout[::-1]
    else:  # nothing at all, but repacked
        pass
    try:
        return f.pack()
    except (ValueError, KeyError, OverflowError, struct.error):
        return payload  # a field pack_payload itself cannot write (e.g. ndim > 255)


def mutate_bytes(rng: np.random.Generator, payload: bytes, other: bytes) -> bytes:
    """Byte-level mutation; resealed (valid length and CRC) three times out of four."""
    data = bytearray(payload)
    for _ in range(int(rng.integers(1, 4))):
        op = int(rng.integers(7))
        if op == 0 and data:  # bit flips
            for _ in range(int(rng.integers(1, 9))):
                at = int(rng.integers(len(data)))
                data[at] ^= 1 << int(rng.integers(8))
        elif op == 1 and data:  # interesting bytes
            at = int(rng.integers(len(data)))
            data[at] = int(rng.choice([0, 1, 0x7F, 0x80, 0xFF, int(rng.integers(256))]))
        elif op == 2:  # truncate
            del data[int(rng.integers(len(data) + 1)) :]
        elif op == 3:  # extend
            data += rng.bytes(int(rng.integers(1, 32)))
        elif op == 4:  # insert a span
            at = int(rng.integers(len(data) + 1))
            data[at:at] = rng.bytes(int(rng.integers(1, 16)))
        elif op == 5 and data:  # delete a span
            at = int(rng.integers(len(data)))
            del data[at : at + int(rng.integers(1, 16))]
        else:  # splice with another valid payload
            cut = int(rng.integers(len(data) + 1))
            data = data[:cut] + other[int(rng.integers(len(other) + 1)) :]
    out = bytes(data)
    return reseal(out) if rng.random() < 0.75 else out


def random_payload(rng: np.random.Generator) -> bytes:
    """Random bytes, bare or in a valid frame (magic, version, length, CRC)."""
    body = rng.bytes(int(rng.integers(0, 200)))
    if rng.random() < 0.5:
        return body
    return reseal(b"FCU\x01" + b"\0\0\0\0" + body + b"\0\0\0\0")


# -- running cases -------------------------------------------------------------------------
@dataclass
class Report:
    """What a fuzz run found."""

    cases: int = 0
    accepted: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    crashes: dict[str, tuple[int, bytes]] = field(default_factory=dict)  # class -> (n, input)
    #: Largest RSS a large-model case added above the RSS before it (bytes).
    peak_rss: int = 0

    def crash(self, key: str, payload: bytes) -> None:
        """Count a crash of class ``key`` (keeping the first input that caused it)."""
        count, first = self.crashes.get(key, (0, payload))
        self.crashes[key] = (count + 1, first)


def crash_class(exc: BaseException) -> str:
    """Exception type and innermost fedcommons frame (file:function:line)."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "fedcommons" in f.filename] or frames
    where = f"{Path(ours[-1].filename).name}:{ours[-1].name}:{ours[-1].lineno}" if ours else "?"
    return f"{type(exc).__name__} at {where}"


def check_accepted(target: Target, decoded: Any) -> None:
    """Invariants of an accepted payload; raises AssertionError naming the broken one."""
    delta = decoded.delta
    assert set(delta) == set(target.reference), "accepted tensors differ from the base"
    if not target.full_checks:  # what the coordinator does: fold, or read the delta
        delta.fold_into(target.accumulator, 1.0)
        assert delta[target.layout[0].name].dtype == target.layout[0].dtype
        return
    acc = {k: np.zeros(v.numel(), dtype=np.float64) for k, v in target.reference.items()}
    delta.fold_into(acc, 3.0)  # the fused path the coordinator takes, before any decode
    flat = delta.flat()  # payload order; the decoded tensors must agree with it
    assert np.isfinite(flat).all() or target.size == 0, "accepted a non-finite value"
    for name, ref in target.reference.items():
        value = delta[name]
        assert tuple(value.shape) == tuple(ref.shape), f"{name}: accepted with another shape"
        assert value.dtype == ref.dtype, f"{name}: accepted with another dtype"
        dense = value.reshape(-1).double().numpy()
        assert np.isfinite(dense).all(), f"{name}: accepted a value its dtype cannot hold"
        assert np.array_equal(acc[name], 3.0 * dense), f"{name}: fused fold differs from decode"


def run_case(target: Target, payload: bytes, report: Report, rng: np.random.Generator) -> None:
    """Decode one payload as the coordinator does; record the outcome."""
    report.cases += 1
    kwargs: dict[str, Any] = {"expected_round": ROUND, "expected_seed": SHARED_SEED}
    reference: Any = target.layout if rng.random() < 0.9 else target.reference
    try:
        decoded = decode_update(payload, reference, **kwargs)
        check_accepted(target, decoded)
    except UpdateRejectedError as exc:
        report.rejected[exc.reason] += 1
        return
    except Exception as exc:  # the decoder must never raise anything else (MemoryError too)
        report.crash(crash_class(exc), payload)
        return
    report.accepted += 1


def next_payload(target: Target, rng: np.random.Generator) -> bytes:
    """Draw one case: a seed, a byte or field mutation of one, or random bytes."""
    seeds = target.seeds
    base = seeds[int(rng.integers(len(seeds)))]
    kind = rng.random()
    if kind < 0.05:
        return base
    if kind < 0.45:
        return mutate_fields(rng, base, target.size)
    if kind < 0.9:
        return mutate_bytes(rng, base, seeds[int(rng.integers(len(seeds)))])
    return random_payload(rng)


def fuzz(
    targets: list[tuple[Target, float]],
    cases: int,
    seed: int,
    seconds: float | None = None,
) -> Report:
    """Run ``cases`` cases (or until ``seconds`` pass), drawing targets by weight.

    For targets without ``full_checks`` (the large model), the peak RSS each decode adds
    above the RSS once its input exists is measured (``VmHWM`` reset per case; Linux)
    and the largest goes in ``Report.peak_rss``.
    """
    rng = np.random.default_rng(seed)
    weights = np.array([w for _, w in targets], dtype=np.float64)
    cumulative = np.cumsum(weights / weights.sum())
    report = Report()
    deadline = None if seconds is None else time.monotonic() + seconds
    for _ in range(cases):
        target = targets[min(int(np.searchsorted(cumulative, rng.random())), len(targets) - 1)][0]
        payload = next_payload(target, rng)
        measure = not target.full_checks and Path("/proc/self/clear_refs").exists()
        if measure:
            _reset_peak()
            before = _status_bytes("VmRSS:")
        run_case(target, payload, report, rng)
        if measure:
            report.peak_rss = max(report.peak_rss, _status_bytes("VmHWM:") - before)
        del payload
        if deadline is not None and time.monotonic() > deadline:
            break
    return report


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # VmHWM (the peak RSS) := the current RSS


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", type=int, default=300_000)
    parser.add_argument("--seconds", type=float, default=None, help="stop after this long")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--large-params", type=int, default=4_000_000)
    parser.add_argument("--large-share", type=float, default=0.02, help="cases on the large model")
    parser.add_argument("--save", type=Path, help="write the first input of each crash class here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    small = make_target(small_model(), args.seed)
    large = make_target(large_model(args.large_params), args.seed + 1, full_checks=False)
    dense_bytes = 4 * large.size
    fuzz([(small, 1.0), (large, 0.05)], 2_000, args.seed + 2)  # compile every kernel first
    started = time.perf_counter()
    report = fuzz(
        [(small, 1.0 - args.large_share), (large, args.large_share)],
        args.cases,
        args.seed,
        args.seconds,
    )
    elapsed = time.perf_counter() - started
    peak = report.peak_rss
    bound = 2.0 * dense_bytes
    print(f"decoder fuzz, seed {args.seed}: {report.cases:,} cases in {elapsed:.1f} s")
    print(f"  accepted {report.accepted:,}, rejected {sum(report.rejected.values()):,}:")
    for reason, count in report.rejected.most_common():
        print(f"    {reason:20s} {count:>9,}")
    print(f"  crash classes: {len(report.crashes)}")
    for key, (count, first) in sorted(report.crashes.items()):
        print(f"    {count:>7,}  {key}  (first input {len(first)} bytes)")
    if args.save and report.crashes:
        args.save.mkdir(parents=True, exist_ok=True)
        for i, (_, (_, first)) in enumerate(sorted(report.crashes.items())):
            (args.save / f"crash-{i}.bin").write_bytes(first)
    ratio = peak / dense_bytes
    print(
        f"  peak RSS a large-model decode added: {peak / 1e6:.1f} MB = {ratio:.2f}× its "
        f"dense fp32 size ({dense_bytes / 1e6:.0f} MB); bound 2× ({bound / 1e6:.0f} MB): "
        + ("within" if peak <= bound else "EXCEEDED")
    )
    return 1 if report.crashes or peak > bound else 0


if __name__ == "__main__":
    sys.exit(main())
