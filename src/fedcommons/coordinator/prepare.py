"""Before round 1: validate a run and refuse what cannot work or would leak.

:func:`prepare_run` loads the task, the strategy, the base release and the line's privacy
bookkeeping, and refuses bad input (unknown task or strategy, a base release that does not
fit, a foreign signing key, a strategy central DP or secure aggregation cannot run) before
anything is written or any node is contacted.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedcommons.coordinator import faults
from fedcommons.coordinator.config import RunConfig
from fedcommons.coordinator.runs import committed_rounds
from fedcommons.errors import (
    ConfigError,
    SecAggIncompatibleError,
    SigningKeyError,
)
from fedcommons.fileio import config_dir
from fedcommons.logs import get_logger
from fedcommons.privacy.audits import seeded_bugs
from fedcommons.privacy.disclosure import private_dir
from fedcommons.privacy.line import LinePrivacy, check_dp_round_policy
from fedcommons.releases.gate import ValidationSuite, load_suite
from fedcommons.releases.registry import Registry, Release, check_key_outside, check_writable
from fedcommons.releases.signing import Signer
from fedcommons.strategies import (
    Aggregator,
    create_strategy,
)
from fedcommons.strategies.fedavg import FedAvg
from fedcommons.tasks import Task, load_task
from fedcommons.wire.codec import CompressionSpec, dense_fp32_bytes

log = get_logger("fedcommons.coordinator")


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
    #: A line's first release must beat the starting weights (the gate): the run keeps
    #: them here when it has no parent release; ``None`` otherwise (#18).
    start_weights: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    def release_weights(self) -> None:
        """Drop the starting weights once the run holds its own; keep names, shapes, dtypes.

        The run holds the current weights itself: keeping round 0's here as well would
        pin one more copy of the model for the whole run. What stays are ``meta``
        tensors (no memory), enough for :attr:`max_update_bytes`; a released PreparedRun
        cannot start another run (:attr:`released`). A run with no parent release keeps
        the starting weights in :attr:`start_weights` for the gate.
        """
        if self.parent is None and self.start_weights is None:
            self.start_weights = dict(self.weights)
        self.weights = {k: torch.empty_like(v, device="meta") for k, v in self.weights.items()}

    @property
    def released(self) -> bool:
        """Whether :meth:`release_weights` handed the weights to a run."""
        return any(v.is_meta for v in self.weights.values())

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
    faults.check_environment()
    check_dp_compatible(strategy, config)
    check_secagg_compatible(strategy, config)  # refuses what would leak individual updates (#7)
    check_dp_round_policy(
        central=config.central_dp,
        population=config.population,
        min_clients=config.min_clients,
        on_round_failure=config.on_round_failure,
    )
    private_dir(config.registry_path, config.private_dir)  # refuses one inside the registry
    seeded_bugs.check_environment(config.registry_path)
    privacy = LinePrivacy(
        config.registry_path,
        config.line,
        config.central_dp,
        clients_per_round=config.clients_per_round,
        population=config.population,
    )
    remaining = config.rounds - committed_rounds(config)  # a resumed run plans what is left
    if remaining > 0:
        privacy.check_plan(remaining)
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


#: Where signing keys were created before they moved out of the registry.
LEGACY_KEY = Path("private") / "ed25519.pem"


def signing_key_path(config: RunConfig) -> Path:
    """Path of the coordinator's Ed25519 signing key; never inside the registry.

    ``signing-key``, else ``$FEDCOMMONS_SIGNING_KEY``, else ``signing-key.pem`` in the
    user's configuration directory (:func:`fedcommons.fileio.config_dir`; created on first
    use, mode 0600). Raises :class:`SigningKeyError` for a key inside the registry, whose
    files are served, and for a registry that still keeps its key at the old default
    ``<registry>/private/ed25519.pem`` (saying how to move it).
    """
    path = config.signing_key or os.environ.get("FEDCOMMONS_SIGNING_KEY", "")
    key = Path(path).expanduser() if path else config_dir() / "signing-key.pem"
    legacy = config.registry_path / LEGACY_KEY
    if not path and not key.exists() and legacy.exists():
        raise SigningKeyError(
            f"this registry's signing key is still at the old default {str(legacy)!r}, inside "
            "the directory it serves; move it out and keep it private: "
            f"`mkdir -p -m 700 {key.parent} && mv {legacy} {key}` (or set signing-key). "
            "If the registry was ever copied or served with private/ in it, treat the key "
            "as leaked: sign with a new key and tell your users to pin it."
        )
    check_key_outside(key, config.registry_path)
    return key


def check_secagg_compatible(strategy: Aggregator, config: Any) -> None:
    """Refuse combinations that need what secure aggregation hides: individual updates.

    Raises :class:`~fedcommons.errors.SecAggIncompatibleError` saying why. Allowed:
    FedAvg-family strategies (linear in the sum; plugins opt in with a class attribute
    ``secagg_compatible = True``), central DP, quantized value codings, shared-seed
    random-k.
    """
    if not config.secagg:
        return
    name = getattr(strategy, "name", type(strategy).__name__)
    why = None
    if strategy.needs_fisher:
        why = (
            f"strategy {name!r} weights every coordinate by each client's own Fisher "
            "information; under secure aggregation the coordinator sees only the sum"
        )
    elif strategy.uses_mask:
        why = (
            f"strategy {name!r} aligns each client's mask (TIES-style sign election and "
            "masked means need individual supports and signs); only the sum is revealed"
        )
    elif not strategy.streaming:
        why = (
            f"strategy {name!r} is a robust aggregator that needs every individual update "
            "(median, trimmed mean); secure aggregation reveals only their sum"
        )
    elif getattr(strategy, "clip_norm", None) is not None:
        why = (
            f"strategy {name!r} bounds each update's norm on the server (clip_norm), which "
            "needs individual updates; use central DP (dp.clip-norm): clients clip themselves"
        )
    elif not (isinstance(strategy, FedAvg) or getattr(strategy, "secagg_compatible", False)):
        why = (
            f"strategy {name!r} does not declare secagg_compatible = True: only rules that "
            "depend on the updates through their weighted sum can run on a secure sum"
        )
    spec = CompressionSpec.parse(config.compression)
    if why is None and spec.sparsifier in {"topk", "topk-tensor", "fish"}:
        why = (
            f"compression {config.compression!r} selects client-specific coordinates "
            f"({spec.sparsifier}); their supports would leak and the masked vectors could "
            "not be summed: use dense, a quantized coding (int8, int4) or randk (shared seed)"
        )
    if why:
        raise SecAggIncompatibleError(f"secure aggregation refused: {why}")
