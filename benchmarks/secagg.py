"""Secure aggregation (SecAgg+): coordinator time and bytes per round against plaintext FedAvg.

    python -m benchmarks.secagg [--quick] [--clients 10,50,100,1000] [--repeat 3]
                                [--no-flower] [--json rows.json]

On one core (torch single-threaded), for n ∈ {10, 50, 100, 1000} clients × d = 100 000
parameters (``--quick``: n ∈ {10, 50}, d = 20 000), the same random updates (fp32, with
example counts 50–500) are aggregated in one process:

- *plaintext*: each client's reply as the ClientApp sends it (the delta as a Flower
  ArrayRecord plus its example count), decoded and folded into the real streaming FedAvg
  aggregator;
- *secagg*: the four stages of the protocol, driven through the real client and server
  state machines (:mod:`fedcommons.privacy.secagg.protocol`) in this one process, with
  the records the coordinator and the ClientApp exchange. Fixed-point inputs at the
  fp32 coding's 24 bits, ring size chosen for the round (weights up to 1024);
- *Flower SecAgg+* (the side-by-side): the same round with Flower's own SecAgg+
  primitives (flwr 1.41): its ClientApp mod's stage functions on the client side, and
  on the server the computations of its ``SecAggPlusWorkflow`` (int64 vectors mod 2^32,
  ``combine_shares`` for every sampled node, ``pseudo_rand_gen`` masks, Fernet share
  encryption), with Flower's default quantization.

Times are CPU seconds of this process (``time.process_time``), not wall time: the
benchmark machines are shared, and CPU time is what the coordinator spends however busy
its neighbours are. Each configuration runs ``--repeat`` times, plaintext and secure
interleaved; the tables show medians, and every ratio is the median of the ratios of
runs made back to back. Bytes are Flower's serialized (protobuf) sizes of the records;
the base weights and training config reach every client in every mode and are left out.
Every reply goes through Flower's serialization and parsing. Client time is the mean per
client (clients run in parallel in a real round); server time is the coordinator's whole
round (parsing, routing, summing, unmasking, the FedAvg fold). Each configuration runs
with no dropout and with 10 % of the clients dropping after they received their shares
(the coordinator then reconstructs their mask keys and removes their pairwise masks).

The last table states our bandwidth expansion in Bonawitz et al.'s (2017) setting:
2^10 clients, 2^20 16-bit inputs, complete graph. Messages of one client are built with
the real protocol code (keys, Shamir shares, ciphertexts); the masked vector and the
routed ciphertexts are filled with random bytes of their exact length (their size does
not depend on their content).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import statistics
import time
from collections import Counter
from collections.abc import Callable
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
clock = time.process_time


class Updates:
    """The benchmark's client updates, regenerated from a seed (1000 × d floats stay off RAM)."""

    def __init__(self, n: int, d: int, seed: int) -> None:
        self.n, self.d, self.seed = n, d, seed
        self.weights = [int(w) for w in np.random.default_rng(seed).integers(50, 501, n)]

    def __getitem__(self, i: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, i])
        return rng.normal(0, 0.01, self.d).astype(np.float32)

    def __len__(self) -> int:
        return self.n


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


def _record(data: bytes, name: str = keys.SECAGG_RECORD) -> dict[str, Any]:
    return dict(_unwire(data)[name])


class _Clock:
    """CPU time of the two sides, and of the server by stage."""

    def __init__(self) -> None:
        self.client = 0.0
        self.server: Counter[str] = Counter()

    def on_server(self, stage: str, fn: Callable[[], Any]) -> Any:
        t = clock()
        out = fn()
        self.server[stage] += clock() - t
        return out

    def on_client(self, fn: Callable[[], Any]) -> Any:
        t = clock()
        out = fn()
        self.client += clock() - t
        return out


def plaintext(updates: Updates) -> dict[str, float]:
    """Serialize each reply, decode it, fold it into FedAvg; return times and bytes."""
    d = updates.d
    ck = _Clock()
    up = 0
    agg = FedAvg()
    base = {"w": torch.zeros(d)}
    ck.on_server("fold", lambda: agg.begin(base))
    for i in range(len(updates)):
        delta, n = updates[i], updates.weights[i]
        rd = RecordDict(
            {
                keys.DELTA_ARRAYS: ArrayRecord({"w": Array(delta)}),
                keys.REPLY_METRICS: MetricRecord({keys.NUM_EXAMPLES: n}),
            }
        )
        wire = ck.on_client(lambda rd=rd: _wire(rd))
        up += len(wire)

        def fold(wire: bytes = wire, n: int = n) -> None:
            arr = _unwire(wire)[keys.DELTA_ARRAYS]["w"].numpy()
            agg.fold(ClientUpdate({"w": torch.from_numpy(arr)}, int(n)))

        ck.on_server("fold", fold)
    ck.on_server("fold", agg.finalize)
    return {
        "client_ms": 1000 * ck.client / len(updates),
        "server_ms": 1000 * sum(ck.server.values()),
        "up_bytes": up / len(updates),
        "down_bytes": 0.0,
    }


def _ring(n: int) -> RingSpec:
    levels = LEVELS["fp32"]
    # aux: the weight and the clipped flag, as the coordinator's rounds have
    return RingSpec(
        bits=ring_bits(n, MAX_WEIGHT, levels),
        levels=levels,
        clip=4.0,
        max_weight=MAX_WEIGHT,
        aux=2,
    )


def secure(updates: Updates, num_shares: int, dropped: set[int]) -> dict[str, Any]:
    """One SecAgg+ round through the state machines; times, bytes and exactness."""
    n, d = len(updates), updates.d
    ring = _ring(n)
    shares = graph.degree(n, num_shares) + 1
    params = RoundParams("bench", 1, n, num_shares, (2 * shares) // 3 + 1, 7, ring, d)
    ck = _Clock()
    up = dict.fromkeys(range(1, n + 1), 0)
    down = dict.fromkeys(range(1, n + 1), 0)

    def exchange(stage, i, request, answer, add) -> None:
        """One client's stage: its request down, its reply (client time) up, the server's add."""
        down[i] += _size(_request(stage, request, 1))
        wire = ck.on_client(lambda: _wire(_reply(stage, answer())))
        up[i] += len(wire)
        ck.on_server(stage, lambda: add(i, _record(wire)))

    server = ck.on_server(STAGE_ADVERTISE, lambda: ServerSession(params))
    clients: dict[int, ClientSession] = {}
    expected = np.zeros(d + ring.aux, dtype=np.uint64)

    def advertise(i: int) -> dict[str, Any]:
        clients[i] = ClientSession(params, i)
        return clients[i].advertise()

    def masked(i: int, r: dict[str, Any]) -> dict[str, Any]:
        nonlocal expected
        clients[i].receive_shares(r)
        w = updates.weights[i - 1]
        codes, clipped = quantize(updates[i - 1], ring)
        vector = to_ring(codes, w, [w, int(clipped > 0)], ring)
        expected += vector  # (the exactness check's reference, not client work)
        return clients[i].mask(vector)

    for i in range(1, n + 1):
        request = {**params.to_record(), keys.SECAGG_INDEX: i}
        exchange(STAGE_ADVERTISE, i, request, lambda i=i: advertise(i), server.add_advertise)
    for i, r in ck.on_server(STAGE_SHARE, server.share_keys_requests).items():
        exchange(STAGE_SHARE, i, r, lambda i=i, r=r: clients[i].share_keys(r), server.add_shares)
    for i, r in ck.on_server(STAGE_MASKED, server.masked_input_requests).items():
        request = {**r, keys.SECAGG_DP_CLIP: 0.0, keys.SECAGG_DP_NOISE: 0.0}
        if i in dropped:  # it received its shares, then left
            down[i] += _size(_request(STAGE_MASKED, request, 1))
            clients.pop(i)
            continue
        exchange(STAGE_MASKED, i, request, lambda i=i, r=r: masked(i, r), server.add_masked)
    for i, r in ck.on_server(STAGE_UNMASK, server.unmask_requests).items():
        exchange(STAGE_UNMASK, i, r, lambda i=i, r=r: clients[i].unmask(r), server.add_unmask)
    outcome = ck.on_server("finish", server.finish)

    def fold() -> None:
        values, aux = dequantize(outcome.total, ring)
        agg = FedAvg()  # the secure sum takes the plaintext path: one fold of the mean
        agg.begin({"w": torch.zeros(d)})
        agg.fold(ClientUpdate({"w": torch.from_numpy(values / aux[0])}, int(aux[0])))
        agg.finalize()

    ck.on_server("fold", fold)
    expected &= ring.modulus_mask
    survivors = [i for i in range(1, n + 1) if i not in dropped]
    return {
        "client_ms": 1000 * ck.client / len(survivors),
        "server_ms": 1000 * sum(ck.server.values()),
        "server_stage_ms": {k: 1000 * v for k, v in ck.server.items()},
        "up_bytes": float(np.mean([up[i] for i in survivors])),
        "down_bytes": float(np.mean([down[i] for i in survivors])),
        "exact": bool(np.array_equal(outcome.total, expected)),
        "ring_bits": ring.bits,
        "shares": shares,
        "threshold": params.threshold,
    }


# ---------------------------------------------------------------------------------------
# Flower's SecAgg+ primitives, same round (the side-by-side)
# ---------------------------------------------------------------------------------------
def flower_secure(updates: Updates, num_shares: int, dropped: set[int]) -> dict[str, Any]:
    """The same round with Flower's SecAgg+ (client mod stage functions, workflow's server math).

    Flower's defaults: clipping range 8, quantization range 2^22, vectors mod 2^32,
    max weight 1000 (our example counts stay below it). Neighbours: Flower's own
    construction (a ring over the shuffled node ids, ``num_shares // 2`` each side).
    """
    from flwr.common import bytes_to_ndarray, ndarrays_to_parameters
    from flwr.common.secure_aggregation.crypto.shamir import combine_shares
    from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
    from flwr.common.secure_aggregation.ndarrays_arithmetic import (
        factor_extract,
        get_parameters_shape,
        parameters_addition,
        parameters_mod,
        parameters_subtraction,
    )
    from flwr.common.secure_aggregation.quantization import dequantize as fl_dequantize
    from flwr.common.secure_aggregation.secaggplus_constants import Key, Stage
    from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
    from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

    # the package re-exports a function of the module's name: import the module itself
    fm = importlib.import_module("flwr.client.mod.secure_aggregation.secaggplus_mod")
    n = len(updates)
    shares = graph.degree(n, num_shares) + 1
    threshold = (2 * shares) // 3 + 1
    clip, target, mod, max_weight = 8.0, 1 << 22, 1 << 32, 1000.0
    rng = np.random.default_rng(7)
    order = [int(x) for x in rng.permutation(n) + 1]
    half = shares >> 1
    nbrs = {
        nid: {order[(i + off) % n] for off in range(-half, half + 1)} for i, nid in enumerate(order)
    }
    ck = _Clock()
    up = dict.fromkeys(range(1, n + 1), 0)
    rec_key = fm.RECORD_KEY_CONFIGS

    def reply(payload: dict[str, Any]) -> bytes:
        return _wire(RecordDict({rec_key: ConfigRecord(payload)}))

    states: dict[int, Any] = {}
    setup = ConfigRecord(
        {
            Key.STAGE: Stage.SETUP,
            Key.SAMPLE_NUMBER: n,
            Key.SHARE_NUMBER: shares,
            Key.THRESHOLD: threshold,
            Key.CLIPPING_RANGE: clip,
            Key.TARGET_RANGE: target,
            Key.MOD_RANGE: mod,
            Key.MAX_WEIGHT: max_weight,
        }
    )
    pks: dict[int, list[bytes]] = {}
    for nid in range(1, n + 1):
        states[nid] = fm.SecAggPlusState(nid=nid)
        wire = ck.on_client(lambda nid=nid: reply(fm._setup(states[nid], setup)))
        up[nid] += len(wire)
        rec = ck.on_server(STAGE_ADVERTISE, lambda wire=wire: _record(wire, rec_key))
        pks[nid] = [rec[Key.PUBLIC_KEY_1], rec[Key.PUBLIC_KEY_2]]
    fwd_src: dict[int, list[int]] = {nid: [] for nid in pks}
    fwd_ct: dict[int, list[bytes]] = {nid: [] for nid in pks}
    for nid in range(1, n + 1):
        cfg = ConfigRecord({str(v): pks[v] for v in sorted(nbrs[nid])})
        wire = ck.on_client(lambda nid=nid, cfg=cfg: reply(fm._share_keys(states[nid], cfg)))
        up[nid] += len(wire)

        def route(wire: bytes = wire, nid: int = nid) -> None:
            rec = _record(wire, rec_key)
            for dst, ct in zip(rec[Key.DESTINATION_LIST], rec[Key.CIPHERTEXT_LIST], strict=True):
                fwd_src[dst].append(nid)
                fwd_ct[dst].append(ct)

        ck.on_server(STAGE_SHARE, route)
    masked_sum: list[np.ndarray] | None = None
    active = [nid for nid in range(1, n + 1) if nid not in dropped]
    for nid in active:
        cfg = ConfigRecord({Key.CIPHERTEXT_LIST: fwd_ct[nid], Key.SOURCE_LIST: fwd_src[nid]})
        params = ndarrays_to_parameters([updates[nid - 1]])
        weight = updates.weights[nid - 1]
        wire = ck.on_client(
            lambda nid=nid, cfg=cfg, p=params, w=weight: reply(
                fm._collect_masked_vectors(states[nid], cfg, w, p)
            )
        )
        up[nid] += len(wire)

        def fold(wire: bytes = wire) -> None:
            nonlocal masked_sum
            vec = [bytes_to_ndarray(b) for b in _record(wire, rec_key)[Key.MASKED_PARAMETERS]]
            masked_sum = vec if masked_sum is None else parameters_addition(masked_sum, vec)

        ck.on_server(STAGE_MASKED, fold)
    assert masked_sum is not None
    masked_vector = ck.on_server(STAGE_MASKED, lambda: parameters_mod(masked_sum, mod))
    collected: dict[int, list[bytes]] = {nid: [] for nid in range(1, n + 1)}
    active_set, dead_set = set(active), set(dropped)
    for nid in active:
        own = nbrs[nid]
        cfg = ConfigRecord(
            {
                Key.ACTIVE_NODE_ID_LIST: sorted(own & active_set),
                Key.DEAD_NODE_ID_LIST: sorted(own & dead_set),
            }
        )
        wire = ck.on_client(lambda nid=nid, cfg=cfg: reply(fm._unmask(states[nid], cfg)))
        up[nid] += len(wire)

        def collect(wire: bytes = wire) -> None:
            rec = _record(wire, rec_key)
            for owner, share in zip(rec[Key.NODE_ID_LIST], rec[Key.SHARE_LIST], strict=True):
                collected[owner].append(share)

        ck.on_server(STAGE_UNMASK, collect)

    def unmask() -> list[np.ndarray]:
        vector = masked_vector
        for nid, share_list in collected.items():
            secret = combine_shares(share_list)
            if nid in active_set:
                mask = pseudo_rand_gen(secret, mod, get_parameters_shape(vector))
                vector = parameters_subtraction(vector, mask)
            else:
                for other in nbrs[nid] - {nid}:
                    key = generate_shared_key(
                        bytes_to_private_key(secret), bytes_to_public_key(pks[other][0])
                    )
                    mask = pseudo_rand_gen(key, mod, get_parameters_shape(vector))
                    if nid > other:
                        vector = parameters_addition(vector, mask)
                    else:
                        vector = parameters_subtraction(vector, mask)
        vector = parameters_mod(vector, mod)
        total_ratio, vector = factor_extract(vector)
        out = fl_dequantize(vector, clip, target)
        offset = -(len(active) - 1) * clip
        for arr in out:
            arr += offset
            arr *= target / total_ratio
        return out

    result = ck.on_server("finish", unmask)
    weights = np.array([updates.weights[i - 1] for i in active], dtype=np.float64)
    want = sum(updates[i - 1].astype(np.float64) * w for i, w in zip(active, weights, strict=True))
    want /= weights.sum()
    err = float(np.abs(result[0] - want).max())
    return {
        "client_ms": 1000 * ck.client / len(active),
        "server_ms": 1000 * sum(ck.server.values()),
        "server_stage_ms": {k: 1000 * v for k, v in ck.server.items()},
        "up_bytes": float(np.mean([up[i] for i in active])),
        "max_abs_error": err,
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
    masked_fields = {keys.SECAGG_DP_CLIP: 0.0, keys.SECAGG_DP_NOISE: 0.0}
    down += _size(_request(STAGE_MASKED, {**routed, **masked_fields}, 1))
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


def _median_run(
    repeat: int, baseline: Callable[[], dict[str, Any]], other: Callable[[], dict[str, Any]]
) -> tuple[dict[str, Any], dict[str, Any], float, list[float]]:
    """Run both ``repeat`` times back to back; medians and the median same-run ratio."""
    bases, others, ratios = [], [], []
    for _ in range(repeat):
        b, o = baseline(), other()
        bases.append(b)
        others.append(o)
        ratios.append(o["server_ms"] / b["server_ms"])
    pick = sorted(range(repeat), key=lambda k: ratios[k])[(repeat - 1) // 2]  # the median run
    return bases[pick], others[pick], statistics.median(ratios), ratios


def _graphs(n: int, full_graph_up_to: int) -> list[int]:
    """num_shares values to run: the complete graph (small n) and SecAgg+'s 2⌈log2 n⌉ + 1."""
    plus = 2 * math.ceil(math.log2(n)) + 1
    out = [0] if n <= full_graph_up_to else []
    if plus < n:
        out.append(plus)
    return out


def main() -> None:
    """Run the benchmark and print the tables."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="n in {10, 50}, d = 20 000, 1 repeat")
    ap.add_argument("--clients", help="comma-separated client counts (default 10,50,100,1000)")
    ap.add_argument("--params", type=int, help="parameters d (default 100 000)")
    ap.add_argument("--repeat", type=int, help="runs per configuration (default 3)")
    ap.add_argument("--no-flower", action="store_true", help="skip the Flower side-by-side")
    ap.add_argument(
        "--flower-up-to", type=int, default=100, help="largest n for the Flower side-by-side"
    )
    ap.add_argument(
        "--flower-complete-up-to",
        type=int,
        default=50,
        help="largest n of a complete-graph Flower round (Flower's Shamir is O(n²) per client)",
    )
    ap.add_argument("--json", type=Path, help="write the rows as JSON")
    args = ap.parse_args()
    torch.set_num_threads(1)  # one core for every mode (a shared machine: no thread spinning)
    warm = Updates(3, 1000, 0)
    plaintext(warm)  # lazy imports and first-call costs out of the figures
    secure(warm, 0, set())
    if not args.no_flower:
        flower_secure(warm, 0, set())
    if args.clients:
        ns = [int(x) for x in args.clients.split(",")]
    else:
        ns = [10, 50] if args.quick else [10, 50, 100, 1000]
    d = args.params or (20_000 if args.quick else 100_000)
    repeat = args.repeat or (1 if args.quick else 3)
    rows, flower_rows = [], []
    print(
        f"d = {d} parameters; CPU ms of this process, median of {repeat} run(s); x = median "
        "of same-run ratios; client ms = mean per client; bytes per client per round"
    )
    print(
        f"{'clients':>7} {'graph':>9} {'drop':>4} {'bits':>4} {'plain srv ms':>12} "
        f"{'secagg srv ms':>13} {'x':>6} {'plain cli ms':>12} {'secagg cli ms':>13} {'x':>6} "
        f"{'plain up B':>11} {'secagg up B':>11} {'x':>5} {'secagg down B':>13} {'exact':>5}"
    )
    for n in ns:
        updates = Updates(n, d, seed=n)
        for num_shares in _graphs(n, full_graph_up_to=100):
            for frac in (0.0, 0.1):
                dropped = set(range(2, 2 + int(frac * n)))
                base, sec, ratio, ratios = _median_run(
                    repeat,
                    lambda u=updates: plaintext(u),
                    lambda u=updates, k=num_shares, dr=dropped: secure(u, k, dr),
                )
                row = {
                    "clients": n,
                    "params": d,
                    "graph": "complete" if sec["shares"] == n else f"k={sec['shares'] - 1}",
                    "dropped": len(dropped),
                    "plaintext": base,
                    "secagg": sec,
                    "server_time_ratio": ratio,
                    "server_time_ratios": ratios,
                    "client_time_ratio": sec["client_ms"] / base["client_ms"],
                    "upload_ratio": sec["up_bytes"] / base["up_bytes"],
                }
                rows.append(row)
                print(
                    f"{n:>7} {row['graph']:>9} {len(dropped):>4} {sec['ring_bits']:>4} "
                    f"{base['server_ms']:>12.1f} {sec['server_ms']:>13.1f} "
                    f"{ratio:>6.2f} {base['client_ms']:>12.2f} "
                    f"{sec['client_ms']:>13.2f} {row['client_time_ratio']:>6.1f} "
                    f"{base['up_bytes']:>11.0f} {sec['up_bytes']:>11.0f} "
                    f"{row['upload_ratio']:>5.2f} {sec['down_bytes']:>13.0f} "
                    f"{sec['exact']!s:>5}",
                    flush=True,
                )
    print()
    print("where the coordinator's secagg time goes (CPU ms by stage, same runs as above)")
    stages = [STAGE_ADVERTISE, STAGE_SHARE, STAGE_MASKED, STAGE_UNMASK, "finish", "fold"]
    print(f"{'clients':>7} {'graph':>9} {'drop':>4} " + " ".join(f"{s:>14}" for s in stages))
    for row in rows:
        per = row["secagg"]["server_stage_ms"]
        print(
            f"{row['clients']:>7} {row['graph']:>9} {row['dropped']:>4} "
            + " ".join(f"{per.get(s, 0.0):>14.1f}" for s in stages)
        )
    if not args.no_flower:
        print()
        print(
            "side by side: the same rounds with Flower's own SecAgg+ primitives (flwr 1.41; "
            "x = Flower / ours, median of same-run ratios)"
        )
        print(
            f"{'clients':>7} {'graph':>9} {'drop':>4} {'ours srv ms':>11} {'Flower srv ms':>13} "
            f"{'x':>7} {'ours up B':>10} {'Flower up B':>11} {'Flower max err':>14}"
        )
        for n in [n for n in ns if n <= args.flower_up_to]:
            updates = Updates(n, d, seed=n)
            for num_shares in _graphs(n, full_graph_up_to=args.flower_complete_up_to):
                for frac in (0.0, 0.1):
                    dropped = set(range(2, 2 + int(frac * n)))
                    ours, theirs, ratio, ratios = _median_run(
                        repeat,
                        lambda u=updates, k=num_shares, dr=dropped: secure(u, k, dr),
                        lambda u=updates, k=num_shares, dr=dropped: flower_secure(u, k, dr),
                    )
                    shares = graph.degree(n, num_shares) + 1
                    row = {
                        "clients": n,
                        "params": d,
                        "graph": "complete" if shares == n else f"k={shares - 1}",
                        "dropped": len(dropped),
                        "ours": ours,
                        "flower": theirs,
                        "flower_over_ours": ratio,
                        "ratios": ratios,
                    }
                    flower_rows.append(row)
                    print(
                        f"{n:>7} {row['graph']:>9} {len(dropped):>4} {ours['server_ms']:>11.1f} "
                        f"{theirs['server_ms']:>13.1f} {ratio:>7.1f} {ours['up_bytes']:>10.0f} "
                        f"{theirs['up_bytes']:>11.0f} {theirs['max_abs_error']:>14.2e}",
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
        args.json.write_text(
            json.dumps(
                {"rows": rows, "flower_side_by_side": flower_rows, "bonawitz_setting": bz},
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
