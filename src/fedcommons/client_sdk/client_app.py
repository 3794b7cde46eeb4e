"""The Flower ``ClientApp`` every institution runs (``fedcommons.client_sdk.client_app:app``).

Which task runs is the site's decision (:mod:`fedcommons.client_sdk.site_tasks`): its
node config's ``task``, else a task the round names that the site allows; a round that
asks for another task gets an error reply (``task-refused``) and nothing is imported.
Task options come from three layers, later ones winning: the coordinator's round config
(``task.<option>``), the run config, and the site's own node config
(``flower-supernode --node-config 'task="my_pkg:MyTask" data-dir=...'``) — so an
institution always decides where its private data comes from.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp

from fedcommons.client_sdk.compression import ClientState, compress_delta, load_or_compute_mask
from fedcommons.client_sdk.fisher import DEFAULT_SAMPLES, estimate_fisher
from fedcommons.client_sdk.secagg import (
    error_feedback_on,
    handle_secagg,
    refuse_plaintext,
    secagg_required,
)
from fedcommons.client_sdk.site_tasks import site_task_ref
from fedcommons.client_sdk.training import LocalResult, train_local
from fedcommons.errors import EncodingError, PrivacyBudgetExceededError, TaskRefusedError
from fedcommons.logs import get_logger
from fedcommons.privacy.client_dp import ClientDPConfig, train_local_dp
from fedcommons.privacy.receipts import LINE_KEY, ReceiptLog, round_claim, site_state_dir
from fedcommons.tasks import Task, load_task
from fedcommons.wire import keys
from fedcommons.wire.codec import CompressionSpec
from fedcommons.wire.fisher import encode_fisher

app = ClientApp()
log = get_logger("fedcommons.client")

_TASK_CACHE: dict[tuple[str, tuple[tuple[str, Any], ...]], Task] = {}


def _configure_threads() -> None:
    threads = int(os.environ.get("FEDCOMMONS_CLIENT_THREADS", "0") or 0)
    if threads > 0 and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def resolve_task(round_config: Mapping[str, Any], context: Context) -> Task:
    """Build (or reuse) the site's task; options from round config < run config < node config.

    Raises :class:`~fedcommons.errors.TaskRefusedError` when the coordinator asks for a
    task the site does not allow (see :func:`site_task_ref`).
    """
    merged: dict[str, Any] = {}
    requested = None
    for layer in (round_config, context.run_config):
        requested = layer.get(keys.TASK, requested)
    for layer in (round_config, context.run_config, context.node_config):
        for key, value in layer.items():
            if key == keys.TASK:
                continue
            if key.startswith(keys.TASK_OPTION_PREFIX):
                merged[key.removeprefix(keys.TASK_OPTION_PREFIX)] = value
            elif layer is context.node_config:
                merged[key] = value  # node config options need no prefix
    ref = site_task_ref(requested, context.node_config)
    cache_key = (ref, tuple(sorted((k, repr(v)) for k, v in merged.items())))
    if cache_key not in _TASK_CACHE:
        _TASK_CACHE[cache_key] = load_task(ref, merged)
    return _TASK_CACHE[cache_key]


def local_round(msg: Message, context: Context) -> LocalRound | Message:
    """Local training for a train message: a :class:`LocalRound`, or an error reply."""
    _configure_threads()
    cfg = msg.content[keys.TRAIN_CONFIG]
    round_no = int(cfg[keys.ROUND])
    try:
        task = resolve_task(cfg, context)
    except TaskRefusedError as exc:
        log.warning("client.task-refused", round=round_no, detail=str(exc))
        return Message(
            Error(code=keys.TASK_REFUSED_CODE, reason=f"task-refused: {exc}"), reply_to=msg
        )
    base = msg.content[keys.BASE_ARRAYS].to_torch_state_dict()
    seed = (
        int(cfg.get(keys.SEED, 0)) * 1_000_003
        + round_no * 7919
        + int(task.options.get("partition-id", context.node_id) or 0)
    )
    spec = CompressionSpec.parse(str(cfg.get(keys.COMPRESSION, "dense")))
    grad_mask = None
    if spec.sparsifier == "fish":  # FISH trains only the parameters in its fixed mask
        grad_mask = fish_grad_mask(spec, cfg, context, task, base, seed)
    dp = ClientDPConfig.from_node_config(context.node_config)
    if dp is not None and grad_mask is not None:
        raise EncodingError(
            "FISH masks restrict which parameters train, which DP-SGD's accounting does not "
            "cover here: use another compression with dp-epsilon"
        )
    schedule = {
        "epochs": int(cfg[keys.LOCAL_EPOCHS]),
        "lr": float(cfg[keys.LEARNING_RATE]),
        "batch_size": int(cfg[keys.BATCH_SIZE]),
        "seed": seed,
    }
    if dp is not None:
        try:
            result: Any = train_local_dp(
                task,
                base,
                **schedule,
                dp=dp,
                round_no=round_no,
                run_tag=str(context.run_id),
            )
        except PrivacyBudgetExceededError as exc:
            log.warning("client.dp-budget-exhausted", round=round_no, detail=str(exc))
            error = Error(code=keys.DP_BUDGET_EXHAUSTED_CODE, reason=f"dp-budget-exhausted: {exc}")
            return Message(error, reply_to=msg)
    else:
        result = train_local(task, base, **schedule, grad_mask=grad_mask)
    _keep_receipt(cfg, context, round_no, result)
    return LocalRound(task, base, cfg, spec, seed, dp, result)


def _keep_receipt(cfg: Any, context: Context, round_no: int, result: Any) -> None:
    """Append this contribution to the site's own receipt log, before the reply leaves."""
    spend = getattr(result, "spend", None)
    ReceiptLog(site_state_dir(context.node_config)).append(
        {
            "line": str(cfg.get(LINE_KEY, "")),
            "run_tag": str(cfg.get(keys.RUN_TAG, "")),
            "flower_run_id": int(context.run_id),
            "round": round_no,
            "central": round_claim(cfg),
            "dp_sgd": None
            if spend is None
            else {"epsilon": spend.epsilon, "delta": spend.delta, "steps": spend.steps},
        }
    )


@dataclass
class LocalRound:
    """What local training produced for one train message (before encoding the reply)."""

    task: Task
    base: dict[str, torch.Tensor]
    cfg: Any
    spec: CompressionSpec
    seed: int
    dp: ClientDPConfig | None
    result: Any


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train from the received base weights; reply with delta, example count, metrics."""
    if keys.SECAGG_RECORD in msg.content:  # a secure-aggregation stage (#7)
        return handle_secagg(msg, context, local_round)
    if secagg_required(context.node_config):  # this institution refuses plaintext rounds
        return refuse_plaintext(msg)
    trained = local_round(msg, context)
    if isinstance(trained, Message):
        return trained
    task, base, cfg, spec, seed = (
        trained.task,
        trained.base,
        trained.cfg,
        trained.spec,
        trained.seed,
    )
    dp, result = trained.dp, trained.result
    round_no = int(cfg[keys.ROUND])
    log.debug(
        "client.trained",
        round=round_no,
        examples=result.num_examples,
        loss=round(result.loss, 4),
        seconds=round(result.seconds, 3),
    )
    records: dict[str, ArrayRecord] = {}
    if bool(cfg.get(keys.FISHER_REQUEST, False)):
        records.update(_fisher_records(task, base, result.delta, cfg, seed))
    content = RecordDict(
        {
            **records,
            keys.DELTA_ARRAYS: ArrayRecord(result.delta),
            keys.REPLY_METRICS: MetricRecord(
                {
                    keys.NUM_EXAMPLES: result.num_examples,
                    keys.TRAIN_LOSS: result.loss,
                    keys.TRAIN_ACCURACY: result.accuracy,
                    keys.TRAIN_SECONDS: result.seconds,
                }
            ),
        }
    )
    if dp is not None:
        metrics = content[keys.REPLY_METRICS]
        # loss and accuracy are computed on private records outside DP-SGD's guarantee
        del metrics[keys.TRAIN_LOSS], metrics[keys.TRAIN_ACCURACY]
        metrics[keys.DP_CLAIM] = 1
        content[keys.DP_SPEND] = ConfigRecord(result.spend.to_record())
    if not spec.is_dense_fp32:
        encode_reply(content, result, spec, cfg, context, task, base, seed)
    return Message(content=content, reply_to=msg)


def _fisher_records(
    task: Task,
    base: Mapping[str, torch.Tensor],
    delta: Mapping[str, torch.Tensor],
    cfg: Mapping[str, Any],
    seed: int,
) -> dict[str, ArrayRecord]:
    """The diagonal Fisher at the final weights θ0 + Δ, int8 log-encoded for the wire."""
    final = {k: base[k] + delta[k] for k in base}
    samples = int(cfg.get(keys.FISHER_SAMPLES, DEFAULT_SAMPLES))
    fisher = estimate_fisher(task, final, num_samples=samples, seed=seed)
    codes, ranges = encode_fisher(fisher)
    return {
        keys.FISHER_CODES: ArrayRecord({k: Array(v) for k, v in codes.items()}),
        keys.FISHER_RANGES: ArrayRecord({k: Array(v) for k, v in ranges.items()}),
    }


def fish_mask_fn(
    spec: CompressionSpec,
    cfg: Mapping[str, Any],
    task: Task,
    base: Mapping[str, torch.Tensor],
    seed: int,
) -> Callable[[], np.ndarray]:
    """How this site computes its FISH mask when none is stored yet (``fish-mask`` source).

    ``"site"`` (default): the empirical Fisher of the site's own training examples.
    ``"public"``: of the task's public examples (its validation loader), which every
    institution holds, in the same order everywhere, so every institution derives the
    same mask.
    """
    from fedcommons.client_sdk.fish_mask import fish_mask

    loader = None
    if str(cfg.get(keys.FISH_MASK, "site")) == "public":
        loader = task.validation_loader()
        if loader is None:
            raise EncodingError(
                f"fish-mask = 'public' but task {task.name!r} has no public (validation) data"
            )
        seed = 0
    return lambda: fish_mask(task, base, spec.density, spec.fish_examples, seed=seed, loader=loader)


def fish_grad_mask(
    spec: CompressionSpec,
    cfg: Mapping[str, Any],
    context: Context,
    task: Task,
    base: Mapping[str, torch.Tensor],
    seed: int,
) -> dict[str, torch.Tensor]:
    """This site's FISH mask for the run, as tensors shaped like ``base``.

    Computed once by :func:`fish_mask_fn`, then read from the state dir.
    """
    state = ClientState.for_run(context.node_config, str(cfg.get(keys.RUN_TAG, "")))
    flat = load_or_compute_mask(
        state, sum(v.numel() for v in base.values()), fish_mask_fn(spec, cfg, task, base, seed)
    )
    out, offset = {}, 0
    for name, value in base.items():
        n = value.numel()
        out[name] = torch.from_numpy(flat[offset : offset + n].reshape(tuple(value.shape)))
        offset += n
    return out


def encode_reply(
    content: RecordDict,
    result: LocalResult,
    spec: CompressionSpec,
    cfg: Mapping[str, Any],
    context: Context,
    task: Task,
    base: Mapping[str, torch.Tensor],
    seed: int,
) -> None:
    """Replace the dense delta of ``content`` by its encoded form (#3).

    Error feedback is on when the round config says so, unless the site's node config
    sets ``error-feedback`` (the institution decides); its residual stays in the state
    directory and is never sent.
    """
    round_no = int(cfg[keys.ROUND])
    state = ClientState.for_run(context.node_config, str(cfg.get(keys.RUN_TAG, "")))
    compressed = compress_delta(
        result.delta,
        spec,
        round_no=round_no,
        state=state,
        error_feedback=error_feedback_on(context.node_config, cfg),
        rng=np.random.default_rng([seed, 0xC0DEC]),
        shared_seed=int(cfg.get(keys.COMPRESSION_SEED, 0)),
        mask_fn=fish_mask_fn(spec, cfg, task, base, seed),
    )
    del content[keys.DELTA_ARRAYS]
    content[keys.ENCODED_RECORD] = ConfigRecord({keys.ENCODED_PAYLOAD: compressed.encoded.payload})
    log.debug(
        "client.encoded",
        round=round_no,
        spec=str(spec),
        bytes=compressed.encoded.nbytes,
        error_feedback=compressed.error_feedback,
        residual_norm=round(compressed.residual_norm, 6),
    )
