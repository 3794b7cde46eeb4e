"""One federated round under secure aggregation (SecAgg+), driven on Flower's ``Grid``.

:func:`fedcommons.coordinator.run.run_round` hands a round to
:func:`run_secure_round` when the run config sets ``secagg = true``. Four stages of
``train`` messages (see :mod:`fedcommons.privacy.secagg.protocol`) replace the single
train message of a plaintext round; the training itself happens in the masked-input
stage. The coordinator folds each masked vector into one running ring sum as it arrives
(memory O(model)), unmasks the sum with the survivors' shares, and learns
``Σ wᵢ Δᵢ`` and ``Σ wᵢ`` only. That sum then takes the plaintext path: the strategy's
step (FedAvg, FedAdam), central DP's noise (added after unmasking), the validation of
the candidate, and publishing.

Combinations that need individual updates are refused before any round starts
(:func:`check_secagg_compatible`).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.serde import recorddict_to_proto
from flwr.serverapp import Grid

from fedcommons.coordinator import faults
from fedcommons.coordinator.intake import Rejections, error_reason
from fedcommons.coordinator.prepare import PreparedRun, check_secagg_compatible
from fedcommons.coordinator.round import (
    POLL_INTERVAL_S,
    RoundReport,
    apply_step,
    compression_seed,
    pull_available,
    push_round,
    report_summary,
    round_content,
    score_round,
)
from fedcommons.coordinator.sampling import sample_round
from fedcommons.errors import (
    ConfigError,
    RoundFailedError,
    SecAggAbortedError,
    SecAggProtocolError,
)
from fedcommons.logs import get_logger
from fedcommons.observability import events as observe
from fedcommons.privacy.central import DPFedAvg
from fedcommons.privacy.client_spend import parse_spend
from fedcommons.privacy.distributed import SkellamMean, SkellamRound, calibrate, ring_bits_for
from fedcommons.privacy.secagg import graph
from fedcommons.privacy.secagg.protocol import (
    STAGE_ADVERTISE,
    STAGE_MASKED,
    STAGE_SHARE,
    STAGE_UNMASK,
    RoundParams,
    ServerSession,
    check_threshold,
)
from fedcommons.privacy.secagg.quantize import LEVELS, RingSpec, dequantize, ring_bits, support
from fedcommons.strategies import guarded_begin, guarded_finalize, guarded_fold
from fedcommons.wire import ClientUpdate, keys
from fedcommons.wire.codec import CompressionSpec

log = get_logger("fedcommons.coordinator")


def round_threshold(config: Any, shares: int) -> int:
    """The round's threshold: ``secagg-threshold``, else ⌊2·shares/3⌋ + 1."""
    return int(config.secagg_threshold) or (2 * shares) // 3 + 1


def distributed_calibration(
    config: Any, spec: CompressionSpec, length: int, threshold: int
) -> SkellamRound | None:
    """The round's Skellam noise under distributed DP (``dp.mechanism = skellam``), else None.

    Calibrated so that the fewest inputs a completed round can hold — the threshold, or
    ``min-clients`` when larger (SecAgg+ aborts below it) — carry variance (z·Δ₂)².
    """
    dp = config.central_dp
    if dp is None or not dp.distributed:
        return None
    fewest = max(int(threshold), int(config.min_clients))
    return calibrate(dp.noise_multiplier, dp.clip_norm, LEVELS[spec.values], length, fewest)


def ring_for_round(
    config: Any, spec: CompressionSpec, n: int, calibration: SkellamRound | None = None
) -> RingSpec:
    """The public fixed-point encoding of a round with ``n`` participants.

    Levels follow the value coding (fp32: 2^23 − 1, fp16/bf16: 2^15 − 1, int8: 127, int4:
    7). Without central DP the range is ``±secagg-clip`` per coordinate and weights go up
    to ``secagg-max-weight``; with it the range is the DP clip norm C and every weight is
    1 (DP-FedAvg's uniform user weights). Two aux slots follow the values: the weight,
    and 1 if the client clipped its update (the coordinator learns how many did).
    The ring is the smallest with no possible overflow, or ``secagg-bits`` if that fits.
    Under distributed DP (``calibration``) one aux slot (the weight, 1 per client: no
    clipped flag) follows, and the ring also holds the noise of n clients except with
    probability :data:`~fedcommons.privacy.distributed.WRAP_BETA`.
    """
    levels = LEVELS[spec.values]
    dp = config.central_dp
    if dp is not None:
        clip, max_weight = float(dp.clip_norm), 1
    else:
        clip, max_weight = float(config.secagg_clip), int(config.secagg_max_weight)
    if calibration is not None:
        need = ring_bits_for(n, levels, calibration.dim, calibration.local_variance)
    else:
        need = ring_bits(n, max_weight, levels)
    bits = int(config.secagg_bits) or need
    if need > 64 or bits < need:
        raise SecAggAbortedError(
            f"{n} participants x weight {max_weight} x {levels} levels"
            + (" plus their noise" if calibration is not None else "")
            + f" need a {need}-bit ring"
            + (f"; secagg-bits is {bits}" if config.secagg_bits else "")
            + ": lower secagg-max-weight or clients-per-round, or use a coarser value coding"
        )
    # aux slots: the weight, and whether the client clipped (the sum counts clipped clients)
    aux = 1 if calibration is not None else 2
    return RingSpec(bits=bits, levels=levels, clip=clip, max_weight=max_weight, aux=aux)


def plan_round(config: Any, clients: int, num_params: int) -> dict[str, Any]:
    """Graph, threshold, ring, quantization step and bytes of one planned round.

    For ``clients`` participants and a model of ``num_params`` parameters; the bytes are
    the exact serialized sizes one client sends and receives (base weights excluded).

    Raises :class:`~fedcommons.errors.ConfigError` (or its
    :class:`~fedcommons.errors.SecAggIncompatibleError` subclass) when the round would
    be refused.
    """
    from fedcommons.privacy.secagg.primitives import NONCE_BYTES
    from fedcommons.privacy.secagg.protocol import _SHARE_PLAIN
    from fedcommons.privacy.secagg.roster import SIGNATURE_BYTES
    from fedcommons.privacy.secagg.shamir import SHARE_BYTES
    from fedcommons.strategies import create_strategy

    if clients < 2 or num_params < 1:
        raise ConfigError("a secure round needs >= 2 clients and >= 1 parameter")
    check_secagg_compatible(create_strategy(config.strategy, config.strategy_params), config)
    spec = CompressionSpec.parse(config.compression)
    shares = graph.degree(clients, config.secagg_num_shares) + 1
    threshold = round_threshold(config, shares)
    try:
        check_threshold(threshold, shares)
    except SecAggProtocolError as exc:
        raise ConfigError(f"{clients} clients: {exc}") from None
    if spec.sparsifier == "randk":
        length = min(num_params, max(1, round(spec.density * num_params)))
    else:
        length = num_params
    calibration = distributed_calibration(config, spec, length, threshold)
    try:
        ring = ring_for_round(config, spec, clients, calibration)
    except SecAggAbortedError as exc:
        raise ConfigError(str(exc)) from None
    k = shares - 1
    ct = bytes(NONCE_BYTES + _SHARE_PLAIN.size + 16)
    share = bytes(SHARE_BYTES)
    key = bytes(32)
    nbrs = list(range(2, k + 2))
    params = RoundParams("x" * 16, 1, clients, config.secagg_num_shares, threshold, 0, ring, length)

    def size(stage: str, payload: Mapping[str, Any]) -> int:  # a request
        return int(recorddict_to_proto(_request(stage, payload, 1)).ByteSize())

    def reply_size(stage: str, payload: Mapping[str, Any]) -> int:  # as the ClientApp replies
        record = ConfigRecord({keys.SECAGG_STAGE: stage, **payload})
        return int(recorddict_to_proto(RecordDict({keys.SECAGG_RECORD: record})).ByteSize())

    masked = bytes(((length + ring.aux) * ring.bits + 7) // 8)
    signed = config.secagg_auth == "roster"
    member, sig = "m" * 16, bytes(SIGNATURE_BYTES)  # a 16-character roster name
    own_sig = {"member": member, "sig": sig} if signed else {}
    peer_sigs = {"member": [member] * k, "sig": [sig] * k} if signed else {}
    noise = {keys.SECAGG_DP_NOISE: 0.0}
    up = {
        STAGE_ADVERTISE: reply_size(STAGE_ADVERTISE, {"c-pk": key, "s-pk": key, **own_sig}),
        STAGE_SHARE: reply_size(STAGE_SHARE, {"dst": nbrs, "ct": [ct] * k, "b-commit": key}),
        STAGE_MASKED: reply_size(STAGE_MASKED, {"masked": masked}),
        STAGE_UNMASK: reply_size(
            STAGE_UNMASK,
            {"b-idx": [1, *nbrs], "b-share": [share] * (k + 1), "s-idx": [], "s-share": []},
        ),
    }
    down = {
        STAGE_ADVERTISE: size(STAGE_ADVERTISE, {**params.to_record(), keys.SECAGG_INDEX: 1}),
        STAGE_SHARE: size(
            STAGE_SHARE, {"idx": nbrs, "c-pk": [key] * k, "s-pk": [key] * k, **peer_sigs}
        ),
        STAGE_MASKED: size(
            STAGE_MASKED, {"src": nbrs, "ct": [ct] * k, keys.SECAGG_DP_CLIP: 0.0, **noise}
        ),
        STAGE_UNMASK: size(STAGE_UNMASK, {"survivors": nbrs, "dropped": []}),
    }
    dense = 4 * num_params
    return {
        "clients": clients,
        "parameters": num_params,
        "coordinates_sent": length,
        "neighbours": k,
        "shares": shares,
        "threshold": threshold,
        "tolerated_dropouts_per_neighbourhood": shares - threshold,
        "ring_bits": ring.bits,
        "levels": ring.levels,
        "clip": ring.clip,
        "max_weight": ring.max_weight,
        "quantization_step": ring.step,
        "upload_bytes": up,
        "download_bytes": down,
        "upload_total": sum(up.values()),
        "download_total": sum(down.values()),
        "dense_fp32_bytes": dense,
        "upload_vs_dense_fp32": sum(up.values()) / dense,
        "authenticated": signed,
        "distributed_dp": calibration.to_dict() if calibration is not None else None,
    }


# ---------------------------------------------------------------------------------------
# The round
# ---------------------------------------------------------------------------------------
def stage_reply_cap(length: int, shares: int) -> int:
    """The most bytes one client's reply to any stage may hold, checked before allocation.

    A reply holds at most the masked vector (``length`` ring elements of up to 64 bits:
    8 bytes a value) or one sealed share pair per neighbour (102 bytes, plus record
    framing); the cap allows twice the vector, 1 KiB per share and 64 KiB of framing.
    """
    return 16 * length + 1024 * shares + 65536


def _reply_bytes(reply: Message) -> int:
    """Serialized size of a reply's content (Flower's protobuf encoding)."""
    return int(recorddict_to_proto(reply.content).ByteSize())


class _Stages:
    """Pushes one stage's requests and pulls the replies until all came or time ran out."""

    def __init__(
        self, grid: Grid, round_no: int, node_of: Mapping[int, int], max_reply_bytes: int
    ) -> None:
        self.grid = grid
        self.round_no = round_no
        self.max_reply_bytes = max_reply_bytes  # see stage_reply_cap
        self.node_of = dict(node_of)
        self.rejections = Rejections(round_no)
        self.timed_out: Counter[str] = Counter()
        self.upload: Counter[int] = Counter()

    def reject(self, index: int, reason: str, detail: str, stage: str) -> None:
        self.rejections.reject(self.node_of[index], reason, detail, stage)

    def exchange(
        self,
        stage: str,
        requests: Mapping[int, RecordDict],
        timeout: float,
        add: Callable[[int, dict[str, Any]], None],
        on_accepted: Callable[[int, Message], None] | None = None,
    ) -> None:
        """Send ``requests`` (participant -> content); hand each reply to ``add`` on arrival.

        Replies are not kept: a masked vector is folded into the server's running sum as
        soon as it arrives (memory O(model), whatever the number of clients). Error
        replies, foreign or malformed records and replies ``add`` refuses are rejected
        and counted; ``on_accepted`` sees each accepted reply.
        """
        order = list(requests)
        messages = [
            Message(
                content=requests[i],
                dst_node_id=self.node_of[i],
                message_type="train",
                group_id=str(self.round_no),
                ttl=timeout,
            )
            for i in order
        ]
        deadline = time.monotonic() + timeout
        pushed = push_round(self.grid, messages, deadline, self.round_no)
        pending = dict(zip(pushed, order, strict=True))
        del messages
        while pending and time.monotonic() < deadline:
            got = list(
                pull_available(self.grid, set(pending), deadline, max_bytes=self.max_reply_bytes)
            )
            if not got:
                time.sleep(POLL_INTERVAL_S)
                continue
            for reply in got:
                index = pending.pop(reply.metadata.reply_to_message_id, None)
                if index is None:
                    continue
                if stage == STAGE_MASKED:  # the stage that carries the update
                    observe.reply_received(reply)
                if reply.has_error():
                    self.reject(index, error_reason(reply), str(reply.error.reason), stage)
                    continue
                record = reply.content.config_records.get(keys.SECAGG_RECORD)
                if record is None or record.get(keys.SECAGG_STAGE) != stage:
                    self.reject(index, "secagg-malformed", f"no {stage} reply record", stage)
                    continue
                try:
                    add(index, dict(record))
                except SecAggProtocolError as exc:
                    self.reject(index, "secagg-malformed", str(exc), stage)
                    continue
                except Exception as exc:  # whatever a reply breaks, the round goes on
                    detail = f"{type(exc).__name__}: {exc}"[:500]
                    self.reject(index, "malformed", detail, stage)
                    continue
                self.upload[index] += _reply_bytes(reply)
                if on_accepted is not None:
                    on_accepted(index, reply)
            del got
        if pending:
            self.timed_out[stage] += len(pending)
            log.warning("secagg.stage_timeout", stage=stage, missing=len(pending))


def _request(stage: str, payload: Mapping[str, Any], round_no: int) -> RecordDict:
    return RecordDict(
        {keys.SECAGG_RECORD: ConfigRecord({keys.SECAGG_STAGE: stage, "round": round_no, **payload})}
    )


def run_secure_round(
    grid: Grid, prepared: PreparedRun, weights: dict[str, torch.Tensor], round_no: int
) -> tuple[dict[str, torch.Tensor], RoundReport, set[int]]:
    """Run one SecAgg+ round; same contract as :func:`~.round.run_round`.

    Raises :class:`~fedcommons.errors.SecAggAbortedError` (a ``RoundFailedError``: the run
    stops, nothing is published) when fewer participants than the threshold remain at any
    stage or a secret cannot be reconstructed.
    """
    config, strategy = prepared.config, prepared.strategy
    started = time.monotonic()
    privacy, nodes, sample = sample_round(grid, prepared, round_no)
    sampled, rate, expected = sample.nodes, sample.sample_rate, sample.expected
    n = len(sampled)
    if n < 2:
        raise SecAggAbortedError(
            f"round {round_no}: secure aggregation needs >= 2 clients, {n} sampled"
        )
    shares = graph.degree(n, config.secagg_num_shares) + 1
    threshold = round_threshold(config, shares)
    try:
        check_threshold(threshold, shares)
    except SecAggProtocolError as exc:
        raise SecAggAbortedError(f"round {round_no} with {n} sampled client(s): {exc}") from None
    spec = CompressionSpec.parse(config.compression)
    seed = compression_seed(prepared.run_tag, round_no)
    total_size = sum(v.numel() for v in weights.values())
    idx = support(spec.sparsifier, spec.density, seed, total_size)
    length = total_size if idx is None else int(idx.size)
    calibration = distributed_calibration(config, spec, length, threshold)
    ring = ring_for_round(config, spec, n, calibration)
    params = RoundParams(
        run_tag=prepared.run_tag,
        round_no=round_no,
        n=n,
        num_shares=config.secagg_num_shares,
        threshold=threshold,
        graph_seed=graph.graph_seed(prepared.run_tag, round_no),
        ring=ring,
        length=length,
    )
    strategy = privacy.start_round(
        round_no,
        strategy,
        population=len(nodes),
        sampled=n,
        sample_rate=rate,
        expected=expected,
        distributed=calibration,
    )
    node_of = {i + 1: int(node) for i, node in enumerate(sampled)}
    stages = _Stages(grid, round_no, node_of, stage_reply_cap(length, shares))
    server = ServerSession(params, require_signatures=config.secagg_auth == "roster")
    log.info(
        "secagg.round_started",
        sampled=n,
        connected=len(nodes),
        shares=shares,
        threshold=threshold,
        ring_bits=ring.bits,
        quantization_step=ring.step,
        length=params.length,
        authenticated=server.require_signatures,
        distributed_dp=calibration is not None,
    )
    stage_timeout = config.secagg_stage_timeout
    base_record = params.to_record()
    # 1. advertise keys
    stages.exchange(
        STAGE_ADVERTISE,
        {
            i: _request(STAGE_ADVERTISE, {**base_record, keys.SECAGG_INDEX: i}, round_no)
            for i in node_of
        },
        stage_timeout,
        server.add_advertise,
    )
    # 2. share keys
    requests = server.share_keys_requests()
    stages.exchange(
        STAGE_SHARE,
        {i: _request(STAGE_SHARE, r, round_no) for i, r in requests.items()},
        stage_timeout,
        server.add_shares,
    )
    # 3. masked input: train, quantize, mask (clients get the base weights here)
    requests = server.masked_input_requests()
    content = round_content(config, weights, round_no, prepared.run_tag)
    dp_clip = float(privacy.central.clip_norm) if privacy.central is not None else 0.0
    masked_requests = {}
    for i, r in requests.items():
        noise = calibration.local_variance if calibration is not None else 0.0
        rd = _request(
            STAGE_MASKED,
            {**r, keys.SECAGG_DP_CLIP: dp_clip, keys.SECAGG_DP_NOISE: noise},
            round_no,
        )
        rd[keys.BASE_ARRAYS] = content[keys.BASE_ARRAYS]
        rd[keys.TRAIN_CONFIG] = content[keys.TRAIN_CONFIG]
        masked_requests[i] = rd
    spends: dict[int, Any] = {}

    def keep_spend(index: int, reply: Message) -> None:
        if keys.DP_SPEND in reply.content.config_records:
            spends[index] = reply.content.config_records[keys.DP_SPEND]

    stages.exchange(
        STAGE_MASKED, masked_requests, config.round_timeout, server.add_masked, keep_spend
    )
    del masked_requests, content
    faults.reached("collecting", round_no)  # crash-recovery test hook (#8)
    # 4. unmask
    requests = server.unmask_requests()
    stages.exchange(
        STAGE_UNMASK,
        {i: _request(STAGE_UNMASK, r, round_no) for i, r in requests.items()},
        stage_timeout,
        server.add_unmask,
    )
    outcome = server.finish()
    survivors = outcome.survivors
    if len(survivors) < config.min_clients and privacy.central is None:
        raise RoundFailedError(
            f"round {round_no}: {len(survivors)} client(s) in the secure sum, need "
            f"{config.min_clients} (rejected: {dict(stages.rejections.counts) or 0})"
        )
    values, aux = dequantize(outcome.total, ring)
    if idx is None:
        full = values
    else:
        full = np.zeros(total_size, dtype=np.float64)
        full[idx] = values
    guarded_begin(strategy, weights)
    examples = 0
    if isinstance(strategy, SkellamMean):  # distributed DP: the noise is in the sum already
        if int(aux[0]) != len(survivors):
            raise SecAggAbortedError(
                f"round {round_no}: the secure sum counts {int(aux[0])} participants, "
                f"{len(survivors)} survived"
            )
        strategy.fold_sum(_unflatten64(full, weights), len(survivors))
    elif isinstance(strategy, DPFedAvg):
        if int(aux[0]) != len(survivors):
            raise SecAggAbortedError(
                f"round {round_no}: the secure sum counts {int(aux[0])} participants, "
                f"{len(survivors)} survived"
            )
        strategy.fold_sum(_unflatten64(full, weights), len(survivors), int(aux[1]))
    else:
        total_weight = int(aux[0])
        if not len(survivors) <= total_weight <= len(survivors) * ring.max_weight:
            raise SecAggAbortedError(
                f"round {round_no}: the secure sum's weight {total_weight} is impossible for "
                f"{len(survivors)} survivor(s)"
            )
        examples = total_weight
        if int(aux[1]):
            log.warning(
                "secagg.clipped",
                clients=int(aux[1]),
                clip=ring.clip,
                hint="some coordinates exceeded secagg-clip and were clipped; raise it",
            )
        mean = _unflatten64(full / total_weight, weights)
        guarded_fold(strategy, ClientUpdate(mean, total_weight, node_id=0))
    for i, record in spends.items():
        privacy.add_client_spend(node_of[i], parse_spend(record))
    faults.reached("aggregating", round_no)
    step = guarded_finalize(strategy, weights)
    rejected_total = stages.rejections.total
    timed_out = sum(stages.timed_out.values())
    privacy.commit_round(accepted=len(survivors), rejected=rejected_total, timed_out=timed_out)
    new_weights = apply_step(weights, step)
    report = score_round(
        prepared,
        weights,
        new_weights,
        round=round_no,
        sampled=n,
        accepted=len(survivors),
        rejected=dict(stages.rejections.counts),
        timed_out=timed_out,
        examples=examples,
        train_loss=math.nan,  # individual losses are not sent under secure aggregation
        started=started,
        upload_bytes={str(node_of[i]): int(stages.upload[i]) for i in survivors},
        connected=len(nodes),
    )
    log.info(
        "secagg.round_finished",
        **report_summary(report),
        survivors=len(survivors),
        dropped={k: len(v) for k, v in outcome.dropped.items()},
        timed_out_by_stage=dict(stages.timed_out),
    )
    return new_weights, report, {node_of[i] for i in survivors}


def _unflatten64(flat: np.ndarray, like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Split a flat float64 vector into float64 tensors shaped like ``like``."""
    out, offset = {}, 0
    for name, ref in like.items():
        size = ref.numel()
        out[name] = torch.from_numpy(np.ascontiguousarray(flat[offset : offset + size])).reshape(
            tuple(ref.shape)
        )
        offset += size
    if offset != flat.size:
        raise ConfigError(f"secure sum has {flat.size} values, the model {offset}")
    return out
