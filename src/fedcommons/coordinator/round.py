"""One plaintext round on a Flower ``Grid``, and the round's report.

Per round: sample nodes, push the base weights and the round config, pull replies as
they arrive, hand each to the reply intake (:mod:`.intake`: decode, validate, reject) and
fold the accepted ones into the streaming aggregator right away (no list of client
updates is kept), apply the step, score the candidate on the validation split. The
secure variant is :mod:`.secure_round`; the run around both is :mod:`.run`.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedcommons.coordinator import faults
from fedcommons.coordinator.config import RunConfig
from fedcommons.coordinator.intake import (
    Rejections,
    decode_reply,
    pull_replies,
    push_round_messages,
)
from fedcommons.coordinator.prepare import PreparedRun
from fedcommons.coordinator.sampling import grid_call, sample_round, transient_grid_error
from fedcommons.errors import (
    RoundFailedError,
    UpdateRejectedError,
)
from fedcommons.logs import get_logger
from fedcommons.memory import release_freed_memory
from fedcommons.observability import events as observe
from fedcommons.privacy.audits.seeded_bugs import active_bug
from fedcommons.privacy.line import LinePrivacy, round_claim_config
from fedcommons.strategies import (
    guarded_begin,
    guarded_finalize,
    guarded_fold_many,
)
from fedcommons.tasks import Task
from fedcommons.wire import ClientUpdate, keys
from fedcommons.wire.codec import dense_fp32_bytes

log = get_logger("fedcommons.coordinator")

POLL_INTERVAL_S = 0.05
#: Valid replies held (their received bytes) before they are folded in one pass.
FOLD_BATCH_BYTES = 64 * 2**20


@dataclass
class RoundReport:
    """What happened in one round (also the per-round metrics of the manifest)."""

    round: int
    sampled: int
    accepted: int
    rejected: dict[str, int]
    timed_out: int
    examples: int
    train_loss: float
    val_loss: float
    val_accuracy: float
    seconds: float
    #: Bytes each accepted client uploaded (node id -> encoded payload bytes) (#3).
    upload_bytes: dict[str, int] = field(default_factory=dict)
    #: Bytes of one update as dense fp32, and the round's ratio dense / uploaded.
    dense_bytes: int = 0
    ratio_vs_dense: float = 1.0
    #: Nodes connected when the round sampled (the population it used).
    connected: int = 0


#: What a DP line publishes of a round: nothing that depends on who took part, un-noised.
DP_PUBLIC_FIELDS = ("round", "val_loss", "val_accuracy", "dense_bytes")


def public_report(report: RoundReport, privacy: LinePrivacy) -> RoundReport:
    """The report as a line may publish it (manifest, registry index, resumable state).

    Without central DP: unchanged. With it: the validation scores of the noisy model
    (post-processing) and public sizes only; counts, per-node bytes, losses and timings
    of the round are zeroed (they stay in the coordinator's private log).
    """
    if privacy.central is None:
        return report
    leak = active_bug(privacy.registry_root) == "leak-sample"  # canary-audit scratch only
    return replace(
        report,
        sampled=0,
        accepted=0,
        rejected={},
        timed_out=0,
        examples=0,
        train_loss=math.nan,
        seconds=0.0,
        upload_bytes=dict(report.upload_bytes) if leak else {},
        ratio_vs_dense=0.0,
        connected=0,
    )


def published_metrics(report: RoundReport, central: bool) -> dict[str, Any]:
    """A round's entry in the manifest's ``round_metrics`` (DP lines: public fields only)."""
    metrics = asdict(report)
    if not central:
        return metrics
    return {
        k: v for k, v in metrics.items() if k in DP_PUBLIC_FIELDS or (v and k == "upload_bytes")
    }


def compression_seed(run_tag: str, round_no: int) -> int:
    """The round's shared seed (random-k indices): a 63-bit hash of run tag and round."""
    digest = hashlib.sha256(f"{run_tag}/{round_no}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def round_content(
    config: RunConfig,
    weights: Mapping[str, torch.Tensor],
    round_no: int,
    run_tag: str = "",
    *,
    needs_fisher: bool = False,
    fisher_samples: int | None = None,
) -> RecordDict:
    """The train message every sampled node receives in ``round_no``.

    ``needs_fisher`` asks clients for their diagonal Fisher (Fisher-weighted strategies),
    estimated on min(|D|, ``fisher_samples``) examples (client default: 256).
    """
    train_cfg: dict[str, Any] = {
        keys.ROUND: round_no,
        keys.SERVER_ROUND: round_no,
        keys.TASK: config.task,
        keys.LOCAL_EPOCHS: config.local_epochs,
        keys.LEARNING_RATE: config.lr,
        keys.BATCH_SIZE: config.batch_size,
        keys.SEED: config.seed,
        keys.RUN_TAG: run_tag,
        keys.COMPRESSION: config.compression,
        keys.ERROR_FEEDBACK: config.error_feedback,
        keys.COMPRESSION_SEED: compression_seed(run_tag, round_no),
        keys.FISH_MASK: config.fish_mask,
    }
    for key, value in config.task_options.items():
        train_cfg[f"{keys.TASK_OPTION_PREFIX}{key}"] = value
    train_cfg.update(  # the line's public DP mechanism, for the institutions' receipts
        round_claim_config(
            config.central_dp,
            line=config.line,
            clients_per_round=config.clients_per_round,
            population=config.population,
            rounds=config.rounds,
        )
    )
    if needs_fisher:
        train_cfg[keys.FISHER_REQUEST] = True
        if fisher_samples:
            train_cfg[keys.FISHER_SAMPLES] = int(fisher_samples)
    return RecordDict(
        {
            keys.BASE_ARRAYS: ArrayRecord(dict(weights)),
            keys.TRAIN_CONFIG: ConfigRecord(train_cfg),
        }
    )


def run_round(
    grid: Grid, prepared: PreparedRun, weights: dict[str, torch.Tensor], round_no: int
) -> tuple[dict[str, torch.Tensor], RoundReport, set[int]]:
    """Run one plaintext round; return the new weights, the report and the contributors."""
    config, strategy = prepared.config, prepared.strategy
    started = time.monotonic()
    release_freed_memory()  # what the last round's weights and commit left on the heap
    privacy, nodes, sample = sample_round(grid, prepared, round_no)
    sampled = sample.nodes
    strategy = privacy.start_round(  # refuses a round past the line's budget
        round_no,
        strategy,
        population=len(nodes),
        sampled=len(sampled),
        sample_rate=sample.sample_rate,
        expected=sample.expected,
    )
    content = round_content(
        config,
        weights,
        round_no,
        prepared.run_tag,
        needs_fisher=strategy.needs_fisher,
        fisher_samples=getattr(strategy, "fisher_samples", None),
    )
    seed = compression_seed(prepared.run_tag, round_no)
    messages = [
        Message(
            content=content,
            dst_node_id=node,
            message_type="train",
            group_id=str(round_no),
            ttl=config.round_timeout,
        )
        for node in sampled
    ]
    deadline = started + config.round_timeout
    pending = set(push_round(grid, messages, deadline, round_no))
    del messages, content  # pushed: a serialized copy of θ0 no longer needs to stay here
    release_freed_memory()
    log.info("round.started", sampled=len(sampled), connected=len(nodes))
    guarded_begin(strategy, weights)
    rejections = Rejections(round_no)
    contributors: set[int] = set()
    upload: dict[str, int] = {}
    loss_sum = 0.0
    examples = 0
    # a reply's arrays (the update, its optional Fisher codes and mask) and records
    reply_cap = 2 * prepared.max_update_bytes

    def fold(batch: list[ClientUpdate]) -> None:
        """Fold ``batch`` in one pass over the aggregate, then do the round's bookkeeping.

        FedAvg: the same bits as folding the replies one at a time, in this order.
        """
        nonlocal examples, loss_sum
        guarded_fold_many(strategy, batch)
        for update in batch:
            if update.dp_spend is not None:
                privacy.add_client_spend(update.node_id, update.dp_spend)
            contributors.add(update.node_id)
            upload[str(update.node_id)] = update.upload_bytes
            examples += update.num_examples
            loss_sum += update.metrics.get(keys.TRAIN_LOSS, 0.0) * update.num_examples
            faults.reached("collecting", round_no)

    while pending and time.monotonic() < deadline:
        pulled = 0
        # Valid replies not folded yet, in arrival order, and the bytes they hold. Small
        # updates are folded a pull at a time; once they hold FOLD_BATCH_BYTES they are
        # folded at once, so a model-sized update is folded (and freed) before the next
        # reply is pulled: the coordinator holds one reply, not one per site.
        accepted: list[ClientUpdate] = []
        held = 0
        for reply in pull_available(grid, pending, deadline, max_bytes=reply_cap):
            pulled += 1
            pending.discard(reply.metadata.reply_to_message_id)
            observe.reply_received(reply)
            try:
                update = decode_reply(
                    reply,
                    weights,
                    round_no,
                    needs_fisher=strategy.needs_fisher,
                    max_bytes=prepared.max_update_bytes,
                    expected_seed=seed,
                )
                if update.node_id in contributors or any(
                    u.node_id == update.node_id for u in accepted
                ):
                    raise UpdateRejectedError(
                        "duplicate", f"second update from node {update.node_id}"
                    )
            except UpdateRejectedError as exc:
                rejections.reject(reply.metadata.src_node_id, exc.reason, exc.detail)
                reply = update = None  # type: ignore[assignment]  # no bytes held while pulling
                continue
            accepted.append(update)
            held += update.upload_bytes
            del update, reply  # only `accepted` holds the reply's bytes
            if held >= FOLD_BATCH_BYTES:
                fold(accepted)
                accepted, held = [], 0  # the aggregate is all we keep
                release_freed_memory()  # the replies' pages, not only their objects
        if accepted:
            fold(accepted)
            accepted = []
            release_freed_memory()
        if not pulled:
            time.sleep(POLL_INTERVAL_S)
    timed_out = len(pending)
    # A DP line releases every sampled round (its noise is calibrated to W, not to the
    # replies): withholding a short round would condition the release on the sample.
    if len(contributors) < config.min_clients and privacy.central is None:
        raise RoundFailedError(
            f"round {round_no}: {len(contributors)} valid update(s), need {config.min_clients} "
            f"(rejected: {dict(rejections.counts) or 0}, no reply: {timed_out})"
        )
    faults.reached("aggregating", round_no)
    step = guarded_finalize(strategy, weights)
    privacy.commit_round(
        accepted=len(contributors),
        rejected=rejections.total,
        timed_out=timed_out,
    )
    new_weights = apply_step(weights, step)
    report = score_round(
        prepared,
        weights,
        new_weights,
        round=round_no,
        sampled=len(sampled),
        accepted=len(contributors),
        rejected=dict(rejections.counts),
        timed_out=timed_out,
        examples=examples,
        train_loss=loss_sum / max(examples, 1),
        started=started,
        upload_bytes=upload,
        connected=len(nodes),
    )
    log.info("round.finished", **report_summary(report))
    return new_weights, report, contributors


def apply_step(
    weights: Mapping[str, torch.Tensor], step: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """θ0 + Δ*, consuming ``step`` tensor by tensor.

    Each step tensor is dropped as soon as it was added, so the step and the new weights
    never both exist in full (when the strategy keeps no reference to its step).
    """
    return {k: weights[k] + step.pop(k) for k in weights}


def push_round(grid: Grid, messages: list[Message], deadline: float, round_no: int) -> list[str]:
    """Push the round's messages (transient SuperLink errors retried until ``deadline``).

    Raises :class:`RoundFailedError` (the round's retry policy applies) when the
    SuperLink keeps failing.
    """
    try:
        return list(
            grid_call(
                lambda: push_round_messages(grid, messages), deadline=deadline, what="push_messages"
            )
        )
    except Exception as exc:
        if not transient_grid_error(exc):
            raise
        raise RoundFailedError(
            f"round {round_no}: the SuperLink did not take the round's messages: "
            f"{type(exc).__name__}: {exc}"
        ) from exc


def pull_available(
    grid: Grid, pending: set[str], deadline: float, *, max_bytes: int | None
) -> Iterator[Message]:
    """The replies to ``pending`` available now (:func:`~.intake.pull_replies`).

    A pull that failed transiently marked nothing delivered (the SuperLink's transaction
    rolled back), so it ends this poll early and the round loop, bounded by the deadline,
    asks again at the next one.
    """
    try:
        yield from pull_replies(grid, set(pending), max_bytes=max_bytes, deadline=deadline)
    except Exception as exc:
        if not transient_grid_error(exc):
            raise
        log.warning("grid.retry", call="pull_messages", error=f"{type(exc).__name__}")
        time.sleep(1.0)


def score_round(
    prepared: PreparedRun,
    weights: Mapping[str, torch.Tensor],
    new_weights: Mapping[str, torch.Tensor],
    *,
    started: float,
    upload_bytes: dict[str, int],
    **counts: Any,
) -> RoundReport:
    """Score the round's candidate on the validation split and build its report.

    ``counts`` are the report's round, sampled, accepted, rejected, timed_out, examples
    and train_loss; the upload ratio is against dense fp32 copies of ``weights``.
    """
    val = evaluate(prepared.task, new_weights, prepared.task.validation_loader())
    dense_bytes = dense_fp32_bytes(weights)
    return RoundReport(
        **counts,
        val_loss=val.get("loss", float("nan")),
        val_accuracy=val.get("accuracy", float("nan")),
        seconds=time.monotonic() - started,
        upload_bytes=upload_bytes,
        dense_bytes=dense_bytes,
        ratio_vs_dense=dense_bytes * len(upload_bytes) / max(sum(upload_bytes.values()), 1),
    )


def report_summary(report: RoundReport) -> dict[str, Any]:
    """The report as log fields: per-node bytes summed into ``upload_bytes_total``."""
    summary = {k: v for k, v in asdict(report).items() if k not in {"round", "upload_bytes"}}
    summary["upload_bytes_total"] = sum(report.upload_bytes.values())
    return summary


def evaluate(task: Task, weights: Mapping[str, torch.Tensor], loader: Any) -> dict[str, float]:
    """Score ``weights`` with the task's metric on ``loader`` (empty dict if no loader)."""
    if loader is None:
        return {}
    model = task.build_model()
    model.load_state_dict(dict(weights), strict=True)
    model.to(task.device())
    with observe.validation_timer():
        return task.evaluate(model, loader)
