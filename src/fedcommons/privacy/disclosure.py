"""What a coordinator keeps to itself: its private state directory, apart from the registry.

A registry is what the coordinator *serves*: manifests, cards, ledgers, ``HEAD.json``, the
index, checkpoints. For a DP line nothing there may name an institution or carry a
per-institution or un-noised per-round figure. The coordinator still needs those figures
to operate (who was sampled, who replied, what each reported as its DP-SGD spend, which
replies were rejected and why): they go to its private state directory instead:

    <private-dir>/rounds.jsonl    one JSON line per committed round (node ids, counts, spends)
    <private-dir>/audit.jsonl     the audit log of DP lines (it names nodes)

``private-dir`` (run config), else ``$FEDCOMMONS_COORDINATOR_DIR``, else
``<state root>/coordinator/registry-<first 16 hex of SHA-256 of the registry's path>``
(state root: ``$FEDCOMMONS_STATE_DIR`` or ``$XDG_STATE_HOME/fedcommons``; when that lies
inside the registry, ``<registry>.coordinator-private`` beside it). A private directory
configured inside the registry is refused: the registry is meant to be published as a
whole. Files are created with mode 0600 inside a 0700 directory.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from fedcommons.errors import ConfigError
from fedcommons.fileio import append_json_line, default_state_root, read_json_lines

ENV = "FEDCOMMONS_COORDINATOR_DIR"
ROUNDS_FILE = "rounds.jsonl"


def private_dir(registry_root: Path, configured: str = "") -> Path:
    """The coordinator's private state directory for ``registry_root`` (see module doc).

    Raises :class:`ConfigError` when it would lie inside the registry.
    """
    registry = Path(registry_root).expanduser().resolve()
    raw = configured or os.environ.get(ENV, "")
    if raw:
        path = Path(raw).expanduser().resolve()
    else:
        digest = hashlib.sha256(str(registry).encode()).hexdigest()[:16]
        path = default_state_root().expanduser().resolve() / "coordinator" / f"registry-{digest}"
        if path == registry or registry in path.parents:  # a state root inside the registry
            path = registry.with_name(registry.name + ".coordinator-private")
    if path == registry or registry in path.parents:
        raise ConfigError(
            f"the coordinator's private directory {str(path)!r} lies inside the registry "
            f"{str(registry)!r}, which is published as a whole: choose private-dir outside it"
        )
    return path


class PrivateRoundLog:
    """Append-only JSON lines of per-round operational records (private, never served)."""

    def __init__(self, directory: Path) -> None:
        self.path = Path(directory) / ROUNDS_FILE

    def append(self, record: Mapping[str, Any]) -> None:
        """Append one record durably (exclusive lock, fsync)."""
        append_json_line(self.path, record, lambda: ConfigError(f"{self.path} is locked"))

    def records(self) -> Iterator[dict[str, Any]]:
        """Every record, oldest first (nothing when the log does not exist)."""
        return read_json_lines(
            self.path, lambda n: ConfigError(f"{self.path} line {n} is not JSON")
        )
