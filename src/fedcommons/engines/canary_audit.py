"""End-to-end canary audit: canary institutions through the real coordinator path.

What runs is the production code: the coordinator's ServerApp (:func:`run_federation`)
on the in-process engine (the same ServerApp the simulation and deployment engines
run), with its sampling, reply intake, clipping, DP-FedAvg noise, ledger composition,
durable commits and publishing into a scratch registry. The institutions are canaries:

1. ``canaries`` canary institutions, each with its own coordinate of the model's flat
   parameter vector; each is *enrolled* independently with probability ½ (add/remove
   adjacency: a canary that is out never connects). An enrolled canary replies to every
   round with ``canary_norm`` (default 10·C, so clipping matters) along its coordinate;
   ``dropouts`` more institutions are enrolled and always fail their round (an error
   reply), as crashed sites do. The declared population is canaries + dropouts.
2. The adversary sees only what the coordinator serves: after every round it reads the
   round's checkpoint in the scratch registry (the per-round released model) and, after
   the run, every served file (manifest, card, ledger, index, audit files). It scores
   each canary by the log-likelihood ratio of the per-round released values at the
   canary's coordinate, with the mechanism's public parameters (z, C, W, q from the
   ledger); a canary whose node id appears in any served file is scored as enrolled.
3. Guesses, the f-DP test against the claimed curve and the empirical ε:
   :mod:`fedcommons.privacy.audits.canary`.

Seeded bugs (:mod:`fedcommons.privacy.audits.seeded_bugs`) are switched on through their
environment variable for the duration of one audit; the scratch registry carries the
marker file that lets them act.
"""

from __future__ import annotations

import math
import os
import secrets
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from safetensors.torch import load as st_load

from fedcommons.coordinator.checkpoint import WEIGHTS_PREFIX
from fedcommons.coordinator.config import RunConfig
from fedcommons.engines.inprocess import run_in_process
from fedcommons.errors import PrivacyConfigError
from fedcommons.privacy.audits import seeded_bugs
from fedcommons.privacy.audits.canary import (
    GUESS_FRACTIONS,
    claim_falsified,
    empirical_epsilon,
    guesses,
    steinke_epsilon_bound,
)
from fedcommons.privacy.ledger import PrivacyLedger, ledger_path
from fedcommons.tasks import load_task
from fedcommons.wire import keys

RUN_NAME = "canary-audit"
LINE = "canary-audit"
COORDINATE = "canary-coordinate"
NORM = "canary-norm"


@dataclass(frozen=True)
class PipelineAuditConfig:
    """The audited mechanism and the audit's size (defaults: the documented benchmark)."""

    canaries: int = 1000
    dropouts: int = 1000
    rounds: int = 2
    noise_multiplier: float = 2.83
    clip_norm: float = 1.0
    canary_norm: float = 10.0  # in units of C
    delta: float = 1e-5
    sampling: str = "poisson"
    sample_rate: float = 1.0
    accountant: str = "prv"
    confidence: float = 0.95
    seed: int = 0
    task: str = "digits"
    task_options: dict[str, Any] = field(default_factory=lambda: {"hidden": "64"})

    def __post_init__(self) -> None:
        if self.canaries < 10 or self.dropouts < 0 or self.rounds < 1:
            raise PrivacyConfigError("need >= 10 canaries, >= 0 dropouts and >= 1 round")
        if not 0 < self.sample_rate <= 1:
            raise PrivacyConfigError(f"sample rate must be in (0, 1], got {self.sample_rate}")
        if not 0 < self.confidence < 1:
            raise PrivacyConfigError(f"confidence must be in (0, 1), got {self.confidence}")

    @property
    def population(self) -> int:
        """The declared population: every canary and every dropout institution."""
        return self.canaries + self.dropouts


@dataclass
class PipelineAuditResult:
    """What one pipeline audit measured."""

    seeded_bug: str
    canaries: int
    enrolled: int
    dropouts: int
    rounds: int
    parameters: int
    noise_multiplier: float
    sample_rate: float
    delta: float
    claimed_epsilon: float
    counts: list[tuple[float, int, int]]
    falsified: bool
    empirical_epsilon: float
    steinke_bound: float
    leaked_ids: int
    confidence: float
    seconds: float

    @property
    def passed(self) -> bool:
        """Whether the released outputs are consistent with the claimed guarantee."""
        return not self.falsified

    def to_dict(self) -> dict[str, Any]:
        """Fields plus the verdict."""
        return {**asdict(self), "passed": self.passed}


def _canary_app() -> ClientApp:
    """A canary institution: replies ``norm`` along its own coordinate, whatever the base."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        base = msg.content[keys.BASE_ARRAYS].to_torch_state_dict()
        index, norm = int(context.node_config[COORDINATE]), float(context.node_config[NORM])
        delta, offset = {}, 0
        for name in sorted(base):  # the flat vector's order: tensor names, sorted
            value = base[name]
            flat = torch.zeros(value.numel(), dtype=value.dtype)
            if offset <= index < offset + value.numel():
                flat[index - offset] = norm
            delta[name] = flat.reshape(value.shape)
            offset += value.numel()
        content = RecordDict(
            {
                keys.DELTA_ARRAYS: ArrayRecord(delta),
                keys.REPLY_METRICS: MetricRecord({keys.NUM_EXAMPLES: 1}),
            }
        )
        return Message(content=content, reply_to=msg)

    return app


def _dropout_app() -> ClientApp:
    """An institution that is sampled and fails every round (an error reply)."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return Message(Error(code=1, reason="site crashed"), reply_to=msg)

    return app


class _Adversary:
    """Reads each round's released model from the scratch registry as it is committed."""

    def __init__(self, registry: Path, base: dict[str, torch.Tensor], coords: np.ndarray) -> None:
        self.registry, self.coords = registry, coords
        self.previous = _flat(base)
        self.observed: list[np.ndarray] = []

    def on_start(self, config: object, run_id: int) -> None:
        """Nothing to read before round 1."""

    def on_round(self, report: Any) -> None:
        """Read the checkpoint the round just committed (a served file)."""
        path = self.registry / "runs" / RUN_NAME / f"round-{int(report.round):05d}.safetensors"
        tensors = st_load(path.read_bytes())
        weights = {
            k.removeprefix(WEIGHTS_PREFIX): v
            for k, v in tensors.items()
            if k.startswith(WEIGHTS_PREFIX)
        }
        now = _flat(weights)
        self.observed.append((now - self.previous)[self.coords])
        self.previous = now


def _flat(weights: dict[str, torch.Tensor]) -> np.ndarray:
    """The flat parameter vector, tensors in sorted name order (as the canaries index it)."""
    return np.concatenate([weights[k].detach().double().flatten().numpy() for k in sorted(weights)])


def _served_ids(registry: Path, ids: list[int]) -> set[int]:
    """Node ids (as decimal text) that appear in any file under the served registry."""
    wanted = {str(i).encode(): i for i in ids}
    found: set[int] = set()
    for path in registry.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            found |= {i for text, i in wanted.items() if text in data}
    return found


@contextmanager
def _seeded(bug: str | None) -> Iterator[None]:
    old = os.environ.get(seeded_bugs.ENV)
    if bug:
        os.environ[seeded_bugs.ENV] = bug
    else:
        os.environ.pop(seeded_bugs.ENV, None)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(seeded_bugs.ENV, None)
        else:
            os.environ[seeded_bugs.ENV] = old


def run_pipeline_audit(
    cfg: PipelineAuditConfig,
    *,
    seeded_bug: str | None = None,
    workdir: Path | None = None,
    with_empirical_epsilon: bool = True,
) -> PipelineAuditResult:
    """Run the canaries through the coordinator once and audit what it released."""
    if seeded_bug is not None and seeded_bug not in seeded_bugs.SEEDED_BUGS:
        raise PrivacyConfigError(f"seeded bug must be one of {seeded_bugs.SEEDED_BUGS}")
    started = time.perf_counter()
    root = Path(workdir or tempfile.mkdtemp(prefix="fc-canary-"))
    registry = root / "registry"
    registry.mkdir(parents=True, exist_ok=True)
    (registry / seeded_bugs.MARKER).write_text("scratch registry of a canary audit\n")

    task = load_task(cfg.task, dict(cfg.task_options))
    base = {k: v.detach().clone() for k, v in task.build_model().state_dict().items()}
    d = sum(v.numel() for v in base.values())
    if cfg.canaries > d:
        raise PrivacyConfigError(f"{cfg.canaries} canaries need >= as many parameters, not {d}")
    rng = np.random.default_rng(cfg.seed)  # the auditor's secret: coordinates, enrolment, ids
    coords = rng.permutation(d)[: cfg.canaries]
    enrolled = rng.random(cfg.canaries) < 0.5
    # random 64-bit node ids, as Flower's engines assign (half of them beyond 2^63)
    ids = [int(x) | ((k % 2) << 63) for k, x in enumerate(rng.integers(1, 2**63, cfg.population))]
    if len(set(ids)) != len(ids):
        raise PrivacyConfigError("node id collision; use another seed")
    canary_ids, dropout_ids = ids[: cfg.canaries], ids[cfg.canaries :]

    apps: list[ClientApp] = []
    node_configs: list[dict[str, Any]] = []
    node_ids: list[int] = []
    canary, dropout = _canary_app(), _dropout_app()
    for i in np.flatnonzero(enrolled):
        apps.append(canary)
        node_configs.append({COORDINATE: int(coords[i]), NORM: cfg.canary_norm * cfg.clip_norm})
        node_ids.append(canary_ids[i])
    for j in range(cfg.dropouts):
        apps.append(dropout)
        node_configs.append({})
        node_ids.append(dropout_ids[j])

    per_round = max(1, round(cfg.sample_rate * cfg.population)) if cfg.sample_rate < 1 else 0
    config = RunConfig(
        task=cfg.task,
        task_options={**cfg.task_options, "num-partitions": 1},  # canaries hold no data
        strategy="fedavg",
        rounds=cfg.rounds,
        clients_per_round=per_round,
        population=cfg.population,
        min_clients=1,
        local_epochs=1,
        registry=str(registry),
        run_name=RUN_NAME,
        release_name=LINE,
        node_wait_timeout=0.5,  # half the canaries are out: go on with whoever is enrolled
        private_dir=str(root / "coordinator-private"),
        gate_target="tolerance",
        gate_first_release="record",  # canaries hold no data: the release is no model
        dp_params={
            "noise-multiplier": cfg.noise_multiplier,
            "clip-norm": cfg.clip_norm,
            "epsilon": 1e6,
            "delta": cfg.delta,
            "sampling": cfg.sampling,
            "accountant": cfg.accountant,
        },
    )
    adversary = _Adversary(registry, base, coords)
    with _seeded(seeded_bug):
        result = run_in_process(
            config, apps, observer=adversary, node_configs=node_configs, node_ids=node_ids
        )

    # -- the adversary's view: the ledger's public parameters, released values, files
    entries = [
        e
        for e in PrivacyLedger(ledger_path(registry, LINE)).entries()
        if e.get("mechanism") == "dp-fedavg"
    ]
    x = np.stack(adversary.observed, axis=1)  # canaries x rounds
    scores = np.zeros(cfg.canaries)
    for r, e in enumerate(entries):
        q = float(e["sample_rate"])
        xs = x[:, r] * float(e["expected_participants"]) / float(e["clip_norm"])
        sigma = float(e["noise_multiplier"]) * float(e["sensitivity"]) / float(e["clip_norm"])
        llr = np.clip((xs - 0.5) / sigma**2, -700, 700)
        scores += llr if q >= 1 else np.log1p(-q + q * np.exp(llr))
    leaked = _served_ids(registry, canary_ids)
    for i, node in enumerate(canary_ids):
        if node in leaked:
            scores[i] = math.inf  # named in a served file: it took part
    counts = guesses(scores, enrolled, GUESS_FRACTIONS)
    history = [(float(e["noise_multiplier"]), float(e["sample_rate"]), 1) for e in entries]
    falsified = claim_falsified(cfg.canaries, counts, history, cfg.confidence)
    best = max(counts, key=lambda c: c[2] / c[1])
    privacy = result.release.manifest().privacy
    return PipelineAuditResult(
        seeded_bug=seeded_bug or "none",
        canaries=cfg.canaries,
        enrolled=int(enrolled.sum()),
        dropouts=cfg.dropouts,
        rounds=cfg.rounds,
        parameters=d,
        noise_multiplier=cfg.noise_multiplier,
        sample_rate=float(entries[0]["sample_rate"]) if entries else cfg.sample_rate,
        delta=cfg.delta,
        claimed_epsilon=float(privacy["central"]["epsilon"]),
        counts=counts,
        falsified=falsified,
        empirical_epsilon=(
            empirical_epsilon(cfg.canaries, counts, history, cfg.delta, cfg.confidence)
            if with_empirical_epsilon
            else float("nan")
        ),
        steinke_bound=steinke_epsilon_bound(
            cfg.canaries, best[1], best[2], cfg.delta, cfg.confidence
        ),
        leaked_ids=len(leaked),
        confidence=cfg.confidence,
        seconds=time.perf_counter() - started,
    )


def secret_seed() -> int:
    """A fresh audit seed (the CLI's default: nobody can predict the canaries)."""
    return secrets.randbits(32)
