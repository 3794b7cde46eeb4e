"""The release manifest: what a published release is, in one JSON document."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from typing import Any

MANIFEST_SCHEMA_VERSION = 1


@dataclass
class ReleaseManifest:
    """Everything needed to know what a release is and how it was made.

    ``weights_sha256`` is the SHA-256 of the safetensors file, which the registry
    stores content-addressed under that hash.
    """

    name: str
    version: str
    parent_version: str | None
    parent_manifest_sha256: str | None
    created: str
    task: str
    strategy: str
    strategy_params: dict[str, Any]
    rounds: int
    clients_per_round: int
    contributors: int
    weights_sha256: str
    weights_bytes: int
    num_parameters: int
    metrics: dict[str, float]
    round_metrics: list[dict[str, Any]]
    config: dict[str, Any]
    code_version: str
    flower_run_id: int | None = None
    #: Compression spec of the run's updates and the bytes clients uploaded (#3).
    compression: str = "dense"
    upload_bytes: int = 0
    #: Privacy guarantee of the release and its ledger summary (#6).
    privacy: dict[str, Any] = field(default_factory=dict)
    #: Validation-gate results per task, with device and duration (#5).
    validation: dict[str, Any] = field(default_factory=dict)
    #: SHA-256 fingerprints of every validation/test set used (#5).
    data_fingerprints: dict[str, str] = field(default_factory=dict)
    #: The computed semantic-version bump, its reasons and any operator override (#5).
    version_bump: dict[str, Any] = field(default_factory=dict)
    #: SHA-256 of the release's model card (README.md) (#5).
    card_sha256: str = ""
    #: Key id (SHA-256 of the raw Ed25519 public key) that signs this manifest (#5).
    signing_key_id: str = ""
    #: The code that aggregated: origin, ``module:qualname``, package and version (#17).
    strategy_code: dict[str, Any] = field(default_factory=dict)
    schema_version: int = MANIFEST_SCHEMA_VERSION
    extra: dict[str, Any] = field(default_factory=dict)
    #: For a patch release (#15): the pinned base it applies to — name, SHA-256 of the
    #: base's weights, adapter and its configuration. The registry stores the patch only.
    base: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def for_weights(
        cls,
        name: str,
        version: str,
        weights_sha256: str,
        weights_bytes: int,
        num_parameters: int,
        *,
        parent: Any = None,
        created: str = "",
        task: str = "digits",
        strategy: str = "none",
        **overrides: Any,
    ) -> ReleaseManifest:
        """A manifest for weights published outside a federation (imports, pre-training).

        ``parent`` is a registry ``Release`` (or anything with ``version`` and
        ``manifest_sha256``); run-only fields default to empty, ``overrides`` replaces any field.
        """
        values: dict[str, Any] = {
            "name": name,
            "version": version,
            "parent_version": parent.version if parent else None,
            "parent_manifest_sha256": parent.manifest_sha256 if parent else None,
            "created": created or datetime.now(UTC).isoformat(timespec="microseconds"),
            "task": task,
            "strategy": strategy,
            "strategy_params": {},
            "rounds": 0,
            "clients_per_round": 0,
            "contributors": 0,
            "weights_sha256": weights_sha256,
            "weights_bytes": weights_bytes,
            "num_parameters": num_parameters,
            "metrics": {},
            "round_metrics": [],
            "config": {},
            "code_version": "",
        }
        values.update(overrides)
        return cls(**values)

    def to_json(self) -> bytes:
        """Canonical JSON (sorted keys, UTF-8): the bytes that get hashed."""
        return (json.dumps(asdict(self), sort_keys=True, indent=2) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> ReleaseManifest:
        """Parse a manifest, ignoring keys this version does not know."""
        raw = json.loads(data)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})
