"""The institution's side of secure aggregation (SecAgg+) inside the Flower ``ClientApp``.

The coordinator drives four stages with ``train`` messages that carry a ``secagg``
record (see :mod:`fedcommons.privacy.secagg.protocol`); this module answers them with a
:class:`~fedcommons.privacy.secagg.protocol.ClientSession` kept between messages in the
node's ``Context.state`` (it holds the round's private keys, which never leave the
SuperNode). In the masked-input stage the client trains as in a plaintext round, encodes
its delta into the ring (shared random-k support, fixed-point quantization, the weight
alongside; under central DP the L2 clip happens here, since the coordinator never sees
the individual update) and sends only the masked vector: no individual metrics.

A site that sets ``secagg-required = true`` in its node config refuses every plaintext
round with error code :data:`~fedcommons.wire.keys.SECAGG_REQUIRED_CODE`.

A site that sets ``secagg-roster`` (the consortium's roster of Ed25519 keys, see
:mod:`fedcommons.privacy.secagg.roster`) and ``secagg-signing-key`` (its own key) signs
its key advertisements and refuses any round in which a neighbour's advertisement does
not verify against the roster: a coordinator that substitutes keys is caught before the
site derives a pairwise key or sends a share.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict

from fedcommons.client_sdk.compression import ClientState
from fedcommons.errors import SecAggProtocolError, SecAggRosterError
from fedcommons.logs import get_logger
from fedcommons.privacy.distributed import norm_bound, skellam_noise
from fedcommons.privacy.secagg.protocol import (
    STAGE_ADVERTISE,
    STAGE_MASKED,
    STAGE_SHARE,
    STAGE_UNMASK,
    ClientSession,
    RoundParams,
)
from fedcommons.privacy.secagg.quantize import clip_l2_and_round, quantize, support, to_ring
from fedcommons.privacy.secagg.roster import AdvertisementSigner, Roster
from fedcommons.wire import keys
from fedcommons.wire.codec import flatten

log = get_logger("fedcommons.client")

_STATE_KEY = "secagg-session"


def secagg_required(node_config: Mapping[str, Any]) -> bool:
    """Whether this institution's node config demands secure aggregation."""
    value = node_config.get(keys.SECAGG_REQUIRED, False)
    return str(value).strip().lower() in {"true", "1", "yes"}


def error_feedback_on(node_config: Mapping[str, Any], cfg: Mapping[str, Any]) -> bool:
    """Whether error feedback is on: the site's node config decides, else the round's config."""
    value = node_config.get(keys.ERROR_FEEDBACK, cfg.get(keys.ERROR_FEEDBACK, True))
    return str(value).lower() not in {"false", "0"}


def refuse_plaintext(msg: Message) -> Message:
    """The error reply of a site that requires secure aggregation to a plaintext round."""
    log.warning("client.secagg-required", detail="plaintext round refused")
    return Message(
        Error(
            code=keys.SECAGG_REQUIRED_CODE,
            reason="secagg-required: this institution sends updates only under secure aggregation",
        ),
        reply_to=msg,
    )


def check_site_minimum(params: RoundParams, node_config: Mapping[str, Any]) -> None:
    """Refuse a round whose threshold is below the site's ``secagg-min-threshold``.

    The threshold is how many colluding neighbours (with the coordinator) it takes to
    unmask this site's update; an institution may insist on a floor.
    """
    raw = node_config.get(keys.SECAGG_MIN_THRESHOLD, 0)
    try:
        minimum = int(raw)
    except (TypeError, ValueError):
        raise SecAggProtocolError(f"secagg-min-threshold {raw!r} is not an integer") from None
    if params.threshold < minimum:
        raise SecAggProtocolError(
            f"round threshold {params.threshold} is below this institution's "
            f"secagg-min-threshold {minimum}"
        )


def check_site_noise(
    params: RoundParams, record: Mapping[str, Any], node_config: Mapping[str, Any]
) -> None:
    """Refuse a round whose distributed DP noise is below the site's own floor.

    With node config ``dp-min-noise-multiplier`` z_site, the noise every surviving client
    adds must sum, with only ``threshold`` of them (the fewest a round can unmask with),
    to at least ``(z_site·Δ₂)²``; a round without distributed noise, or whose clip exceeds
    the ring's range, is refused. The site does not take the coordinator's word for it.
    """
    raw = node_config.get(keys.SECAGG_DP_MIN_NOISE, 0)
    try:
        floor = float(raw or 0)
    except (TypeError, ValueError):
        raise SecAggProtocolError(f"{keys.SECAGG_DP_MIN_NOISE} {raw!r} is not a number") from None
    variance = float(record.get(keys.SECAGG_DP_NOISE, 0.0) or 0.0)
    if variance > 0 and float(record.get(keys.SECAGG_DP_CLIP, 0.0) or 0.0) > params.ring.clip:
        raise SecAggProtocolError("distributed DP round clips beyond the ring's range")
    if floor <= 0:
        return
    if variance <= 0:
        raise SecAggProtocolError(
            f"this institution sends updates only with distributed DP noise (its "
            f"{keys.SECAGG_DP_MIN_NOISE} is {floor:g}); the round adds none"
        )
    bound = norm_bound(params.ring.levels, params.length)
    z = math.sqrt(variance * params.threshold) / bound
    if z < floor:
        raise SecAggProtocolError(
            f"the round's distributed noise gives noise multiplier {z:.4g} with "
            f"{params.threshold} survivors, below this institution's floor {floor:g}"
        )


#: Environment fallbacks of the roster settings, for Flower's simulation engine (it gives
#: every simulated SuperNode the same environment and no node config of its own):
#: ``{partition-id}`` in a value becomes the node's partition id.
SITE_ENV = {
    keys.SECAGG_ROSTER: "FEDCOMMONS_SECAGG_ROSTER",
    keys.SECAGG_SIGNING_KEY: "FEDCOMMONS_SECAGG_SIGNING_KEY",
    keys.SECAGG_ROSTER_SIGNER: "FEDCOMMONS_SECAGG_ROSTER_SIGNER",
}


def _site_setting(node_config: Mapping[str, Any], key: str) -> str:
    """A roster setting: the node config's, else its environment fallback."""
    value = str(node_config.get(key, "") or "") or os.environ.get(SITE_ENV[key], "")
    return value.replace("{partition-id}", str(node_config.get("partition-id", "")))


def site_roster(node_config: Mapping[str, Any]) -> Roster | None:
    """The roster this institution authenticates key advertisements with, if it set one.

    Raises :class:`~fedcommons.errors.SecAggRosterError` when the file is unreadable or
    does not verify under the pinned ``secagg-roster-signer``.
    """
    path = _site_setting(node_config, keys.SECAGG_ROSTER)
    if not path:
        return None
    return Roster.load(path, _site_setting(node_config, keys.SECAGG_ROSTER_SIGNER) or None)


def site_signer(
    node_config: Mapping[str, Any], roster: Roster | None
) -> AdvertisementSigner | None:
    """This institution's advertisement signer (required once it holds a roster)."""
    path = _site_setting(node_config, keys.SECAGG_SIGNING_KEY)
    if roster is None:
        if path:
            raise SecAggRosterError(
                f"{keys.SECAGG_SIGNING_KEY} is set but {keys.SECAGG_ROSTER} is not: set both"
            )
        return None
    if not path:
        raise SecAggRosterError(
            f"{keys.SECAGG_ROSTER} is set: {keys.SECAGG_SIGNING_KEY} must name this "
            "institution's Ed25519 key, listed in the roster"
        )
    return AdvertisementSigner.load(path, roster)


def handle_secagg(
    msg: Message, context: Context, local_round: Callable[[Message, Context], Any]
) -> Message:
    """Answer one secure-aggregation stage; protocol violations become error replies.

    ``local_round`` trains (the ClientApp's plaintext training path) and returns its
    ``LocalRound`` or an error reply.
    """
    record = msg.content[keys.SECAGG_RECORD]
    stage = str(record.get(keys.SECAGG_STAGE, ""))
    extra: dict[str, Any] = {}
    try:
        if stage == STAGE_ADVERTISE:
            params = RoundParams.from_record(record)
            check_site_minimum(params, context.node_config)
            session = ClientSession(params, int(record[keys.SECAGG_INDEX]))
            roster = site_roster(context.node_config)
            payload = session.advertise(site_signer(context.node_config, roster))
        else:
            session = _load(context)
            if int(record.get("round", -1)) != session.params.round_no:
                raise SecAggProtocolError(
                    f"{stage} request for round {record.get('round')}, session is for round "
                    f"{session.params.round_no}"
                )
            if stage == STAGE_SHARE:
                payload = session.share_keys(record, site_roster(context.node_config))
            elif stage == STAGE_MASKED:
                session.receive_shares(record)  # authenticate before training or sending
                check_site_noise(session.params, record, context.node_config)
                trained = local_round(msg, context)
                if isinstance(trained, Message):
                    _save(context, None)
                    return trained
                vector = encode_input(trained, session.params, record, context)
                payload = session.mask(vector)
                extra = _spend_records(trained)
            elif stage == STAGE_UNMASK:
                payload = session.unmask(record)
            else:
                raise SecAggProtocolError(f"unknown secure-aggregation stage {stage!r}")
        _save(context, None if session.stage == "done" else session)
    except (SecAggProtocolError, SecAggRosterError) as exc:
        _save(context, None)  # a refused round leaves no secrets behind
        log.warning("client.secagg-refused", stage=stage, detail=str(exc))
        return Message(
            Error(code=keys.SECAGG_PROTOCOL_ERROR_CODE, reason=f"secagg-{stage}: {exc}"),
            reply_to=msg,
        )
    content = RecordDict({keys.SECAGG_RECORD: ConfigRecord({keys.SECAGG_STAGE: stage, **payload})})
    for name, rec in extra.items():
        content[name] = rec
    return Message(content=content, reply_to=msg)


def encode_input(
    trained: Any, params: RoundParams, record: Mapping[str, Any], context: Context
) -> np.ndarray:
    """This client's ring vector ``[w·q(Δ)…, aux…]`` for the masked-input stage.

    Dense or the round's shared random-k coordinates; the value coding's resolution
    (fp32: 24 bits, fp16/bf16: 16, int8, int4) sets the fixed-point levels; error
    feedback (the part compression and quantization dropped) stays on the client as in
    plaintext rounds. Weight ``w`` = examples capped at the ring's ``max_weight``; under
    central DP ``w`` = 1 and the L2 clip applies here. The aux slots are ``[w, clipped]``.
    Under distributed DP (the request names a Skellam variance) the update is clipped,
    rounded within the sensitivity bound Δ₂ and noised here, and the only aux slot is
    ``[1]`` (:mod:`fedcommons.privacy.distributed`).
    """
    cfg, spec, result = trained.cfg, trained.spec, trained.result
    ring = params.ring
    flat = flatten(result.delta).astype(np.float64)
    use_ef = spec.lossy and error_feedback_on(context.node_config, cfg)
    state = ClientState.for_run(context.node_config, str(cfg.get(keys.RUN_TAG, "")))
    if use_ef:
        residual = state.load_flat(state.residual_path, flat.size, "residual")
        if residual is not None:
            flat = flat + residual
    idx = support(spec.sparsifier, spec.density, int(cfg.get(keys.COMPRESSION_SEED, 0)), flat.size)
    x = flat if idx is None else flat[idx]
    if x.size != params.length:
        raise SecAggProtocolError(
            f"update has {x.size} coordinates to send, the round expects {params.length}"
        )
    dp_clip = float(record.get(keys.SECAGG_DP_CLIP, 0.0) or 0.0)
    variance = float(record.get(keys.SECAGG_DP_NOISE, 0.0) or 0.0)
    if variance > 0:  # distributed DP: clip, round within Δ₂; the noise is added below
        codes, _ = clip_l2_and_round(x, ring, dp_clip, norm_bound=norm_bound(ring.levels, x.size))
        weight, aux = 1, [1]  # no clipped flag: nothing un-noised about the update leaves
    elif dp_clip > 0:
        codes, clipped = clip_l2_and_round(x, ring, dp_clip)
        weight, aux = 1, [1, int(clipped)]
    else:
        codes, n_clipped = quantize(x, ring)
        weight = min(int(result.num_examples), ring.max_weight)
        if weight < result.num_examples:
            log.info("client.secagg-weight-capped", examples=result.num_examples, cap=weight)
        if n_clipped:
            log.info("client.secagg-clipped", coordinates=n_clipped, clip=ring.clip)
        aux = [weight, int(n_clipped > 0)]
    if use_ef:
        sent = codes.astype(np.float64) * ring.step
        recon = sent if idx is None else np.zeros_like(flat)
        if idx is not None:
            recon[idx] = sent
        state.save_flat(state.residual_path, "residual", (flat - recon).astype(np.float32))
    if variance > 0:  # after error feedback: the noise is never carried into later rounds
        codes = codes + skellam_noise(codes.size, variance)
    return to_ring(codes, weight, aux, ring)


def _spend_records(trained: Any) -> dict[str, Any]:
    """The DP-SGD spend record (institution-level metadata, not the update), if any."""
    if trained.dp is None:
        return {}
    return {
        keys.DP_SPEND: ConfigRecord(trained.result.spend.to_record()),
        keys.REPLY_METRICS: MetricRecord({keys.DP_CLAIM: 1}),
    }


def _load(context: Context) -> ClientSession:
    record = context.state.config_records.get(_STATE_KEY)
    if record is None or "session" not in record:
        raise SecAggProtocolError("no secure-aggregation session: advertise-keys came first?")
    return ClientSession.from_bytes(bytes(record["session"]))


def _save(context: Context, session: ClientSession | None) -> None:
    if session is None:
        if _STATE_KEY in context.state:
            del context.state[_STATE_KEY]
        return
    context.state[_STATE_KEY] = ConfigRecord({"session": session.to_bytes()})
