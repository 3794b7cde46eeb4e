"""The run configuration of a federation, validated before any round starts.

It travels as Flower's flat run config (``flwr run --run-config 'rounds=5 task.alpha=0.1'``
or ``[tool.flwr.app.config]``); :meth:`RunConfig.from_flat` parses and checks it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from fedcommons.errors import ConfigError, InvalidNameError
from fedcommons.names import NameKind, check_name
from fedcommons.privacy.config import CentralDPConfig
from fedcommons.wire import keys
from fedcommons.wire.codec import CompressionSpec

STRATEGY_PARAM_PREFIX = "strategy."
DP_PARAM_PREFIX = "dp."
_DICT_FIELDS = {"task_options", "strategy_params", "dp_params"}


@dataclass
class RunConfig:
    """What the operator schedules: task, strategy, rounds, sampling, registry."""

    task: str = "digits"
    task_options: dict[str, Any] = field(default_factory=dict)
    strategy: str = "fedavg"
    strategy_params: dict[str, Any] = field(default_factory=dict)
    rounds: int = 10
    clients_per_round: int = 0  # 0: every available node
    #: Declared number of institutions a round samples from: each round waits for them;
    #: required with dp.* (q and W derive from it). 0: whoever is connected.
    population: int = 0
    min_clients: int = 1
    local_epochs: int = 5
    lr: float = 0.05
    batch_size: int = 16
    seed: int = 0
    registry: str = "fedcommons-registry"
    release_name: str = ""  # default: "<task>"
    base_release: str = ""  # version to start from; empty: fresh model
    round_timeout: float = 600.0  # seconds to wait for replies in one round
    node_wait_timeout: float = 120.0  # seconds to wait for min_clients nodes to connect
    compression: str = "dense"  # how clients encode their deltas (#3), e.g. "topk:0.01+int8"
    error_feedback: bool = True  # clients carry what compression dropped into the next round
    max_update_bytes: int = 0  # cap on one reply's update payload; 0: 2x dense fp32 + 64 KiB
    fish_mask: str = "site"  # FISH masks from each site's data, or "public" data (same mask)
    # -- releases (#5) --
    validation_suite: str = ""  # "package.module:function"; empty: the task's suite
    gate_target: str = ""  # "no-worse" | "tolerance"; empty: the suite's policy
    #: A line's first release must beat its starting weights ("beat-start", #18); "record"
    #: scores them and records the comparison without enforcing it (a scratch registry,
    #: e.g. the canary audit's, or a DP line's first short run).
    gate_first_release: str = "beat-start"
    patch_max_changed: float = 0.1  # max fraction of entries a PATCH release may change
    version_bump: str = ""  # operator override: "patch" | "minor" | "major"
    version_bump_reason: str = ""  # required with version-bump; recorded in the manifest
    signing_key: str = ""  # Ed25519 PEM; empty: $FEDCOMMONS_SIGNING_KEY or ~/.config/fedcommons/
    #: The coordinator's private state (per-node round records, a DP line's audit log),
    #: never inside the registry; empty: see fedcommons.privacy.disclosure.private_dir.
    private_dir: str = ""
    #: Central (user-level) DP of the line, "dp.<key>" options; any key turns it on (#6).
    dp_params: dict[str, Any] = field(default_factory=dict)
    # -- durable rounds (#8) --
    run_name: str = ""  # durable identity: a run started again under it resumes; "": new name
    on_round_failure: str = "abort"  # a round short of min-clients at its deadline: abort|retry
    round_retries: int = 2  # with on-round-failure = retry: re-sampled attempts per round
    # -- secure aggregation (#7), see docs/secure-aggregation.md --
    secagg: bool = False  # SecAgg+: the coordinator sees only the sum of the updates
    secagg_num_shares: int = 0  # shares per secret = neighbours + 1; 0: all sampled (SecAgg)
    secagg_threshold: int = 0  # shares that reconstruct a secret; 0: floor(2/3 shares) + 1
    secagg_bits: int = 0  # ring Z_2^bits; 0: the smallest that cannot overflow
    secagg_clip: float = 4.0  # per-coordinate range [-clip, clip] of quantized deltas
    secagg_max_weight: int = 1024  # cap on a client's weight (examples) in the masked sum
    secagg_stage_timeout: float = 120.0  # seconds per key/unmask stage (training: round-timeout)
    # -- MLflow mirror (#17), see docs/operations.md --
    mlflow_tracking_uri: str = ""  # e.g. sqlite:///mlflow.db or http://host:5000; "": off
    mlflow_experiment: str = ""  # MLflow experiment of the run; "": the release line
    #: "roster": only roster-signed key advertisements take part (#13); "none": any
    secagg_auth: str = "none"

    @property
    def central_dp(self) -> CentralDPConfig | None:
        """The validated central-DP config (``None`` when no ``dp.*`` key is set)."""
        if not self.dp_params:
            return None
        return CentralDPConfig.from_options(self.dp_params)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first invalid field."""
        if self.rounds < 1:
            raise ConfigError(f"rounds must be >= 1, got {self.rounds}")
        if self.clients_per_round < 0:
            raise ConfigError(f"clients-per-round must be >= 0, got {self.clients_per_round}")
        if self.min_clients < 1:
            raise ConfigError(f"min-clients must be >= 1, got {self.min_clients}")
        if self.population < 0:
            raise ConfigError(f"population must be >= 0, got {self.population}")
        if self.population and self.min_clients > self.population:
            raise ConfigError(
                f"min-clients ({self.min_clients}) exceeds the population ({self.population})"
            )
        if self.clients_per_round and self.min_clients > self.clients_per_round:
            raise ConfigError(
                f"min-clients ({self.min_clients}) exceeds clients-per-round "
                f"({self.clients_per_round})"
            )
        if self.local_epochs < 1:
            raise ConfigError(f"local-epochs must be >= 1, got {self.local_epochs}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.batch_size < 1:
            raise ConfigError(f"batch-size must be >= 1, got {self.batch_size}")
        if not self.round_timeout > 0 or not self.node_wait_timeout > 0:
            raise ConfigError("round-timeout and node-wait-timeout must be > 0")
        if not self.registry:
            raise ConfigError("registry path is empty")
        if self.max_update_bytes < 0:
            raise ConfigError(f"max-update-bytes must be >= 0, got {self.max_update_bytes}")
        self.compression = str(CompressionSpec.parse(self.compression))
        if self.fish_mask not in {"site", "public"}:
            raise ConfigError(f"fish-mask must be 'site' or 'public', got {self.fish_mask!r}")
        _ = self.central_dp  # DP budget and mechanism errors surface at configuration time
        self._validate_secagg()
        self._validate_release_options()
        self._validate_round_policy()
        if self.mlflow_tracking_uri:
            from fedcommons.releases.integrations.mlflow_mirror import (
                check_available,
                check_tracking_uri,
            )

            check_tracking_uri(self.mlflow_tracking_uri)
            check_available()

    def _validate_round_policy(self) -> None:
        """Durable-round keys (#8): deadline policy and the run's name."""
        if self.on_round_failure not in {"abort", "retry"}:
            raise ConfigError(
                f"on-round-failure must be abort or retry, got {self.on_round_failure!r}"
            )
        if not 0 <= self.round_retries <= 100:
            raise ConfigError(f"round-retries must lie in 0..100, got {self.round_retries}")
        if self.run_name:  # runs/<run-name>/ holds its checkpoints
            _check_key_name("run-name", self.run_name, NameKind.run)

    def _validate_secagg(self) -> None:
        """Secure-aggregation keys (#7): ranges, and a threshold that is safe."""
        from fedcommons.errors import SecAggProtocolError
        from fedcommons.privacy.secagg.protocol import check_threshold

        if self.secagg_num_shares < 0 or self.secagg_num_shares in (1, 2):
            raise ConfigError(
                f"secagg-num-shares must be 0 (all) or >= 3, got {self.secagg_num_shares}"
            )
        if self.secagg_threshold < 0:
            raise ConfigError(f"secagg-threshold must be >= 0, got {self.secagg_threshold}")
        if self.secagg_bits and not 2 <= self.secagg_bits <= 64:
            raise ConfigError(f"secagg-bits must be 0 (auto) or 2..64, got {self.secagg_bits}")
        if not self.secagg_clip > 0 or self.secagg_clip == float("inf"):
            raise ConfigError(f"secagg-clip must be a finite number > 0, got {self.secagg_clip}")
        if self.secagg_max_weight < 1:
            raise ConfigError(f"secagg-max-weight must be >= 1, got {self.secagg_max_weight}")
        if not self.secagg_stage_timeout > 0:
            raise ConfigError("secagg-stage-timeout must be > 0")
        if self.secagg_auth not in {"none", "roster"}:
            raise ConfigError(f"secagg-auth must be none or roster, got {self.secagg_auth!r}")
        dp = self.central_dp
        if dp is not None and dp.distributed and not self.secagg:
            raise ConfigError(
                "dp.mechanism = skellam (distributed DP) adds the noise at the institutions "
                "under secure aggregation: set secagg = true"
            )
        if self.secagg_num_shares and self.secagg_threshold:
            shares = self.secagg_num_shares + (self.secagg_num_shares + 1) % 2  # even degree
            try:
                check_threshold(self.secagg_threshold, shares)
            except SecAggProtocolError as exc:
                raise ConfigError(f"secagg-threshold: {exc}") from None

    def _validate_release_options(self) -> None:
        """Release keys (#5): gate policy, patch fraction, version override."""
        if self.gate_target not in {"", "no-worse", "tolerance"}:
            raise ConfigError(
                f"gate-target must be no-worse or tolerance, got {self.gate_target!r}"
            )
        if self.gate_first_release not in {"beat-start", "record"}:
            raise ConfigError(
                f"gate-first-release must be beat-start or record, got {self.gate_first_release!r}"
            )
        if not 0.0 <= self.patch_max_changed <= 1.0:
            raise ConfigError(f"patch-max-changed must lie in [0, 1], got {self.patch_max_changed}")
        if self.version_bump not in {"", "patch", "minor", "major"}:
            raise ConfigError(
                f"version-bump must be patch, minor or major, got {self.version_bump!r}"
            )
        if self.version_bump and not self.version_bump_reason.strip():
            raise ConfigError("version-bump needs version-bump-reason (recorded in the manifest)")
        # releases/<line>/ and privacy/<line>/
        _check_key_name("release-name" if self.release_name else "task", self.line, NameKind.line)

    @property
    def line(self) -> str:
        """Release line (name) this run publishes into.

        ``release-name``, else the task: a task reference ``pkg.module:Class`` names the
        line ``pkg.module.Class`` (a line name becomes a directory; see
        :mod:`fedcommons.names`).
        """
        return self.release_name or self.task.replace(":", ".")

    @property
    def registry_path(self) -> Path:
        """Registry directory, with ``~`` expanded."""
        return Path(self.registry).expanduser()

    # -- Flower's flat run config ---------------------------------------------------
    @classmethod
    def from_flat(cls, flat: Mapping[str, Any]) -> RunConfig:
        """Parse ``{"rounds": 5, "task.alpha": 0.1, "strategy.server_lr": 1.0, ...}``."""
        names = {f.name: f for f in fields(cls)}
        kwargs: dict[str, Any] = {"task_options": {}, "strategy_params": {}}
        for key, value in flat.items():
            if key.startswith(keys.TASK_OPTION_PREFIX):
                kwargs["task_options"][key.removeprefix(keys.TASK_OPTION_PREFIX)] = value
            elif key.startswith(STRATEGY_PARAM_PREFIX):
                kwargs["strategy_params"][key.removeprefix(STRATEGY_PARAM_PREFIX)] = value
            elif key.startswith(DP_PARAM_PREFIX):
                kwargs.setdefault("dp_params", {})[key.removeprefix(DP_PARAM_PREFIX)] = value
            else:
                attr = key.replace("-", "_")
                if attr not in names or attr in _DICT_FIELDS:
                    valid = sorted(n.replace("_", "-") for n in names if n not in _DICT_FIELDS)
                    raise ConfigError(
                        f"unknown run-config key {key!r}; valid keys: {', '.join(valid)}, "
                        "task.<option>, strategy.<param>, dp.<param>"
                    )
                kwargs[attr] = _coerce(key, value, type(getattr(cls(), attr)))
        return cls(**kwargs)

    def to_flat(self) -> dict[str, Any]:
        """Inverse of :meth:`from_flat` (what the manifest records as the run config)."""
        flat: dict[str, Any] = {}
        for key, value in asdict(self).items():
            if key == "task_options":
                flat.update({f"{keys.TASK_OPTION_PREFIX}{k}": v for k, v in value.items()})
            elif key == "strategy_params":
                flat.update({f"{STRATEGY_PARAM_PREFIX}{k}": v for k, v in value.items()})
            elif key == "dp_params":
                flat.update({f"{DP_PARAM_PREFIX}{k}": v for k, v in value.items()})
            else:
                flat[key.replace("_", "-")] = value
        return flat


def _check_key_name(key: str, value: str, kind: NameKind) -> None:
    """:func:`check_name`, with the run-config key named in the error."""
    try:
        check_name(value, kind)
    except InvalidNameError as exc:
        raise InvalidNameError(f"{key}: {exc}") from None


def _coerce(key: str, value: Any, kind: type) -> Any:
    try:
        if kind is bool:
            if isinstance(value, str) and value.lower() in {"true", "false", "1", "0"}:
                return value.lower() in {"true", "1"}
            if isinstance(value, bool | int) and value in (0, 1):
                return bool(value)
            raise ValueError("not a boolean")
        if kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError("not an integer")
            return int(value)
        if kind is float:
            return float(value)
        return str(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"run-config {key!r}: {value!r} is not a valid {kind.__name__}") from exc
