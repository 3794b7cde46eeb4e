"""The release manifest: what a published release is, in one JSON document."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
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
    schema_version: int = MANIFEST_SCHEMA_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> bytes:
        """Canonical JSON (sorted keys, UTF-8): the bytes that get hashed."""
        return (json.dumps(asdict(self), sort_keys=True, indent=2) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> ReleaseManifest:
        """Parse a manifest, ignoring keys this version does not know."""
        raw = json.loads(data)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})
