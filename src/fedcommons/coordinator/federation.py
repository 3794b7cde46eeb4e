"""The round loop the coordinator's ServerApp runs on a Flower ``Grid``.

One code path for every engine: Flower's simulation engine (``fedcommons demo``) and its
deployment engine (``flwr run`` against a SuperLink) both call :func:`run_federation`.

Per round: sample nodes, push the base weights and the round config, pull replies as
they arrive, validate each one and fold it into the streaming aggregator right away (no
list of client updates is kept), apply the step, score the candidate on the validation
split. After the last round the candidate is scored on the test split and published.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import numpy as np
import structlog
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedcommons import __version__
from fedcommons.coordinator import observability as observe
from fedcommons.coordinator.config import RunConfig
from fedcommons.coordinator.registry import Registry, Release, check_writable
from fedcommons.errors import ConfigError, RoundFailedError, UpdateRejectedError
from fedcommons.logs import get_logger
from fedcommons.strategies import Aggregator, create_strategy
from fedcommons.tasks import Task, load_task
from fedcommons.wire import ClientUpdate, ReleaseManifest, decode_dense_delta, keys
from fedcommons.wire.update import check_num_examples

log = get_logger("fedcommons.coordinator")

POLL_INTERVAL_S = 0.05


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


@dataclass
class FederationResult:
    """The outcome of a whole run."""

    release: Release
    reports: list[RoundReport]
    test_metrics: dict[str, float]
    run_id: int


class RunObserver(Protocol):
    """Receives progress events (the CLI's progress display implements it)."""

    def on_start(self, config: RunConfig, run_id: int) -> None:
        """Called once the run is validated, before round 1."""

    def on_round(self, report: RoundReport) -> None:
        """Called after each round's candidate was scored."""


@dataclass
class PreparedRun:
    """A validated run: everything that can fail on bad input has been checked."""

    config: RunConfig
    task: Task
    strategy: Aggregator
    weights: dict[str, torch.Tensor]
    parent: Release | None = None
    registry: Registry | None = field(default=None, repr=False)


def prepare_run(config: RunConfig) -> PreparedRun:
    """Validate task, strategy, registry and base release; touch nothing on disk.

    Raises :class:`~fedcommons.errors.ConfigError` or
    :class:`~fedcommons.errors.RegistryError` subclasses naming the problem.
    """
    task = load_task(config.task, config.task_options)
    strategy = create_strategy(config.strategy, config.strategy_params)
    check_writable(config.registry_path)
    model_state = {k: v.detach().clone() for k, v in task.build_model().state_dict().items()}
    parent = None
    registry = None
    if config.base_release:
        registry = Registry(config.registry_path, create=False)
        parent = registry.get(config.base_release, name=config.line)
        weights = registry.load_weights(parent)
        if {k: tuple(v.shape) for k, v in weights.items()} != {
            k: tuple(v.shape) for k, v in model_state.items()
        }:
            raise ConfigError(
                f"base release {parent.name} {parent.version} does not fit task "
                f"{config.task!r}: tensor names or shapes differ"
            )
    else:
        weights = model_state
    return PreparedRun(config, task, strategy, weights, parent, registry)


def round_content(
    config: RunConfig, weights: Mapping[str, torch.Tensor], round_no: int
) -> RecordDict:
    """The train message every sampled node receives in ``round_no``."""
    train_cfg: dict[str, Any] = {
        keys.ROUND: round_no,
        keys.TASK: config.task,
        keys.LOCAL_EPOCHS: config.local_epochs,
        keys.LEARNING_RATE: config.lr,
        keys.BATCH_SIZE: config.batch_size,
        keys.SEED: config.seed,
    }
    for key, value in config.task_options.items():
        train_cfg[f"{keys.TASK_OPTION_PREFIX}{key}"] = value
    return RecordDict(
        {
            keys.BASE_ARRAYS: ArrayRecord(dict(weights)),
            keys.TRAIN_CONFIG: ConfigRecord(train_cfg),
        }
    )


def decode_reply(reply: Message, base: Mapping[str, torch.Tensor], round_no: int) -> ClientUpdate:
    """Turn a reply into a validated :class:`ClientUpdate` or raise UpdateRejectedError.

    fedcommons clients send ``delta``; a plain Flower ClientApp that returns its full
    weights under ``arrays`` is accepted as a dense update (delta = weights − base).
    """
    if reply.has_error():
        raise UpdateRejectedError("client-error", f"{reply.error.code}: {reply.error.reason}")
    group = reply.metadata.group_id
    if group and group != str(round_no):
        raise UpdateRejectedError("wrong-round", f"reply for round {group}, expected {round_no}")
    content = reply.content
    metrics: dict[str, float] = {}
    for record in content.metric_records.values():
        metrics.update({k: float(v) for k, v in record.items() if isinstance(v, int | float)})
    num_examples = check_num_examples(
        next(
            (
                r[keys.NUM_EXAMPLES]
                for r in content.metric_records.values()
                if keys.NUM_EXAMPLES in r
            ),
            None,
        )
    )
    arrays = content.array_records
    if keys.DELTA_ARRAYS in arrays:
        delta = decode_dense_delta(_as_tensors(arrays[keys.DELTA_ARRAYS]), base)
    elif keys.FULL_ARRAYS in arrays:
        full = decode_dense_delta(_as_tensors(arrays[keys.FULL_ARRAYS]), base)
        delta = {k: full[k] - base[k] for k in base}
    else:
        raise UpdateRejectedError("no-update", f"reply has no {keys.DELTA_ARRAYS!r} record")
    return ClientUpdate(delta, num_examples, reply.metadata.src_node_id, metrics)


def _as_tensors(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.array(v.numpy(), copy=True)) for k, v in record.items()}


def wait_for_nodes(grid: Grid, minimum: int, timeout: float) -> list[int]:
    """Return the connected node ids once at least ``minimum`` are there (bounded wait)."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= minimum:
            return nodes
        if time.monotonic() >= deadline:
            raise RoundFailedError(
                f"only {len(nodes)} node(s) connected after {timeout:.0f}s; need {minimum}"
            )
        time.sleep(0.5)


def sample_nodes(nodes: list[int], k: int, seed: int, round_no: int) -> list[int]:
    """Sample ``k`` nodes without replacement (all when ``k`` is 0 or too large)."""
    if k <= 0 or k >= len(nodes):
        return list(nodes)
    rng = np.random.default_rng([seed, round_no])
    return sorted(int(n) for n in rng.choice(nodes, size=k, replace=False))


def run_round(
    grid: Grid, prepared: PreparedRun, weights: dict[str, torch.Tensor], round_no: int
) -> tuple[dict[str, torch.Tensor], RoundReport, set[int]]:
    """Run one round; return the new weights, the report and the contributing nodes."""
    config, strategy = prepared.config, prepared.strategy
    started = time.monotonic()
    nodes = wait_for_nodes(grid, config.min_clients, config.node_wait_timeout)
    sampled = sample_nodes(nodes, config.clients_per_round, config.seed, round_no)
    content = round_content(config, weights, round_no)
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
    pending = set(grid.push_messages(messages))
    log.info("round.started", sampled=len(sampled), connected=len(nodes))
    strategy.begin(weights)
    rejected: Counter[str] = Counter()
    contributors: set[int] = set()
    loss_sum = 0.0
    examples = 0
    deadline = started + config.round_timeout
    while pending and time.monotonic() < deadline:
        replies = list(grid.pull_messages(list(pending)))
        if not replies:
            time.sleep(POLL_INTERVAL_S)
            continue
        for reply in replies:
            pending.discard(reply.metadata.reply_to_message_id)
            observe.reply_received(reply)
            try:
                update = decode_reply(reply, weights, round_no)
                if update.node_id in contributors:
                    raise UpdateRejectedError(
                        "duplicate", f"second update from node {update.node_id}"
                    )
            except UpdateRejectedError as exc:
                rejected[exc.reason] += 1
                observe.update_rejected(
                    round_no, reply.metadata.src_node_id, exc.reason, exc.detail
                )
                log.warning(
                    "update.rejected",
                    node=reply.metadata.src_node_id,
                    reason=exc.reason,
                    detail=exc.detail,
                )
                continue
            strategy.fold(update)
            contributors.add(update.node_id)
            examples += update.num_examples
            loss_sum += update.metrics.get(keys.TRAIN_LOSS, 0.0) * update.num_examples
            del update  # the aggregate is all we keep
    timed_out = len(pending)
    if len(contributors) < config.min_clients:
        raise RoundFailedError(
            f"round {round_no}: {len(contributors)} valid update(s), need {config.min_clients} "
            f"(rejected: {dict(rejected) or 0}, no reply: {timed_out})"
        )
    step = strategy.finalize()
    new_weights = {k: weights[k] + step[k] for k in weights}
    val = evaluate(prepared.task, new_weights, prepared.task.validation_loader())
    report = RoundReport(
        round=round_no,
        sampled=len(sampled),
        accepted=len(contributors),
        rejected=dict(rejected),
        timed_out=timed_out,
        examples=examples,
        train_loss=loss_sum / max(examples, 1),
        val_loss=val.get("loss", float("nan")),
        val_accuracy=val.get("accuracy", float("nan")),
        seconds=time.monotonic() - started,
    )
    log.info("round.finished", **{k: v for k, v in asdict(report).items() if k != "round"})
    return new_weights, report, contributors


def evaluate(task: Task, weights: Mapping[str, torch.Tensor], loader: Any) -> dict[str, float]:
    """Score ``weights`` with the task's metric on ``loader`` (empty dict if no loader)."""
    if loader is None:
        return {}
    model = task.build_model()
    model.load_state_dict(dict(weights), strict=True)
    model.to(task.device())
    with observe.validation_timer():
        return task.evaluate(model, loader)


def run_federation(
    grid: Grid,
    config: RunConfig,
    *,
    run_id: int = 0,
    observer: RunObserver | None = None,
    prepared: PreparedRun | None = None,
) -> FederationResult:
    """Run every round of ``config`` on ``grid`` and publish the release."""
    with structlog.contextvars.bound_contextvars(run_id=run_id):
        prepared = prepared or prepare_run(config)
        if observer:
            observer.on_start(config, run_id)
        log.info(
            "run.started",
            task=config.task,
            strategy=config.strategy,
            rounds=config.rounds,
            line=config.line,
        )
        observe.run_started(config.registry_path, run_id, {"config": config.to_flat()})
        weights = prepared.weights
        reports: list[RoundReport] = []
        contributors: set[int] = set()
        for round_no in range(1, config.rounds + 1):
            with structlog.contextvars.bound_contextvars(round=round_no):
                try:
                    weights, report, nodes = run_round(grid, prepared, weights, round_no)
                except RoundFailedError as exc:
                    observe.round_failed(round_no, exc)
                    raise
            observe.round_finished(report)
            reports.append(report)
            contributors |= nodes
            if observer:
                observer.on_round(report)
        test = evaluate(prepared.task, weights, prepared.task.test_loader())
        release = publish(prepared, weights, reports, test, len(contributors), run_id)
        observe.release_published(release)
        log.info(
            "release.published",
            name=release.name,
            version=release.version,
            sha256=release.weights_sha256,
            test_accuracy=test.get("accuracy"),
        )
        return FederationResult(release, reports, test, run_id)


def publish(
    prepared: PreparedRun,
    weights: Mapping[str, torch.Tensor],
    reports: list[RoundReport],
    test: dict[str, float],
    contributors: int,
    run_id: int,
) -> Release:
    """Write the candidate into the registry with its manifest."""
    config = prepared.config
    registry = prepared.registry or Registry(config.registry_path)
    last = reports[-1]
    metrics = {"val_accuracy": last.val_accuracy, "val_loss": last.val_loss}
    metrics.update({f"test_{k}": v for k, v in test.items() if k != "examples"})
    parent = prepared.parent

    def build(version: str, digest: str, size: int) -> ReleaseManifest:
        return ReleaseManifest(
            name=config.line,
            version=version,
            parent_version=parent.version if parent else None,
            parent_manifest_sha256=parent.manifest_sha256 if parent else None,
            created=datetime.now(UTC).isoformat(timespec="seconds"),
            task=config.task,
            strategy=prepared.strategy.name,
            strategy_params=prepared.strategy.params(),
            rounds=config.rounds,
            clients_per_round=config.clients_per_round,
            contributors=contributors,
            weights_sha256=digest,
            weights_bytes=size,
            num_parameters=sum(v.numel() for v in weights.values()),
            metrics=metrics,
            round_metrics=[asdict(r) for r in reports],
            config=config.to_flat(),
            code_version=__version__,
            flower_run_id=run_id,
        )

    return registry.publish(config.line, weights, build, parent=parent)
