"""The round loop the coordinator's ServerApp runs on a Flower ``Grid``.

One code path for every engine: Flower's simulation engine (``fedcommons demo``) and its
deployment engine (``flwr run`` against a SuperLink) both call :func:`run_federation`.

Per round: sample nodes, push the base weights and the round config, pull replies as
they arrive, validate each one and fold it into the streaming aggregator right away (no
list of client updates is kept), apply the step, score the candidate on the validation
split. After the last round the candidate is scored on the test split and published.
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import structlog
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedcommons import __version__
from fedcommons.coordinator import faults
from fedcommons.coordinator import observability as observe
from fedcommons.coordinator.arrays import record_tensors
from fedcommons.coordinator.card import render_card
from fedcommons.coordinator.config import RunConfig
from fedcommons.coordinator.patches import diff_weights
from fedcommons.coordinator.registry import Registry, Release, check_writable
from fedcommons.coordinator.runs import DurableRun, committed_rounds
from fedcommons.coordinator.signing import Signer
from fedcommons.coordinator.validation import (
    ValidationSuite,
    fingerprint_loader,
    load_suite,
    run_gate,
)
from fedcommons.coordinator.versioning import decide_bump
from fedcommons.errors import (
    CandidateRejectedError,
    ConfigError,
    RoundFailedError,
    RunCancelledError,
    SigningKeyError,
    UpdateRejectedError,
)
from fedcommons.logs import get_logger
from fedcommons.privacy.client_spend import parse_spend
from fedcommons.privacy.line import LinePrivacy
from fedcommons.strategies import (
    Aggregator,
    create_strategy,
    guarded_begin,
    guarded_finalize,
    guarded_fold,
)
from fedcommons.tasks import Task, load_task
from fedcommons.wire import ClientUpdate, ReleaseManifest, decode_dense_delta, keys
from fedcommons.wire.codec import decode_update, dense_fp32_bytes
from fedcommons.wire.fisher import decode_fisher
from fedcommons.wire.update import check_num_examples, decode_mask

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
    #: Bytes each accepted client uploaded (node id -> encoded payload bytes) (#3).
    upload_bytes: dict[str, int] = field(default_factory=dict)
    #: Bytes of one update as dense fp32, and the round's ratio dense / uploaded.
    dense_bytes: int = 0
    ratio_vs_dense: float = 1.0


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
    suite: ValidationSuite | None = None
    signer: Signer | None = field(default=None, repr=False)
    #: The line's privacy bookkeeping: central DP-FedAvg, budget checks, ledger (#6).
    privacy: LinePrivacy | None = field(default=None, repr=False)
    #: Names this run to clients, which key their error-feedback state by it (#3).
    run_tag: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    #: Attempt of the current round (0: first; retries re-sample nodes) (#8).
    attempt: int = 0

    @property
    def max_update_bytes(self) -> int:
        """The configured payload cap, or 2x the dense fp32 update + 64 KiB."""
        if self.config.max_update_bytes:
            return self.config.max_update_bytes
        return 2 * dense_fp32_bytes(self.weights) + 65536


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
    suite = load_suite(task, config.validation_suite, config.gate_target)
    # The key is created at publish time (nothing is written before the rounds); an
    # existing key must be the one the registry already publishes.
    key_path = signing_key_path(config)
    signer = Signer.load(key_path) if key_path.exists() else None
    if registry is None and (config.registry_path / "index.sqlite").exists():
        registry = Registry(config.registry_path, create=False)
    if registry is not None and registry.public_key_path.exists():
        if signer is None:
            raise SigningKeyError(
                f"registry {str(config.registry_path)!r} is signed by an existing key, but "
                f"the signing key {str(key_path)!r} does not exist (set signing-key)"
            )
        registry.publish_key(signer)  # raises unless the key is the registry's
    privacy = LinePrivacy(config.registry_path, config.line, config.central_dp)
    remaining = config.rounds - committed_rounds(config)  # a resumed run plans what is left
    if remaining > 0:
        privacy.check_plan(remaining)
    faults.check_environment()
    check_dp_compatible(strategy, config)
    from fedcommons.coordinator.secure_round import check_secagg_compatible

    check_secagg_compatible(strategy, config)  # refuses what would leak individual updates (#7)
    return PreparedRun(config, task, strategy, weights, parent, registry, suite, signer, privacy)


def check_dp_compatible(strategy: Aggregator, config: RunConfig) -> None:
    """Refuse strategies that central DP would silently turn into something else.

    DP-FedAvg releases only the clipped, noised mean of the round; the configured strategy
    then post-processes that mean (server learning rate, momentum, Adam). A rule that
    needs each client's Fisher, mask or the individual updates (median, trimmed mean)
    cannot run on it.
    """
    if config.central_dp is None:
        return
    needs = [
        what
        for what, flag in (
            ("each client's Fisher information", strategy.needs_fisher),
            ("each client's mask", strategy.uses_mask),
            ("every individual update", not strategy.streaming),
        )
        if flag
    ]
    if needs:
        raise ConfigError(
            f"strategy {strategy.name!r} needs {' and '.join(needs)}, but central DP "
            "(dp.*) releases only the clipped, noised mean of a round: use fedavg or fedadam"
        )


def signing_key_path(config: RunConfig) -> Path:
    """Path of the coordinator's Ed25519 signing key.

    ``signing-key``, else ``$FEDCOMMONS_SIGNING_KEY``, else ``<registry>/private/ed25519.pem``
    (created on first use, mode 0600; keep ``private/`` out of what you publish).
    """
    path = config.signing_key or os.environ.get("FEDCOMMONS_SIGNING_KEY", "")
    return Path(path).expanduser() if path else config.registry_path / "private" / "ed25519.pem"


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


def decode_reply(
    reply: Message,
    base: Mapping[str, torch.Tensor],
    round_no: int,
    *,
    needs_fisher: bool = False,
    max_bytes: int | None = None,
    expected_seed: int | None = None,
) -> ClientUpdate:
    """Turn a reply into a validated :class:`ClientUpdate` or raise UpdateRejectedError.

    fedcommons clients send ``delta``, or with compression on an encoded update
    (``encoded``/``payload``, see :mod:`fedcommons.wire.codec`), decoded and validated
    here (size cap ``max_bytes``, round, layout, indices, random-k seed, finite values)
    before anything touches the aggregate; a plain Flower ClientApp that returns its full
    weights under ``arrays`` is accepted as a dense update (delta = weights − base).
    An optional ``mask`` record marks the coordinates sent (the delta must be zero
    outside it); an optional Fisher (``fisher-codes`` + ``fisher-range``) is decoded
    inside the mask. With ``needs_fisher`` a reply without a Fisher is rejected
    (``missing-fisher``).
    """
    if reply.has_error():
        if reply.error.code == keys.DP_BUDGET_EXHAUSTED_CODE:
            raise UpdateRejectedError("dp-budget-exhausted", str(reply.error.reason))
        if reply.error.code == keys.SECAGG_REQUIRED_CODE:  # the site requires secagg (#7)
            raise UpdateRejectedError("secagg-required", str(reply.error.reason))
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
    encoded = content.config_records.get(keys.ENCODED_RECORD)
    mask = None
    if encoded is not None and keys.ENCODED_PAYLOAD in encoded:
        payload = encoded[keys.ENCODED_PAYLOAD]
        if not isinstance(payload, bytes):
            raise UpdateRejectedError("malformed", "encoded update payload is not bytes")
        decoded = decode_update(
            payload,
            base,
            expected_round=round_no,
            max_bytes=max_bytes,
            expected_seed=expected_seed,
        )
        delta = decode_dense_delta(decoded.delta, base)
        mask = decoded.mask  # a sparse update's support: mask-aligned strategies use it
        size = decoded.nbytes
    elif keys.DELTA_ARRAYS in arrays or keys.FULL_ARRAYS in arrays:
        name = keys.DELTA_ARRAYS if keys.DELTA_ARRAYS in arrays else keys.FULL_ARRAYS
        size = sum(len(a.data) for a in arrays[name].values())
        if max_bytes is not None and size > max_bytes:
            raise UpdateRejectedError("too-large", f"{size} bytes of arrays exceed cap {max_bytes}")
        delta = decode_dense_delta(_as_tensors(arrays[name]), base)
        if name == keys.FULL_ARRAYS:
            delta = {k: delta[k] - base[k] for k in base}
    else:
        raise UpdateRejectedError("no-update", f"reply has no {keys.DELTA_ARRAYS!r} record")
    if keys.MASK_ARRAYS in arrays:
        mask = decode_mask(_as_tensors(arrays[keys.MASK_ARRAYS]), base)
        for name, m in mask.items():
            if bool((delta[name][~m] != 0).any()):
                raise UpdateRejectedError("bad-mask", f"{name}: delta is nonzero outside its mask")
    fisher = None
    if keys.FISHER_CODES in arrays and keys.FISHER_RANGES in arrays:
        fisher = decode_fisher(
            {k: v.numpy() for k, v in arrays[keys.FISHER_CODES].items()},
            {k: v.numpy() for k, v in arrays[keys.FISHER_RANGES].items()},
            base,
            mask,
        )
    elif needs_fisher:
        raise UpdateRejectedError(
            "missing-fisher", "the strategy weights by Fisher information; reply has none"
        )
    spend = None
    if metrics.get(keys.DP_CLAIM) or keys.DP_SPEND in content.config_records:
        spend = parse_spend(content.config_records.get(keys.DP_SPEND))
    return ClientUpdate(
        delta,
        num_examples,
        reply.metadata.src_node_id,
        metrics,
        upload_bytes=size,
        dp_spend=spend,
        mask=mask,
        fisher=fisher,
    )


def _as_tensors(record: ArrayRecord) -> dict[str, torch.Tensor]:
    # Zero-copy, read-only views of the message's bytes (coordinator/arrays.py).
    return record_tensors(record)


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


def sample_nodes(nodes: list[int], k: int, seed: int, round_no: int, attempt: int = 0) -> list[int]:
    """Sample ``k`` nodes without replacement (all when ``k`` is 0 or too large).

    A retried round (``attempt`` > 0) draws a new sample; attempt 0 is the sample a
    resumed run draws again.
    """
    if k <= 0 or k >= len(nodes):
        return list(nodes)
    rng = np.random.default_rng([seed, round_no] if attempt == 0 else [seed, round_no, attempt])
    return sorted(int(n) for n in rng.choice(nodes, size=k, replace=False))


def sample_round(
    grid: Grid, prepared: PreparedRun, round_no: int
) -> tuple[LinePrivacy, list[int], list[int], float, float]:
    """Wait for nodes and sample the round's clients.

    Returns the line's privacy bookkeeping, the connected and the sampled nodes, the
    sample rate and the expected sample size (what ``privacy.start_round`` records).
    """
    config = prepared.config
    nodes = wait_for_nodes(grid, config.min_clients, config.node_wait_timeout)
    privacy = prepared.privacy or LinePrivacy(config.registry_path, config.line, None)
    if privacy.central is not None:  # DP-FedAvg: secret Poisson or fixed-size sampling
        sampled, rate, expected = privacy.sample(nodes, config.clients_per_round)
    else:
        sampled = sample_nodes(
            nodes, config.clients_per_round, config.seed, round_no, prepared.attempt
        )
        rate, expected = 1.0, float(len(sampled))
    return privacy, nodes, sampled, rate, expected


def run_round(
    grid: Grid, prepared: PreparedRun, weights: dict[str, torch.Tensor], round_no: int
) -> tuple[dict[str, torch.Tensor], RoundReport, set[int]]:
    """Run one round; return the new weights, the report and the contributing nodes."""
    config, strategy = prepared.config, prepared.strategy
    if config.secagg:  # secure aggregation (#7): the coordinator sees only the sum
        from fedcommons.coordinator.secure_round import run_secure_round

        return run_secure_round(grid, prepared, weights, round_no)
    started = time.monotonic()
    privacy, nodes, sampled, rate, expected = sample_round(grid, prepared, round_no)
    strategy = privacy.start_round(  # refuses a round past the line's budget
        round_no,
        strategy,
        population=len(nodes),
        sampled=len(sampled),
        sample_rate=rate,
        expected=expected,
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
    pending = set(grid.push_messages(messages))
    log.info("round.started", sampled=len(sampled), connected=len(nodes))
    guarded_begin(strategy, weights)
    rejected: Counter[str] = Counter()
    contributors: set[int] = set()
    upload: dict[str, int] = {}
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
                update = decode_reply(
                    reply,
                    weights,
                    round_no,
                    needs_fisher=strategy.needs_fisher,
                    max_bytes=prepared.max_update_bytes,
                    expected_seed=seed,
                )
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
            guarded_fold(strategy, update)
            if update.dp_spend is not None:
                privacy.add_client_spend(update.node_id, update.dp_spend)
            contributors.add(update.node_id)
            upload[str(update.node_id)] = update.upload_bytes
            examples += update.num_examples
            loss_sum += update.metrics.get(keys.TRAIN_LOSS, 0.0) * update.num_examples
            del update  # the aggregate is all we keep
            faults.reached("collecting", round_no)
    timed_out = len(pending)
    if len(contributors) < config.min_clients:
        raise RoundFailedError(
            f"round {round_no}: {len(contributors)} valid update(s), need {config.min_clients} "
            f"(rejected: {dict(rejected) or 0}, no reply: {timed_out})"
        )
    faults.reached("aggregating", round_no)
    step = guarded_finalize(strategy, weights)
    privacy.commit_round(
        accepted=len(contributors),
        rejected=sum(rejected.values()),
        timed_out=timed_out,
    )
    new_weights = {k: weights[k] + step[k] for k in weights}
    report = score_round(
        prepared,
        weights,
        new_weights,
        round=round_no,
        sampled=len(sampled),
        accepted=len(contributors),
        rejected=dict(rejected),
        timed_out=timed_out,
        examples=examples,
        train_loss=loss_sum / max(examples, 1),
        started=started,
        upload_bytes=upload,
    )
    log.info("round.finished", **report_summary(report))
    if privacy.central is not None:  # released in the manifest: nothing outside the DP noise
        report.train_loss, report.examples = float("nan"), 0
    return new_weights, report, contributors


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


def patch_base(task: Task) -> dict[str, Any]:
    """The pinned base a task's weights are a patch of (empty for whole-model tasks)."""
    base_info = getattr(task, "base_info", None)
    return dict(base_info()) if callable(base_info) else {}


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
    """Run every round of ``config`` on ``grid`` and publish the release.

    Each finished round is committed (:class:`~fedcommons.coordinator.runs.DurableRun`);
    a run started again under the same ``run-name`` resumes after its last committed
    round. A round short of ``min-clients`` at its deadline is retried or aborts the run
    (``on-round-failure``); a cancelled run stops before its next round. A run that
    does not finish publishes nothing.
    """
    with structlog.contextvars.bound_contextvars(run_id=run_id):
        prepared = prepared or prepare_run(config)
        config = prepared.config
        if prepared.privacy is not None:
            prepared.privacy.run_id = run_id
        durable = DurableRun(prepared, run_id)
        resumed = durable.open()
        if observer:
            observer.on_start(config, run_id)
        log.info(
            "run.started",
            task=config.task,
            strategy=config.strategy,
            rounds=config.rounds,
            line=config.line,
            run_name=durable.name,
            resume_after=resumed.next_round - 1,
        )
        observe.run_started(
            config.registry_path, run_id, {"config": config.to_flat(), "run_name": durable.name}
        )
        if resumed.next_round > 1:
            observe.run_resumed(durable.name, resumed.next_round - 1)
        weights = resumed.weights
        reports = [RoundReport(**r) for r in resumed.reports]
        contributors: set[int] = set(resumed.contributors)
        try:
            for round_no in range(resumed.next_round, config.rounds + 1):
                if durable.cancel_requested():
                    raise RunCancelledError(
                        f"run {durable.name!r} cancelled by the operator after round "
                        f"{round_no - 1}; nothing was published"
                    )
                with structlog.contextvars.bound_contextvars(round=round_no):
                    weights, report, nodes, attempts = _run_round_with_policy(
                        grid, prepared, weights, round_no
                    )
                    commit_started = time.monotonic()
                    durable.commit(round_no, weights, report, nodes, attempts)
                    commit_seconds = time.monotonic() - commit_started
                observe.round_finished(report)
                observe.round_committed(durable.name, round_no, commit_seconds)
                reports.append(report)
                contributors |= nodes
                if observer:
                    observer.on_round(report)
            test = evaluate(prepared.task, weights, prepared.task.test_loader())
            release = durable.published()  # a crash after publishing, before finishing
            if release is None:
                release = publish(prepared, weights, reports, test, len(contributors), run_id)
                observe.release_published(release)
            durable.finish(release)
        except RunCancelledError as exc:
            durable.fail("cancelled", str(exc))
            observe.run_ended(durable.name, "cancelled", str(exc))
            log.warning("run.cancelled", run_name=durable.name)
            raise
        except faults.InjectedFault:
            raise  # a simulated crash: like SIGKILL, it records nothing
        except BaseException as exc:
            durable.fail("failed", f"{type(exc).__name__}: {exc}")
            observe.run_ended(durable.name, "failed", f"{type(exc).__name__}: {exc}")
            raise
        observe.run_ended(durable.name, "finished", release.version)
        log.info(
            "release.published",
            name=release.name,
            version=release.version,
            sha256=release.weights_sha256,
            test_accuracy=test.get("accuracy"),
            run_name=durable.name,
        )
        return FederationResult(release, reports, test, run_id)


def _run_round_with_policy(
    grid: Grid, prepared: PreparedRun, weights: dict[str, torch.Tensor], round_no: int
) -> tuple[dict[str, torch.Tensor], RoundReport, set[int], int]:
    """:func:`run_round`, retried per ``on-round-failure`` / ``round-retries``.

    Returns the round's result and the number of attempts it took. Each failed attempt
    is logged, counted and audited; the last one re-raises (the run aborts).
    """
    config = prepared.config
    attempt = 0
    while True:
        prepared.attempt = attempt
        if prepared.privacy is not None:
            prepared.privacy.staged.clear()  # a failed attempt releases nothing
        try:
            new_weights, report, nodes = run_round(grid, prepared, weights, round_no)
            return new_weights, report, nodes, attempt + 1
        except RoundFailedError as exc:
            retry = config.on_round_failure == "retry" and attempt < config.round_retries
            observe.round_failed(round_no, exc)
            if not retry:
                observe.run_aborted(round_no, exc, attempt + 1)
                log.error("round.aborted", attempts=attempt + 1, error=str(exc))
                raise
            attempt += 1
            observe.round_retried(round_no, attempt, exc)
            log.warning(
                "round.retry", attempt=attempt + 1, of=config.round_retries + 1, error=str(exc)
            )
        finally:
            prepared.attempt = 0


def publish(
    prepared: PreparedRun,
    weights: Mapping[str, torch.Tensor],
    reports: list[RoundReport],
    test: dict[str, float],
    contributors: int,
    run_id: int,
) -> Release:
    """Gate the candidate, then publish it signed, versioned and with its model card.

    The line's validation suite scores the candidate against its parent; a candidate that
    fails is recorded (``fedcommons release rejected``) and
    :class:`~fedcommons.errors.CandidateRejectedError` is raised: nothing is published.
    """
    config = prepared.config
    registry = prepared.registry or Registry(config.registry_path)
    suite = prepared.suite or load_suite(prepared.task, config.validation_suite, config.gate_target)
    signer = prepared.signer or Signer.load_or_create(signing_key_path(config))
    parent = prepared.parent
    parent_weights = registry.load_weights(parent) if parent else None
    parent_manifest = parent.manifest() if parent else None
    gate = run_gate(
        prepared.task,
        suite,
        weights,
        parent=parent_weights,
        parent_version=parent.version if parent else None,
        parent_validation=parent_manifest.validation if parent_manifest else None,
    )
    last = reports[-1]
    metrics = {"val_accuracy": last.val_accuracy, "val_loss": last.val_loss}
    metrics.update({f"test_{k}": v for k, v in test.items() if k != "examples"})
    if not gate.passed:
        rejection = registry.record_rejection(
            config.line,
            weights,
            parent=parent,
            reasons=gate.reasons,
            report={
                "validation": gate.to_dict(),
                "metrics": metrics,
                "config": config.to_flat(),
                "flower_run_id": run_id,
                "contributors": contributors,
            },
        )
        log.warning("release.rejected", id=rejection.id, reasons=gate.reasons)
        raise CandidateRejectedError(
            f"candidate for {config.line} rejected by the validation gate (rejection "
            f"#{rejection.id}; see `fedcommons release rejected`): " + "; ".join(gate.reasons),
            rejection.id,
            gate.reasons,
        )
    change = diff_weights(parent_weights, weights) if parent_weights is not None else None
    decision = decide_bump(
        change,
        gate.degraded_tasks,
        max_changed_fraction=config.patch_max_changed,
        override=config.version_bump,
        override_reason=config.version_bump_reason,
    )
    fingerprints = dict(gate.fingerprints)
    test_loader = prepared.task.test_loader()
    if test_loader is not None:
        fingerprints[f"{prepared.task.name}/test"] = fingerprint_loader(test_loader)

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
            validation=gate.to_dict(),
            data_fingerprints=fingerprints,
            version_bump=decision.to_dict(),
            privacy=prepared.privacy.manifest_privacy() if prepared.privacy else {},
            compression=config.compression,
            upload_bytes=sum(sum(r.upload_bytes.values()) for r in reports),
            base=patch_base(prepared.task),
        )

    return registry.publish(
        config.line,
        weights,
        build,
        signer=signer,
        parent=parent,
        bump=decision.bump,
        render_card=render_card,
    )
