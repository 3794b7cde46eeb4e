"""Secure aggregation (SecAgg+): time and bytes per round against plaintext FedAvg.

    python -m benchmarks.secagg [--quick] [--json rows.json]

On one core (torch single-threaded), for n ∈ {10, 50, 100} clients × d = 100 000
parameters (``--quick``: n ∈ {10, 50}, d = 20 000), the same random updates (fp32, with
example counts 50–500) are aggregated twice in one process:

- *plaintext*: each client's reply as the ClientApp sends it (the delta as a Flower
  ArrayRecord plus its example count), decoded and folded into the real streaming FedAvg
  aggregator;
- *secagg*: the four stages of the protocol, driven through the real client and server
  state machines (:mod:`fedcommons.privacy.secagg.protocol`) in this one process, with
  the records the coordinator and the ClientApp exchange. Fixed-point inputs at the
  fp32 coding's 24 bits, ring size chosen for the round (weights up to 1024).

Bytes are Flower's serialized (protobuf) sizes of those records. The base weights and
the training config reach every client in both modes and are left out of both. Every
reply goes through Flower's serialization and parsing in both modes. Client time is the
mean per client (they run in parallel in a real round; serializing the reply, and for
secagg key agreement, Shamir sharing, encryption, quantization and masking); server time
is the coordinator's whole round (parsing, routing, summing, unmasking, the FedAvg fold).
Each configuration runs with no dropout and with 10 % of the clients dropping after
they received their shares (the coordinator then reconstructs their mask keys and
removes their pairwise masks).

The last table states our bandwidth expansion in Bonawitz et al.'s (2017) setting:
2^10 clients, 2^20 16-bit inputs, complete graph. Messages of one client are built
with the real protocol code (keys, Shamir shares, ciphertexts); the masked vector and
the routed ciphertexts are filled with random bytes of their exact length (their size
does not depend on their content).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

from fedcommons.coordinator.secure_round import _request
from fedcommons.privacy.secagg import ClientSession, RingSpec, RoundParams, ServerSession, graph
from fedcommons.privacy.secagg.protocol import (
    STAGE_ADVERTISE,
    STAGE_MASKED,
    STAGE_SHARE,
    STAGE_UNMASK,
)
from fedcommons.privacy.secagg.quantize import LEVELS, dequantize, quantize, ring_bits, to_ring
from fedcommons.strategies.fedavg import FedAvg
from fedcommons.wire import ClientUpdate, keys

MAX_WEIGHT = 1024


def _size(rd: RecordDict) -> int:
    return int(recorddict_to_proto(rd).ByteSize())


def _reply(stage: str, payload: dict[str, Any]) -> RecordDict:
    return RecordDict({keys.SECAGG_RECORD: ConfigRecord({keys.SECAGG_STAGE: stage, **payload})})


def _wire(rd: RecordDict) -> bytes:
    """What a sender puts on the wire (Flower's protobuf encoding)."""
    return recorddict_to_proto(rd).SerializeToString()


def _unwire(data: bytes) -> RecordDict:
    """What the receiver decodes from it."""
    proto = ProtoRecordDict()
    proto.ParseFromString(data)
    return recorddict_from_proto(proto)


def _record(data: bytes) -> dict[str, Any]:
    return dict(_unwire(data)[keys.SECAGG_RECORD])


def plaintext(updates: list[np.ndarray], weights: list[int]) -> dict[str, float]:
    """Serialize each reply, decode it, fold it into FedAvg; return times and bytes."""
    d = updates[0].size
    client_s, up = 0.0, 0
    server_s = 0.0
    agg = FedAvg()
    base = {"w": torch.zeros(d)}
    t = time.perf_counter()
    agg.begin(base)
    server_s += time.perf_counter() - t
    for delta, n in zip(updates, weights, strict=True):
        t = time.perf_counter()
        rd = RecordDict(
            {
                keys.DELTA_ARRAYS: ArrayRecord({"w": Array(delta)}),
                keys.REPLY_METRICS: MetricRecord({keys.NUM_EXAMPLES: n}),
            }
        )
        wire = _wire(rd)
        client_s += time.perf_counter() - t
        up += len(wire)
        t = time.perf_counter()
        got = _unwire(wire)
        arr = got[keys.DELTA_ARRAYS]["w"].numpy()
        agg.fold(ClientUpdate({"w": torch.from_numpy(arr)}, int(n)))
        server_s += time.perf_counter() - t
    t = time.perf_counter()
    agg.finalize()
    server_s += time.perf_counter() - t
    n_clients = len(updates)
    return {
        "client_ms": 1000 * client_s / n_clients,
        "server_ms": 1000 * server_s,
        "up_bytes": up / n_clients,
        "down_bytes": 0.0,
    }


def secure(
    updates: list[np.ndarray], weights: list[int], num_shares: int, dropped: set[int]
) -> dict[str, Any]:
    """One SecAgg+ round through the state machines; times, bytes and exactness."""
    n, d = len(updates), updates[0].size
    levels = LEVELS["fp32"]
    ring = RingSpec(
        bits=ring_bits(n, MAX_WEIGHT, levels),
        levels=levels,
        clip=4.0,
        max_weight=MAX_WEIGHT,
        aux=2,  # the weight and the clipped flag, as the coordinator's rounds have
    )
    shares = graph.degree(n, num_shares) + 1
    params = RoundParams("bench", 1, n, num_shares, (2 * shares) // 3 + 1, 7, ring, d)
    client_s = 0.0
    server_s = 0.0
    up = dict.fromkeys(range(1, n + 1), 0)
    down = dict.fromkeys(range(1, n + 1), 0)

    def timed_server(fn, *args):
        nonlocal server_s
        t = time.perf_counter()
        out = fn(*args)
        server_s += time.perf_counter() - t
        return out

    def exchange(stage, i, request, answer, add) -> None:
        """One client's stage: its request down, its reply (client time) up, the server's add."""
        nonlocal client_s
        down[i] += _size(_request(stage, request, 1))
        t = time.perf_counter()
        wire = _wire(_reply(stage, answer()))
        client_s += time.perf_counter() - t
        up[i] += len(wire)
        timed_server(lambda: add(i, _record(wire)))

    t = time.perf_counter()
    server = ServerSession(params)
    server_s += time.perf_counter() - t
    clients: dict[int, ClientSession] = {}

    def advertise(i: int) -> dict[str, Any]:
        clients[i] = ClientSession(params, i)
        return clients[i].advertise()

    def masked(i: int, r: dict[str, Any]) -> dict[str, Any]:
        clients[i].receive_shares(r)
        codes, clipped = quantize(updates[i - 1], ring)
        inputs[i] = to_ring(codes, weights[i - 1], [weights[i - 1], int(clipped > 0)], ring)
        return clients[i].mask(inputs[i])

    for i in range(1, n + 1):
        request = {**params.to_record(), keys.SECAGG_INDEX: i}
        exchange(STAGE_ADVERTISE, i, request, lambda i=i: advertise(i), server.add_advertise)
    for i, r in timed_server(server.share_keys_requests).items():
        exchange(STAGE_SHARE, i, r, lambda i=i, r=r: clients[i].share_keys(r), server.add_shares)
    inputs: dict[int, np.ndarray] = {}
    for i, r in timed_server(server.masked_input_requests).items():
        request = {**r, keys.SECAGG_DP_CLIP: 0.0}
        if i in dropped:  # it received its shares, then left
            down[i] += _size(_request(STAGE_MASKED, request, 1))
            continue
        exchange(STAGE_MASKED, i, request, lambda i=i, r=r: masked(i, r), server.add_masked)
    for i, r in timed_server(server.unmask_requests).items():
        exchange(STAGE_UNMASK, i, r, lambda i=i, r=r: clients[i].unmask(r), server.add_unmask)
    outcome = timed_server(server.finish)
    t = time.perf_counter()
    values, aux = dequantize(outcome.total, ring)
    agg = FedAvg()  # the secure sum takes the plaintext path: one fold of the mean
    agg.begin({"w": torch.zeros(d)})
    agg.fold(ClientUpdate({"w": torch.from_numpy(values / aux[0])}, int(aux[0])))
    agg.finalize()
    server_s += time.perf_counter() - t
    expected = np.zeros_like(outcome.total)
    for v in inputs.values():
        expected += v
    expected &= ring.modulus_mask
    survivors = [i for i in range(1, n + 1) if i not in dropped]
    return {
        "client_ms": 1000 * client_s / len(survivors),
        "server_ms": 1000 * server_s,
        "up_bytes": float(np.mean([up[i] for i in survivors])),
        "down_bytes": float(np.mean([down[i] for i in survivors])),
        "exact": bool(np.array_equal(outcome.total, expected)),
        "ring_bits": ring.bits,
        "shares": shares,
        "threshold": params.threshold,
    }


def bonawitz_setting(n: int = 1 << 10, d: int = 1 << 20) -> dict[str, Any]:
    """Bytes one client sends and receives at n clients, d 16-bit inputs, complete graph."""
    levels = LEVELS["fp16"]  # 16-bit inputs
    ring = RingSpec(bits=ring_bits(n, 1, levels), levels=levels, clip=1.0, max_weight=1, aux=2)
    params = RoundParams("bonawitz", 1, n, 0, (2 * n) // 3 + 1, 1, ring, d)
    me = ClientSession(params, 1)
    up = down = 0
    down += _size(_request(STAGE_ADVERTISE, {**params.to_record(), keys.SECAGG_INDEX: 1}, 1))
    up += _size(_reply(STAGE_ADVERTISE, me.advertise()))
    peers = [ClientSession(params, i) for i in range(2, n + 1)]
    pk = [p.advertise() for p in peers]
    req = {
        "idx": list(range(2, n + 1)),
        "c-pk": [p["c-pk"] for p in pk],
        "s-pk": [p["s-pk"] for p in pk],
    }
    down += _size(_request(STAGE_SHARE, req, 1))
    shares = me.share_keys(req)
    up += _size(_reply(STAGE_SHARE, shares))
    rng = np.random.default_rng(0)
    routed = {"src": list(range(2, n + 1)), "ct": [os.urandom(len(c)) for c in shares["ct"]]}
    down += _size(_request(STAGE_MASKED, {**routed, keys.SECAGG_DP_CLIP: 0.0}, 1))
    masked_len = math.ceil((d + ring.aux) * ring.bits / 8)
    up += _size(_reply(STAGE_MASKED, {"masked": rng.bytes(masked_len)}))
    down += _size(_request(STAGE_UNMASK, {"survivors": list(range(2, n + 1)), "dropped": []}, 1))
    share = bytes(33)
    up += _size(
        _reply(
            STAGE_UNMASK,
            {"b-idx": list(range(1, n + 1)), "b-share": [share] * n, "s-idx": [], "s-share": []},
        )
    )
    plain = d * 16 / 8
    return {
        "clients": n,
        "inputs": d,
        "ring_bits": ring.bits,
        "up_bytes": up,
        "down_bytes": down,
        "plaintext_bytes": plain,
        "expansion_up": up / plain,
        "expansion_total": (up + down) / plain,
    }


def main() -> None:
    """Run the benchmark and print the tables."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="n in {10, 50}, d = 20 000")
    ap.add_argument("--json", type=Path, help="write the rows as JSON")
    args = ap.parse_args()
    torch.set_num_threads(1)  # one core for both modes (a shared machine: no thread spinning)
    warm = [np.zeros(1000, dtype=np.float32)] * 3
    plaintext(warm, [1, 1, 1])  # lazy imports and first-call costs out of the figures
    secure(warm, [1, 1, 1], 0, set())
    ns = [10, 50] if args.quick else [10, 50, 100]
    d = 20_000 if args.quick else 100_000
    rng = np.random.default_rng(0)
    rows = []
    print(f"d = {d} parameters; client ms = mean per client; bytes per client per round")
    print(
        f"{'clients':>7} {'graph':>9} {'drop':>4} {'bits':>4} {'plain srv ms':>12} "
        f"{'secagg srv ms':>13} {'x':>6} {'plain cli ms':>12} {'secagg cli ms':>13} {'x':>6} "
        f"{'plain up B':>11} {'secagg up B':>11} {'x':>5} {'secagg down B':>13} {'exact':>5}"
    )
    for n in ns:
        updates = [rng.normal(0, 0.01, d).astype(np.float32) for _ in range(n)]
        weights = [int(w) for w in rng.integers(50, 501, n)]
        base = plaintext(updates, weights)
        plus = 2 * math.ceil(math.log2(n)) + 1
        for num_shares in [0, plus] if plus < n else [0]:
            for frac in (0.0, 0.1):
                dropped = set(range(2, 2 + int(frac * n)))
                sec = secure(updates, weights, num_shares, dropped)
                row = {
                    "clients": n,
                    "params": d,
                    "graph": "complete" if sec["shares"] == n else f"k={sec['shares'] - 1}",
                    "dropped": len(dropped),
                    "plaintext": base,
                    "secagg": sec,
                    "server_time_ratio": sec["server_ms"] / base["server_ms"],
                    "client_time_ratio": sec["client_ms"] / base["client_ms"],
                    "upload_ratio": sec["up_bytes"] / base["up_bytes"],
                }
                rows.append(row)
                print(
                    f"{n:>7} {row['graph']:>9} {len(dropped):>4} {sec['ring_bits']:>4} "
                    f"{base['server_ms']:>12.1f} {sec['server_ms']:>13.1f} "
                    f"{row['server_time_ratio']:>6.1f} {base['client_ms']:>12.2f} "
                    f"{sec['client_ms']:>13.2f} {row['client_time_ratio']:>6.1f} "
                    f"{base['up_bytes']:>11.0f} {sec['up_bytes']:>11.0f} "
                    f"{row['upload_ratio']:>5.2f} {sec['down_bytes']:>13.0f} "
                    f"{sec['exact']!s:>5}",
                    flush=True,
                )
    bz = bonawitz_setting(1 << 8, 1 << 16) if args.quick else bonawitz_setting()
    print()
    print(
        f"Bonawitz et al. setting: {bz['clients']} clients, {bz['inputs']} 16-bit inputs, "
        f"complete graph, ring {bz['ring_bits']} bits"
    )
    print(f"{'':>24} {'bytes':>12} {'x plaintext':>11}")
    print(f"{'plaintext (16 bit)':>24} {bz['plaintext_bytes']:>12.0f} {1.0:>11.2f}")
    print(f"{'secagg upload':>24} {bz['up_bytes']:>12.0f} {bz['expansion_up']:>11.2f}")
    print(
        f"{'secagg upload+download':>24} {bz['up_bytes'] + bz['down_bytes']:>12.0f} "
        f"{bz['expansion_total']:>11.2f}"
    )
    print("Bonawitz et al. (2017) report 1.73x for 2^10 clients and 2^20 16-bit inputs.")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "bonawitz_setting": bz}, indent=2))


if __name__ == "__main__":
    main()
